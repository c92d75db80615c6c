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
//! events) are sent to one writer, which appends whatever has queued up in
//! one transaction and then tells every sender; a response waits for its
//! batch. If the append fails, every sender of that batch gets the error
//! and its request is answered 503 with nothing else. On SQLite the writer
//! is a thread with connections of its own (rusqlite), so a batch is
//! written where it is gathered; on PostgreSQL it is a task on the pool.
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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, Row};
use tokio::sync::{oneshot, Mutex};

use super::{Dialect, Gate, Outbox, Store, StoreError, StoreResult};
use crate::audit::checkpoint::{self, Checkpoint};
use crate::audit::event::{self, audit_columns, Columns, Event};
use crate::audit::packed;
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
    queue: flume::Sender<Job>,
    tree: Mutex<Tree>,
    /// The checkpoint origin line (the server's base URL).
    origin: String,
}

/// The checkpoint signing key.
#[derive(Clone)]
struct Key {
    id: String,
    private_pem: String,
    public_pem: String,
}

/// Entries for the writer, and whom to tell once they are committed.
pub(super) struct Job {
    events: Vec<Prepared>,
    /// Entries a write left in `audit_outbox` are to be appended with this
    /// batch.
    outbox: bool,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

impl Job {
    /// A write's request to append what it left in `audit_outbox`.
    pub(super) fn outbox(done: oneshot::Sender<std::result::Result<(), String>>) -> Job {
        Job {
            events: Vec::new(),
            outbox: true,
            done,
        }
    }
}

/// Who waits for this process's writer: requests inside the audit seam,
/// and the jobs they have sent. On SQLite a batch gathers up to its window,
/// but no longer than until every request in flight has sent its job: after
/// that nobody else is coming, and waiting on would leave the machine idle
/// and a lone request waiting out the window for nothing (see
/// [`next_batch`]).
#[derive(Default)]
pub(super) struct Waiters {
    /// Requests inside the audit seam ([`AuditLog::enter`]).
    in_flight: AtomicUsize,
    /// Jobs sent to the writer and not yet told.
    queued: AtomicUsize,
    /// The writer's thread, woken when the last request in flight has sent
    /// its job.
    writer: OnceLock<std::thread::Thread>,
}

impl Waiters {
    /// Sends `job` to the writer's queue, and wakes the writer if every
    /// request in flight has now sent its job.
    pub(super) async fn send(
        &self,
        queue: &flume::Sender<Job>,
        job: Job,
    ) -> std::result::Result<(), flume::SendError<Job>> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = queue.send_async(job).await {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        if self.everyone_waits() {
            if let Some(w) = self.writer.get() {
                w.unpark();
            }
        }
        Ok(())
    }

    /// Every request inside the audit seam has sent its entries.
    fn everyone_waits(&self) -> bool {
        self.queued.load(Ordering::SeqCst) >= self.in_flight.load(Ordering::SeqCst)
    }

    /// Tells every job of a batch how it went.
    fn tell(&self, jobs: Vec<Job>, result: &std::result::Result<(), String>) {
        self.queued.fetch_sub(jobs.len(), Ordering::SeqCst);
        for j in jobs {
            let _ = j.done.send(result.clone());
        }
    }
}

/// Leaves this process's writer has committed, oldest first, for the tree
/// to take instead of reading their digests back from the log: under load
/// the checkpoint a minute would otherwise read and decode hundreds of
/// thousands of rows, at about 3 µs an entry. Entries other processes
/// appended, a write's own on PostgreSQL, and leaves dropped past
/// [`MAX_COMMITTED`] are read from the log as before.
#[derive(Default)]
pub(super) struct Committed(std::sync::Mutex<VecDeque<(i64, tree::Leaf)>>);

/// Most leaves held for the tree (40 bytes each).
const MAX_COMMITTED: usize = 1 << 20;

/// What [`Committed::take`] holds for the tree's next position.
#[derive(Debug, PartialEq)]
enum Held {
    /// The leaves from that position on, in order.
    Leaves(Vec<tree::Leaf>),
    /// None there: the first leaf held is at this later position.
    From(i64),
    Nothing,
}

impl Committed {
    /// Notes the leaves of a batch just committed (positions ascending,
    /// after those noted before).
    fn extend(&self, leaves: Vec<(i64, tree::Leaf)>) {
        if leaves.is_empty() {
            return;
        }
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.extend(leaves);
        let over = held.len().saturating_sub(MAX_COMMITTED);
        held.drain(..over);
    }

