//! The gate: the one way to stored resources, scoped to one caller.
//!
//! A [`Gate`] pairs the store with a caller's [`Access`]. Every read path —
//! read, vread, history, search, count, `_include`/`_revinclude`, chain and
//! `_has` sub-selects, conditional matches, compartment pages — runs through
//! a [`View`] that adds the caller's conditions to the query (or, for a
//! single stored version, tests the caller's rules on it), and every write
//! goes through a [`Writer`] that checks the written content. The queries
//! that reach resource rows without a caller (`current`, `version`,
//! `history`, `search::*`, `Tx::put_version`, …) are private to `store`, so
//! an interaction or a handler cannot reach data around the gate: the
//! compiler refuses it. Unlimited access exists only as
//! [`Access::maintenance`], named by the job that needs it.
//!
//! What the caller may not see is reported as [`Found::Absent`], exactly
//! like what does not exist; a deleted resource is [`Found::Deleted`] only
//! for a caller who could see it before it was deleted.

use std::sync::Arc;

use serde_json::Value;
use sqlx::AnyConnection;

use super::search as sq;
use super::{query, HistoryScope, Store, StoreResult, Tx, Version};
use crate::error::{Error, Result};
use crate::policy::scope::Ops;
use crate::policy::Access;
use crate::search::cond::{Cond, Cursor, Query};
use crate::search::index::Rows;

/// The store, scoped to one caller.
#[derive(Clone)]
pub struct Gate {
    store: Store,
    access: Arc<Access>,
}

/// What a lookup of one resource found, as the caller may know it.
#[derive(Debug, Clone)]
pub enum Found {
    /// Never existed, or the caller may not see it.
    Absent,
    /// Deleted (the tombstone version), and the caller could see it.
    Deleted(Version),
    /// The current version, which the caller may see.
    Live(Version),
}

impl Found {
    /// The version found, live or deleted.
    pub fn version(&self) -> Option<&Version> {
        match self {
            Found::Absent => None,
            Found::Deleted(v) | Found::Live(v) => Some(v),
        }
    }

    pub fn live(&self) -> Option<&Version> {
        match self {
            Found::Live(v) => Some(v),
            _ => None,
        }
    }
}

impl Store {
    /// The gate for a caller with `access`.
    pub fn gate(&self, access: Access) -> Gate {
        Gate {
            store: self.clone(),
            access: Arc::new(access),
        }
    }
}

impl Gate {
    pub fn access(&self) -> &Access {
        &self.access
    }

    pub fn dialect(&self) -> super::Dialect {
        self.store.dialect
    }

    /// The store behind the gate, for the audit log's caller-scoped reads
    /// (`store::audit`).
    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    /// A connection for reads.
    pub async fn reader(&self) -> StoreResult<Reader> {
        Ok(Reader {
            conn: self.store.pool.acquire().await?,
            access: Arc::clone(&self.access),
        })
    }

    /// A write transaction.
    pub async fn begin(&self) -> StoreResult<Writer> {
        Ok(Writer {
            tx: self.store.begin().await?,
            access: Arc::clone(&self.access),
        })
    }
}

/// A pooled connection scoped to one caller.
pub struct Reader {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    access: Arc<Access>,
}

impl Reader {
    pub fn view(&mut self) -> View<'_> {
        View {
            conn: &mut self.conn,
            access: &self.access,
            pending: None,
        }
    }
}

/// A write transaction scoped to one caller. Dropped without
/// [`Writer::commit`], it rolls back.
pub struct Writer {
    tx: Tx,
    access: Arc<Access>,
}

/// The reads of one caller, on a pooled connection or inside a [`Writer`].
pub struct View<'a> {
    conn: &'a mut AnyConnection,
    access: &'a Access,
    /// In a write transaction: index rows written but not yet inserted.
    pending: Option<&'a mut super::PendingIndex>,
}

