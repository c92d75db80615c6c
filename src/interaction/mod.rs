//! The FHIR RESTful interactions (http.html) as plain functions over the
//! caller-scoped store (`store::gate`): no HTTP here, so the API handlers,
//! the batch/transaction processor, the exchange and the importer all share
//! one implementation, and none of them reaches a resource the caller may
//! not see. What the caller may not see answers exactly as what does not
//! exist.

pub mod amend;
pub mod bundle;
pub mod circle;
pub mod correction;
mod read;
pub mod rights;
mod searchset;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::fhir::codec;
use crate::fhir::types::is_resource_type;
use crate::policy::scope::Ops;
use crate::search;
use crate::store::{self, Found, Version, Writer};

pub use read::{history, read, vread, HistoryParams};
pub use searchset::{compartment_search, everything, explain, search, system_search};

/// What the interactions need to know about the server.
#[derive(Debug, Clone)]
pub struct Env {
    /// Public FHIR base URL, without trailing slash.
    pub base: String,
    pub default_count: usize,
    pub max_count: usize,
    /// The types whose practitioner changes are amendments
    /// (`amendment_types`).
    pub amendment_types: std::sync::Arc<Vec<String>>,
}

impl Env {
    pub fn from_config(config: &crate::config::Config) -> Env {
        Env {
            base: config.base_url(),
            default_count: config.default_count,
            max_count: config.max_count,
            amendment_types: std::sync::Arc::new(config.amendment_types()),
        }
    }
}

/// The answer for a resource that does not exist or that the caller may
/// not see: the same in both cases.
pub fn not_known(rtype: &str, id: &str) -> Error {
    Error::NotFound(format!("{rtype}/{id} is not known"))
}

/// The live version of a lookup, or 404 / 410.
pub fn live(found: Found, rtype: &str, id: &str) -> Result<Version> {
    match found {
        Found::Live(v) => Ok(v),
        Found::Deleted(v) => Err(Error::Gone(format!(
            "{rtype}/{id} was deleted (version {})",
            v.version
        ))),
        Found::Absent => Err(not_known(rtype, id)),
    }
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub last_updated: String,
    /// The stored resource (`None` after a delete).
    pub resource: Option<Value>,
    /// 201 for a new resource, 200 otherwise.
    pub status: StatusCode,
}

impl Written {
    fn from_version(v: &Version, status: StatusCode) -> Result<Written> {
        let resource = match &v.body {
            Some(b) if !v.deleted => Some(parse_stored(b)?),
            _ => None,
        };
        Ok(Written {
            rtype: v.rtype.clone(),
            id: v.id.clone(),
            version: v.version,
            last_updated: v.last_updated.clone(),
            resource,
            status,
        })
    }

    /// `Type/id/_history/n`
    pub fn versioned_path(&self) -> String {
        format!("{}/{}/_history/{}", self.rtype, self.id, self.version)
    }
}

/// Parses a stored body (written by ehrx, so trusted to be FHIR JSON).
pub fn parse_stored(body: &str) -> Result<Value> {
    serde_json::from_str(body).map_err(unreadable)
}

/// The error of a stored body that does not parse (a damaged database).
pub fn unreadable(e: serde_json::Error) -> Error {
    Error::Store(store::StoreError::Conflict(format!(
        "stored resource is unreadable: {e}"
    )))
}

/// A search, history or `$everything` page as one JSON value.
pub fn bundle_value(b: crate::fhir::bundle::Bundle) -> Result<Value> {
    b.into_value().map_err(unreadable)
}

/// Checks a resource type named in a URL.
pub fn check_type(rtype: &str) -> Result<()> {
    if is_resource_type(rtype) {
        Ok(())
    } else {
        Err(Error::UnknownType(rtype.to_string()))
    }
}

/// FHIR id syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_at(
            format!("'{id}' is not a valid FHIR id"),
            "id",
        ))
    }
}

/// Parses an `If-Match` value (`W/"3"`, `"3"` or `3`).
pub fn parse_etag(value: &str) -> Result<i64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    v.parse()
        .map_err(|_| Error::invalid(format!("'{value}' is not a valid version ETag")))
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now() -> String {
    search::format_instant(chrono::Utc::now())
}

fn check_resource_type(rtype: &str, resource: &Value) -> Result<()> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == rtype => Ok(()),
        Some(t) => Err(Error::invalid_at(
            format!("resource type '{t}' does not match the URL's type '{rtype}'"),
            format!("{t}.resourceType"),
        )),
        None => Err(Error::invalid("resource has no resourceType")),
    }
}

