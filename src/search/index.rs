//! Index extraction at write time: every supported search parameter of a
//! resource's type is evaluated and its values stored in one index table
//! per parameter type.

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::date_range;
use super::fhirpath::{self, Item};
use super::format_instant;
use super::registry::{registry, Kind, Param};

/// Lower bound of an open date range.
pub const MIN_INSTANT: &str = "0001-01-01T00:00:00.000Z";
/// Upper bound of an open date range.
pub const MAX_INSTANT: &str = "9999-12-31T23:59:59.999Z";

/// Index rows of one resource. `grp` ties the components of one composite
/// value together (0 for ordinary parameters).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rows {
    pub strings: Vec<StringRow>,
    pub tokens: Vec<TokenRow>,
    pub references: Vec<ReferenceRow>,
    pub dates: Vec<DateRow>,
    pub numbers: Vec<NumberRow>,
    pub quantities: Vec<QuantityRow>,
    pub uris: Vec<UriRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StringRow {
    pub param: String,
    pub grp: i64,
    /// Lower-cased, accents removed: what default and `:contains` match.
    pub norm: String,
    /// As written: what `:exact` matches.
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub param: String,
    pub grp: i64,
    pub system: String,
    pub code: String,
    /// Normalised display/text, for `:text`.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceRow {
    pub param: String,
    pub grp: i64,
    pub target_type: String,
    pub target_id: String,
    /// The reference as written (absolute URLs, canonicals).
    pub url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DateRow {
    pub param: String,
    pub grp: i64,
    /// Half-open UTC range `[lo, hi)` as sortable text.
    pub lo: String,
    pub hi: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberRow {
    pub param: String,
    pub grp: i64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantityRow {
    pub param: String,
    pub grp: i64,
    pub system: String,
    pub code: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UriRow {
    pub param: String,
    pub grp: i64,
    pub value: String,
}

impl Rows {
    /// Number of rows over every table.
    pub fn len(&self) -> usize {
        self.strings.len()
            + self.tokens.len()
            + self.references.len()
            + self.dates.len()
            + self.numbers.len()
            + self.quantities.len()
            + self.uris.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
            && self.tokens.is_empty()
            && self.references.is_empty()
            && self.dates.is_empty()
            && self.numbers.is_empty()
            && self.quantities.is_empty()
            && self.uris.is_empty()
    }
}

/// Case- and accent-insensitive form of a string.
pub fn normalize(s: &str) -> String {
    s.nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The name of the index row param of composite component `n`.
pub fn component_param(code: &str, n: usize) -> String {
    format!("{code}${n}")
}

/// Every index row of `resource`.
pub fn extract(rtype: &str, resource: &Value) -> Rows {
    extract_some(rtype, resource, |_| true)
}

/// The index rows of only the parameters `wanted` names (an access
/// decision on one resource needs a few, not all of them).
pub fn extract_some(rtype: &str, resource: &Value, wanted: impl Fn(&str) -> bool) -> Rows {
    let mut rows = Rows::default();
    for p in registry().params(rtype) {
        // Served from the resource table itself.
        if p.code == "_id" || p.code == "_lastUpdated" || !p.supported() || !wanted(&p.code) {
            continue;
        }
        let Some(expr) = &p.expr else { continue };
        let items = fhirpath::eval(expr, resource);
        if p.kind == Kind::Composite {
            composite(p, &items, resource, &mut rows);
            continue;
        }
        for item in items {
            add(&mut rows, &p.code, p.kind, 0, item);
        }
    }
    rows.truncate_texts();
    rows
}

/// The longest text an index row holds, in bytes. A btree entry must fit
/// in a third of a PostgreSQL page (~2.7 KB with the other columns), and
/// sorting on a 10 MB value should not copy 10 MB per row. Longer values
/// are indexed by their first [`INDEX_TEXT_BYTES`], and search values are
/// cut the same way before they are compared (see
/// `store::search::render_test`): two values that share so long a prefix
/// match alike.
pub const INDEX_TEXT_BYTES: usize = 1024;

/// `s` cut to at most [`INDEX_TEXT_BYTES`], on a character boundary.
pub fn index_text(s: &str) -> &str {
    if s.len() <= INDEX_TEXT_BYTES {
        return s;
    }
    let mut end = INDEX_TEXT_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cut(s: &mut String) {
    let n = index_text(s).len();
    s.truncate(n);
}

impl Rows {
    fn truncate_texts(&mut self) {
        for r in &mut self.strings {
            cut(&mut r.norm);
            cut(&mut r.raw);
        }
        for r in &mut self.tokens {
            cut(&mut r.system);
            cut(&mut r.code);
            cut(&mut r.text);
        }
        for r in &mut self.references {
            cut(&mut r.target_type);
            cut(&mut r.target_id);
            cut(&mut r.url);
        }
        for r in &mut self.quantities {
            cut(&mut r.system);
            cut(&mut r.code);
        }
        for r in &mut self.uris {
            cut(&mut r.value);
        }
    }
}

fn composite(p: &Param, items: &[Item<'_>], resource: &Value, rows: &mut Rows) {
    for (g, item) in items.iter().enumerate() {
        let grp = g as i64 + 1;
        for (n, c) in p.components.iter().enumerate() {
            let name = component_param(&p.code, n);
            for v in fhirpath::eval_relative(&c.expr, *item, resource) {
                add(rows, &name, c.kind, grp, v);
            }
        }
    }
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn add(rows: &mut Rows, param: &str, kind: Kind, grp: i64, item: Item<'_>) {
    let ty = item.ty.name().unwrap_or("");
    let v = item.value;
    match kind {
        Kind::String => {
            let mut texts = Vec::new();
            match ty {
                "HumanName" => {
                    for k in ["family", "text"] {
                        texts.extend(s(v, k));
                    }
                    for k in ["given", "prefix", "suffix"] {
                        texts.extend(strings(v.get(k)));
                    }
                }
                "Address" => {
                    for k in ["text", "city", "district", "state", "postalCode", "country"] {
                        texts.extend(s(v, k));
                    }
                    texts.extend(strings(v.get("line")));
                }
                _ => collect_strings(v, &mut texts),
            }
            for raw in texts {
                rows.strings.push(StringRow {
                    param: param.to_string(),
                    grp,
                    norm: normalize(&raw),
                    raw,
                });
            }
        }
        Kind::Token => tokens(rows, param, grp, ty, v),
        Kind::Reference => reference(rows, param, grp, ty, v),
        Kind::Date => {
            if let Some((lo, hi)) = date_value(ty, v) {
                rows.dates.push(DateRow {
                    param: param.to_string(),
                    grp,
                    lo,
                    hi,
                });
            }
        }
        Kind::Number => {
            if let Some(value) = number(v) {
                rows.numbers.push(NumberRow {
                    param: param.to_string(),
                    grp,
                    value,
                });
            }
        }
        Kind::Quantity => {
            let mut push = |q: &Value| {
                if let Some(value) = q.get("value").and_then(number) {
                    let code = s(q, "code")
                        .or_else(|| s(q, "currency"))
                        .or_else(|| s(q, "unit"))
                        .unwrap_or_default();
                    rows.quantities.push(QuantityRow {
                        param: param.to_string(),
                        grp,
                        system: s(q, "system").unwrap_or_else(|| {
                            if q.get("currency").is_some() {
                                "urn:iso:std:iso:4217".into()
                            } else {
                                String::new()
                            }
                        }),
                        code,
                        value,
                    });
                }
            };
            match ty {
                "Range" => {
                    v.get("low").into_iter().for_each(&mut push);
                    v.get("high").into_iter().for_each(&mut push);
                }
                "SampledData" => {
                    if let Some(origin) = v.get("origin") {
                        push(origin)
                    }
                }
                _ => push(v),
            }
        }
        Kind::Uri => {
            if let Some(value) = v.as_str() {
                rows.uris.push(UriRow {
                    param: param.to_string(),
                    grp,
                    value: value.to_string(),
                });
            }
        }
        Kind::Composite | Kind::Special => {}
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Some(Value::String(x)) => vec![x.clone()],
        _ => Vec::new(),
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(x) => out.push(x.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(m) => {
            for (k, x) in m {
                if k != "extension" && k != "id" && !k.starts_with('_') {
                    collect_strings(x, out)
                }
            }
        }
        _ => {}
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().or_else(|| n.to_string().parse().ok()),
        _ => None,
    }
}

fn tokens(rows: &mut Rows, param: &str, grp: i64, ty: &str, v: &Value) {
    let mut push = |system: String, code: String, text: &str| {
        rows.tokens.push(TokenRow {
            param: param.to_string(),
            grp,
            system,
            code,
            text: normalize(text),
        })
    };
    match v {
        Value::Bool(b) => push(String::new(), b.to_string(), ""),
        Value::String(code) => push(String::new(), code.clone(), ""),
        Value::Object(_) => match ty {
            "CodeableConcept" => {
                let text = s(v, "text").unwrap_or_default();
                let mut any = false;
                for c in v
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let t = format!("{text} {}", s(c, "display").unwrap_or_default());
                    push(
                        s(c, "system").unwrap_or_default(),
                        s(c, "code").unwrap_or_default(),
                        t.trim(),
                    );
                    any = true;
                }
                if !any && !text.is_empty() {
                    push(String::new(), String::new(), &text);
                }
            }
            "Identifier" => {
                let value = s(v, "value").unwrap_or_default();
                let text = v
                    .get("type")
                    .and_then(|t| t.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                for c in v
                    .get("type")
                    .and_then(|t| t.get("coding"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    rows.tokens.push(TokenRow {
                        param: format!("{param}:of-type"),
                        grp,
                        system: format!(
                            "{}|{}",
                            s(c, "system").unwrap_or_default(),
                            s(c, "code").unwrap_or_default()
                        ),
                        code: value.clone(),
                        text: String::new(),
                    });
                }
                rows.tokens.push(TokenRow {
                    param: param.to_string(),
                    grp,
                    system: s(v, "system").unwrap_or_default(),
                    code: value,
                    text: normalize(&text),
                });
            }
            "ContactPoint" => push(
                s(v, "system").unwrap_or_default(),
                s(v, "value").unwrap_or_default(),
                "",
            ),
            // Coding, and anything Coding-shaped.
            _ => push(
                s(v, "system").unwrap_or_default(),
                s(v, "code").or_else(|| s(v, "value")).unwrap_or_default(),
                &s(v, "display").unwrap_or_default(),
            ),
        },
        _ => {}
    }
}

fn reference(rows: &mut Rows, param: &str, grp: i64, ty: &str, v: &Value) {
    let written = match v {
        Value::String(url) => url.clone(),
        Value::Object(_) => {
            if let Some(ident) = v.get("identifier") {
                if let Some(value) = s(ident, "value") {
                    rows.tokens.push(TokenRow {
                        param: format!("{param}:identifier"),
                        grp,
                        system: s(ident, "system").unwrap_or_default(),
                        code: value,
                        text: String::new(),
                    });
                }
            }
            match s(v, "reference") {
                Some(r) => r,
                None => return,
            }
        }
        _ => return,
    };
    if written.starts_with('#') {
        return; // contained: not searchable by reference
    }
    let _ = ty;
    let (target_type, target_id) = split_reference(&written).unwrap_or_default();
    rows.references.push(ReferenceRow {
        param: param.to_string(),
        grp,
        target_type,
        target_id,
        url: written,
    });
}

/// `Type/id` out of a relative or absolute reference (a version is dropped).
pub fn split_reference(r: &str) -> Option<(String, String)> {
    let r = r.split(['?', '#']).next()?;
    let mut segs: Vec<&str> = r.split('/').collect();
    if segs.len() >= 4 && segs[segs.len() - 2] == "_history" {
        segs.truncate(segs.len() - 2);
    }
    let n = segs.len();
    if n < 2 {
        return None;
    }
    let (t, id) = (segs[n - 2], segs[n - 1]);
    if !crate::fhir::types::is_resource_type(t) || id.is_empty() {
        return None;
    }
    Some((t.to_string(), id.to_string()))
}

fn date_value(ty: &str, v: &Value) -> Option<(String, String)> {
    match v {
        Value::String(d) => {
            let (lo, hi) = date_range(d)?;
            Some((format_instant(lo), format_instant(hi)))
        }
        Value::Object(_) => match ty {
            "Period" => {
                let lo = v
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .map(|r| format_instant(r.0))
                    .unwrap_or_else(|| MIN_INSTANT.into());
                let hi = v
                    .get("end")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .map(|r| format_instant(r.1))
                    .unwrap_or_else(|| MAX_INSTANT.into());
                (v.get("start").is_some() || v.get("end").is_some()).then_some((lo, hi))
            }
            "Timing" => {
                let events: Vec<_> = strings(v.get("event"))
                    .iter()
                    .filter_map(|e| date_range(e))
                    .collect();
                let lo = events.iter().map(|r| r.0).min();
                let hi = events.iter().map(|r| r.1).max();
                let bounds = v.get("repeat").and_then(|r| r.get("boundsPeriod"));
                match (lo, hi, bounds) {
                    (Some(lo), Some(hi), _) => Some((format_instant(lo), format_instant(hi))),
                    (_, _, Some(b)) => date_value("Period", b),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patient_rows() {
        let p = json!({"resourceType": "Patient", "id": "p",
            "name": [{"family": "Müller", "given": ["Ann", "Bé"]}],
            "gender": "female", "birthDate": "1970-03",
            "identifier": [{"system": "urn:s", "value": "42",
                "type": {"coding": [{"system": "urn:t", "code": "MR"}]}}],
            "telecom": [{"system": "email", "value": "a@b.c"}],
            "generalPractitioner": [{"reference": "Practitioner/d1"}],
            "deceasedBoolean": false});
        let rows = extract("Patient", &p);
        assert!(rows
            .strings
            .iter()
            .any(|r| r.param == "family" && r.norm == "muller" && r.raw == "Müller"));
        assert!(rows
            .strings
            .iter()
            .any(|r| r.param == "name" && r.norm == "be"));
        assert!(rows
            .tokens
            .iter()
            .any(|r| r.param == "gender" && r.code == "female"));
        assert!(rows
            .tokens
            .iter()
            .any(|r| r.param == "identifier" && r.system == "urn:s" && r.code == "42"));
        assert!(rows
            .tokens
            .iter()
            .any(|r| r.param == "identifier:of-type" && r.system == "urn:t|MR"));
        assert!(rows
            .tokens
            .iter()
            .any(|r| r.param == "email" && r.code == "a@b.c"));
        assert!(rows
            .tokens
            .iter()
            .any(|r| r.param == "deceased" && r.code == "false"));
        assert!(rows
            .references
            .iter()
            .any(|r| r.param == "general-practitioner"
                && r.target_type == "Practitioner"
                && r.target_id == "d1"));
        let bd = rows.dates.iter().find(|r| r.param == "birthdate").unwrap();
        assert_eq!(bd.lo, "1970-03-01T00:00:00.000Z");
        assert_eq!(bd.hi, "1970-04-01T00:00:00.000Z");
    }

    #[test]
    fn observation_composite_rows_share_a_group() {
        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "subject": {"reference": "Patient/p"},
            "effectivePeriod": {"start": "2020-01-01"},
            "component": [
              {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
               "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
              {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
               "valueQuantity": {"value": 80, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]});
        let rows = extract("Observation", &o);
        let p = component_param("component-code-value-quantity", 0);
        let q = component_param("component-code-value-quantity", 1);
        let sys = rows
            .tokens
            .iter()
            .find(|r| r.param == p && r.code == "8480-6")
            .unwrap();
        let val = rows
            .quantities
            .iter()
            .find(|r| r.param == q && r.grp == sys.grp)
            .unwrap();
        assert_eq!(val.value, 120.0);
        let date = rows.dates.iter().find(|r| r.param == "date").unwrap();
        assert_eq!(date.hi, MAX_INSTANT);
        assert!(rows
            .references
            .iter()
            .any(|r| r.param == "patient" && r.target_id == "p"));
    }

    #[test]
    fn references_split() {
        assert_eq!(
            split_reference("http://x/fhir/Patient/1/_history/2"),
            Some(("Patient".into(), "1".into()))
        );
        assert_eq!(split_reference("urn:uuid:1"), None);
    }
}
