//! batch and transaction Bundles (http.html §3.1.0.11).
//!
//! A transaction runs in one database transaction: entries are processed in
//! the spec's order (DELETE, POST, PUT/PATCH, GET/HEAD), `fullUrl`s are
//! replaced by the assigned ids in every entry, conditional references are
//! resolved, and any failing entry rolls the whole Bundle back. A batch runs
//! each entry on its own.

use std::collections::{HashMap, HashSet};

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    check_type, conditional_delete, conditional_patch, conditional_update, create, create_as,
    delete, new_id, parse_etag, parse_stored, patch, read, search, update, vread, Env, Written,
};
use crate::error::{Error, Result};
use crate::fhir::bundle::{bundle, etag};
use crate::fhir::reference;
use crate::policy::scope::Ops;
use crate::store::{Gate, Writer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    /// Processing order within a transaction.
    fn phase(self) -> u8 {
        match self {
            Method::Delete => 0,
            Method::Post => 1,
            Method::Put | Method::Patch => 2,
            Method::Get | Method::Head => 3,
        }
    }
}

/// The target of an entry's `request.url`.
#[derive(Debug, Clone)]
struct Target {
    rtype: String,
    id: Option<String>,
    version: Option<String>,
    query: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    method: Method,
    target: Target,
    full_url: Option<String>,
    resource: Option<Value>,
    if_match: Option<i64>,
    if_none_exist: Option<String>,
}

/// The response part of one entry.
#[derive(Debug, Clone)]
struct EntryResponse {
    status: StatusCode,
    location: Option<String>,
    etag: Option<String>,
    last_modified: Option<String>,
    resource: Option<Value>,
    outcome: Option<Value>,
}

impl EntryResponse {
    fn written(w: &Written) -> EntryResponse {
        EntryResponse {
            status: w.status,
            location: Some(w.versioned_path()),
            etag: Some(etag(w.version)),
            last_modified: Some(w.last_updated.clone()),
            resource: w.resource.clone(),
            outcome: None,
        }
    }

    fn deleted(w: Option<&Written>) -> EntryResponse {
        if let Some(w) = w.filter(|w| w.status == StatusCode::ACCEPTED) {
            // A proposed deletion: the Task of the amendment.
            return EntryResponse::written(w);
        }
        EntryResponse {
            status: StatusCode::NO_CONTENT,
            location: None,
            etag: w.map(|w| etag(w.version)),
            last_modified: w.map(|w| w.last_updated.clone()),
            resource: None,
            outcome: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut response = json!({ "status": status_line(self.status) });
        if let Some(l) = &self.location {
            response["location"] = json!(l);
        }
        if let Some(e) = &self.etag {
            response["etag"] = json!(e);
        }
        if let Some(m) = &self.last_modified {
            response["lastModified"] = json!(m);
        }
        if let Some(o) = &self.outcome {
            response["outcome"] = o.clone();
        }
        let mut entry = json!({ "response": response });
        if let Some(r) = &self.resource {
            if let (Some(t), Some(id)) = (
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            ) {
                entry["fullUrl"] = json!(format!("{t}/{id}"));
            }
            entry["resource"] = r.clone();
        }
        entry
    }
}

fn status_line(s: StatusCode) -> String {
    format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""))
}

/// Parses `request.url`, relative or absolute under `base`.
fn parse_target(url: &str, base: &str) -> Result<Target> {
    let rel = url
        .strip_prefix(base)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = match rel.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (rel, None),
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let bad = || Error::invalid(format!("request.url '{url}' is not a supported FHIR URL"));
    let target = match parts.as_slice() {
        [t] => Target {
            rtype: t.to_string(),
            id: None,
            version: None,
            query,
        },
        [t, id] => Target {
            rtype: t.to_string(),
            id: Some(id.to_string()),
            version: None,
            query,
        },
        [t, id, "_history", v] => Target {
            rtype: t.to_string(),
            id: Some(id.to_string()),
            version: Some(v.to_string()),
            query,
        },
        _ => return Err(bad()),
    };
    check_type(&target.rtype)?;
    Ok(target)
}