/// A resource with the server-controlled parts removed, for comparison.
fn content_of(resource: &Value) -> Value {
    let mut v = resource.clone();
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
        if meta.is_empty() {
            v.as_object_mut().unwrap().shift_remove("meta");
        }
    }
    v
}

/// Writes `resource` as the next version of `rtype/id` after `prev`, by
/// the rules of `policy::rights` (which may turn it into a proposed
/// amendment, answered 202 with the Task); the gate checks `op` on it.
async fn write(
    tx: &mut Writer,
    op: Ops,
    rtype: &str,
    id: &str,
    prev: Option<&Version>,
    resource: Value,
) -> Result<Written> {
    let mut resource = resource;
    let live = prev.filter(|p| !p.deleted);
    match rights::before_write(tx, rtype, id, live, &mut resource).await? {
        rights::Before::Proposed(w) => Ok(*w),
        rights::Before::Store(by_patient) => {
            let w = store_version(tx, op, rtype, id, prev, resource).await?;
            if let Some(p) = by_patient {
                rights::patient_provenance(tx, &w, &p, live.is_some()).await?;
            }
            Ok(w)
        }
    }
}

/// Stores `resource` as the next version of `rtype/id` after `prev`; the
/// gate checks `op` on it.
async fn store_version(
    tx: &mut Writer,
    op: Ops,
    rtype: &str,
    id: &str,
    prev: Option<&Version>,
    resource: Value,
) -> Result<Written> {
    let version = prev.map(|p| p.version + 1).unwrap_or(1);
    let last_updated = now();
    let Value::Object(mut fields) = resource else {
        return Err(Error::invalid("resource must be an object"));
    };
    // resourceType, id and meta lead, as in the spec's examples.
    let mut meta = match fields.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    meta.insert("versionId".into(), json!(version.to_string()));
    meta.insert("lastUpdated".into(), json!(last_updated));
    fields.shift_remove("id");
    let mut ordered = serde_json::Map::with_capacity(fields.len() + 2);
    ordered.insert(
        "resourceType".into(),
        fields
            .shift_remove("resourceType")
            .unwrap_or_else(|| json!(rtype)),
    );
    ordered.insert("id".into(), json!(id));
    ordered.insert("meta".into(), Value::Object(meta));
    ordered.extend(fields);
    let resource = Value::Object(ordered);
    let rows = search::index::extract(rtype, &resource);
    let body = serde_json::to_string(&resource).map_err(|e| Error::invalid(e.to_string()))?;
    tx.put(
        op,
        prev,
        &Version {
            rtype: rtype.to_string(),
            id: id.to_string(),
            version,
            last_updated: last_updated.clone(),
            deleted: false,
            body: Some(body),
        },
        Some(&resource),
        rows,
    )
    .await?;
    let created = prev.map(|p| p.deleted).unwrap_or(true);
    Ok(Written {
        rtype: rtype.to_string(),
        id: id.to_string(),
        version,
        last_updated,
        resource: Some(resource),
        status: if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
    })
}

/// Current resources matching conditional criteria for a conditional write,
/// as the caller may see them: first locks the criteria against concurrent
/// writers of the same criteria, so two cannot both find nothing and both
/// create.
async fn find_to_write(tx: &mut Writer, rtype: &str, query: &str) -> Result<Vec<Version>> {
    check_type(rtype)?;
    tx.lock_conditions(&[format!("{rtype}?{query}")]).await?;
    tx.view().find(rtype, query).await
}

fn several(rtype: &str, query: &str) -> Error {
    Error::MultipleMatches(format!(
        "conditional criteria '{rtype}?{query}' match more than one resource"
    ))
}

/// create (POST), optionally conditional on `If-None-Exist` (matched
/// against what the caller may see).
pub async fn create(
    tx: &mut Writer,
    rtype: &str,
    resource: Value,
    if_none_exist: Option<&str>,
) -> Result<Written> {
    check_type(rtype)?;
    check_resource_type(rtype, &resource)?;
    tx.access().check(Ops::CREATE, rtype, &resource)?;
    if let Some(query) = if_none_exist {
        let found = find_to_write(tx, rtype, query).await?;
        match found.len() {
            0 => {}
            1 => return Written::from_version(&found[0], StatusCode::OK),
            _ => return Err(several(rtype, query)),
        }
    }
    write(tx, Ops::CREATE, rtype, &new_id(), None, resource).await
}

