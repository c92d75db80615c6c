//! XML-Enc: decrypting `xenc:EncryptedData` elements encrypted for ehrx's
//! exchange certificate (AES-128-GCM or AES-256-GCM content, the key in an
//! `xenc:EncryptedKey` with RSA-OAEP), and encrypting for a recipient.
//!
//! RSA-OAEP is OpenSSL's (constant-time and blinded); AES-GCM is `aes-gcm`'s.
//!
//! Decryption works on the document text: each EncryptedData element is
//! replaced by its plaintext and the result is parsed again with the same
//! limits, so decrypted content passes the same checks as the rest.

use aes_gcm::aead::{Aead, KeyInit};
use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPrivate, HasPublic, PKey, PKeyRef, Public};
use openssl::rsa::Padding;
use roxmltree::Node;

use super::keys::ExchangeKey;
use super::ns::{DSIG, XENC, XENC11};
use super::xml::{child, xpath, Limits};
use super::ExchangeError;

pub const AES128_GCM: &str = "http://www.w3.org/2009/xmlenc11#aes128-gcm";
pub const AES256_GCM: &str = "http://www.w3.org/2009/xmlenc11#aes256-gcm";
pub const RSA_OAEP_MGF1P: &str = "http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p";
pub const RSA_OAEP: &str = "http://www.w3.org/2009/xmlenc11#rsa-oaep";
pub const TYPE_ELEMENT: &str = "http://www.w3.org/2001/04/xmlenc#Element";
pub const TYPE_CONTENT: &str = "http://www.w3.org/2001/04/xmlenc#Content";

/// The most EncryptedData elements one document may carry.
const MAX_ENCRYPTED: usize = 256;

fn b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean)
}

fn is(node: &Node, ns: &str, name: &str) -> bool {
    node.is_element() && node.tag_name().namespace() == Some(ns) && node.tag_name().name() == name
}

fn cipher_value(parent: Node) -> Result<Vec<u8>, ExchangeError> {
    let value = child(parent, XENC, "CipherData")
        .and_then(|d| child(d, XENC, "CipherValue"))
        .ok_or_else(|| {
            ExchangeError::decryption(
                "xenc:CipherData/xenc:CipherValue is required (CipherReference is not accepted)",
                Some(xpath(parent)),
            )
        })?;
    b64(&super::xml::text_of(value)).map_err(|e| {
        ExchangeError::decryption(
            format!("CipherValue is not base64: {e}"),
            Some(xpath(value)),
        )
    })
}

/// Decrypts every EncryptedData element; returns the decrypted document text
/// and how many elements were decrypted.
pub fn decrypt_all(
    text: String,
    key: &ExchangeKey,
    limits: &Limits,
) -> Result<(String, usize), ExchangeError> {
    let mut text = text;
    let mut count = 0;
    loop {
        let next = {
            let doc = super::xml::parse(&text, limits)?;
            let found = doc.descendants().find(|n| is(n, XENC, "EncryptedData"));
            match found {
                None => None,
                Some(node) => {
                    let plain = decrypt_one(node, key)?;
                    Some((node.range(), plain))
                }
            }
        };
        let Some((range, plain)) = next else {
            return Ok((text, count));
        };
        count += 1;
        if count > MAX_ENCRYPTED {
            return Err(ExchangeError::Unsafe(format!(
                "more than {MAX_ENCRYPTED} EncryptedData elements"
            )));
        }
        let spliced = format!("{}{}{}", &text[..range.start], plain, &text[range.end..]);
        // The plaintext passes the same pre-scan as the document did.
        text = super::xml::prescan(spliced.as_bytes(), limits)?;
    }
}

