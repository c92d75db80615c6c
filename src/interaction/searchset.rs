//! search (type level, compartment, `_type` at system level),
//! `_include`/`_revinclude`, `_summary`, `_elements`, `_total`, keyset
//! paging, and `Patient/{id}/$everything`.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use serde_json::{json, Map, Value};

use super::read::parse_count;
use super::{check_id, check_type, parse_stored, Env};
use crate::error::{Error, Result};
use crate::fhir::bundle::{paging_links, Bundle, Entry, Resource};
use crate::fhir::types::is_resource_type;
use crate::policy::scope::Ops;
use crate::search::compartment::{self, compartment_params};
use crate::search::cond::{Bind, Cond, Cursor, Query, Sort};
use crate::search::registry::{registry, Kind};
use crate::search::{self, Parsed};
use crate::store::{Dialect, Version, View};

/// `_summary` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Summary {
    True,
    Text,
    Data,
    Count,
    False,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Total {
    None,
    Accurate,
}

/// `_include` / `_revinclude` value: `Source:param[:Target]` or `*`.
#[derive(Debug, Clone)]
struct IncludeSpec {
    source: String,
    /// `None` for `*` (every reference parameter).
    param: Option<String>,
    target: Option<String>,
    iterate: bool,
}

/// The result-shaping parameters of a search.
#[derive(Debug)]
struct Control {
    count: Option<usize>,
    cursor: Option<Cursor>,
    total: Total,
    sort: Vec<Sort>,
    summary: Summary,
    elements: Vec<String>,
    include: Vec<IncludeSpec>,
    revinclude: Vec<IncludeSpec>,
    /// The parameters as given, for links.
    echo: Vec<(String, String)>,
}

fn parse_include(name: &str, v: &str, rtype: &str) -> Result<IncludeSpec> {
    let iterate = name.ends_with(":iterate") || name.ends_with(":recurse");
    if v == "*" {
        return Ok(IncludeSpec {
            source: rtype.to_string(),
            param: None,
            target: None,
            iterate,
        });
    }
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 || !is_resource_type(parts[0]) {
        return Err(Error::invalid(format!(
            "{name} value '{v}' is not of the form Type:parameter[:TargetType]"
        )));
    }
    let (source, param) = (parts[0], parts[1]);
    let param = if param == "*" {
        None
    } else {
        registry()
            .get(source, param)
            .filter(|p| p.kind == Kind::Reference && p.supported())
            .ok_or_else(|| {
                Error::UnknownParameter(format!(
                    "{name}: {source} has no reference parameter '{param}'"
                ))
            })?;
        Some(param.to_string())
    };
    let target = match parts.get(2) {
        Some(t) if is_resource_type(t) => Some(t.to_string()),
        Some(t) => {
            return Err(Error::invalid(format!(
                "{name}: '{t}' is not a resource type"
            )))
        }
        None => None,
    };
    Ok(IncludeSpec {
        source: source.to_string(),
        param,
        target,
        iterate,
    })
}

fn encode_cursor(c: &Cursor) -> String {
    let vals: Vec<Value> =
        c.0.iter()
            .map(|b| match b {
                Bind::Text(s) => json!(s),
                Bind::Real(f) => json!(f),
            })
            .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!([vals, c.1]).to_string())
}

