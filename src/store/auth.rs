//! The tables of the SMART authorization server (`crate::auth`): clients,
//! users and their sessions, EHR launch contexts, authorization codes,
//! issued tokens, client-assertion `jti`s and signing keys.
//!
//! It exists so that all SQL stays inside `crate::store`: the authorization
//! server decides, these functions only read and write rows. Each takes the
//! connection (or open transaction, [`super::Tx::conn`]) it runs on, so the
//! caller keeps its transaction boundaries; none commits. Values come back
//! as plain Rust values, as stored (JSON and scopes still text).

use sqlx::{AnyConnection, Row};

use super::{StoreResult, Tx};

// ---- clients ----

/// A row of `auth_client`.
#[derive(Debug, Clone)]
pub struct ClientRow {
    pub client_id: String,
    pub name: String,
    pub kind: String,
    pub secret_hash: Option<String>,
    /// JSON array of URIs.
    pub redirect_uris: String,
    /// JWKS as JSON text.
    pub jwks: Option<String>,
    pub jwks_url: Option<String>,
    pub scope: String,
    /// An insurer's Organization id, and its insurer role.
    pub organization: Option<String>,
    pub insurer_role: Option<String>,
}

/// Registers a client.
pub async fn insert_client(
    conn: &mut AnyConnection,
    c: &ClientRow,
    created: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO auth_client (client_id, name, kind, secret_hash, redirect_uris, jwks, jwks_url, scope, created, organization, insurer_role) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&c.client_id)
    .bind(&c.name)
    .bind(&c.kind)
    .bind(c.secret_hash.as_deref())
    .bind(&c.redirect_uris)
    .bind(c.jwks.as_deref())
    .bind(c.jwks_url.as_deref())
    .bind(&c.scope)
    .bind(created)
    .bind(c.organization.as_deref())
    .bind(c.insurer_role.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The client registered as `client_id`.
pub async fn client(conn: &mut AnyConnection, client_id: &str) -> StoreResult<Option<ClientRow>> {
    let row = sqlx::query(
        "SELECT client_id, name, kind, secret_hash, redirect_uris, jwks, jwks_url, scope, organization, insurer_role FROM auth_client WHERE client_id = $1 AND disabled = 0",
    )
    .bind(client_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(ClientRow {
        client_id: r.try_get("client_id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        secret_hash: r.try_get("secret_hash")?,
        redirect_uris: r.try_get("redirect_uris")?,
        jwks: r.try_get("jwks")?,
        jwks_url: r.try_get("jwks_url")?,
        scope: r.try_get("scope")?,
        organization: r.try_get("organization")?,
        insurer_role: r.try_get("insurer_role")?,
    }))
}

/// The redirect URIs of every registered client (each a JSON array, as
/// stored).
pub async fn client_redirect_uris(conn: &mut AnyConnection) -> StoreResult<Vec<String>> {
    let rows = sqlx::query("SELECT redirect_uris FROM auth_client WHERE disabled = 0")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok(r.try_get("redirect_uris")?))
        .collect()
}

// ---- client assertions ----

/// Forgets the assertion `jti`s that expired before `now`.
pub async fn delete_expired_assertions(conn: &mut AnyConnection, now: i64) -> StoreResult<()> {
    sqlx::query("DELETE FROM auth_assertion WHERE expires < $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records a client assertion's `jti`; false when the client used it
/// before (nothing was inserted).
pub async fn record_assertion(
    conn: &mut AnyConnection,
    client_id: &str,
    jti: &str,
    expires: i64,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO auth_assertion (client_id, jti, expires) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(client_id)
    .bind(jti)
    .bind(expires)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() != 0)
}

// ---- users and sessions ----

/// A user as stored, without the password hash.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub username: String,
    pub fhir_user: String,
}

fn user_from_row(r: &sqlx::any::AnyRow) -> StoreResult<UserRow> {
    Ok(UserRow {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        fhir_user: r.try_get("fhir_user")?,
    })
}

/// Adds a user; false when the username is taken (nothing was inserted).
pub async fn insert_user(
    conn: &mut AnyConnection,
    user: &UserRow,
    password_hash: &str,
    created: i64,
) -> StoreResult<bool> {
    let r = sqlx::query(
        "INSERT INTO auth_user (id, username, password_hash, fhir_user, created) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (username) DO NOTHING",
    )
    .bind(&user.id)
    .bind(&user.username)
    .bind(password_hash)
    .bind(&user.fhir_user)
    .bind(created)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() != 0)
}

