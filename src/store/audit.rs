//! The audit log's persistence: appending entries (in a write's own
//! transaction, or in batches by one writer task), the Merkle tree kept in
//! memory for proofs, signed checkpoints, witnesses, retention, and the
//! caller-scoped search of AuditEvents.
//!
//! Positions: every appender takes the next positions from the
//! `audit_head` row in its own transaction (on PostgreSQL the `UPDATE`
//! locks the row until the commit; SQLite has one writer at a time, and the
//! batch writer's one-statement transaction is refused if the row moved
//! since it last read it), so the entries committed are always a gap-free
//! prefix, in commit order.
//!
//! Group commit: events of reads (and refusals, and the SMART and exchange
//! events) are sent to one writer task, which appends whatever has queued
//! up in one transaction and then tells every sender; a response waits for
//! its batch. If the append fails, every sender of that batch gets the
//! error and its request is answered 503 with nothing else.
//!
//! Writes: on PostgreSQL a write's events are appended in the write's own
//! transaction. On SQLite the log is a file of its own (see [`super`]), and
//! a transaction is atomic across two files only outside WAL mode, so a
//! write's events go into `audit_outbox` in the write's transaction; the
//! writer task, woken by the commit, appends them (before any event queued
//! after them) and moves `audit_head.drained` to the newest outbox row in
//! the same transaction, so each is appended exactly once, also after a
//! crash between the two files' commits. The next write clears the rows
//! appended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, Executor, Row};
use tokio::sync::{mpsc, oneshot, Mutex, OnceCell};

use super::{Dialect, Gate, Store, StoreError, StoreResult};
use crate::audit::checkpoint::{self, Checkpoint};
use crate::audit::event::{self, Columns, Event};
use crate::audit::tree::{self, Tree};
use crate::audit::verify::{Report, Row as VerifyRow, Verifier};
use crate::error::{Error, Result};
use crate::policy::scope::Ops;

/// Most events appended in one transaction.
const MAX_BATCH: usize = 2_000;
/// Rows bound per INSERT statement.
const ROWS_PER_INSERT: usize = 100;
/// How often an idle writer looks for entries another process's writes
/// left in `audit_outbox`.
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// Rows read per query when catching up or verifying.
const READ_CHUNK: i64 = 5_000;

/// The audit log of one store.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    queue: mpsc::Sender<Job>,
    tree: Mutex<Tree>,
    /// The checkpoint origin line (the server's base URL).
    origin: String,
    key: OnceCell<Key>,
}

/// The checkpoint signing key.
#[derive(Clone)]
struct Key {
    id: String,
    private_pem: String,
    public_pem: String,
}

struct Job {
    events: Vec<Prepared>,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

impl AuditLog {
    /// Starts the log's writer task (and, with a non-zero interval, its
    /// checkpointer, which also applies retention: `retention_days`, 0 for
    /// none) on `store`.
    pub fn start(
        store: Store,
        origin: String,
        checkpoint_interval: Duration,
        retention_days: u64,
    ) -> AuditLog {
        let (tx, rx) = mpsc::channel(16_384);
        let log = AuditLog {
            inner: Arc::new(Inner {
                store: store.clone(),
                queue: tx,
                tree: Mutex::new(Tree::new()),
                origin,
                key: OnceCell::new(),
            }),
        };
        tokio::spawn(writer(store, rx));
        if !checkpoint_interval.is_zero() {
            let weak = Arc::downgrade(&log.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(checkpoint_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { break };
                    let log = AuditLog { inner };
                    if log.inner.store.pool.is_closed() {
                        break;
                    }
                    if let Err(e) = log.checkpoint().await {
                        crate::metrics::audit_failure("checkpoint");
                        tracing::warn!(error = %e, "audit checkpoint failed; retrying");
                    }
                    if retention_days > 0 {
                        let cutoff = retention_cutoff(retention_days);
                        if let Err(e) = prune(&log.inner.store, &cutoff).await {
                            tracing::warn!(error = %e, "audit retention failed; retrying");
                        }
                    }
                }
            });
        }
        log
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Appends `events` and returns once they are committed (group commit).
    pub async fn record(&self, events: Vec<Event>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.iter().map(prepare).collect();
        let (done, wait) = oneshot::channel();
        let queued = Instant::now();
        self.inner
            .queue
            .send(Job { events, done })
            .await
            .map_err(|_| StoreError::Audit("the audit writer has stopped".into()))?;
        let result = wait
            .await
            .map_err(|_| StoreError::Audit("the audit writer has stopped".into()))?;
        crate::metrics::audit_wait(queued.elapsed());
        result.map_err(StoreError::Audit)
    }

