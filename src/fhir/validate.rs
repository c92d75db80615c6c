//! Primitive-value validation driven by the R4 element table in
//! `profiles/r4-elements.json` (generated from the core StructureDefinitions
//! by `scripts/gen-elements.py`).
//!
//! fhirbolt checks structure (element names, objects vs arrays) but accepts
//! any text for dates, codes, ids and decimals; this walk checks every
//! primitive against its R4 type and reports the first fault with its path.

use std::sync::OnceLock;

use serde_json::{Map, Value};

static TABLE_JSON: &str = include_str!("../../profiles/r4-elements.json");

pub(crate) fn table() -> &'static Map<String, Value> {
    static TABLE: OnceLock<Map<String, Value>> = OnceLock::new();
    TABLE.get_or_init(|| match serde_json::from_str(TABLE_JSON) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    })
}

/// A primitive value that does not fit its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

/// Checks every primitive in a resource.
pub fn check_resource(resource: &Value) -> Result<(), Fault> {
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    walk_resource(resource, rtype)
}

fn walk_resource(resource: &Value, path: &str) -> Result<(), Fault> {
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
        return Ok(()); // structure errors are fhirbolt's to report
    };
    let Some(Value::Object(defs)) = table().get(rtype) else {
        return Ok(());
    };
    walk_object(resource, defs, path, Some(rtype))
}

fn walk_object(
    obj: &Value,
    defs: &Map<String, Value>,
    path: &str,
    rtype: Option<&str>,
) -> Result<(), Fault> {
    let Value::Object(map) = obj else {
        return Ok(());
    };
    for (key, value) in map {
        if key == "resourceType" || key.starts_with('_') {
            continue;
        }
        let Some(def) = defs.get(key) else { continue };
        let child = format!("{path}.{key}");
        // The resource id has type id; the table lists it as System.String.
        let def = if rtype.is_some() && key == "id" {
            &Value::String("id".into())
        } else {
            def
        };
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk_value(item, def, &format!("{child}[{i}]"))?;
                }
            }
            v => walk_value(v, def, &child)?,
        }
    }
    Ok(())
}

fn walk_value(value: &Value, def: &Value, path: &str) -> Result<(), Fault> {
    if value.is_null() {
        return Ok(()); // placeholder in a primitive array that has extensions
    }
    match def {
        Value::Object(inline) => {
            if let Some(Value::String(target)) = inline.get("$ref") {
                let mut parts = target.split('.');
                let mut node = parts.next().and_then(|t| table().get(t));
                for p in parts {
                    node = node.and_then(|n| n.get(p));
                }
                if let Some(Value::Object(d)) = node {
                    return walk_object(value, d, path, None);
                }
                return Ok(());
            }
            walk_object(value, inline, path, None)
        }
        Value::String(t) => match t.as_str() {
            "Resource" => walk_resource(value, path),
            t if is_primitive(t) => check_primitive(t, value).map_err(|message| Fault {
                path: path.to_string(),
                message,
            }),
            t => match table().get(t) {
                Some(Value::Object(d)) => walk_object(value, d, path, None),
                _ => Ok(()),
            },
        },
        _ => Ok(()),
    }
}

fn is_primitive(t: &str) -> bool {
    t.starts_with("System.") || t.chars().next().map(char::is_lowercase).unwrap_or(false)
}

