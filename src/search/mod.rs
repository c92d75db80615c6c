//! FHIR search: the SearchParameter registry, index extraction at write
//! time, and parsing of search parameters into store conditions.
//!
//! Every R4 core search parameter is indexed (see [`registry`]); the
//! parameters without an expression (`_text`, `_content`, `_query`) and
//! the `special` one (`Location.near`) are not supported, and the
//! CapabilityStatement says so. Unknown parameters are an error unless the
//! client sends `Prefer: handling=lenient`.

pub mod compartment;
pub mod cond;
pub mod fhirpath;
pub mod index;
pub mod registry;

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Utc};

use crate::error::{Error, Result};
use cond::{Bind, Cond, Sort, SortBy, Table, Test};
use registry::{registry, Kind, Param};

/// Parameters that shape the response rather than select resources.
pub const RESULT_PARAMS: &[&str] = &[
    "_count",
    "_cursor",
    "_format",
    "_pretty",
    "_total",
    "_sort",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
];

/// Modifiers ehrx does not support (they need a terminology server).
const UNSUPPORTED_MODIFIERS: &[&str] = &["in", "not-in", "above", "below"];

/// The outcome of reading search parameters.
#[derive(Debug, Default)]
pub struct Parsed {
    pub conds: Vec<Cond>,
    /// The parameters actually applied, for the `self` link.
    pub applied: Vec<(String, String)>,
}

fn unknown(msg: String) -> Error {
    Error::UnknownParameter(msg)
}

