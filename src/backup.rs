//! `ehrx backup`, `ehrx backup verify` and `ehrx restore`: a consistent copy
//! of the whole database in one file that can be checked without restoring
//! it, and scheduled backups for the embedded database.
//!
//! The same format is written from SQLite and from PostgreSQL: ehrx's own
//! export, read in one snapshot ([`crate::store::backup`]) while the server
//! goes on writing, so a backup holds exactly the writes committed before
//! it began. (SQLite's `VACUUM INTO` would copy the file as it is, but not a
//! PostgreSQL database; `pg_dump` would need the client tools of the server's
//! version. One format from one code path also moves an embedded database
//! to PostgreSQL.)
//!
//! A backup is gzip-compressed JSON lines:
//! 1. the manifest: format version, ehrx version, schema version (the last
//!    migration applied), rows per table, current resources and versions
//!    per resource type, and the last audit checkpoint (`null` until an
//!    audit trail exists);
//! 2. for each table, a header line naming it and its columns, then one JSON
//!    array per row;
//! 3. a last line with the SHA-256 of every byte (uncompressed) before it.
//!
//! A file is sound when it decompresses, its digest matches, every line
//! parses and every count matches the manifest: a truncated file has no
//! digest line (or no gzip trailer), a flipped bit changes the digest.
//! Restore checks the whole file before loading it, loads it into an empty
//! database in one transaction, checks the digest again while loading and
//! the counts of what it loaded before committing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::store::backup::{Cell, Column, Kind, TypeCount};
use crate::store::{Store, StoreError};

/// The format this build writes and reads.
pub const FORMAT: &str = "ehrx-backup";
pub const FORMAT_VERSION: u32 = 1;
/// Rows sent to the database in one batch while restoring.
const RESTORE_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not a sound backup (truncated, altered, not a backup).
    #[error("{0}: damaged backup, refused: {1}")]
    Damaged(PathBuf, String),
    /// The backup is sound but cannot go into this database.
    #[error("{0}")]
    Refused(String),
}

pub type BackupResult<T> = Result<T, BackupError>;

/// What a backup holds, written first in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub ehrx_version: String,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub created: String,
    /// `sqlite` or `postgres`: where it was taken.
    pub database: String,
    /// The last schema migration applied to the database backed up.
    pub schema_version: i64,
    /// Rows per table.
    pub tables: BTreeMap<String, i64>,
    /// Current (not deleted) resources and stored versions per type.
    pub resources: BTreeMap<String, TypeCount>,
    /// The audit log's newest signed checkpoint in the snapshot (as `GET
    /// /audit/checkpoint` serves it); `null` when none was signed yet. The
    /// audit tables themselves are in the backup like every other table.
    pub audit_checkpoint: Option<Value>,
}

/// A checked backup: its manifest and digest.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub file: PathBuf,
    /// SHA-256 (hex) of the uncompressed contents before the digest line.
    pub sha256: String,
    /// Size of the file on disk.
    pub bytes: u64,
    pub manifest: Manifest,
}

/// The header line of a table.
#[derive(Debug, Serialize, Deserialize)]
struct TableHeader {
    table: String,
    columns: Vec<Column>,
}

/// The last line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    sha256: String,
}

fn cell_json(cell: Cell) -> Result<Value, String> {
    Ok(match cell {
        Cell::Null => Value::Null,
        Cell::Int(i) => Value::from(i),
        Cell::Real(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("the value {f} cannot be written"))?,
        Cell::Text(s) => Value::String(s),
    })
}

fn json_cell(v: &Value, kind: Kind) -> Option<Cell> {
    Some(match (v, kind) {
        (Value::Null, _) => Cell::Null,
        (Value::Number(n), Kind::Int) => Cell::Int(n.as_i64()?),
        (Value::Number(n), Kind::Real) => Cell::Real(n.as_f64()?),
        (Value::String(s), Kind::Text) => Cell::Text(s.clone()),
        _ => return None,
    })
}

