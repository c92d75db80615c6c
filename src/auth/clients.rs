//! Registered OAuth clients and client authentication at the token,
//! introspection and revocation endpoints: `client_secret_basic`,
//! `client_secret_post` and `private_key_jwt` (RS384 / ES384 client
//! assertions, SMART Backend Services), plus public clients by id.

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    now, random_token, secret_eq, sha256_b64, Auth, AuthError, AuthResult, ASSERTION_MAX_TTL,
};
use crate::policy::scope::{self, Scope};
use crate::store::auth as db;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    Public,
    ConfidentialSymmetric,
    ConfidentialAsymmetric,
}

impl ClientKind {
    fn as_str(self) -> &'static str {
        match self {
            ClientKind::Public => "public",
            ClientKind::ConfidentialSymmetric => "confidential-symmetric",
            ClientKind::ConfidentialAsymmetric => "confidential-asymmetric",
        }
    }
    fn parse(s: &str) -> Option<ClientKind> {
        match s {
            "public" => Some(ClientKind::Public),
            "confidential-symmetric" => Some(ClientKind::ConfidentialSymmetric),
            "confidential-asymmetric" => Some(ClientKind::ConfidentialAsymmetric),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub name: String,
    pub kind: ClientKind,
    secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub jwks: Option<Value>,
    pub jwks_url: Option<String>,
    /// What the client may ever be granted.
    pub scopes: Vec<Scope>,
    /// A backend client bound to an insurer's Organization, and its
    /// insurer role (`policies/insurer.json`).
    pub organization: Option<String>,
    pub insurer_role: Option<String>,
}

/// A client to register.
#[derive(Debug, Clone)]
pub struct NewClient {
    pub name: String,
    pub kind: ClientKind,
    pub redirect_uris: Vec<String>,
    pub jwks: Option<Value>,
    pub jwks_url: Option<String>,
    pub scope: String,
    /// `Organization/ID` of an insurer (or bare ID).
    pub organization: Option<String>,
    pub insurer_role: Option<String>,
}

/// Registers a client; returns `(client_id, secret)` (a secret only for
/// symmetric clients; it is shown once and stored hashed).
pub async fn register(store: &Store, c: &NewClient) -> AuthResult<(String, Option<String>)> {
    scope::parse_scopes(&c.scope)?;
    for uri in &c.redirect_uris {
        if !(uri.starts_with("https://") || uri.starts_with("http://")) || uri.contains('#') {
            return Err(AuthError::InvalidRequest(format!(
                "redirect URI '{uri}' must be an absolute http(s) URI without a fragment"
            )));
        }
    }
    match c.kind {
        ClientKind::ConfidentialAsymmetric => match (&c.jwks, &c.jwks_url) {
            (Some(jwks), _) => {
                serde_json::from_value::<JwkSet>(jwks.clone()).map_err(|e| {
                    AuthError::InvalidRequest(format!("the JWKS is not valid: {e}"))
                })?;
            }
            (None, Some(_)) => {}
            (None, None) => {
                return Err(AuthError::InvalidRequest(
                    "an asymmetric client needs a JWKS (--jwks-file or --jwks-url)".into(),
                ))
            }
        },
        ClientKind::Public | ClientKind::ConfidentialSymmetric if c.redirect_uris.is_empty() => {
            return Err(AuthError::InvalidRequest(
                "a public or symmetric client needs at least one redirect URI".into(),
            ))
        }
        _ => {}
    }
    let client_id = uuid::Uuid::new_v4().to_string();
    let secret = (c.kind == ClientKind::ConfidentialSymmetric).then(random_token);
    let mut tx = store.begin().await?;
    let row = db::ClientRow {
        client_id: client_id.clone(),
        name: c.name.clone(),
        kind: c.kind.as_str().to_string(),
        secret_hash: secret.as_deref().map(sha256_b64),
        redirect_uris: serde_json::to_string(&c.redirect_uris).unwrap_or_default(),
        jwks: c.jwks.as_ref().map(|j| j.to_string()),
        jwks_url: c.jwks_url.clone(),
        scope: c.scope.clone(),
        organization: c
            .organization
            .as_deref()
            .map(|o| o.strip_prefix("Organization/").unwrap_or(o).to_string()),
        insurer_role: c.insurer_role.clone(),
    };
    db::insert_client(tx.conn(), &row, now()).await?;
    tx.commit().await?;
    Ok((client_id, secret))
}

/// Every registered client, for `ehrx client list` (no secrets).
pub async fn list(store: &Store) -> AuthResult<Vec<serde_json::Value>> {
    let mut conn = store.reader().await?;
    Ok(db::clients(&mut conn)
        .await?
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "client_id": c.client_id, "name": c.name, "type": c.kind,
                "scope": c.scope, "created": c.created,
                "disabled": (c.disabled > 0).then_some(c.disabled),
            })
        })
        .collect())
}