fn decode_cursor(s: &str) -> Result<Cursor> {
    let bad = || Error::invalid(format!("'{s}' is not a valid paging cursor"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let vals = v[0].as_array().ok_or_else(bad)?;
    let id = v[1].as_str().ok_or_else(bad)?.to_string();
    let binds = vals
        .iter()
        .map(|x| match x {
            Value::String(s) => Ok(Bind::Text(s.clone())),
            Value::Number(n) => n.as_f64().map(Bind::Real).ok_or_else(bad),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((binds, id))
}

fn parse_control(rtype: &str, params: &[(String, String)]) -> Result<Control> {
    let mut c = Control {
        count: None,
        cursor: None,
        total: Total::Accurate,
        sort: Vec::new(),
        summary: Summary::False,
        elements: Vec::new(),
        include: Vec::new(),
        revinclude: Vec::new(),
        echo: Vec::new(),
    };
    for (k, v) in params {
        let base = k.split(':').next().unwrap_or(k);
        match base {
            "_count" => c.count = Some(parse_count(v)?),
            "_cursor" => {
                c.cursor = Some(decode_cursor(v)?);
                continue;
            }
            "_total" => {
                c.total = match v.as_str() {
                    "none" => Total::None,
                    // An exact count is cheap enough from the index tables.
                    "estimate" | "accurate" => Total::Accurate,
                    other => {
                        return Err(Error::invalid(format!(
                            "_total must be none, estimate or accurate, not '{other}'"
                        )))
                    }
                }
            }
            "_sort" => c.sort = search::parse_sort(rtype, v)?,
            "_summary" => {
                c.summary = match v.as_str() {
                    "true" => Summary::True,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    "count" => Summary::Count,
                    "false" => Summary::False,
                    other => {
                        return Err(Error::invalid(format!(
                            "_summary must be true, text, data, count or false, not '{other}'"
                        )))
                    }
                }
            }
            "_elements" => c.elements.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(String::from),
            ),
            "_include" => c.include.push(parse_include(k, v, rtype)?),
            "_revinclude" => c.revinclude.push(parse_include(k, v, rtype)?),
            _ => continue,
        }
        c.echo.push((k.clone(), v.clone()));
    }
    Ok(c)
}

/// search on one type (or a compartment of it); see the module docs.
pub async fn search(
    view: &mut View<'_>,
    env: &Env,
    rtype: &str,
    params: &[(String, String)],
    strict: bool,
) -> Result<Bundle> {
    search_in(view, env, rtype, None, params, strict).await
}

/// Compartment search: `Patient/123/Observation?…`.
pub async fn compartment_search(
    view: &mut View<'_>,
    env: &Env,
    owner: (&str, &str),
    rtype: &str,
    params: &[(String, String)],
    strict: bool,
) -> Result<Bundle> {
    search_in(view, env, rtype, Some(owner), params, strict).await
}

async fn search_in(
    view: &mut View<'_>,
    env: &Env,
    rtype: &str,
    owner: Option<(&str, &str)>,
    params: &[(String, String)],
    strict: bool,
) -> Result<Bundle> {
    check_type(rtype)?;
    let Parsed { mut conds, applied } = search::parse(rtype, params, strict, &env.base)?;
    let path = match owner {
        Some((ot, oid)) => {
            check_type(ot)?;
            check_id(oid)?;
            let ps = compartment_params(ot, rtype);
            if ps.is_empty() && ot != rtype {
                return Err(Error::invalid(format!(
                    "{rtype} is not in the {ot} compartment"
                )));
            }
            let mut alts: Vec<Cond> = Vec::new();
            if !ps.is_empty() {
                alts.push(Cond::RefersTo {
                    params: ps,
                    target_type: ot.to_string(),
                    target_ids: vec![oid.to_string()],
                });
            }
            if ot == rtype {
                alts.push(Cond::Ids(vec![oid.to_string()]));
            }
            conds.push(if alts.len() == 1 {
                alts.pop().unwrap()
            } else {
                Cond::Or(alts)
            });
            format!("{ot}/{oid}/{rtype}")
        }
        None => rtype.to_string(),
    };
    let control = parse_control(rtype, params)?;
    let query = Query {
        rtype: rtype.to_string(),
        conds,
        sort: control.sort.clone(),
    };
    let size = if control.summary == Summary::Count {
        0
    } else {
        control
            .count
            .unwrap_or(env.default_count)
            .min(env.max_count)
    };
    let mut rows = if size == 0 {
        Vec::new()
    } else {
        view.search(&query, control.cursor.as_ref(), size + 1)
            .await?
    };
    let more = rows.len() > size;
    let total = match control.total {
        Total::None if control.summary != Summary::Count => None,
        // A first page that holds every match is its own count.
        _ if control.cursor.is_none() && size > 0 && !more => Some(rows.len() as i64),
        _ => Some(view.count(&query).await?),
    };
    rows.truncate(size);

    // Links: the applied criteria, then the result parameters.
    let mut base_params = applied.clone();
    base_params.extend(control.echo.iter().filter(|(k, _)| k != "_count").cloned());
    base_params.push(("_count".into(), size.to_string()));
    let next = if more {
        rows.last()
            .map(|(last, keys)| encode_cursor(&(keys.clone(), last.id.clone())))
    } else {
        None
    };
    let links = paging_links(
        &env.base,
        &path,
        &base_params,
        control.cursor.as_ref().map(encode_cursor),
        next,
    );

    // The caller's limits are part of every query the view runs.
    let matches: Vec<Version> = rows.into_iter().map(|(v, _)| v).collect();
    let included = includes(view, &matches, &control).await?;
    let mut entries = Vec::with_capacity(matches.len() + included.len());
    for v in matches {
        entries.push(entry(env, v, "match", &control)?);
    }
    for v in included {
        entries.push(entry(env, v, "include", &control)?);
    }
    Ok(Bundle::new("searchset", total, links, entries))
}

/// A searchset entry: the stored body as it is, unless `_summary` or
/// `_elements` shape it.
fn entry(env: &Env, v: Version, mode: &str, control: &Control) -> Result<Entry> {
    let shaped =
        !matches!(control.summary, Summary::False | Summary::Count) || !control.elements.is_empty();
    let body = v.body.unwrap_or_else(|| "{}".to_string());
    let resource = if shaped {
        let mut resource = parse_stored(&body)?;
        shape(&mut resource, control.summary, &control.elements);
        Resource::Value(resource)
    } else {
        Resource::Stored(body)
    };
    Ok(search_entry(env, &v.rtype, &v.id, resource, mode))
}

fn search_entry(env: &Env, rtype: &str, id: &str, resource: Resource, mode: &str) -> Entry {
    let mut rest = Map::new();
    rest.insert("search".into(), json!({ "mode": mode }));
    Entry {
        full_url: format!("{}/{}/{}", env.base, rtype, id),
        resource: Some(resource),
        rest,
    }
}

/// Elements every summary keeps, besides the `isSummary` ones.
const ALWAYS: &[&str] = &["resourceType", "id", "meta"];

/// Applies `_summary` / `_elements`, marking the result SUBSETTED.
fn shape(resource: &mut Value, summary: Summary, elements: &[String]) {
    let Value::Object(map) = resource else { return };
    let keep: Option<HashSet<String>> = match summary {
        Summary::Text => Some(
            ["text", "id", "meta"]
                .iter()
                .map(|s| s.to_string())
                .chain(mandatory(map))
                .collect(),
        ),
        Summary::Data => Some(map.keys().filter(|k| *k != "text").cloned().collect()),
        Summary::True => {
            let rtype = map
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default();
            Some(
                map.keys()
                    .filter(|k| crate::fhir::summary::is_summary(rtype, k))
                    .cloned()
                    .collect(),
            )
        }
        _ if !elements.is_empty() => Some(elements.iter().cloned().chain(mandatory(map)).collect()),
        _ => None,
    };
    let Some(keep) = keep else { return };
    let before = map.len();
    map.retain(|k, _| ALWAYS.contains(&k.as_str()) || keep.contains(k));
    if map.len() < before {
        let meta = map
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = meta {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Value::Array(t) = tags {
                t.push(json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "SUBSETTED",
                    "display": "subsetted"
                }));
            }
        }
    }
}

/// Mandatory elements present in the resource (kept by `_elements`).
fn mandatory(map: &Map<String, Value>) -> Vec<String> {
    let rtype = map
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    map.keys()
        .filter(|k| crate::fhir::summary::is_mandatory(rtype, k))
        .cloned()
        .collect()
}

const MAX_ITERATIONS: usize = 8;

/// `_include` and `_revinclude` (with `:iterate`) for a page of matches.
async fn includes(
    view: &mut View<'_>,
    matches: &[Version],
    control: &Control,
) -> Result<Vec<Version>> {
    if control.include.is_empty() && control.revinclude.is_empty() || matches.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|v| (v.rtype.clone(), v.id.clone()))
        .collect();
    let mut out: Vec<Version> = Vec::new();
    let mut frontier: Vec<Version> = matches.to_vec();
    // The cap is on what the caller may see; the references read to find
    // it are bounded by a multiple of it.
    let cap = crate::limits::get().included_resources;
    let read_cap = cap.saturating_mul(10).saturating_add(1);
    let too_many = || {
        Error::too_costly(format!(
            "_include/_revinclude would add more than {cap} resources to this page; ask for a smaller _count or fewer inclusions"
        ))
    };
    for round in 0..MAX_ITERATIONS {
        let mut found: Vec<(String, String)> = Vec::new();
        let by_type = group(&frontier);
        for spec in control.include.iter().filter(|s| round == 0 || s.iterate) {
            if let Some(ids) = by_type.get(spec.source.as_str()) {
                let params = spec.param.as_ref().map(|p| vec![p.clone()]);
                for (t, id) in view
                    .references_from(&spec.source, ids, params.as_deref(), read_cap)
                    .await?
                {
                    if spec.target.as_ref().is_none_or(|x| *x == t) {
                        found.push((t, id));
                    }
                }
            }
        }
        for spec in control
            .revinclude
            .iter()
            .filter(|s| round == 0 || s.iterate)
        {
            let params = spec.param.as_ref().map(|p| vec![p.clone()]);
            for (t, ids) in &by_type {
                if spec.target.as_ref().is_some_and(|x| x != t) {
                    continue;
                }
                let referring = view
                    .references_to(&spec.source, params.as_deref(), t, ids, read_cap)
                    .await?;
                if referring.len() >= read_cap {
                    return Err(too_many());
                }
                for id in referring {
                    found.push((spec.source.clone(), id));
                }
            }
        }
        let fresh: Vec<(String, String)> = found
            .into_iter()
            .filter(|k| seen.insert(k.clone()))
            .collect();
        if fresh.is_empty() {
            break;
        }
        if fresh.len() >= read_cap {
            return Err(too_many());
        }
        let mut wanted: HashMap<String, Vec<String>> = HashMap::new();
        for (t, id) in fresh {
            wanted.entry(t).or_default().push(id);
        }
        let mut next = Vec::new();
        let mut types: Vec<_> = wanted.into_iter().collect();
        types.sort();
        for (t, ids) in types {
            // What the caller may not read is neither returned nor followed.
            next.extend(view.fetch(&t, &ids).await?);
        }
        out.extend(next.iter().cloned());
        if out.len() > cap {
            return Err(too_many());
        }
        frontier = next;
    }
    Ok(out)
}

