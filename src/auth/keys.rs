//! Token signing keys: RSA 2048 (RS256, the algorithm every OpenID Connect
//! client must accept), generated on first start and kept in the database so
//! every ehrx node of one deployment signs and verifies with the same keys.
//! `ehrx keys rotate` adds a new key and retires the old one; a retired key
//! stays in the JWKS until the tokens it signed have expired.
//!
//! The private key is stored in the database as PKCS#8 PEM, sealed with the
//! key-encryption key when one is configured (see [`crate::store::secrets`]).
//! Keys are generated with OpenSSL; tokens are signed and verified by
//! `jsonwebtoken` with AWS-LC. Neither uses the `rsa` crate, whose
//! private-key operations are not constant-time (RUSTSEC-2023-0071).

use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::Value;

use super::{now, AuthError, AuthResult, KEY_RETENTION};
use crate::store::auth as db;
use crate::store::secrets::Secrets;
use crate::store::Store;

/// The row's name when its private key is sealed.
fn label(kid: &str) -> String {
    crate::store::secrets::label("auth_key", kid)
}

#[derive(Clone)]
struct Key {
    kid: String,
    retired: Option<i64>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

/// The signing keys of this deployment, cached from the database.
#[derive(Clone, Default)]
pub struct Keys {
    keys: Arc<RwLock<Vec<Key>>>,
}

fn generate() -> AuthResult<(String, String, Value)> {
    let private = openssl::rsa::Rsa::generate(2048)
        .and_then(openssl::pkey::PKey::from_rsa)
        .map_err(|e| AuthError::Key(format!("RSA key generation failed: {e}")))?;
    let pem = private
        .private_key_to_pem_pkcs8()
        .map_err(|e| AuthError::Key(e.to_string()))?;
    let pem = String::from_utf8(pem).map_err(|e| AuthError::Key(e.to_string()))?;
    let encoding =
        EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| AuthError::Key(e.to_string()))?;
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256)
        .map_err(|e| AuthError::Key(e.to_string()))?;
    let kid = jwk
        .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        .map_err(|e| AuthError::Key(e.to_string()))?;
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    let jwk = serde_json::to_value(&jwk).map_err(|e| AuthError::Key(e.to_string()))?;
    Ok((kid, pem, jwk))
}

async fn insert_new(store: &Store) -> AuthResult<String> {
    let (kid, pem, jwk) = tokio::task::spawn_blocking(generate)
        .await
        .map_err(|e| AuthError::Key(e.to_string()))??;
    let mut tx = store.begin().await?;
    let t = now();
    db::retire_keys(tx.conn(), t).await?;
    let sealed = store.secrets().seal(&label(&kid), &pem)?;
    db::insert_key(tx.conn(), &kid, &sealed, &jwk.to_string(), t).await?;
    tx.commit().await?;
    Ok(kid)
}

impl Keys {
    /// Loads the keys, generating the first one if there is none.
    pub async fn load_or_create(store: &Store) -> AuthResult<Keys> {
        let keys = Keys::default();
        keys.reload(store).await?;
        if keys.active().is_none() {
            insert_new(store).await?;
            keys.reload(store).await?;
        }
        Ok(keys)
    }

    /// Adds a new signing key and retires the current one (`ehrx keys rotate`).
    pub async fn rotate(store: &Store) -> AuthResult<String> {
        insert_new(store).await
    }

    /// Re-reads the keys (another node or the CLI may have rotated them).
    pub async fn reload(&self, store: &Store) -> AuthResult<()> {
        let mut conn = store.reader().await?;
        let rows = db::keys(&mut conn).await?;
        drop(conn);
        let secrets = store.secrets();
        let mut keys = Vec::new();
        for r in rows {
            let kid = r.kid;
            let stored = r.private_pem;
            let pem = secrets.open(&label(&kid), &stored)?;
            if secrets.sealing() && !Secrets::is_sealed(&stored) {
                // Stored before a key-encryption key was configured: seal it now.
                let mut tx = store.begin().await?;
                let sealed = secrets.seal(&label(&kid), &pem)?;
                db::set_key_private_pem(tx.conn(), &kid, &sealed).await?;
                tx.commit().await?;
            }
            let jwk_text = r.public_jwk;
            let jwk: Jwk =
                serde_json::from_str(&jwk_text).map_err(|e| AuthError::Key(e.to_string()))?;
            keys.push(Key {
                kid,
                retired: r.retired,
                encoding: EncodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| AuthError::Key(e.to_string()))?,
                decoding: DecodingKey::from_jwk(&jwk).map_err(|e| AuthError::Key(e.to_string()))?,
                jwk: serde_json::from_str(&jwk_text).map_err(|e| AuthError::Key(e.to_string()))?,
            });
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// The active key: `(kid, key)`.
    fn active(&self) -> Option<(String, EncodingKey)> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| k.retired.is_none())
            .map(|k| (k.kid.clone(), k.encoding.clone()))
    }

    /// The key to sign with now, after checking for a rotation.
    pub async fn signing_key(&self, store: &Store) -> AuthResult<(String, EncodingKey)> {
        self.reload(store).await?;
        self.active()
            .ok_or_else(|| AuthError::Key("no active signing key".into()))
    }

    /// The verification key of `kid`, re-reading the keys once if unknown.
    pub async fn decoding_key(&self, store: &Store, kid: &str) -> AuthResult<Option<DecodingKey>> {
        let find = |keys: &Keys| {
            keys.keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|k| k.kid == kid && k.retired.is_none_or(|r| r + KEY_RETENTION > now()))
                .map(|k| k.decoding.clone())
        };
        if let Some(k) = find(self) {
            return Ok(Some(k));
        }
        self.reload(store).await?;
        Ok(find(self))
    }

    /// The public JWKS: the active key and the retired keys whose tokens
    /// may still be valid.
    pub async fn jwks(&self, store: &Store) -> AuthResult<Value> {
        self.reload(store).await?;
        let t = now();
        let keys: Vec<Value> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|k| k.retired.is_none_or(|r| r + KEY_RETENTION > t))
            .map(|k| k.jwk.clone())
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }
}
