//! Issuing and checking tokens. Access tokens are RS256 JWTs (so another
//! resource server can check them against the JWKS) and are also recorded by
//! `jti`, so revocation takes effect at once; refresh tokens are opaque
//! random values stored as hashes, rotated on every use.

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::sync::Arc;

use super::cache::{self, Verified};
use super::{now, random_token, sha256_b64, Auth, AuthError, AuthResult, OFFLINE_TTL, SESSION_TTL};
use crate::policy::scope::{self, Scope};
use crate::policy::{Access, Role};
use crate::store::auth as db;

/// The claims of an ehrx access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    #[serde(rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    /// The Organization a backend client was bound to at registration
    /// (an insurer), and its insurer role.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub organization: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub insurer_role: Option<String>,
}

/// Who is calling, from a checked access token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub claims: Claims,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn access(&self) -> Access {
        Access::from_token(&self.scopes, self.claims.patient.as_deref(), self.role())
    }

    /// The caller's role in the circle of trust.
    pub fn role(&self) -> Role {
        Role::of_token(
            self.claims.fhir_user.as_deref(),
            self.claims.organization.as_deref(),
            self.claims.insurer_role.as_deref(),
        )
    }
}

/// What a grant authorises; the input of [`issue`].
#[derive(Debug, Clone)]
pub struct Grant {
    /// Ties every token of one authorization together (for revocation).
    pub grant_id: String,
    pub client_id: String,
    pub user_id: Option<String>,
    pub fhir_user: Option<String>,
    /// A backend client's Organization (an insurer) and insurer role.
    pub organization: Option<String>,
    pub insurer_role: Option<String>,
    pub scopes: Vec<Scope>,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub nonce: Option<String>,
    /// Issue a refresh token (offline_access / online_access granted).
    pub refresh: bool,
}

/// Issues an access token (and refresh and id tokens where the grant
/// allows) and returns the token response body.
pub async fn issue(auth: &Auth, grant: &Grant) -> AuthResult<Value> {
    let (kid, key) = auth.keys.signing_key(&auth.store).await?;
    let t = now();
    let scope_text = scope::join(&grant.scopes);
    let claims = Claims {
        iss: auth.issuer.clone(),
        sub: grant
            .user_id
            .clone()
            .unwrap_or_else(|| grant.client_id.clone()),
        aud: auth.issuer.clone(),
        exp: t + auth.access_ttl,
        iat: t,
        jti: random_token(),
        client_id: grant.client_id.clone(),
        scope: scope_text.clone(),
        patient: grant.patient.clone(),
        encounter: grant.encounter.clone(),
        fhir_user: grant.fhir_user.clone(),
        organization: grant.organization.clone(),
        insurer_role: grant.insurer_role.clone(),
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.clone());
    let access =
        jsonwebtoken::encode(&header, &claims, &key).map_err(|e| AuthError::Key(e.to_string()))?;
    let mut tx = auth.store.begin().await?;
    record(
        tx.conn(),
        &claims.jti,
        "access",
        grant,
        &scope_text,
        claims.exp,
    )
    .await?;
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": auth.access_ttl,
        "scope": scope_text,
    });
    if let Some(p) = &grant.patient {
        body["patient"] = json!(p);
        body["need_patient_banner"] = json!(true);
    }
    if let Some(e) = &grant.encounter {
        body["encounter"] = json!(e);
    }
    if grant.user_id.is_some() {
        body["smart_style_url"] = json!(format!("{}/auth/smart-style.json", auth.issuer));
        if grant.patient.is_none() {
            body["need_patient_banner"] = json!(false);
        }
    }
    if grant.refresh {
        let refresh = random_token();
        let ttl = if grant.scopes.contains(&Scope::OfflineAccess) {
            OFFLINE_TTL
        } else {
            SESSION_TTL
        };
        record(
            tx.conn(),
            &sha256_b64(&refresh),
            "refresh",
            grant,
            &scope_text,
            t + ttl,
        )
        .await?;
        body["refresh_token"] = json!(refresh);
    }
    if grant.scopes.contains(&Scope::OpenId)
        && (grant.scopes.contains(&Scope::FhirUser) || grant.scopes.contains(&Scope::Profile))
    {
        if let (Some(sub), Some(fhir_user)) = (&grant.user_id, &grant.fhir_user) {
            let mut id = json!({
                "iss": auth.issuer, "sub": sub, "aud": grant.client_id,
                "exp": t + auth.access_ttl, "iat": t, "fhirUser": fhir_user,
            });
            if let Some(n) = &grant.nonce {
                id["nonce"] = json!(n);
            }
            let id_token = jsonwebtoken::encode(&header, &id, &key)
                .map_err(|e| AuthError::Key(e.to_string()))?;
            body["id_token"] = json!(id_token);
        }
    }
    tx.commit().await?;
    Ok(body)
}

