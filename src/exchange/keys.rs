//! Certificates and keys of the exchange: ehrx's own exchange key pair and
//! self-signed certificate (generated on first start, kept in the database),
//! and the signing certificates registered for subscribers.
//!
//! Certificates are parsed and built with `x509-cert`; EC P-256 keys are
//! `p256`'s. RSA keys are OpenSSL's (the `openssl` crate, on the same system
//! library that libxmlsec1 uses): its RSA private-key operations are
//! constant-time and blinded, unlike the `rsa` crate's (RUSTSEC-2023-0071).

use std::str::FromStr;
use std::time::Duration;

use openssl::pkey::{PKey, Private};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, DecodePem, Encode, EncodePem};
use x509_cert::Certificate;

use super::ExchangeError;
use crate::store::exchange as db;
use crate::store::secrets::Secrets;
use crate::store::Store;

/// A public key that can check an XML signature.
#[derive(Clone, Debug)]
pub enum PublicKey {
    Rsa(PKey<openssl::pkey::Public>),
    P256(p256::ecdsa::VerifyingKey),
}

/// A parsed X.509 certificate with what the exchange needs of it.
#[derive(Clone, Debug)]
pub struct Cert {
    pub der: Vec<u8>,
    /// SHA-256 of the DER, lower-case hex.
    pub fingerprint: String,
    /// The subject as an RFC 4514 string.
    pub subject: String,
    pub not_before: chrono::DateTime<chrono::Utc>,
    pub not_after: chrono::DateTime<chrono::Utc>,
    pub key: PublicKey,
}

impl Cert {
    /// Parses one certificate from PEM (`-----BEGIN CERTIFICATE-----`) or DER.
    pub fn parse(bytes: &[u8]) -> Result<Cert, ExchangeError> {
        let cert = if bytes.starts_with(b"-----") || bytes.iter().take(64).all(u8::is_ascii) {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| ExchangeError::Certificate("certificate PEM is not UTF-8".into()))?;
            let start = text.find("-----BEGIN CERTIFICATE-----").ok_or_else(|| {
                ExchangeError::Certificate("no '-----BEGIN CERTIFICATE-----' block found".into())
            })?;
            Certificate::from_pem(&text.as_bytes()[start..])
                .map_err(|e| ExchangeError::Certificate(format!("invalid certificate PEM: {e}")))?
        } else {
            Certificate::from_der(bytes)
                .map_err(|e| ExchangeError::Certificate(format!("invalid certificate DER: {e}")))?
        };
        Cert::from_x509(cert)
    }

    pub fn from_der(der: &[u8]) -> Result<Cert, ExchangeError> {
        let cert = Certificate::from_der(der)
            .map_err(|e| ExchangeError::Certificate(format!("invalid certificate DER: {e}")))?;
        Cert::from_x509(cert)
    }

    fn from_x509(cert: Certificate) -> Result<Cert, ExchangeError> {
        let der = cert
            .to_der()
            .map_err(|e| ExchangeError::Certificate(e.to_string()))?;
        let tbs = &cert.tbs_certificate;
        let spki = &tbs.subject_public_key_info;
        let spki_der = spki
            .to_der()
            .map_err(|e| ExchangeError::Certificate(e.to_string()))?;
        let key = match spki.algorithm.oid.to_string().as_str() {
            "1.2.840.113549.1.1.1" => PublicKey::Rsa(
                PKey::public_key_from_der(&spki_der)
                    .ok()
                    .filter(|k| k.rsa().is_ok())
                    .ok_or_else(|| ExchangeError::Certificate("invalid RSA public key".into()))?,
            ),
            "1.2.840.10045.2.1" => {
                use p256::pkcs8::DecodePublicKey;
                PublicKey::P256(
                    p256::ecdsa::VerifyingKey::from_public_key_der(&spki_der).map_err(|e| {
                        ExchangeError::Certificate(format!(
                            "unsupported EC public key (only P-256 is accepted): {e}"
                        ))
                    })?,
                )
            }
            other => {
                return Err(ExchangeError::Certificate(format!(
                    "unsupported public key algorithm {other}: use RSA or ECDSA P-256"
                )))
            }
        };
        let time = |t: &x509_cert::time::Time| {
            let secs = t.to_unix_duration().as_secs() as i64;
            chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default()
        };
        Ok(Cert {
            fingerprint: hex::encode(Sha256::digest(&der)),
            subject: tbs.subject.to_string(),
            not_before: time(&tbs.validity.not_before),
            not_after: time(&tbs.validity.not_after),
            der,
            key,
        })
    }

    pub fn to_pem(&self) -> String {
        let cert = Certificate::from_der(&self.der).expect("parsed before");
        cert.to_pem(LineEnding::LF).expect("PEM encoding")
    }

    /// The certificate as base64 DER (the content of `ds:X509Certificate`).
    pub fn to_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&self.der)
    }

    pub fn is_valid_at(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// ehrx's own exchange keys: an RSA-2048 key (signs with RSA-SHA256, and
/// decrypts content keys transported with RSA-OAEP to its certificate) and
/// an EC P-256 key (signs with ECDSA-SHA256), each with a self-signed
/// certificate.
#[derive(Clone)]
pub struct ExchangeKey {
    pub private: PKey<Private>,
    /// `private` as PKCS#8 PEM, for libxmlsec1.
    pub rsa_pem: String,
    pub cert: Cert,
    /// The EC P-256 private key as PKCS#8 PEM.
    pub ec_pem: String,
    pub ec_cert: Cert,
}

impl std::fmt::Debug for ExchangeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeKey")
            .field("cert", &self.cert.fingerprint)
            .field("ec_cert", &self.ec_cert.fingerprint)
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The kinds of exchange key; each is one row of `exchange_key`.
#[derive(Clone, Copy, Debug)]
enum KeyKind {
    Rsa = 1,
    Ec = 2,
}

impl KeyKind {
    /// The row's name when its private key is sealed.
    fn label(self) -> String {
        crate::store::secrets::label("exchange_key", &(self as i64).to_string())
    }
}

/// A self-signed certificate for `public`, signed by `signer`, valid for
/// `years`.
fn self_signed<S, Sig>(
    subject: &str,
    years: u64,
    public: x509_cert::spki::SubjectPublicKeyInfoOwned,
    signer: &S,
) -> Result<Cert, ExchangeError>
where
    S: signature::Keypair
        + x509_cert::spki::DynSignatureAlgorithmIdentifier
        + signature::Signer<Sig>,
    S::VerifyingKey: x509_cert::spki::EncodePublicKey,
    Sig: x509_cert::spki::SignatureBitStringEncoding,
{
    use x509_cert::builder::{Builder, CertificateBuilder, Profile};
    let fail = |e: &dyn std::fmt::Display| ExchangeError::Certificate(format!("{e}"));
    let mut serial = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut serial);
    serial[0] &= 0x7f;
    let serial = x509_cert::serial_number::SerialNumber::new(&serial).map_err(|e| fail(&e))?;
    let validity =
        x509_cert::time::Validity::from_now(Duration::from_secs(years * 365 * 24 * 3600))
            .map_err(|e| fail(&e))?;
    let name = x509_cert::name::Name::from_str(subject).map_err(|e| fail(&e))?;
    let builder = CertificateBuilder::new(Profile::Root, serial, validity, name, public, signer)
        .map_err(|e| fail(&e))?;
    Cert::from_x509(builder.build::<Sig>().map_err(|e| fail(&e))?)
}