    /// The tree, brought up to date with the entries committed since.
    async fn tree(&self) -> StoreResult<tokio::sync::MutexGuard<'_, Tree>> {
        let mut tree = self.inner.tree.lock().await;
        let mut conn = self.inner.store.audit_pool.acquire().await?;
        loop {
            let from = tree.len() as i64;
            let rows = sqlx::query(
                "SELECT seq, digest FROM audit_entry WHERE seq >= $1 ORDER BY seq LIMIT $2",
            )
            .bind(from)
            .bind(READ_CHUNK)
            .fetch_all(&mut *conn)
            .await?;
            let n = rows.len() as i64;
            for r in rows {
                let seq: i64 = r.try_get(0)?;
                let digest: String = r.try_get(1)?;
                let leaf: Option<[u8; 32]> =
                    hex::decode(&digest).ok().and_then(|d| d.try_into().ok());
                match leaf {
                    Some(l) if seq == tree.len() as i64 => tree.push(l),
                    _ => {
                        tracing::error!(
                            entry = seq,
                            "the audit log is not contiguous here; run `ehrx audit verify`"
                        );
                        return Ok(tree);
                    }
                }
            }
            if n < READ_CHUNK {
                return Ok(tree);
            }
        }
    }

    async fn key(&self) -> StoreResult<&Key> {
        self.inner
            .key
            .get_or_try_init(|| load_or_create_key(&self.inner.store))
            .await
    }

    /// The published half of the audit key: `(key id, PEM)`.
    pub async fn public_key(&self) -> StoreResult<(String, String)> {
        let k = self.key().await?;
        Ok((k.id.clone(), k.public_pem.clone()))
    }

    /// Signs and stores a checkpoint of the log as it is now, unless the
    /// newest one already covers it. Returns the newest checkpoint.
    pub async fn checkpoint(&self) -> StoreResult<Option<Checkpoint>> {
        let latest = latest_checkpoint(&self.inner.store).await?;
        let (size, root) = {
            let tree = self.tree().await?;
            (tree.len(), tree.root())
        };
        if size == 0 || latest.as_ref().is_some_and(|c| c.size >= size) {
            return Ok(latest);
        }
        let key = self.key().await?;
        let c = checkpoint::sign(
            &key.private_pem,
            &key.id,
            &self.inner.origin,
            size,
            &root,
            event::now(),
        )
        .map_err(StoreError::Audit)?;
        let mut conn = self.inner.store.pool.acquire().await?;
        sqlx::query(
            "INSERT INTO audit_checkpoint (size, root, created, note, signature, key_id) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (size) DO NOTHING",
        )
        .bind(c.size as i64)
        .bind(&c.root)
        .bind(&c.created)
        .bind(c.note())
        .bind(&c.signature)
        .bind(&c.key_id)
        .execute(&mut *conn)
        .await?;
        drop(conn);
        crate::metrics::audit_checkpoint(c.size);
        latest_checkpoint(&self.inner.store).await
    }

    /// The newest signed checkpoint.
    pub async fn latest_checkpoint(&self) -> StoreResult<Option<Checkpoint>> {
        latest_checkpoint(&self.inner.store).await
    }

