//! The one place where FHIR resources cross between wire formats and ehrx's
//! internal form (a `serde_json::Value` holding FHIR JSON).
//!
//! Every resource that enters ehrx — a JSON or XML body, a Bundle entry, the
//! result of a patch, an imported file — passes through here. JSON text is
//! read refusing repeated keys (`super::json`); the element walk of
//! `super::validate` then checks shapes, primitives, required codes and
//! string limits (fhirbolt coerces or accepts those); finally the resource is
//! parsed into fhirbolt's typed R4 model in strict mode, which rejects unknown
//! elements and wrong types. XML is parsed by fhirbolt first and the walk
//! checks what it produced. The generic fhirbolt code is instantiated only
//! here, behind plain functions, so the rest of the crate never pays its
//! compile cost again.

use fhirbolt::model::r4::Resource as R4Resource;
use fhirbolt::serde::{DeserializationConfig, DeserializationMode, SerializationConfig};
use serde_json::Value;

/// A structural fault found while parsing a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFault {
    /// What is wrong, in words.
    pub message: String,
    /// FHIRPath-like location of the fault when it can be determined.
    pub expression: Option<String>,
    /// Line and column in the source text, when the parser reports them.
    pub position: Option<(usize, usize)>,
}

fn strict() -> Option<DeserializationConfig> {
    Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    })
}

/// Validates a FHIR JSON value against the R4 model and returns it normalised
/// (the form the R4 model serialises to).
pub fn validate_json(value: Value) -> Result<Value, ParseFault> {
    check_primitives(&value)?;
    check_narratives(&value)?;
    let probe = value.clone();
    let typed: R4Resource = guarded(|| {
        fhirbolt::json::from_json_value(value, strict()).map_err(|e| {
            let message = e.to_string();
            let expression = super::locate::locate_in_json(&probe, &message);
            ParseFault {
                message,
                expression,
                position: None,
            }
        })
    })?;
    to_json(typed)
}

/// Runs a fhirbolt parse, turning a panic into a fault.
///
/// fhirbolt 0.4 unwraps the first element of a JSON array without checking
/// that there is one (`fhirbolt-serde` `element/de.rs`, `next_value_seed`):
/// `"name": []` panicked the handler and the connection closed without an
/// answer. The element walk refuses empty arrays before fhirbolt sees them;
/// this guard keeps any input it misses from taking a request down.
fn guarded<T>(parse: impl FnOnce() -> Result<T, ParseFault>) -> Result<T, ParseFault> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(ParseFault {
            message: "the resource could not be parsed".into(),
            expression: None,
            position: None,
        })
    })
}

fn check_primitives(value: &Value) -> Result<(), ParseFault> {
    super::validate::check_resource(value).map_err(|f| ParseFault {
        message: f.message,
        expression: Some(f.path),
        position: None,
    })
}

fn to_json(typed: R4Resource) -> Result<Value, ParseFault> {
    fhirbolt::json::to_json_value(typed, Some(SerializationConfig { always_sort: false })).map_err(
        |e| ParseFault {
            message: format!("cannot serialise resource: {e}"),
            expression: None,
            position: None,
        },
    )
}

/// Reads JSON text (not yet a resource), refusing repeated keys.
pub fn read_json(bytes: &[u8]) -> Result<Value, ParseFault> {
    super::json::from_slice(bytes).map_err(|e| ParseFault {
        message: format!("malformed JSON: {}", e.message),
        expression: e.path,
        position: Some((e.line, e.column)),
    })
}

/// Parses FHIR JSON text: syntax first (with line and column), then the R4 model.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ParseFault> {
    let value = read_json(bytes)?;
    if !value.is_object() {
        return Err(ParseFault {
            message: "a FHIR resource must be a JSON object".into(),
            expression: None,
            position: None,
        });
    }
    validate_json(value)
}

