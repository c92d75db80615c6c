//! Element-by-element validation of a resource held as FHIR JSON, driven by
//! two tables generated from the R4 core definitions:
//! `profiles/r4-elements.json` (each element's type, by
//! `scripts/gen-elements.py`) and `profiles/r4-strict.json` (which elements
//! repeat, and the codes of required `code` bindings, by
//! `scripts/gen-strict.py`).
//!
//! fhirbolt checks element names, but coerces shapes (a single value where a
//! list belongs and the other way round, empty lists, `null`) and accepts any
//! text for dates, codes, ids and decimals. Accepted, those become stored
//! resources that other clients cannot read and handlers that index into
//! empty lists. This walk runs before fhirbolt on JSON bodies (and on what
//! fhirbolt made of XML ones) and reports the first fault with its path:
//! an array where the element does not repeat or none where it does, an empty
//! array, `null` outside the extension alignment of primitive arrays, a
//! primitive that does not fit its type, a code outside a required value set,
//! a string over FHIR's 1 MB limit or with a forbidden control character.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde_json::{Map, Value};

static TABLE_JSON: &str = include_str!("../../profiles/r4-elements.json");
static STRICT_JSON: &str = include_str!("../../profiles/r4-strict.json");

pub(crate) fn table() -> &'static Map<String, Value> {
    static TABLE: OnceLock<Map<String, Value>> = OnceLock::new();
    TABLE.get_or_init(|| match serde_json::from_str(TABLE_JSON) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    })
}

/// What `profiles/r4-strict.json` says of one element.
#[derive(Debug, Clone, Copy, Default)]
struct Spec {
    /// The element repeats: in JSON, a non-empty array.
    many: bool,
    /// The codes its required binding allows (index into `Strict::sets`).
    codes: Option<usize>,
}

struct Strict {
    /// `Patient.contact` → `gender` → spec.
    elements: HashMap<String, HashMap<String, Spec>>,
    sets: Vec<(String, HashSet<String>)>,
}

fn strict() -> &'static Strict {
    static STRICT: OnceLock<Strict> = OnceLock::new();
    STRICT.get_or_init(|| {
        let mut out = Strict {
            elements: HashMap::new(),
            sets: Vec::new(),
        };
        let Ok(Value::Object(raw)) = serde_json::from_str::<Value>(STRICT_JSON) else {
            return out;
        };
        let mut index = HashMap::new();
        if let Some(Value::Object(sets)) = raw.get("valueSets") {
            for (name, codes) in sets {
                let codes = codes
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned))
                    .into_iter()
                    .flatten()
                    .collect();
                index.insert(name.clone(), out.sets.len());
                out.sets.push((name.clone(), codes));
            }
        }
        if let Some(Value::Object(elements)) = raw.get("elements") {
            for (parent, children) in elements {
                let Value::Object(children) = children else {
                    continue;
                };
                let specs = children
                    .iter()
                    .filter_map(|(name, spec)| {
                        let spec = spec.as_str()?;
                        let (many, vs) = match spec.strip_prefix('*') {
                            Some(rest) => (true, rest),
                            None => (false, spec),
                        };
                        let codes = vs.strip_prefix('=').and_then(|n| index.get(n).copied());
                        Some((name.clone(), Spec { many, codes }))
                    })
                    .collect();
                out.elements.insert(parent.clone(), specs);
            }
        }
        out
    })
}

fn spec(parent: &str, name: &str) -> Spec {
    strict()
        .elements
        .get(parent)
        .and_then(|m| m.get(name))
        .copied()
        .unwrap_or_default()
}

/// The type of the objects beside primitives (`_given`): R4's `Element`.
fn element_defs() -> &'static Map<String, Value> {
    static DEFS: OnceLock<Map<String, Value>> = OnceLock::new();
    DEFS.get_or_init(|| {
        let mut m = Map::new();
        m.insert("id".into(), Value::String("System.String".into()));
        m.insert("extension".into(), Value::String("Extension".into()));
        m
    })
}

