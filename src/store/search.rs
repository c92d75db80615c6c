//! The search query builder: one model of search conditions, rendered to
//! SQL that runs unchanged on SQLite and PostgreSQL (placeholders `$n`,
//! text compared bytewise, index tables from `migrations/*/0002_*`).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::query::version_from_row;
use super::{StoreResult, Version};
use crate::search::cond::{Bind, Cond, Cursor, Query, Sort, SortBy, Table, Test};
use crate::search::index::index_text;

struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    fn bind(&mut self, b: Bind) -> String {
        self.binds.push(b);
        format!("${}", self.binds.len())
    }
    fn text(&mut self, s: &str) -> String {
        self.bind(Bind::Text(s.to_string()))
    }
}

/// Sorts after every real text (for a missing ascending key).
const TEXT_HIGH: &str = "\u{10FFFF}";
const REAL_HIGH: f64 = 1e300;

/// A compared value cut as index rows are (see [`index_text`]).
fn indexed(b: &Bind) -> Bind {
    match b {
        Bind::Text(s) => Bind::Text(index_text(s).to_string()),
        other => other.clone(),
    }
}

fn render_test(sql: &mut Sql, alias: &str, t: &Test) -> String {
    let col = |c: &str| format!("{alias}.{c}");
    match t {
        Test::Any => "1 = 1".into(),
        Test::Eq(c, b) => format!("{} = {}", col(c), sql.bind(indexed(b))),
        Test::Ne(c, b) => format!("{} <> {}", col(c), sql.bind(indexed(b))),
        Test::Lt(c, b) => format!("{} < {}", col(c), sql.bind(indexed(b))),
        Test::Le(c, b) => format!("{} <= {}", col(c), sql.bind(indexed(b))),
        Test::Gt(c, b) => format!("{} > {}", col(c), sql.bind(indexed(b))),
        Test::Ge(c, b) => format!("{} >= {}", col(c), sql.bind(indexed(b))),
        Test::Prefix(c, p) => {
            let p = index_text(p);
            let lo = sql.text(p);
            let hi = sql.text(&format!("{p}{TEXT_HIGH}"));
            format!("{} >= {lo} AND {} < {hi}", col(c), col(c))
        }
        Test::Contains(c, p) => {
            let escaped = like_escaped(index_text(p));
            let pat = sql.text(&format!("%{escaped}%"));
            format!("{} LIKE {pat} ESCAPE '\\'", col(c))
        }
        Test::In(c, vals) => {
            let list: Vec<String> = vals.iter().map(|v| sql.text(index_text(v))).collect();
            format!("{} IN ({})", col(c), list.join(", "))
        }
        Test::And(ts) => join_tests(sql, alias, ts, " AND ", "1 = 1"),
        Test::Or(ts) => join_tests(sql, alias, ts, " OR ", "1 = 0"),
    }
}