/// Parses FHIR XML text into FHIR JSON.
pub fn parse_xml(bytes: &[u8]) -> Result<Value, ParseFault> {
    let divs = scan_xml(bytes)?;
    let typed: R4Resource = guarded(|| {
        fhirbolt::xml::from_slice(bytes, strict()).map_err(|e| {
            let message = e.to_string();
            let expression = super::locate::locate_in_xml(bytes, &message);
            ParseFault {
                message: format!("invalid FHIR XML: {message}"),
                expression,
                position: None,
            }
        })
    })?;
    let mut value = to_json(typed)?;
    if divs.len() == count_divs(&value) {
        let divs: Vec<String> = divs
            .into_iter()
            .map(|(a, b)| String::from_utf8_lossy(&bytes[a..b]).into_owned())
            .collect();
        restore_divs(&mut value, &mut divs.into_iter());
    }
    check_primitives(&value)?;
    Ok(value)
}

/// Serialises FHIR JSON (already valid) to FHIR XML.
pub fn to_xml(value: &Value) -> Result<Vec<u8>, ParseFault> {
    let typed: R4Resource = guarded(|| {
        fhirbolt::json::from_json_value(value.clone(), strict()).map_err(|e| ParseFault {
            message: format!("cannot convert to XML: {e}"),
            expression: None,
            position: None,
        })
    })?;
    let xml = fhirbolt::xml::to_vec(&typed, None).map_err(|e| ParseFault {
        message: format!("cannot serialise XML: {e}"),
        expression: None,
        position: None,
    })?;
    if count_divs(value) == 0 {
        return Ok(xml);
    }
    // The narratives in element order (JSON key order is not significant).
    let canonical = to_json(typed)?;
    Ok(splice_divs(xml, &canonical))
}

const XHTML_NS: &[u8] = b"http://www.w3.org/1999/xhtml";

/// Byte ranges of the top-level XHTML `div` elements, in document order.
fn xhtml_div_ranges(bytes: &[u8]) -> Option<Vec<(usize, usize)>> {
    scan_xml(bytes).ok()
}

/// Line and column (1-based) of a byte offset.
fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let upto = &bytes[..offset.min(bytes.len())];
    let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = upto.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// Checks that XML is well formed (every element closed, end tags match, no
/// DTD) and returns the byte ranges of the top-level XHTML `div` elements.
fn scan_xml(bytes: &[u8]) -> Result<Vec<(usize, usize)>, ParseFault> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let fault = |message: String, at: usize| ParseFault {
        message: format!("malformed XML: {message}"),
        expression: None,
        position: Some(line_col(bytes, at)),
    };
    let max_depth = crate::limits::get().nesting_depth;
    let mut divs = Vec::new();
    let mut buf = Vec::new();
    let mut depth = 0usize;
    let mut div_depth = 0usize;
    let mut start = 0usize;
    let mut seen_root = false;
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| fault(e.to_string(), reader.error_position() as usize))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                if depth == 0 && seen_root {
                    return Err(fault("more than one root element".into(), before));
                }
                seen_root = true;
                if div_depth == 0 {
                    let is_div = e.name().as_ref() == b"div"
                        && e.attributes()
                            .flatten()
                            .any(|a| a.key.as_ref() == b"xmlns" && a.value.as_ref() == XHTML_NS);
                    if is_div {
                        if empty {
                            divs.push((before, reader.buffer_position() as usize));
                        } else {
                            start = before;
                            div_depth = 1;
                        }
                    }
                } else if !empty {
                    div_depth += 1;
                }
                if !empty {
                    depth += 1;
                    if depth > max_depth {
                        return Err(fault(
                            format!("elements nest deeper than {max_depth} levels"),
                            before,
                        ));
                    }
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if div_depth > 0 {
                    div_depth -= 1;
                    if div_depth == 0 {
                        divs.push((start, reader.buffer_position() as usize));
                    }
                }
            }
            Event::DocType(_) => {
                return Err(fault(
                    "document type declarations (DTDs) are not accepted".into(),
                    before,
                ))
            }
            Event::Eof => {
                if depth > 0 {
                    return Err(fault(
                        "the document ends before every element is closed".into(),
                        bytes.len(),
                    ));
                }
                if !seen_root {
                    return Err(fault("no root element".into(), 0));
                }
                return Ok(divs);
            }
            _ => {}
        }
        buf.clear();
    }
}