    /// Notes that `witness` fetched the checkpoint of `size`.
    pub async fn witnessed(&self, witness: &str, size: u64) -> StoreResult<()> {
        let mut conn = self.inner.store.pool.acquire().await?;
        sqlx::query(
            "INSERT INTO audit_witness (witness, size, fetched) VALUES ($1, $2, $3) \
             ON CONFLICT (witness, size) DO NOTHING",
        )
        .bind(witness)
        .bind(size as i64)
        .bind(event::now())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries:
    /// `(leaf data, root, audit path)`.
    pub async fn inclusion(
        &self,
        index: u64,
        size: u64,
    ) -> StoreResult<Option<([u8; 32], [u8; 32], Vec<[u8; 32]>)>> {
        let tree = self.tree().await?;
        let (Some(leaf), Some(root), Some(path)) = (
            tree.leaf(index),
            tree.root_at(size),
            tree.inclusion(index, size),
        ) else {
            return Ok(None);
        };
        Ok(Some((leaf, root, path)))
    }

    /// The consistency proof from `old` to `new` entries, with both roots.
    pub async fn consistency(
        &self,
        old: u64,
        new: u64,
    ) -> StoreResult<Option<([u8; 32], [u8; 32], Vec<[u8; 32]>)>> {
        let tree = self.tree().await?;
        let (Some(a), Some(b), Some(path)) = (
            tree.root_at(old),
            tree.root_at(new),
            tree.consistency(old, new),
        ) else {
            return Ok(None);
        };
        Ok(Some((a, b, path)))
    }

    /// The current size of the log (entries committed).
    pub async fn size(&self) -> StoreResult<u64> {
        Ok(self.tree().await?.len())
    }
}

/// The writer task: appends what has queued up, one transaction per batch.
///
/// Under load it keeps one connection of the log's pool for itself, so that
/// a batch never queues behind the reads it is holding up; it gives the
/// connection back whenever nothing is waiting (an idle server, a store
/// about to close). Entries writes left in `audit_outbox` go first: when
/// it starts (a crash may have left some) and whenever a write's commit
/// wakes it.
async fn writer(store: Store, mut rx: mpsc::Receiver<Job>) {
    let outbox = Arc::clone(&store.outbox);
    outbox
        .running
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut w = Appender {
        store,
        held: None,
        head: None,
    };
    let mut outbox_due = true;
    loop {
        let mut jobs = Vec::new();
        // A write's wake-up counts even while reads keep the queue busy.
        if futures_util::FutureExt::now_or_never(outbox.notify.notified()).is_some() {
            outbox_due = true;
        }
        if !outbox_due {
            tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(j) => jobs.push(j),
                    None => break,
                },
                _ = outbox.notify.notified() => outbox_due = true,
                // Another process's writes wake only its own writer.
                _ = tokio::time::sleep(OUTBOX_POLL) => outbox_due = true,
            }
        }
        let mut n: usize = jobs.iter().map(|j| j.events.len()).sum();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.events.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut events: Vec<Prepared> = Vec::with_capacity(n);
        for j in &mut jobs {
            events.append(&mut j.events);
        }
        let result = w.append(events, outbox_due).await;
        match &result {
            Ok(appended) => {
                crate::metrics::audit_batch(
                    n + appended.outbox,
                    jobs.len(),
                    started.elapsed(),
                    true,
                );
                outbox_due = appended.outbox_left;
            }
            Err(_) => {
                crate::metrics::audit_batch(n, jobs.len(), started.elapsed(), false);
                // A connection that failed (perhaps still inside its
                // transaction) is closed, not given back.
                if let Some(conn) = w.held.take() {
                    let _ = conn.close().await;
                }
                w.head = None;
            }
        }
        let result = result.map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, "the audit log could not be written");
            e.to_string()
        });
        if result.is_err() && jobs.is_empty() {
            // Only the outbox was due: try again shortly, not at once.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for j in jobs {
            let _ = j.done.send(result.clone());
        }
        if rx.is_empty() {
            w.held = None;
        }
        if w.store.audit_pool.is_closed() {
            break;
        }
    }
    outbox
        .running
        .store(false, std::sync::atomic::Ordering::Relaxed);
}

/// The batch writer's connection and what it knows of the log.
struct Appender {
    store: Store,
    held: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// The log's `(size, drained)` as this writer last left it (SQLite).
    head: Option<(i64, i64)>,
}

/// What one batch appended.
struct Appended {
    /// Entries taken from `audit_outbox`.
    outbox: usize,
    /// `audit_outbox` may hold more than one batch took.
    outbox_left: bool,
}