async fn record(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    kind: &str,
    g: &Grant,
    scope: &str,
    expires: i64,
) -> AuthResult<()> {
    let token = db::NewToken {
        id,
        kind,
        grant_id: &g.grant_id,
        client_id: &g.client_id,
        user_id: g.user_id.as_deref(),
        fhir_user: g.fhir_user.as_deref(),
        scope,
        patient: g.patient.as_deref(),
        encounter: g.encounter.as_deref(),
        expires,
    };
    db::insert_token(conn, &token, now()).await?;
    Ok(())
}

/// Checks a bearer access token: signature by one of our keys, issuer,
/// audience (this FHIR base), expiry, and that it was not revoked. A token
/// checked before is answered from memory until it expires or is revoked
/// (`super::cache`).
pub async fn verify(auth: &Auth, token: &str) -> AuthResult<Arc<Verified>> {
    let key = cache::key_of(token);
    let t = now();
    if let Some(v) = auth.tokens.get(&key, t) {
        return Ok(v);
    }
    let generation = auth.tokens.generation();
    let v = Arc::new(verify_uncached(auth, token).await?);
    auth.tokens.insert(key, Arc::clone(&v), generation, t);
    Ok(v)
}

/// [`verify`] without the memory of checked tokens: the signature, the
/// claims and the token's record in the database, every time.
pub async fn verify_uncached(auth: &Auth, token: &str) -> AuthResult<Verified> {
    let bad = |why: &str| AuthError::InvalidToken(why.to_string());
    let header = jsonwebtoken::decode_header(token).map_err(|_| bad("the token is not a JWT"))?;
    let kid = header.kid.ok_or_else(|| bad("the token has no key id"))?;
    let key = auth
        .keys
        .decoding_key(&auth.store, &kid)
        .await?
        .ok_or_else(|| bad("the token was not signed by a current ehrx key"))?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[&auth.issuer]);
    v.set_issuer(&[&auth.issuer]);
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
        AuthError::InvalidToken(match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired".into(),
            jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                format!("the token's audience is not {}", auth.issuer)
            }
            _ => format!("the token is not valid: {e}"),
        })
    })?;
    let mut conn = auth.store.reader().await?;
    let state = match db::access_token_state(&mut conn, &data.claims.jti).await? {
        Some(s) if !s.revoked => s,
        Some(_) => return Err(bad("the token has been revoked")),
        None => return Err(bad("the token is unknown to this server")),
    };
    let scopes = scope::parse_scopes(&data.claims.scope)
        .map_err(|_| bad("the token's scope is malformed"))?;
    let principal = Principal {
        claims: data.claims,
        scopes,
    };
    Ok(Verified {
        access: principal.access(),
        exp: principal.claims.exp,
        grant_id: state.grant_id,
        user_id: state.user_id,
        principal,
    })
}

/// Revokes every token of one authorization (a replayed code or refresh
/// token means it leaked). After the commit, call [`revoked`].
pub async fn revoke_grant(tx: &mut crate::store::Tx, grant_id: &str) -> AuthResult<()> {
    db::revoke_grant(tx, grant_id, now()).await?;
    Ok(())
}

/// Revokes one access token by its `jti`. After the commit, call
/// [`revoked`].
pub async fn revoke_access_token(tx: &mut crate::store::Tx, jti: &str) -> AuthResult<()> {
    db::revoke_token(tx, jti, now()).await?;
    Ok(())
}

/// Makes this process forget revoked tokens at once, after a revocation
/// was committed (other processes learn of it within
/// `revocation_max_delay`).
pub async fn revoked(auth: &Auth) {
    if let Err(e) = auth.tokens.sync(&auth.store).await {
        tracing::warn!(error = %e, "cannot read the revocation log after revoking");
    }
}

/// A stored token (access by `jti`, refresh by hash).
pub use db::TokenRow as Stored;

pub async fn find(conn: &mut sqlx::AnyConnection, id: &str) -> AuthResult<Option<Stored>> {
    Ok(db::token(conn, id).await?)
}

/// The stored record of a token as presented: a JWT access token by its
/// `jti` (signature checked, expiry not), or a refresh token by hash.
pub async fn lookup(
    auth: &Auth,
    conn: &mut sqlx::AnyConnection,
    token: &str,
) -> AuthResult<Option<Stored>> {
    if token.contains('.') {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        let Some(kid) = header.kid else {
            return Ok(None);
        };
        let Some(key) = auth.keys.decoding_key(&auth.store, &kid).await? else {
            return Ok(None);
        };
        let mut v = Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &key, &v) else {
            return Ok(None);
        };
        find(conn, &data.claims.jti).await
    } else {
        find(conn, &sha256_b64(token)).await
    }
}
