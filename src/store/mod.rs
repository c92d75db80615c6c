//! Persistence of resource versions through sqlx, on SQLite (embedded, the
//! default) or PostgreSQL, behind one API.
//!
//! Every version of every resource is kept in `resource_history`; the newest
//! version is also kept in `resource`, so reading the current version is one
//! indexed lookup. Each body is stored once: the current version's only in
//! `resource` (its history row's body is NULL until a newer version moves
//! it there), older ones in `resource_history`. Writes happen inside a [`Tx`]; dropping a `Tx` without
//! committing rolls everything back, so a failed request changes nothing.
//!
//! On SQLite the audit log's entries (`audit_entry`, `audit_head`) live in a
//! file of their own beside the database (`PATH-audit`), with a pool of its
//! own. A commit to an SQLite file makes every other connection drop its
//! page cache and memory map of that file; with the log in the same file,
//! each group commit of audit entries (one every few reads) emptied the
//! caches the reads ran on. Writes carry their audit entries atomically
//! through `audit_outbox` in the main file (see [`audit`]). The main pool's
//! connections do not attach the log's file: `BEGIN IMMEDIATE` would take
//! the write lock of every attached file, so each write would hold up the
//! log. Migrations, backups and restores, which cover both files, run on a
//! connection that attaches it ([`Store::wide`]).

pub mod audit;
pub mod auth;
pub mod backup;
mod checkpoint;
pub mod circle;
pub mod exchange;
pub mod gate;
mod health;
mod query;
mod reindex;
mod search;
pub mod secrets;

use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use tokio::sync::{Mutex, OwnedMutexGuard};

pub use gate::{Found, Gate, Reader, View, Writer};
pub use health::{PoolUse, Readiness};
pub use query::HistoryScope;
pub use reindex::reindex;

use crate::search::index::Rows;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A concurrent writer changed the same resource first.
    #[error("{0}")]
    Conflict(String),
    #[error("unsupported database URL '{0}': use sqlite:PATH or postgres://…")]
    UnsupportedUrl(String),
    /// A private key stored sealed cannot be opened.
    #[error("{0}")]
    Secret(String),
    /// A table or column the operation cannot handle (backups).
    #[error("{0}")]
    Schema(String),
    /// The audit log could not be written (the access it records must not
    /// be answered).
    #[error("audit log unavailable: {0}")]
    Audit(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// The database cancelled the statement because it ran longer than
    /// `statement_timeout` (PostgreSQL `query_canceled`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(e))
            if e.code().as_deref() == Some("57014"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One stored version of a resource.
#[derive(Debug, Clone)]
pub struct Version {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    /// FHIR instant, UTC, millisecond precision (sorts as text).
    pub last_updated: String,
    pub deleted: bool,
    /// The resource as FHIR JSON text (`None` for a deletion).
    pub body: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// SQLite allows one writer at a time; writers queue here instead of
    /// failing with SQLITE_BUSY.
    write_lock: Option<Arc<Mutex<()>>>,
    /// Seals the private keys kept in the database.
    secrets: secrets::Secrets,
    /// Callers' circles of trust, kept while the database's circle
    /// generation is unchanged.
    circles: circle::Cache,
    /// The audit log's entries: on SQLite a pool on the log's own file
    /// (see the module's documentation), on PostgreSQL `pool` itself.
    audit_pool: AnyPool,
    /// The database URL, normalised.
    url: String,
    statement_timeout: Duration,
    /// SQLite: the audit log's file.
    audit_path: Option<String>,
    /// Audit entries writes left in `audit_outbox`.
    outbox: Arc<Outbox>,
}

/// The log's writer in this process, as the store sees it: how a write asks
/// it to append the entries it left in `audit_outbox` (SQLite), which of
/// them it has appended, and who is waiting for it.
#[derive(Default)]
struct Outbox {
    /// The queue of the log's writer in this process, while one runs.
    queue: std::sync::Mutex<Option<flume::WeakSender<audit::Job>>>,
    /// The newest row this process's writer appended to the log (rows up
    /// to it are cleared by the next write).
    drained: std::sync::atomic::AtomicI64,
    /// Who waits for that writer, so that it commits a batch as soon as
    /// nobody else is coming.
    waiters: audit::Waiters,
    /// The log's write-ahead log has just been checkpointed beside the
    /// writer (SQLite): the writer copies what it appended meanwhile, so
    /// that its next batch starts the write-ahead log afresh (see
    /// [`checkpoint`]).
    checkpointed: std::sync::atomic::AtomicBool,
    /// What that writer has committed, for the log's tree.
    committed: audit::Committed,
}

/// How long a write waits for its audit entries to reach the log once they
/// are committed in `audit_outbox` (they are kept there meanwhile, and the
/// writer appends them whenever it can).
const OUTBOX_WAIT: Duration = Duration::from_secs(10);

impl Outbox {
    /// Notes the queue of the log's writer in this process.
    fn serve(&self, queue: &flume::Sender<audit::Job>) {
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(queue.downgrade());
    }

    /// Asks the log's writer in this process (if one runs) to append what
    /// writes left in `audit_outbox`, and waits until it has, so that a
    /// write's entries are in the log when its response leaves.
    async fn append(&self) {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|q| q.upgrade());
        let Some(queue) = queue else { return };
        let (done, wait) = tokio::sync::oneshot::channel();
        if self
            .waiters
            .send(&queue, audit::Job::outbox(done))
            .await
            .is_err()
        {
            return;
        }
        drop(queue);
        match tokio::time::timeout(OUTBOX_WAIT, wait).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(
                error = %e,
                "a write's audit entries are not in the log yet; they stay in audit_outbox"
            ),
            _ => tracing::warn!(
                "a write's audit entries are not in the log yet; they stay in audit_outbox"
            ),
        }
    }
}