/// `s` as a literal part of a `LIKE` pattern with `ESCAPE '\'`.
pub(super) fn like_escaped(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Tests joined by `op`; `empty` when there are none.
fn join_tests(sql: &mut Sql, alias: &str, ts: &[Test], op: &str, empty: &str) -> String {
    if ts.is_empty() {
        return empty.into();
    }
    ts.iter()
        .map(|t| format!("({})", render_test(sql, alias, t)))
        .collect::<Vec<_>>()
        .join(op)
}

/// Conditions joined by `op`, each checked per row; `empty` when none.
fn join_conds(
    sql: &mut Sql,
    alias: &str,
    rtype: &str,
    conds: &[Cond],
    depth: usize,
    op: &str,
    empty: &str,
) -> String {
    if conds.is_empty() {
        return empty.into();
    }
    let parts: Vec<String> = conds
        .iter()
        .map(|c| format!("({})", render_cond(sql, alias, rtype, c, depth, true)))
        .collect();
    format!("({})", parts.join(op))
}

/// `alias.id IN (…)`-style predicates for `conds` on resources of `rtype`
/// held in the row alias `alias` (with `alias.rtype` already fixed).
fn render_conds(sql: &mut Sql, alias: &str, rtype: &str, conds: &[Cond], depth: usize) -> String {
    // The most selective condition drives (an `IN` list the database looks
    // rows up by); the others are checked per row with correlated index
    // seeks, so a common code or an open date range never builds a large
    // list.
    let driver = conds
        .iter()
        .enumerate()
        .filter(|(_, c)| rank(c) < 6)
        .min_by_key(|(_, c)| rank(c))
        .map(|(i, _)| i);
    let mut parts = Vec::new();
    for (i, c) in conds.iter().enumerate() {
        parts.push(render_cond(sql, alias, rtype, c, depth, Some(i) != driver));
    }
    if parts.is_empty() {
        "1 = 1".into()
    } else {
        parts.join(" AND ")
    }
}

/// How selective a condition usually is (lower is more selective).
fn rank(c: &Cond) -> u8 {
    fn eq_on(t: &Test, col: &str) -> bool {
        match t {
            Test::Eq(c, _) => *c == col,
            Test::And(ts) => ts.iter().any(|t| eq_on(t, col)),
            Test::Or(ts) => !ts.is_empty() && ts.iter().all(|t| eq_on(t, col)),
            _ => false,
        }
    }
    match c {
        Cond::Ids(_) => 0,
        Cond::RefersTo { .. } => 1,
        Cond::Index { table, test, .. } => match table {
            Table::Reference if eq_on(test, "target_id") || eq_on(test, "url") => 1,
            Table::Token if eq_on(test, "code") => 2,
            Table::String if eq_on(test, "raw") => 2,
            Table::Uri if eq_on(test, "value") => 2,
            Table::String if matches!(test, Test::Prefix(..)) => 3,
            Table::Token | Table::Reference | Table::Uri => 4,
            _ => 5,
        },
        Cond::Composite(_) => 3,
        Cond::Chain { .. } | Cond::Has { .. } => 4,
        Cond::LastUpdated(_) | Cond::Or(_) | Cond::And(_) => 6,
        Cond::Not(_) => 7,
    }
}

fn render_cond(
    sql: &mut Sql,
    alias: &str,
    rtype: &str,
    c: &Cond,
    depth: usize,
    correlated: bool,
) -> String {
    match c {
        Cond::Ids(ids) => {
            let list: Vec<String> = ids.iter().map(|i| sql.text(i)).collect();
            format!("{alias}.id IN ({})", list.join(", "))
        }
        Cond::LastUpdated(t) => format!("({})", render_test(sql, alias, t)),
        // A denied security label: the labelled resources are few, so
        // their ids are listed once per query rather than probed per row.
        Cond::Not(inner) if matches!(&**inner, Cond::Index { table: Table::Token, param, .. } if param == "_security") =>
        {
            format!(
                "{alias}.id NOT IN ({})",
                ids_of(sql, rtype, inner, depth, None)
            )
        }
        Cond::Not(inner) => format!(
            "NOT ({})",
            render_cond(sql, alias, rtype, inner, depth, true)
        ),
        Cond::Or(alts) => join_conds(sql, alias, rtype, alts, depth, " OR ", "1 = 0"),
        Cond::And(all) => join_conds(sql, alias, rtype, all, depth, " AND ", "1 = 1"),
        _ if correlated => format!("EXISTS ({})", ids_of(sql, rtype, c, depth, Some(alias))),
        _ => format!("{alias}.id IN ({})", ids_of(sql, rtype, c, depth, None)),
    }
}

/// A `SELECT id …` of the resources of `rtype` that meet `c`; with
/// `corr`, a correlated `SELECT` for the row `corr` (used under `EXISTS`).
fn ids_of(sql: &mut Sql, rtype: &str, c: &Cond, depth: usize, corr: Option<&str>) -> String {
    let a = format!("x{depth}");
    // `{a}.rtype = …` (and `{a}.id = corr.id` when correlated).
    let owner = |sql: &mut Sql, a: &str| match corr {
        Some(r) => format!("{a}.rtype = {r}.rtype AND {a}.id = {r}.id"),
        None => format!("{a}.rtype = {}", sql.text(rtype)),
    };
    match c {
        Cond::Index { table, param, test } => {
            if corr.is_none() {
                if let Test::Or(alts) = test {
                    // One index range per value (`code=a,b,c`, 100 names in
                    // a chain): a union of seeks, not a scan testing each.
                    let arms: Vec<String> = alts
                        .iter()
                        .map(|t| {
                            let rt = sql.text(rtype);
                            let p = sql.text(param);
                            let t = render_test(sql, &a, t);
                            format!(
                                "SELECT {a}.id FROM {} {a} WHERE {a}.rtype = {rt} AND {a}.param = {p} AND ({t})",
                                table.name()
                            )
                        })
                        .collect();
                    if !arms.is_empty() {
                        return arms.join(" UNION ALL ");
                    }
                }
            }
            let own = owner(sql, &a);
            let p = sql.text(param);
            let t = render_test(sql, &a, test);
            if corr.is_some() && matches!(table, Table::Date | Table::Number | Table::Quantity) {
                // A range test checked on the rows of one resource: wrapped
                // so that no planner turns it into a range scan of the
                // parameter's whole index.
                return format!(
                    "SELECT {a}.id FROM {} {a} WHERE {own} AND {a}.param = {p} \
                     AND (CASE WHEN {t} THEN 1 ELSE 0 END) = 1",
                    table.name()
                );
            }
            format!(
                "SELECT {a}.id FROM {} {a} WHERE {own} AND {a}.param = {p} AND ({t})",
                table.name()
            )
        }
        Cond::RefersTo {
            params,
            target_type,
            target_ids,
        } => {
            let own = owner(sql, &a);
            let mut ps: Vec<String> = params.iter().map(|p| sql.text(p)).collect();
            if ps.is_empty() || target_ids.is_empty() {
                // No parameter or no target can place anything there:
                // matches nothing.
                ps = vec!["NULL".into()];
            }
            let tids: Vec<String> = target_ids.iter().map(|t| sql.text(t)).collect();
            let tid = match tids.len() {
                0 => "= NULL".to_string(),
                1 => format!("= {}", tids[0]),
                _ => format!("IN ({})", tids.join(", ")),
            };
            let tt = sql.text(target_type);
            format!(
                "SELECT {a}.id FROM idx_reference {a} WHERE {own} AND {a}.param IN ({}) \
                 AND {a}.target_id {tid} AND {a}.target_type = {tt}",
                ps.join(", ")
            )
        }
        Cond::Composite(parts) => {
            let own = owner(sql, &format!("{a}c0"));
            let mut from = String::new();
            let mut wheres = Vec::new();
            for (n, (table, param, test)) in parts.iter().enumerate() {
                let an = format!("{a}c{n}");
                let p = sql.text(param);
                let t = render_test(sql, &an, test);
                if n == 0 {
                    from = format!("{} {an}", table.name());
                    wheres.push(format!("{own} AND {an}.param = {p} AND ({t})"));
                } else {
                    from.push_str(&format!(
                        " JOIN {} {an} ON {an}.rtype = {a}c0.rtype AND {an}.id = {a}c0.id \
                         AND {an}.grp = {a}c0.grp AND {an}.param = {p} AND ({t})",
                        table.name()
                    ));
                }
            }
            format!("SELECT {a}c0.id FROM {from} WHERE {}", wheres.join(" AND "))
        }
        Cond::Chain {
            param,
            types,
            inner,
        } => {
            let own = owner(sql, &a);
            let p = sql.text(param);
            let mut alts = Vec::new();
            for t in types {
                let r2 = format!("r{}", depth + 1);
                let tt = sql.text(t);
                let tt2 = sql.text(t);
                let w = render_conds(sql, &r2, t, inner, depth + 1);
                alts.push(format!(
                    "({a}.target_type = {tt} AND {a}.target_id IN (SELECT {r2}.id FROM resource {r2} \
                     WHERE {r2}.rtype = {tt2} AND {r2}.deleted = 0 AND {w}))"
                ));
            }
            let alts = if alts.is_empty() {
                "1 = 0".to_string()
            } else {
                alts.join(" OR ")
            };
            format!(
                "SELECT {a}.id FROM idx_reference {a} WHERE {own} AND {a}.param = {p} AND ({alts})"
            )
        }
        Cond::Has {
            source,
            param,
            inner,
        } => {
            let r2 = format!("r{}", depth + 1);
            let st = sql.text(source);
            let p = sql.text(param);
            let target = match corr {
                Some(r) => format!("{a}.target_type = {r}.rtype AND {a}.target_id = {r}.id"),
                None => format!("{a}.target_type = {}", sql.text(rtype)),
            };
            let st2 = sql.text(source);
            let w = render_conds(sql, &r2, source, inner, depth + 1);
            format!(
                "SELECT {a}.target_id FROM idx_reference {a} WHERE {a}.rtype = {st} AND {a}.param = {p} \
                 AND {target} AND {a}.id IN (SELECT {r2}.id FROM resource {r2} \
                 WHERE {r2}.rtype = {st2} AND {r2}.deleted = 0 AND {w})"
            )
        }
        // Resource-row conditions as an id set.
        other => {
            let r2 = format!("r{}", depth + 1);
            let own = match corr {
                Some(r) => format!("{r2}.rtype = {r}.rtype AND {r2}.id = {r}.id"),
                None => format!("{r2}.rtype = {}", sql.text(rtype)),
            };
            let w = render_cond(sql, &r2, rtype, other, depth + 1, false);
            format!("SELECT {r2}.id FROM resource {r2} WHERE {own} AND {w}")
        }
    }
}

/// The SQL expression of one sort key for the row `r`, missing values last.
fn sort_expr(sql: &mut Sql, s: &Sort) -> String {
    match &s.by {
        SortBy::Id => "r.id".into(),
        SortBy::LastUpdated => "r.last_updated".into(),
        SortBy::Index { table, param } => {
            let (col, numeric) = table.sort_column();
            let agg = if s.descending { "MAX" } else { "MIN" };
            let p = sql.text(param);
            let missing = match (numeric, s.descending) {
                (true, false) => REAL_HIGH.to_string(),
                (true, true) => (-REAL_HIGH).to_string(),
                (false, false) => format!("'{TEXT_HIGH}'"),
                (false, true) => "''".into(),
            };
            format!(
                "COALESCE((SELECT {agg}(s.{col}) FROM {} s WHERE s.rtype = r.rtype AND s.id = r.id \
                 AND s.param = {p}), {missing})",
                table.name()
            )
        }
    }
}

fn build(q: &Query, after: Option<&Cursor>, limit: Option<usize>, count: bool) -> Sql {
    let mut sql = Sql {
        text: String::new(),
        binds: Vec::new(),
    };
    let rt = sql.text(&q.rtype);
    let w = render_conds(&mut sql, "r", &q.rtype, &q.conds, 0);
    if count {
        sql.text = format!(
            "SELECT COUNT(*) AS n FROM resource r WHERE r.rtype = {rt} AND r.deleted = 0 AND {w}"
        );
        return sql;
    }
    let keys: Vec<String> = q.sort.iter().map(|s| sort_expr(&mut sql, s)).collect();
    let mut select = String::from("r.rtype, r.id, r.version, r.last_updated, r.deleted, r.body");
    for (i, k) in keys.iter().enumerate() {
        select.push_str(&format!(", {k} AS k{i}"));
    }
    let inner =
        format!("SELECT {select} FROM resource r WHERE r.rtype = {rt} AND r.deleted = 0 AND {w}");
    let mut outer = format!("SELECT * FROM ({inner}) q");
    if let Some((values, id)) = after {
        // (k0, k1, …, id) strictly after the cursor in sort order.
        let mut alts = Vec::new();
        for i in 0..=keys.len() {
            let mut eqs = Vec::new();
            for (j, v) in values.iter().enumerate().take(i) {
                eqs.push(format!("q.k{j} = {}", sql.bind(v.clone())));
            }
            let last = if i < keys.len() {
                let op = if q.sort[i].descending { "<" } else { ">" };
                match values.get(i) {
                    Some(v) => format!("q.k{i} {op} {}", sql.bind(v.clone())),
                    None => "1 = 0".into(),
                }
            } else {
                format!("q.id > {}", sql.text(id))
            };
            eqs.push(last);
            alts.push(format!("({})", eqs.join(" AND ")));
        }
        outer.push_str(&format!(" WHERE {}", alts.join(" OR ")));
    }
    let mut order: Vec<String> = q
        .sort
        .iter()
        .enumerate()
        .map(|(i, s)| format!("q.k{i}{}", if s.descending { " DESC" } else { "" }))
        .collect();
    order.push("q.id".into());
    outer.push_str(&format!(" ORDER BY {}", order.join(", ")));
    if let Some(n) = limit {
        outer.push_str(&format!(" LIMIT {n}"));
    }
    sql.text = outer;
    sql
}

fn bound<'q>(
    text: &'q str,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut q = sqlx::query(text);
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s.as_str()),
            Bind::Real(f) => q.bind(*f),
        };
    }
    q
}

