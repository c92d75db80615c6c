//! Signed-XML document exchange with subscribers (hospitals, labs,
//! radiology centres, …).
//!
//! Inbound, `POST /exchange/documents` runs [`inbound::receive`]:
//! secure parsing ([`xml`]), XML-DSig verification against the subscriber
//! certificates registered in the database ([`dsig`], [`keys`]), XML-Enc
//! decryption with ehrx's exchange key ([`xenc`]), mapping of C-CDA onto FHIR
//! by the rules in `mappings/` ([`mapping`]) and one atomic FHIR transaction
//! that stores the resources, the original document and its Provenance.
//! A subscriber may also be held to mutual TLS ([`tls`]). Outbound,
//! `GET /Patient/{id}/$signed-document` ([`outbound`]) signs (and for a
//! recipient, partly encrypts) a FHIR XML document Bundle.
//!
//! # Who does what
//! Parsing for ehrx's own checks and for mapping is `roxmltree` (DTDs off,
//! node count bounded) after a `quick-xml` pre-scan (size, depth, `<!DOCTYPE`
//! refused). libxmlsec1 (the `xmlsec` crate) canonicalizes, digests, verifies
//! and makes XML signatures ([`libxmlsec`]), but only after [`dsig`] has
//! checked that the one signature covers exactly the document processed (the
//! XML Signature Wrapping defence) and chosen the registered certificate to
//! verify with. The `xmlsec` crate exposes no XML-Enc, so decryption and
//! encryption ([`xenc`]) use OpenSSL (the `openssl` crate) for RSA-OAEP and
//! `aes-gcm` for the content; certificates are handled with `x509-cert`, EC
//! keys with `p256` and RSA keys with OpenSSL ([`keys`]).
//! Interoperability with an independent implementation is shown by the
//! tests, which sign, encrypt and verify with the `xmlsec1` command-line tool.

pub mod dsig;
pub mod inbound;
pub mod keys;
pub mod libxmlsec;
pub mod mapping;
pub mod outbound;
pub mod subscriber;
pub mod tls;
pub mod xenc;
pub mod xml;

use axum::http::StatusCode;

use crate::store::StoreError;

/// Why a document was refused; each carries a precise message and, where
/// there is one, the XPath of the offending node.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Not well-formed or not a document ehrx takes.
    #[error("{message}")]
    Xml {
        message: String,
        xpath: Option<String>,
    },
    /// A construct refused for safety: DTDs, entities, excessive depth.
    #[error("{0}")]
    Unsafe(String),
    #[error("document of {size} bytes exceeds the exchange limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The signature is missing, malformed, does not verify, or does not
    /// cover the document.
    #[error("{message}")]
    Signature {
        message: String,
        xpath: Option<String>,
    },
    /// The signature verifies, but its certificate may not sign for anyone.
    #[error("{0}")]
    Signer(String),
    #[error("{message}")]
    Decryption {
        message: String,
        xpath: Option<String>,
    },
    #[error("{message}")]
    Mapping {
        message: String,
        xpath: Option<String>,
    },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A worker thread for CPU-bound work failed.
    #[error("exchange worker failed: {0}")]
    Worker(String),
}

impl ExchangeError {
    pub fn xml(message: impl Into<String>, xpath: Option<String>) -> Self {
        ExchangeError::Xml {
            message: message.into(),
            xpath,
        }
    }

    pub fn signature(message: impl Into<String>, xpath: impl Into<Option<String>>) -> Self {
        ExchangeError::Signature {
            message: message.into(),
            xpath: xpath.into(),
        }
    }

    pub fn decryption(message: impl Into<String>, xpath: impl Into<Option<String>>) -> Self {
        ExchangeError::Decryption {
            message: message.into(),
            xpath: xpath.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ExchangeError::Xml { .. } | ExchangeError::Unsafe(_) => StatusCode::BAD_REQUEST,
            ExchangeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ExchangeError::Signature { .. } | ExchangeError::Signer(_) => StatusCode::FORBIDDEN,
            ExchangeError::Decryption { .. } | ExchangeError::Mapping { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ExchangeError::Certificate(_) => StatusCode::BAD_REQUEST,
            ExchangeError::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            ExchangeError::Store(_) | ExchangeError::Worker(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OperationOutcome issue type.
    pub fn code(&self) -> &'static str {
        match self {
            ExchangeError::Xml { .. } => "structure",
            ExchangeError::Unsafe(_) => "security",
            ExchangeError::TooLarge { .. } => "too-costly",
            ExchangeError::Signature { .. } | ExchangeError::Signer(_) => "security",
            ExchangeError::Decryption { .. } => "security",
            ExchangeError::Mapping { .. } => "processing",
            ExchangeError::Certificate(_) => "invalid",
            ExchangeError::Store(StoreError::Conflict(_)) => "conflict",
            ExchangeError::Store(_) | ExchangeError::Worker(_) => "exception",
        }
    }

    /// The XPath of the offending node, when there is one.
    pub fn xpath(&self) -> Option<String> {
        match self {
            ExchangeError::Xml { xpath, .. }
            | ExchangeError::Signature { xpath, .. }
            | ExchangeError::Decryption { xpath, .. }
            | ExchangeError::Mapping { xpath, .. } => xpath.clone(),
            _ => None,
        }
    }
}

/// Runs CPU-bound exchange work (key generation, parsing, signatures) off
/// the async runtime.
pub async fn blocking<T, F>(work: F) -> Result<T, ExchangeError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ExchangeError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ExchangeError::Worker(e.to_string()))?
}

/// XML namespaces of the exchange.
pub mod ns {
    pub const DSIG: &str = "http://www.w3.org/2000/09/xmldsig#";
    pub const XENC: &str = "http://www.w3.org/2001/04/xmlenc#";
    pub const XENC11: &str = "http://www.w3.org/2009/xmlenc11#";
    pub const HL7: &str = "urn:hl7-org:v3";
    pub const FHIR: &str = "http://hl7.org/fhir";
    pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
}