/// Parses search criteria. Result-shaping parameters are skipped; an
/// unknown or unsupported parameter is an error when `strict`, otherwise
/// ignored (and left out of `applied`). `base` is ehrx's public base URL
/// (absolute references to it are local).
pub fn parse(rtype: &str, params: &[(String, String)], strict: bool, base: &str) -> Result<Parsed> {
    check_limits(params)?;
    let mut out = Parsed::default();
    for (name, value) in params {
        let base_name = name.split(':').next().unwrap_or(name);
        if RESULT_PARAMS.contains(&base_name) {
            continue;
        }
        match parse_one(rtype, name, value, base, 0) {
            Ok(c) => {
                out.conds.push(c);
                out.applied.push((name.clone(), value.clone()));
            }
            Err(Error::UnknownParameter(_)) if !strict => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Refuses criteria beyond the caps of [`crate::limits`] before any of
/// them becomes SQL: too many criteria or repeats of one, too many OR
/// values, over-long values, and control characters (no FHIR string holds
/// one; PostgreSQL refuses NUL outright).
fn check_limits(params: &[(String, String)]) -> Result<()> {
    let limits = crate::limits::get();
    let mut criteria = 0usize;
    let mut includes = 0usize;
    let mut repeats: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (name, value) in params {
        let base_name = name.split(':').next().unwrap_or(name);
        for (what, text) in [("name", name.as_str()), ("value", value.as_str())] {
            if text.len() > limits.search_value_bytes {
                return Err(Error::too_costly(format!(
                    "a search parameter {what} is {} bytes long; at most {} are accepted",
                    text.len(),
                    limits.search_value_bytes
                )));
            }
            if text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
            {
                return Err(Error::invalid(format!(
                    "the search parameter '{}' holds a control character",
                    name.escape_default()
                )));
            }
        }
        if matches!(base_name, "_include" | "_revinclude") {
            includes += 1;
            if includes > limits.search_includes {
                return Err(Error::too_costly(format!(
                    "more than {} _include/_revinclude parameters",
                    limits.search_includes
                )));
            }
            continue;
        }
        if RESULT_PARAMS.contains(&base_name) {
            continue;
        }
        criteria += 1;
        if criteria > limits.search_criteria {
            return Err(Error::too_costly(format!(
                "more than {} search criteria in one request",
                limits.search_criteria
            )));
        }
        let n = repeats.entry(name.as_str()).or_insert(0);
        *n += 1;
        if *n > limits.search_repeats {
            return Err(Error::too_costly(format!(
                "the search parameter '{name}' is repeated more than {} times",
                limits.search_repeats
            )));
        }
        let alternatives = split_or(value).len();
        if alternatives > limits.search_or_values {
            return Err(Error::too_costly(format!(
                "the search parameter '{name}' has {alternatives} comma-separated values; at most {} are accepted",
                limits.search_or_values
            )));
        }
    }
    Ok(())
}

/// Parses conditional-operation criteria (`If-None-Exist`, `Type?query`):
/// always strict, and at least one criterion is required.
pub fn parse_conditional(rtype: &str, query: &str, base: &str) -> Result<Vec<Cond>> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let parsed = parse(rtype, &params, true, base)?;
    if parsed.conds.is_empty() {
        return Err(Error::invalid(format!(
            "conditional request on {rtype} has no search criteria"
        )));
    }
    Ok(parsed.conds)
}

const MAX_CHAIN_DEPTH: usize = 4;

/// One `name=value` pair (with chains and `_has`) as a condition.
fn parse_one(rtype: &str, name: &str, value: &str, base: &str, depth: usize) -> Result<Cond> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(Error::invalid(format!(
            "search parameter '{name}' chains deeper than {MAX_CHAIN_DEPTH} levels"
        )));
    }
    if value.is_empty() {
        return Err(Error::invalid(format!(
            "search parameter '{name}' has no value"
        )));
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        // _has:Source:param:rest
        let mut parts = rest.splitn(3, ':');
        let (Some(source), Some(param), Some(inner)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::invalid(format!(
                "'{name}' is not of the form _has:Type:reference-parameter:parameter"
            )));
        };
        if !crate::fhir::types::is_resource_type(source) {
            return Err(unknown(format!(
                "'{source}' in '{name}' is not a resource type"
            )));
        }
        let p = registry()
            .get(source, param)
            .filter(|p| p.kind == Kind::Reference)
            .ok_or_else(|| {
                unknown(format!(
                    "{source} has no reference parameter '{param}' (in '{name}')"
                ))
            })?;
        return Ok(Cond::Has {
            source: source.to_string(),
            param: p.code.clone(),
            inner: vec![parse_one(source, inner, value, base, depth + 1)?],
        });
    }
    if let Some((head, rest)) = name.split_once('.') {
        return chain(rtype, name, head, rest, value, base, depth);
    }
    let (code, modifier) = match name.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (name, None),
    };
    match code {
        "_id" => {
            return match modifier {
                None => Ok(Cond::Ids(split_or(value))),
                Some("missing") => Ok(if parse_bool(name, value)? {
                    Cond::Or(Vec::new())
                } else {
                    Cond::Not(Box::new(Cond::Or(Vec::new())))
                }),
                Some(m) => Err(unknown(format!("modifier ':{m}' is not supported on _id"))),
            }
        }
        "_lastUpdated" => {
            if let Some(m) = modifier {
                return Err(unknown(format!(
                    "modifier ':{m}' is not supported on _lastUpdated"
                )));
            }
            let alts = split_or(value)
                .iter()
                .map(|v| last_updated(name, v))
                .collect::<Result<Vec<_>>>()?;
            return Ok(or(alts));
        }
        _ => {}
    }
    let param = registry().get(rtype, code).ok_or_else(|| {
        unknown(format!(
            "search parameter '{code}' is not defined on {rtype}"
        ))
    })?;
    if !param.supported() {
        return Err(unknown(format!(
            "search parameter '{code}' ({}) is not supported on {rtype}",
            param.kind.as_str()
        )));
    }
    let table = table_of(param.kind);
    if modifier == Some("missing") {
        let (table, pname) = match param.kind {
            Kind::Composite => (
                table_of(param.components[0].kind).unwrap_or(Table::Token),
                index::component_param(&param.code, 0),
            ),
            _ => (table.unwrap_or(Table::Token), param.code.clone()),
        };
        let present = Cond::Index {
            table,
            param: pname,
            test: Test::Any,
        };
        return Ok(if parse_bool(name, value)? {
            Cond::Not(Box::new(present))
        } else {
            present
        });
    }
    if let Some(m) = modifier {
        if UNSUPPORTED_MODIFIERS.contains(&m) && param.kind != Kind::Uri {
            return Err(unknown(format!(
                "modifier ':{m}' is not supported (it needs a terminology service)"
            )));
        }
    }
    let values = split_or(value);
    if param.kind == Kind::Composite {
        let alts = values
            .iter()
            .map(|v| composite(param, name, v))
            .collect::<Result<Vec<_>>>()?;
        return Ok(or(alts));
    }
    let table = table.expect("non-composite kinds have a table");
    // `:not` and `ne` select resources without a matching value.
    let negate = modifier == Some("not");
    let mut tests = Vec::new();
    let mut negated = Vec::new();
    let mut index_param = param.code.clone();
    let mut index_table = table;
    for v in &values {
        let (t, neg) = match param.kind {
            Kind::String => (string_test(name, modifier, v)?, false),
            Kind::Token => {
                let (t, p) = token_test(param, name, modifier, v)?;
                if let Some(p) = p {
                    index_param = p;
                }
                (t, false)
            }
            Kind::Reference => {
                let (tbl, p, t) = reference_test(param, name, modifier, v, base)?;
                index_table = tbl;
                index_param = p;
                (t, false)
            }
            Kind::Date => {
                no_modifier(name, modifier)?;
                date_test(name, v)?
            }
            Kind::Number => {
                no_modifier(name, modifier)?;
                let (prefix, n) = split_prefix(v);
                number_test(name, prefix, n)?
            }
            Kind::Quantity => {
                no_modifier(name, modifier)?;
                quantity_test(name, v)?
            }
            Kind::Uri => (uri_test(name, modifier, v)?, false),
            Kind::Composite | Kind::Special => unreachable!("handled above"),
        };
        if neg {
            negated.push(t);
        } else {
            tests.push(t);
        }
    }
    let mut alts = Vec::new();
    if !tests.is_empty() {
        alts.push(Cond::Index {
            table: index_table,
            param: index_param.clone(),
            test: if tests.len() == 1 {
                tests.pop().unwrap()
            } else {
                Test::Or(tests)
            },
        });
    }
    for t in negated {
        alts.push(Cond::Not(Box::new(Cond::Index {
            table: index_table,
            param: index_param.clone(),
            test: t,
        })));
    }
    let c = or(alts);
    Ok(if negate { Cond::Not(Box::new(c)) } else { c })
}

