//! The cryptographic half of XML-DSig, done by libxmlsec1 (the `xmlsec`
//! crate, over libxml2 and OpenSSL): canonicalization, digests, and the
//! signature value, for verification and for signing.
//!
//! What a signature may look like (one signature, one reference to the whole
//! document, known algorithms and transforms, no duplicate IDs) is decided
//! before libxmlsec1 sees the document, by [`super::dsig`]; libxmlsec1 is
//! only asked to verify a signature already known to cover exactly the
//! document ehrx processes, with the one public key of the registered
//! certificate named in `KeyInfo` (never a key found in the document).
//!
//! libxml2 parses the very text that passed the secure pre-scan and was
//! parsed by `roxmltree` (no `<!DOCTYPE`, bounded size and depth), with
//! network access off and without recovery; the only ID it registers is the
//! document element's, so a `#id` reference can resolve to nothing else.

use libxml::parser::{Parser, ParserOptions};
use libxml::tree::{Document, SaveOptions};
use xmlsec::{
    XmlSecCanonicalizationMethod, XmlSecDocumentExt, XmlSecDocumentTemplating, XmlSecKey,
    XmlSecKeyFormat, XmlSecSignatureContext, XmlSecSignatureMethod, XmlSecTemplateBuilder,
};

use super::ExchangeError;

/// libxmlsec1's error reports, sent to `tracing` (target
/// `ehrx::exchange::libxmlsec`, level debug) instead of standard error. They
/// name functions, algorithms and error codes, never document content; the
/// caller gets its own OperationOutcome either way.
mod reports {
    use std::ffi::{c_char, c_int, CStr};
    use std::sync::Once;

    type Callback = unsafe extern "C" fn(
        file: *const c_char,
        line: c_int,
        func: *const c_char,
        error_object: *const c_char,
        error_subject: *const c_char,
        reason: c_int,
        msg: *const c_char,
    );

    extern "C" {
        // From libxmlsec1's `xmlsec/errors.h`, which the `xmlsec` crate
        // links but does not bind.
        fn xmlSecErrorsSetCallback(callback: Option<Callback>);
    }

    unsafe extern "C" fn to_tracing(
        _file: *const c_char,
        _line: c_int,
        func: *const c_char,
        error_object: *const c_char,
        error_subject: *const c_char,
        reason: c_int,
        msg: *const c_char,
    ) {
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: libxmlsec1 passes NUL-terminated strings that live
                // for the duration of the call.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        tracing::debug!(
            target: "ehrx::exchange::libxmlsec",
            func = %text(func),
            object = %text(error_object),
            subject = %text(error_subject),
            reason,
            "{}",
            text(msg)
        );
    }

    /// Installs the callback once, after libxmlsec1 is initialised (the
    /// `xmlsec` crate initialises it when its first context is made).
    pub fn route() {
        static ONCE: Once = Once::new();
        // SAFETY: `to_tracing` has exactly the C signature of
        // `xmlSecErrorsCallback`, does not unwind, and stays valid for the
        // life of the process; the setter only stores the pointer.
        ONCE.call_once(|| unsafe { xmlSecErrorsSetCallback(Some(to_tracing)) });
    }
}

/// The signature algorithms ehrx signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureAlgorithm {
    RsaSha256,
    EcdsaSha256,
}

impl SignatureAlgorithm {
    /// The name used in the `signature` parameter of `$signed-document`.
    pub fn parse(name: &str) -> Option<SignatureAlgorithm> {
        match name {
            "rsa-sha256" => Some(SignatureAlgorithm::RsaSha256),
            "ecdsa-sha256" => Some(SignatureAlgorithm::EcdsaSha256),
            _ => None,
        }
    }
}

/// Why libxmlsec1 did not accept a signature.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The digest of the referenced content differs from `DigestValue`.
    Digest,
    /// The references match, but `SignatureValue` does not verify with the key.
    SignatureValue,
    /// libxmlsec1 could not process the signature at all (wrong key type for
    /// the algorithm, malformed values, …).
    Unprocessable,
}

fn parse(xml: &str) -> Result<Document, ExchangeError> {
    let options = ParserOptions {
        recover: false,
        no_def_dtd: true,
        no_error: true,
        no_warning: true,
        no_net: true,
        huge: false,
        // The text is already UTF-8, whatever the declaration says.
        ignore_enc: true,
        ..Default::default()
    };
    Parser::default()
        .parse_string_with_options(xml, options)
        .map_err(|e| {
            ExchangeError::xml(format!("libxml2 could not parse the document: {e:?}"), None)
        })
}