/// Signs certificates with an OpenSSL RSA key: RSASSA-PKCS1-v1_5 with
/// SHA-256 (`sha256WithRSAEncryption`), for `x509-cert`'s builder.
struct RsaSha256Signer {
    key: PKey<Private>,
    public: RsaSpki,
}

/// An RSA public key as SubjectPublicKeyInfo DER.
#[derive(Clone)]
struct RsaSpki(Vec<u8>);

/// An RSASSA-PKCS1-v1_5 signature.
struct RsaSignature(Vec<u8>);

impl RsaSha256Signer {
    fn new(key: PKey<Private>) -> Result<RsaSha256Signer, openssl::error::ErrorStack> {
        let public = RsaSpki(key.public_key_to_der()?);
        Ok(RsaSha256Signer { key, public })
    }
}

impl x509_cert::spki::EncodePublicKey for RsaSpki {
    fn to_public_key_der(&self) -> x509_cert::spki::Result<x509_cert::der::Document> {
        Ok(x509_cert::der::Document::try_from(self.0.as_slice())?)
    }
}

impl signature::Keypair for RsaSha256Signer {
    type VerifyingKey = RsaSpki;
    fn verifying_key(&self) -> RsaSpki {
        self.public.clone()
    }
}

impl x509_cert::spki::DynSignatureAlgorithmIdentifier for RsaSha256Signer {
    fn signature_algorithm_identifier(
        &self,
    ) -> x509_cert::spki::Result<x509_cert::spki::AlgorithmIdentifierOwned> {
        Ok(x509_cert::spki::AlgorithmIdentifierOwned {
            // sha256WithRSAEncryption, with NULL parameters (RFC 4055).
            oid: x509_cert::der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11"),
            parameters: Some(x509_cert::der::asn1::Null.into()),
        })
    }
}