/// create with an id the server already chose (transactions).
pub async fn create_as(tx: &mut Writer, rtype: &str, id: &str, resource: Value) -> Result<Written> {
    check_resource_type(rtype, &resource)?;
    write(tx, Ops::CREATE, rtype, id, None, resource).await
}

fn check_if_match(current: Option<&Version>, if_match: Option<i64>) -> Result<()> {
    match (if_match, current) {
        (None, _) => Ok(()),
        (Some(want), Some(cur)) if cur.version == want && !cur.deleted => Ok(()),
        (Some(want), Some(cur)) => Err(Error::PreconditionFailed(format!(
            "If-Match version {want} does not match current version {} of {}/{}",
            cur.version, cur.rtype, cur.id
        ))),
        (Some(want), None) => Err(Error::PreconditionFailed(format!(
            "If-Match version {want} given, but the resource does not exist"
        ))),
    }
}

/// update (PUT `Type/id`); creates the resource if it does not exist.
pub async fn update(
    tx: &mut Writer,
    rtype: &str,
    id: &str,
    resource: Value,
    if_match: Option<i64>,
) -> Result<Written> {
    update_at(tx, rtype, id, resource, if_match, false).await
}

/// update; `fresh` when the server chose `id` just now (a conditional
/// update that matched nothing), so no one can have used it before.
async fn update_at(
    tx: &mut Writer,
    rtype: &str,
    id: &str,
    resource: Value,
    if_match: Option<i64>,
    fresh: bool,
) -> Result<Written> {
    check_type(rtype)?;
    check_id(id)?;
    check_resource_type(rtype, &resource)?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(Error::invalid_at(
                format!("resource id '{body_id}' does not match the URL's id '{id}'"),
                format!("{rtype}.id"),
            ))
        }
        None => {
            return Err(Error::invalid_at(
                "the resource in an update must carry its id",
                format!("{rtype}.id"),
            ))
        }
    }
    let found = tx.current_for_write(rtype, id).await?;
    let op = match &found {
        Found::Live(cur) => {
            tx.access().check_type(Ops::UPDATE, rtype)?;
            let stored = parse_stored(cur.body.as_deref().unwrap_or("{}"))?;
            tx.access().check(Ops::UPDATE, rtype, &stored)?;
            tx.access().check(Ops::UPDATE, rtype, &resource)?;
            Ops::UPDATE
        }
        Found::Deleted(_) => Ops::CREATE,
        // An id the caller does not see may still be taken by a resource it
        // may not see: only a caller who sees every resource of the type
        // (or the server, for an id it just chose) may create at an id.
        Found::Absent if fresh || tx.access().sees_whole_type(Ops::READ, Some(rtype)) => {
            Ops::CREATE
        }
        Found::Absent => return Err(not_known(rtype, id)),
    };
    tx.access().check(op, rtype, &resource)?;
    check_if_match(found.version(), if_match)?;
    if let Found::Live(cur) = &found {
        // An update that changes nothing keeps the current version.
        let stored = parse_stored(cur.body.as_deref().unwrap_or("{}"))?;
        if content_of(&stored) == content_of(&resource) {
            return Written::from_version(cur, StatusCode::OK);
        }
    }
    write(tx, op, rtype, id, found.version(), resource).await
}

/// conditional update (PUT `Type?criteria`).
pub async fn conditional_update(
    tx: &mut Writer,
    rtype: &str,
    query: &str,
    resource: Value,
    if_match: Option<i64>,
) -> Result<Written> {
    let found = find_to_write(tx, rtype, query).await?;
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (id, fresh) = match found.len() {
        0 => match body_id {
            Some(b) => (b, false),
            None => (new_id(), true),
        },
        1 => {
            let id = found[0].id.clone();
            if let Some(b) = body_id.filter(|b| *b != id) {
                return Err(Error::invalid_at(
                    format!("resource id '{b}' differs from the id '{id}' the criteria matched"),
                    format!("{rtype}.id"),
                ));
            }
            (id, false)
        }
        _ => return Err(several(rtype, query)),
    };
    let mut resource = resource;
    resource["id"] = json!(id);
    update_at(tx, rtype, &id, resource, if_match, fresh).await
}