/// The file of an SQLite database URL (`:memory:` for an in-memory
/// database).
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        return Some(":memory:".into());
    }
    Some(path.to_string())
}

/// The audit log's own file beside an SQLite database file (`:memory:` for
/// an in-memory database).
pub fn sqlite_audit_path(url: &str) -> Option<String> {
    sqlite_path(url).map(|p| {
        if p == ":memory:" {
            p
        } else {
            format!("{p}-audit")
        }
    })
}

/// Normalises a database URL: a bare SQLite path is created if missing.
fn normalise_url(url: &str) -> StoreResult<(String, Dialect)> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((url.to_string(), Dialect::Postgres));
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let mut u = format!("sqlite:{rest}");
        if !rest.contains("mode=") && !rest.contains(":memory:") {
            u.push(if rest.contains('?') { '&' } else { '?' });
            u.push_str("mode=rwc");
        }
        return Ok((u, Dialect::Sqlite));
    }
    Err(StoreError::UnsupportedUrl(url.to_string()))
}

/// How a pool's SQLite connections are set up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sqlite {
    /// The database file (resources and ehrx's own tables).
    Main,
    /// The audit log's own file.
    Audit,
}

/// Sets up a new SQLite connection; with `attach`, the audit log's file is
/// attached as `audit` (migrations, backups and restores, which cover both
/// files).
async fn sqlite_setup(
    conn: &mut AnyConnection,
    role: Sqlite,
    attach: Option<&str>,
) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA busy_timeout = 10000").await?;
    if role == Sqlite::Main {
        // Pages are read through a memory map rather than a read() system
        // call each, and each connection keeps 32 MB of them (the default
        // is 2 MB): ingest and searches spent much of their time copying
        // pages.
        conn.execute("PRAGMA mmap_size = 1073741824").await?;
        conn.execute("PRAGMA cache_size = -32768").await?;
    }
    conn.execute("PRAGMA temp_store = MEMORY").await?;
    // Checkpoints run beside the writers (checkpoint.rs).
    conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
    if let Some(path) = attach {
        sqlx::query("ATTACH DATABASE $1 AS audit")
            .bind(path)
            .execute(&mut *conn)
            .await?;
        conn.execute("PRAGMA audit.journal_mode = WAL").await?;
        conn.execute("PRAGMA audit.synchronous = NORMAL").await?;
    }
    Ok(())
}

