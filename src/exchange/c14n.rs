//! Canonical XML 1.0 (inclusive) and Exclusive XML Canonicalization 1.0,
//! with and without comments, over a `roxmltree` document.
//!
//! Only the node-sets XML-DSig same-document references produce are
//! supported: a whole subtree (or the whole document), optionally minus one
//! excluded subtree (the enveloped signature). That is all ehrx accepts, so
//! the general XPath node-set machinery is not needed.
//!
//! Namespace nodes are computed from each element's in-scope namespaces, as
//! the specifications define them, not from the declarations as written.

use std::collections::BTreeMap;

use roxmltree::{Node, NodeId, NodeType};

use super::xml::qname;

pub const C14N: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315";
pub const C14N_COMMENTS: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments";
pub const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
pub const EXC_C14N_COMMENTS: &str = "http://www.w3.org/2001/10/xml-exc-c14n#WithComments";

/// One canonicalization method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    pub exclusive: bool,
    pub with_comments: bool,
    /// Exclusive c14n's InclusiveNamespaces PrefixList (`#default` for the
    /// default namespace).
    pub inclusive_prefixes: Vec<String>,
}

impl Method {
    /// The method named by an Algorithm URI, if supported.
    pub fn from_uri(uri: &str) -> Option<Method> {
        let (exclusive, with_comments) = match uri {
            C14N => (false, false),
            C14N_COMMENTS => (false, true),
            EXC_C14N => (true, false),
            EXC_C14N_COMMENTS => (true, true),
            _ => return None,
        };
        Some(Method {
            exclusive,
            with_comments,
            inclusive_prefixes: Vec::new(),
        })
    }

    pub fn uri(&self) -> &'static str {
        match (self.exclusive, self.with_comments) {
            (false, false) => C14N,
            (false, true) => C14N_COMMENTS,
            (true, false) => EXC_C14N,
            (true, true) => EXC_C14N_COMMENTS,
        }
    }
}

/// Namespace context: prefix ("" for the default namespace) → URI.
type Scope<'a> = BTreeMap<&'a str, &'a str>;

/// Canonicalizes `apex` and its descendants (the whole document when `apex`
/// is the root), leaving out the subtree of `exclude`.
pub fn canonicalize(apex: Node, exclude: Option<NodeId>, method: &Method) -> String {
    let mut out = String::new();
    if apex.node_type() == NodeType::Root {
        let mut seen_element = false;
        for child in apex.children() {
            if Some(child.id()) == exclude {
                continue;
            }
            match child.node_type() {
                NodeType::Element => {
                    element(child, exclude, method, &Scope::new(), &mut out);
                    seen_element = true;
                }
                NodeType::Comment if method.with_comments => {
                    if seen_element {
                        out.push('\n');
                    }
                    comment(child, &mut out);
                    if !seen_element {
                        out.push('\n');
                    }
                }
                NodeType::PI => {
                    if seen_element {
                        out.push('\n');
                    }
                    pi(child, &mut out);
                    if !seen_element {
                        out.push('\n');
                    }
                }
                _ => {}
            }
        }
    } else {
        element(apex, exclude, method, &Scope::new(), &mut out);
    }
    out
}

fn prefix_of(qname: &str) -> &str {
    qname.split_once(':').map(|(p, _)| p).unwrap_or("")
}

