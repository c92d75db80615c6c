//! Secure parsing of exchanged XML.
//!
//! Before anything is built, a `quick-xml` pre-scan refuses what a
//! document has no business carrying: a `<!DOCTYPE` (so no DTD, no internal
//! or external entities, no billion laughs), entity references other than the
//! five predefined ones, and nesting deeper than the limit. The size limit is
//! checked before the scan. The tree is then built with `roxmltree`, whose
//! DTD support stays off and whose node count is bounded.

use quick_xml::events::Event;
use roxmltree::{Document, Node, ParsingOptions};

use super::ExchangeError;

/// Limits of one parse.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_nodes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 8 * 1024 * 1024,
            max_depth: 128,
            max_nodes: 2_000_000,
        }
    }
}

/// Checks the document for refused constructs and returns it as text with
/// line ends normalised, ready for [`parse`].
pub fn prescan(bytes: &[u8], limits: &Limits) -> Result<String, ExchangeError> {
    if bytes.len() > limits.max_bytes {
        return Err(ExchangeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ExchangeError::xml(format!("document is not UTF-8: {e}"), None))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    loop {
        let pos = reader.buffer_position();
        match reader.read_event() {
            Ok(Event::DocType(_)) => {
                return Err(ExchangeError::Unsafe(format!(
                    "a document type declaration (<!DOCTYPE) at byte {pos} is refused: \
                     exchanged documents may not carry DTDs or entity declarations"
                )))
            }
            Ok(Event::Start(_)) => {
                depth += 1;
                if depth > limits.max_depth {
                    return Err(ExchangeError::Unsafe(format!(
                        "elements nest deeper than the limit of {} (byte {pos})",
                        limits.max_depth
                    )));
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::GeneralRef(r)) => {
                let name = String::from_utf8_lossy(&r).to_string();
                let predefined = matches!(name.as_str(), "lt" | "gt" | "amp" | "apos" | "quot")
                    || name.starts_with('#');
                if !predefined {
                    return Err(ExchangeError::Unsafe(format!(
                        "reference to the undeclared entity '&{name};' at byte {pos} is refused"
                    )));
                }
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(ExchangeError::xml(
                    format!("XML is not well-formed at byte {pos}: {e}"),
                    None,
                ))
            }
        }
    }
    // XML 1.0 §2.11: line ends are normalised to LF before parsing.
    Ok(if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        text.to_string()
    })
}

/// Builds the tree of a pre-scanned document.
pub fn parse<'a>(text: &'a str, limits: &Limits) -> Result<Document<'a>, ExchangeError> {
    let options = ParsingOptions {
        allow_dtd: false,
        nodes_limit: limits.max_nodes,
    };
    Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::DtdDetected => {
            ExchangeError::Unsafe("DTDs are refused in exchanged documents".into())
        }
        roxmltree::Error::NodesLimitReached => ExchangeError::Unsafe(format!(
            "the document has more than {} nodes",
            limits.max_nodes
        )),
        e => ExchangeError::xml(format!("XML is not well-formed: {e}"), None),
    })
}

/// The element's qualified name as written (`ds:Signature`).
pub fn qname<'a>(node: Node<'a, '_>) -> &'a str {
    let input = node.document().input_text();
    let start = node.range().start + 1;
    let rest = &input[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(rest.len());
    &rest[..end]
}

/// An XPath that names `node` uniquely, with namespace prefixes as written,
/// e.g. `/ClinicalDocument/component[1]/structuredBody/component[3]/section`.
pub fn xpath(node: Node) -> String {
    let mut steps = Vec::new();
    let mut cur = Some(node);
    while let Some(n) = cur {
        if n.is_element() {
            let name = qname(n);
            let same = |m: &Node| m.is_element() && qname(*m) == name;
            let before = n.prev_siblings().skip(1).filter(same).count();
            let after = n.next_siblings().skip(1).filter(same).count();
            if before + after > 0 {
                steps.push(format!("{name}[{}]", before + 1));
            } else {
                steps.push(name.to_string());
            }
        }
        cur = n.parent();
    }
    steps.reverse();
    format!("/{}", steps.join("/"))
}

/// Element children in `ns` named `name`.
pub fn children<'a, 'i>(
    node: Node<'a, 'i>,
    ns: &'a str,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children().filter(move |c| {
        c.is_element() && c.tag_name().namespace() == Some(ns) && c.tag_name().name() == name
    })
}

/// The one element child in `ns` named `name`, if exactly one.
pub fn child<'a, 'i>(node: Node<'a, 'i>, ns: &'a str, name: &'a str) -> Option<Node<'a, 'i>> {
    let mut it = children(node, ns, name);
    let first = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some(first)
}

/// The text content of an element (its text descendants, concatenated).
pub fn text_of(node: Node) -> String {
    node.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect()
}

/// Refuses a comment that splits the text of an element (`Jo<!---->nes`).
/// XML-DSig canonicalization without comments does not sign comments, so
/// such a document verifies while different parsers read different text
/// from it (the comment-truncation attack); ehrx does not guess which text
/// the signer meant.
pub fn refuse_split_text(doc: &Document) -> Result<(), ExchangeError> {
    for node in doc.descendants().filter(|n| n.is_comment()) {
        let text_beside = |n: Option<Node>| {
            n.is_some_and(|n| n.is_text() && !n.text().unwrap_or("").trim().is_empty())
        };
        if text_beside(node.prev_sibling()) && text_beside(node.next_sibling()) {
            let at = node.parent().map(xpath);
            return Err(ExchangeError::Signature {
                message: "a comment splits the text of an element; canonicalization without \
                          comments does not sign it, so the text is ambiguous and the \
                          document is refused"
                    .into(),
                xpath: at,
            });
        }
    }
    Ok(())
}