fn or(mut alts: Vec<Cond>) -> Cond {
    if alts.len() == 1 {
        alts.pop().unwrap()
    } else {
        Cond::Or(alts)
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::invalid(format!(
            "'{name}' takes true or false, not '{v}'"
        ))),
    }
}

fn no_modifier(name: &str, modifier: Option<&str>) -> Result<()> {
    match modifier {
        None => Ok(()),
        Some(m) => Err(unknown(format!(
            "modifier ':{m}' is not supported on '{name}'"
        ))),
    }
}

/// The index table of a parameter type.
pub fn table_of(kind: Kind) -> Option<Table> {
    Some(match kind {
        Kind::String => Table::String,
        Kind::Token => Table::Token,
        Kind::Reference => Table::Reference,
        Kind::Date => Table::Date,
        Kind::Number => Table::Number,
        Kind::Quantity => Table::Quantity,
        Kind::Uri => Table::Uri,
        Kind::Composite | Kind::Special => return None,
    })
}

fn chain(
    rtype: &str,
    name: &str,
    head: &str,
    rest: &str,
    value: &str,
    base: &str,
    depth: usize,
) -> Result<Cond> {
    let (code, type_modifier) = match head.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (head, None),
    };
    let param = registry()
        .get(rtype, code)
        .filter(|p| p.kind == Kind::Reference)
        .ok_or_else(|| {
            unknown(format!(
                "'{code}' in '{name}' is not a reference parameter of {rtype}"
            ))
        })?;
    let types: Vec<String> = match type_modifier {
        Some(t) => {
            if !param.targets.iter().any(|x| x == t) {
                return Err(Error::invalid(format!(
                    "'{name}': {rtype}.{code} cannot refer to a {t}"
                )));
            }
            vec![t.to_string()]
        }
        None => param.targets.clone(),
    };
    let inner_code = rest.split(['.', ':']).next().unwrap_or(rest);
    let mut alts = Vec::new();
    for t in &types {
        let defined = inner_code.starts_with("_has")
            || inner_code == "_id"
            || inner_code == "_lastUpdated"
            || registry().get(t, inner_code).is_some();
        if !defined {
            continue;
        }
        alts.push(Cond::Chain {
            param: param.code.clone(),
            types: vec![t.clone()],
            inner: vec![parse_one(t, rest, value, base, depth + 1)?],
        });
    }
    if alts.is_empty() {
        return Err(unknown(format!(
            "'{name}': no target type of {rtype}.{code} has a parameter '{inner_code}'"
        )));
    }
    Ok(or(alts))
}