/// FHIR's limit on a string's size: 1 MB (1024 × 1024 characters).
pub const MAX_STRING_CHARS: usize = 1024 * 1024;

/// An element that does not fit its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

fn fault(path: &str, message: impl Into<String>) -> Fault {
    Fault {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Checks every element of a resource, contained and entry resources included.
pub fn check_resource(resource: &Value) -> Result<(), Fault> {
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    walk_resource(resource, rtype)
}

fn walk_resource(resource: &Value, path: &str) -> Result<(), Fault> {
    let Value::Object(_) = resource else {
        return Err(fault(path, "a resource must be a JSON object"));
    };
    // Unknown or missing types are fhirbolt's to report; only empty arrays,
    // which fhirbolt cannot take, are refused here.
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
        return no_empty_arrays(resource, path);
    };
    let Some(Value::Object(defs)) = table().get(rtype) else {
        return no_empty_arrays(resource, path);
    };
    walk_object(resource, defs, path, rtype, true)
}

/// `parent` names `defs` in the strict table (`Patient`, `Patient.contact`).
fn walk_object(
    obj: &Value,
    defs: &Map<String, Value>,
    path: &str,
    parent: &str,
    resource: bool,
) -> Result<(), Fault> {
    let Value::Object(map) = obj else {
        return Err(fault(
            path,
            format!("expected a JSON object, found {}", kind(obj)),
        ));
    };
    for (key, value) in map {
        if key == "resourceType" {
            continue;
        }
        if let Some(base) = key.strip_prefix('_') {
            let Some(def) = defs.get(base) else {
                no_empty_arrays(value, &format!("{path}.{key}"))?;
                continue;
            };
            let def = if resource && base == "id" {
                id_type()
            } else {
                def
            };
            if def.as_str().is_some_and(is_primitive) {
                let s = spec(parent, base);
                check_extensions(map, base, value, s.many, &format!("{path}.{key}"))?;
            }
            continue;
        }
        let child = format!("{path}.{key}");
        let Some(def) = defs.get(key) else {
            // An unknown element: fhirbolt names it.
            no_empty_arrays(value, &child)?;
            continue;
        };
        // The resource id has type id; the table lists it as System.String.
        let def = if resource && key == "id" {
            id_type()
        } else {
            def
        };
        let s = spec(parent, key);
        let primitive = def.as_str().is_some_and(is_primitive);
        match value {
            Value::Array(items) if s.many => {
                if items.is_empty() {
                    return Err(fault(
                        &child,
                        "an array may not be empty; leave the element out",
                    ));
                }
                let extensions = map.get(&format!("_{key}")).and_then(Value::as_array);
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{child}[{i}]");
                    if item.is_null() {
                        let extended = primitive
                            && extensions
                                .and_then(|e| e.get(i))
                                .is_some_and(|e| !e.is_null());
                        if !extended {
                            return Err(fault(&at, "null is not a value"));
                        }
                        continue;
                    }
                    walk_value(item, def, &at, parent, key, s)?;
                }
            }
            Value::Array(_) => {
                return Err(fault(
                    &child,
                    format!("{key} does not repeat: expected one value, found an array"),
                ))
            }
            Value::Null => return Err(fault(&child, "null is not a value")),
            v if s.many => {
                return Err(fault(
                    &child,
                    format!("{key} repeats: expected an array, found {}", kind(v)),
                ))
            }
            v => walk_value(v, def, &child, parent, key, s)?,
        }
    }
    Ok(())
}

fn id_type() -> &'static Value {
    static ID: OnceLock<Value> = OnceLock::new();
    ID.get_or_init(|| Value::String("id".into()))
}