/// The user with id `id`.
pub async fn user(conn: &mut AnyConnection, id: &str) -> StoreResult<Option<UserRow>> {
    let row =
        sqlx::query("SELECT id, username, fhir_user FROM auth_user WHERE id = $1 AND disabled = 0")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    row.as_ref().map(user_from_row).transpose()
}

/// The user called `username` and their password hash.
pub async fn user_with_password(
    conn: &mut AnyConnection,
    username: &str,
) -> StoreResult<Option<(UserRow, String)>> {
    let row = sqlx::query(
        "SELECT id, username, fhir_user, password_hash FROM auth_user WHERE username = $1 AND disabled = 0",
    )
    .bind(username)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some((
        user_from_row(&r)?,
        r.try_get::<String, _>("password_hash")?,
    )))
}

/// Removes the sessions that expired before `now`.
pub async fn delete_expired_sessions(conn: &mut AnyConnection, now: i64) -> StoreResult<()> {
    sqlx::query("DELETE FROM auth_session WHERE expires < $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records a session by the hash of its cookie value.
pub async fn insert_session(
    conn: &mut AnyConnection,
    id_hash: &str,
    user_id: &str,
    expires: i64,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO auth_session (id_hash, user_id, expires) VALUES ($1, $2, $3)")
        .bind(id_hash)
        .bind(user_id)
        .bind(expires)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The user id of the session `id_hash` if it is still live at `now`.
pub async fn session_user_id(
    conn: &mut AnyConnection,
    id_hash: &str,
    now: i64,
) -> StoreResult<Option<String>> {
    let row = sqlx::query("SELECT user_id FROM auth_session WHERE id_hash = $1 AND expires > $2")
        .bind(id_hash)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.try_get::<String, _>("user_id"))
        .transpose()
        .map_err(Into::into)
}

/// Ends the session `id_hash`.
pub async fn delete_session(conn: &mut AnyConnection, id_hash: &str) -> StoreResult<()> {
    sqlx::query("DELETE FROM auth_session WHERE id_hash = $1")
        .bind(id_hash)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

// ---- EHR launch contexts ----

/// The patient and encounter of an EHR launch context.
#[derive(Debug, Clone)]
pub struct LaunchRow {
    pub patient: Option<String>,
    pub encounter: Option<String>,
}

/// Records an EHR launch context.
pub async fn insert_launch(
    conn: &mut AnyConnection,
    id: &str,
    patient: Option<&str>,
    encounter: Option<&str>,
    expires: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO auth_launch (id, patient, encounter, expires) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(patient)
    .bind(encounter)
    .bind(expires)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The launch context `id` if it has not expired at `now`. A column that
/// cannot be read counts as absent. The error is the driver's own (the
/// authorize page shows its text as is).
pub async fn launch(
    conn: &mut AnyConnection,
    id: &str,
    now: i64,
) -> Result<Option<LaunchRow>, sqlx::Error> {
    let row =
        sqlx::query("SELECT patient, encounter FROM auth_launch WHERE id = $1 AND expires > $2")
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|row| LaunchRow {
        patient: row.try_get::<Option<String>, _>("patient").ok().flatten(),
        encounter: row.try_get::<Option<String>, _>("encounter").ok().flatten(),
    }))
}

// ---- authorization codes ----

/// An authorization code, stored by the hash of its value.
#[derive(Debug, Clone)]
pub struct CodeRow {
    pub client_id: String,
    pub user_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub challenge: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub nonce: Option<String>,
    pub expires: i64,
}

/// Records a new, unused authorization code.
pub async fn insert_code(
    conn: &mut AnyConnection,
    code_hash: &str,
    code: &CodeRow,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO auth_code (code_hash, client_id, user_id, redirect_uri, scope, challenge, patient, encounter, nonce, expires, used) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0)",
    )
    .bind(code_hash)
    .bind(&code.client_id)
    .bind(&code.user_id)
    .bind(&code.redirect_uri)
    .bind(&code.scope)
    .bind(&code.challenge)
    .bind(code.patient.as_deref())
    .bind(code.encounter.as_deref())
    .bind(code.nonce.as_deref())
    .bind(code.expires)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The authorization code stored as `code_hash`, used or not.
pub async fn code(conn: &mut AnyConnection, code_hash: &str) -> StoreResult<Option<CodeRow>> {
    let row = sqlx::query(
        "SELECT client_id, user_id, redirect_uri, scope, challenge, patient, encounter, nonce, expires, used \
         FROM auth_code WHERE code_hash = $1",
    )
    .bind(code_hash)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(CodeRow {
        client_id: r.try_get("client_id")?,
        user_id: r.try_get("user_id")?,
        redirect_uri: r.try_get("redirect_uri")?,
        scope: r.try_get("scope")?,
        challenge: r.try_get("challenge")?,
        patient: r.try_get("patient")?,
        encounter: r.try_get("encounter")?,
        nonce: r.try_get("nonce")?,
        expires: r.try_get("expires")?,
    }))
}