fn composite(param: &Param, name: &str, v: &str) -> Result<Cond> {
    let parts: Vec<&str> = v.split('$').collect();
    if parts.len() != param.components.len() {
        return Err(Error::invalid(format!(
            "'{name}' needs {} values joined by '$', got '{v}'",
            param.components.len()
        )));
    }
    let mut out = Vec::new();
    for (n, (c, part)) in param.components.iter().zip(parts).enumerate() {
        let table =
            table_of(c.kind).ok_or_else(|| unknown(format!("'{name}': nested composite")))?;
        let test = match c.kind {
            Kind::String => string_test(name, None, part)?,
            Kind::Token => token_test(param, name, None, part)?.0,
            Kind::Reference => reference_test(param, name, None, part, "")?.2,
            Kind::Date => date_test(name, part)?.0,
            Kind::Number => {
                let (prefix, n) = split_prefix(part);
                number_test(name, prefix, n)?.0
            }
            Kind::Quantity => quantity_test(name, part)?.0,
            Kind::Uri => uri_test(name, None, part)?,
            Kind::Composite | Kind::Special => unreachable!(),
        };
        out.push((table, index::component_param(&param.code, n), test));
    }
    Ok(Cond::Composite(out))
}

fn string_test(name: &str, modifier: Option<&str>, v: &str) -> Result<Test> {
    Ok(match modifier {
        None => Test::Prefix("norm", index::normalize(v)),
        Some("exact") => Test::Eq("raw", Bind::Text(v.to_string())),
        Some("contains") => Test::Contains("norm", index::normalize(v)),
        Some(m) => {
            return Err(unknown(format!(
                "modifier ':{m}' is not supported on '{name}'"
            )))
        }
    })
}

fn text(s: &str) -> Bind {
    Bind::Text(s.to_string())
}

/// A token test, and the index param to use when it is not the parameter's own.
fn token_test(
    param: &Param,
    name: &str,
    modifier: Option<&str>,
    v: &str,
) -> Result<(Test, Option<String>)> {
    match modifier {
        None | Some("not") => {}
        Some("text") => return Ok((Test::Contains("text", index::normalize(v)), None)),
        Some("of-type") => {
            let parts: Vec<&str> = v.splitn(3, '|').collect();
            if parts.len() != 3 || parts[2].is_empty() {
                return Err(Error::invalid(format!(
                    "'{name}' takes type-system|type-code|value, not '{v}'"
                )));
            }
            return Ok((
                Test::And(vec![
                    Test::Eq("system", text(&format!("{}|{}", parts[0], parts[1]))),
                    Test::Eq("code", text(parts[2])),
                ]),
                Some(format!("{}:of-type", param.code)),
            ));
        }
        Some(m) => {
            return Err(unknown(format!(
                "modifier ':{m}' is not supported on '{name}'"
            )))
        }
    }
    let t = match v.split_once('|') {
        None => Test::Eq("code", text(v)),
        Some((system, "")) => Test::Eq("system", text(system)),
        Some((system, code)) => Test::And(vec![
            Test::Eq("code", text(code)),
            Test::Eq("system", text(system)),
        ]),
    };
    Ok((t, None))
}

