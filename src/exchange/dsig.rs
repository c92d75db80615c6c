//! XML-DSig: verifying the one enveloped signature of an inbound document
//! (and signing what ehrx sends).
//!
//! What is accepted is deliberately narrow, which is what defeats XML
//! Signature Wrapping: exactly one `ds:Signature` in the whole document, a
//! child of the document element; exactly one `ds:Reference`, whose URI is
//! `""` or `#id` of the document element itself; no `ds:Object`; no ID value
//! used twice; transforms limited to enveloped-signature and one
//! canonicalization; the signer's certificate in `KeyInfo`, registered for a
//! subscriber. Only a signature of that shape goes to libxmlsec1
//! ([`super::libxmlsec`]), which canonicalizes, digests and checks the
//! signature value with that certificate's key, over the very text the rest
//! of ehrx processes: what was verified is what is mapped.

use base64::Engine as _;
use roxmltree::{Document, Node};

use super::keys::{Cert, Registered};
use super::libxmlsec::{self, Failure, SignatureAlgorithm};
use super::ns::DSIG;
use super::xml::{child, children, xpath};
use super::ExchangeError;

pub const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";
pub const SHA256: &str = "http://www.w3.org/2001/04/xmlenc#sha256";
pub const RSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256";
pub const ECDSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256";
pub const C14N: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315";
pub const C14N_COMMENTS: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments";
pub const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
pub const EXC_C14N_COMMENTS: &str = "http://www.w3.org/2001/10/xml-exc-c14n#WithComments";

/// The canonicalization methods accepted, for SignedInfo and references.
fn is_c14n(uri: &str) -> bool {
    matches!(uri, C14N | C14N_COMMENTS | EXC_C14N | EXC_C14N_COMMENTS)
}

/// A verified signature.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The registered certificate that verified the signature.
    pub signer: Registered,
    /// SHA-256 of the canonicalized signed content (the verified
    /// `DigestValue`), lower-case hex: the same document signed twice has the
    /// same content digest.
    pub content_digest: String,
    /// The `ds:Signature` element as it was received.
    pub signature_xml: String,
    /// Byte range of the `ds:Signature` element in the document text.
    pub signature_range: std::ops::Range<usize>,
}

fn b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean)
}

fn algorithm<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    node.attribute("Algorithm")
}

fn only<'a, 'i>(parent: Node<'a, 'i>, name: &'a str) -> Result<Node<'a, 'i>, ExchangeError> {
    let n = children(parent, DSIG, name).count();
    match child(parent, DSIG, name) {
        Some(c) => Ok(c),
        None => Err(ExchangeError::signature(
            format!(
                "{} must have exactly one ds:{name} (found {n})",
                super::xml::qname(parent)
            ),
            Some(xpath(parent)),
        )),
    }
}

/// Every attribute that may serve as an ID, by value; two with one value
/// would let a reference point at a different element than the one checked.
fn check_ids(doc: &Document) -> Result<(), ExchangeError> {
    let mut seen: std::collections::HashMap<&str, Node> = std::collections::HashMap::new();
    for node in doc.descendants().filter(|n| n.is_element()) {
        for a in node.attributes() {
            let is_id = matches!(a.name(), "ID" | "Id" | "id") && a.namespace().is_none()
                || (a.name() == "id"
                    && a.namespace() == Some("http://www.w3.org/XML/1998/namespace"));
            if !is_id {
                continue;
            }
            if let Some(first) = seen.insert(a.value(), node) {
                return Err(ExchangeError::signature(
                    format!(
                        "ID '{}' is used by more than one element ({} and this one): \
                         documents with duplicate IDs are refused",
                        a.value(),
                        xpath(first)
                    ),
                    Some(xpath(node)),
                ));
            }
        }
    }
    Ok(())
}

