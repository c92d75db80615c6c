//! SQL for reads: current versions, history, and criteria search.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{StoreResult, Version};

/// Which resources a history query covers.
#[derive(Debug, Clone)]
pub enum HistoryScope<'a> {
    System,
    Type(&'a str),
    Instance(&'a str, &'a str),
}

/// The body of a `resource_history h` row: its own, or — for the current
/// version, whose body is stored only in `resource` — the current one.
macro_rules! history_body {
    () => {
        "COALESCE(h.body, (SELECT r.body FROM resource r \
         WHERE r.rtype = h.rtype AND r.id = h.id AND r.version = h.version)) AS body"
    };
}

pub(super) fn version_from_row(r: &AnyRow) -> StoreResult<Version> {
    Ok(Version {
        rtype: r.try_get("rtype")?,
        id: r.try_get("id")?,
        version: r.try_get("version")?,
        last_updated: r.try_get("last_updated")?,
        deleted: r.try_get::<i64, _>("deleted")? != 0,
        body: r.try_get("body")?,
    })
}

pub(super) async fn current(
    conn: &mut AnyConnection,
    rtype: &str,
    id: &str,
    for_update: bool,
) -> StoreResult<Option<Version>> {
    let sql = if for_update {
        "SELECT rtype, id, version, last_updated, deleted, body FROM resource \
         WHERE rtype = $1 AND id = $2 FOR UPDATE"
    } else {
        "SELECT rtype, id, version, last_updated, deleted, body FROM resource \
         WHERE rtype = $1 AND id = $2"
    };
    let row = sqlx::query(sql)
        .bind(rtype)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| version_from_row(&r)).transpose()
}

pub(super) async fn history(
    conn: &mut AnyConnection,
    scope: &HistoryScope<'_>,
    since: Option<&str>,
    before: Option<i64>,
    limit: usize,
) -> StoreResult<Vec<(i64, Version)>> {
    let mut sql = String::from(concat!(
        "SELECT seq, rtype, id, version, last_updated, deleted, ",
        history_body!(),
        " FROM resource_history h WHERE 1 = 1"
    ));
    let mut binds: Vec<String> = Vec::new();
    match scope {
        HistoryScope::System => {}
        HistoryScope::Type(t) => {
            binds.push(t.to_string());
            sql.push_str(&format!(" AND rtype = ${}", binds.len()));
        }
        HistoryScope::Instance(t, id) => {
            binds.push(t.to_string());
            sql.push_str(&format!(" AND rtype = ${}", binds.len()));
            binds.push(id.to_string());
            sql.push_str(&format!(" AND id = ${}", binds.len()));
        }
    }
    if let Some(s) = since {
        binds.push(s.to_string());
        sql.push_str(&format!(" AND last_updated >= ${}", binds.len()));
    }
    if before.is_some() {
        sql.push_str(&format!(" AND seq < ${}", binds.len() + 1));
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", limit));
    let mut q = sqlx::query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    if let Some(b) = before {
        q = q.bind(b);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| Ok((r.try_get::<i64, _>("seq")?, version_from_row(r)?)))
        .collect()
}

pub(super) async fn version(
    conn: &mut AnyConnection,
    rtype: &str,
    id: &str,
    version: i64,
) -> StoreResult<Option<Version>> {
    let row = sqlx::query(concat!(
        "SELECT rtype, id, version, last_updated, deleted, ",
        history_body!(),
        " FROM resource_history h WHERE rtype = $1 AND id = $2 AND version = $3"
    ))
    .bind(rtype)
    .bind(id)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| version_from_row(&r)).transpose()
}

/// The newest version of `rtype/id` that is not a deletion.
pub(super) async fn last_live(
    conn: &mut AnyConnection,
    rtype: &str,
    id: &str,
) -> StoreResult<Option<Version>> {
    let row = sqlx::query(concat!(
        "SELECT rtype, id, version, last_updated, deleted, ",
        history_body!(),
        " FROM resource_history h WHERE rtype = $1 AND id = $2 AND deleted = 0 \
             ORDER BY version DESC LIMIT 1"
    ))
    .bind(rtype)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| version_from_row(&r)).transpose()
}