/// `_name`: the id and extensions of a primitive (`value` is its JSON).
fn check_extensions(
    map: &Map<String, Value>,
    name: &str,
    value: &Value,
    many: bool,
    path: &str,
) -> Result<(), Fault> {
    let element = |v: &Value, at: &str| walk_object(v, element_defs(), at, "Element", false);
    match value {
        Value::Array(items) if many => {
            if items.is_empty() {
                return Err(fault(
                    path,
                    "an array may not be empty; leave the element out",
                ));
            }
            let values = map.get(name).and_then(Value::as_array);
            if let Some(values) = values {
                if values.len() != items.len() {
                    return Err(fault(
                        path,
                        format!(
                            "_{name} has {} items but {name} has {}: they must align",
                            items.len(),
                            values.len()
                        ),
                    ));
                }
            }
            for (i, item) in items.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if item.is_null() {
                    if values.and_then(|v| v.get(i)).is_none_or(Value::is_null) {
                        return Err(fault(&at, "null is not a value"));
                    }
                    continue;
                }
                element(item, &at)?;
            }
            Ok(())
        }
        Value::Array(_) => Err(fault(
            path,
            format!("{name} does not repeat: expected one object, found an array"),
        )),
        v if many => Err(fault(
            path,
            format!("{name} repeats: expected an array, found {}", kind(v)),
        )),
        v => element(v, path),
    }
}