/// Verifies the document's enveloped signature against the registered
/// certificates, and checks that the signing certificate may be used now.
pub fn verify(
    doc: &Document,
    registered: &[Registered],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Verified, ExchangeError> {
    let root = doc.root_element();
    let signatures: Vec<Node> = doc
        .descendants()
        .filter(|n| {
            n.is_element()
                && n.tag_name().namespace() == Some(DSIG)
                && n.tag_name().name() == "Signature"
        })
        .collect();
    let signature = match signatures.as_slice() {
        [] => {
            return Err(ExchangeError::signature(
                "the document is not signed: an enveloped ds:Signature is required",
                Some(xpath(root)),
            ))
        }
        [one] => *one,
        [_, second, ..] => {
            return Err(ExchangeError::signature(
                format!(
                    "the document carries {} ds:Signature elements; exactly one is accepted",
                    signatures.len()
                ),
                Some(xpath(*second)),
            ))
        }
    };
    if signature.parent() != Some(root) {
        return Err(ExchangeError::signature(
            "ds:Signature must be a child of the document element (an enveloped signature)",
            Some(xpath(signature)),
        ));
    }
    check_ids(doc)?;
    if let Some(obj) = children(signature, DSIG, "Object").next() {
        return Err(ExchangeError::signature(
            "ds:Object is not accepted in an exchanged document's signature",
            Some(xpath(obj)),
        ));
    }
    let signed_info = only(signature, "SignedInfo")?;
    if signature.first_element_child() != Some(signed_info) {
        return Err(ExchangeError::signature(
            "ds:SignedInfo must be the first child of ds:Signature",
            Some(xpath(signed_info)),
        ));
    }
    let c14n_node = only(signed_info, "CanonicalizationMethod")?;
    if !algorithm(c14n_node).is_some_and(is_c14n) {
        return Err(ExchangeError::signature(
            format!(
                "unsupported CanonicalizationMethod '{}'",
                algorithm(c14n_node).unwrap_or("")
            ),
            Some(xpath(c14n_node)),
        ));
    }
    let sig_method_node = only(signed_info, "SignatureMethod")?;
    let sig_alg = algorithm(sig_method_node).unwrap_or("");
    if sig_alg != RSA_SHA256 && sig_alg != ECDSA_SHA256 {
        return Err(ExchangeError::signature(
            format!("unsupported SignatureMethod '{sig_alg}': use rsa-sha256 or ecdsa-sha256"),
            Some(xpath(sig_method_node)),
        ));
    }
    let reference = only(signed_info, "Reference")?;
    let uri = reference.attribute("URI").ok_or_else(|| {
        ExchangeError::signature(
            "ds:Reference must have URI=\"\" or URI=\"#id\" of the document element",
            Some(xpath(reference)),
        )
    })?;
    let id_attribute = if uri.is_empty() {
        None
    } else if let Some(id) = uri.strip_prefix('#') {
        let root_id = ["ID", "Id", "id"]
            .into_iter()
            .find(|a| root.attribute(*a).is_some());
        if root_id.and_then(|a| root.attribute(a)) != Some(id) {
            return Err(ExchangeError::signature(
                format!(
                    "ds:Reference URI '{uri}' does not name the document element: \
                     the signature must cover the whole document"
                ),
                Some(xpath(reference)),
            ));
        }
        root_id
    } else {
        return Err(ExchangeError::signature(
            format!("ds:Reference URI '{uri}' is not a same-document reference"),
            Some(xpath(reference)),
        ));
    };
    // Transforms: enveloped-signature, then at most one canonicalization.
    let mut enveloped = false;
    if let Some(transforms) = child(reference, DSIG, "Transforms") {
        let list: Vec<Node> = children(transforms, DSIG, "Transform").collect();
        for (i, t) in list.iter().enumerate() {
            let alg = algorithm(*t).unwrap_or("");
            if alg == ENVELOPED && i == 0 {
                enveloped = true;
            } else if is_c14n(alg) && i == list.len() - 1 && i > 0 {
                // The canonicalization after enveloped-signature.
            } else {
                return Err(ExchangeError::signature(
                    format!("transform '{alg}' is not accepted here"),
                    Some(xpath(*t)),
                ));
            }
        }
    }
    if !enveloped {
        return Err(ExchangeError::signature(
            "the reference must apply the enveloped-signature transform first",
            Some(xpath(reference)),
        ));
    }
    let digest_method = only(reference, "DigestMethod")?;
    if algorithm(digest_method) != Some(SHA256) {
        return Err(ExchangeError::signature(
            format!(
                "unsupported DigestMethod '{}': use SHA-256",
                algorithm(digest_method).unwrap_or("")
            ),
            Some(xpath(digest_method)),
        ));
    }
    let digest_node = only(reference, "DigestValue")?;
    let expected = b64(&super::xml::text_of(digest_node)).map_err(|e| {
        ExchangeError::signature(
            format!("DigestValue is not base64: {e}"),
            Some(xpath(digest_node)),
        )
    })?;
    let value_node = only(signature, "SignatureValue")?;
    // KeyInfo names the signer's certificate; only a registered one is used.
    let cert = key_info_certificate(signature)?.ok_or_else(|| {
        ExchangeError::signature(
            "ds:KeyInfo must carry the signer's certificate (X509Data/X509Certificate)",
            Some(xpath(signature)),
        )
    })?;
    let signer = registered
        .iter()
        .find(|r| r.cert.fingerprint == cert.fingerprint)
        .ok_or_else(|| {
            ExchangeError::Signer(format!(
                "the signing certificate '{}' (SHA-256 {}) is not registered for any subscriber",
                cert.subject, cert.fingerprint
            ))
        })?;
    let input = doc.input_text();
    match libxmlsec::verify(input, &signer.cert.der, id_attribute)? {
        Ok(()) => {}
        Err(Failure::Digest) => {
            return Err(ExchangeError::signature(
                "the document does not match its signature: the digest of the signed content \
                 differs (the document was changed after signing)",
                Some(xpath(digest_node)),
            ))
        }
        Err(Failure::SignatureValue) => {
            return Err(ExchangeError::signature(
                "the signature value does not verify with the signing certificate",
                Some(xpath(value_node)),
            ))
        }
        Err(Failure::Unprocessable) => {
            return Err(ExchangeError::signature(
                format!(
                    "libxmlsec1 could not verify the signature with the certificate '{}' \
                     (is the signature method right for its key?)",
                    signer.cert.subject
                ),
                Some(xpath(value_node)),
            ))
        }
    }
    if let Some(when) = &signer.revoked {
        return Err(ExchangeError::Signer(format!(
            "the signing certificate '{}' (SHA-256 {}) of Organization/{} was revoked at {when}",
            signer.cert.subject, signer.cert.fingerprint, signer.organization_id
        )));
    }
    if !signer.cert.is_valid_at(now) {
        return Err(ExchangeError::Signer(format!(
            "the signing certificate '{}' (SHA-256 {}) is valid from {} to {}, not now",
            signer.cert.subject,
            signer.cert.fingerprint,
            signer.cert.not_before.to_rfc3339(),
            signer.cert.not_after.to_rfc3339()
        )));
    }
    Ok(Verified {
        signer: signer.clone(),
        content_digest: hex::encode(expected),
        signature_xml: input[signature.range()].to_string(),
        signature_range: signature.range(),
    })
}

/// The certificate in `KeyInfo/X509Data/X509Certificate`, if any. When
/// several are given (a chain), the first is the signer's.
fn key_info_certificate(signature: Node) -> Result<Option<Cert>, ExchangeError> {
    let Some(key_info) = child(signature, DSIG, "KeyInfo") else {
        return Ok(None);
    };
    let Some(cert_node) = children(key_info, DSIG, "X509Data")
        .flat_map(|d| children(d, DSIG, "X509Certificate"))
        .next()
    else {
        return Ok(None);
    };
    let der = b64(&super::xml::text_of(cert_node)).map_err(|e| {
        ExchangeError::signature(
            format!("X509Certificate is not base64: {e}"),
            Some(xpath(cert_node)),
        )
    })?;
    Cert::from_der(&der).map(Some).map_err(|e| {
        ExchangeError::signature(format!("X509Certificate: {e}"), Some(xpath(cert_node)))
    })
}

/// Signs `xml` with ehrx's exchange key for `algorithm`: an enveloped
/// signature over `URI=""` with exclusive c14n and a SHA-256 digest, the
/// certificate in KeyInfo. Returns the signed document.
pub fn sign_enveloped(
    xml: &str,
    key: &super::keys::ExchangeKey,
    algorithm: SignatureAlgorithm,
) -> Result<String, ExchangeError> {
    let (private_pem, cert) = match algorithm {
        SignatureAlgorithm::RsaSha256 => (key.rsa_pem.as_str(), &key.cert),
        SignatureAlgorithm::EcdsaSha256 => (key.ec_pem.as_str(), &key.ec_cert),
    };
    libxmlsec::sign(xml, private_pem, &cert.to_pem(), algorithm)
}
