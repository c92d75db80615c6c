//! Signed checkpoints: the log's size and root at one moment, signed with
//! the audit key (ECDSA P-256 with SHA-256), whose public half is published
//! (`GET /audit/key`).
//!
//! The signed text is a C2SP tlog checkpoint body: the origin line, the
//! tree size in decimal, and the root hash in base64, each ending with a
//! newline. The signature is ASN.1 DER over exactly those bytes, so any
//! ECDSA library can check it (the interoperability test uses Python's
//! `cryptography`). A C2SP signed note (`— origin base64(key id ‖
//! signature)`) is served beside it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The signing algorithm, as published.
pub const ALGORITHM: &str = "ECDSA-P256-SHA256";

/// One signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    /// The root hash, base64.
    pub root: String,
    /// When it was signed (FHIR instant; not part of the signed text).
    pub created: String,
    pub key_id: String,
    /// DER ECDSA signature over [`Checkpoint::note`], base64.
    pub signature: String,
}

impl Checkpoint {
    /// The signed text.
    pub fn note(&self) -> String {
        note(&self.origin, self.size, &self.root)
    }

    pub fn root_bytes(&self) -> Option<[u8; 32]> {
        B64.decode(&self.root).ok()?.try_into().ok()
    }

    /// The checkpoint as served: its fields, the signed text and the C2SP
    /// signed note.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["note"] = serde_json::json!(self.note());
        v["algorithm"] = serde_json::json!(ALGORITHM);
        let mut sig = hex::decode(&self.key_id)
            .unwrap_or_default()
            .into_iter()
            .take(4)
            .collect::<Vec<u8>>();
        sig.extend(B64.decode(&self.signature).unwrap_or_default());
        v["signed_note"] = serde_json::json!(format!(
            "{}\n\u{2014} {} {}\n",
            self.note(),
            self.origin,
            B64.encode(sig)
        ));
        v
    }
}

/// The C2SP checkpoint body.
pub fn note(origin: &str, size: u64, root_b64: &str) -> String {
    format!("{origin}\n{size}\n{root_b64}\n")
}

/// A new audit key: `(private PKCS#8 PEM, public SPKI PEM)`.
pub fn generate() -> Result<(String, String), String> {
    let key = SigningKey::random(&mut rand_core::OsRng);
    let private = key
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let public = VerifyingKey::from(&key)
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| e.to_string())?;
    Ok((private, public))
}

/// The id of a public key: hex of the first 8 bytes of SHA-256 of its
/// SubjectPublicKeyInfo (DER).
pub fn key_id(public_pem: &str) -> Result<String, String> {
    let vk = VerifyingKey::from_public_key_pem(public_pem).map_err(|e| e.to_string())?;
    let der = vk.to_public_key_der().map_err(|e| e.to_string())?;
    Ok(hex::encode(&sha2::Sha256::digest(der.as_bytes())[..8]))
}

/// Signs a checkpoint of a tree of `size` leaves with root `root`.
pub fn sign(
    private_pem: &str,
    key_id: &str,
    origin: &str,
    size: u64,
    root: &[u8; 32],
    created: String,
) -> Result<Checkpoint, String> {
    let key = SigningKey::from_pkcs8_pem(private_pem).map_err(|e| e.to_string())?;
    let root = B64.encode(root);
    let sig: DerSignature = key.sign(note(origin, size, &root).as_bytes());
    Ok(Checkpoint {
        origin: origin.to_string(),
        size,
        root,
        created,
        key_id: key_id.to_string(),
        signature: B64.encode(sig.as_bytes()),
    })
}

/// Whether `c` is signed by the key `public_pem`.
pub fn verify(public_pem: &str, c: &Checkpoint) -> bool {
    let Ok(vk) = VerifyingKey::from_public_key_pem(public_pem) else {
        return false;
    };
    let Ok(bytes) = B64.decode(&c.signature) else {
        return false;
    };
    let Ok(sig) = DerSignature::try_from(bytes.as_slice()) else {
        return false;
    };
    vk.verify(c.note().as_bytes(), &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_verifies_and_a_changed_one_does_not() {
        let (private, public) = generate().unwrap();
        let id = key_id(&public).unwrap();
        let mut c = sign(&private, &id, "ehrx", 5, &[7u8; 32], "t".into()).unwrap();
        assert!(verify(&public, &c));
        c.size = 4;
        assert!(!verify(&public, &c));
    }
}