/// Verifies the enveloped signature of `xml` with the public key of the
/// certificate `cert_der`. `root_id_attribute` names the ID attribute of the
/// document element when the reference is `#id`.
pub fn verify(
    xml: &str,
    cert_der: &[u8],
    root_id_attribute: Option<&str>,
) -> Result<Result<(), Failure>, ExchangeError> {
    let doc = parse(xml)?;
    if let Some(attribute) = root_id_attribute {
        doc.specify_idattr("/*", attribute, None)
            .map_err(|e| ExchangeError::signature(format!("ID attribute: {e}"), None))?;
    }
    let key = XmlSecKey::from_memory(cert_der, XmlSecKeyFormat::CertDer, None).map_err(|e| {
        ExchangeError::Certificate(format!("libxmlsec1 cannot load the certificate: {e}"))
    })?;
    let mut ctx = XmlSecSignatureContext::new();
    reports::route();
    ctx.insert_key(key);
    let outcome = ctx.verify_document(&doc);
    let failure = match outcome {
        Ok(true) => return Ok(Ok(())),
        Ok(false) if references_failed(&ctx) => Failure::Digest,
        Ok(false) => Failure::SignatureValue,
        Err(_) => Failure::Unprocessable,
    };
    Ok(Err(failure))
}

/// Whether a `ds:Reference` of the last verification had a wrong digest.
fn references_failed(ctx: &XmlSecSignatureContext) -> bool {
    use xmlsec::bindings;
    // SAFETY: `ctx` owns a live `xmlSecDSigCtx` (created by
    // `XmlSecSignatureContext::new`, destroyed only on drop) and the
    // verification that filled `signedInfoReferences` has returned; the
    // list's items are `xmlSecDSigReferenceCtx` pointers owned by that list,
    // read here without being kept. The `xmlsec` crate exposes no safe
    // accessor for per-reference status, which is what tells a changed
    // document from a wrong signature value.
    unsafe {
        let dsig = ctx.as_ptr();
        let list = std::ptr::addr_of_mut!((*dsig).signedInfoReferences);
        let n = bindings::xmlSecPtrListGetSize(list);
        (0..n).any(|i| {
            let item =
                bindings::xmlSecPtrListGetItem(list, i) as bindings::xmlSecDSigReferenceCtxPtr;
            !item.is_null()
                && (*item).status != bindings::xmlSecDSigStatus_xmlSecDSigStatusSucceeded
        })
    }
}

/// Signs `xml` with an enveloped signature over `URI=""` (exclusive c14n,
/// SHA-256 digest) made with `private_key_pem` (PKCS#8), the certificate in
/// `KeyInfo/X509Data`. Returns the signed document.
pub fn sign(
    xml: &str,
    private_key_pem: &str,
    cert_pem: &str,
    algorithm: SignatureAlgorithm,
) -> Result<String, ExchangeError> {
    let doc = parse(xml)?;
    let method = match algorithm {
        SignatureAlgorithm::RsaSha256 => XmlSecSignatureMethod::RsaSha256,
        SignatureAlgorithm::EcdsaSha256 => XmlSecSignatureMethod::EcdsaSha256,
    };
    doc.template()
        .canonicalization(XmlSecCanonicalizationMethod::ExclusiveC14N)
        .signature(method)
        .reference_signature(XmlSecSignatureMethod::Sha256)
        .uri("")
        .ns_prefix("ds")
        .x509data(true)
        .done()
        .map_err(|e| ExchangeError::signature(format!("signature template: {e}"), None))?;
    let fail = |what: &str, e: xmlsec::XmlSecError| {
        ExchangeError::Certificate(format!("libxmlsec1 {what}: {e}"))
    };
    let key = XmlSecKey::from_memory(private_key_pem.as_bytes(), XmlSecKeyFormat::Pkcs8Pem, None)
        .map_err(|e| fail("cannot load the exchange key", e))?;
    key.load_cert_from_memory(cert_pem.as_bytes(), XmlSecKeyFormat::CertPem)
        .map_err(|e| fail("cannot load the exchange certificate", e))?;
    let mut ctx = XmlSecSignatureContext::new();
    reports::route();
    ctx.insert_key(key);
    ctx.sign_document(&doc)
        .map_err(|e| fail("could not sign", e))?;
    Ok(doc.to_string_with_options(SaveOptions::default()))
}