/// Disables a client (no new tokens; every token it holds revoked, on every
/// server process within `revocation_max_delay`) or enables it again.
/// False when no client has that id.
pub async fn set_disabled(store: &Store, client_id: &str, disabled: bool) -> AuthResult<bool> {
    let mut tx = store.begin().await?;
    let found =
        db::set_client_disabled(&mut tx, client_id, if disabled { now() } else { 0 }).await?;
    tx.commit().await?;
    Ok(found)
}

pub async fn get(store: &Store, client_id: &str) -> AuthResult<Option<Client>> {
    let mut conn = store.reader().await?;
    let Some(r) = db::client(&mut conn, client_id).await? else {
        return Ok(None);
    };
    let kind = r.kind;
    Ok(Some(Client {
        client_id: r.client_id,
        name: r.name,
        kind: ClientKind::parse(&kind)
            .ok_or_else(|| AuthError::Key(format!("client kind '{kind}'")))?,
        secret_hash: r.secret_hash,
        redirect_uris: serde_json::from_str(&r.redirect_uris).unwrap_or_default(),
        jwks: r.jwks.and_then(|j| serde_json::from_str(&j).ok()),
        jwks_url: r.jwks_url,
        scopes: scope::parse_scopes(&r.scope)?,
        organization: r.organization,
        insurer_role: r.insurer_role,
    }))
}

/// The origin (`scheme://host[:port]`, a default port left out) of an
/// http(s) URI, as a browser names it in `Origin`. `None` for other URIs,
/// and for hosts with characters that have no place in a header such as a
/// Content-Security-Policy.
pub fn origin_of(uri: &str) -> Option<String> {
    let url = reqwest::Url::parse(uri).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let origin = url.origin().ascii_serialization();
    origin
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:/[]".contains(&b))
        .then_some(origin)
}

/// The origins of the redirect URIs of every registered client: the web
/// apps whose scripts may call this server.
pub async fn redirect_origins(store: &Store) -> AuthResult<std::collections::HashSet<String>> {
    let mut conn = store.reader().await?;
    let stored = db::client_redirect_uris(&mut conn).await?;
    Ok(stored
        .iter()
        .filter_map(|json| serde_json::from_str::<Vec<String>>(json).ok())
        .flatten()
        .filter_map(|uri| origin_of(&uri))
        .collect())
}

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The client credentials a request carries.
#[derive(Debug, Default)]
pub struct Credentials {
    pub client_id: Option<String>,
    pub secret: Option<String>,
    pub assertion: Option<String>,
    pub assertion_type: Option<String>,
}

impl Credentials {
    /// From the `Authorization: Basic` header and the form.
    pub fn from_request(
        authorization: Option<&str>,
        form: &[(String, String)],
    ) -> AuthResult<Credentials> {
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut c = Credentials {
            client_id: field("client_id"),
            secret: field("client_secret"),
            assertion: field("client_assertion"),
            assertion_type: field("client_assertion_type"),
        };
        if let Some(basic) = authorization.and_then(|a| a.strip_prefix("Basic ")) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| AuthError::InvalidClient("malformed Basic credentials".into()))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| AuthError::InvalidClient("malformed Basic credentials".into()))?;
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            if c.secret.is_some() {
                return Err(AuthError::InvalidRequest(
                    "use one client authentication method, not several".into(),
                ));
            }
            c.client_id = Some(dec(id));
            c.secret = Some(dec(secret));
        }
        Ok(c)
    }
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    jti: String,
    exp: i64,
}