/// A pool on `url`, its connections set up for `dialect` (and on SQLite
/// for `role`, with the audit file attached where `attach` names it).
async fn pool(
    url: &str,
    dialect: Dialect,
    size: u32,
    statement_timeout: Duration,
    role: Sqlite,
    attach: Option<String>,
) -> StoreResult<AnyPool> {
    let timeout_ms = statement_timeout.as_millis().clamp(1, i32::MAX as u128);
    let options: AnyConnectOptions = url.parse()?;
    Ok(AnyPoolOptions::new()
        .max_connections(size.max(1))
        .acquire_timeout(Duration::from_secs(30))
        // No ping before every use (a round trip per request, to the
        // SQLite worker thread or the PostgreSQL server): a connection
        // that died fails its statement, and the pool replaces it.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            let attach = attach.clone();
            Box::pin(async move {
                if dialect == Dialect::Sqlite {
                    sqlite_setup(conn, role, attach.as_deref()).await?;
                } else {
                    // Search values are skewed (one patient has 10 rows,
                    // one code 100,000): a generic plan cached for a
                    // prepared statement picks the wrong index, so every
                    // execution is planned with its actual values.
                    conn.execute("SET plan_cache_mode = force_custom_plan")
                        .await?;
                    conn.execute(format!("SET statement_timeout = {timeout_ms}").as_str())
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

/// Connections the audit log's file gets on SQLite: the batch writer's,
/// and readers of the log (searches, proofs, verification).
const AUDIT_POOL_SIZE: u32 = 4;

impl Store {
    /// Connects (creating an SQLite file if needed) without migrating.
    /// On PostgreSQL every statement is cancelled by the server after
    /// `statement_timeout`, so no query outlives its request for long.
    pub async fn connect(
        url: &str,
        pool_size: u32,
        statement_timeout: Duration,
    ) -> StoreResult<Store> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (url, dialect) = normalise_url(url)?;
        let main = pool(
            &url,
            dialect,
            pool_size,
            statement_timeout,
            Sqlite::Main,
            None,
        )
        .await?;
        let (audit_pool, audit_path) = match dialect {
            Dialect::Postgres => (main.clone(), None),
            Dialect::Sqlite => {
                let path = sqlite_audit_path(&url).unwrap_or_else(|| ":memory:".into());
                let audit_url = if path == ":memory:" {
                    "sqlite::memory:".to_string()
                } else {
                    format!("sqlite:{path}?mode=rwc")
                };
                let p = pool(
                    &audit_url,
                    dialect,
                    AUDIT_POOL_SIZE,
                    statement_timeout,
                    Sqlite::Audit,
                    None,
                )
                .await?;
                (p, Some(path))
            }
        };
        let write_lock = (dialect == Dialect::Sqlite).then(|| Arc::new(Mutex::new(())));
        let outbox = Arc::new(Outbox::default());
        if let Some(lock) = &write_lock {
            checkpoint::spawn(main.clone(), Arc::clone(lock), None);
            checkpoint::spawn(
                audit_pool.clone(),
                Arc::new(Mutex::new(())),
                Some(Arc::clone(&outbox)),
            );
        }
        Ok(Store {
            pool: main,
            audit_pool,
            url,
            statement_timeout,
            audit_path,
            dialect,
            write_lock,
            secrets: secrets::Secrets::default(),
            circles: circle::Cache::default(),
            outbox,
        })
    }

    /// SQLite: the database file.
    pub(crate) fn main_path(&self) -> Option<String> {
        match self.dialect {
            Dialect::Sqlite => sqlite_path(&self.url),
            Dialect::Postgres => None,
        }
    }

    /// One connection on the main file with the audit log's file attached
    /// as `audit` (SQLite), for what covers both files: migrations,
    /// backups, restores. On PostgreSQL, the pool itself.
    pub(crate) async fn wide(&self) -> StoreResult<AnyPool> {
        match &self.audit_path {
            None => Ok(self.pool.clone()),
            Some(path) => {
                pool(
                    &self.url,
                    self.dialect,
                    1,
                    self.statement_timeout,
                    Sqlite::Main,
                    Some(path.clone()),
                )
                .await
            }
        }
    }

    /// Seals the private keys this store keeps with `secrets`.
    pub fn with_secrets(mut self, secrets: secrets::Secrets) -> Store {
        self.secrets = secrets;
        self
    }

    /// The sealing of private keys at rest.
    pub fn secrets(&self) -> &secrets::Secrets {
        &self.secrets
    }

    /// Connects and brings the schema up to date.
    pub async fn open(
        url: &str,
        pool_size: u32,
        statement_timeout: Duration,
    ) -> StoreResult<Store> {
        let store = Store::connect(url, pool_size, statement_timeout).await?;
        store.migrate().await?;
        store.optimize().await?;
        Ok(store)
    }

    /// Keeps the query planner's statistics current. SQLite has none until
    /// `ANALYZE` runs, and without them it may scan a whole index where one
    /// seek would do; `PRAGMA optimize` re-analyses only tables that grew or
    /// shrank a lot, bounded by `analysis_limit`, so it is cheap to call
    /// often. PostgreSQL's autovacuum does this by itself.
    pub async fn optimize(&self) -> StoreResult<()> {
        if self.dialect == Dialect::Sqlite {
            // ANALYZE writes statistics: it queues with the other writers.
            let _guard = match &self.write_lock {
                Some(lock) => Some(lock.clone().lock_owned().await),
                None => None,
            };
            let mut conn = self.pool.acquire().await?;
            conn.execute("PRAGMA analysis_limit = 1000").await?;
            conn.execute("PRAGMA optimize = 0x10002").await?;
        }
        Ok(())
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        match self.dialect {
            Dialect::Sqlite => {
                // Migrations reach the audit log's file as `audit`.
                let wide = self.wide().await?;
                let result = SQLITE_MIGRATIONS.run(&wide).await;
                wide.close().await;
                result?
            }
            Dialect::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.audit_pool.close().await;
    }

    /// A connection for ehrx's own tables (accounts, tokens, keys,
    /// receipts). Resources are reached only through [`Store::gate`].
    pub async fn reader(&self) -> StoreResult<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
    }

    /// A write transaction on ehrx's own tables; resources are written only
    /// through [`Store::gate`].
    pub async fn begin(&self) -> StoreResult<Tx> {
        self.begin_in(&self.pool).await
    }

    /// A write transaction on a connection of `pool` (the main pool, or
    /// [`Store::wide`]'s).
    pub(crate) async fn begin_in(&self, pool: &AnyPool) -> StoreResult<Tx> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.dialect {
            Dialect::Sqlite => sqlite_begin_immediate(pool).await?,
            Dialect::Postgres => pool.begin().await?,
        };
        Ok(Tx {
            tx,
            dialect: self.dialect,
            _guard: guard,
            pending: PendingIndex::default(),
            circle_changed: false,
            outbox: Arc::clone(&self.outbox),
            outboxed: false,
        })
    }
}

/// How many times a write transaction waits out `busy_timeout` for another
/// process's writer before giving up (about a minute in all).
const SQLITE_BUSY_RETRIES: u32 = 6;

/// A write transaction on SQLite that takes the database's write lock at its
/// start. The in-process mutex orders this process's writers; another process
/// on the same file (`ehrx import` beside `ehrx serve`) is waited for: `BEGIN
/// IMMEDIATE` waits `busy_timeout` for its lock, and is retried while it
/// still holds it. A deferred `BEGIN` would instead fail with "database is
/// locked" when its first write finds the file changed since its first read.
async fn sqlite_begin_immediate(
    pool: &AnyPool,
) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
    let mut attempt = 0;
    loop {
        match pool.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::Database(e))
                if attempt < SQLITE_BUSY_RETRIES
                    && e.code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .is_some_and(|c| c & 0xff == 5) =>
            {
                attempt += 1;
                tracing::debug!(
                    attempt,
                    "database busy with another process's writer; waiting"
                );
            }
            other => return Ok(other?),
        }
    }
}