/// One page of matches, each with its sort values (for the next cursor).
pub async fn search(
    conn: &mut AnyConnection,
    q: &Query,
    after: Option<&Cursor>,
    limit: usize,
) -> StoreResult<Vec<(Version, Vec<Bind>)>> {
    let sql = build(q, after, Some(limit), false);
    let rows = bound(&sql.text, &sql.binds).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| Ok((version_from_row(r)?, sort_values(r, q)?)))
        .collect()
}

fn sort_values(r: &AnyRow, q: &Query) -> StoreResult<Vec<Bind>> {
    let mut out = Vec::new();
    for (i, s) in q.sort.iter().enumerate() {
        let name = format!("k{i}");
        let numeric = matches!(&s.by, SortBy::Index { table, .. } if table.sort_column().1);
        out.push(if numeric {
            Bind::Real(r.try_get::<f64, _>(name.as_str())?)
        } else {
            Bind::Text(r.try_get::<String, _>(name.as_str())?)
        });
    }
    Ok(out)
}

/// Number of matches.
pub async fn count(conn: &mut AnyConnection, q: &Query) -> StoreResult<i64> {
    let sql = build(q, None, None, true);
    Ok(bound(&sql.text, &sql.binds)
        .fetch_one(&mut *conn)
        .await?
        .try_get::<i64, _>("n")?)
}

