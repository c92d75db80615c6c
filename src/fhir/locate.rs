//! Finding where in a document a parser's complaint points.
//!
//! fhirbolt reports *what* is wrong ("unknown field `foo`", "invalid type:
//! string \"x\"") but not *where*. These helpers search the document for the
//! element or value named in the message and return a FHIRPath-like location
//! such as `Patient.name[0].given`.

use serde_json::Value;

/// Pulls the first back-quoted or double-quoted token out of a parser message.
fn quoted(message: &str, open: char, close: char) -> Option<&str> {
    let start = message.find(open)? + open.len_utf8();
    let rest = &message[start..];
    let end = rest.find(close)?;
    Some(&rest[..end])
}

/// Locates the fault named in `message` inside a JSON resource.
pub fn locate_in_json(root: &Value, message: &str) -> Option<String> {
    let rtype = root.get("resourceType")?.as_str()?.to_string();
    if message.starts_with("unknown field") || message.starts_with("duplicate field") {
        let key = quoted(message, '`', '`')?;
        return find_key(root, key, &rtype);
    }
    if message.starts_with("missing field") {
        return Some(rtype);
    }
    if let Some(v) = quoted(message, '"', '"') {
        if let Some(p) = find_string(root, v, &rtype) {
            return Some(p);
        }
    }
    None
}

fn find_key(v: &Value, key: &str, path: &str) -> Option<String> {
    match v {
        Value::Object(map) => {
            if map.contains_key(key) {
                return Some(format!("{path}.{key}"));
            }
            for (k, child) in map {
                if let Some(p) = find_key(child, key, &format!("{path}.{k}")) {
                    return Some(p);
                }
            }
            None
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, child)| find_key(child, key, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn find_string(v: &Value, needle: &str, path: &str) -> Option<String> {
    match v {
        Value::String(s) if s == needle => Some(path.to_string()),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, child)| find_string(child, needle, &format!("{path}.{k}"))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, child)| find_string(child, needle, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Locates the fault named in `message` inside an XML resource by walking the
/// element tree and returning the path of the first element or attribute value
/// the message names.
pub fn locate_in_xml(bytes: &[u8], message: &str) -> Option<String> {
    use quick_xml::events::Event;
    let key = quoted(message, '`', '`');
    let value = quoted(message, '"', '"');
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut stack: Vec<String> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let event = reader.read_event_into(&mut buf).ok()?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                let empty = matches!(event, Event::Empty(_));
                if key == Some(name.as_str()) && !stack.is_empty() {
                    stack.push(name);
                    return Some(stack.join("."));
                }
                if let Some(v) = value {
                    for attr in e.attributes().flatten() {
                        if attr.value.as_ref() == v.as_bytes() {
                            stack.push(name);
                            return Some(stack.join("."));
                        }
                    }
                }
                if !empty {
                    stack.push(name);
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Eof => return None,
            _ => {}
        }
        buf.clear();
    }
}
// x
