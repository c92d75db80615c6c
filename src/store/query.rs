//! SQL for reads: current versions, history, and criteria search.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{StoreResult, Version};

/// One search criterion; criteria are ANDed, values inside one are ORed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Criterion {
    /// `_id=a,b`
    Ids(Vec<String>),
    /// A token parameter (`identifier=system|code,…`).
    Token {
        param: &'static str,
        values: Vec<TokenValue>,
    },
    /// `_lastUpdated` within `[from, before)`; either bound may be open.
    LastUpdated {
        from: Option<String>,
        before: Option<String>,
    },
}

/// `system|code`, `|code`, `system|`, `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenValue {
    /// `None`: any system; `Some("")`: no system.
    pub system: Option<String>,
    /// `None`: any code of the system.
    pub code: Option<String>,
}

/// Which resources a history query covers.
#[derive(Debug, Clone)]
pub enum HistoryScope<'a> {
    System,
    Type(&'a str),
    Instance(&'a str, &'a str),
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
    let mut sql = String::from(
        "SELECT seq, rtype, id, version, last_updated, deleted, body FROM resource_history WHERE 1 = 1",
    );
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

/// Builds the `WHERE` clause of a criteria search over `resource r`.
fn where_clause(rtype: &str, criteria: &[Criterion], binds: &mut Vec<String>) -> String {
    let push = |binds: &mut Vec<String>, v: &str| {
        binds.push(v.to_string());
        format!("${}", binds.len())
    };
    let mut sql = format!("r.rtype = {} AND r.deleted = 0", push(binds, rtype));
    for c in criteria {
        match c {
            Criterion::Ids(ids) => {
                let list: Vec<String> = ids.iter().map(|id| push(binds, id)).collect();
                sql.push_str(&format!(" AND r.id IN ({})", list.join(", ")));
            }
            Criterion::Token { param, values } => {
                let mut alts = Vec::new();
                for v in values {
                    let mut cond = format!("t.param = {}", push(binds, param));
                    if let Some(code) = &v.code {
                        cond.push_str(&format!(" AND t.code = {}", push(binds, code)));
                    }
                    if let Some(system) = &v.system {
                        cond.push_str(&format!(" AND t.system = {}", push(binds, system)));
                    }
                    alts.push(format!("({cond})"));
                }
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM search_token t WHERE t.rtype = r.rtype AND t.id = r.id AND ({}))",
                    alts.join(" OR ")
                ));
            }
            Criterion::LastUpdated { from, before } => {
                if let Some(from) = from {
                    sql.push_str(&format!(" AND r.last_updated >= {}", push(binds, from)));
                }
                if let Some(before) = before {
                    sql.push_str(&format!(" AND r.last_updated < {}", push(binds, before)));
                }
            }
        }
    }
    sql
}

pub(super) async fn search(
    conn: &mut AnyConnection,
    rtype: &str,
    criteria: &[Criterion],
    after_id: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<Version>> {
    let mut binds = Vec::new();
    let mut sql = format!(
        "SELECT r.rtype, r.id, r.version, r.last_updated, r.deleted, r.body FROM resource r WHERE {}",
        where_clause(rtype, criteria, &mut binds)
    );
    if let Some(after) = after_id {
        binds.push(after.to_string());
        sql.push_str(&format!(" AND r.id > ${}", binds.len()));
    }
    sql.push_str(&format!(" ORDER BY r.id LIMIT {limit}"));
    let mut q = sqlx::query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter().map(version_from_row).collect()
}

pub(super) async fn count(
    conn: &mut AnyConnection,
    rtype: &str,
    criteria: &[Criterion],
) -> StoreResult<i64> {
    let mut binds = Vec::new();
    let sql = format!(
        "SELECT COUNT(*) AS n FROM resource r WHERE {}",
        where_clause(rtype, criteria, &mut binds)
    );
    let mut q = sqlx::query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    Ok(q.fetch_one(&mut *conn).await?.try_get::<i64, _>("n")?)
}