impl Appender {
    /// Appends one batch in its own transaction on the writer's connection
    /// (taken from the log's pool if it has none): with `outbox`, the
    /// entries writes left in `audit_outbox` first, then `events`.
    ///
    /// On SQLite the whole transaction is one round trip to the connection's
    /// worker thread: the writer expects the log's size it left, and the
    /// batch is refused by the database if another appender (another
    /// process) has moved it since — then the writer reads the size and
    /// tries once more.
    async fn append(&mut self, events: Vec<Prepared>, outbox: bool) -> StoreResult<Appended> {
        let store = self.store.clone();
        let conn = match &mut self.held {
            Some(c) => c,
            None => self.held.insert(store.audit_pool.acquire().await?),
        };
        match store.dialect {
            Dialect::Sqlite => {
                let (mut at, mut drained) = match self.head {
                    Some(h) => h,
                    None => head(conn).await?,
                };
                self.head = None;
                let mut taken = if outbox {
                    let mut main = store.pool.acquire().await?;
                    read_outbox(&mut main, drained).await?
                } else {
                    Vec::new()
                };
                if taken.is_empty() && events.is_empty() {
                    self.head = Some((at, drained));
                    return Ok(Appended {
                        outbox: 0,
                        outbox_left: false,
                    });
                }
                let mut retried = false;
                loop {
                    let to = taken.last().map_or(drained, |(id, _)| *id);
                    let all: Vec<&Prepared> =
                        taken.iter().map(|(_, p)| p).chain(events.iter()).collect();
                    match append_in_one_trip(conn, at, to, &all).await {
                        Ok(()) => {
                            self.head = Some((at + all.len() as i64, to));
                            store.outbox.drained.send_if_modified(|d| {
                                let moved = to > *d;
                                *d = (*d).max(to);
                                moved
                            });
                            return Ok(Appended {
                                outbox: taken.len(),
                                outbox_left: taken.len() >= MAX_BATCH,
                            });
                        }
                        Err(e) => {
                            let _ = conn.execute("ROLLBACK").await;
                            let (now, now_drained) = head(conn).await?;
                            if now == at || retried {
                                return Err(e);
                            }
                            retried = true;
                            at = now;
                            if outbox && now_drained != drained {
                                let mut main = store.pool.acquire().await?;
                                taken = read_outbox(&mut main, now_drained).await?;
                            }
                            drained = now_drained;
                        }
                    }
                }
            }
            Dialect::Postgres => {
                let mut tx = sqlx::Connection::begin(&mut **conn).await?;
                let mut taken = Vec::new();
                if outbox {
                    let drained: Option<i64> = sqlx::query_scalar(
                        "SELECT drained FROM audit_head WHERE id = 1 FOR UPDATE",
                    )
                    .fetch_optional(&mut *tx)
                    .await?;
                    taken = read_outbox(&mut tx, drained.unwrap_or(0)).await?;
                }
                let all: Vec<&Prepared> =
                    taken.iter().map(|(_, p)| p).chain(events.iter()).collect();
                append(&mut tx, &all).await?;
                if let Some((to, _)) = taken.last() {
                    sqlx::query("UPDATE audit_head SET drained = $1 WHERE id = 1")
                        .bind(*to)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM audit_outbox WHERE id <= $1")
                        .bind(*to)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(Appended {
                    outbox: taken.len(),
                    outbox_left: taken.len() >= MAX_BATCH,
                })
            }
        }
    }
}

/// The entries in `audit_outbox` after row `drained`, oldest first (at most
/// one batch).
async fn read_outbox(conn: &mut AnyConnection, drained: i64) -> StoreResult<Vec<(i64, Prepared)>> {
    let rows = sqlx::query(
        "SELECT id, body, recorded, type, subtype, action, outcome, patient, agent, client, \
         entity, purpose FROM audit_outbox WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(drained)
    .bind(MAX_BATCH as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let col = |i: usize| -> StoreResult<Option<String>> { Ok(r.try_get(i)?) };
        let id: i64 = r.try_get(0)?;
        let body: String = r.try_get(1)?;
        let columns = Columns {
            recorded: col(2)?,
            kind: col(3)?,
            subtype: col(4)?,
            action: col(5)?,
            outcome: col(6)?,
            patient: col(7)?,
            agent: col(8)?,
            client: col(9)?,
            entity: col(10)?,
            purpose: col(11)?,
        };
        out.push((id, split(body, columns)));
    }
    Ok(out)
}

/// The log's size and the newest `audit_outbox` row appended (SQLite; 0
/// and 0 before the first append).
async fn head(conn: &mut AnyConnection) -> StoreResult<(i64, i64)> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT size, drained FROM audit_head WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.unwrap_or((0, 0)))
}

/// `events` at positions `at`, `at + 1`, …: `BEGIN IMMEDIATE`, the rows,
/// the new size (and `drained`, the newest outbox row among them) and
/// `COMMIT` as one multi-statement query (SQLite binds `$N` by number
/// across its statements). The first row's digest is NULL, which `NOT NULL`
/// refuses, unless the log's size is still `at`; after an error the
/// transaction may be open, and the caller rolls it back.
async fn append_in_one_trip(
    conn: &mut AnyConnection,
    at: i64,
    drained: i64,
    events: &[&Prepared],
) -> StoreResult<()> {
    let rows = at_positions(at, events);
    let mut sql = String::from("BEGIN IMMEDIATE;");
    // $1 is `at`; each row takes the next 13; the count comes last.
    let mut last = 1;
    for (i, chunk) in rows.chunks(ROWS_PER_INSERT).enumerate() {
        insert_rows(&mut sql, chunk.len(), &mut last, i == 0);
        sql.push(';');
    }
    sql.push_str(&format!(
        "INSERT INTO audit_head (id, size, drained) VALUES (1, ${}, ${}) \
         ON CONFLICT (id) DO UPDATE SET size = audit_head.size + excluded.size, \
         drained = MAX(audit_head.drained, excluded.drained);COMMIT",
        last + 1,
        last + 2
    ));
    let q = sqlx::query(&sql)
        .persistent(rows.len() <= ROWS_PER_INSERT)
        .bind(at);
    bind_rows(q, &rows)
        .bind(rows.len() as i64)
        .bind(drained)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Each event's row at its position from `at`: position, columns, the body
/// with its `id` filled in, and the body's digest (the tree's leaf data).
fn at_positions<'a>(at: i64, events: &[&'a Prepared]) -> Vec<(i64, &'a Columns, String, String)> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let seq = at + i as i64;
            let body = format!("{}{seq}{}", e.head, e.tail);
            let digest = hex::encode(tree::digest(body.as_bytes()));
            (seq, &e.columns, body, digest)
        })
        .collect()
}

/// An event serialised before it reaches the writer (on the requesting
/// task, not the writer's): its JSON split around its empty `id`, which the
/// writer fills in with the entry's position, and its columns.
pub struct Prepared {
    head: String,
    tail: String,
    columns: Columns,
}