/// A reference test: the table and param it runs on, and the test.
fn reference_test(
    param: &Param,
    name: &str,
    modifier: Option<&str>,
    v: &str,
    base: &str,
) -> Result<(Table, String, Test)> {
    let own = |t: Test| Ok((Table::Reference, param.code.clone(), t));
    match modifier {
        Some("identifier") => {
            let t = match v.split_once('|') {
                None => Test::Eq("code", text(v)),
                Some((s, "")) => Test::Eq("system", text(s)),
                Some((s, c)) => {
                    Test::And(vec![Test::Eq("code", text(c)), Test::Eq("system", text(s))])
                }
            };
            return Ok((Table::Token, format!("{}:identifier", param.code), t));
        }
        Some("missing") => unreachable!("handled by the caller"),
        Some(t) if crate::fhir::types::is_resource_type(t) => {
            if !param.targets.iter().any(|x| x == t) {
                return Err(Error::invalid(format!(
                    "'{name}': {} cannot refer to a {t}",
                    param.code
                )));
            }
            let id = v.rsplit('/').next().unwrap_or(v);
            return own(Test::And(vec![
                Test::Eq("target_id", text(id)),
                Test::Eq("target_type", text(t)),
            ]));
        }
        Some(m) => {
            return Err(unknown(format!(
                "modifier ':{m}' is not supported on '{name}'"
            )))
        }
        None => {}
    }
    let local = if !base.is_empty() {
        v.strip_prefix(base).and_then(|r| r.strip_prefix('/'))
    } else {
        None
    };
    let candidate = local.unwrap_or(v);
    if v.contains("://") && local.is_none() || v.starts_with("urn:") {
        return own(Test::Eq("url", text(v)));
    }
    match index::split_reference(candidate) {
        Some((t, id)) if candidate.matches('/').count() >= 1 => own(Test::And(vec![
            Test::Eq("target_id", text(&id)),
            Test::Eq("target_type", text(&t)),
        ])),
        _ => {
            if candidate.contains('/') {
                return Err(Error::invalid(format!(
                    "'{name}': '{v}' is not an id, Type/id or absolute URL"
                )));
            }
            own(Test::Eq("target_id", text(candidate)))
        }
    }
}

/// Splits a comparison prefix (`ge2020`) off a value.
fn split_prefix(v: &str) -> (&str, &str) {
    const PREFIXES: [&str; 9] = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];
    // `get` rather than slicing: the value is the caller's, and its third
    // byte may sit inside a multi-byte character (`€1`).
    match (v.get(..2), v.get(2..)) {
        (Some(p), Some(rest)) if !rest.is_empty() && PREFIXES.contains(&p) => (p, rest),
        _ => ("eq", v),
    }
}

