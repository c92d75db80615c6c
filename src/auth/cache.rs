//! Verified access tokens, remembered until they expire, so that a request
//! with a token seen before costs one hash lookup instead of an RS256
//! verification and a database round trip — without weakening revocation.
//!
//! Every revocation (a token, a grant, a client or a user disabled) is also
//! a row of `auth_revocation`, numbered in commit order. Each server
//! process reads the rows it has not seen every quarter of
//! `revocation_max_delay` and forgets the tokens they name; the process
//! that revoked reads them at once, after its commit. A remembered token is
//! used only while the last successful read is younger than
//! `revocation_max_delay`: if the database cannot be read, every request
//! goes back to the full check, so a revocation takes effect on every node
//! within that delay whatever happens.
//!
//! A token is remembered by the SHA-256 of its whole text, so a forged token
//! that repeats a real one's `jti` never matches; entries carry the `jti`,
//! grant, client and user they belong to, which is what revocations name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::token::Principal;
use crate::policy::Access;
use crate::store::{auth as db, Store, StoreResult};

/// A checked access token and what it grants.
#[derive(Debug)]
pub struct Verified {
    pub principal: Principal,
    pub access: Access,
    /// Expiry, Unix seconds.
    pub exp: i64,
    pub grant_id: String,
    pub user_id: Option<String>,
}

/// The key a token is remembered by.
pub type TokenKey = [u8; 32];

pub fn key_of(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// Most tokens remembered at once; when full, expired ones are dropped, and
/// if none is, everything (the next requests pay the full check again).
const CAPACITY: usize = 100_000;

/// Revocation rows read per query while catching up.
const BATCH: i64 = 1_000;

/// How long revocation rows are kept: longer than any token lives.
const KEEP_REVOCATIONS: i64 = 2 * 24 * 3600;

pub struct TokenCache {
    inner: RwLock<Inner>,
    max_delay: Duration,
}

struct Inner {
    entries: HashMap<TokenKey, Arc<Verified>>,
    /// The last revocation row applied.
    seq: i64,
    /// Counts applied revocations: a token checked against the database
    /// before a revocation was applied is not remembered after it.
    generation: u64,
    /// When the revocation rows were last read successfully.
    synced: Option<Instant>,
}

impl TokenCache {
    /// An empty cache that remembers nothing until [`TokenCache::sync`]
    /// has read the revocation log once.
    pub fn new(max_delay: Duration) -> TokenCache {
        TokenCache {
            inner: RwLock::new(Inner {
                entries: HashMap::new(),
                seq: i64::MAX,
                generation: 0,
                synced: None,
            }),
            max_delay,
        }
    }

    /// The longest a revoked token may still be honoured by another node.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered token `key`, if it has not expired at `now` and the
    /// revocation log was read recently enough.
    pub fn get(&self, key: &TokenKey, now: i64) -> Option<Arc<Verified>> {
        let inner = self.read();
        let fresh = inner.synced.is_some_and(|t| t.elapsed() < self.max_delay);
        if !fresh {
            return None;
        }
        inner.entries.get(key).filter(|v| v.exp > now).cloned()
    }

    /// The current generation; pass it to [`TokenCache::insert`] after
    /// checking a token against the database.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Remembers a token checked against the database, unless a revocation
    /// was applied since `generation` was read (it may name this token).
    pub fn insert(&self, key: TokenKey, v: Arc<Verified>, generation: u64, now: i64) {
        let mut inner = self.write();
        if inner.generation != generation || inner.synced.is_none() {
            return;
        }
        if inner.entries.len() >= CAPACITY {
            inner.entries.retain(|_, v| v.exp > now);
            if inner.entries.len() >= CAPACITY {
                inner.entries.clear();
            }
        }
        inner.entries.insert(key, v);
    }

    /// Number of remembered tokens.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the revocations not yet applied and forgets the tokens they
    /// name. The first call starts from the newest row.
    pub async fn sync(&self, store: &Store) -> StoreResult<()> {
        let started = Instant::now();
        let mut conn = store.reader().await?;
        let mut seq = self.read().seq;
        if seq == i64::MAX {
            seq = db::last_revocation(&mut conn).await?;
            let mut inner = self.write();
            if inner.seq == i64::MAX {
                inner.seq = seq;
            }
        }
        loop {
            let after = self.read().seq;
            let rows = db::revocations_after(&mut conn, after, BATCH).await?;
            let n = rows.len() as i64;
            let mut inner = self.write();
            for r in rows {
                if r.seq <= inner.seq {
                    continue;
                }
                inner.seq = r.seq;
                inner.generation += 1;
                inner.entries.retain(|_, v| !names(&r, v));
            }
            if n < BATCH {
                // Fresh as of when this read began.
                if inner.synced.is_none_or(|t| t < started) {
                    inner.synced = Some(started);
                }
                return Ok(());
            }
        }
    }

    /// Keeps the cache current: reads the revocation log every quarter of
    /// `max_delay`, and drops revocation rows older than any token once an
    /// hour. Ends when the cache is dropped.
    pub fn spawn_sync(self: &Arc<Self>, store: Store) {
        let cache = Arc::downgrade(self);
        let every = (self.max_delay / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_prune = Instant::now();
            loop {
                tick.tick().await;
                let Some(cache) = cache.upgrade() else { return };
                if let Err(e) = cache.sync(&store).await {
                    tracing::warn!(error = %e, "cannot read the revocation log; remembered tokens are not used until it can be read");
                }
                if last_prune.elapsed() > Duration::from_secs(3600) {
                    last_prune = Instant::now();
                    if let Err(e) = prune(&store).await {
                        tracing::warn!(error = %e, "cannot prune the revocation log");
                    }
                }
            }
        });
    }
}

async fn prune(store: &Store) -> StoreResult<()> {
    let mut conn = store.reader().await?;
    db::prune_revocations(&mut conn, super::now() - KEEP_REVOCATIONS).await
}

/// Whether the revocation `r` covers the token `v`.
fn names(r: &db::Revocation, v: &Verified) -> bool {
    match r.kind.as_str() {
        "token" => v.principal.claims.jti == r.subject,
        "grant" => v.grant_id == r.subject,
        "client" => v.principal.claims.client_id == r.subject,
        "user" => v.user_id.as_deref() == Some(r.subject.as_str()),
        // A kind this version does not know: forget everything.
        _ => true,
    }
}