/// The query plan of a search, as the database reports it (SQLite
/// `EXPLAIN QUERY PLAN`, PostgreSQL `EXPLAIN ANALYZE`).
pub async fn explain(
    conn: &mut AnyConnection,
    dialect: super::Dialect,
    q: &Query,
    limit: usize,
) -> StoreResult<(String, Vec<String>)> {
    let sql = build(q, None, Some(limit), false);
    let plan = explain_raw(conn, dialect, &sql).await?;
    Ok((sql.text, plan))
}

async fn explain_raw(
    conn: &mut AnyConnection,
    dialect: super::Dialect,
    sql: &Sql,
) -> StoreResult<Vec<String>> {
    let prefix = match dialect {
        super::Dialect::Sqlite => "EXPLAIN QUERY PLAN ",
        super::Dialect::Postgres => "EXPLAIN ANALYZE ",
    };
    let rows = bound(&format!("{prefix}{}", sql.text), &sql.binds)
        .fetch_all(&mut *conn)
        .await?;
    let mut plan = Vec::new();
    for r in rows {
        plan.push(match dialect {
            super::Dialect::Sqlite => {
                let id: i64 = r.try_get(0)?;
                let parent: i64 = r.try_get(1)?;
                let detail: String = r.try_get(3)?;
                format!("{id:>3} {parent:>3}  {detail}")
            }
            super::Dialect::Postgres => r.try_get::<String, _>(0)?,
        });
    }
    Ok(plan)
}