fn group(vs: &[Version]) -> HashMap<&str, Vec<String>> {
    let mut m: HashMap<&str, Vec<String>> = HashMap::new();
    for v in vs {
        m.entry(v.rtype.as_str()).or_default().push(v.id.clone());
    }
    m
}

/// `Patient/{id}/$everything`: the patient and every resource in its
/// compartment, paged by (type, id) with no cap and no duplicates.
pub async fn everything(
    view: &mut View<'_>,
    env: &Env,
    id: &str,
    params: &[(String, String)],
) -> Result<Bundle> {
    check_id(id)?;
    super::read::read(view, "Patient", id).await?;
    view.access().check_type(Ops::SEARCH, "Patient")?;
    let mut since = None;
    let mut types: Option<Vec<String>> = None;
    let mut count = None;
    let mut cursor: Option<(String, String)> = None;
    let mut echo = Vec::new();
    let bad_cursor = |v: &str| Error::invalid(format!("'{v}' is not a valid paging cursor"));
    for (k, v) in params {
        match k.as_str() {
            "_since" => {
                let (lo, _) = search::date_range(v).ok_or_else(|| {
                    Error::invalid(format!("_since value '{v}' is not a valid instant"))
                })?;
                since = Some(search::format_instant(lo));
            }
            "_type" => {
                let ts: Vec<String> = v.split(',').map(String::from).collect();
                for t in &ts {
                    check_type(t)?;
                }
                types = Some(ts);
            }
            "_count" => {
                count = Some(parse_count(v)?);
                continue;
            }
            "_cursor" => {
                // `Type.id` of the last compartment resource, or `.` when
                // only the patient has been returned.
                let (t, i) = v.split_once('.').ok_or_else(|| bad_cursor(v))?;
                if !(t.is_empty() && i.is_empty() || is_resource_type(t) && !i.is_empty()) {
                    return Err(bad_cursor(v));
                }
                cursor = Some((t.to_string(), i.to_string()));
                continue;
            }
            "_format" | "_pretty" | "start" | "end" => continue,
            other => {
                return Err(Error::UnknownParameter(format!(
                    "parameter '{other}' is not supported on $everything"
                )))
            }
        }
        echo.push((k.clone(), v.clone()));
    }
    let size = count.unwrap_or(env.default_count).min(env.max_count).max(1);
    // The patient first, then every resource of its compartment in
    // (type, id) order, found by one lookup of the references to it.
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(c) = compartment::compartments().get("Patient") {
        for t in c.keys() {
            if types.as_ref().is_some_and(|ts| !ts.contains(t))
                || view.access().check_type(Ops::READ, t).is_err()
            {
                continue;
            }
            for p in compartment_params("Patient", t) {
                pairs.push((t.clone(), p));
            }
        }
    }
    let with_patient = types
        .as_ref()
        .is_none_or(|ts| ts.iter().any(|t| t == "Patient"));
    let mut page: Vec<Version> = Vec::new();
    let mut patient_first = false;
    if cursor.is_none() && with_patient {
        for v in view.fetch("Patient", &[id.to_string()]).await? {
            if since.as_ref().is_none_or(|s| v.last_updated >= *s) {
                page.push(v);
                patient_first = true;
            }
        }
    }
    let after = cursor
        .as_ref()
        .filter(|(t, _)| !t.is_empty())
        .map(|(t, i)| (t.as_str(), i.as_str()));
    let rows = view
        .compartment_page(
            ("Patient", id),
            &pairs,
            since.as_deref(),
            after,
            size + 1 - page.len(),
        )
        .await?;
    page.extend(rows);
    let more = page.len() > size;
    page.truncate(size);
    let next = if more {
        page.last().map(|v| {
            if patient_first && page.len() == 1 {
                ".".to_string()
            } else {
                format!("{}.{}", v.rtype, v.id)
            }
        })
    } else {
        None
    };
    let mut base_params = echo;
    base_params.push(("_count".into(), size.to_string()));
    paged_bundle(
        env,
        &format!("Patient/{id}/$everything"),
        base_params,
        cursor.map(|(t, i)| format!("{t}.{i}")),
        next,
        page,
        None,
    )
}