/// Marks a code used by compare-and-set: true only for the one caller
/// whose update found it unused.
pub async fn use_code(conn: &mut AnyConnection, code_hash: &str) -> StoreResult<bool> {
    Ok(
        sqlx::query("UPDATE auth_code SET used = 1 WHERE code_hash = $1 AND used = 0")
            .bind(code_hash)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            == 1,
    )
}

// ---- tokens ----

/// A token to record: an access token by `jti`, a refresh token by hash.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub id: &'a str,
    /// `access` or `refresh`.
    pub kind: &'a str,
    pub grant_id: &'a str,
    pub client_id: &'a str,
    pub user_id: Option<&'a str>,
    pub fhir_user: Option<&'a str>,
    pub scope: &'a str,
    pub patient: Option<&'a str>,
    pub encounter: Option<&'a str>,
    pub expires: i64,
}

/// Records an issued token, neither revoked nor used.
pub async fn insert_token(
    conn: &mut AnyConnection,
    t: &NewToken<'_>,
    created: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO auth_token (id, kind, grant_id, client_id, user_id, fhir_user, scope, patient, encounter, expires, revoked, used, created) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0, $11)",
    )
    .bind(t.id)
    .bind(t.kind)
    .bind(t.grant_id)
    .bind(t.client_id)
    .bind(t.user_id)
    .bind(t.fhir_user)
    .bind(t.scope)
    .bind(t.patient)
    .bind(t.encounter)
    .bind(t.expires)
    .bind(created)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What the verification of an access token needs from its record.
#[derive(Debug, Clone)]
pub struct AccessTokenState {
    pub revoked: bool,
    pub grant_id: String,
    pub user_id: Option<String>,
}

/// The state of the access token `jti`; `None` when it is unknown.
pub async fn access_token_state(
    conn: &mut AnyConnection,
    jti: &str,
) -> StoreResult<Option<AccessTokenState>> {
    let row = sqlx::query(
        "SELECT revoked, grant_id, user_id FROM auth_token WHERE id = $1 AND kind = 'access'",
    )
    .bind(jti)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(AccessTokenState {
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        grant_id: r.try_get("grant_id")?,
        user_id: r.try_get("user_id")?,
    }))
}

/// Serialises everything that redeems or revokes tokens of the grant
/// `grant_id` until the transaction ends. Concurrent replays of one code or
/// refresh token would otherwise lock the grant's token rows in orders
/// PostgreSQL finds deadlocked; SQLite's single writer serialises them
/// already.
pub async fn lock_grant(tx: &mut Tx, grant_id: &str) -> StoreResult<()> {
    tx.lock_names(&[format!("auth grant {grant_id}")]).await
}

/// Appends to the revocation log, which every server process reads to
/// forget the tokens it remembers (`crate::auth::cache`). On PostgreSQL the
/// appends are serialised until commit, so that rows become visible in the
/// order of their `seq` and a reader that has seen row n never later finds
/// a row below n.
async fn log_revocation(tx: &mut Tx, kind: &str, subject: &str, at: i64) -> StoreResult<()> {
    tx.lock_names(&["auth revocation log".to_string()]).await?;
    sqlx::query("INSERT INTO auth_revocation (kind, subject, at) VALUES ($1, $2, $3)")
        .bind(kind)
        .bind(subject)
        .bind(at)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// Revokes every token of the grant `grant_id`, under [`lock_grant`].
pub async fn revoke_grant(tx: &mut Tx, grant_id: &str, at: i64) -> StoreResult<()> {
    lock_grant(tx, grant_id).await?;
    sqlx::query("UPDATE auth_token SET revoked = 1 WHERE grant_id = $1 AND revoked = 0")
        .bind(grant_id)
        .execute(tx.conn())
        .await?;
    log_revocation(tx, "grant", grant_id, at).await
}

/// Revokes the one token `id` (an access token's `jti`).
pub async fn revoke_token(tx: &mut Tx, id: &str, at: i64) -> StoreResult<()> {
    sqlx::query("UPDATE auth_token SET revoked = 1 WHERE id = $1")
        .bind(id)
        .execute(tx.conn())
        .await?;
    log_revocation(tx, "token", id, at).await
}

/// A row of the revocation log.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub seq: i64,
    /// `token`, `grant`, `client` or `user`.
    pub kind: String,
    pub subject: String,
}