/// Refuses a narrative whose XHTML nests deeper than the cap: the XML
/// writer and every reader after it would recurse that deep. (An XML body
/// is capped as a whole by [`scan_xml`]; in JSON the XHTML is a string.)
fn check_narratives(value: &Value) -> Result<(), ParseFault> {
    let max_depth = crate::limits::get().nesting_depth;
    let mut divs = Vec::new();
    collect_divs(value, &mut divs);
    for div in divs {
        let mut reader = quick_xml::Reader::from_str(&div);
        let mut depth = 0usize;
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Start(_)) => {
                    depth += 1;
                    if depth > max_depth {
                        return Err(ParseFault {
                            message: format!(
                                "the narrative's XHTML nests deeper than {max_depth} levels"
                            ),
                            expression: Some("div".into()),
                            position: None,
                        });
                    }
                }
                Ok(quick_xml::events::Event::End(_)) => depth = depth.saturating_sub(1),
                Ok(quick_xml::events::Event::Eof) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    Ok(())
}

/// Replaces narrative `div` values, in document order, by `divs`.
fn restore_divs(value: &mut Value, divs: &mut std::vec::IntoIter<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "div" && v.is_string() {
                    if let Some(d) = divs.next() {
                        *v = Value::String(d);
                    }
                } else {
                    restore_divs(v, divs);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| restore_divs(v, divs)),
        _ => {}
    }
}

fn collect_divs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("div", Value::String(d)) => out.push(d.clone()),
                    _ => collect_divs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_divs(v, out)),
        _ => {}
    }
}

/// Puts the narratives back into serialised XML verbatim (fhirbolt's
/// writer re-indents XHTML).
fn splice_divs(xml: Vec<u8>, value: &Value) -> Vec<u8> {
    let mut divs = Vec::new();
    collect_divs(value, &mut divs);
    let Some(ranges) = xhtml_div_ranges(&xml) else {
        return xml;
    };
    if divs.is_empty() || ranges.len() != divs.len() {
        return xml;
    }
    let mut out = Vec::with_capacity(xml.len());
    let mut last = 0;
    for ((a, b), d) in ranges.into_iter().zip(divs) {
        out.extend_from_slice(&xml[last..a]);
        out.extend_from_slice(d.as_bytes());
        last = b;
    }
    out.extend_from_slice(&xml[last..]);
    out
}

fn count_divs(value: &Value) -> usize {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k == "div" && v.is_string() {
                    1
                } else {
                    count_divs(v)
                }
            })
            .sum(),
        Value::Array(items) => items.iter().map(count_divs).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_arrays_never_reach_fhirbolt() {
        // fhirbolt panics on these; each must be a fault instead.
        for doc in [
            r#"{"resourceType":"Patient","name":[]}"#,
            r#"{"resourceType":"Bundle","type":"transaction","entry":[]}"#,
            r#"{"resourceType":"Patient","unknownElement":[]}"#,
            r#"{"resourceType":"Bundle","type":"batch","entry":[{"resource":{"name":[]}}]}"#,
            r#"{"resourceType":"NoSuchType","name":[]}"#,
        ] {
            assert!(parse_json(doc.as_bytes()).is_err(), "{doc}");
        }
        let panics = || -> Result<(), ParseFault> { panic!("inside the parser") };
        assert!(guarded(panics).is_err());
    }

    #[test]
    fn narratives_follow_element_order_not_json_key_order() {
        // JSON key order is not significant: `section` before `text` here.
        let json = br#"{"resourceType":"Composition","status":"final",
            "section":[{"title":"S","text":{"status":"generated",
              "div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">  section  </div>"}}],
            "text":{"status":"generated",
              "div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">  top  </div>"},
            "type":{"text":"note"},"date":"2020-01-01","author":[{"display":"A"}],"title":"T"}"#;
        let value = parse_json(json).unwrap();
        let xml = String::from_utf8(to_xml(&value).unwrap()).unwrap();
        let top = xml.find("  top  ").expect("top narrative kept verbatim");
        let section = xml
            .find("  section  ")
            .expect("section narrative kept verbatim");
        assert!(top < section, "{xml}");
        let back = parse_xml(xml.as_bytes()).unwrap();
        assert_eq!(back["text"]["div"], value["text"]["div"]);
        assert_eq!(
            back["section"][0]["text"]["div"],
            value["section"][0]["text"]["div"]
        );
    }
}
