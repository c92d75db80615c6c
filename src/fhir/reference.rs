//! Reference handling inside resources: rewriting temporary ids
//! (`urn:uuid:…`, `urn:oid:…`, or any `fullUrl`) to the ids the server
//! assigned, and finding conditional references (`Patient?identifier=…`).

use std::collections::HashMap;

use serde_json::Value;

/// Replaces every string value equal to a key of `map` — wherever it sits in
/// the resource (`reference`, `url`, extensions, …) — and every occurrence of
/// an `urn:` key inside narrative XHTML.
pub fn rewrite(value: &mut Value, map: &HashMap<String, String>) {
    if map.is_empty() {
        return;
    }
    match value {
        Value::String(s) => {
            if let Some(new) = map.get(s.as_str()) {
                *s = new.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, map)),
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                if k == "div" {
                    if let Value::String(s) = v {
                        if s.contains("urn:") {
                            *s = rewrite_text(s, map);
                        }
                        continue;
                    }
                }
                rewrite(v, map);
            }
        }
        _ => {}
    }
}

/// Rewrites `urn:uuid:`/`urn:oid:` tokens inside free text.
fn rewrite_text(text: &str, map: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("urn:") {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let end = tail
            .find(|c: char| c == '"' || c == '\'' || c == '<' || c == '>' || c.is_whitespace())
            .unwrap_or(tail.len());
        let token = &tail[..end];
        match map.get(token) {
            Some(new) => out.push_str(new),
            None => out.push_str(token),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Collects every conditional reference (`Type?criteria`) in `reference` elements.
pub fn conditional_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| conditional_references(v, out)),
        Value::Object(obj) => {
            for (k, v) in obj {
                match (k.as_str(), v) {
                    ("reference", Value::String(s)) if is_conditional(s) => out.push(s.clone()),
                    _ => conditional_references(v, out),
                }
            }
        }
        _ => {}
    }
}

/// Collects every literal reference in `reference` elements: not
/// conditional, not to a contained resource (`#id`).
pub fn literal_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| literal_references(v, out)),
        Value::Object(obj) => {
            for (k, v) in obj {
                match (k.as_str(), v) {
                    ("reference", Value::String(s))
                        if !is_conditional(s) && !s.starts_with('#') =>
                    {
                        out.push(s.clone())
                    }
                    _ => literal_references(v, out),
                }
            }
        }
        _ => {}
    }
}

fn is_conditional(reference: &str) -> bool {
    match reference.split_once('?') {
        Some((rtype, _)) => !rtype.contains('/') && !rtype.contains(':') && !rtype.is_empty(),
        None => false,
    }
}

/// Splits `Type?query` into its parts.
pub fn split_conditional(reference: &str) -> Option<(&str, &str)> {
    reference.split_once('?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_everywhere() {
        let mut map = HashMap::new();
        map.insert("urn:uuid:1".to_string(), "Patient/abc".to_string());
        let mut v = json!({
            "subject": {"reference": "urn:uuid:1"},
            "extension": [{"url": "x", "valueReference": {"reference": "urn:uuid:1"}}],
            "text": {"div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"urn:uuid:1\">p</a> urn:uuid:2</div>"},
            "other": "urn:uuid:1x"
        });
        rewrite(&mut v, &map);
        assert_eq!(v["subject"]["reference"], "Patient/abc");
        assert_eq!(
            v["extension"][0]["valueReference"]["reference"],
            "Patient/abc"
        );
        assert!(v["text"]["div"]
            .as_str()
            .unwrap()
            .contains("href=\"Patient/abc\""));
        assert!(v["text"]["div"].as_str().unwrap().contains("urn:uuid:2"));
        assert_eq!(v["other"], "urn:uuid:1x");
    }

    #[test]
    fn finds_conditional() {
        let v = json!({"a": {"reference": "Organization?identifier=x|1"}, "b": {"reference": "Patient/1"},
                       "c": {"reference": "http://x/y?z"}});
        let mut out = Vec::new();
        conditional_references(&v, &mut out);
        assert_eq!(out, vec!["Organization?identifier=x|1".to_string()]);
    }
}