impl signature::Signer<RsaSignature> for RsaSha256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<RsaSignature, signature::Error> {
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &self.key)
                .map_err(signature::Error::from_source)?;
        signer.update(msg).map_err(signature::Error::from_source)?;
        signer
            .sign_to_vec()
            .map(RsaSignature)
            .map_err(signature::Error::from_source)
    }
}

impl x509_cert::spki::SignatureBitStringEncoding for RsaSignature {
    fn to_bitstring(&self) -> x509_cert::der::Result<x509_cert::der::asn1::BitString> {
        x509_cert::der::asn1::BitString::from_bytes(&self.0)
    }
}

/// Generates a key of `kind` and its self-signed certificate valid for
/// `years`: the private key as PKCS#8 PEM, and the certificate.
fn generate(kind: KeyKind, subject: &str, years: u64) -> Result<(String, Cert), ExchangeError> {
    let fail = |e: &dyn std::fmt::Display| ExchangeError::Certificate(format!("{e}"));
    let mut rng = rand_core::OsRng;
    match kind {
        KeyKind::Rsa => {
            let private = openssl::rsa::Rsa::generate(2048)
                .and_then(PKey::from_rsa)
                .map_err(|e| ExchangeError::Certificate(format!("key generation failed: {e}")))?;
            let signer = RsaSha256Signer::new(private).map_err(|e| fail(&e))?;
            let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(&signer.public.0)
                .map_err(|e| fail(&e))?;
            let cert = self_signed::<_, RsaSignature>(subject, years, spki, &signer)?;
            let pem = signer
                .key
                .private_key_to_pem_pkcs8()
                .map_err(|e| fail(&e))
                .and_then(|pem| String::from_utf8(pem).map_err(|e| fail(&e)))?;
            Ok((pem, cert))
        }
        KeyKind::Ec => {
            let private = p256::SecretKey::random(&mut rng);
            let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_key(private.public_key())
                .map_err(|e| fail(&e))?;
            let signer = p256::ecdsa::SigningKey::from(&private);
            let cert = self_signed::<_, p256::ecdsa::DerSignature>(subject, years, spki, &signer)?;
            let pem = private.to_pkcs8_pem(LineEnding::LF).map_err(|e| fail(&e))?;
            Ok((pem.to_string(), cert))
        }
    }
}

/// Generates a fresh RSA-2048 key and self-signed certificate valid for
/// `years`, with a fresh EC P-256 key and certificate beside it.
pub fn generate_exchange_key(subject: &str, years: u64) -> Result<ExchangeKey, ExchangeError> {
    let (rsa_pem, cert) = generate(KeyKind::Rsa, subject, years)?;
    let (ec_pem, ec_cert) = generate(KeyKind::Ec, subject, years)?;
    ExchangeKey::from_parts(rsa_pem, cert, ec_pem, ec_cert)
}

impl ExchangeKey {
    fn from_parts(
        rsa_pem: String,
        cert: Cert,
        ec_pem: String,
        ec_cert: Cert,
    ) -> Result<ExchangeKey, ExchangeError> {
        // PKCS#8 PEM, as generated by either OpenSSL or (before) the `rsa` crate.
        let private = PKey::private_key_from_pem(rsa_pem.as_bytes())
            .ok()
            .filter(|k| k.rsa().is_ok())
            .ok_or_else(|| {
                ExchangeError::Certificate("stored exchange key: not an RSA key".into())
            })?;
        Ok(ExchangeKey {
            private,
            rsa_pem,
            cert,
            ec_pem,
            ec_cert,
        })
    }
}

/// Loads ehrx's exchange keys, generating and storing each on first use.
pub async fn exchange_key(store: &Store) -> Result<ExchangeKey, ExchangeError> {
    let (rsa_pem, cert) = stored_or_generated(store, KeyKind::Rsa).await?;
    let (ec_pem, ec_cert) = stored_or_generated(store, KeyKind::Ec).await?;
    ExchangeKey::from_parts(rsa_pem, cert, ec_pem, ec_cert)
}