impl View<'_> {
    pub fn access(&self) -> &Access {
        self.access
    }

    /// Inserts the index rows this transaction wrote and has not inserted
    /// yet, so that what follows sees them.
    async fn ready(&mut self) -> StoreResult<()> {
        if let Some(p) = self.pending.as_mut() {
            p.flush(self.conn).await?;
        }
        Ok(())
    }

    /// The current version of `rtype/id`, as far as the caller may see it
    /// for `op` (read: the resource's content decides, in SQL). What is
    /// found is noted for the audit.
    pub async fn current(&mut self, op: Ops, rtype: &str, id: &str) -> Result<Found> {
        let found = self.current_stored(op, rtype, id).await?;
        if let Some(v) = found.version() {
            audited(v);
        }
        Ok(present_found(self.access, found))
    }

    async fn current_stored(&mut self, op: Ops, rtype: &str, id: &str) -> Result<Found> {
        self.ready().await?;
        if self.access.is_unrestricted() {
            return Ok(match query::current(self.conn, rtype, id, false).await? {
                None => Found::Absent,
                Some(v) if v.deleted => Found::Deleted(v),
                Some(v) => Found::Live(v),
            });
        }
        let mut conds = vec![Cond::Ids(vec![id.to_string()])];
        self.access.confine(op, rtype, &mut conds)?;
        if conds.len() == 1 {
            // The caller's rules add no condition on this type: the plain
            // lookup by id answers the same, more cheaply.
            return Ok(match query::current(self.conn, rtype, id, false).await? {
                None => Found::Absent,
                Some(v) if v.deleted => Found::Deleted(v),
                Some(v) => Found::Live(v),
            });
        }
        let q = Query {
            rtype: rtype.to_string(),
            conds,
            sort: Vec::new(),
        };
        if let Some((v, _)) = sq::search(self.conn, &q, None, 1).await?.pop() {
            return Ok(Found::Live(v));
        }
        match query::current(self.conn, rtype, id, false).await? {
            Some(v) if v.deleted => {
                let before = query::last_live(self.conn, rtype, id).await?;
                Ok(if was_visible(self.access, op, before.as_ref()) {
                    Found::Deleted(v)
                } else {
                    Found::Absent
                })
            }
            _ => Ok(Found::Absent),
        }
    }

    /// Version `n` of `rtype/id`: visible when the resource is (now, or
    /// before its deletion) and that version's content is too.
    pub async fn version(&mut self, rtype: &str, id: &str, n: i64) -> Result<Found> {
        self.ready().await?;
        if matches!(
            self.current_stored(Ops::READ, rtype, id).await?,
            Found::Absent
        ) {
            return Ok(Found::Absent);
        }
        Ok(match query::version(self.conn, rtype, id, n).await? {
            None => Found::Absent,
            Some(v) if v.deleted => Found::Deleted(v),
            Some(v) if permits_version(self.access, Ops::READ, &v) => {
                Found::Live(present(self.access, v))
            }
            Some(_) => Found::Absent,
        })
    }

    /// History entries, newest first: `(seq, version)`, each one the
    /// caller may read. Type and system history need a rule over the whole
    /// type; instance history, that the resource is visible.
    pub async fn history(
        &mut self,
        scope: &HistoryScope<'_>,
        since: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Option<Vec<(i64, Version)>>> {
        self.ready().await?;
        match scope {
            HistoryScope::System => self.access.check_whole_type(Ops::SEARCH, None)?,
            HistoryScope::Type(t) => self.access.check_whole_type(Ops::SEARCH, Some(t))?,
            HistoryScope::Instance(t, id) => {
                if matches!(self.current_stored(Ops::READ, t, id).await?, Found::Absent) {
                    return Ok(None);
                }
            }
        }
        let rows = query::history(self.conn, scope, since, before, limit).await?;
        Ok(Some(
            rows.into_iter()
                .filter(|(_, v)| v.deleted || permits_version(self.access, Ops::READ, v))
                .inspect(|(_, v)| audited(v))
                .map(|(s, v)| (s, present(self.access, v)))
                .collect(),
        ))
    }

    /// One page of a search, confined to what the caller may see.
    pub async fn search(
        &mut self,
        q: &Query,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<(Version, Vec<crate::search::cond::Bind>)>> {
        self.ready().await?;
        let q = self.confined(q)?;
        let found = sq::search(self.conn, &q, after, limit).await?;
        // A full page's last row is the look-ahead that tells whether a
        // next page exists; it is not shown, so not audited.
        let shown = if found.len() == limit && limit > 1 {
            limit - 1
        } else {
            found.len()
        };
        found.iter().take(shown).for_each(|(v, _)| audited(v));
        Ok(found
            .into_iter()
            .map(|(v, b)| (present(self.access, v), b))
            .collect())
    }

    /// The number of matches the caller may see.
    pub async fn count(&mut self, q: &Query) -> Result<i64> {
        self.ready().await?;
        let q = self.confined(q)?;
        Ok(sq::count(self.conn, &q).await?)
    }

    fn confined(&self, q: &Query) -> Result<Query> {
        let mut q = q.clone();
        self.access.confine(Ops::SEARCH, &q.rtype, &mut q.conds)?;
        Ok(q)
    }

    /// Current resources matching conditional criteria that the caller
    /// may see (at most two are looked at: none, one, or "several").
    pub async fn find(&mut self, rtype: &str, query: &str) -> Result<Vec<Version>> {
        self.ready().await?;
        let conds = crate::search::parse_conditional(rtype, query, "")?;
        let q = Query {
            rtype: rtype.to_string(),
            conds,
            sort: Vec::new(),
        };
        let found = self.search(&q, None, 2).await?;
        Ok(found.into_iter().map(|(v, _)| v).collect())
    }

    /// The current resources of `rtype` among `ids` that the caller may
    /// read (none when it may read no resource of the type).
    pub async fn fetch(&mut self, rtype: &str, ids: &[String]) -> Result<Vec<Version>> {
        self.ready().await?;
        if self.access.check_type(Ops::READ, rtype).is_err() {
            return Ok(Vec::new());
        }
        if self.access.is_unrestricted() {
            let found = sq::fetch_many(self.conn, rtype, ids).await?;
            found.iter().for_each(audited);
            return Ok(found);
        }
        let access = self.access;
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let mut conds = vec![Cond::Ids(chunk.to_vec())];
            self.access.confine(Ops::READ, rtype, &mut conds)?;
            let q = Query {
                rtype: rtype.to_string(),
                conds,
                sort: Vec::new(),
            };
            out.extend(
                sq::search(self.conn, &q, None, chunk.len())
                    .await?
                    .into_iter()
                    .map(|(v, _)| present(access, v)),
            );
        }
        out.iter().for_each(audited);
        Ok(out)
    }

    /// References from resources `(rtype, ids)` (which the caller was
    /// shown) through `params`: `(target_type, target_id)`. Only ids; what
    /// they name is shown only through [`View::fetch`].
    pub async fn references_from(
        &mut self,
        rtype: &str,
        ids: &[String],
        params: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        self.ready().await?;
        Ok(sq::references_from(self.conn, rtype, ids, params, limit).await?)
    }

    /// Ids of resources of `source` referring to `(target_type, ids)`;
    /// shown only through [`View::fetch`].
    pub async fn references_to(
        &mut self,
        source: &str,
        params: Option<&[String]>,
        target_type: &str,
        ids: &[String],
        limit: usize,
    ) -> Result<Vec<String>> {
        self.ready().await?;
        Ok(sq::references_to(self.conn, source, params, target_type, ids, limit).await?)
    }

    /// A page of the compartment of `target`, keeping what the caller may
    /// read.
    pub async fn compartment_page(
        &mut self,
        target: (&str, &str),
        pairs: &[(String, String)],
        since: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<Version>> {
        self.ready().await?;
        // Rows the caller may not read are left out after the query, so a
        // page is read on until `limit` rows are kept or the compartment
        // ends (a page cut short would end the paging early); each further
        // read takes twice as many rows, up to `MAX_COMPARTMENT_CHUNK`.
        let mut kept = Vec::new();
        let mut after = after.map(|(t, i)| (t.to_string(), i.to_string()));
        let mut chunk = limit.max(1);
        loop {
            let from = after.as_ref().map(|(t, i)| (t.as_str(), i.as_str()));
            let rows = sq::compartment_page(self.conn, target, pairs, since, from, chunk).await?;
            let complete = rows.len() < chunk;
            after = rows.last().map(|v| (v.rtype.clone(), v.id.clone()));
            kept.extend(
                rows.into_iter()
                    .filter(|v| permits_version(self.access, Ops::READ, v)),
            );
            if complete || kept.len() >= limit {
                break;
            }
            chunk = (chunk * 2).min(MAX_COMPARTMENT_CHUNK);
        }
        kept.truncate(limit);
        Ok(kept
            .into_iter()
            .inspect(audited)
            .map(|v| present(self.access, v))
            .collect())
    }

    /// The SQL and plan of a search as the caller would run it.
    pub async fn explain(
        &mut self,
        dialect: super::Dialect,
        q: &Query,
        limit: usize,
    ) -> Result<(String, Vec<String>)> {
        self.ready().await?;
        let q = self.confined(q)?;
        Ok(sq::explain(self.conn, dialect, &q, limit).await?)
    }

    /// The plan of a `_revinclude` lookup.
    pub async fn explain_references_to(
        &mut self,
        dialect: super::Dialect,
        source: &str,
        params: Option<&[String]>,
        target_type: &str,
        ids: &[String],
    ) -> Result<(String, Vec<String>)> {
        self.ready().await?;
        Ok(sq::explain_references_to(self.conn, dialect, source, params, target_type, ids).await?)
    }

    /// The plan of the first compartment page.
    pub async fn explain_compartment_page(
        &mut self,
        dialect: super::Dialect,
        target: (&str, &str),
        pairs: &[(String, String)],
        limit: usize,
    ) -> Result<(String, Vec<String>)> {
        self.ready().await?;
        Ok(sq::explain_compartment_page(self.conn, dialect, target, pairs, limit).await?)
    }
}

/// Most compartment rows read at once while filling a page.
const MAX_COMPARTMENT_CHUNK: usize = 1_000;

/// A version as this caller is given it: an insurer's has the elements
/// its policy masks taken out (and is marked SUBSETTED), before any
/// format, `_elements` or `_summary` sees it.
fn present(access: &Access, mut v: Version) -> Version {
    let Some(rules) = access.circle().and_then(|c| c.insurer()) else {
        return v;
    };
    if let Some(body) = v.body.as_deref() {
        v.body = match serde_json::from_str::<Value>(body) {
            Ok(mut r) => {
                rules.mask(&v.rtype, &mut r);
                Some(r.to_string())
            }
            Err(_) => None,
        };
    }
    v
}

fn present_found(access: &Access, f: Found) -> Found {
    match f {
        Found::Live(v) => Found::Live(present(access, v)),
        other => other,
    }
}

/// Notes a version handed to the caller, for the request's AuditEvents.
fn audited(v: &Version) {
    crate::audit::context::read(&v.rtype, &v.id, v.body.as_deref());
}

/// Whether the caller may do `op` on a stored version's content.
fn permits_version(access: &Access, op: Ops, v: &Version) -> bool {
    if access.is_unrestricted() {
        return true;
    }
    match v.body.as_deref().map(serde_json::from_str::<Value>) {
        Some(Ok(body)) => access.permits(op, &v.rtype, &body),
        _ => false,
    }
}

fn was_visible(access: &Access, op: Ops, before: Option<&Version>) -> bool {
    before.is_some_and(|v| permits_version(access, op, v))
}

impl Writer {
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Reads inside the transaction; they see everything it wrote (its
    /// index rows are inserted before the first read).
    pub fn view(&mut self) -> View<'_> {
        let (conn, pending) = self.tx.conn_and_pending();
        View {
            conn,
            access: &self.access,
            pending: Some(pending),
        }
    }

    /// Commits, with the AuditEvents of what was written (in the same
    /// transaction: no write without its audit entry).
    pub async fn commit(mut self) -> StoreResult<()> {
        super::audit::record_writes(&mut self.tx).await?;
        self.tx.commit().await
    }

    /// The transaction, for ehrx's own tables written together with
    /// resources (accounts at sign-up, exchange receipts).
    pub fn own_tables(&mut self) -> &mut AnyConnection {
        self.tx.conn()
    }

    /// Serialises conditional writes on the same criteria
    /// ([`Tx::lock_conditions`]).
    pub async fn lock_conditions(&mut self, criteria: &[String]) -> Result<()> {
        Ok(self.tx.lock_conditions(criteria).await?)
    }

    /// The current version of `rtype/id` for a write (locked where the
    /// database has row locks), as far as the caller may see it.
    pub async fn current_for_write(&mut self, rtype: &str, id: &str) -> Result<Found> {
        let cur = self.tx.current_for_update(rtype, id).await?;
        Ok(match cur {
            None => Found::Absent,
            Some(v) if v.deleted => {
                let before = query::last_live(self.tx.conn(), rtype, id).await?;
                if was_visible(&self.access, Ops::READ, before.as_ref()) {
                    Found::Deleted(v)
                } else {
                    Found::Absent
                }
            }
            Some(v) if permits_version(&self.access, Ops::READ, &v) => Found::Live(v),
            Some(_) => Found::Absent,
        })
    }

    /// Stores `v` as the next version after `prev` (the current version as
    /// [`Writer::current_for_write`] returned it). The caller's rights are
    /// checked here: `op` on the new content, and on what it replaces or
    /// deletes.
    pub async fn put(
        &mut self,
        op: Ops,
        prev: Option<&Version>,
        v: &Version,
        resource: Option<&Value>,
        rows: Rows,
    ) -> Result<()> {
        if v.rtype == "AuditEvent" {
            return Err(Error::MethodNotAllowed(
                "AuditEvents are recorded by the server and cannot be written".into(),
            ));
        }
        self.access.check_type(op, &v.rtype)?;
        if let Some(p) = prev.filter(|p| !p.deleted) {
            if !permits_version(&self.access, op, p) {
                return Err(Error::Forbidden(format!(
                    "{}/{} is outside the granted scopes",
                    p.rtype, p.id
                )));
            }
        }
        match resource {
            Some(r) => self.access.check(op, &v.rtype, r)?,
            None if prev.is_none_or(|p| p.deleted) => {
                return Err(Error::invalid("nothing to store"));
            }
            None => {}
        }
        self.tx.put_version(v, rows).await?;
        super::audit::wrote(op, prev, v);
        Ok(())
    }
}