fn parse_entry(index: usize, e: &Value, base: &str) -> Result<Entry> {
    let request = e
        .get("request")
        .ok_or_else(|| Error::invalid_at("entry has no request", "Bundle.request"))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("PATCH") => Method::Patch,
        Some("DELETE") => Method::Delete,
        other => {
            return Err(Error::invalid_at(
                format!("unsupported request.method {other:?}"),
                "Bundle.request.method",
            ))
        }
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid_at("entry has no request.url", "Bundle.request.url"))?;
    let target = parse_target(url, base)?;
    let resource = e.get("resource").cloned();
    if matches!(method, Method::Post | Method::Put | Method::Patch) && resource.is_none() {
        return Err(Error::invalid_at(
            "a POST, PUT or PATCH entry needs a resource",
            "Bundle.resource",
        ));
    }
    match method {
        Method::Post if target.id.is_some() || target.query.is_some() => {
            return Err(Error::invalid_at(
                "a POST entry's url must be the resource type",
                "Bundle.request.url",
            ))
        }
        Method::Put | Method::Patch | Method::Delete
            if target.id.is_none() && target.query.is_none() =>
        {
            return Err(Error::invalid_at(
                "a PUT, PATCH or DELETE entry's url needs an id or search criteria",
                "Bundle.request.url",
            ))
        }
        _ => {}
    }
    Ok(Entry {
        index,
        method,
        target,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        resource,
        if_match: request
            .get("ifMatch")
            .and_then(Value::as_str)
            .map(parse_etag)
            .transpose()?,
        if_none_exist: request
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(|q| q.trim_start_matches('?').to_string()),
    })
}

/// The JSON Patch carried by a PATCH entry (a Binary of
/// `application/json-patch+json`).
fn patch_document(resource: &Value) -> Result<Value> {
    let ok = resource.get("resourceType").and_then(Value::as_str) == Some("Binary")
        && resource
            .get("contentType")
            .and_then(Value::as_str)
            .map(|c| c.starts_with("application/json-patch+json"))
            .unwrap_or(false);
    if !ok {
        return Err(Error::NotSupported(
            "a PATCH entry must carry a Binary of contentType application/json-patch+json".into(),
        ));
    }
    let data = resource.get("data").and_then(Value::as_str).unwrap_or("");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| Error::invalid_at(format!("Binary.data is not base64: {e}"), "Binary.data"))?;
    crate::fhir::json::from_slice(&bytes).map_err(|e| {
        Error::invalid_at(
            format!("Binary.data is not JSON: {}", e.message),
            "Binary.data",
        )
    })
}

/// Processes a `batch` or `transaction` Bundle and returns the response Bundle.
pub async fn process(gate: &Gate, env: &Env, bundle_value: Value) -> Result<Value> {
    let kind = bundle_value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let raw_entries = match bundle_value.get("entry") {
        Some(Value::Array(items)) => items.clone(),
        None => Vec::new(),
        Some(_) => return Err(Error::invalid_at("entry must be a list", "Bundle.entry")),
    };
    let cap = crate::limits::get().bundle_entries;
    if raw_entries.len() > cap {
        return Err(Error::too_costly(format!(
            "the Bundle has {} entries; at most {cap} are accepted in one request",
            raw_entries.len()
        )));
    }
    match kind.as_str() {
        "transaction" => {
            let entries = raw_entries
                .iter()
                .enumerate()
                .map(|(i, e)| parse_entry(i, e, &env.base).map_err(|err| err.in_entry(i)))
                .collect::<Result<Vec<_>>>()?;
            let responses = transaction(gate, env, entries).await?;
            Ok(bundle(
                "transaction-response",
                None,
                vec![],
                responses.iter().map(EntryResponse::to_json).collect(),
            ))
        }
        "batch" => {
            let mut out = Vec::with_capacity(raw_entries.len());
            for (i, raw) in raw_entries.iter().enumerate() {
                let result = match parse_entry(i, raw, &env.base) {
                    Ok(entry) => batch_entry(gate, env, entry).await,
                    Err(e) => Err(e),
                };
                out.push(match result {
                    Ok(r) => r.to_json(),
                    Err(e) => error_entry(&e.in_entry(i)),
                });
            }
            Ok(bundle("batch-response", None, vec![], out))
        }
        other => Err(Error::invalid_at(
            format!("Bundle.type must be batch or transaction to be processed, not '{other}'"),
            "Bundle.type",
        )),
    }
}