fn prepare(e: &Event) -> Prepared {
    let v = e.to_json();
    let columns = Columns::of(&v);
    split(v.to_string(), columns)
}

/// An event's JSON (with an empty `id`) split around that `id`.
fn split(mut text: String, columns: Columns) -> Prepared {
    const ID: &str = "\"id\":\"\"";
    // `id` is the second member of every event (`Event::to_json`).
    let at = text.find(ID).map_or(text.len(), |i| i + ID.len() - 1);
    let tail = text.split_off(at);
    Prepared {
        head: text,
        tail,
        columns,
    }
}

/// Appends `events` inside the transaction `conn` is in, at the next
/// positions.
async fn append(conn: &mut AnyConnection, events: &[&Prepared]) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let n = events.len() as i64;
    // Takes the next `n` positions: one statement, which on PostgreSQL also
    // locks the head row until the commit (SQLite has one writer at a time).
    let take = "UPDATE audit_head SET size = size + $1 WHERE id = 1 RETURNING size";
    let end: i64 = match sqlx::query_scalar(take)
        .bind(n)
        .fetch_optional(&mut *conn)
        .await?
    {
        Some(end) => end,
        None => {
            // The first append ever makes the head row.
            sqlx::query(
                "INSERT INTO audit_head (id, size) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
            )
            .execute(&mut *conn)
            .await?;
            sqlx::query_scalar(take)
                .bind(n)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| StoreError::Audit("the audit log's head row is missing".into()))?
        }
    };
    let size = end - n;
    let rows = at_positions(size, events);
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = String::new();
        insert_rows(&mut sql, chunk.len(), &mut 0, false);
        bind_rows(sqlx::query(&sql), chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Appends an `INSERT` of `n` entry rows to `sql`, its parameters numbered
/// after `*last` (which it advances). With `guarded`, the first row's
/// digest is NULL, refused by `NOT NULL`, unless the log's size is `$1`.
fn insert_rows(sql: &mut String, n: usize, last: &mut usize, guarded: bool) {
    sql.push_str(
        "INSERT INTO audit_entry (seq, recorded, type, subtype, action, outcome, patient, \
         agent, client, entity, purpose, body, digest) VALUES ",
    );
    for i in 0..n {
        sql.push_str(if i > 0 { ",(" } else { "(" });
        for c in 1..=13 {
            *last += 1;
            if c > 1 {
                sql.push(',');
            }
            if guarded && i == 0 && c == 13 {
                sql.push_str(&format!(
                    "CASE WHEN COALESCE((SELECT size FROM audit_head WHERE id = 1), 0) = $1 \
                     THEN ${last} END"
                ));
            } else {
                sql.push_str(&format!("${last}"));
            }
        }
        sql.push(')');
    }
}

/// Binds `rows` in the order [`insert_rows`] numbers them.
fn bind_rows<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rows: &'q [(i64, &Columns, String, String)],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for (seq, cols, body, digest) in rows {
        q = q.bind(*seq);
        for (_, v) in cols.named() {
            q = q.bind(v.map(str::to_string));
        }
        q = q.bind(body.as_str()).bind(digest.as_str());
    }
    q
}

/// Records the writes of the current request (noted by the gate) in the
/// transaction that is about to commit: on PostgreSQL in the log itself, on
/// SQLite in `audit_outbox` (clearing the rows the log's writer has
/// appended since).
pub(super) async fn record_writes(tx: &mut super::Tx) -> StoreResult<()> {
    let events = crate::audit::context::take_written();
    if events.is_empty() {
        return Ok(());
    }
    let prepared: Vec<Prepared> = events.iter().map(prepare).collect();
    let result = match tx.dialect {
        Dialect::Postgres => {
            let all: Vec<&Prepared> = prepared.iter().collect();
            append(tx.conn(), &all).await
        }
        Dialect::Sqlite => {
            let drained = *tx.outbox.drained.borrow();
            match to_outbox(tx.conn(), drained, &prepared).await {
                Ok(row) => {
                    tx.outboxed(row);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
    };
    result.map_err(|e| StoreError::Audit(e.to_string()))
}

/// Leaves `events` in `audit_outbox`, first clearing the rows up to
/// `drained` (already in the log). Returns the newest row left.
async fn to_outbox(
    conn: &mut AnyConnection,
    drained: i64,
    events: &[Prepared],
) -> StoreResult<i64> {
    if drained > 0 {
        sqlx::query("DELETE FROM audit_outbox WHERE id <= $1")
            .bind(drained)
            .execute(&mut *conn)
            .await?;
    }
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO audit_outbox (recorded, type, subtype, action, outcome, patient, agent, \
             client, entity, purpose, body) VALUES ",
        );
        let mut n = 0;
        for i in 0..chunk.len() {
            sql.push_str(if i > 0 { ",(" } else { "(" });
            for c in 0..11 {
                n += 1;
                if c > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("${n}"));
            }
            sql.push(')');
        }
        let mut q = sqlx::query(&sql);
        for e in chunk {
            for (_, v) in e.columns.named() {
                q = q.bind(v.map(str::to_string));
            }
            q = q.bind(format!("{}{}", e.head, e.tail));
        }
        q.execute(&mut *conn).await?;
    }
    // One writer at a time: the newest row is this transaction's.
    let row: i64 = sqlx::query_scalar("SELECT MAX(id) FROM audit_outbox")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row)
}