/// delete: writes a tombstone version. Deleting what does not exist, what
/// the caller may not see, or what is already deleted succeeds and changes
/// nothing (`None`).
pub async fn delete(
    tx: &mut Writer,
    rtype: &str,
    id: &str,
    if_match: Option<i64>,
) -> Result<Option<Written>> {
    check_type(rtype)?;
    check_id(id)?;
    tx.access().check_type(Ops::DELETE, rtype)?;
    let found = tx.current_for_write(rtype, id).await?;
    check_if_match(found.version(), if_match)?;
    let Found::Live(cur) = found else {
        return Ok(None);
    };
    if let Some(proposed) = rights::before_delete(tx, &cur).await? {
        return Ok(Some(proposed));
    }
    store_tombstone(tx, &cur).await.map(Some)
}

/// Writes the tombstone after `cur`.
async fn store_tombstone(tx: &mut Writer, cur: &Version) -> Result<Written> {
    let (rtype, id) = (cur.rtype.as_str(), cur.id.as_str());
    let v = Version {
        rtype: rtype.to_string(),
        id: id.to_string(),
        version: cur.version + 1,
        last_updated: now(),
        deleted: true,
        body: None,
    };
    tx.put(
        Ops::DELETE,
        Some(cur),
        &v,
        None,
        search::index::Rows::default(),
    )
    .await?;
    Written::from_version(&v, StatusCode::NO_CONTENT)
}

/// conditional delete (DELETE `Type?criteria`): none or one match is
/// deleted; several matches are refused with 412.
pub async fn conditional_delete(
    tx: &mut Writer,
    rtype: &str,
    query: &str,
) -> Result<Option<Written>> {
    check_type(rtype)?;
    let found = tx.view().find(rtype, query).await?;
    match found.len() {
        0 => Ok(None),
        1 => delete(tx, rtype, &found[0].id, None).await,
        _ => Err(several(rtype, query)),
    }
}

/// patch with a JSON Patch document (RFC 6902).
pub async fn patch(
    tx: &mut Writer,
    rtype: &str,
    id: &str,
    patch_doc: &Value,
    if_match: Option<i64>,
) -> Result<Written> {
    check_type(rtype)?;
    check_id(id)?;
    if !patch_doc.is_array() {
        return Err(Error::invalid(
            "a JSON Patch document is an array of operations",
        ));
    }
    tx.access().check_type(Ops::UPDATE, rtype)?;
    let found = tx.current_for_write(rtype, id).await?;
    let cur = live(found, rtype, id)?;
    check_if_match(Some(&cur), if_match)?;
    let mut doc = parse_stored(cur.body.as_deref().unwrap_or("{}"))?;
    tx.access().check(Ops::UPDATE, rtype, &doc)?;
    let limits = crate::limits::get();
    let caps = crate::fhir::patch::Caps {
        operations: limits.patch_operations,
        bytes: limits.patch_result_bytes,
        depth: limits.nesting_depth,
    };
    crate::fhir::patch::apply(&mut doc, patch_doc, caps).map_err(|f| {
        use crate::fhir::patch::PatchFault;
        match f {
            PatchFault::Malformed(m) => Error::invalid(m),
            PatchFault::TooCostly(m) => Error::too_costly(m),
            PatchFault::NotApplicable(m) => {
                Error::Unprocessable(format!("JSON Patch could not be applied: {m}"))
            }
        }
    })?;
    if doc.get("resourceType").and_then(Value::as_str) != Some(rtype)
        || doc.get("id").and_then(Value::as_str) != Some(id)
    {
        return Err(Error::Unprocessable(
            "a patch may not change the resource's type or id".into(),
        ));
    }
    let doc = content_of(&doc);
    let doc = codec::validate_json(doc).map_err(Error::PatchedInvalid)?;
    write(tx, Ops::UPDATE, rtype, id, Some(&cur), doc).await
}

/// conditional patch (PATCH `Type?criteria`).
pub async fn conditional_patch(
    tx: &mut Writer,
    rtype: &str,
    query: &str,
    patch_doc: &Value,
    if_match: Option<i64>,
) -> Result<Written> {
    check_type(rtype)?;
    let found = tx.view().find(rtype, query).await?;
    match found.len() {
        0 => Err(Error::NotFound(format!("no {rtype} matches '{query}'"))),
        1 => patch(tx, rtype, &found[0].id.clone(), patch_doc, if_match).await,
        _ => Err(several(rtype, query)),
    }
}
