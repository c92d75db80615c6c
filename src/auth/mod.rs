//! The SMART-on-FHIR authorization server (App Launch 2.x and Backend
//! Services): discovery, authorize (login and consent pages), token,
//! introspection, revocation, EHR launch contexts; clients, users, signing
//! keys and scopes. The FHIR API asks [`Auth::authenticate`] who is calling
//! and gets a [`crate::policy::Access`] back.

pub mod cache;
pub mod clients;
pub mod keys;

pub use crate::policy::scope;
pub mod token;
pub mod users;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

pub use keys::Keys;
pub use token::Principal;

/// Errors of the authorization server, answered as OAuth 2.0 error
/// responses (RFC 6749 §5.2) in one place (`api::authorization`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    AccessDenied(String),
    /// A bearer token that is missing, malformed, expired or revoked.
    #[error("{0}")]
    InvalidToken(String),
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::Store(StoreError::Database(e))
    }
}

impl From<crate::policy::scope::InvalidScope> for AuthError {
    fn from(e: crate::policy::scope::InvalidScope) -> Self {
        AuthError::InvalidScope(e.0)
    }
}

impl AuthError {
    /// The RFC 6749 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::InvalidRequest(_) => "invalid_request",
            AuthError::InvalidClient(_) => "invalid_client",
            AuthError::InvalidGrant(_) => "invalid_grant",
            AuthError::UnauthorizedClient(_) => "unauthorized_client",
            AuthError::UnsupportedGrantType(_) => "unsupported_grant_type",
            AuthError::InvalidScope(_) => "invalid_scope",
            AuthError::AccessDenied(_) => "access_denied",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::Key(_) | AuthError::Store(_) => "server_error",
        }
    }
}

pub type AuthResult<T> = Result<T, AuthError>;

/// Lifetimes, in seconds. Access tokens live `access_token_lifetime`
/// (configured, at most [`KEY_RETENTION`]); a retired signing key stays
/// published for `KEY_RETENTION`, so every token it signed expires first.
pub const KEY_RETENTION: i64 = 24 * 3600;
pub const CODE_TTL: i64 = 60;
pub const SESSION_TTL: i64 = 8 * 3600;
pub const OFFLINE_TTL: i64 = 90 * 24 * 3600;
pub const LAUNCH_TTL: i64 = 3600;
/// Client assertions may be valid for at most this long (SMART Backend Services).
pub const ASSERTION_MAX_TTL: i64 = 300;

/// The authorization server's shared state.
#[derive(Clone)]
pub struct Auth {
    pub store: Store,
    pub keys: Keys,
    /// The FHIR base URL: token issuer and audience.
    pub issuer: String,
    /// Access and id token lifetime, seconds.
    pub access_ttl: i64,
    /// Access tokens checked before, until they expire or are revoked.
    pub tokens: std::sync::Arc<cache::TokenCache>,
}

impl Auth {
    /// Loads (or, on first start, generates) the signing keys.
    /// Tokens are remembered only once [`cache::TokenCache::spawn_sync`]
    /// keeps the revocation log read (`ehrx serve` does).
    pub async fn open(
        store: Store,
        issuer: String,
        access_ttl: i64,
        revocation_max_delay: std::time::Duration,
    ) -> AuthResult<Auth> {
        let keys = Keys::load_or_create(&store).await?;
        Ok(Auth {
            store,
            keys,
            issuer,
            access_ttl,
            tokens: std::sync::Arc::new(cache::TokenCache::new(revocation_max_delay)),
        })
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.issuer)
    }
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A fresh 256-bit random value, base64url without padding.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// SHA-256, base64url without padding (PKCE S256, stored secrets).
pub fn sha256_b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(s.as_bytes()))
}

/// Compares secrets in constant time.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Mints an EHR launch context (`launch` parameter) for a patient and
/// optionally an encounter.
pub async fn mint_launch(
    store: &Store,
    patient: Option<&str>,
    encounter: Option<&str>,
) -> AuthResult<String> {
    let id = random_token();
    let mut tx = store.begin().await?;
    crate::store::auth::insert_launch(tx.conn(), &id, patient, encounter, now() + LAUNCH_TTL)
        .await?;
    tx.commit().await?;
    Ok(id)
}