async fn stored_or_generated(
    store: &Store,
    kind: KeyKind,
) -> Result<(String, Cert), ExchangeError> {
    if let Some(k) = load_key(store, kind).await? {
        return Ok(k);
    }
    let (pem, cert) = super::blocking(move || generate(kind, "CN=ehrx exchange", 10)).await?;
    let mut tx = store.begin().await?;
    // Two processes starting at once: the first row wins, both use it.
    let row = db::KeyRow {
        private_key_pem: store.secrets().seal(&kind.label(), &pem)?,
        certificate_pem: cert.to_pem(),
    };
    db::insert_key(tx.conn(), kind as i64, &row, &rfc3339(chrono::Utc::now())).await?;
    tx.commit().await?;
    load_key(store, kind)
        .await?
        .ok_or_else(|| ExchangeError::Certificate("exchange key not stored".into()))
}

async fn load_key(store: &Store, kind: KeyKind) -> Result<Option<(String, Cert)>, ExchangeError> {
    let mut conn = store.reader().await?;
    let Some(row) = db::key(&mut conn, kind as i64).await? else {
        return Ok(None);
    };
    let (stored, cert_pem) = (row.private_key_pem, row.certificate_pem);
    drop(conn);
    let secrets = store.secrets();
    let key_pem = secrets.open(&kind.label(), &stored)?;
    if secrets.sealing() && !Secrets::is_sealed(&stored) {
        // Stored before a key-encryption key was configured: seal it now.
        let mut tx = store.begin().await?;
        let sealed = secrets.seal(&kind.label(), &key_pem)?;
        db::set_key_private_pem(tx.conn(), kind as i64, &sealed).await?;
        tx.commit().await?;
    }
    Ok(Some((key_pem, Cert::parse(cert_pem.as_bytes())?)))
}

/// A subscriber's registered signing certificate.
#[derive(Clone, Debug)]
pub struct Registered {
    pub organization_id: String,
    pub cert: Cert,
    pub revoked: Option<String>,
}

impl Registered {
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "organization": format!("Organization/{}", self.organization_id),
            "fingerprint": self.cert.fingerprint,
            "subject": self.cert.subject,
            "notBefore": rfc3339(self.cert.not_before),
            "notAfter": rfc3339(self.cert.not_after),
            "revoked": self.revoked,
        })
    }
}

/// Every registered certificate (revoked and expired ones too, so that a
/// refusal can say why).
pub async fn registered(store: &Store) -> Result<Vec<Registered>, ExchangeError> {
    let mut conn = store.reader().await?;
    let rows = db::certificates(&mut conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(Registered {
            organization_id: row.organization_id,
            cert: Cert::parse(row.certificate_pem.as_bytes())?,
            revoked: row.revoked,
        });
    }
    Ok(out)
}

/// Registers `cert` for the subscriber organisation.
pub async fn register(
    conn: &mut sqlx::AnyConnection,
    organization_id: &str,
    cert: &Cert,
) -> Result<(), ExchangeError> {
    let existing = db::certificate_organization(conn, cert.fingerprint.as_str()).await?;
    if let Some(org) = existing {
        return Err(ExchangeError::Certificate(format!(
            "certificate {} is already registered for Organization/{org}",
            cert.fingerprint
        )));
    }
    let (pem, not_before, not_after, added) = (
        cert.to_pem(),
        rfc3339(cert.not_before),
        rfc3339(cert.not_after),
        rfc3339(chrono::Utc::now()),
    );
    let row = db::NewCertificate {
        fingerprint: cert.fingerprint.as_str(),
        organization_id,
        certificate_pem: &pem,
        subject: cert.subject.as_str(),
        not_before: &not_before,
        not_after: &not_after,
        added: &added,
    };
    db::insert_certificate(conn, &row).await?;
    Ok(())
}

/// Marks a certificate revoked; returns false when no such certificate is registered.
pub async fn revoke(store: &Store, fingerprint: &str) -> Result<bool, ExchangeError> {
    let mut tx = store.begin().await?;
    let done = db::revoke_certificate(
        tx.conn(),
        &fingerprint.to_ascii_lowercase().replace(':', ""),
        &rfc3339(chrono::Utc::now()),
    )
    .await?;
    tx.commit().await?;
    Ok(done)
}

/// Whether the subscriber requires mutual TLS.
pub async fn requires_mtls(store: &Store, organization_id: &str) -> Result<bool, ExchangeError> {
    let mut conn = store.reader().await?;
    Ok(db::subscriber_requires_mtls(&mut conn, organization_id)
        .await?
        .unwrap_or(false))
}

/// Sets the subscriber's mutual-TLS requirement.
pub async fn set_requires_mtls(
    conn: &mut sqlx::AnyConnection,
    organization_id: &str,
    required: bool,
) -> Result<(), ExchangeError> {
    db::set_subscriber_requires_mtls(conn, organization_id, required).await?;
    Ok(())
}