/// A write transaction. Dropped without [`Tx::commit`], it rolls back.
pub struct Tx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    dialect: Dialect,
    _guard: Option<OwnedMutexGuard<()>>,
    /// Search index rows of the versions written so far, not yet inserted.
    pending: PendingIndex,
    /// A resource callers' circles of trust are read from was written:
    /// the circle generation is raised at commit.
    circle_changed: bool,
    /// The log's writer is asked to append them after the commit when the
    /// transaction left audit entries in `audit_outbox` (`outboxed`).
    outbox: Arc<Outbox>,
    outboxed: bool,
}

/// Search index rows of the versions a transaction wrote, inserted together
/// in multi-row statements (a transaction Bundle's hundreds of resources in
/// a few statements rather than several each) — before anything reads the
/// index in that transaction ([`gate::View`] flushes first), when many have
/// gathered, and at commit.
#[derive(Default)]
pub(super) struct PendingIndex {
    items: Vec<(String, String, Rows)>,
    rows: usize,
}

/// Rows gathered before they are inserted without waiting for a reader or
/// the commit.
const PENDING_ROWS: usize = 20_000;

impl PendingIndex {
    fn push(&mut self, rtype: &str, id: &str, rows: Rows) {
        self.rows += rows.len();
        self.items.push((rtype.to_string(), id.to_string(), rows));
    }