fn parse_multi_cursor(v: &str) -> Option<(usize, String)> {
    let (t, rest) = v.split_once('.')?;
    Some((t.parse().ok()?, rest.to_string()))
}

/// One page over several queries taken in order, keyset-paged by (query
/// index, id): no cap, no duplicates, and no empty pages. Returns one row
/// more than `size` when there is a next page.
async fn multi_page(
    view: &mut View<'_>,
    plan: &[Query],
    cursor: Option<&(usize, String)>,
    size: usize,
) -> Result<Vec<(usize, Version)>> {
    let (start, after_id) = match cursor {
        Some((t, id)) => (*t, Some(id.clone())),
        None => (0, None),
    };
    let mut page: Vec<(usize, Version)> = Vec::new();
    for (i, q) in plan.iter().enumerate().skip(start) {
        let after = match (&after_id, i == start) {
            (Some(a), true) => Some((Vec::new(), a.clone())),
            _ => None,
        };
        let want = size + 1 - page.len();
        let rows = view.search(q, after.as_ref(), want).await?;
        page.extend(rows.into_iter().map(|(v, _)| (i, v)));
        if page.len() > size {
            break;
        }
    }
    Ok(page)
}

/// System-level search: `GET /?_type=A,B&…` over the listed types, with
/// the parameters every listed type defines.
pub async fn system_search(
    view: &mut View<'_>,
    env: &Env,
    params: &[(String, String)],
    strict: bool,
) -> Result<Bundle> {
    let types: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "_type")
        .flat_map(|(_, v)| v.split(',').map(String::from).collect::<Vec<_>>())
        .collect();
    if types.is_empty() {
        return Err(Error::invalid(
            "search at the base URL needs _type (e.g. ?_type=Patient,Practitioner)",
        ));
    }
    for t in &types {
        check_type(t)?;
    }
    let mut count = None;
    let mut cursor = None;
    let mut total_none = false;
    let mut criteria = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "_type" | "_format" | "_pretty" => {}
            "_count" => count = Some(parse_count(v)?),
            "_cursor" => {
                cursor =
                    Some(parse_multi_cursor(v).ok_or_else(|| {
                        Error::invalid(format!("'{v}' is not a valid paging cursor"))
                    })?)
            }
            "_total" => total_none = v == "none",
            k if search::RESULT_PARAMS.contains(&k) => {
                if strict {
                    return Err(Error::UnknownParameter(format!(
                        "'{k}' is not supported on search across types"
                    )));
                }
            }
            _ => criteria.push((k.clone(), v.clone())),
        }
    }
    let mut plan = Vec::new();
    let mut applied = Vec::new();
    for t in &types {
        let p = search::parse(t, &criteria, strict, &env.base)?;
        applied = p.applied;
        plan.push(Query {
            rtype: t.clone(),
            conds: p.conds,
            sort: Vec::new(),
        });
    }
    let size = count.unwrap_or(env.default_count).min(env.max_count);
    let total = if total_none {
        None
    } else {
        let mut n = 0;
        for q in &plan {
            n += view.count(q).await?;
        }
        Some(n)
    };
    let mut page = if size == 0 {
        Vec::new()
    } else {
        multi_page(view, &plan, cursor.as_ref(), size).await?
    };
    let more = page.len() > size;
    page.truncate(size);
    let mut base_params = vec![("_type".to_string(), types.join(","))];
    base_params.extend(applied);
    base_params.push(("_count".into(), size.to_string()));
    if total_none {
        base_params.push(("_total".into(), "none".into()));
    }
    let next = if more {
        page.last().map(|(i, v)| format!("{i}.{}", v.id))
    } else {
        None
    };
    let page = page.into_iter().map(|(_, v)| v).collect();
    paged_bundle(
        env,
        "",
        base_params,
        cursor.map(|(t, i)| format!("{t}.{i}")),
        next,
        page,
        total,
    )
}