/// A date test over `[lo, hi)` index rows, and whether it must be negated.
fn date_test(name: &str, v: &str) -> Result<(Test, bool)> {
    let (prefix, d) = split_prefix(v);
    let (slo, shi) = date_range(d).ok_or_else(|| {
        Error::invalid(format!(
            "'{name}': '{d}' is not a valid FHIR date, dateTime or instant"
        ))
    })?;
    let (lo, hi) = (text(&format_instant(slo)), text(&format_instant(shi)));
    let within = Test::And(vec![Test::Ge("lo", lo.clone()), Test::Le("hi", hi.clone())]);
    Ok(match prefix {
        "eq" => (within, false),
        // A value outside the searched range.
        "ne" => (
            Test::Or(vec![Test::Lt("lo", lo), Test::Gt("hi", hi)]),
            false,
        ),
        "gt" => (Test::Gt("hi", hi), false),
        "lt" => (Test::Lt("lo", lo), false),
        "ge" => (Test::Or(vec![Test::Gt("hi", hi), within]), false),
        "le" => (Test::Or(vec![Test::Lt("lo", lo), within]), false),
        "sa" => (Test::Ge("lo", hi), false),
        "eb" => (Test::Le("hi", lo), false),
        _ => {
            // ap: overlaps the value widened by 10% of its distance from now.
            let now = Utc::now();
            let gap = (now - slo).abs().max((now - shi).abs());
            let margin = gap / 10;
            (
                Test::And(vec![
                    Test::Lt("lo", text(&format_instant(shi + margin))),
                    Test::Gt("hi", text(&format_instant(slo - margin))),
                ]),
                false,
            )
        }
    })
}

fn last_updated(name: &str, v: &str) -> Result<Cond> {
    let (prefix, d) = split_prefix(v);
    let (slo, shi) = date_range(d).ok_or_else(|| {
        Error::invalid(format!(
            "'{name}': '{d}' is not a valid FHIR date, dateTime or instant"
        ))
    })?;
    let (lo, hi) = (text(&format_instant(slo)), text(&format_instant(shi)));
    let c = "last_updated";
    let within = Test::And(vec![Test::Ge(c, lo.clone()), Test::Lt(c, hi.clone())]);
    let t = match prefix {
        "eq" => within,
        "ne" => return Ok(Cond::Not(Box::new(Cond::LastUpdated(within)))),
        "gt" | "sa" => Test::Ge(c, hi),
        "lt" | "eb" => Test::Lt(c, lo),
        "ge" => Test::Ge(c, lo),
        "le" => Test::Lt(c, hi),
        _ => {
            let now = Utc::now();
            let margin = (now - slo).abs() / 10;
            Test::And(vec![
                Test::Ge(c, text(&format_instant(slo - margin))),
                Test::Lt(c, text(&format_instant(shi + margin))),
            ])
        }
    };
    Ok(Cond::LastUpdated(t))
}

/// A decimal and the half-width of the range its precision denotes.
fn decimal(name: &str, s: &str) -> Result<(f64, f64)> {
    let n: f64 = s
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| Error::invalid(format!("'{name}': '{s}' is not a number")))?;
    let mantissa = s.split(['e', 'E']).next().unwrap_or(s);
    let exp: i32 = s
        .split_once(['e', 'E'])
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    let decimals = mantissa
        .split_once('.')
        .map(|(_, f)| f.len() as i32)
        .unwrap_or(0);
    Ok((n, 0.5 * 10f64.powi(exp - decimals)))
}

fn number_test(name: &str, prefix: &str, v: &str) -> Result<(Test, bool)> {
    let (n, half) = decimal(name, v)?;
    let c = "value";
    let within = Test::And(vec![
        Test::Ge(c, Bind::Real(n - half)),
        Test::Lt(c, Bind::Real(n + half)),
    ]);
    Ok(match prefix {
        "eq" => (within, false),
        "ne" => (
            Test::Or(vec![
                Test::Lt(c, Bind::Real(n - half)),
                Test::Ge(c, Bind::Real(n + half)),
            ]),
            false,
        ),
        "gt" | "sa" => (Test::Gt(c, Bind::Real(n)), false),
        "lt" | "eb" => (Test::Lt(c, Bind::Real(n)), false),
        "ge" => (Test::Ge(c, Bind::Real(n)), false),
        "le" => (Test::Le(c, Bind::Real(n)), false),
        _ => {
            let m = (n * 0.1).abs();
            (
                Test::And(vec![
                    Test::Ge(c, Bind::Real(n - m)),
                    Test::Le(c, Bind::Real(n + m)),
                ]),
                false,
            )
        }
    })
}

