//! People who log in — practitioners, patients, related persons — each
//! linked to the FHIR resource that is them (`fhirUser`), with argon2id
//! password hashes; and their browser sessions.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use sqlx::Row;

use super::{now, random_token, sha256_b64, AuthError, AuthResult, SESSION_TTL};
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
    let pw = password.to_string();
    let hash = tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(pw.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| AuthError::Key(e.to_string()))?
    .map_err(|e| AuthError::Key(e.to_string()))?;
    let id = uuid::Uuid::new_v4().to_string();
    let r = sqlx::query(
        "INSERT INTO auth_user (id, username, password_hash, fhir_user, created) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (username) DO NOTHING",
    )
    .bind(&id)
    .bind(&username)
    .bind(&hash)
    .bind(fhir_user)
    .bind(now())
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 0 {
        return Err(AuthError::InvalidRequest(format!(
            "the username '{username}' is taken"
        )));
    }
    Ok(User {
        id,
        username,
        fhir_user: fhir_user.to_string(),
    })
}

fn user_from_row(r: &sqlx::any::AnyRow) -> AuthResult<User> {
    Ok(User {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        fhir_user: r.try_get("fhir_user")?,
    })
}

pub async fn get(store: &Store, id: &str) -> AuthResult<Option<User>> {
    let mut conn = store.reader().await?;
    let row = sqlx::query("SELECT id, username, fhir_user FROM auth_user WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(user_from_row).transpose()
}

/// Checks a username and password. Unknown users cost the same time as
/// wrong passwords, so the answer does not tell which it was.
pub async fn login(store: &Store, username: &str, password: &str) -> AuthResult<Option<User>> {
    let username = username.trim().to_lowercase();
    let mut conn = store.reader().await?;
    let row = sqlx::query(
        "SELECT id, username, fhir_user, password_hash FROM auth_user WHERE username = $1",
    )
    .bind(&username)
    .fetch_optional(&mut *conn)
    .await?;
    drop(conn);
    let (user, hash) = match &row {
        Some(r) => (
            Some(user_from_row(r)?),
            r.try_get::<String, _>("password_hash")?,
        ),
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
    sqlx::query("DELETE FROM auth_session WHERE expires < $1")
        .bind(now())
        .execute(tx.conn())
        .await?;
    sqlx::query("INSERT INTO auth_session (id_hash, user_id, expires) VALUES ($1, $2, $3)")
        .bind(sha256_b64(&value))
        .bind(user_id)
        .bind(now() + SESSION_TTL)
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(value)
}

/// The user of a session cookie, if it is live.
pub async fn session_user(store: &Store, cookie: &str) -> AuthResult<Option<User>> {
    let mut conn = store.reader().await?;
    let row = sqlx::query("SELECT user_id FROM auth_session WHERE id_hash = $1 AND expires > $2")
        .bind(sha256_b64(cookie))
        .bind(now())
        .fetch_optional(&mut *conn)
        .await?;
    drop(conn);
    match row {
        Some(r) => get(store, &r.try_get::<String, _>("user_id")?).await,
        None => Ok(None),
    }
}

pub async fn end_session(store: &Store, cookie: &str) -> AuthResult<()> {
    let mut tx = store.begin().await?;
    sqlx::query("DELETE FROM auth_session WHERE id_hash = $1")
        .bind(sha256_b64(cookie))
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}