fn check_primitive(t: &str, v: &Value) -> Result<(), String> {
    let want = |what: &str| {
        Err(format!(
            "expected {what} for a value of type {t}, found {v}"
        ))
    };
    match t {
        "boolean" | "System.Boolean" => {
            if v.is_boolean() {
                Ok(())
            } else {
                want("true or false")
            }
        }
        "integer" | "positiveInt" | "unsignedInt" | "System.Integer" => {
            let Some(n) = v.as_i64().filter(|_| v.is_number()) else {
                return want("an integer");
            };
            let ok = match t {
                "positiveInt" => (1..=i32::MAX as i64).contains(&n),
                "unsignedInt" => (0..=i32::MAX as i64).contains(&n),
                _ => (i32::MIN as i64..=i32::MAX as i64).contains(&n),
            };
            if ok {
                Ok(())
            } else {
                Err(format!("{n} is out of range for {t}"))
            }
        }
        "decimal" | "System.Decimal" => {
            if v.is_number() {
                Ok(())
            } else {
                want("a JSON number")
            }
        }
        _ => {
            let Some(s) = v.as_str() else {
                return want("a string");
            };
            let ok = match t {
                "date" => is_date(s),
                "dateTime" | "System.DateTime" => is_date_time(s),
                "instant" => s.contains('T') && is_date_time(s),
                "time" | "System.Time" => {
                    chrono::NaiveTime::parse_from_str(s, "%H:%M:%S%.f").is_ok()
                }
                "id" => {
                    !s.is_empty()
                        && s.len() <= 64
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                }
                "code" => !s.is_empty() && s.trim() == s && !s.contains("  "),
                "uri" | "url" | "canonical" => !s.is_empty() && !s.chars().any(char::is_whitespace),
                "oid" => s
                    .strip_prefix("urn:oid:")
                    .map(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                    .unwrap_or(false),
                "uuid" => s
                    .strip_prefix("urn:uuid:")
                    .map(|r| uuid::Uuid::parse_str(r).is_ok())
                    .unwrap_or(false),
                "base64Binary" => s.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b"+/=".contains(&b) || b.is_ascii_whitespace()
                }),
                _ => !s.is_empty(),
            };
            if ok {
                Ok(())
            } else {
                Err(format!("'{s}' is not a valid {t}"))
            }
        }
    }
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, each a real calendar value.
fn is_date(s: &str) -> bool {
    let digits = |r: &str| r.bytes().all(|b| b.is_ascii_digit());
    if !s.is_ascii() {
        return false; // and the byte slices below stay on character boundaries
    }
    match s.len() {
        4 => digits(s),
        7 => {
            digits(&s[..4])
                && &s[4..5] == "-"
                && s[5..]
                    .parse::<u32>()
                    .map(|m| (1..=12).contains(&m))
                    .unwrap_or(false)
                && digits(&s[5..])
        }
        10 => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() && digits(&s[..4]),
        _ => false,
    }
}

/// A date, or a full date-time with seconds and a time zone.
fn is_date_time(s: &str) -> bool {
    match s.split_once('T') {
        None => is_date(s),
        Some((d, time)) => {
            d.len() == 10
                && is_date(d)
                && time.len() >= 9
                && time.as_bytes()[2] == b':'
                && time.as_bytes()[5] == b':'
                && chrono::DateTime::parse_from_rfc3339(s).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fault(v: Value) -> Option<String> {
        check_resource(&v).err().map(|f| f.path)
    }

    #[test]
    fn primitives() {
        assert!(is_date("2020") && is_date("2020-02") && is_date("2020-02-29"));
        assert!(!is_date("2021-02-29") && !is_date("2020-13") && !is_date("01/02/1990"));
        assert!(
            is_date_time("2020-01-01T10:00:00Z") && is_date_time("2020-01-01T10:00:00.123+02:00")
        );
        assert!(!is_date_time("2020-01-01T10:00:00") && !is_date_time("2020-01-01T10:00Z"));
    }

    #[test]
    fn finds_the_faulty_element() {
        assert_eq!(
            fault(json!({"resourceType": "Patient", "birthDate": "01/02/1990"})),
            Some("Patient.birthDate".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Patient", "active": "yes"})),
            Some("Patient.active".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Patient", "name": [{"given": ["a", ""]}]})),
            Some("Patient.name[0].given[1]".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Patient", "contact": [{"gender": " male"}]})),
            Some("Patient.contact[0].gender".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Observation", "valueQuantity": {"value": "abc"}})),
            Some("Observation.valueQuantity.value".into())
        );
        assert_eq!(
            fault(
                json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": "a b"}}]})
            ),
            Some("Bundle.entry[0].resource.id".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Questionnaire", "item": [{"item": [{"required": 1}]}]})),
            Some("Questionnaire.item[0].item[0].required".into())
        );
        assert_eq!(
            fault(
                json!({"resourceType": "Patient", "birthDate": "1990-01-02", "name": [{"given": ["x"]}]})
            ),
            None
        );
    }
}