async fn latest_checkpoint(store: &Store) -> StoreResult<Option<Checkpoint>> {
    let mut conn = store.pool.acquire().await?;
    latest_checkpoint_on(&mut conn).await
}

/// The newest signed checkpoint, as `conn` sees the database.
pub(super) async fn latest_checkpoint_on(
    conn: &mut AnyConnection,
) -> StoreResult<Option<Checkpoint>> {
    let row = sqlx::query(
        "SELECT size, root, created, note, signature, key_id FROM audit_checkpoint \
         ORDER BY size DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| checkpoint_of(&r)).transpose()
}

fn checkpoint_of(r: &sqlx::any::AnyRow) -> StoreResult<Checkpoint> {
    let note: String = r.try_get(3)?;
    Ok(Checkpoint {
        origin: note.lines().next().unwrap_or("").to_string(),
        size: r.try_get::<i64, _>(0)? as u64,
        root: r.try_get(1)?,
        created: r.try_get(2)?,
        signature: r.try_get(4)?,
        key_id: r.try_get(5)?,
    })
}

/// Every stored checkpoint, oldest first.
pub async fn checkpoints(store: &Store) -> StoreResult<Vec<Checkpoint>> {
    let mut conn = store.pool.acquire().await?;
    let rows = sqlx::query(
        "SELECT size, root, created, note, signature, key_id FROM audit_checkpoint ORDER BY size",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(checkpoint_of).collect()
}

/// The public keys that signed checkpoints: `(key id, PEM)`.
pub async fn public_keys(store: &Store) -> StoreResult<Vec<(String, String)>> {
    let mut conn = store.pool.acquire().await?;
    Ok(
        sqlx::query_as("SELECT id, public_key FROM audit_key ORDER BY created")
            .fetch_all(&mut *conn)
            .await?,
    )
}

async fn load_or_create_key(store: &Store) -> StoreResult<Key> {
    let mut conn = store.pool.acquire().await?;
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT id, private_key, public_key FROM audit_key ORDER BY created DESC, id LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((id, sealed, public_pem)) = row {
        let private_pem = store
            .secrets()
            .open(&super::secrets::label("audit_key", &id), &sealed)?;
        return Ok(Key {
            id,
            private_pem,
            public_pem,
        });
    }
    let (private_pem, public_pem) = checkpoint::generate().map_err(StoreError::Audit)?;
    let id = checkpoint::key_id(&public_pem).map_err(StoreError::Audit)?;
    let sealed = store
        .secrets()
        .seal(&super::secrets::label("audit_key", &id), &private_pem)?;
    sqlx::query(
        "INSERT INTO audit_key (id, private_key, public_key, created) VALUES ($1, $2, $3, $4)",
    )
    .bind(&id)
    .bind(&sealed)
    .bind(&public_pem)
    .bind(event::now())
    .execute(&mut *conn)
    .await?;
    tracing::info!(key_id = %id, "audit checkpoint key generated");
    Ok(Key {
        id,
        private_pem,
        public_pem,
    })
}

/// Recomputes the log from the database and checks it against its rows,
/// its recorded size, its stored checkpoints and `extra` (a checkpoint
/// kept elsewhere, e.g. by a witness).
pub async fn verify(store: &Store, extra: Option<Checkpoint>) -> StoreResult<Report> {
    let mut cps = checkpoints(store).await?;
    cps.extend(extra);
    let keys = public_keys(store).await?;
    // Each checkpoint is checked against the key it names.
    let mut unsigned = Vec::new();
    let mut signed = Vec::new();
    for c in cps {
        match keys.iter().find(|(id, _)| *id == c.key_id) {
            Some((_, pem)) if checkpoint::verify(pem, &c) => signed.push(c),
            _ => unsigned.push(c),
        }
    }
    let mut conn = store.audit_pool.acquire().await?;
    let head: i64 = sqlx::query_scalar("SELECT size FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
    let mut v = Verifier::new(&signed);
    for c in &unsigned {
        v.unsigned(c);
    }
    let mut last: i64 = -1;
    loop {
        let rows = sqlx::query(
            "SELECT seq, body, digest, recorded, type, subtype, action, outcome, patient, agent, \
             client, entity, purpose FROM audit_entry WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(last)
        .bind(READ_CHUNK)
        .fetch_all(&mut *conn)
        .await?;
        let n = rows.len() as i64;
        for r in &rows {
            let row = verify_row(r)?;
            last = row.seq;
            v.row(&row);
        }
        if n < READ_CHUNK {
            break;
        }
    }
    let report = v.finish(head.max(0) as u64);
    Ok(report)
}

fn verify_row(r: &sqlx::any::AnyRow) -> StoreResult<VerifyRow> {
    let col = |i: usize| -> StoreResult<Option<String>> { Ok(r.try_get(i)?) };
    Ok(VerifyRow {
        seq: r.try_get(0)?,
        body: col(1)?,
        digest: r.try_get(2)?,
        columns: Columns {
            recorded: col(3)?,
            kind: col(4)?,
            subtype: col(5)?,
            action: col(6)?,
            outcome: col(7)?,
            patient: col(8)?,
            agent: col(9)?,
            client: col(10)?,
            entity: col(11)?,
            purpose: col(12)?,
        },
    })
}

/// One exported entry: position, body and digest.
pub struct Exported {
    pub seq: u64,
    pub body: Option<String>,
    pub digest: String,
}

/// Entries recorded at or after `since` (a FHIR date or instant), in log
/// order, handed to `each`.
pub async fn export(
    store: &Store,
    since: &str,
    mut each: impl FnMut(Exported) -> std::io::Result<()>,
) -> StoreResult<u64> {
    let mut conn = store.audit_pool.acquire().await?;
    let mut last: i64 = -1;
    let mut count = 0;
    loop {
        let rows: Vec<(i64, Option<String>, String)> = sqlx::query_as(
            "SELECT seq, body, digest FROM audit_entry WHERE seq > $1 AND recorded >= $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(last)
        .bind(since)
        .bind(READ_CHUNK)
        .fetch_all(&mut *conn)
        .await?;
        let n = rows.len() as i64;
        for (seq, body, digest) in rows {
            last = seq;
            count += 1;
            each(Exported {
                seq: seq as u64,
                body,
                digest,
            })
            .map_err(|e| StoreError::Audit(format!("writing the export: {e}")))?;
        }
        if n < READ_CHUNK {
            return Ok(count);
        }
    }
}

/// The instant `days` days ago, as entries record time.
pub fn retention_cutoff(days: u64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days.min(365_000) as i64))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Clears the bodies (and searchable copies) of entries recorded before
/// `cutoff` — never of an entry at or after the newest checkpoint a witness
/// fetched, nor of any entry when no witness fetched one. Digests stay, so
/// the tree still verifies. Returns the number of entries cleared.
pub async fn prune(store: &Store, cutoff: &str) -> StoreResult<u64> {
    let witnessed: Option<i64> = {
        let mut conn = store.pool.acquire().await?;
        sqlx::query_scalar("SELECT MAX(size) FROM audit_witness")
            .fetch_one(&mut *conn)
            .await?
    };
    let Some(limit) = witnessed else {
        return Ok(0);
    };
    // Witnesses only ever fetch more of an append-only log, so the limit
    // read before this transaction still holds in it.
    let mut conn = store.audit_pool.acquire().await?;
    let n = sqlx::query(
        "UPDATE audit_entry SET body = NULL, recorded = NULL, type = NULL, subtype = NULL, \
         action = NULL, outcome = NULL, patient = NULL, agent = NULL, client = NULL, \
         entity = NULL, purpose = NULL \
         WHERE seq < $1 AND recorded < $2 AND body IS NOT NULL",
    )
    .bind(limit)
    .bind(cutoff)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}

/// A search of AuditEvents.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    /// `(comparator, value)`: `eq` (prefix), `ge`, `gt`, `le`, `lt`.
    pub date: Vec<(String, String)>,
    /// Matches the requestor or the client.
    pub agent: Option<String>,
    /// Matches the data entity or the patient.
    pub entity: Option<String>,
    /// `Patient/{id}`.
    pub patient: Option<String>,
    pub kind: Option<String>,
    pub subtype: Option<String>,
    pub outcome: Option<String>,
    pub purpose: Option<String>,
    /// Only entries before this position (paging, newest first).
    pub before: Option<i64>,
    pub count: usize,
}

/// Whom a caller may see the audit events of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditReach {
    /// An auditor: every event (`system/AuditEvent.rs`, `system/*.rs`, or an
    /// administrator's unrestricted access).
    All,
    /// A patient's own token: the events about that patient.
    Patient(String),
    None,
}

/// The reach of `access` over the audit log.
pub fn reach(access: &crate::policy::Access) -> AuditReach {
    if access.is_unrestricted() {
        return AuditReach::All;
    }
    if let Some(p) = access.patient() {
        // A token bound to a patient sees that patient's events when it may
        // read the patient's own record.
        if access.check_type(Ops::READ, "Patient").is_ok() {
            return AuditReach::Patient(p.to_string());
        }
        return AuditReach::None;
    }
    if access.sees_whole_type(Ops::SEARCH, Some("AuditEvent"))
        && access.sees_whole_type(Ops::READ, Some("AuditEvent"))
    {
        AuditReach::All
    } else {
        AuditReach::None
    }
}

impl Gate {
    /// AuditEvents matching `q` that this caller may see, newest first:
    /// `(position, stored JSON)`.
    pub async fn audit_search(&self, q: &AuditQuery) -> Result<Vec<(i64, String)>> {
        let mut q = q.clone();
        match reach(self.access()) {
            AuditReach::All => {}
            AuditReach::Patient(p) => {
                let own = format!("Patient/{p}");
                if q.patient.as_deref().is_some_and(|x| x != own) {
                    // Another patient's events are absent, not refused.
                    return Ok(Vec::new());
                }
                q.patient = Some(own);
            }
            AuditReach::None => {
                return Err(Error::Forbidden(
                    "the granted scopes do not allow reading the audit log".into(),
                ))
            }
        }
        let mut sql = String::from("SELECT seq, body FROM audit_entry WHERE body IS NOT NULL");
        let mut binds: Vec<String> = Vec::new();
        let mut bind = |sql: &mut String, clause: &str, v: &str| {
            binds.push(v.to_string());
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        for (cmp, v) in &q.date {
            let clause = match cmp.as_str() {
                "ge" => " AND recorded >= ?",
                "gt" => " AND recorded > ?",
                "le" | "lt" => " AND recorded < ?",
                _ => " AND recorded LIKE ?",
            };
            let value = match cmp.as_str() {
                "le" => format!("{v}\u{ffff}"),
                "eq" | "" => format!("{v}%"),
                _ => v.clone(),
            };
            bind(&mut sql, clause, &value);
        }
        if let Some(a) = &q.agent {
            binds.push(a.clone());
            let n = binds.len();
            sql.push_str(&format!(" AND (agent = ${n} OR client = ${n})"));
        }
        if let Some(e) = &q.entity {
            binds.push(e.clone());
            let n = binds.len();
            sql.push_str(&format!(" AND (entity = ${n} OR patient = ${n})"));
        }
        let simple = [
            ("patient", &q.patient),
            ("type", &q.kind),
            ("subtype", &q.subtype),
            ("outcome", &q.outcome),
            ("purpose", &q.purpose),
        ];
        for (col, v) in simple {
            if let Some(v) = v {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {col} = ${}", binds.len()));
            }
        }
        if let Some(b) = q.before {
            binds.push(b.to_string());
            sql.push_str(&format!(" AND seq < CAST(${} AS BIGINT)", binds.len()));
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", q.count.max(1)));
        let mut reader = self
            .store()
            .audit_pool
            .acquire()
            .await
            .map_err(StoreError::from)?;
        let mut query = sqlx::query_as::<_, (i64, String)>(&sql);
        for b in &binds {
            query = query.bind(b.as_str());
        }
        Ok(query
            .fetch_all(&mut *reader)
            .await
            .map_err(StoreError::from)?)
    }

    /// One AuditEvent by position, if this caller may see it.
    pub async fn audit_read(&self, seq: i64) -> Result<Option<String>> {
        let mut reader = self
            .store()
            .audit_pool
            .acquire()
            .await
            .map_err(StoreError::from)?;
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT body, patient FROM audit_entry WHERE seq = $1")
                .bind(seq)
                .fetch_optional(&mut *reader)
                .await
                .map_err(StoreError::from)?;
        let Some((Some(body), patient)) = row else {
            return Ok(None);
        };
        match reach(self.access()) {
            AuditReach::All => Ok(Some(body)),
            AuditReach::Patient(p) if patient.as_deref() == Some(&format!("Patient/{p}")) => {
                Ok(Some(body))
            }
            AuditReach::Patient(_) => Ok(None),
            AuditReach::None => Err(Error::Forbidden(
                "the granted scopes do not allow reading the audit log".into(),
            )),
        }
    }
}

/// Notes a version written by the gate's writer, for the AuditEvents
/// recorded when its transaction commits.
pub(super) fn wrote(op: Ops, prev: Option<&super::Version>, v: &super::Version) {
    use crate::audit::Action;
    let (action, interaction) = if v.deleted {
        (Action::Delete, "delete")
    } else if op == Ops::CREATE || prev.is_none_or(|p| p.deleted) {
        (Action::Create, "create")
    } else {
        (Action::Update, "update")
    };
    let body = v
        .body
        .as_deref()
        .or_else(|| prev.and_then(|p| p.body.as_deref()));
    crate::audit::context::wrote(action, interaction, &v.rtype, &v.id, body);
}