/// Writes lines into a gzip stream and digests them.
struct Writer {
    out: GzEncoder<BufWriter<std::fs::File>>,
    digest: Sha256,
    path: PathBuf,
}

impl Writer {
    fn line(&mut self, v: &impl Serialize) -> BackupResult<()> {
        let mut text = serde_json::to_vec(v).map_err(|e| {
            BackupError::Io(self.path.clone(), std::io::Error::other(e.to_string()))
        })?;
        text.push(b'\n');
        self.digest.update(&text);
        self.out
            .write_all(&text)
            .map_err(|e| BackupError::Io(self.path.clone(), e))
    }
}

/// Takes a backup of `store` into `out` (written beside it under a temporary
/// name and renamed when complete, so `out` is never a partial file).
pub async fn write(store: &Store, out: &Path) -> BackupResult<Checked> {
    let partial = partial_name(out);
    let result = write_to(store, &partial).await;
    let (sha256, manifest) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| BackupError::Io(out.to_path_buf(), e))?;
    let bytes = std::fs::metadata(out)
        .map_err(|e| BackupError::Io(out.to_path_buf(), e))?
        .len();
    Ok(Checked {
        file: out.to_path_buf(),
        sha256,
        bytes,
        manifest,
    })
}

fn partial_name(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

async fn write_to(store: &Store, path: &Path) -> BackupResult<(String, Manifest)> {
    let io = |e| BackupError::Io(path.to_path_buf(), e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = Writer {
        out: GzEncoder::new(BufWriter::new(file), flate2::Compression::new(3)),
        digest: Sha256::new(),
        path: path.to_path_buf(),
    };
    let mut snapshot = store.snapshot().await?;
    let audit_checkpoint = snapshot.audit_checkpoint().await?;
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        ehrx_version: env!("CARGO_PKG_VERSION").into(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        database: match snapshot.dialect() {
            crate::store::Dialect::Sqlite => "sqlite".into(),
            crate::store::Dialect::Postgres => "postgres".into(),
        },
        schema_version: snapshot.schema_version,
        tables: snapshot.rows.iter().cloned().collect(),
        resources: snapshot.types.iter().cloned().collect(),
        audit_checkpoint,
    };
    w.line(&manifest)?;
    for table in snapshot.tables.clone() {
        w.line(&TableHeader {
            table: table.name.clone(),
            columns: table.columns.clone(),
        })?;
        snapshot
            .rows(&table, |cells| {
                let row = cells
                    .into_iter()
                    .map(cell_json)
                    .collect::<Result<Vec<Value>, String>>()
                    .map_err(|why| BackupError::Refused(format!("{}: {why}", table.name)))?;
                w.line(&row)
            })
            .await?;
    }
    snapshot.finish().await?;
    let sha256 = hex::encode(w.digest.clone().finalize());
    w.line(&Trailer {
        sha256: sha256.clone(),
    })?;
    let file = w
        .out
        .finish()
        .map_err(io)?
        .into_inner()
        .map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok((sha256, manifest))
}

/// One content line of a backup as read back.
enum Line {
    Manifest(Box<Manifest>),
    Table(TableHeader),
    Row(Vec<Value>),
}

/// Reads a backup line by line, digesting everything before the last line
/// and checking the last line against it. `each` sees the content lines in
/// order; the digest is checked only at the end, so a caller that acts on
/// lines must be able to undo them.
fn read_lines(path: &Path, mut each: impl FnMut(Line) -> BackupResult<()>) -> BackupResult<String> {
    let damaged = |why: String| BackupError::Damaged(path.to_path_buf(), why);
    let file = std::fs::File::open(path).map_err(|e| BackupError::Io(path.to_path_buf(), e))?;
    let mut reader = BufReader::new(MultiGzDecoder::new(BufReader::new(file)));
    let mut digest = Sha256::new();
    let mut pending: Option<Vec<u8>> = None;
    let mut number = 0usize;
    loop {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| damaged(format!("cannot decompress: {e}")))?;
        if n == 0 {
            break;
        }
        if let Some(prev) = pending.replace(line) {
            number += 1;
            digest.update(&prev);
            let value: Value = serde_json::from_slice(&prev)
                .map_err(|e| damaged(format!("line {number} is not JSON: {e}")))?;
            let parsed =
                match value {
                    Value::Array(cells) if number > 1 => Line::Row(cells),
                    v if number == 1 => {
                        Line::Manifest(Box::new(serde_json::from_value(v).map_err(|e| {
                            damaged(format!("the manifest (line 1) is not one: {e}"))
                        })?))
                    }
                    v => Line::Table(serde_json::from_value(v).map_err(|e| {
                        damaged(format!("line {number} is not a table header: {e}"))
                    })?),
                };
            each(parsed)?;
        }
    }
    let Some(last) = pending else {
        return Err(damaged("the file is empty".into()));
    };
    if !last.ends_with(b"\n") {
        return Err(damaged(
            "the file is truncated (its last line is incomplete)".into(),
        ));
    }
    let trailer: Trailer = serde_json::from_slice(&last).map_err(|_| {
        damaged("the file is truncated or altered: its last line is not the digest line".into())
    })?;
    let actual = hex::encode(digest.finalize());
    if actual != trailer.sha256 {
        return Err(damaged(format!(
            "its contents do not match its SHA-256 (recorded {}, computed {actual})",
            trailer.sha256
        )));
    }
    Ok(actual)
}

/// Checks a backup without restoring it: it decompresses, its digest
/// matches, every line is what it should be and every count matches the
/// manifest.
pub fn verify(path: &Path) -> BackupResult<Checked> {
    let damaged = |why: String| BackupError::Damaged(path.to_path_buf(), why);
    let mut manifest: Option<Manifest> = None;
    let mut current: Option<(String, usize)> = None;
    let mut rows: BTreeMap<String, i64> = BTreeMap::new();
    let mut types: BTreeMap<String, TypeCount> = BTreeMap::new();
    // Columns of `resource` and `resource_history` used to count per type.
    let mut type_columns: Option<(usize, Option<usize>)> = None;
    let sha256 = read_lines(path, |line| {
        match line {
            Line::Manifest(m) => {
                if m.format != FORMAT {
                    return Err(damaged(format!(
                        "not an ehrx backup (format {:?})",
                        m.format
                    )));
                }
                if m.format_version != FORMAT_VERSION {
                    return Err(BackupError::Refused(format!(
                        "{}: backup format version {} is not the one this ehrx reads ({FORMAT_VERSION})",
                        path.display(),
                        m.format_version
                    )));
                }
                manifest = Some(*m);
            }
            Line::Table(h) => {
                if rows.contains_key(&h.table) {
                    return Err(damaged(format!("table {} appears twice", h.table)));
                }
                rows.insert(h.table.clone(), 0);
                let col = |name: &str| h.columns.iter().position(|c| c.name == name);
                type_columns = match h.table.as_str() {
                    "resource" => col("rtype").map(|r| (r, col("deleted"))),
                    "resource_history" => col("rtype").map(|r| (r, None)),
                    _ => None,
                };
                current = Some((h.table, h.columns.len()));
            }
            Line::Row(cells) => {
                let Some((table, width)) = &current else {
                    return Err(damaged("a row before any table header".into()));
                };
                if cells.len() != *width {
                    return Err(damaged(format!(
                        "a row of {table} has {} values, not {width}",
                        cells.len()
                    )));
                }
                *rows.entry(table.clone()).or_default() += 1;
                if let Some((rtype, deleted)) = type_columns {
                    let rtype = cells[rtype].as_str().unwrap_or_default().to_string();
                    let count = types.entry(rtype).or_default();
                    match deleted {
                        Some(d) if cells[d].as_i64() == Some(0) => count.current += 1,
                        Some(_) => {}
                        None => count.versions += 1,
                    }
                }
            }
        }
        Ok(())
    })?;
    let manifest = manifest.ok_or_else(|| damaged("no manifest".into()))?;
    if rows != manifest.tables {
        return Err(damaged(format!(
            "the rows per table ({rows:?}) differ from the manifest's ({:?})",
            manifest.tables
        )));
    }
    types.retain(|_, c| *c != TypeCount::default());
    if types != manifest.resources {
        return Err(damaged(
            "the resources per type differ from the manifest's".into(),
        ));
    }
    let bytes = std::fs::metadata(path)
        .map_err(|e| BackupError::Io(path.to_path_buf(), e))?
        .len();
    Ok(Checked {
        file: path.to_path_buf(),
        sha256,
        bytes,
        manifest,
    })
}

/// Restores a backup into `store`, which must be empty (freshly migrated).
/// Everything is loaded in one transaction, committed only once the digest
/// and every count have been checked again.
pub async fn restore(store: &Store, path: &Path) -> BackupResult<Checked> {
    let checked = verify(path)?;
    let m = &checked.manifest;
    let version = store.schema_version().await?;
    if version != m.schema_version {
        return Err(BackupError::Refused(format!(
            "the backup has schema version {}, this database {version}: restore it with the \
             ehrx release that wrote it ({}), then upgrade",
            m.schema_version, m.ehrx_version
        )));
    }
    if let Some(table) = store.first_nonempty_table().await? {
        return Err(BackupError::Refused(format!(
            "the database is not empty (table {table} has rows): restore into a new, empty database"
        )));
    }
    let mut restorer = store.restorer().await?;
    // The file is read again: lines are decoded here and inserted in batches
    // below, since the database calls are async and the reader is not.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<BackupResult<Batch>>(4);
    let file = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || read_batches(&file, &tx));
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        let Some(target) = restorer.table(&batch.table) else {
            return Err(BackupError::Refused(format!(
                "this database has no table {}: the backup comes from another schema",
                batch.table
            )));
        };
        if !same_columns(&target.columns, &batch.columns) {
            return Err(BackupError::Refused(format!(
                "table {} has other columns here than in the backup",
                batch.table
            )));
        }
        restorer
            .insert(&batch.table, &batch.columns, &batch.rows)
            .await?;
    }
    let sha256 = reader
        .await
        .map_err(|e| BackupError::Refused(format!("reading the backup failed: {e}")))??;
    if sha256 != checked.sha256 {
        return Err(BackupError::Damaged(
            path.to_path_buf(),
            "the file changed while it was restored".into(),
        ));
    }
    let (rows, types) = restorer.counts().await?;
    let rows: BTreeMap<String, i64> = rows.into_iter().filter(|(_, n)| *n > 0).collect();
    let mut expected = m.tables.clone();
    expected.retain(|_, n| *n > 0);
    let types: BTreeMap<String, TypeCount> = types.into_iter().collect();
    if rows != expected || types != m.resources {
        return Err(BackupError::Refused(
            "what was loaded differs from the manifest; nothing was restored".into(),
        ));
    }
    restorer.commit().await?;
    Ok(checked)
}

