//! The request extractor (query, headers, bounded body, negotiated format)
//! and the rendering of results and errors.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use crate::error::{Error, Result};
use crate::fhir::media::{negotiate, parse_format};
use crate::fhir::{codec, Format};

/// What `Prefer: return=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

/// A FHIR request, parsed just enough for any handler.
pub struct FhirRequest {
    pub method: Method,
    pub headers: HeaderMap,
    pub params: Vec<(String, String)>,
    pub raw_query: Option<String>,
    pub body: axum::body::Bytes,
    /// Response format, or the error that negotiation produced.
    pub format: std::result::Result<Format, Error>,
    pub pretty: bool,
    /// The store as this caller may use it (its access is set by the
    /// authentication middleware; nothing at all when absent).
    pub gate: crate::store::Gate,
}

impl FromRequest<AppState> for FhirRequest {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> std::result::Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let raw_query = parts.uri.query().map(str::to_string);
        let params: Vec<(String, String)> =
            form_urlencoded::parse(raw_query.as_deref().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let format_param = params
            .iter()
            .find(|(k, _)| k == "_format")
            .map(|(_, v)| v.as_str());
        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let format = negotiate(format_param, accept).map_err(Error::NotAcceptable);
        let pretty = params.iter().any(|(k, v)| k == "_pretty" && v == "true");
        let limit = state.config.max_body_bytes;
        let fallback = format.as_ref().copied().unwrap_or(Format::Json);
        let fail = |e: Error| render(Err(e), fallback, pretty);
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.map(|n| n > limit).unwrap_or(false) {
            return Err(fail(Error::PayloadTooLarge(limit)));
        }
        let body = match axum::body::to_bytes(body, limit).await {
            Ok(b) => b,
            Err(_) => return Err(fail(Error::PayloadTooLarge(limit))),
        };
        let access = parts
            .extensions
            .get::<crate::policy::Access>()
            .cloned()
            .unwrap_or_else(crate::policy::Access::none);
        let access = match with_circle(state, access).await {
            Ok(a) => a,
            Err(e) => return Err(fail(e)),
        };
        Ok(FhirRequest {
            gate: state.store.gate(access),
            method: parts.method,
            headers: parts.headers,
            params,
            raw_query,
            body,
            format,
            pretty,
        })
    }
}

/// The caller's access with its circle of trust as the database holds it
/// now (Consents, care relationships, coverage, break-the-glass; kept from
/// an earlier request only while none of it changed), for the roles whose
/// access depends on it.
pub async fn with_circle(
    state: &AppState,
    access: crate::policy::Access,
) -> Result<crate::policy::Access> {
    use crate::policy::{consent::Circle, Role};
    if !access.role().needs_circle() {
        return Ok(access);
    }
    let role = access.role().clone();
    let now = chrono::Utc::now().timestamp();
    let facts =
        crate::store::circle::facts(&state.store, &role, state.config.consent_default, now).await?;
    if let Role::Practitioner(_) = role {
        // The organisations of the practitioner's roles, for the audit.
        crate::audit::context::acting_for(
            facts
                .identity
                .range::<str, _>((
                    std::ops::Bound::Included("Organization/"),
                    std::ops::Bound::Excluded("Organization0"),
                ))
                .filter_map(|r| r.strip_prefix("Organization/")),
        );
    }
    let insurer = match &role {
        Role::Insurer { rules, .. } => Some(std::sync::Arc::new(
            state
                .insurers
                .role(rules)
                .cloned()
                .unwrap_or_else(|| crate::policy::insurer::InsurerRules::nothing(rules)),
        )),
        _ => None,
    };
    Ok(access.with_circle(Circle::new(facts, crate::fhir::unix_instant(now), insurer)))
}