fn error_entry(e: &Error) -> Value {
    json!({
        "response": {
            "status": status_line(e.status()),
            "outcome": e.outcome(),
        }
    })
}

async fn batch_entry(gate: &Gate, env: &Env, entry: Entry) -> Result<EntryResponse> {
    let mut tx = gate.begin().await?;
    let mut entry = entry;
    let mut map = HashMap::new();
    resolve_conditional_refs(&mut tx, std::slice::from_ref(&entry), &mut map).await?;
    if let Some(r) = entry.resource.as_mut() {
        reference::rewrite(r, &map);
    }
    let id = new_id();
    let response = perform(&mut tx, env, &entry, &id).await?;
    tx.commit().await?;
    Ok(response)
}

/// Resolves every conditional reference in the entries' resources into `map`.
async fn resolve_conditional_refs(
    tx: &mut Writer,
    entries: &[Entry],
    map: &mut HashMap<String, String>,
) -> Result<()> {
    for e in entries {
        let Some(resource) = &e.resource else {
            continue;
        };
        let mut refs = Vec::new();
        reference::conditional_references(resource, &mut refs);
        for r in refs {
            if map.contains_key(&r) {
                continue;
            }
            let (rtype, query) = reference::split_conditional(&r).unwrap_or((&r, ""));
            check_type(rtype).map_err(|err| err.in_entry(e.index))?;
            let found = tx
                .view()
                .find(rtype, query)
                .await
                .map_err(|err| err.in_entry(e.index))?;
            match found.len() {
                1 => {
                    map.insert(r.clone(), format!("{}/{}", found[0].rtype, found[0].id));
                }
                0 => {
                    return Err(Error::PreconditionFailed(format!(
                        "conditional reference '{r}' matches no resource"
                    ))
                    .in_entry(e.index))
                }
                _ => {
                    return Err(Error::MultipleMatches(format!(
                        "conditional reference '{r}' matches more than one resource"
                    ))
                    .in_entry(e.index))
                }
            }
        }
    }
    Ok(())
}