/// Whether the backup's columns are this database's, in any order.
fn same_columns(here: &[Column], backup: &[Column]) -> bool {
    let mut a: Vec<_> = here.iter().map(|c| (&c.name, c.kind)).collect();
    let mut b: Vec<_> = backup.iter().map(|c| (&c.name, c.kind)).collect();
    a.sort();
    b.sort();
    a == b
}

/// Rows of one table, decoded.
struct Batch {
    table: String,
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
}

/// Decodes the rows of a backup into batches sent to `tx`; returns the
/// digest.
fn read_batches(
    path: &Path,
    tx: &tokio::sync::mpsc::Sender<BackupResult<Batch>>,
) -> BackupResult<String> {
    let damaged = |why: String| BackupError::Damaged(path.to_path_buf(), why);
    let mut batch: Option<Batch> = None;
    let send = |b: Batch| {
        tx.blocking_send(Ok(b))
            .map_err(|_| BackupError::Refused("the restore stopped".into()))
    };
    let result = read_lines(path, |line| {
        match line {
            Line::Manifest(_) => {}
            Line::Table(h) => {
                if let Some(b) = batch.take() {
                    send(b)?;
                }
                batch = Some(Batch {
                    table: h.table,
                    columns: h.columns,
                    rows: Vec::new(),
                });
            }
            Line::Row(values) => {
                let b = batch
                    .as_mut()
                    .ok_or_else(|| damaged("a row before any table header".into()))?;
                let row = values
                    .iter()
                    .zip(&b.columns)
                    .map(|(v, c)| json_cell(v, c.kind))
                    .collect::<Option<Vec<Cell>>>()
                    .ok_or_else(|| {
                        damaged(format!(
                            "a row of {} has a value of the wrong type",
                            b.table
                        ))
                    })?;
                b.rows.push(row);
                if b.rows.len() >= RESTORE_BATCH {
                    let full = Batch {
                        table: b.table.clone(),
                        columns: b.columns.clone(),
                        rows: std::mem::take(&mut b.rows),
                    };
                    send(full)?;
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(sha) => {
            if let Some(b) = batch.take() {
                send(b)?;
            }
            Ok(sha)
        }
        Err(e) => {
            let _ = tx.blocking_send(Err(BackupError::Refused(e.to_string())));
            Err(e)
        }
    }
}

/// The name of a scheduled backup taken at `now`.
fn scheduled_name(now: chrono::DateTime<chrono::Utc>) -> String {
    format!("ehrx-backup-{}.jsonl.gz", now.format("%Y%m%dT%H%M%S%.3fZ"))
}

/// Keeps the newest `keep` scheduled backups in `dir`, removes the rest.
fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ehrx-backup-") && n.ends_with(".jsonl.gz"))
        })
        .collect();
    // The names sort by time.
    found.sort();
    let excess = found.len().saturating_sub(keep);
    let removed: Vec<PathBuf> = found.drain(..excess).collect();
    for p in &removed {
        std::fs::remove_file(p)?;
    }
    Ok(removed)
}

/// Takes a backup into `dir` every `every`, keeping the newest `keep`, until
/// `stop` turns true (a backup being written is finished first).
pub fn spawn_scheduled(
    store: Store,
    dir: PathBuf,
    every: Duration,
    keep: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::error!(dir = %dir.display(), "scheduled backup failed: {e}");
                crate::metrics::backup_finished(false);
                continue;
            }
            let out = dir.join(scheduled_name(chrono::Utc::now()));
            match write(&store, &out).await {
                Ok(done) => {
                    crate::metrics::backup_finished(true);
                    tracing::info!(
                        file = %done.file.display(),
                        bytes = done.bytes,
                        sha256 = %done.sha256,
                        "scheduled backup written"
                    );
                    match prune(&dir, keep) {
                        Ok(removed) => {
                            for p in removed {
                                tracing::info!(file = %p.display(), "old scheduled backup removed");
                            }
                        }
                        Err(e) => tracing::warn!("old scheduled backups not removed: {e}"),
                    }
                }
                Err(e) => {
                    crate::metrics::backup_finished(false);
                    tracing::error!("scheduled backup failed: {e}");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_names_sort_by_time() {
        let a = chrono::DateTime::parse_from_rfc3339("2025-01-02T03:04:05.006Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let b = a + chrono::Duration::milliseconds(994);
        assert_eq!(
            scheduled_name(a),
            "ehrx-backup-20250102T030405.006Z.jsonl.gz"
        );
        assert!(scheduled_name(a) < scheduled_name(b));
    }
}
