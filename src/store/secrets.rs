//! Private keys at rest. With a key-encryption key configured
//! (`key_encryption_key_file`: 32 random bytes, base64), the private keys
//! ehrx keeps in its database — the SMART token signing keys and the
//! exchange keys — are stored sealed with AES-256-GCM, each bound to its row
//! (the row's label is the associated data, so a sealed value copied to
//! another row does not open). Without one they are stored as PEM text, and
//! the database must be protected like any secret store.
//!
//! Sealed values read `sealed:v1:` + base64(nonce ‖ ciphertext ‖ tag). A key
//! stored before a key-encryption key was configured is sealed the next time
//! it is loaded; [`reseal`] (`ehrx keys reseal`) moves every key to a new
//! key-encryption key, or back to PEM, in one transaction.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;

use super::{Store, StoreError};

const PREFIX: &str = "sealed:v1:";

/// The columns that hold private keys: table, id column, key column.
const KEY_COLUMNS: [(&str, &str, &str); 3] = [
    ("auth_key", "kid", "private_pem"),
    ("exchange_key", "id", "private_key_pem"),
    ("audit_key", "id", "private_key"),
];

/// The name a sealed value is bound to: its table and row id.
pub fn label(table: &str, id: &str) -> String {
    format!("{table}/{id}")
}

/// Opens every stored private key with the store's key-encryption key and
/// stores it again sealed with `new` (or as PEM when `new` seals nothing),
/// all in one transaction. Returns how many keys were rewritten.
pub async fn reseal(store: &Store, new: &Secrets) -> Result<usize, StoreError> {
    let mut tx = store.begin().await?;
    let mut n = 0;
    for (table, id_column, key_column) in KEY_COLUMNS {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT CAST({id_column} AS TEXT), {key_column} FROM {table}"
        ))
        .fetch_all(tx.conn())
        .await?;
        for (id, stored) in rows {
            let name = label(table, &id);
            let key = store.secrets().open(&name, &stored)?;
            sqlx::query(&format!(
                "UPDATE {table} SET {key_column} = $1 WHERE CAST({id_column} AS TEXT) = $2"
            ))
            .bind(new.seal(&name, &key)?)
            .bind(&id)
            .execute(tx.conn())
            .await?;
            n += 1;
        }
    }
    tx.commit().await?;
    Ok(n)
}

/// The key-encryption key, if one is configured.
#[derive(Clone, Default)]
pub struct Secrets {
    cipher: Option<Aes256Gcm>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("sealing", &self.cipher.is_some())
            .finish()
    }
}

impl Secrets {
    /// Reads the key-encryption key: base64 of exactly 32 bytes (e.g.
    /// `openssl rand -base64 32`).
    pub fn from_file(path: &std::path::Path) -> Result<Secrets, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("key_encryption_key_file {}: {e}", path.display()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| {
                format!(
                    "key_encryption_key_file {}: not base64 ({e})",
                    path.display()
                )
            })?;
        if bytes.len() != 32 {
            return Err(format!(
                "key_encryption_key_file {}: {} bytes; it must hold 32 (openssl rand -base64 32)",
                path.display(),
                bytes.len()
            ));
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|e| e.to_string())?;
        Ok(Secrets {
            cipher: Some(cipher),
        })
    }

    /// Whether private keys are sealed.
    pub fn sealing(&self) -> bool {
        self.cipher.is_some()
    }

    /// Whether a stored value is sealed.
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    /// What to store for `secret` in the row named `label`.
    pub fn seal(&self, label: &str, secret: &str) -> Result<String, StoreError> {
        let Some(cipher) = &self.cipher else {
            return Ok(secret.to_string());
        };
        let mut nonce = [0u8; 12];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: label.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Secret(format!("{label}: sealing failed")))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    /// The secret stored in the row named `label`.
    pub fn open(&self, label: &str, stored: &str) -> Result<String, StoreError> {
        let Some(data) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let Some(cipher) = &self.cipher else {
            return Err(StoreError::Secret(format!(
                "{label} is sealed with a key-encryption key; set key_encryption_key_file \
                 (EHRX_KEY_ENCRYPTION_KEY_FILE) to the file holding it"
            )));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| StoreError::Secret(format!("{label}: sealed value is not base64: {e}")))?;
        if bytes.len() < 12 + 16 {
            return Err(StoreError::Secret(format!(
                "{label}: sealed value is too short"
            )));
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: label.as_bytes(),
                },
            )
            .map_err(|_| {
                StoreError::Secret(format!(
                    "{label} does not open with the configured key-encryption key \
                     (a different key, or a value moved from another row)"
                ))
            })?;
        String::from_utf8(plain)
            .map_err(|_| StoreError::Secret(format!("{label}: sealed value is not text")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            cipher: Some(Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap()),
        }
    }

    #[test]
    fn sealed_values_open_only_in_their_row_and_with_their_key() {
        let s = secrets();
        let sealed = s.seal("auth_key/a", "-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(Secrets::is_sealed(&sealed) && !sealed.contains("PRIVATE"));
        assert_eq!(
            s.open("auth_key/a", &sealed).unwrap(),
            "-----BEGIN PRIVATE KEY-----"
        );
        assert!(s.open("auth_key/b", &sealed).is_err(), "bound to its row");
        let other = Secrets {
            cipher: Some(Aes256Gcm::new_from_slice(&[8u8; 32]).unwrap()),
        };
        assert!(other.open("auth_key/a", &sealed).is_err(), "another key");
        let none = Secrets::default();
        let e = none.open("auth_key/a", &sealed).unwrap_err().to_string();
        assert!(e.contains("key_encryption_key_file"), "{e}");
        // Plain values pass through (keys stored before sealing was set up).
        assert_eq!(s.open("auth_key/a", "plain").unwrap(), "plain");
        assert_eq!(none.seal("x", "plain").unwrap(), "plain");
    }

    #[test]
    fn the_key_file_must_hold_32_bytes_of_base64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, "c2hvcnQ=\n").unwrap();
        assert!(Secrets::from_file(&path).unwrap_err().contains("5 bytes"));
        std::fs::write(&path, "not base64!").unwrap();
        assert!(Secrets::from_file(&path)
            .unwrap_err()
            .contains("not base64"));
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        std::fs::write(&path, format!("{key}\n")).unwrap();
        assert!(Secrets::from_file(&path).unwrap().sealing());
    }
}
