//! read, vread and history, through the caller-scoped store.

use serde_json::{json, Map};

use super::{check_id, check_type, live, not_known, Env};
use crate::error::{Error, Result};
use crate::fhir::bundle::{etag, paging_links, Bundle, Entry, Resource};
use crate::policy::scope::Ops;
use crate::search;
use crate::store::{Found, HistoryScope, Version, View};

/// read: the current version; 404 if it never existed or the caller may
/// not see it, 410 if deleted.
pub async fn read(view: &mut View<'_>, rtype: &str, id: &str) -> Result<Version> {
    check_type(rtype)?;
    check_id(id)?;
    view.access().check_type(Ops::READ, rtype)?;
    let found = view.current(Ops::READ, rtype, id).await?;
    live(found, rtype, id)
}

/// vread: one version; 404 if unknown (or not the caller's to see), 410 if
/// that version is a deletion.
pub async fn vread(view: &mut View<'_>, rtype: &str, id: &str, vid: &str) -> Result<Version> {
    check_type(rtype)?;
    check_id(id)?;
    view.access().check_type(Ops::READ, rtype)?;
    let missing = || Error::NotFound(format!("{rtype}/{id} has no version '{vid}'"));
    let n: i64 = vid.parse().map_err(|_| missing())?;
    match view.version(rtype, id, n).await? {
        Found::Absent => Err(missing()),
        Found::Deleted(_) => Err(Error::Gone(format!(
            "version {n} of {rtype}/{id} is a deletion"
        ))),
        Found::Live(v) => Ok(v),
    }
}

/// Query parameters of a history interaction.
#[derive(Debug, Default)]
pub struct HistoryParams {
    pub since: Option<String>,
    pub count: Option<usize>,
    pub cursor: Option<i64>,
}

impl HistoryParams {
    pub fn parse(params: &[(String, String)]) -> Result<HistoryParams> {
        let mut out = HistoryParams::default();
        for (k, v) in params {
            match k.as_str() {
                "_since" => {
                    let (lo, _) = search::date_range(v).ok_or_else(|| {
                        Error::invalid(format!("_since value '{v}' is not a valid instant"))
                    })?;
                    out.since = Some(search::format_instant(lo));
                }
                "_count" => out.count = Some(parse_count(v)?),
                "_cursor" => {
                    out.cursor = Some(v.parse().map_err(|_| {
                        Error::invalid(format!("'{v}' is not a valid paging cursor"))
                    })?)
                }
                "_format" | "_pretty" => {}
                other => {
                    return Err(Error::UnknownParameter(format!(
                        "parameter '{other}' is not supported on history"
                    )))
                }
            }
        }
        Ok(out)
    }
}

pub(super) fn parse_count(v: &str) -> Result<usize> {
    v.parse()
        .map_err(|_| Error::invalid(format!("_count value '{v}' is not a non-negative integer")))
}

fn page_size(env: &Env, count: Option<usize>) -> usize {
    count.unwrap_or(env.default_count).min(env.max_count)
}

/// Entry of a history Bundle: the stored body as it is.
fn history_entry(env: &Env, v: Version) -> Entry {
    let full_url = format!("{}/{}/{}", env.base, v.rtype, v.id);
    let modified = v.last_updated.clone();
    let mut rest = Map::new();
    if v.deleted {
        rest.insert(
            "request".into(),
            json!({"method": "DELETE", "url": format!("{}/{}", v.rtype, v.id)}),
        );
        rest.insert(
            "response".into(),
            json!({"status": "204 No Content", "etag": etag(v.version), "lastModified": modified}),
        );
        return Entry {
            full_url,
            resource: None,
            rest,
        };
    }
    let (method, url, status) = if v.version == 1 {
        ("POST", v.rtype.clone(), "201 Created")
    } else {
        ("PUT", format!("{}/{}", v.rtype, v.id), "200 OK")
    };
    rest.insert("request".into(), json!({"method": method, "url": url}));
    rest.insert(
        "response".into(),
        json!({"status": status, "etag": etag(v.version), "lastModified": modified}),
    );
    Entry {
        full_url,
        resource: Some(Resource::Stored(v.body.unwrap_or_else(|| "{}".to_string()))),
        rest,
    }
}

/// history at system, type or instance level, newest first, keyset-paged.
pub async fn history(
    view: &mut View<'_>,
    env: &Env,
    scope: HistoryScope<'_>,
    params: &[(String, String)],
) -> Result<Bundle> {
    let path = match &scope {
        HistoryScope::System => "_history".to_string(),
        HistoryScope::Type(t) => {
            check_type(t)?;
            format!("{t}/_history")
        }
        HistoryScope::Instance(t, id) => {
            check_type(t)?;
            check_id(id)?;
            view.access().check_type(Ops::READ, t)?;
            format!("{t}/{id}/_history")
        }
    };
    let hp = HistoryParams::parse(params)?;
    let size = page_size(env, hp.count);
    let Some(mut rows) = view
        .history(&scope, hp.since.as_deref(), hp.cursor, size + 1)
        .await?
    else {
        return Err(match scope {
            HistoryScope::Instance(t, id) => not_known(t, id),
            _ => Error::NotFound(format!("{path} is not known")),
        });
    };
    let more = rows.len() > size;
    rows.truncate(size);

    let mut base_params: Vec<(String, String)> = Vec::new();
    if let Some(s) = params.iter().find(|(k, _)| k == "_since") {
        base_params.push(s.clone());
    }
    base_params.push(("_count".into(), size.to_string()));
    let next = if more {
        rows.last().map(|(seq, _)| seq.to_string())
    } else {
        None
    };
    let links = paging_links(
        &env.base,
        &path,
        &base_params,
        hp.cursor.map(|c| c.to_string()),
        next,
    );
    let entries = rows
        .into_iter()
        .map(|(_, v)| history_entry(env, v))
        .collect();
    Ok(Bundle::new("history", None, links, entries))
}
