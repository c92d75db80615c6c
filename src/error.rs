//! The one error type of the FHIR interaction layer, and the single place
//! where errors become an HTTP status and an OperationOutcome.

use axum::http::StatusCode;
use serde_json::Value;

use crate::fhir::codec::ParseFault;
use crate::fhir::{operation_outcome, Issue};
use crate::store::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body could not be parsed, or is not a valid R4 resource.
    #[error("{}", .0.message)]
    Parse(ParseFault),
    /// The request is well formed but not acceptable (wrong id, wrong type, …).
    #[error("{message}")]
    Invalid {
        message: String,
        expression: Option<String>,
    },
    /// A search or request parameter ehrx does not understand.
    #[error("{0}")]
    UnknownParameter(String),
    #[error("{0}")]
    NotFound(String),
    #[error("unknown resource type '{0}'")]
    UnknownType(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    MultipleMatches(String),
    #[error("{0}")]
    Unprocessable(String),
    /// A JSON Patch whose result is not a valid resource (422: the patch
    /// document itself was well formed).
    #[error("the patched resource is not valid: {}", .0.message)]
    PatchedInvalid(ParseFault),
    #[error("unsupported media type '{0}'")]
    UnsupportedMediaType(String),
    #[error("none of the requested formats '{0}' is supported")]
    NotAcceptable(String),
    #[error("request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotSupported(String),
    /// The request asks for more work than a cap allows (see
    /// [`crate::limits`]).
    #[error("{0}")]
    TooCostly(String),
    /// The request ran out of time (request or statement timeout).
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// No valid bearer token (401, with `WWW-Authenticate`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose scopes do not allow the request (403).
    #[error("{0}")]
    Forbidden(String),
    /// A write the caller's role may not make (403), naming the element
    /// (patients' rights, consent authorship, amendments).
    #[error("{message}")]
    Refused {
        message: String,
        expression: Option<String>,
    },
    /// A write that breaks a rule of the record (422 business-rule),
    /// naming the element.
    #[error("{message}")]
    Rule {
        message: String,
        expression: Option<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A signed-XML document refused by the exchange.
    #[error(transparent)]
    Exchange(#[from] crate::exchange::ExchangeError),
    /// The audit log could not be written: the request is not answered
    /// (503; fail-closed).
    #[error("{0}")]
    AuditUnavailable(String),
    /// An error raised by one entry of a batch or transaction Bundle.
    #[error("Bundle.entry[{index}]: {source}")]
    InEntry {
        index: usize,
        #[source]
        source: Box<Error>,
    },
}

impl From<ParseFault> for Error {
    fn from(f: ParseFault) -> Self {
        Error::Parse(f)
    }
}

impl Error {
    /// A cap of [`crate::limits`] exceeded.
    pub fn too_costly(message: impl Into<String>) -> Self {
        Error::TooCostly(message.into())
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            expression: None,
        }
    }

    pub fn invalid_at(message: impl Into<String>, expression: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            expression: Some(expression.into()),
        }
    }

    /// Names the Bundle entry the error came from.
    pub fn in_entry(self, index: usize) -> Self {
        match self {
            e @ Error::InEntry { .. } => e,
            e => Error::InEntry {
                index,
                source: Box::new(e),
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Parse(_) | Error::Invalid { .. } | Error::UnknownParameter(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::NotFound(_) | Error::UnknownType(_) => StatusCode::NOT_FOUND,
            Error::Gone(_) => StatusCode::GONE,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PreconditionFailed(_) | Error::MultipleMatches(_) => {
                StatusCode::PRECONDITION_FAILED
            }
            Error::Unprocessable(_) | Error::PatchedInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotSupported(_) | Error::TooCostly(_) => StatusCode::BAD_REQUEST,
            Error::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(e) if e.is_timeout() => StatusCode::SERVICE_UNAVAILABLE,
            Error::AuditUnavailable(_) | Error::Store(StoreError::Audit(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::Refused { .. } => StatusCode::FORBIDDEN,
            Error::Rule { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            Error::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Exchange(e) => e.status(),
            Error::InEntry { source, .. } => source.status(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Error::Parse(_) => "structure",
            Error::Invalid { .. } => "invalid",
            Error::UnknownParameter(_) => "not-supported",
            Error::NotFound(_) => "not-found",
            Error::UnknownType(_) => "not-supported",
            Error::Gone(_) => "deleted",
            Error::Conflict(_) => "conflict",
            Error::PreconditionFailed(_) => "conflict",
            Error::MultipleMatches(_) => "multiple-matches",
            Error::Unprocessable(_) => "processing",
            Error::PatchedInvalid(_) => "invalid",
            Error::UnsupportedMediaType(_) | Error::NotAcceptable(_) => "not-supported",
            Error::PayloadTooLarge(_) | Error::TooCostly(_) => "too-costly",
            Error::Timeout(_) => "timeout",
            Error::Store(e) if e.is_timeout() => "timeout",
            Error::AuditUnavailable(_) | Error::Store(StoreError::Audit(_)) => "transient",
            Error::NotSupported(_) | Error::MethodNotAllowed(_) => "not-supported",
            Error::Unauthorized(_) => "login",
            Error::Forbidden(_) | Error::Refused { .. } => "forbidden",
            Error::Rule { .. } => "business-rule",
            Error::Store(StoreError::Conflict(_)) => "conflict",
            Error::Store(_) => "exception",
            Error::Exchange(e) => e.code(),
            Error::InEntry { source, .. } => source.code(),
        }
    }

    fn expression(&self) -> Option<String> {
        match self {
            Error::Parse(f) | Error::PatchedInvalid(f) => f.expression.clone(),
            Error::Invalid { expression, .. }
            | Error::Refused { expression, .. }
            | Error::Rule { expression, .. } => expression.clone(),
            Error::Exchange(e) => e.xpath(),
            Error::InEntry { index, source } => Some(match source.expression() {
                // A resource-relative path such as `Patient.name` sits under the entry's resource.
                Some(inner) if inner.starts_with("Bundle.") => {
                    format!("Bundle.entry[{index}].{}", &inner["Bundle.".len()..])
                }
                Some(inner) => format!("Bundle.entry[{index}].resource.{}", after_type(&inner)),
                None => format!("Bundle.entry[{index}]"),
            }),
            _ => None,
        }
    }

    fn diagnostics(&self) -> String {
        match self {
            Error::Parse(f) => match f.position {
                Some((line, col)) => format!("{} (line {line}, column {col})", f.message),
                None => f.message.clone(),
            },
            Error::Store(e) if e.is_timeout() => {
                "the request took longer than the server allows; narrow it".to_string()
            }
            Error::AuditUnavailable(_) | Error::Store(StoreError::Audit(_)) => {
                "the access could not be recorded in the audit log, so it is not answered; \
                 try again later"
                    .to_string()
            }
            // Never leak database internals to the caller; they go to the log.
            Error::Store(StoreError::Database(_))
            | Error::Exchange(crate::exchange::ExchangeError::Store(StoreError::Database(_))) => {
                "internal storage error".to_string()
            }
            other => other.to_string(),
        }
    }

    /// The OperationOutcome describing this error.
    pub fn outcome(&self) -> Value {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        operation_outcome(&[Issue::error(self.code(), self.diagnostics()).at(self.expression())])
    }
}

/// `Patient.name[0]` → `name[0]`; `Patient` → ``.
fn after_type(path: &str) -> &str {
    match path.find('.') {
        Some(i) => &path[i + 1..],
        None => "",
    }
}