/// Carries out one entry. `new_id` is used by a POST.
async fn perform(tx: &mut Writer, env: &Env, e: &Entry, new_id: &str) -> Result<EntryResponse> {
    let t = &e.target;
    let resource = || e.resource.clone().expect("checked in parse_entry");
    Ok(match e.method {
        Method::Post => match &e.if_none_exist {
            Some(q) => EntryResponse::written(&create(tx, &t.rtype, resource(), Some(q)).await?),
            None => EntryResponse::written(&create_as(tx, &t.rtype, new_id, resource()).await?),
        },
        Method::Put => match (&t.id, &t.query) {
            (Some(id), _) => {
                EntryResponse::written(&update(tx, &t.rtype, id, resource(), e.if_match).await?)
            }
            (None, Some(q)) => EntryResponse::written(
                &conditional_update(tx, &t.rtype, q, resource(), e.if_match).await?,
            ),
            (None, None) => unreachable!("checked in parse_entry"),
        },
        Method::Patch => {
            let doc = patch_document(&resource())?;
            match (&t.id, &t.query) {
                (Some(id), _) => {
                    EntryResponse::written(&patch(tx, &t.rtype, id, &doc, e.if_match).await?)
                }
                (None, Some(q)) => EntryResponse::written(
                    &conditional_patch(tx, &t.rtype, q, &doc, e.if_match).await?,
                ),
                (None, None) => unreachable!("checked in parse_entry"),
            }
        }
        Method::Delete => match (&t.id, &t.query) {
            (Some(id), _) => {
                EntryResponse::deleted(delete(tx, &t.rtype, id, e.if_match).await?.as_ref())
            }
            (None, Some(q)) => {
                EntryResponse::deleted(conditional_delete(tx, &t.rtype, q).await?.as_ref())
            }
            (None, None) => unreachable!("checked in parse_entry"),
        },
        Method::Get | Method::Head => {
            let head = e.method == Method::Head;
            let (status, resource, version) = match (&t.id, &t.version) {
                (Some(id), None) => {
                    let v = read(&mut tx.view(), &t.rtype, id).await?;
                    (
                        StatusCode::OK,
                        parse_stored(v.body.as_deref().unwrap_or("{}"))?,
                        Some(v),
                    )
                }
                (Some(id), Some(vid)) => {
                    let v = vread(&mut tx.view(), &t.rtype, id, vid).await?;
                    (
                        StatusCode::OK,
                        parse_stored(v.body.as_deref().unwrap_or("{}"))?,
                        Some(v),
                    )
                }
                (None, _) => {
                    let params: Vec<(String, String)> =
                        form_urlencoded::parse(t.query.as_deref().unwrap_or("").as_bytes())
                            .into_owned()
                            .collect();
                    let b = search(&mut tx.view(), env, &t.rtype, &params, true).await?;
                    (StatusCode::OK, super::bundle_value(b)?, None)
                }
            };
            EntryResponse {
                status,
                location: None,
                etag: version.as_ref().map(|v| etag(v.version)),
                last_modified: version.as_ref().map(|v| v.last_updated.clone()),
                resource: (!head).then_some(resource),
                outcome: None,
            }
        }
    })
}

/// Refuses a resource whose literal references point nowhere: a temporary
/// id (`urn:uuid:`, `urn:oid:`) that no entry carries, or `Type/id` that is
/// neither written by this transaction nor a resource the caller may read
/// (invisible answers like absent). Not checked, because the answer would
/// tell the caller about data it may not see: references to types it may
/// not read at all. Not checked either for ehrx's own maintenance jobs
/// (`ehrx import` loads files in any order, a reference may point into a
/// later one). External absolute URLs are left alone.
async fn check_references(
    tx: &mut Writer,
    env: &Env,
    entries: &[Entry],
    written: &HashSet<String>,
) -> Result<()> {
    let mut checked: HashSet<String> = HashSet::new();
    for e in entries {
        let Some(resource) = &e.resource else {
            continue;
        };
        if e.method == Method::Patch {
            continue; // a Binary carrying the patch; its result is checked when applied
        }
        let mut refs = Vec::new();
        reference::literal_references(resource, &mut refs);
        for r in refs {
            if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
                return Err(Error::invalid(format!(
                    "reference '{r}' names no entry of this transaction"
                ))
                .in_entry(e.index));
            }
            let local = r
                .strip_prefix(env.base.as_str())
                .map(|rest| rest.trim_start_matches('/'))
                .unwrap_or(&r);
            let mut parts = local.split('/');
            let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !crate::fhir::types::is_resource_type(t) || local.contains("://") {
                continue; // an external URL
            }
            let key = format!("{t}/{id}");
            if written.contains(&key) || !checked.insert(key.clone()) {
                continue;
            }
            let access = tx.access();
            if access.is_unrestricted() || access.check_type(Ops::READ, t).is_err() {
                continue;
            }
            match read(&mut tx.view(), t, id).await {
                Ok(_) => {}
                Err(Error::NotFound(_) | Error::Gone(_) | Error::Invalid { .. }) => {
                    return Err(Error::invalid(format!(
                        "reference '{r}' resolves neither to an entry of this transaction nor to an existing resource"
                    ))
                    .in_entry(e.index))
                }
                Err(other) => return Err(other.in_entry(e.index)),
            }
        }
    }
    Ok(())
}

