//! Search parameters: turning query parameters into store criteria, and
//! extracting index tokens from resources at write time.
//!
//! Supported here: `_id`, `_lastUpdated`, and the token parameter
//! `identifier` on every type that defines it. These are what conditional
//! create/update/delete/patch and conditional references need.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::fhir::types::has_identifier_param;
use crate::store::{Criterion, Token, TokenValue};

/// Parameters that shape the response rather than select resources.
pub const RESULT_PARAMS: &[&str] = &["_count", "_cursor", "_format", "_pretty", "_total"];

/// Parameters ehrx accepts as search criteria on `rtype`.
pub fn criteria_params(rtype: &str) -> Vec<&'static str> {
    let mut p = vec!["_id", "_lastUpdated"];
    if has_identifier_param(rtype) {
        p.push("identifier");
    }
    p
}

/// The outcome of reading search parameters.
#[derive(Debug, Default)]
pub struct Parsed {
    pub criteria: Vec<Criterion>,
    /// The parameters actually applied, for the `self` link.
    pub applied: Vec<(String, String)>,
}

/// Parses search criteria. Result-shaping parameters are skipped; an
/// unknown parameter is an error when `strict`, otherwise ignored (and left
/// out of `applied`).
pub fn parse(rtype: &str, params: &[(String, String)], strict: bool) -> Result<Parsed> {
    let mut out = Parsed::default();
    for (name, value) in params {
        if RESULT_PARAMS.contains(&name.as_str()) {
            continue;
        }
        let (base, modifier) = match name.split_once(':') {
            Some((b, m)) => (b, Some(m)),
            None => (name.as_str(), None),
        };
        let known = criteria_params(rtype).contains(&base);
        if !known || modifier.is_some() {
            if strict {
                return Err(Error::UnknownParameter(format!(
                    "search parameter '{name}' is not supported on {rtype}"
                )));
            }
            continue;
        }
        if value.is_empty() {
            return Err(Error::invalid(format!(
                "search parameter '{name}' has no value"
            )));
        }
        let c = match base {
            "_id" => Criterion::Ids(split_or(value)),
            "identifier" => Criterion::Token {
                param: "identifier",
                values: split_or(value).iter().map(|v| token_value(v)).collect(),
            },
            "_lastUpdated" => last_updated(value)?,
            _ => unreachable!("criteria_params lists only handled parameters"),
        };
        out.criteria.push(c);
        out.applied.push((name.clone(), value.clone()));
    }
    Ok(out)
}

/// Parses conditional-operation criteria (`If-None-Exist`, `Type?query`):
/// always strict, and at least one criterion is required.
pub fn parse_conditional(rtype: &str, query: &str) -> Result<Vec<Criterion>> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let parsed = parse(rtype, &params, true)?;
    if parsed.criteria.is_empty() {
        return Err(Error::invalid(format!(
            "conditional request on {rtype} has no search criteria"
        )));
    }
    Ok(parsed.criteria)
}

/// Splits on unescaped commas (`\,` is a literal comma).
fn split_or(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',') | Some('|') | Some('\\')) => {
                out.last_mut().unwrap().push(chars.next().unwrap())
            }
            ',' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

fn token_value(v: &str) -> TokenValue {
    match v.split_once('|') {
        None => TokenValue {
            system: None,
            code: Some(v.to_string()),
        },
        Some((system, code)) => TokenValue {
            system: Some(system.to_string()),
            code: (!code.is_empty()).then(|| code.to_string()),
        },
    }
}

/// The canonical text form of an instant in the store (sorts as text).
pub fn format_instant(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Parses a FHIR date/dateTime/instant into the half-open UTC range its
/// precision denotes.
pub fn date_range(value: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let v = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        let t = t.with_timezone(&Utc);
        let width = if v.contains('.') {
            Duration::milliseconds(1)
        } else {
            Duration::seconds(1)
        };
        return Some((t, t + width));
    }
    // dateTime to the minute with a zone, e.g. 2020-01-01T10:00Z
    if let Some((lo, hi)) = minute_range(v) {
        return Some((lo, hi));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S") {
        let t = t.and_utc();
        return Some((t, t + Duration::seconds(1)));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        let lo = d.and_hms_opt(0, 0, 0)?.and_utc();
        return Some((lo, lo + Duration::days(1)));
    }
    if v.len() == 7 {
        let d = NaiveDate::parse_from_str(&format!("{v}-01"), "%Y-%m-%d").ok()?;
        let next = if d.format("%m").to_string() == "12" {
            NaiveDate::from_ymd_opt(d.format("%Y").to_string().parse::<i32>().ok()? + 1, 1, 1)?
        } else {
            NaiveDate::parse_from_str(
                &format!(
                    "{}-{:02}-01",
                    d.format("%Y"),
                    d.format("%m").to_string().parse::<u32>().ok()? + 1
                ),
                "%Y-%m-%d",
            )
            .ok()?
        };
        return Some((
            d.and_hms_opt(0, 0, 0)?.and_utc(),
            next.and_hms_opt(0, 0, 0)?.and_utc(),
        ));
    }
    if v.len() == 4 {
        let y: i32 = v.parse().ok()?;
        let lo = NaiveDate::from_ymd_opt(y, 1, 1)?
            .and_hms_opt(0, 0, 0)?
            .and_utc();
        let hi = NaiveDate::from_ymd_opt(y + 1, 1, 1)?
            .and_hms_opt(0, 0, 0)?
            .and_utc();
        return Some((lo, hi));
    }
    None
}