    /// Forgets the rows of `rtype/id` (a newer version replaces them).
    fn forget(&mut self, rtype: &str, id: &str) {
        self.items.retain(|(t, i, _)| !(t == rtype && i == id));
        self.rows = self.items.iter().map(|(_, _, r)| r.len()).sum();
    }

    /// Inserts every gathered row.
    pub(super) async fn flush(&mut self, conn: &mut AnyConnection) -> StoreResult<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        self.rows = 0;
        insert_rows(conn, &items).await
    }
}

impl Tx {
    pub async fn commit(mut self) -> StoreResult<()> {
        self.pending.flush(&mut self.tx).await?;
        if self.circle_changed {
            circle::raise_generation(&mut self.tx).await?;
        }
        let Tx {
            tx,
            _guard,
            outbox,
            outboxed,
            ..
        } = self;
        tx.commit().await?;
        // Other writers go on while this one waits for the log.
        drop(_guard);
        if outboxed {
            outbox.append().await;
        }
        Ok(())
    }

    /// Marks the transaction as leaving audit entries in `audit_outbox`.
    pub(super) fn outboxed(&mut self) {
        self.outboxed = true;
    }

    /// Marks the transaction as changing callers' circles of trust.
    pub(super) fn circle_changed(&mut self) {
        self.circle_changed = true;
    }

    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// The connection, and the index rows to insert before reading on it.
    pub(super) fn conn_and_pending(&mut self) -> (&mut AnyConnection, &mut PendingIndex) {
        (&mut self.tx, &mut self.pending)
    }

    /// The current version of a resource, locked for update where the
    /// database supports row locks.
    pub(super) async fn current_for_update(
        &mut self,
        rtype: &str,
        id: &str,
    ) -> StoreResult<Option<Version>> {
        let lock = self.dialect == Dialect::Postgres;
        query::current(&mut self.tx, rtype, id, lock).await
    }