/// Current resources matching conditional criteria that the caller may
/// see (none, one, or "several").
async fn find(tx: &mut Writer, rtype: &str, query: &str) -> Result<Vec<crate::store::Version>> {
    check_type(rtype)?;
    tx.view().find(rtype, query).await
}

/// The Provenances a transaction writes.
fn provenances(entries: &[Entry]) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| matches!(e.method, Method::Post | Method::Put))
        .filter_map(|e| e.resource.clone())
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Provenance"))
        .collect()
}

async fn transaction(
    gate: &Gate,
    env: &Env,
    mut entries: Vec<Entry>,
) -> Result<Vec<EntryResponse>> {
    // Each fullUrl names one entry.
    let mut full_urls = HashSet::new();
    for e in &entries {
        if let Some(u) = &e.full_url {
            if !full_urls.insert(u.as_str()) {
                return Err(Error::invalid_at(
                    format!("fullUrl '{u}' is carried by more than one entry"),
                    "Bundle.fullUrl",
                )
                .in_entry(e.index));
            }
        }
    }
    // The same resource may not be the target of two entries.
    let mut targets = HashSet::new();
    for e in &entries {
        if let (Some(id), Method::Put | Method::Patch | Method::Delete) = (&e.target.id, e.method) {
            if !targets.insert(format!("{}/{}", e.target.rtype, id)) {
                return Err(Error::invalid(format!(
                    "{}/{} is the target of more than one entry",
                    e.target.rtype, id
                ))
                .in_entry(e.index));
            }
        }
    }

    let mut tx = gate.begin().await?;
    let mut map: HashMap<String, String> = HashMap::new();
    let mut ids: Vec<String> = vec![String::new(); entries.len()];
    let mut responses: Vec<Option<EntryResponse>> = vec![None; entries.len()];

    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].method.phase());

    // 1. Deletes come first.
    super::rights::with_vouchers(provenances(&entries), async {
        for &i in order
            .iter()
            .filter(|&&i| entries[i].method == Method::Delete)
        {
            responses[i] = Some(
                perform(&mut tx, env, &entries[i], "")
                    .await
                    .map_err(|e| e.in_entry(i))?,
            );
        }
        Ok::<(), Error>(())
    })
    .await?;

    // 2. Decide the id every POST and PUT will have, so references can be rewritten.
    // Conditional creates and updates first lock their criteria against
    // concurrent transactions, all at once.
    let criteria: Vec<String> = entries
        .iter()
        .filter_map(
            |e| match (e.method, &e.if_none_exist, &e.target.id, &e.target.query) {
                (Method::Post, Some(q), _, _) | (Method::Put, _, None, Some(q)) => {
                    Some(format!("{}?{}", e.target.rtype, q))
                }
                _ => None,
            },
        )
        .collect();
    tx.lock_conditions(&criteria).await?;
    let mut conditional_creates: HashMap<String, usize> = HashMap::new();
    for &i in &order {
        let e = &entries[i];
        let local = match e.method {
            Method::Post => {
                if let Some(q) = &e.if_none_exist {
                    let key = format!("{}?{}", e.target.rtype, q);
                    if let Some(&first) = conditional_creates.get(&key) {
                        // Same condition twice in one Bundle: one resource.
                        ids[i] = ids[first].clone();
                        Some(format!("{}/{}", e.target.rtype, ids[i]))
                    } else {
                        let found = find(&mut tx, &e.target.rtype, q)
                            .await
                            .map_err(|err| err.in_entry(i))?;
                        match found.len() {
                            0 => {
                                conditional_creates.insert(key, i);
                                ids[i] = new_id();
                            }
                            1 => {
                                ids[i] = found[0].id.clone();
                                responses[i] = Some(EntryResponse::written(
                                    &Written::from_version(&found[0], StatusCode::OK)
                                        .map_err(|err| err.in_entry(i))?,
                                ));
                            }
                            _ => {
                                return Err(Error::MultipleMatches(format!(
                                    "ifNoneExist '{q}' matches more than one {}",
                                    e.target.rtype
                                ))
                                .in_entry(i))
                            }
                        }
                        Some(format!("{}/{}", e.target.rtype, ids[i]))
                    }
                } else {
                    ids[i] = new_id();
                    Some(format!("{}/{}", e.target.rtype, ids[i]))
                }
            }
            Method::Put => match (&e.target.id, &e.target.query) {
                (Some(id), _) => Some(format!("{}/{}", e.target.rtype, id)),
                (None, Some(q)) => {
                    let found = find(&mut tx, &e.target.rtype, q)
                        .await
                        .map_err(|err| err.in_entry(i))?;
                    let id = match found.len() {
                        0 => e
                            .resource
                            .as_ref()
                            .and_then(|r| r.get("id"))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .unwrap_or_else(new_id),
                        1 => found[0].id.clone(),
                        _ => {
                            return Err(Error::MultipleMatches(format!(
                                "conditional update '{q}' matches more than one {}",
                                e.target.rtype
                            ))
                            .in_entry(i))
                        }
                    };
                    entries[i].target.id = Some(id.clone());
                    entries[i].target.query = None;
                    if let Some(r) = entries[i].resource.as_mut() {
                        r["id"] = json!(id);
                    }
                    Some(format!("{}/{}", entries[i].target.rtype, id))
                }
                (None, None) => None,
            },
            _ => None,
        };
        if let (Some(full_url), Some(local)) = (&entries[i].full_url, local) {
            map.insert(full_url.clone(), local);
        }
    }

    // 3. Conditional references, then rewrite every entry; every reference
    // left must resolve to an entry or to a resource the caller may see.
    resolve_conditional_refs(&mut tx, &entries, &mut map).await?;
    for e in entries.iter_mut() {
        if let Some(r) = e.resource.as_mut() {
            reference::rewrite(r, &map);
        }
    }
    let written: HashSet<String> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match (e.method, &e.target.id) {
            (Method::Post, _) => Some(format!("{}/{}", e.target.rtype, ids[i])),
            (Method::Put, Some(id)) => Some(format!("{}/{}", e.target.rtype, id)),
            _ => None,
        })
        .collect();
    check_references(&mut tx, env, &entries, &written).await?;

    // 4. Writes, then reads, in the spec's order. The Provenances the
    // Bundle carries let a practitioner record a Consent on a patient's
    // behalf (`super::rights`).
    super::rights::with_vouchers(provenances(&entries), async {
        let mut created: HashSet<String> = HashSet::new();
        for &i in order
            .iter()
            .filter(|&&i| entries[i].method != Method::Delete)
        {
            if responses[i].is_some() {
                continue; // conditional create that matched
            }
            let e = &entries[i];
            if e.method == Method::Post
                && e.if_none_exist.is_some()
                && !created.insert(ids[i].clone())
            {
                // Second entry of a duplicated conditional create.
                let v = read(&mut tx.view(), &e.target.rtype, &ids[i])
                    .await
                    .map_err(|err| err.in_entry(i))?;
                responses[i] = Some(EntryResponse::written(
                    &Written::from_version(&v, StatusCode::OK).map_err(|err| err.in_entry(i))?,
                ));
                continue;
            }
            let mut e = e.clone();
            e.if_none_exist = None; // already resolved above
            responses[i] = Some(
                perform(&mut tx, env, &e, &ids[i])
                    .await
                    .map_err(|err| err.in_entry(i))?,
            );
        }
        Ok::<(), Error>(())
    })
    .await?;
    tx.commit().await?;
    Ok(responses
        .into_iter()
        .map(|r| r.expect("every entry was processed"))
        .collect())
}