fn decrypt_one(node: Node, key: &ExchangeKey) -> Result<String, ExchangeError> {
    let at = || Some(xpath(node));
    let ty = node.attribute("Type").unwrap_or(TYPE_ELEMENT);
    if ty != TYPE_ELEMENT && ty != TYPE_CONTENT {
        return Err(ExchangeError::decryption(
            format!("EncryptedData Type '{ty}' is not accepted: use Element or Content"),
            at(),
        ));
    }
    let method = child(node, XENC, "EncryptionMethod")
        .and_then(|m| m.attribute("Algorithm"))
        .unwrap_or("");
    let key_len = match method {
        AES128_GCM => 16,
        AES256_GCM => 32,
        other => {
            return Err(ExchangeError::decryption(
                format!("EncryptionMethod '{other}' is not accepted: use aes128-gcm or aes256-gcm"),
                at(),
            ))
        }
    };
    let encrypted_key = child(node, DSIG, "KeyInfo")
        .and_then(|k| child(k, XENC, "EncryptedKey"))
        .ok_or_else(|| {
            ExchangeError::decryption(
                "EncryptedData must carry its content key in ds:KeyInfo/xenc:EncryptedKey",
                at(),
            )
        })?;
    let content_key = unwrap_key(encrypted_key, key)?;
    if content_key.len() != key_len {
        return Err(ExchangeError::decryption(
            format!(
                "the content key has {} bytes; {method} needs {key_len}",
                content_key.len()
            ),
            Some(xpath(encrypted_key)),
        ));
    }
    let data = cipher_value(node)?;
    if data.len() < 12 + 16 {
        return Err(ExchangeError::decryption(
            "CipherValue too short for AES-GCM",
            at(),
        ));
    }
    let (iv, ciphertext) = data.split_at(12);
    let nonce = aes_gcm::Nonce::from_slice(iv);
    let plain = match key_len {
        16 => aes_gcm::Aes128Gcm::new_from_slice(&content_key)
            .expect("length checked")
            .decrypt(nonce, ciphertext),
        _ => aes_gcm::Aes256Gcm::new_from_slice(&content_key)
            .expect("length checked")
            .decrypt(nonce, ciphertext),
    }
    .map_err(|_| {
        ExchangeError::decryption(
            "the encrypted content fails AES-GCM authentication (altered or wrong key)",
            at(),
        )
    })?;
    String::from_utf8(plain)
        .map_err(|_| ExchangeError::decryption("decrypted content is not UTF-8", at()))
}

fn unwrap_key(encrypted_key: Node, key: &ExchangeKey) -> Result<Vec<u8>, ExchangeError> {
    let at = || Some(xpath(encrypted_key));
    let method_node = child(encrypted_key, XENC, "EncryptionMethod")
        .ok_or_else(|| ExchangeError::decryption("EncryptedKey has no EncryptionMethod", at()))?;
    let alg = method_node.attribute("Algorithm").unwrap_or("");
    let digest = child(method_node, DSIG, "DigestMethod")
        .and_then(|d| d.attribute("Algorithm"))
        .unwrap_or("http://www.w3.org/2000/09/xmldsig#sha1");
    let mgf = child(method_node, XENC11, "MGF")
        .and_then(|d| d.attribute("Algorithm"))
        .unwrap_or("http://www.w3.org/2009/xmlenc11#mgf1sha1");
    let wrapped = cipher_value(encrypted_key)?;
    let sha256 = "http://www.w3.org/2001/04/xmlenc#sha256";
    let sha1 = "http://www.w3.org/2000/09/xmldsig#sha1";
    // (OAEP digest, MGF1 digest)
    let (sha1_md, sha256_md) = (MessageDigest::sha1(), MessageDigest::sha256());
    let oaep = match (alg, digest, mgf) {
        (RSA_OAEP_MGF1P, d, _) if d == sha1 => (sha1_md, sha1_md),
        (RSA_OAEP_MGF1P, d, _) if d == sha256 => (sha256_md, sha1_md),
        (RSA_OAEP, d, "http://www.w3.org/2009/xmlenc11#mgf1sha1") if d == sha1 => {
            (sha1_md, sha1_md)
        }
        (RSA_OAEP, d, "http://www.w3.org/2009/xmlenc11#mgf1sha1") if d == sha256 => {
            (sha256_md, sha1_md)
        }
        (RSA_OAEP, d, "http://www.w3.org/2009/xmlenc11#mgf1sha256") if d == sha256 => {
            (sha256_md, sha256_md)
        }
        _ => {
            return Err(ExchangeError::decryption(
                format!(
                    "key transport '{alg}' (digest '{digest}', MGF '{mgf}') is not accepted: \
                     use RSA-OAEP"
                ),
                at(),
            ))
        }
    };
    oaep_decrypt(&key.private, oaep, &wrapped).map_err(|_| {
        ExchangeError::decryption(
            format!(
                "the content key was not encrypted for ehrx's exchange certificate \
                 (SHA-256 {}): it cannot be decrypted",
                key.cert.fingerprint
            ),
            at(),
        )
    })
}

