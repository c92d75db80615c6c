//! People who log in — practitioners, patients, related persons — each
//! linked to the FHIR resource that is them (`fhirUser`), with argon2id
//! password hashes; and their browser sessions.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;

use super::{now, random_token, sha256_b64, AuthError, AuthResult, SESSION_TTL};
use crate::store::auth as db;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    /// `Practitioner/…`, `Patient/…` or `RelatedPerson/…`.
    pub fhir_user: String,
}

impl User {
    pub fn is_patient(&self) -> bool {
        self.fhir_user.starts_with("Patient/")
    }
    /// The patient id when the user is a patient.
    pub fn patient_id(&self) -> Option<&str> {
        self.fhir_user.strip_prefix("Patient/")
    }
}

/// A password policy that keeps out the worst guesses without being odd.
pub fn check_password(password: &str) -> AuthResult<()> {
    if password.chars().count() < 10 {
        return Err(AuthError::InvalidRequest(
            "the password must have at least 10 characters".into(),
        ));
    }
    Ok(())
}

fn check_fhir_user(fhir_user: &str) -> AuthResult<()> {
    let ok = fhir_user.split_once('/').is_some_and(|(t, id)| {
        matches!(
            t,
            "Practitioner" | "Patient" | "RelatedPerson" | "PractitionerRole"
        ) && crate::interaction::check_id(id).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidRequest(format!(
            "fhirUser '{fhir_user}' must be Practitioner/ID, PractitionerRole/ID, Patient/ID or RelatedPerson/ID"
        )))
    }
}

/// Adds a user; the username must be new.
pub async fn add(
    store: &Store,
    username: &str,
    password: &str,
    fhir_user: &str,
) -> AuthResult<User> {
    let mut tx = store.begin().await?;
    let user = add_in(tx.conn(), username, password, fhir_user).await?;
    tx.commit().await?;
    Ok(user)
}

/// Adds a user inside the caller's transaction (sign-up writes the
/// Patient and the user together).
pub async fn add_in(
    conn: &mut sqlx::AnyConnection,
    username: &str,
    password: &str,
    fhir_user: &str,
) -> AuthResult<User> {
    let username = username.trim().to_lowercase();
    if username.is_empty() || username.len() > 254 {
        return Err(AuthError::InvalidRequest(
            "the username is empty or too long".into(),
        ));
    }
    check_password(password)?;
    check_fhir_user(fhir_user)?;
    let hash = hash_password(password).await?;
    let row = db::UserRow {
        id: uuid::Uuid::new_v4().to_string(),
        username,
        fhir_user: fhir_user.to_string(),
    };
    if !db::insert_user(conn, &row, &hash, now()).await? {
        return Err(AuthError::InvalidRequest(format!(
            "the username '{}' is taken",
            row.username
        )));
    }
    Ok(user_from_row(row))
}

fn user_from_row(r: db::UserRow) -> User {
    User {
        id: r.id,
        username: r.username,
        fhir_user: r.fhir_user,
    }
}

/// Every user, for `ehrx user list` (no password hashes).
pub async fn list(store: &Store) -> AuthResult<Vec<serde_json::Value>> {
    let mut conn = store.reader().await?;
    Ok(db::users(&mut conn)
        .await?
        .into_iter()
        .map(|u| {
            serde_json::json!({
                "id": u.id, "username": u.username, "fhirUser": u.fhir_user,
                "created": u.created,
                "disabled": (u.disabled > 0).then_some(u.disabled),
            })
        })
        .collect())
}

/// The id of a user named by username, else `who` taken as an id.
async fn resolve(store: &Store, who: &str) -> AuthResult<String> {
    let mut conn = store.reader().await?;
    Ok(db::user_id_by_name(&mut conn, &who.trim().to_lowercase())
        .await?
        .unwrap_or_else(|| who.to_string()))
}

/// Disables a user (no sign-in; their sessions end and their tokens are
/// revoked, on every server process within `revocation_max_delay`) or
/// enables them again. `who` is a username or user id; false when there is
/// no such user.
pub async fn set_disabled(store: &Store, who: &str, disabled: bool) -> AuthResult<bool> {
    let id = resolve(store, who).await?;
    let mut tx = store.begin().await?;
    let found = db::set_user_disabled(&mut tx, &id, if disabled { now() } else { 0 }).await?;
    tx.commit().await?;
    Ok(found)
}

/// Sets a new password; the user's sessions end and their tokens are
/// revoked. `who` is a username or user id; false when there is no such
/// user.
pub async fn set_password(store: &Store, who: &str, password: &str) -> AuthResult<bool> {
    check_password(password)?;
    let id = resolve(store, who).await?;
    let hash = hash_password(password).await?;
    let mut tx = store.begin().await?;
    let found = db::set_password(&mut tx, &id, &hash, now()).await?;
    tx.commit().await?;
    Ok(found)
}

async fn hash_password(password: &str) -> AuthResult<String> {
    let pw = password.to_string();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(pw.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| AuthError::Key(e.to_string()))?
    .map_err(|e| AuthError::Key(e.to_string()))
}

pub async fn get(store: &Store, id: &str) -> AuthResult<Option<User>> {
    let mut conn = store.reader().await?;
    Ok(db::user(&mut conn, id).await?.map(user_from_row))
}

/// Checks a username and password. Unknown users cost the same time as
/// wrong passwords, so the answer does not tell which it was.
pub async fn login(store: &Store, username: &str, password: &str) -> AuthResult<Option<User>> {
    let username = username.trim().to_lowercase();
    let mut conn = store.reader().await?;
    let row = db::user_with_password(&mut conn, &username).await?;
    drop(conn);
    let (user, hash) = match row {
        Some((user, hash)) => (Some(user_from_row(user)), hash),
        None => (None, dummy_hash()),
    };
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .map_err(|e| AuthError::Key(e.to_string()))?;
    Ok(if ok { user } else { None })
}

/// A hash to verify against when the user is unknown.
fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(b"not a password", &salt)
                .map(|h| h.to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// Starts a session; returns the cookie value.
pub async fn start_session(store: &Store, user_id: &str) -> AuthResult<String> {
    let value = random_token();
    let mut tx = store.begin().await?;
    db::delete_expired_sessions(tx.conn(), now()).await?;
    db::insert_session(tx.conn(), &sha256_b64(&value), user_id, now() + SESSION_TTL).await?;
    tx.commit().await?;
    Ok(value)
}

/// The user of a session cookie, if it is live.
pub async fn session_user(store: &Store, cookie: &str) -> AuthResult<Option<User>> {
    let mut conn = store.reader().await?;
    let user_id = db::session_user_id(&mut conn, &sha256_b64(cookie), now()).await?;
    drop(conn);
    match user_id {
        Some(id) => get(store, &id).await,
        None => Ok(None),
    }
}

pub async fn end_session(store: &Store, cookie: &str) -> AuthResult<()> {
    let mut tx = store.begin().await?;
    db::delete_session(tx.conn(), &sha256_b64(cookie)).await?;
    tx.commit().await?;
    Ok(())
}