    /// Serialises the conditional writes (`If-None-Exist`, conditional
    /// update) of concurrent transactions on the same criteria, so that two
    /// of them cannot both find no match and both create. SQLite's single
    /// writer does this already; on PostgreSQL each criteria string
    /// (`Type?query`) takes a transaction-scoped advisory lock, held until
    /// commit or rollback, and the search that follows sees what the
    /// previous holder committed. Locks are taken in one global order (of
    /// their keys), so transactions locking several never deadlock.
    pub(super) async fn lock_conditions(&mut self, criteria: &[String]) -> StoreResult<()> {
        self.lock_names(criteria).await
    }

    /// Takes a transaction-scoped lock on each name, in one global order
    /// (of their keys) so that transactions taking several never deadlock.
    /// PostgreSQL only: SQLite's single writer serialises writers already.
    pub(super) async fn lock_names(&mut self, names: &[String]) -> StoreResult<()> {
        if self.dialect != Dialect::Postgres {
            return Ok(());
        }
        let mut keys: Vec<i64> = names
            .iter()
            .map(|c| {
                use sha2::Digest as _;
                let d = sha2::Sha256::digest(c.as_bytes());
                i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }

    /// Appends a version (and makes it current), replacing the resource's
    /// search index rows.
    pub(super) async fn put_version(&mut self, v: &Version, rows: Rows) -> StoreResult<()> {
        self.circle_changed |= circle::reads_type(&v.rtype);
        let conn: &mut AnyConnection = &mut self.tx;
        if v.version > 1 {
            // The body of the version being replaced moves from `resource`
            // into its history row (it was stored only once, as current).
            sqlx::query(
                "UPDATE resource_history SET body = (SELECT r.body FROM resource r \
                 WHERE r.rtype = resource_history.rtype AND r.id = resource_history.id \
                 AND r.version = resource_history.version) \
                 WHERE rtype = $1 AND id = $2 AND deleted = 0 AND body IS NULL",
            )
            .bind(&v.rtype)
            .bind(&v.id)
            .execute(&mut *conn)
            .await?;
        }
        // The new version's body is stored in `resource` only.
        let inserted = sqlx::query(
            "INSERT INTO resource_history (rtype, id, version, last_updated, deleted, body) \
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&v.rtype)
        .bind(&v.id)
        .bind(v.version)
        .bind(&v.last_updated)
        .bind(v.deleted as i64)
        .execute(&mut *conn)
        .await;
        if let Err(e) = inserted {
            if let sqlx::Error::Database(db) = &e {
                if db.is_unique_violation() {
                    return Err(StoreError::Conflict(format!(
                        "{}/{} was changed concurrently; version {} already exists",
                        v.rtype, v.id, v.version
                    )));
                }
            }
            return Err(e.into());
        }
        sqlx::query(
            "INSERT INTO resource (rtype, id, version, last_updated, deleted, body) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (rtype, id) DO UPDATE SET version = excluded.version, \
             last_updated = excluded.last_updated, deleted = excluded.deleted, body = excluded.body",
        )
        .bind(&v.rtype)
        .bind(&v.id)
        .bind(v.version)
        .bind(&v.last_updated)
        .bind(v.deleted as i64)
        .bind(v.body.as_deref())
        .execute(&mut *conn)
        .await?;
        if v.version > 1 {
            self.pending.forget(&v.rtype, &v.id);
            delete_rows(&mut self.tx, &v.rtype, &v.id).await?;
        }
        self.pending.push(&v.rtype, &v.id, rows);
        if self.pending.rows > PENDING_ROWS {
            self.pending.flush(&mut self.tx).await?;
        }
        Ok(())
    }

    /// Replaces the search index rows of a current resource (reindexing).
    pub(super) async fn replace_index(
        &mut self,
        rtype: &str,
        id: &str,
        rows: &Rows,
    ) -> StoreResult<()> {
        self.circle_changed |= circle::reads_type(rtype);
        self.pending.flush(&mut self.tx).await?;
        let conn: &mut AnyConnection = &mut self.tx;
        delete_rows(conn, rtype, id).await?;
        insert_rows(conn, &[(rtype.to_string(), id.to_string(), rows.clone())]).await?;
        Ok(())
    }
}

/// Current, non-deleted resources of every type in (type, id) order,
/// starting after `after`: for reindexing and exports.
pub(super) async fn current_page(
    conn: &mut AnyConnection,
    after: Option<(&str, &str)>,
    limit: usize,
) -> StoreResult<Vec<Version>> {
    let (t, i) = after.unwrap_or(("", ""));
    let rows = sqlx::query(&format!(
        "SELECT rtype, id, version, last_updated, deleted, body FROM resource \
         WHERE deleted = 0 AND (rtype > $1 OR (rtype = $2 AND id > $3)) \
         ORDER BY rtype, id LIMIT {limit}"
    ))
    .bind(t)
    .bind(t)
    .bind(i)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(query::version_from_row).collect()
}

/// Checks that the database answers.
pub async fn ping(conn: &mut AnyConnection) -> StoreResult<()> {
    conn.ping().await?;
    let _ = sqlx::query("SELECT 1")
        .fetch_one(&mut *conn)
        .await?
        .try_get::<i64, _>(0);
    Ok(())
}

const INDEX_TABLES: [&str; 7] = [
    "idx_string",
    "idx_token",
    "idx_reference",
    "idx_date",
    "idx_number",
    "idx_quantity",
    "idx_uri",
];

/// Removes the search index rows of one resource.
async fn delete_rows(conn: &mut AnyConnection, rtype: &str, id: &str) -> StoreResult<()> {
    for table in INDEX_TABLES {
        sqlx::query(&format!("DELETE FROM {table} WHERE rtype = $1 AND id = $2"))
            .bind(rtype)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A value of an index row column.
enum Col<'a> {
    T(&'a str),
    I(i64),
    R(f64),
}

/// Appends the parameters of a multi-row `VALUES` list to `sql`: `rows`
/// groups of `per_row`, numbered (`$1`, PostgreSQL) or anonymous (`?`,
/// SQLite, which binds numbered parameters in time quadratic in their
/// count).
pub(super) fn push_values(sql: &mut String, rows: usize, per_row: usize, numbered: bool) {
    let mut n = 0;
    for i in 0..rows {
        sql.push_str(if i > 0 { ", (" } else { "(" });
        for j in 0..per_row {
            n += 1;
            if j > 0 {
                sql.push_str(", ");
            }
            if numbered {
                sql.push('$');
                sql.push_str(&n.to_string());
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
}

/// Rows per multi-row INSERT: full statements share one prepared statement.
const ROWS_PER_INSERT: usize = 128;

/// Inserts rows of one table in multi-row statements; every row starts
/// with its resource's type and id. SQLite gets anonymous `?` parameters:
/// binding numbered ones looks each number up in a list, which costs the
/// square of their count per statement.
async fn insert_table(
    conn: &mut AnyConnection,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Col<'_>>>,
) -> StoreResult<()> {
    let per_row = columns.len() + 2;
    let numbered = !conn.backend_name().eq_ignore_ascii_case("sqlite");
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut sql = format!(
            "INSERT INTO {table} (rtype, id, {}) VALUES ",
            columns.join(", ")
        );
        push_values(&mut sql, chunk.len(), per_row, numbered);
        let mut q = sqlx::query(&sql);
        for row in chunk {
            for c in row {
                q = match c {
                    Col::T(s) => q.bind(*s),
                    Col::I(i) => q.bind(*i),
                    Col::R(f) => q.bind(*f),
                };
            }
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Inserts the index rows of several resources, one table at a time.
async fn insert_rows(
    conn: &mut AnyConnection,
    items: &[(String, String, Rows)],
) -> StoreResult<()> {
    use Col::{I, R, T};
    /// The rows of one table of every item, each led by type and id.
    fn gather<'a, X: 'a>(
        items: &'a [(String, String, Rows)],
        of: impl Fn(&'a Rows) -> &'a [X],
        cols: impl Fn(&'a X) -> Vec<Col<'a>>,
    ) -> Vec<Vec<Col<'a>>> {
        let mut out = Vec::new();
        for (t, i, rows) in items {
            for r in of(rows) {
                let mut v = vec![T(t.as_str()), T(i.as_str())];
                v.extend(cols(r));
                out.push(v);
            }
        }
        out
    }
    let v = gather(
        items,
        |r| &r.strings,
        |r| vec![T(&r.param), I(r.grp), T(&r.norm), T(&r.raw)],
    );
    if !v.is_empty() {
        insert_table(conn, "idx_string", &["param", "grp", "norm", "raw"], v).await?;
    }
    let v = gather(
        items,
        |r| &r.tokens,
        |r| vec![T(&r.param), I(r.grp), T(&r.system), T(&r.code), T(&r.text)],
    );
    if !v.is_empty() {
        insert_table(
            conn,
            "idx_token",
            &["param", "grp", "system", "code", "text"],
            v,
        )
        .await?;
    }
    let v = gather(
        items,
        |r| &r.references,
        |r| {
            vec![
                T(&r.param),
                I(r.grp),
                T(&r.target_type),
                T(&r.target_id),
                T(&r.url),
            ]
        },
    );
    if !v.is_empty() {
        insert_table(
            conn,
            "idx_reference",
            &["param", "grp", "target_type", "target_id", "url"],
            v,
        )
        .await?;
    }
    let v = gather(
        items,
        |r| &r.dates,
        |r| vec![T(&r.param), I(r.grp), T(&r.lo), T(&r.hi)],
    );
    if !v.is_empty() {
        insert_table(conn, "idx_date", &["param", "grp", "lo", "hi"], v).await?;
    }
    let v = gather(
        items,
        |r| &r.numbers,
        |r| vec![T(&r.param), I(r.grp), R(r.value)],
    );
    if !v.is_empty() {
        insert_table(conn, "idx_number", &["param", "grp", "value"], v).await?;
    }
    let v = gather(
        items,
        |r| &r.quantities,
        |r| vec![T(&r.param), I(r.grp), T(&r.system), T(&r.code), R(r.value)],
    );
    if !v.is_empty() {
        insert_table(
            conn,
            "idx_quantity",
            &["param", "grp", "system", "code", "value"],
            v,
        )
        .await?;
    }
    let v = gather(
        items,
        |r| &r.uris,
        |r| vec![T(&r.param), I(r.grp), T(&r.value)],
    );
    if !v.is_empty() {
        insert_table(conn, "idx_uri", &["param", "grp", "value"], v).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sqlite_audit_path;

    #[test]
    fn the_audit_log_file_sits_beside_the_database_file() {
        assert_eq!(
            sqlite_audit_path("sqlite:/srv/ehrx.db?mode=rwc").as_deref(),
            Some("/srv/ehrx.db-audit")
        );
        assert_eq!(
            sqlite_audit_path("sqlite:ehrx.db").as_deref(),
            Some("ehrx.db-audit")
        );
        assert_eq!(
            sqlite_audit_path("sqlite://data/ehrx.db").as_deref(),
            Some("data/ehrx.db-audit")
        );
        assert_eq!(
            sqlite_audit_path("sqlite::memory:").as_deref(),
            Some(":memory:")
        );
        assert_eq!(sqlite_audit_path("postgres://h/db"), None);
    }
}