    /// Takes the leaves held from position `next` on, dropping those
    /// before it (the tree read them from the log).
    fn take(&self, next: i64) -> Held {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while held.front().is_some_and(|(seq, _)| *seq < next) {
            held.pop_front();
        }
        let mut leaves = Vec::new();
        while let Some(&(seq, leaf)) = held.front() {
            if seq != next + leaves.len() as i64 {
                break;
            }
            leaves.push(leaf);
            held.pop_front();
        }
        match held.front() {
            _ if !leaves.is_empty() => Held::Leaves(leaves),
            Some(&(seq, _)) => Held::From(seq),
            None => Held::Nothing,
        }
    }
}

/// A request inside the audit seam, from [`AuditLog::enter`] until it is
/// dropped.
pub struct InFlight(Arc<Outbox>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.waiters.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AuditLog {
    /// Starts the log's writer (and, with a non-zero interval, its
    /// checkpointer, which also applies retention: `retention_days`, 0 for
    /// none) on `store`. On SQLite a batch waits up to `batch_window` for
    /// more entries once its first has come.
    pub fn start(
        store: Store,
        origin: String,
        checkpoint_interval: Duration,
        retention_days: u64,
        batch_window: Duration,
    ) -> AuditLog {
        let (tx, rx) = flume::bounded(16_384);
        store.outbox.serve(&tx);
        match (store.dialect, store.audit_path.clone(), store.main_path()) {
            (Dialect::Sqlite, Some(log), Some(main)) => {
                let outbox = Arc::clone(&store.outbox);
                let spawned = std::thread::Builder::new()
                    .name("ehrx-audit".into())
                    .spawn(move || sqlite_writer(&log, &main, &outbox, rx, batch_window));
                match spawned {
                    Ok(writer) => {
                        let _ = store.outbox.waiters.writer.set(writer.thread().clone());
                    }
                    // Every request then gets 503: nothing is answered
                    // unrecorded.
                    Err(e) => {
                        tracing::error!(error = %e, "the audit log's writer could not start")
                    }
                }
            }
            _ => {
                tokio::spawn(writer(store.clone(), rx));
            }
        }
        let log = AuditLog {
            inner: Arc::new(Inner {
                store: store.clone(),
                queue: tx,
                tree: Mutex::new(Tree::new()),
                origin,
            }),
        };
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

    /// Fills in, in the background, what the entries appended by earlier
    /// releases lack ([`fill_organizations`]); a server calls it once it
    /// has started its log.
    pub fn complete_upgrades(&self) {
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            match fill_organizations(&store).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    entries = n,
                    "the organizations of audit entries from an earlier release are filled in"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "filling in the organizations of older audit entries stopped; the next start goes on"
                ),
            }
        });
    }

    /// Notes a request entering the audit seam until the guard returned is
    /// dropped (see [`Waiters`]).
    pub fn enter(&self) -> InFlight {
        let outbox = Arc::clone(&self.inner.store.outbox);
        outbox.waiters.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(outbox)
    }

    /// Appends `events` and returns once they are committed (group commit).
    pub async fn record(&self, events: Vec<Event>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.iter().map(prepare).collect();
        let (done, wait) = oneshot::channel();
        let queued = Instant::now();
        let job = Job {
            events,
            outbox: false,
            done,
        };
        self.inner
            .store
            .outbox
            .waiters
            .send(&self.inner.queue, job)
            .await
            .map_err(|_| StoreError::Audit("the audit writer has stopped".into()))?;
        let result = wait
            .await
            .map_err(|_| StoreError::Audit("the audit writer has stopped".into()))?;
        crate::metrics::audit_wait(queued.elapsed());
        result.map_err(StoreError::Audit)
    }

    /// The tree, brought up to date with the entries committed since.
    /// Leaves this process's writer committed are taken from it
    /// ([`Committed`]); the others are read from the log.
    async fn tree(&self) -> StoreResult<tokio::sync::MutexGuard<'_, Tree>> {
        let mut tree = self.inner.tree.lock().await;
        let mut conn = None;
        loop {
            let from = tree.len() as i64;
            let until = match self.inner.store.outbox.committed.take(from) {
                Held::Leaves(leaves) => {
                    for l in leaves {
                        tree.push(l);
                    }
                    continue;
                }
                Held::From(seq) => Some(seq),
                Held::Nothing => None,
            };
            let conn = match &mut conn {
                Some(c) => c,
                None => conn.insert(self.inner.store.audit_pool.acquire().await?),
            };
            let rows = sqlx::query(
                "SELECT seq, digest FROM audit_entry WHERE seq >= $1 AND seq < $2 \
                 ORDER BY seq LIMIT $3",
            )
            .bind(from)
            .bind(until.unwrap_or(i64::MAX))
            .bind(READ_CHUNK)
            .fetch_all(&mut **conn)
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
                // Read up to the first leaf held: taken next.
                if until == Some(tree.len() as i64) {
                    continue;
                }
                return Ok(tree);
            }
        }
    }

    /// The newest audit key, read afresh (one `ehrx audit rotate-key`
    /// later, the next checkpoint is signed with the new key).
    async fn key(&self) -> StoreResult<Key> {
        load_or_create_key(&self.inner.store).await
    }

    /// The published half of the newest audit key: `(key id, PEM)`.
    pub async fn public_key(&self) -> StoreResult<(String, String)> {
        if let Some(newest) = public_keys(&self.inner.store).await?.pop() {
            return Ok(newest);
        }
        let k = self.key().await?;
        Ok((k.id, k.public_pem))
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

/// The jobs a writer takes for its next batch: the first (waiting for it),
/// then whatever else has queued up, to [`MAX_BATCH`] entries. With a
/// `window` (SQLite), the writer then waits up to the window for more —
/// parked, not woken by each job that comes — unless every request in
/// flight has already sent its job ([`Waiters`]); the last to send wakes
/// it.
fn next_batch(
    first: Job,
    rx: &flume::Receiver<Job>,
    window: Option<(Duration, &Waiters)>,
) -> (Vec<Job>, Vec<Prepared>, bool) {
    let deadline = window.map(|(w, waiters)| (Instant::now() + w, waiters));
    let mut jobs = vec![first];
    let mut n = jobs[0].events.len();
    loop {
        // Decided before the queue is drained, so that what the last
        // sender queued before waking the writer is taken with it.
        let now = Instant::now();
        let wait = match deadline {
            Some((deadline, waiters)) if now < deadline && !waiters.everyone_waits() => {
                Some(deadline - now)
            }
            _ => None,
        };
        while n < MAX_BATCH {
            let Ok(j) = rx.try_recv() else { break };
            n += j.events.len();
            jobs.push(j);
        }
        match wait {
            Some(w) if n < MAX_BATCH => std::thread::park_timeout(w),
            _ => break,
        }
    }
    let outbox = jobs.iter().any(|j| j.outbox);
    let mut events = Vec::with_capacity(n);
    for j in &mut jobs {
        events.append(&mut j.events);
    }
    (jobs, events, outbox)
}

/// The writer on SQLite: a thread of its own with its own connection to the
/// log's file (and one to the database file, for `audit_outbox`), so a batch
/// is written where it is gathered, without a hand-off to another thread,
/// and the requests waiting on it are woken from here. A batch is one
/// [`Batch`]. Entries writes left in `audit_outbox` go first: when it starts
/// (a crash may have left some), when a write asks, and when nothing has
/// come for [`OUTBOX_POLL`] (another process's writes).
fn sqlite_writer(
    log: &str,
    main: &str,
    outbox: &Outbox,
    rx: flume::Receiver<Job>,
    window: Duration,
) {
    let mut conns: Option<Conns> = None;
    let mut outbox_due = true;
    loop {
        let (jobs, events, asked) = match rx.recv_timeout(OUTBOX_POLL) {
            Ok(first) => next_batch(
                first,
                &rx,
                (!window.is_zero()).then_some((window, &outbox.waiters)),
            ),
            Err(flume::RecvTimeoutError::Timeout) => (Vec::new(), Vec::new(), true),
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        outbox_due |= asked;
        if events.is_empty() && !outbox_due {
            outbox.waiters.tell(jobs, &Ok(()));
            continue;
        }
        let started = Instant::now();
        let result = match &mut conns {
            Some(c) => Ok(c),
            None => open_sqlite(log, main).map(|c| conns.insert(c)),
        }
        .and_then(|c| {
            let mut batch = Batch::begin(c, outbox_due)?;
            batch.insert(&events.iter().collect::<Vec<_>>())?;
            batch.commit()
        });
        let result = match result {
            Ok(appended) => {
                if appended.entries > 0 {
                    crate::metrics::audit_batch(
                        appended.entries,
                        jobs.len(),
                        started.elapsed(),
                        true,
                    );
                }
                outbox
                    .drained
                    .fetch_max(appended.drained, Ordering::Relaxed);
                outbox.committed.extend(appended.leaves);
                outbox_due = appended.outbox_left;
                Ok(())
            }
            Err(e) => {
                crate::metrics::audit_batch(events.len(), jobs.len(), started.elapsed(), false);
                tracing::error!(error = %e, "the audit log could not be written");
                // Opened afresh for the next batch.
                conns = None;
                Err(e.to_string())
            }
        };
        let failed = result.is_err();
        let nobody = jobs.is_empty();
        outbox.waiters.tell(jobs, &result);
        if outbox.checkpointed.swap(false, Ordering::Relaxed) {
            if let Some(c) = &conns {
                // The frames appended since the checkpoint beside began
                // (see `super::checkpoint`); a failure leaves the
                // write-ahead log to grow until the next one.
                let copied = c
                    .log
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
                if let Err(e) = copied {
                    tracing::debug!(error = %e, "the writer's checkpoint failed");
                }
            }
        }
        if failed && nobody {
            // Only the outbox was due: try again shortly, not at once.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The writer's connections: the log's file and the database file.
struct Conns {
    log: rusqlite::Connection,
    main: rusqlite::Connection,
    /// The log's connection commits with `synchronous = FULL`.
    synced: bool,
}

fn open_sqlite(log: &str, main: &str) -> rusqlite::Result<Conns> {
    let open = |path: &str| -> rusqlite::Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open(path)?;
        c.busy_timeout(Duration::from_secs(10))?;
        let _: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        c.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;")?;
        Ok(c)
    };
    Ok(Conns {
        log: open(log)?,
        main: open(main)?,
        synced: false,
    })
}

/// What one batch appended.
struct Appended {
    /// Entries appended, from `audit_outbox` and the batch's jobs.
    entries: usize,
    /// `audit_outbox` may hold more than one batch took.
    outbox_left: bool,
    /// The newest `audit_outbox` row in the log.
    drained: i64,
    /// The leaves appended, by position.
    leaves: Vec<(i64, tree::Leaf)>,
}

const INSERT_ENTRY: &str = concat!(
    "INSERT INTO audit_entry (seq, ",
    audit_columns!(),
    ", body, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
);

/// One batch being appended on SQLite: a `BEGIN IMMEDIATE` transaction on
/// the log's file — the log's size read under the file's write lock (so
/// another process's writer goes before or after, never beside), one cached
/// INSERT per entry, the new size, `COMMIT`.
struct Batch<'c> {
    tx: rusqlite::Transaction<'c>,
    /// The log's size before this batch.
    size: i64,
    /// Entries inserted so far.
    entries: usize,
    /// The newest `audit_outbox` row in the log, and whether the outbox
    /// holds more than this batch took.
    drained: i64,
    outbox_left: bool,
    /// The leaves of the entries inserted, by position.
    leaves: Vec<(i64, tree::Leaf)>,
}

impl<'c> Batch<'c> {
    /// Opens a batch; with `outbox`, it first takes the entries writes left
    /// in `audit_outbox` after the log's `drained`.
    ///
    /// Such a batch is synced to disk at its commit (`synchronous = FULL`,
    /// which SQLite lets change only outside a transaction): the next write
    /// clears those rows from the database file, and that must not outlast
    /// them in the log should the machine lose power. Other batches commit
    /// as the database file does (`NORMAL`: safe from a crash of the
    /// process, not of the machine).
    fn begin(c: &'c mut Conns, outbox: bool) -> rusqlite::Result<Batch<'c>> {
        use rusqlite::OptionalExtension as _;
        if c.synced != outbox {
            c.log.execute_batch(if outbox {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            })?;
            c.synced = outbox;
        }
        let tx = c
            .log
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (size, drained): (i64, i64) = tx
            .prepare_cached("SELECT size, drained FROM audit_head WHERE id = 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((0, 0));
        let mut batch = Batch {
            tx,
            size,
            entries: 0,
            drained,
            outbox_left: false,
            leaves: Vec::new(),
        };
        if outbox {
            let taken = sqlite_outbox(&c.main, drained)?;
            batch.outbox_left = taken.len() >= MAX_BATCH;
            if let Some((id, _)) = taken.last() {
                batch.drained = *id;
            }
            batch.insert(&taken.iter().map(|(_, p)| p).collect::<Vec<_>>())?;
        }
        Ok(batch)
    }

    /// Inserts `events` at the next positions.
    fn insert(&mut self, events: &[&Prepared]) -> rusqlite::Result<()> {
        let at = self.size + self.entries as i64;
        let mut insert = self.tx.prepare_cached(INSERT_ENTRY)?;
        for e in at_positions(at, events) {
            let c = e.columns.named();
            insert.execute(rusqlite::params![
                e.seq, c[0].1, c[1].1, c[2].1, c[3].1, c[4].1, c[5].1, c[6].1, c[7].1, c[8].1,
                c[9].1, c[10].1, e.body, e.digest
            ])?;
            self.leaves.push((e.seq, e.leaf));
        }
        self.entries += events.len();
        Ok(())
    }

    /// Records the new size (and `drained`) and commits.
    fn commit(self) -> rusqlite::Result<Appended> {
        if self.entries > 0 {
            self.tx
                .prepare_cached(
                    "INSERT INTO audit_head (id, size, drained) VALUES (1, ?1, ?2) \
                     ON CONFLICT (id) DO UPDATE SET size = excluded.size, \
                     drained = MAX(audit_head.drained, excluded.drained)",
                )?
                .execute(rusqlite::params![
                    self.size + self.entries as i64,
                    self.drained
                ])?;
        }
        self.tx.commit()?;
        Ok(Appended {
            entries: self.entries,
            outbox_left: self.outbox_left,
            drained: self.drained,
            leaves: self.leaves,
        })
    }
}

/// The entries in `audit_outbox` after row `drained`, oldest first (at most
/// one batch).
fn sqlite_outbox(
    main: &rusqlite::Connection,
    drained: i64,
) -> rusqlite::Result<Vec<(i64, Prepared)>> {
    let mut q = main.prepare_cached(concat!(
        "SELECT id, body, ",
        audit_columns!(),
        " FROM audit_outbox WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let rows = q.query_map(rusqlite::params![drained, MAX_BATCH as i64], |r| {
        let columns = Columns::read(|i| r.get(2 + i))?;
        Ok((r.get::<_, i64>(0)?, split(r.get(1)?, columns)))
    })?;
    rows.collect()
}

/// The writer on PostgreSQL: a task that appends each batch in one
/// transaction (a write's own entries are appended in the write's
/// transaction; `audit_outbox` holds only rows restored from an SQLite
/// backup, appended when it starts and looked for when it is idle).
///
/// Under load it keeps one connection of the pool for itself, so that a
/// batch never queues behind the reads it is holding up; it gives the
/// connection back whenever nothing is waiting.
async fn writer(store: Store, rx: flume::Receiver<Job>) {
    let mut held: Option<sqlx::pool::PoolConnection<sqlx::Any>> = None;
    let mut outbox_due = true;
    loop {
        let (jobs, events, asked) = match tokio::time::timeout(OUTBOX_POLL, rx.recv_async()).await {
            Ok(Ok(first)) => next_batch(first, &rx, None),
            Ok(Err(_)) => break,
            Err(_) => (Vec::new(), Vec::new(), true),
        };
        if store.audit_pool.is_closed() {
            store
                .outbox
                .waiters
                .tell(jobs, &Err("the audit log's database is closed".into()));
            break;
        }
        outbox_due |= asked;
        let started = Instant::now();
        let n = events.len();
        let result = append_postgres(&store, &mut held, &events, outbox_due).await;
        let result = match result {
            Ok((taken, left, leaves)) => {
                if n + taken > 0 {
                    crate::metrics::audit_batch(n + taken, jobs.len(), started.elapsed(), true);
                }
                store.outbox.committed.extend(leaves);
                outbox_due = left;
                Ok(())
            }
            Err(e) => {
                crate::metrics::audit_batch(n, jobs.len(), started.elapsed(), false);
                // A connection that failed (perhaps still inside its
                // transaction) is closed, not given back.
                if let Some(conn) = held.take() {
                    let _ = conn.close().await;
                }
                tracing::error!(error = %e, "the audit log could not be written");
                Err(e.to_string())
            }
        };
        store.outbox.waiters.tell(jobs, &result);
        if rx.is_empty() {
            held = None;
        }
    }
}

/// Appends one batch on PostgreSQL (with `outbox`, what `audit_outbox`
/// holds first); returns how many entries it took from the outbox, whether
/// the outbox holds more, and the leaves it committed.
async fn append_postgres(
    store: &Store,
    held: &mut Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    events: &[Prepared],
    outbox: bool,
) -> StoreResult<(usize, bool, Vec<(i64, tree::Leaf)>)> {
    let conn = match held {
        Some(c) => c,
        None => held.insert(store.audit_pool.acquire().await?),
    };
    let mut tx = sqlx::Connection::begin(&mut **conn).await?;
    let mut taken = Vec::new();
    if outbox {
        let drained: Option<i64> =
            sqlx::query_scalar("SELECT drained FROM audit_head WHERE id = 1 FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await?;
        taken = read_outbox(&mut tx, drained.unwrap_or(0)).await?;
    }
    let all: Vec<&Prepared> = taken.iter().map(|(_, p)| p).chain(events.iter()).collect();
    let leaves = append(&mut tx, &all).await?;
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
    Ok((taken.len(), taken.len() >= MAX_BATCH, leaves))
}

/// The entries in `audit_outbox` after row `drained`, oldest first (at most
/// one batch).
async fn read_outbox(conn: &mut AnyConnection, drained: i64) -> StoreResult<Vec<(i64, Prepared)>> {
    let rows = sqlx::query(concat!(
        "SELECT id, body, ",
        audit_columns!(),
        " FROM audit_outbox WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(drained)
    .bind(MAX_BATCH as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.try_get(0)?;
        let body: String = r.try_get(1)?;
        let columns = Columns::read(|i| r.try_get(2 + i))?;
        out.push((id, split(body, columns)));
    }
    Ok(out)
}

/// An entry's row at its position.
struct Positioned<'a> {
    seq: i64,
    columns: &'a Columns,
    /// The body with its `id` filled in, as stored ([`packed`]).
    body: String,
    /// The digest of its JSON: the tree's leaf data.
    leaf: tree::Leaf,
    /// The leaf as stored, in hex.
    digest: String,
}

/// Each event's row at its position from `at`.
fn at_positions<'a>(at: i64, events: &[&'a Prepared]) -> Vec<Positioned<'a>> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let seq = at + i as i64;
            let body = e.with_id(seq);
            let leaf = tree::digest(body.as_bytes());
            Positioned {
                seq,
                columns: &e.columns,
                body: packed::pack(&body),
                leaf,
                digest: hex::encode(leaf),
            }
        })
        .collect()
}

/// An event serialised before it reaches the writer (on the requesting
/// task, not the writer's): its JSON with an empty `id`, which the writer
/// fills in with the entry's position, and its columns.
pub struct Prepared {
    text: String,
    /// Where the `id`'s value goes in `text`.
    at: usize,
    columns: Columns,
}

impl Prepared {
    /// The JSON with `id` filled in.
    fn with_id(&self, id: i64) -> String {
        let (head, tail) = self.text.split_at(self.at);
        let mut body = String::with_capacity(self.text.len() + 20);
        body.push_str(head);
        body.push_str(&id.to_string());
        body.push_str(tail);
        body
    }
}

fn prepare(e: &Event) -> Prepared {
    split(e.to_text(), e.columns())
}

/// An event's JSON (with an empty `id`), and where that `id` goes.
fn split(text: String, columns: Columns) -> Prepared {
    const ID: &str = "\"id\":\"\"";
    // `id` is the second member of every event (`Event::to_json`).
    let at = text.find(ID).map_or(text.len(), |i| i + ID.len() - 1);
    Prepared { text, at, columns }
}

/// Appends `events` inside the transaction `conn` is in, at the next
/// positions; returns their leaves, by position.
async fn append(
    conn: &mut AnyConnection,
    events: &[&Prepared],
) -> StoreResult<Vec<(i64, tree::Leaf)>> {
    if events.is_empty() {
        return Ok(Vec::new());
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
        insert_rows(&mut sql, chunk.len());
        bind_rows(sqlx::query(&sql), chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(rows.iter().map(|e| (e.seq, e.leaf)).collect())
}

/// Appends an `INSERT` of `n` entry rows to `sql`, its parameters numbered
/// from 1 (the log's own appends run on PostgreSQL only).
fn insert_rows(sql: &mut String, n: usize) {
    sql.push_str(concat!(
        "INSERT INTO audit_entry (seq, ",
        audit_columns!(),
        ", body, digest) VALUES "
    ));
    super::push_values(sql, n, event::COLUMN_COUNT + 3, true);
}

/// Binds `rows` in the order [`insert_rows`] numbers them.
fn bind_rows<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rows: &'q [Positioned<'q>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for e in rows {
        q = q.bind(e.seq);
        for (_, v) in e.columns.named() {
            q = q.bind(v);
        }
        q = q.bind(e.body.as_str()).bind(e.digest.as_str());
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
        // Appended in the write's transaction, not yet committed: the tree
        // reads them back from the log.
        Dialect::Postgres => {
            let all: Vec<&Prepared> = prepared.iter().collect();
            append(tx.conn(), &all).await.map(|_| ())
        }
        Dialect::Sqlite => {
            let drained = tx.outbox.drained.load(Ordering::Relaxed);
            let left = to_outbox(tx.conn(), drained, &prepared).await;
            if left.is_ok() {
                tx.outboxed();
            }
            left
        }
    };
    result.map_err(|e| StoreError::Audit(e.to_string()))
}

/// Leaves `events` in `audit_outbox`, first clearing the rows up to
/// `drained` (already in the log).
async fn to_outbox(conn: &mut AnyConnection, drained: i64, events: &[Prepared]) -> StoreResult<()> {
    if drained > 0 {
        sqlx::query("DELETE FROM audit_outbox WHERE id <= $1")
            .bind(drained)
            .execute(&mut *conn)
            .await?;
    }
    let numbered = !conn.backend_name().eq_ignore_ascii_case("sqlite");
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(concat!(
            "INSERT INTO audit_outbox (",
            audit_columns!(),
            ", body) VALUES "
        ));
        super::push_values(&mut sql, chunk.len(), event::COLUMN_COUNT + 1, numbered);
        let mut q = sqlx::query(&sql);
        for e in chunk {
            for (_, v) in e.columns.named() {
                q = q.bind(v);
            }
            q = q.bind(e.text.as_str());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
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

/// The public halves of every audit key, oldest first: `(key id, PEM)`.
pub async fn public_keys(store: &Store) -> StoreResult<Vec<(String, String)>> {
    let mut conn = store.pool.acquire().await?;
    Ok(
        sqlx::query_as("SELECT id, public_key FROM audit_key ORDER BY created, id")
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// Makes a new audit key the one checkpoints are signed with from now on
/// (the checkpointer of a running server takes it at its next checkpoint);
/// the older keys stay published for the checkpoints they signed. Returns
/// the new key's id.
pub async fn rotate_key(store: &Store) -> StoreResult<String> {
    Ok(create_key(store).await?.id)
}

async fn load_or_create_key(store: &Store) -> StoreResult<Key> {
    // The connection goes back before a key is made on one of its own.
    let row: Option<(String, String, String)> = {
        let mut conn = store.pool.acquire().await?;
        sqlx::query_as(
            "SELECT id, private_key, public_key FROM audit_key \
             ORDER BY created DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await?
    };
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
    create_key(store).await
}

async fn create_key(store: &Store) -> StoreResult<Key> {
    let mut conn = store.pool.acquire().await?;
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
    // One snapshot for the head and every row, so that what the server
    // appends, prunes or fills in meanwhile is seen whole or not at all.
    let mut conn = match store.dialect {
        Dialect::Sqlite => store.audit_pool.begin_with("BEGIN").await?,
        Dialect::Postgres => {
            store
                .audit_pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?
        }
    };
    let (head, organizations_from): (i64, i64) =
        sqlx::query_as("SELECT size, organizations_from FROM audit_head WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or((0, 0));
    let mut v = Verifier::new(&signed);
    v.organizations_from(organizations_from.max(0) as u64);
    for c in &unsigned {
        v.unsigned(c);
    }
    let mut last: i64 = -1;
    loop {
        let rows = sqlx::query(concat!(
            "SELECT seq, body, digest, ",
            audit_columns!(),
            " FROM audit_entry WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
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
    conn.commit().await?;
    let report = v.finish(head.max(0) as u64);
    Ok(report)
}

fn verify_row(r: &sqlx::any::AnyRow) -> StoreResult<VerifyRow> {
    let col = |i: usize| -> StoreResult<Option<String>> { Ok(r.try_get(i)?) };
    // A body that cannot be unpacked is checked as stored: it matches no
    // digest, and the entry is named as changed.
    let body = col(1)?.map(|b| match packed::unpack(&b) {
        Ok(json) => json.into_owned(),
        Err(_) => b,
    });
    Ok(VerifyRow {
        seq: r.try_get(0)?,
        body,
        digest: r.try_get(2)?,
        columns: Columns::read(|i| col(3 + i))?,
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
            let body = body.map(|b| readable(&b, seq)).transpose()?;
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

/// An entry's JSON from its stored body; a body that cannot be read is a
/// damaged log (`ehrx audit verify` names the entry), not an empty answer.
fn readable(stored: &str, seq: i64) -> StoreResult<String> {
    packed::unpack(stored)
        .map(|b| b.into_owned())
        .map_err(|e| StoreError::Audit(format!("audit entry {seq}: {e}")))
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
         entity = NULL, purpose = NULL, organizations = NULL \
         WHERE seq < $1 AND recorded < $2 AND body IS NOT NULL",
    )
    .bind(limit)
    .bind(cutoff)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}

/// Entries whose `organizations` one step of [`fill_organizations`] fills
/// in.
const FILL_CHUNK: i64 = 1_000;

/// Fills in the `organizations` column of the entries appended before the
/// log had one (below `audit_head.organizations_from`), from their bodies,
/// newest first, and moves the boundary down with each chunk in the same
/// transaction — so `ehrx audit verify` holds at every step, and from the
/// end on checks every entry's column against its body. The boundary is
/// compare-and-set: two processes filling in at once take turns, and a
/// pruned entry (no body) keeps an empty column. Returns the number of
/// entries filled in.
pub async fn fill_organizations(store: &Store) -> StoreResult<u64> {
    let mut filled = 0;
    loop {
        let from: Option<i64> = {
            let mut conn = store.audit_pool.acquire().await?;
            sqlx::query_scalar("SELECT organizations_from FROM audit_head WHERE id = 1")
                .fetch_optional(&mut *conn)
                .await?
        };
        let from = from.unwrap_or(0);
        if from <= 0 {
            return Ok(filled);
        }
        let low = (from - FILL_CHUNK).max(0);
        let rows: Vec<(i64, String)> = {
            let mut conn = store.audit_pool.acquire().await?;
            sqlx::query_as(
                "SELECT seq, body FROM audit_entry WHERE seq >= $1 AND seq < $2 \
                 AND body IS NOT NULL AND organizations IS NULL",
            )
            .bind(low)
            .bind(from)
            .fetch_all(&mut *conn)
            .await?
        };
        let found: Vec<(i64, String)> = rows
            .iter()
            .filter_map(|(seq, stored)| {
                // A damaged body is left as it is: `ehrx audit verify`
                // names it by its digest.
                let json = packed::unpack(stored).ok()?;
                let v: serde_json::Value = serde_json::from_str(&json).ok()?;
                Columns::of(&v).organizations.map(|o| (*seq, o))
            })
            .collect();
        let mut tx = match store.dialect {
            Dialect::Sqlite => super::sqlite_begin_immediate(&store.audit_pool).await?,
            Dialect::Postgres => store.audit_pool.begin().await?,
        };
        let moved = sqlx::query(
            "UPDATE audit_head SET organizations_from = $1 WHERE id = 1 AND organizations_from = $2",
        )
        .bind(low)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            // Another process moved it first; start again from where it is.
            tx.rollback().await?;
            continue;
        }
        for (seq, organizations) in &found {
            filled += sqlx::query(
                "UPDATE audit_entry SET organizations = $1 \
                 WHERE seq = $2 AND body IS NOT NULL AND organizations IS NULL",
            )
            .bind(organizations)
            .bind(seq)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        // Leaves room for the writer between chunks.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
            // The requestor, the client, or one of the organisations.
            binds.push(a.clone());
            let n = binds.len();
            binds.push(format!("% {} %", super::search::like_escaped(a)));
            let m = binds.len();
            sql.push_str(&format!(
                " AND (agent = ${n} OR client = ${n} \
                 OR (' ' || organizations || ' ') LIKE ${m} ESCAPE '\\')"
            ));
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
        let rows = query
            .fetch_all(&mut *reader)
            .await
            .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .map(|(seq, b)| Ok((seq, readable(&b, seq)?)))
            .collect::<StoreResult<_>>()?)
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
        // Unpacked only once the caller may see it.
        match reach(self.access()) {
            AuditReach::All => Ok(Some(readable(&body, seq)?)),
            AuditReach::Patient(p) if patient.as_deref() == Some(&format!("Patient/{p}")) => {
                Ok(Some(readable(&body, seq)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A window no test waits out: a batch that closes does so because
    /// every request in flight has sent its job.
    const FOREVER: Duration = Duration::from_secs(3600);
    /// How long a test waits for a batch that should close at once.
    const LIVENESS: Duration = Duration::from_secs(60);

    fn job() -> (Job, oneshot::Receiver<std::result::Result<(), String>>) {
        let (done, told) = oneshot::channel();
        (Job::outbox(done), told)
    }

    /// Runs [`next_batch`] with a window of [`FOREVER`] on a thread of its
    /// own (the writer, as `waiters` know it); answers with the number of
    /// jobs its batch took.
    fn gather(
        first: Job,
        rx: &flume::Receiver<Job>,
        waiters: &Arc<Waiters>,
    ) -> std::sync::mpsc::Receiver<usize> {
        let (out, taken) = std::sync::mpsc::channel();
        let (rx, w) = (rx.clone(), Arc::clone(waiters));
        let writer = std::thread::spawn(move || {
            let (jobs, _, _) = next_batch(first, &rx, Some((FOREVER, &w)));
            let _ = out.send(jobs.len());
        });
        let _ = waiters.writer.set(writer.thread().clone());
        taken
    }

    /// Two requests in flight, the first of which has sent `first` (which
    /// opens the writer's batch).
    fn two_in_flight_one_sent() -> (Arc<Waiters>, flume::Sender<Job>, flume::Receiver<Job>) {
        let waiters = Arc::new(Waiters::default());
        waiters.in_flight.store(2, Ordering::SeqCst);
        waiters.queued.store(1, Ordering::SeqCst);
        let (tx, rx) = flume::unbounded();
        (waiters, tx, rx)
    }

    #[tokio::test]
    async fn a_batch_closes_once_every_request_in_flight_has_sent_its_job() {
        let (waiters, tx, rx) = two_in_flight_one_sent();
        let (first, _t1) = job();
        let (second, _t2) = job();
        waiters.send(&tx, second).await.unwrap();
        assert_eq!(gather(first, &rx, &waiters).recv_timeout(LIVENESS), Ok(2));
    }

    #[tokio::test]
    async fn a_batch_waits_for_a_request_still_in_flight_whose_job_wakes_it() {
        let (waiters, tx, rx) = two_in_flight_one_sent();
        let (first, _t1) = job();
        let taken = gather(first, &rx, &waiters);
        assert_eq!(
            taken.recv_timeout(Duration::from_millis(200)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        let (second, _t2) = job();
        waiters.send(&tx, second).await.unwrap();
        assert_eq!(taken.recv_timeout(LIVENESS), Ok(2));
    }

    #[test]
    fn a_batch_without_a_window_takes_what_has_queued_and_no_more() {
        let waiters = Waiters::default();
        waiters.in_flight.store(5, Ordering::SeqCst);
        let (tx, rx) = flume::unbounded();
        let (first, _t1) = job();
        let (queued, _t2) = job();
        tx.send(queued).unwrap();
        let (jobs, _, outbox) = next_batch(first, &rx, None);
        assert_eq!(jobs.len(), 2);
        assert!(outbox);
    }

    #[test]
    fn the_tree_takes_held_leaves_from_its_next_position_and_reads_the_rest() {
        let held = Committed::default();
        let leaf = |n: u8| [n; 32];
        held.extend(vec![(3, leaf(3)), (4, leaf(4)), (7, leaf(7))]);
        // 0 to 2 are read from the log first.
        assert_eq!(held.take(0), Held::From(3));
        assert_eq!(held.take(3), Held::Leaves(vec![leaf(3), leaf(4)]));
        // 5 and 6 another process appended.
        assert_eq!(held.take(5), Held::From(7));
        // 7 was read from the log meanwhile.
        assert_eq!(held.take(8), Held::Nothing);
    }

    #[test]
    fn telling_a_batch_leaves_none_of_its_jobs_counted_as_queued() {
        let waiters = Waiters::default();
        let (a, told_a) = job();
        let (b, told_b) = job();
        waiters.queued.store(2, Ordering::SeqCst);
        waiters.tell(vec![a, b], &Ok(()));
        assert_eq!(waiters.queued.load(Ordering::SeqCst), 0);
        assert_eq!(told_a.blocking_recv(), Ok(Ok(())));
        assert_eq!(told_b.blocking_recv(), Ok(Ok(())));
    }
}