/// The newest `seq` of the revocation log (0 when it is empty).
pub async fn last_revocation(conn: &mut AnyConnection) -> StoreResult<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM auth_revocation")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get::<i64, _>("seq")?)
}

/// Up to `limit` revocations after `seq`, oldest first.
pub async fn revocations_after(
    conn: &mut AnyConnection,
    seq: i64,
    limit: i64,
) -> StoreResult<Vec<Revocation>> {
    let rows = sqlx::query(
        "SELECT seq, kind, subject FROM auth_revocation WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(seq)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Revocation {
                seq: r.try_get("seq")?,
                kind: r.try_get("kind")?,
                subject: r.try_get("subject")?,
            })
        })
        .collect()
}

/// Forgets revocations older than `before` (their tokens have expired).
pub async fn prune_revocations(conn: &mut AnyConnection, before: i64) -> StoreResult<()> {
    sqlx::query("DELETE FROM auth_revocation WHERE at < $1")
        .bind(before)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Disables (`at` > 0) or enables (`at` = 0) the client `client_id`; on
/// disabling, every token issued to it is revoked. False when no such
/// client exists.
pub async fn set_client_disabled(tx: &mut Tx, client_id: &str, at: i64) -> StoreResult<bool> {
    let found = sqlx::query("UPDATE auth_client SET disabled = $1 WHERE client_id = $2")
        .bind(at)
        .bind(client_id)
        .execute(tx.conn())
        .await?
        .rows_affected()
        == 1;
    if found && at > 0 {
        sqlx::query("UPDATE auth_token SET revoked = 1 WHERE client_id = $1 AND revoked = 0")
            .bind(client_id)
            .execute(tx.conn())
            .await?;
        log_revocation(tx, "client", client_id, at).await?;
    }
    Ok(found)
}

/// Disables (`at` > 0) or enables (`at` = 0) the user `id`; on disabling,
/// their sessions end and every token issued for them is revoked. False
/// when no such user exists.
pub async fn set_user_disabled(tx: &mut Tx, id: &str, at: i64) -> StoreResult<bool> {
    let found = sqlx::query("UPDATE auth_user SET disabled = $1 WHERE id = $2")
        .bind(at)
        .bind(id)
        .execute(tx.conn())
        .await?
        .rows_affected()
        == 1;
    if found && at > 0 {
        revoke_user(tx, id, at).await?;
    }
    Ok(found)
}

/// Replaces the password hash of the user `id`; their sessions end and
/// their tokens are revoked (a new password is set because the old one is
/// lost or known to someone else). False when no such user exists.
pub async fn set_password(
    tx: &mut Tx,
    id: &str,
    password_hash: &str,
    at: i64,
) -> StoreResult<bool> {
    let found = sqlx::query("UPDATE auth_user SET password_hash = $1 WHERE id = $2")
        .bind(password_hash)
        .bind(id)
        .execute(tx.conn())
        .await?
        .rows_affected()
        == 1;
    if found {
        revoke_user(tx, id, at).await?;
    }
    Ok(found)
}

async fn revoke_user(tx: &mut Tx, id: &str, at: i64) -> StoreResult<()> {
    sqlx::query("DELETE FROM auth_session WHERE user_id = $1")
        .bind(id)
        .execute(tx.conn())
        .await?;
    sqlx::query("UPDATE auth_token SET revoked = 1 WHERE user_id = $1 AND revoked = 0")
        .bind(id)
        .execute(tx.conn())
        .await?;
    log_revocation(tx, "user", id, at).await
}

/// A client as listed by `ehrx client list`.
#[derive(Debug, Clone)]
pub struct ClientListRow {
    pub client_id: String,
    pub name: String,
    pub kind: String,
    pub scope: String,
    pub created: i64,
    pub disabled: i64,
}

/// Every registered client, by id.
pub async fn clients(conn: &mut AnyConnection) -> StoreResult<Vec<ClientListRow>> {
    let rows = sqlx::query(
        "SELECT client_id, name, kind, scope, created, disabled FROM auth_client ORDER BY client_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ClientListRow {
                client_id: r.try_get("client_id")?,
                name: r.try_get("name")?,
                kind: r.try_get("kind")?,
                scope: r.try_get("scope")?,
                created: r.try_get("created")?,
                disabled: r.try_get("disabled")?,
            })
        })
        .collect()
}