/// References from resources `(rtype, ids)` through `params` (`None`: all):
/// `(target_type, target_id)`, at most `limit`.
pub async fn references_from(
    conn: &mut AnyConnection,
    rtype: &str,
    ids: &[String],
    params: Option<&[String]>,
    limit: usize,
) -> StoreResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql {
            text: String::new(),
            binds: Vec::new(),
        };
        let rt = sql.text(rtype);
        let list: Vec<String> = chunk.iter().map(|i| sql.text(i)).collect();
        let mut text = format!(
            "SELECT DISTINCT x.target_type, x.target_id FROM idx_reference x WHERE x.rtype = {rt} \
             AND x.id IN ({}) AND x.target_id <> ''",
            list.join(", ")
        );
        if let Some(ps) = params {
            let pl: Vec<String> = ps.iter().map(|p| sql.text(p)).collect();
            text.push_str(&format!(" AND x.param IN ({})", pl.join(", ")));
        }
        sql.text = text;
        let room = limit.saturating_sub(out.len());
        if room == 0 {
            break;
        }
        sql.text.push_str(&format!(" LIMIT {room}"));
        let rows = bound(&sql.text, &sql.binds).fetch_all(&mut *conn).await?;
        for r in rows {
            out.push((r.try_get("target_type")?, r.try_get("target_id")?));
        }
    }
    Ok(out)
}

