//! Reading JSON text into a `serde_json::Value`, refusing repeated keys.
//!
//! serde_json keeps the last of two equal keys in an object, so
//! `{"gender":"male","gender":"female"}` would silently become a female
//! patient — what one reader of a document sees need not be what another
//! stores. RFC 8259 leaves duplicate names undefined; FHIR's JSON format
//! forbids them. This reader builds the same `Value` through a
//! `DeserializeSeed`, fails on the second occurrence of a key, and names the
//! key's path in the error. It runs on serde_json's own `Deserializer`, so the
//! nesting depth limit (128) and the line/column positions stay as they are.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// JSON text that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFault {
    /// What is wrong, without the position.
    pub message: String,
    /// For a repeated key: its path, FHIRPath-like, starting with the
    /// document's `resourceType` when it has one (`Patient.name[1].family`).
    pub path: Option<String>,
    pub line: usize,
    pub column: usize,
}

/// Parses JSON text; an object with a repeated key is an error naming the
/// key's path.
pub fn from_slice(bytes: &[u8]) -> Result<Value, JsonFault> {
    let trail = Trail::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed { trail: &trail }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    value.map_err(|e| fault(e, &trail))
}

/// The way down to a repeated key, recorded on the way back up.
#[derive(Default)]
struct Trail {
    duplicate: Cell<bool>,
    steps: RefCell<Vec<Step>>,
    /// The `resourceType` of the outermost object unwound so far.
    root_type: RefCell<Option<String>>,
}

enum Step {
    Key(String),
    Index(usize),
}

fn fault(e: serde_json::Error, trail: &Trail) -> JsonFault {
    let (line, column) = (e.line(), e.column());
    let text = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    let bare = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    if !trail.duplicate.get() {
        return JsonFault {
            message: bare,
            path: None,
            line,
            column,
        };
    }
    let mut path = trail.root_type.borrow().clone().unwrap_or_default();
    for step in trail.steps.borrow().iter().rev() {
        match step {
            Step::Key(k) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Step::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    JsonFault {
        message: format!("duplicate key '{path}': a JSON object may not repeat a key"),
        path: Some(path),
        line,
        column,
    }
}

/// The key under which serde_json passes a number's text with
/// `arbitrary_precision`.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

#[derive(Clone, Copy)]
struct Seed<'t> {
    trail: &'t Trail,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        loop {
            match seq.next_element_seed(self) {
                Ok(Some(v)) => items.push(v),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    self.trail.steps.borrow_mut().push(Step::Index(items.len()));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.is_empty() && key == NUMBER_TOKEN {
                // serde_json's `arbitrary_precision` (which fhirbolt turns on
                // to keep decimals exact) hands numbers over as this map.
                let text: String = map.next_value()?;
                return text
                    .parse::<serde_json::Number>()
                    .map(Value::Number)
                    .map_err(de::Error::custom);
            }
            let result = if out.contains_key(&key) {
                self.trail.duplicate.set(true);
                Err(de::Error::custom("duplicate key"))
            } else {
                map.next_value_seed(self)
            };
            match result {
                Ok(v) => {
                    out.insert(key, v);
                }
                Err(e) => {
                    self.trail.steps.borrow_mut().push(Step::Key(key));
                    *self.trail.root_type.borrow_mut() = out
                        .get("resourceType")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_value_as_serde_json() {
        let text =
            br#"{"a":[1,-2,3.5,1e400,null,true,"x\u0041"],"b":{"c":{}},"d":18446744073709551615}"#;
        let ours = from_slice(text);
        let theirs: serde_json::Result<Value> = serde_json::from_slice(text);
        // Both refuse the out-of-range number the same way.
        assert_eq!(ours.is_err(), theirs.is_err());
        let text = br#"{"a":[1,-2,3.5,0.10,1e3,null,true,"x\u0041"],"b":{"c":{}},"d":18446744073709551615}"#;
        assert_eq!(
            from_slice(text).unwrap(),
            serde_json::from_slice::<Value>(text).unwrap()
        );
    }

    #[test]
    fn repeated_key_is_refused_with_its_path() {
        let e = from_slice(br#"{"resourceType":"Patient","gender":"male","gender":"female"}"#)
            .unwrap_err();
        assert_eq!(e.path.as_deref(), Some("Patient.gender"));
        assert!(
            e.message.starts_with("duplicate key 'Patient.gender'"),
            "{e:?}"
        );
        let e =
            from_slice(br#"{"name":[{"given":["a"]},{"family":"x","family":"y"}]}"#).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("name[1].family"));
        assert_eq!((e.line, e.column > 30), (1, true));
        // Inside a contained resource, the path starts at the outer one.
        let e = from_slice(
            br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"a","id":"b"}}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path.as_deref(), Some("Bundle.entry[0].resource.id"));
        // The same key in sibling objects is fine.
        assert!(from_slice(br#"[{"a":1},{"a":2}]"#).is_ok());
    }

    #[test]
    fn depth_limit_is_kept() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let e = from_slice(deep.as_bytes()).unwrap_err();
        assert!(e.message.contains("recursion limit"), "{e:?}");
        assert_eq!(e.path, None);
    }

    #[test]
    fn trailing_text_is_refused() {
        assert!(from_slice(b"{} {}").is_err());
    }
}