/// Authenticates the client of a request. Public clients are identified by
/// `client_id` only when `allow_public` is set.
pub async fn authenticate(auth: &Auth, c: &Credentials, allow_public: bool) -> AuthResult<Client> {
    let bad = |why: String| AuthError::InvalidClient(why);
    if let Some(assertion) = &c.assertion {
        if c.assertion_type.as_deref() != Some(ASSERTION_TYPE) {
            return Err(AuthError::InvalidRequest(format!(
                "client_assertion_type must be {ASSERTION_TYPE}"
            )));
        }
        return authenticate_assertion(auth, assertion, c.client_id.as_deref()).await;
    }
    let id = c
        .client_id
        .as_deref()
        .ok_or_else(|| bad("no client authentication and no client_id".into()))?;
    let client = get(&auth.store, id)
        .await?
        .ok_or_else(|| bad(format!("unknown client '{id}'")))?;
    match (client.kind, &c.secret) {
        (ClientKind::ConfidentialSymmetric, Some(secret)) => {
            let stored = client.secret_hash.as_deref().unwrap_or("");
            if secret_eq(&sha256_b64(secret), stored) {
                Ok(client)
            } else {
                Err(bad("client authentication failed".into()))
            }
        }
        (ClientKind::ConfidentialSymmetric, None) => {
            Err(bad("this client must authenticate with its secret".into()))
        }
        (ClientKind::ConfidentialAsymmetric, _) => Err(bad(
            "this client must authenticate with a signed client_assertion (private_key_jwt)".into(),
        )),
        (ClientKind::Public, Some(_)) => Err(bad("a public client has no secret".into())),
        (ClientKind::Public, None) if allow_public => Ok(client),
        (ClientKind::Public, None) => Err(bad("a public client cannot use this endpoint".into())),
    }
}

async fn authenticate_assertion(
    auth: &Auth,
    assertion: &str,
    claimed: Option<&str>,
) -> AuthResult<Client> {
    let bad = |why: String| AuthError::InvalidClient(why);
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| bad(format!("client_assertion is not a JWT: {e}")))?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(bad(format!(
            "client_assertion must be signed with RS384 or ES384, not {:?}",
            header.alg
        )));
    }
    let unverified: AssertionClaims = jsonwebtoken::dangerous::insecure_decode(assertion)
        .map_err(|e| bad(format!("client_assertion claims: {e}")))?
        .claims;
    if unverified.iss != unverified.sub {
        return Err(bad(
            "client_assertion iss and sub must both be the client_id".into(),
        ));
    }
    if claimed.is_some_and(|c| c != unverified.iss) {
        return Err(bad("client_id does not match the client_assertion".into()));
    }
    let client = get(&auth.store, &unverified.iss)
        .await?
        .ok_or_else(|| bad(format!("unknown client '{}'", unverified.iss)))?;
    if client.kind != ClientKind::ConfidentialAsymmetric {
        return Err(bad(
            "this client is not registered for private_key_jwt".into()
        ));
    }
    let jwks: JwkSet = match (&client.jwks, &client.jwks_url) {
        (Some(j), _) => {
            serde_json::from_value(j.clone()).map_err(|e| bad(format!("registered JWKS: {e}")))?
        }
        (None, Some(url)) => fetch_jwks(url).await.map_err(bad)?,
        (None, None) => return Err(bad("the client has no registered keys".into())),
    };
    let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
        Some(kid) => jwks
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid))
            .collect(),
        None => jwks.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(bad(
            "no registered key matches the client_assertion's kid".into()
        ));
    }
    let mut v = Validation::new(header.alg);
    v.set_audience(&[auth.token_url()]);
    v.set_issuer(&[&client.client_id]);
    v.sub = Some(client.client_id.clone());
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub", "jti"]);
    let mut last = String::from("signature does not verify");
    let mut verified = None;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v) {
            Ok(d) => {
                verified = Some(d.claims);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let claims = verified.ok_or_else(|| bad(format!("client_assertion rejected: {last}")))?;
    let t = now();
    if claims.exp > t + ASSERTION_MAX_TTL {
        return Err(bad(format!(
            "client_assertion exp must be at most {ASSERTION_MAX_TTL} seconds ahead"
        )));
    }
    // Replay: each jti once per client while the assertion could be valid.
    let mut tx = auth.store.begin().await?;
    db::delete_expired_assertions(tx.conn(), t).await?;
    let inserted =
        db::record_assertion(tx.conn(), &client.client_id, &claims.jti, claims.exp).await?;
    tx.commit().await?;
    if !inserted {
        return Err(bad("client_assertion jti has been used before".into()));
    }
    Ok(client)
}

/// Largest JWKS document accepted from a client's `jwks_url`.
const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Fetches a client's key set from its registered `jwks_url` (HTTPS; plain
/// HTTP only on the loopback interface), bounded in time and size.
async fn fetch_jwks(url: &str) -> Result<JwkSet, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url '{url}': {e}"))?;
    let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
        return Err(format!("jwks_url '{url}' must use https"));
    }
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let mut response = client
        .get(parsed)
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("jwks_url '{url}' could not be fetched: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("jwks_url '{url}' answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("jwks_url '{url}': {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "jwks_url '{url}' returned more than {MAX_JWKS_BYTES} bytes"
            ));
        }
    }
    serde_json::from_slice(&body).map_err(|e| format!("jwks_url '{url}' is not a JWKS: {e}"))
}