fn element<'a>(
    node: Node<'a, '_>,
    exclude: Option<NodeId>,
    method: &Method,
    rendered: &Scope<'a>,
    out: &mut String,
) {
    let name = qname(node);
    let input = node.document().input_text();
    // In-scope namespaces of this element (the `xml` prefix is never output).
    let mut in_scope: Scope = Scope::new();
    for ns in node.namespaces() {
        let prefix = ns.name().unwrap_or("");
        if prefix == "xml" {
            continue;
        }
        in_scope.insert(prefix, ns.uri());
    }
    let attrs: Vec<_> = node.attributes().collect();
    let mut to_render: Vec<(&str, &str)> = Vec::new();
    if method.exclusive {
        let mut used: Vec<&str> = vec![prefix_of(name)];
        for a in &attrs {
            let q = &input[a.range_qname()];
            if q.contains(':') {
                used.push(prefix_of(q));
            }
        }
        for p in &method.inclusive_prefixes {
            let p = if p == "#default" { "" } else { p.as_str() };
            used.push(p);
        }
        used.sort_unstable();
        used.dedup();
        for p in used {
            let uri = in_scope.get(p).copied().unwrap_or("");
            let before = rendered.get(p).copied().unwrap_or("");
            if uri != before {
                to_render.push((p, uri));
            }
        }
    } else {
        for (p, uri) in &in_scope {
            if rendered.get(p).copied().unwrap_or("") != *uri {
                to_render.push((p, uri));
            }
        }
        // The default namespace was undeclared: say so once.
        if !in_scope.contains_key("") && !rendered.get("").copied().unwrap_or("").is_empty() {
            to_render.push(("", ""));
        }
        to_render.sort_unstable();
    }
    // Never render an empty non-default namespace (not well-formed).
    to_render.retain(|(p, uri)| p.is_empty() || !uri.is_empty());

    out.push('<');
    out.push_str(name);
    let mut scope = rendered.clone();
    for (p, uri) in &to_render {
        if p.is_empty() {
            out.push_str(" xmlns=\"");
        } else {
            out.push_str(" xmlns:");
            out.push_str(p);
            out.push_str("=\"");
        }
        escape_attr(uri, out);
        out.push('"');
        scope.insert(p, uri);
    }
    let mut sorted: Vec<_> = attrs
        .iter()
        .map(|a| {
            (
                a.namespace().unwrap_or(""),
                a.name(),
                &input[a.range_qname()],
                a.value(),
            )
        })
        .collect();
    sorted.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (_, _, q, value) in sorted {
        out.push(' ');
        out.push_str(q);
        out.push_str("=\"");
        escape_attr(value, out);
        out.push('"');
    }
    out.push('>');
    for child in node.children() {
        if Some(child.id()) == exclude {
            continue;
        }
        match child.node_type() {
            NodeType::Element => element(child, exclude, method, &scope, out),
            NodeType::Text => escape_text(child.text().unwrap_or(""), out),
            NodeType::Comment if method.with_comments => comment(child, out),
            NodeType::PI => pi(child, out),
            _ => {}
        }
    }
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

fn comment(node: Node, out: &mut String) {
    out.push_str("<!--");
    out.push_str(node.text().unwrap_or(""));
    out.push_str("-->");
}

fn pi(node: Node, out: &mut String) {
    if let Some(pi) = node.pi() {
        out.push_str("<?");
        out.push_str(pi.target);
        if let Some(v) = pi.value {
            if !v.is_empty() {
                out.push(' ');
                out.push_str(v);
            }
        }
        out.push_str("?>");
    }
}

fn escape_text(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
}

fn escape_attr(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#x9;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c14n(xml: &str, exclusive: bool) -> String {
        let doc = roxmltree::Document::parse(xml).unwrap();
        let m = Method {
            exclusive,
            with_comments: false,
            inclusive_prefixes: vec![],
        };
        canonicalize(doc.root(), None, &m)
    }

    #[test]
    fn spec_example_3_1_without_comments() {
        // Canonical XML 1.0 §3.1 (PIs, comments, outside the document element).
        let input = "<?xml version=\"1.0\"?>\n\n<?xml-stylesheet   href=\"doc.xsl\"\n   type=\"text/xsl\"   ?>\n\n<doc>Hello, world!<!-- Comment 1 --></doc>\n\n<?pi-without-data     ?>\n\n<!-- Comment 2 -->\n\n<!-- Comment 3 -->";
        assert_eq!(
            c14n(input, false),
            "<?xml-stylesheet href=\"doc.xsl\"\n   type=\"text/xsl\"   ?>\n<doc>Hello, world!</doc>\n<?pi-without-data?>"
        );
    }

    #[test]
    fn attributes_sorted_and_namespaces_rendered() {
        let input = r#"<e xmlns:b="http://b" xmlns:a="http://a" b:x="1" a:y="2" z="3" xmlns="http://d"><f a:q="&lt;&#9;"/></e>"#;
        assert_eq!(
            c14n(input, false),
            r#"<e xmlns="http://d" xmlns:a="http://a" xmlns:b="http://b" z="3" a:y="2" b:x="1"><f a:q="&lt;&#x9;"></f></e>"#
        );
        // Exclusive: only visibly utilised namespaces, where first used.
        let input =
            r#"<a:e xmlns:a="http://a" xmlns:u="http://unused"><b:f xmlns:b="http://b"/></a:e>"#;
        assert_eq!(
            c14n(input, true),
            r#"<a:e xmlns:a="http://a"><b:f xmlns:b="http://b"></b:f></a:e>"#
        );
    }

    #[test]
    fn default_namespace_undeclared() {
        let input = r#"<e xmlns="http://d"><f xmlns=""/></e>"#;
        assert_eq!(
            c14n(input, false),
            r#"<e xmlns="http://d"><f xmlns=""></f></e>"#
        );
        assert_eq!(
            c14n(input, true),
            r#"<e xmlns="http://d"><f xmlns=""></f></e>"#
        );
    }
}
