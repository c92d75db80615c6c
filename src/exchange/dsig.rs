//! XML-DSig: verifying the one enveloped signature of an inbound document
//! (and signing what ehrx sends).
//!
//! What is accepted is deliberately narrow, which is what defeats XML
//! Signature Wrapping: exactly one `ds:Signature` in the whole document, a
//! child of the document element; exactly one `ds:Reference`, whose URI is
//! `""` or `#id` of the document element itself; no `ds:Object`; no ID value
//! used twice; transforms limited to enveloped-signature and one
//! canonicalization. The digest is then computed over the very element the
//! rest of ehrx processes, so what was verified is what is mapped.

use base64::Engine as _;
use roxmltree::{Document, Node};
use sha2::{Digest, Sha256};

use super::c14n::{self, Method};
use super::keys::{Cert, PublicKey, Registered};
use super::ns::DSIG;
use super::xml::{child, children, xpath};
use super::ExchangeError;

pub const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";
pub const SHA256: &str = "http://www.w3.org/2001/04/xmlenc#sha256";
pub const RSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256";
pub const ECDSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256";

/// A verified signature.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The registered certificate that verified the signature.
    pub signer: Registered,
    /// SHA-256 of the canonicalized signed content, lower-case hex: the same
    /// document signed twice has the same content digest.
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
    let si_method = algorithm(c14n_node)
        .and_then(Method::from_uri)
        .ok_or_else(|| {
            ExchangeError::signature(
                format!(
                    "unsupported CanonicalizationMethod '{}'",
                    algorithm(c14n_node).unwrap_or("")
                ),
                Some(xpath(c14n_node)),
            )
        })?;
    let si_method = with_prefix_list(si_method, c14n_node);
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
    let apex = if uri.is_empty() {
        doc.root()
    } else if let Some(id) = uri.strip_prefix('#') {
        let root_id = ["ID", "Id", "id"].iter().find_map(|a| root.attribute(*a));
        if root_id != Some(id) {
            return Err(ExchangeError::signature(
                format!(
                    "ds:Reference URI '{uri}' does not name the document element: \
                     the signature must cover the whole document"
                ),
                Some(xpath(reference)),
            ));
        }
        root
    } else {
        return Err(ExchangeError::signature(
            format!("ds:Reference URI '{uri}' is not a same-document reference"),
            Some(xpath(reference)),
        ));
    };
    // Transforms: enveloped-signature, then at most one canonicalization.
    let mut ref_method = Method::from_uri(c14n::C14N).expect("known");
    let mut enveloped = false;
    if let Some(transforms) = child(reference, DSIG, "Transforms") {
        let list: Vec<Node> = children(transforms, DSIG, "Transform").collect();
        for (i, t) in list.iter().enumerate() {
            let alg = algorithm(*t).unwrap_or("");
            if alg == ENVELOPED && i == 0 {
                enveloped = true;
            } else if let (Some(m), true) = (Method::from_uri(alg), i == list.len() - 1) {
                ref_method = with_prefix_list(m, *t);
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
    // With a same-document reference, comments are never part of the node-set.
    ref_method.with_comments = false;
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
    let canonical = c14n::canonicalize(apex, Some(signature.id()), &ref_method);
    let actual = Sha256::digest(canonical.as_bytes());
    if actual.as_slice() != expected.as_slice() {
        return Err(ExchangeError::signature(
            "the document does not match its signature: the digest of the signed content \
             differs (the document was changed after signing)",
            Some(xpath(digest_node)),
        ));
    }
    // The signature over SignedInfo.
    let value_node = only(signature, "SignatureValue")?;
    let sig_value = b64(&super::xml::text_of(value_node)).map_err(|e| {
        ExchangeError::signature(
            format!("SignatureValue is not base64: {e}"),
            Some(xpath(value_node)),
        )
    })?;
    let signed_info_c14n = c14n::canonicalize(signed_info, None, &si_method);
    // KeyInfo may name the certificate; then only that one is tried.
    let named = key_info_certificate(signature)?;
    let candidates: Vec<&Registered> = match &named {
        Some(cert) => {
            let found: Vec<&Registered> = registered
                .iter()
                .filter(|r| r.cert.fingerprint == cert.fingerprint)
                .collect();
            if found.is_empty() {
                return Err(ExchangeError::Signer(format!(
                    "the signing certificate '{}' (SHA-256 {}) is not registered for any subscriber",
                    cert.subject, cert.fingerprint
                )));
            }
            found
        }
        None => registered.iter().collect(),
    };
    let signer = candidates
        .into_iter()
        .find(|r| {
            check(
                &r.cert.key,
                sig_alg,
                signed_info_c14n.as_bytes(),
                &sig_value,
            )
        })
        .ok_or_else(|| match &named {
            Some(_) => ExchangeError::signature(
                "the signature value does not verify with the signing certificate",
                Some(xpath(value_node)),
            ),
            None => ExchangeError::Signer(
                "the signature does not verify with any registered subscriber certificate".into(),
            ),
        })?;
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
    let input = doc.input_text();
    Ok(Verified {
        signer: signer.clone(),
        content_digest: hex::encode(actual),
        signature_xml: input[signature.range()].to_string(),
        signature_range: signature.range(),
    })
}

fn with_prefix_list(mut m: Method, node: Node) -> Method {
    if m.exclusive {
        if let Some(list) = node
            .children()
            .find(|c| c.is_element() && c.tag_name().name() == "InclusiveNamespaces")
        {
            m.inclusive_prefixes = list
                .attribute("PrefixList")
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect();
        }
    }
    m
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

fn check(key: &PublicKey, alg: &str, data: &[u8], sig: &[u8]) -> bool {
    use rsa::signature::Verifier;
    match (key, alg) {
        (PublicKey::Rsa(k), RSA_SHA256) => {
            let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k.clone());
            match rsa::pkcs1v15::Signature::try_from(sig) {
                Ok(s) => vk.verify(data, &s).is_ok(),
                Err(_) => false,
            }
        }
        (PublicKey::P256(k), ECDSA_SHA256) => match p256::ecdsa::Signature::from_slice(sig) {
            Ok(s) => k.verify(data, &s).is_ok(),
            Err(_) => false,
        },
        _ => false,
    }
}

/// Signs `xml` (a document whose root element is closed by `</root>` at
/// the end) with ehrx's exchange key: an enveloped RSA-SHA256 signature over
/// `URI=""` with exclusive c14n, and the certificate in KeyInfo. Returns the
/// signed document.
pub fn sign_enveloped(xml: &str, key: &super::keys::ExchangeKey) -> Result<String, ExchangeError> {
    use rsa::signature::{SignatureEncoding, Signer};
    let limits = super::xml::Limits {
        max_bytes: usize::MAX,
        ..Default::default()
    };
    let doc = super::xml::parse(xml, &limits)?;
    let method = Method::from_uri(c14n::EXC_C14N).expect("known");
    let digest = Sha256::digest(c14n::canonicalize(doc.root(), None, &method).as_bytes());
    let std = base64::engine::general_purpose::STANDARD;
    let signed_info = format!(
        "<ds:SignedInfo><ds:CanonicalizationMethod Algorithm=\"{c}\"/>\
         <ds:SignatureMethod Algorithm=\"{RSA_SHA256}\"/>\
         <ds:Reference URI=\"\"><ds:Transforms>\
         <ds:Transform Algorithm=\"{ENVELOPED}\"/><ds:Transform Algorithm=\"{c}\"/>\
         </ds:Transforms><ds:DigestMethod Algorithm=\"{SHA256}\"/>\
         <ds:DigestValue>{d}</ds:DigestValue></ds:Reference></ds:SignedInfo>",
        c = c14n::EXC_C14N,
        d = std.encode(digest)
    );
    // Canonicalize SignedInfo as it will sit inside the signature.
    let wrapped = format!("<ds:Signature xmlns:ds=\"{DSIG}\">{signed_info}</ds:Signature>");
    let wdoc = super::xml::parse(&wrapped, &limits)?;
    let si = wdoc
        .root_element()
        .first_element_child()
        .expect("SignedInfo");
    let si_c14n = c14n::canonicalize(si, None, &method);
    let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(key.private.clone());
    let value = signer.sign(si_c14n.as_bytes()).to_vec();
    let signature = format!(
        "<ds:Signature xmlns:ds=\"{DSIG}\">{signed_info}<ds:SignatureValue>{v}</ds:SignatureValue>\
         <ds:KeyInfo><ds:X509Data><ds:X509Certificate>{c}</ds:X509Certificate></ds:X509Data>\
         </ds:KeyInfo></ds:Signature>",
        v = std.encode(value),
        c = key.cert.to_base64()
    );
    let root = doc.root_element();
    let end = root.range().end;
    let close = xml[..end]
        .rfind("</")
        .ok_or_else(|| ExchangeError::xml("the document element to sign has no end tag", None))?;
    Ok(format!("{}{}{}", &xml[..close], signature, &xml[close..]))
}