/// A searchset Bundle of a multi-type page, with its links.
fn paged_bundle(
    env: &Env,
    path: &str,
    base_params: Vec<(String, String)>,
    cursor: Option<String>,
    next: Option<String>,
    page: Vec<Version>,
    total: Option<i64>,
) -> Result<Bundle> {
    let links = paging_links(&env.base, path, &base_params, cursor, next);
    let entries = page
        .into_iter()
        .map(|v| {
            let body = v.body.unwrap_or_else(|| "{}".to_string());
            search_entry(env, &v.rtype, &v.id, Resource::Stored(body), "match")
        })
        .collect();
    Ok(Bundle::new("searchset", total, links, entries))
}

/// The SQL and query plan(s) of a search given as `Type?query` or
/// `Patient/ID/$everything` (for `ehrx explain` and BENCHMARKS.md).
pub async fn explain(
    view: &mut View<'_>,
    dialect: Dialect,
    env: &Env,
    request: &str,
) -> Result<String> {
    let (path, query) = request.split_once('?').unwrap_or((request, ""));
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let mut out = String::new();
    let mut show = |title: &str, (sql, plan): (String, Vec<String>)| {
        out.push_str(&format!("-- {title}\n{sql}\n"));
        for line in plan {
            out.push_str(&format!("  {line}\n"));
        }
        out.push('\n');
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["Patient", id, "$everything"] = segs.as_slice() {
        let mut pairs = Vec::new();
        if let Some(c) = compartment::compartments().get("Patient") {
            for t in c.keys() {
                for p in compartment_params("Patient", t) {
                    pairs.push((t.clone(), p));
                }
            }
        }
        show(
            "$everything (after the patient itself)",
            view.explain_compartment_page(dialect, ("Patient", id), &pairs, env.default_count)
                .await?,
        );
        return Ok(out);
    }
    let rtype = segs[0];
    check_type(rtype)?;
    let parsed = search::parse(rtype, &params, true, &env.base)?;
    let control = parse_control(rtype, &params)?;
    let size = control
        .count
        .unwrap_or(env.default_count)
        .min(env.max_count);
    let q = Query {
        rtype: rtype.to_string(),
        conds: parsed.conds,
        sort: control.sort.clone(),
    };
    show("matches", view.explain(dialect, &q, size + 1).await?);
    if !control.revinclude.is_empty() {
        let ids: Vec<String> = view
            .search(&q, None, size)
            .await?
            .into_iter()
            .map(|(v, _)| v.id)
            .collect();
        for spec in &control.revinclude {
            let params = spec.param.as_ref().map(|p| vec![p.clone()]);
            show(
                &format!("_revinclude {}", spec.source),
                view.explain_references_to(dialect, &spec.source, params.as_deref(), rtype, &ids)
                    .await?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c: Cursor = (
            vec![Bind::Text("a,b".into()), Bind::Real(1.5)],
            "id-1".into(),
        );
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        assert!(decode_cursor("%%").is_err());
    }

    #[test]
    fn compartment_membership() {
        assert!(compartment_params("Patient", "Observation").contains(&"subject".to_string()));
        assert!(compartment_params("Patient", "Organization").is_empty());
    }
}