/// A user as listed by `ehrx user list`.
#[derive(Debug, Clone)]
pub struct UserListRow {
    pub id: String,
    pub username: String,
    pub fhir_user: String,
    pub created: i64,
    pub disabled: i64,
}

/// Every user, by username.
pub async fn users(conn: &mut AnyConnection) -> StoreResult<Vec<UserListRow>> {
    let rows = sqlx::query(
        "SELECT id, username, fhir_user, created, disabled FROM auth_user ORDER BY username",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(UserListRow {
                id: r.try_get("id")?,
                username: r.try_get("username")?,
                fhir_user: r.try_get("fhir_user")?,
                created: r.try_get("created")?,
                disabled: r.try_get("disabled")?,
            })
        })
        .collect()
}

/// The id of the user called `username`.
pub async fn user_id_by_name(
    conn: &mut AnyConnection,
    username: &str,
) -> StoreResult<Option<String>> {
    let row = sqlx::query("SELECT id FROM auth_user WHERE username = $1")
        .bind(username)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.try_get::<String, _>("id"))
        .transpose()
        .map_err(Into::into)
}

/// Marks a (refresh) token used by compare-and-set: true only for the one
/// caller whose update found it unused.
pub async fn use_token(conn: &mut AnyConnection, id: &str) -> StoreResult<bool> {
    Ok(
        sqlx::query("UPDATE auth_token SET used = 1 WHERE id = $1 AND used = 0")
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            == 1,
    )
}

/// A stored token (access by `jti`, refresh by hash).
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub kind: String,
    pub grant_id: String,
    pub client_id: String,
    pub user_id: Option<String>,
    pub fhir_user: Option<String>,
    pub scope: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub expires: i64,
    pub created: i64,
    pub revoked: bool,
    pub used: bool,
}

/// The token stored as `id`.
pub async fn token(conn: &mut AnyConnection, id: &str) -> StoreResult<Option<TokenRow>> {
    let row = sqlx::query(
        "SELECT id, kind, grant_id, client_id, user_id, fhir_user, scope, patient, encounter, expires, created, revoked, used \
         FROM auth_token WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(TokenRow {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        grant_id: r.try_get("grant_id")?,
        client_id: r.try_get("client_id")?,
        user_id: r.try_get("user_id")?,
        fhir_user: r.try_get("fhir_user")?,
        scope: r.try_get("scope")?,
        patient: r.try_get("patient")?,
        encounter: r.try_get("encounter")?,
        expires: r.try_get("expires")?,
        created: r.try_get("created")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        used: r.try_get::<i64, _>("used")? != 0,
    }))
}

// ---- signing keys ----

/// A row of `auth_key`.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub kid: String,
    /// PKCS#8 PEM, sealed when a key-encryption key is configured.
    pub private_pem: String,
    /// The public JWK as JSON text.
    pub public_jwk: String,
    pub retired: Option<i64>,
}

/// Retires every active signing key as of `retired`.
pub async fn retire_keys(conn: &mut AnyConnection, retired: i64) -> StoreResult<()> {
    sqlx::query("UPDATE auth_key SET retired = $1 WHERE retired IS NULL")
        .bind(retired)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Adds an active RS256 signing key.
pub async fn insert_key(
    conn: &mut AnyConnection,
    kid: &str,
    private_pem: &str,
    public_jwk: &str,
    created: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO auth_key (kid, alg, private_pem, public_jwk, created, retired) \
         VALUES ($1, 'RS256', $2, $3, $4, NULL)",
    )
    .bind(kid)
    .bind(private_pem)
    .bind(public_jwk)
    .bind(created)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every signing key, newest first.
pub async fn keys(conn: &mut AnyConnection) -> StoreResult<Vec<KeyRow>> {
    let rows = sqlx::query(
        "SELECT kid, private_pem, public_jwk, retired FROM auth_key ORDER BY created DESC, kid",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(KeyRow {
                kid: r.try_get("kid")?,
                private_pem: r.try_get("private_pem")?,
                public_jwk: r.try_get("public_jwk")?,
                retired: r.try_get("retired")?,
            })
        })
        .collect()
}

/// Replaces the stored private key of `kid` (to seal it).
pub async fn set_key_private_pem(
    conn: &mut AnyConnection,
    kid: &str,
    private_pem: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE auth_key SET private_pem = $1 WHERE kid = $2")
        .bind(private_pem)
        .bind(kid)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
