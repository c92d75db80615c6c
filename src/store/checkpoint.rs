//! SQLite keeps committed pages in its write-ahead log until a checkpoint
//! copies them into the database file. By default the connection whose
//! commit takes the log past 1,000 pages runs that checkpoint itself, while
//! it still holds the write lock, so every few transactions one writer pays
//! for copying and syncing the pages of all of them, and under concurrent
//! readers (which keep the log from being reset) it can pay again at
//! almost every commit. ehrx turns that off (`wal_autocheckpoint = 0` on every
//! connection) and checkpoints here instead, on its own connection, beside
//! the writers: a PASSIVE checkpoint copies what no reader still needs and
//! blocks nobody. Should readers keep the log from being reset while it grows
//! past [`WAL_LIMIT_PAGES`], one RESTART checkpoint is taken between writers
//! (holding the write lock), which waits for those readers and bounds the
//! log's size.
//!
//! The audit log's file has one busy writer, which appends a batch every
//! millisecond or so: a checkpoint beside it never finds every frame copied
//! when it ends, so SQLite never starts that write-ahead log afresh. It
//! would grow to [`WAL_LIMIT_PAGES`], and the RESTART checkpoint there
//! holds the writer, and every request waiting for its batch, until the
//! whole log is copied. So once a checkpoint of the log has copied most of
//! it, the writer copies the few frames it appended meanwhile
//! ([`super::Outbox::checkpointed`]), and its next batch begins the
//! write-ahead log again from the start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyPool, Row};
use tokio::sync::Mutex;

use super::{Outbox, StoreResult};

/// How often the log is checkpointed.
const EVERY: Duration = Duration::from_millis(250);
/// Past this many pages (256 MiB at 4 KiB pages), writers wait for a full
/// checkpoint.
const WAL_LIMIT_PAGES: i64 = 65_536;

/// Checkpoints the log of `pool`'s database every [`EVERY`] until the pool
/// is closed (or the runtime ends); with `writer`, the audit log's, whose
/// writer is told after each checkpoint to finish it.
pub(super) fn spawn(pool: AnyPool, write_lock: Arc<Mutex<()>>, writer: Option<Arc<Outbox>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                break;
            }
            match checkpoint(&pool, &write_lock).await {
                Ok(()) => {
                    if let Some(w) = &writer {
                        w.checkpointed.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
            }
        }
    });
}

/// One PASSIVE checkpoint, followed by a RESTART one between writers when
/// the log has outgrown [`WAL_LIMIT_PAGES`].
async fn checkpoint(pool: &AnyPool, write_lock: &Mutex<()>) -> StoreResult<()> {
    let mut conn = pool.acquire().await?;
    if run(&mut conn, "PASSIVE").await? > WAL_LIMIT_PAGES {
        let _writers = write_lock.lock().await;
        run(&mut conn, "RESTART").await?;
    }
    Ok(())
}

/// Runs a checkpoint; returns the number of pages in the log.
async fn run(conn: &mut sqlx::AnyConnection, mode: &str) -> StoreResult<i64> {
    let row = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get(1)?)
}