fn references_to_sql(
    source: &str,
    params: Option<&[String]>,
    target_type: &str,
    ids: &[String],
) -> Sql {
    let mut sql = Sql {
        text: String::new(),
        binds: Vec::new(),
    };
    // No DISTINCT (the caller removes duplicates): sorting for it would
    // tempt the planner away from the (rtype, param, target_id) index.
    let st = sql.text(source);
    let filter = match params {
        Some(ps) => {
            let pl: Vec<String> = ps.iter().map(|p| sql.text(p)).collect();
            format!(" AND x.param IN ({})", pl.join(", "))
        }
        None => String::new(),
    };
    let list: Vec<String> = ids.iter().map(|i| sql.text(i)).collect();
    let tt = sql.text(target_type);
    sql.text = format!(
        "SELECT x.id FROM idx_reference x WHERE x.rtype = {st}{filter} AND x.target_id IN ({}) \
         AND x.target_type = {tt}",
        list.join(", ")
    );
    sql
}

/// Resources of `source` type that reference `(target_type, ids)` through
/// `params` (`None`: any reference parameter): their ids, at most `limit`
/// rows read.
pub async fn references_to(
    conn: &mut AnyConnection,
    source: &str,
    params: Option<&[String]>,
    target_type: &str,
    ids: &[String],
    limit: usize,
) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let room = limit.saturating_sub(out.len());
        if room == 0 {
            break;
        }
        let mut sql = references_to_sql(source, params, target_type, chunk);
        sql.text.push_str(&format!(" LIMIT {room}"));
        let rows = bound(&sql.text, &sql.binds).fetch_all(&mut *conn).await?;
        for r in rows {
            out.push(r.try_get::<String, _>("id")?);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The plan of the `_revinclude` lookup for a page of `ids`.
pub async fn explain_references_to(
    conn: &mut AnyConnection,
    dialect: super::Dialect,
    source: &str,
    params: Option<&[String]>,
    target_type: &str,
    ids: &[String],
) -> StoreResult<(String, Vec<String>)> {
    let sql = references_to_sql(source, params, target_type, ids);
    let plan = explain_raw(conn, dialect, &sql).await?;
    Ok((sql.text, plan))
}

fn compartment_sql(
    target: (&str, &str),
    pairs: &[(String, String)],
    since: Option<&str>,
    after: Option<(&str, &str)>,
    limit: usize,
) -> Sql {
    let mut sql = Sql {
        text: String::new(),
        binds: Vec::new(),
    };
    let tt = sql.text(target.0);
    let tid = sql.text(target.1);
    let list: Vec<String> = pairs
        .iter()
        .map(|(t, p)| sql.text(&format!("{t}|{p}")))
        .collect();
    let list = if list.is_empty() {
        "NULL".to_string()
    } else {
        list.join(", ")
    };
    let mut inner = format!(
        "SELECT DISTINCT x.rtype AS t, x.id AS i FROM idx_reference x \
         WHERE x.target_type = {tt} AND x.target_id = {tid} AND x.rtype || '|' || x.param IN ({list})"
    );
    if let Some((t, i)) = after {
        let t1 = sql.text(t);
        let t2 = sql.text(t);
        let i1 = sql.text(i);
        inner.push_str(&format!(
            " AND (x.rtype > {t1} OR (x.rtype = {t2} AND x.id > {i1}))"
        ));
    }
    if since.is_none() {
        // Index rows exist only for current, non-deleted resources, so the
        // page can be cut before any resource row is read.
        inner.push_str(&format!(" ORDER BY t, i LIMIT {limit}"));
    }
    let mut text = format!(
        "SELECT r.rtype, r.id, r.version, r.last_updated, r.deleted, r.body FROM ({inner}) m \
         JOIN resource r ON r.rtype = m.t AND r.id = m.i WHERE r.deleted = 0"
    );
    if let Some(s) = since {
        text.push_str(&format!(" AND r.last_updated >= {}", sql.text(s)));
    }
    text.push_str(&format!(" ORDER BY r.rtype, r.id LIMIT {limit}"));
    sql.text = text;
    sql
}

/// Resources in the compartment of `target` (`(type, id)`): those that
/// refer to it through one of the `(type, param)` pairs, in (type, id)
/// order after `after`.
pub async fn compartment_page(
    conn: &mut AnyConnection,
    target: (&str, &str),
    pairs: &[(String, String)],
    since: Option<&str>,
    after: Option<(&str, &str)>,
    limit: usize,
) -> StoreResult<Vec<Version>> {
    let sql = compartment_sql(target, pairs, since, after, limit);
    let rows = bound(&sql.text, &sql.binds).fetch_all(&mut *conn).await?;
    rows.iter().map(version_from_row).collect()
}

/// The plan of the first [`compartment_page`].
pub async fn explain_compartment_page(
    conn: &mut AnyConnection,
    dialect: super::Dialect,
    target: (&str, &str),
    pairs: &[(String, String)],
    limit: usize,
) -> StoreResult<(String, Vec<String>)> {
    let sql = compartment_sql(target, pairs, None, None, limit);
    let plan = explain_raw(conn, dialect, &sql).await?;
    Ok((sql.text, plan))
}

/// Current, non-deleted resources by type and ids.
pub async fn fetch_many(
    conn: &mut AnyConnection,
    rtype: &str,
    ids: &[String],
) -> StoreResult<Vec<Version>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql {
            text: String::new(),
            binds: Vec::new(),
        };
        let rt = sql.text(rtype);
        let list: Vec<String> = chunk.iter().map(|i| sql.text(i)).collect();
        sql.text = format!(
            "SELECT rtype, id, version, last_updated, deleted, body FROM resource \
             WHERE rtype = {rt} AND id IN ({}) AND deleted = 0 ORDER BY id",
            list.join(", ")
        );
        let rows = bound(&sql.text, &sql.binds).fetch_all(&mut *conn).await?;
        for r in rows {
            out.push(version_from_row(&r)?);
        }
    }
    Ok(out)
}