/// RSA-OAEP decryption with `(digest, MGF1 digest)` and no label.
fn oaep_decrypt<T: HasPrivate>(
    key: &PKeyRef<T>,
    (digest, mgf1): (MessageDigest, MessageDigest),
    wrapped: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut d = openssl::encrypt::Decrypter::new(key)?;
    d.set_rsa_padding(Padding::PKCS1_OAEP)?;
    d.set_rsa_oaep_md(digest)?;
    d.set_rsa_mgf1_md(mgf1)?;
    let mut out = vec![0; d.decrypt_len(wrapped)?];
    let n = d.decrypt(wrapped, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// RSA-OAEP encryption with SHA-1 and MGF1-SHA-1 (`rsa-oaep-mgf1p`).
fn oaep_encrypt<T: HasPublic>(
    key: &PKeyRef<T>,
    plain: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut e = openssl::encrypt::Encrypter::new(key)?;
    e.set_rsa_padding(Padding::PKCS1_OAEP)?;
    e.set_rsa_oaep_md(MessageDigest::sha1())?;
    e.set_rsa_mgf1_md(MessageDigest::sha1())?;
    let mut out = vec![0; e.encrypt_len(plain)?];
    let n = e.encrypt(plain, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// Encrypts `element_xml` (a serialized element) for `recipient`'s RSA
/// public key: AES-256-GCM content, RSA-OAEP (MGF1-SHA1) key transport.
/// Returns the `xenc:EncryptedData` element.
pub fn encrypt_element(
    element_xml: &str,
    recipient: &PKey<Public>,
) -> Result<String, ExchangeError> {
    use rand_core::RngCore;
    let mut rng = rand_core::OsRng;
    let mut content_key = [0u8; 32];
    rng.fill_bytes(&mut content_key);
    let mut iv = [0u8; 12];
    rng.fill_bytes(&mut iv);
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&content_key).expect("32 bytes");
    let mut data = iv.to_vec();
    data.extend(
        cipher
            .encrypt(aes_gcm::Nonce::from_slice(&iv), element_xml.as_bytes())
            .map_err(|_| ExchangeError::decryption("encryption failed", None))?,
    );
    let wrapped = oaep_encrypt(recipient, &content_key)
        .map_err(|e| ExchangeError::decryption(format!("key transport failed: {e}"), None))?;
    let std = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "<xenc:EncryptedData xmlns:xenc=\"{XENC}\" Type=\"{TYPE_ELEMENT}\">\
         <xenc:EncryptionMethod Algorithm=\"{AES256_GCM}\"/>\
         <ds:KeyInfo xmlns:ds=\"{DSIG}\"><xenc:EncryptedKey>\
         <xenc:EncryptionMethod Algorithm=\"{RSA_OAEP_MGF1P}\"/>\
         <xenc:CipherData><xenc:CipherValue>{k}</xenc:CipherValue></xenc:CipherData>\
         </xenc:EncryptedKey></ds:KeyInfo>\
         <xenc:CipherData><xenc:CipherValue>{d}</xenc:CipherValue></xenc:CipherData>\
         </xenc:EncryptedData>",
        k = std.encode(wrapped),
        d = std.encode(data)
    ))
}