fn quantity_test(name: &str, v: &str) -> Result<(Test, bool)> {
    let mut parts = v.splitn(3, '|');
    let number = parts.next().unwrap_or_default();
    let system = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let (prefix, n) = split_prefix(number);
    let (t, neg) = number_test(name, prefix, n)?;
    let mut all = vec![t];
    if !system.is_empty() {
        all.push(Test::Eq("system", text(system)));
    }
    if !code.is_empty() {
        all.push(Test::Eq("code", text(code)));
    }
    Ok((Test::And(all), neg))
}

fn uri_test(name: &str, modifier: Option<&str>, v: &str) -> Result<Test> {
    Ok(match modifier {
        None => Test::Eq("value", text(v)),
        Some("below") => Test::Prefix("value", v.to_string()),
        Some("above") => {
            // Every URI that `v` is below: its prefixes at '/' boundaries.
            let mut prefixes = vec![v.to_string()];
            let mut cut = v;
            while let Some(i) = cut.rfind('/') {
                cut = &cut[..i];
                if cut.ends_with('/') || cut.is_empty() {
                    break;
                }
                prefixes.push(cut.to_string());
            }
            Test::In("value", prefixes)
        }
        Some(m) => {
            return Err(unknown(format!(
                "modifier ':{m}' is not supported on '{name}'"
            )))
        }
    })
}

/// Parses `_sort` into sort keys.
pub fn parse_sort(rtype: &str, value: &str) -> Result<Vec<Sort>> {
    let mut out = Vec::new();
    for key in value.split(',').filter(|k| !k.is_empty()) {
        let (descending, code) = match key.strip_prefix('-') {
            Some(c) => (true, c),
            None => (false, key),
        };
        let by = match code {
            "_id" => SortBy::Id,
            "_lastUpdated" => SortBy::LastUpdated,
            _ => {
                let p = registry()
                    .get(rtype, code)
                    .filter(|p| p.supported())
                    .ok_or_else(|| {
                        unknown(format!(
                            "cannot sort {rtype} by '{code}': no such parameter"
                        ))
                    })?;
                let table = table_of(p.kind).ok_or_else(|| {
                    unknown(format!("cannot sort by composite parameter '{code}'"))
                })?;
                SortBy::Index {
                    table,
                    param: p.code.clone(),
                }
            }
        };
        out.push(Sort { by, descending });
    }
    Ok(out)
}

/// Splits on unescaped commas (`\,` is a literal comma).
fn split_or(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',') | Some('|') | Some('\\')) => {
                if let (Some(last), Some(escaped)) = (out.last_mut(), chars.next()) {
                    last.push(escaped)
                }
            }
            ',' => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c)
                }
            }
        }
    }
    out
}

pub use crate::fhir::format_instant;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_values_split() {
        assert_eq!(
            split_or(r"a,b\,c"),
            vec!["a".to_string(), "b,c".to_string()]
        );
    }

    #[test]
    fn number_precision() {
        assert_eq!(decimal("n", "100").unwrap(), (100.0, 0.5));
        assert_eq!(decimal("n", "1.50").unwrap(), (1.5, 0.005));
        assert_eq!(decimal("n", "1e2").unwrap().1, 50.0);
        assert!(decimal("n", "abc").is_err());
    }

    #[test]
    fn chained_and_has_parameters_parse() {
        let c = parse_one("Condition", "subject:Patient.name", "a,b", "http://x", 0).unwrap();
        assert!(matches!(c, Cond::Chain { ref types, .. } if types == &["Patient".to_string()]));
        let c = parse_one(
            "Patient",
            "_has:Observation:patient:code",
            "1",
            "http://x",
            0,
        )
        .unwrap();
        assert!(matches!(c, Cond::Has { ref source, .. } if source == "Observation"));
        assert!(matches!(
            parse_one("Patient", "nonsense", "1", "", 0),
            Err(Error::UnknownParameter(_))
        ));
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