fn minute_range(v: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (head, zone) = if let Some(h) = v.strip_suffix('Z') {
        (h, "+00:00")
    } else if v.len() > 6
        && (v.as_bytes()[v.len() - 6] == b'+' || v.as_bytes()[v.len() - 6] == b'-')
    {
        (&v[..v.len() - 6], &v[v.len() - 6..])
    } else {
        return None;
    };
    if head.len() != 16 {
        return None;
    }
    let t = DateTime::parse_from_rfc3339(&format!("{head}:00{zone}")).ok()?;
    let t = t.with_timezone(&Utc);
    Some((t, t + Duration::minutes(1)))
}

fn last_updated(value: &str) -> Result<Criterion> {
    let (prefix, rest) =
        if value.len() > 2 && value.as_bytes()[..2].iter().all(u8::is_ascii_alphabetic) {
            (&value[..2], &value[2..])
        } else {
            ("eq", value)
        };
    let (lo, hi) = date_range(rest).ok_or_else(|| {
        Error::invalid(format!(
            "_lastUpdated value '{value}' is not a valid FHIR date/time"
        ))
    })?;
    let (lo, hi) = (Some(format_instant(lo)), Some(format_instant(hi)));
    let (from, before) = match prefix {
        "gt" => (hi, None),
        "ge" => (lo, None),
        "lt" => (None, lo),
        "le" => (None, hi),
        "eq" => (lo, hi),
        other => {
            return Err(Error::UnknownParameter(format!(
                "prefix '{other}' is not supported on _lastUpdated"
            )))
        }
    };
    Ok(Criterion::LastUpdated { from, before })
}

/// Index tokens of a resource (identifier system|value pairs).
pub fn tokens(rtype: &str, resource: &Value) -> Vec<Token> {
    let mut out = Vec::new();
    if !has_identifier_param(rtype) {
        return out;
    }
    let mut push = |ident: &Value| {
        if let Some(code) = ident.get("value").and_then(Value::as_str) {
            out.push(Token {
                param: "identifier",
                system: ident
                    .get("system")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                code: code.to_string(),
            });
        }
    };
    match resource.get("identifier") {
        Some(Value::Array(items)) => items.iter().for_each(&mut push),
        Some(single @ Value::Object(_)) => push(single),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_forms() {
        assert_eq!(
            token_value("http://x|1"),
            TokenValue {
                system: Some("http://x".into()),
                code: Some("1".into())
            }
        );
        assert_eq!(
            token_value("|1"),
            TokenValue {
                system: Some("".into()),
                code: Some("1".into())
            }
        );
        assert_eq!(
            token_value("http://x|"),
            TokenValue {
                system: Some("http://x".into()),
                code: None
            }
        );
        assert_eq!(
            split_or(r"a,b\,c"),
            vec!["a".to_string(), "b,c".to_string()]
        );
    }

    #[test]
    fn date_precision() {
        let (lo, hi) = date_range("2020").unwrap();
        assert_eq!(format_instant(lo), "2020-01-01T00:00:00.000Z");
        assert_eq!(format_instant(hi), "2021-01-01T00:00:00.000Z");
        let (lo, hi) = date_range("2020-12").unwrap();
        assert_eq!(format_instant(lo), "2020-12-01T00:00:00.000Z");
        assert_eq!(format_instant(hi), "2021-01-01T00:00:00.000Z");
        let (lo, _) = date_range("2020-02-03T04:05:06+01:00").unwrap();
        assert_eq!(format_instant(lo), "2020-02-03T03:05:06.000Z");
        assert!(date_range("yesterday").is_none());
    }
}