/// The shape check for JSON the tables do not describe.
fn no_empty_arrays(value: &Value, path: &str) -> Result<(), Fault> {
    match value {
        Value::Array(items) if items.is_empty() => Err(fault(
            path,
            "an array may not be empty; leave the element out",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| no_empty_arrays(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, v)| no_empty_arrays(v, &format!("{path}.{k}"))),
        _ => Ok(()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One value (not null, not an array) of element `name` of `parent`.
fn walk_value(
    value: &Value,
    def: &Value,
    path: &str,
    parent: &str,
    name: &str,
    spec: Spec,
) -> Result<(), Fault> {
    match def {
        Value::Object(inline) => {
            if let Some(Value::String(target)) = inline.get("$ref") {
                let mut parts = target.split('.');
                let mut node = parts.next().and_then(|t| table().get(t));
                for p in parts {
                    node = node.and_then(|n| n.get(p));
                }
                if let Some(Value::Object(d)) = node {
                    return walk_object(value, d, path, target, false);
                }
                return Ok(());
            }
            walk_object(value, inline, path, &format!("{parent}.{name}"), false)
        }
        Value::String(t) => match t.as_str() {
            "Resource" => walk_resource(value, path),
            t if is_primitive(t) => check_string(t, value, path, spec),
            t => match table().get(t) {
                Some(Value::Object(d)) => walk_object(value, d, path, t, false),
                _ => Ok(()),
            },
        },
        _ => Ok(()),
    }
}

/// A primitive: its type, then, for strings, FHIR's limits, then its codes.
fn check_string(t: &str, value: &Value, path: &str, spec: Spec) -> Result<(), Fault> {
    check_primitive(t, value).map_err(|m| fault(path, m))?;
    let Some(s) = value.as_str() else {
        return Ok(());
    };
    if let Some(c) = s.chars().find(|&c| forbidden_control(c)) {
        return Err(fault(
            path,
            format!(
                "the string contains the control character U+{:04X}, which FHIR does not allow",
                c as u32
            ),
        ));
    }
    if t != "base64Binary" && s.len() > MAX_STRING_CHARS && s.chars().count() > MAX_STRING_CHARS {
        return Err(fault(
            path,
            format!("the string is longer than FHIR's limit of {MAX_STRING_CHARS} characters"),
        ));
    }
    if let Some(i) = spec.codes {
        let (name, codes) = &strict().sets[i];
        if !codes.contains(s) {
            return Err(fault(
                path,
                format!("'{s}' is not a code of the required value set {name}"),
            ));
        }
    }
    Ok(())
}

/// Characters below U+0020 other than tab, line feed and carriage return.
fn forbidden_control(c: char) -> bool {
    c < ' ' && !matches!(c, '\t' | '\n' | '\r')
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

    /// A Patient with `extra` elements.
    fn p(extra: Value) -> Option<String> {
        let mut doc = json!({"resourceType": "Patient"});
        if let (Value::Object(m), Value::Object(e)) = (&mut doc, extra) {
            m.extend(e);
        }
        fault(doc)
    }

    #[test]
    fn shapes_follow_cardinality() {
        assert_eq!(
            p(json!({"gender": ["male"]})),
            Some("Patient.gender".into())
        );
        assert_eq!(
            p(json!({"name": {"family": "x"}})),
            Some("Patient.name".into())
        );
        assert_eq!(
            p(json!({"name": [{"given": "Ann"}]})),
            Some("Patient.name[0].given".into())
        );
        assert_eq!(p(json!({"name": [null]})), Some("Patient.name[0]".into()));
        assert_eq!(p(json!({"name": []})), Some("Patient.name".into()));
        assert_eq!(p(json!({"gender": null})), Some("Patient.gender".into()));
        assert_eq!(p(json!({"name": ["x"]})), Some("Patient.name[0]".into()));
        // Backbone elements, datatypes and content references.
        assert_eq!(
            p(json!({"contact": [{"telecom": {"value": "x"}}]})),
            Some("Patient.contact[0].telecom".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Questionnaire", "status": "draft",
                "item": [{"linkId": "a", "type": "group", "item": {"linkId": "b", "type": "string"}}]})),
            Some("Questionnaire.item[0].item".into())
        );
        // `_x` beside primitives: aligned with the values, nulls as placeholders.
        let ext = json!({"extension": [{"url": "http://e", "valueString": "v"}]});
        assert_eq!(
            p(json!({"name": [{"given": ["a", null], "_given": [null, ext]}]})),
            None
        );
        assert_eq!(p(json!({"name": [{"_given": [ext]}]})), None);
        assert_eq!(p(json!({"birthDate": "2000", "_birthDate": ext})), None);
        assert_eq!(
            p(json!({"name": [{"given": ["a"], "_given": [null, ext]}]})),
            Some("Patient.name[0]._given".into())
        );
        assert_eq!(
            p(json!({"name": [{"_given": [null]}]})),
            Some("Patient.name[0]._given[0]".into())
        );
        assert_eq!(
            p(json!({"_birthDate": [ext]})),
            Some("Patient._birthDate".into())
        );
        assert_eq!(
            p(json!({"_birthDate": {"extension": {"url": "http://e"}}})),
            Some("Patient._birthDate.extension".into())
        );
    }

    #[test]
    fn required_codes_strings_and_control_characters() {
        assert_eq!(
            fault(json!({"resourceType": "Patient", "gender": "banana"})),
            Some("Patient.gender".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Bundle", "type": "evil"})),
            Some("Bundle.type".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "SearchParameter", "base": ["Patient", "Nope"]})),
            Some("SearchParameter.base[1]".into())
        );
        // Codes of a hierarchical code system, and codes not bound at all.
        assert_eq!(
            fault(json!({"resourceType": "Patient", "gender": "unknown", "language": "xx"})),
            None
        );
        assert_eq!(
            fault(json!({"resourceType": "Patient", "name": [{"family": "a\u{0}"}]})),
            Some("Patient.name[0].family".into())
        );
        assert_eq!(
            fault(json!({"resourceType": "Patient", "name": [{"text": "a\tb\r\n"}]})),
            None
        );
        let long = "x".repeat(MAX_STRING_CHARS + 1);
        assert_eq!(
            fault(json!({"resourceType": "Patient", "name": [{"family": long}]})),
            Some("Patient.name[0].family".into())
        );
        let multibyte = "é".repeat(MAX_STRING_CHARS);
        assert_eq!(
            fault(json!({"resourceType": "Patient", "name": [{"family": multibyte}]})),
            None
        );
    }
}