impl FhirRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as a FHIR resource, parsed by its `Content-Type`.
    pub fn resource(&self) -> Result<Value> {
        if self.body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(Error::invalid(
                "the request has no body; a resource is required",
            ));
        }
        let format = match self.header("content-type") {
            Some(ct) => {
                parse_format(ct).ok_or_else(|| Error::UnsupportedMediaType(ct.to_string()))?
            }
            // No Content-Type: recognise the format by its first character.
            None => match self.body.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'<') => Format::Xml,
                _ => Format::Json,
            },
        };
        Ok(match format {
            Format::Json => codec::parse_json(&self.body)?,
            Format::Xml => codec::parse_xml(&self.body)?,
        })
    }

    /// The body as a JSON Patch document.
    pub fn json_patch(&self) -> Result<Value> {
        let ct = self.header("content-type").unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json-patch+json" {
            return Err(Error::UnsupportedMediaType(format!(
                "{ct} (PATCH accepts application/json-patch+json)"
            )));
        }
        crate::fhir::json::from_slice(&self.body).map_err(|e| {
            Error::Parse(codec::ParseFault {
                message: format!("malformed JSON Patch: {}", e.message),
                expression: e.path,
                position: Some((e.line, e.column)),
            })
        })
    }

    /// `If-Match` as a version number.
    pub fn if_match(&self) -> Result<Option<i64>> {
        self.header("if-match")
            .map(crate::interaction::parse_etag)
            .transpose()
    }

    /// `Prefer: return=…` (default: representation).
    pub fn prefer_return(&self) -> Return {
        let prefer = self.header("prefer").unwrap_or("");
        for token in prefer.split(',').map(str::trim) {
            match token.strip_prefix("return=").map(|v| v.trim_matches('"')) {
                Some("minimal") => return Return::Minimal,
                Some("OperationOutcome") => return Return::OperationOutcome,
                Some("representation") => return Return::Representation,
                _ => {}
            }
        }
        Return::Representation
    }

    /// `Prefer: handling=lenient` relaxes unknown-parameter errors; strict is the default.
    pub fn strict_handling(&self) -> bool {
        !self
            .header("prefer")
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim() == "handling=lenient")
    }

    /// Renders a result in the negotiated format.
    pub fn respond(&self, result: Result<FhirResponse>) -> Response {
        match &self.format {
            Ok(f) => render(result, *f, self.pretty),
            Err(e) => render(
                Err(Error::NotAcceptable(match e {
                    Error::NotAcceptable(s) => s.clone(),
                    other => other.to_string(),
                })),
                Format::Json,
                self.pretty,
            ),
        }
    }
}

/// A successful FHIR response before rendering.
pub struct FhirResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<ResponseBody>,
}

pub enum ResponseBody {
    /// A resource held as a JSON value.
    Value(Value),
    /// A resource already serialised as compact FHIR JSON (as stored).
    Json(String),
    /// A search, history or `$everything` page.
    Bundle(crate::fhir::bundle::Bundle),
}

impl FhirResponse {
    pub fn new(status: StatusCode) -> FhirResponse {
        FhirResponse {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn with_value(mut self, v: Value) -> Self {
        self.body = Some(ResponseBody::Value(v));
        self
    }

    pub fn with_bundle(mut self, b: crate::fhir::bundle::Bundle) -> Self {
        self.body = Some(ResponseBody::Bundle(b));
        self
    }

    pub fn with_json(mut self, s: String) -> Self {
        self.body = Some(ResponseBody::Json(s));
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

fn serialise(body: ResponseBody, format: Format, pretty: bool) -> Result<Vec<u8>> {
    let body = match body {
        ResponseBody::Bundle(b) if format == Format::Json && !pretty => return Ok(b.to_json()),
        ResponseBody::Bundle(b) => ResponseBody::Value(crate::interaction::bundle_value(b)?),
        other => other,
    };
    Ok(match (format, body) {
        (Format::Json, ResponseBody::Json(s)) if !pretty => s.into_bytes(),
        (Format::Json, ResponseBody::Json(s)) => {
            let v: Value = serde_json::from_str(&s).map_err(|e| Error::invalid(e.to_string()))?;
            serde_json::to_vec_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?
        }
        (Format::Json, ResponseBody::Value(v)) if pretty => {
            serde_json::to_vec_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?
        }
        (Format::Json, ResponseBody::Value(v)) => {
            serde_json::to_vec(&v).map_err(|e| Error::invalid(e.to_string()))?
        }
        (Format::Xml, ResponseBody::Json(s)) => {
            let v: Value = serde_json::from_str(&s).map_err(|e| Error::invalid(e.to_string()))?;
            codec::to_xml(&v)?
        }
        (Format::Xml, ResponseBody::Value(v)) => codec::to_xml(&v)?,
        (_, ResponseBody::Bundle(_)) => unreachable!("bundles were turned into values above"),
    })
}

/// Renders a result or an error (always with an OperationOutcome).
pub fn render(result: Result<FhirResponse>, format: Format, pretty: bool) -> Response {
    let (status, headers, body) = match result {
        Ok(r) => (r.status, r.headers, r.body),
        Err(e) => (
            e.status(),
            Vec::new(),
            Some(ResponseBody::Value(e.outcome())),
        ),
    };
    let bytes = match body.map(|b| serialise(b, format, pretty)).transpose() {
        Ok(b) => b,
        Err(e) => {
            // Serialisation of our own output failed: report in JSON.
            let outcome = serde_json::to_vec(&e.outcome()).unwrap_or_default();
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, Format::Json.content_type())],
                outcome,
            )
                .into_response();
        }
    };
    let has_body = bytes.is_some();
    let mut response = match bytes {
        Some(b) => Response::new(Body::from(b)),
        None => Response::new(Body::empty()),
    };
    *response.status_mut() = status;
    let h = response.headers_mut();
    if has_body {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        );
    }
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.append(name, v);
        }
    }
    response
}
