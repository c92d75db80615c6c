//! Authentication of the FHIR API: the bearer token is checked (signature,
//! issuer, audience, expiry, revocation) and turned into the caller's
//! [`Access`], from which the request's caller-scoped store is made
//! (`store::gate`). No token, no access;
//! the only way around is the explicit development switch `auth_disabled`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::request::render;
use super::AppState;
use crate::auth::{token, AuthError};
use crate::error::Error;
use crate::fhir::media::negotiate;
use crate::fhir::Format;
use crate::policy::{Access, Maintenance};

pub async fn authenticate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    if s.config.auth_disabled {
        req.extensions_mut()
            .insert(Access::maintenance(Maintenance::AuthDisabled));
        return next.run(req).await;
    }
    let format = negotiate(
        None,
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    )
    .unwrap_or(Format::Json);
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        });
    let Some(bearer) = bearer else {
        return refuse(format, "a bearer access token is required", None);
    };
    match token::verify(&s.auth, &bearer).await {
        Ok(verified) => {
            identify(&verified.principal.claims);
            req.extensions_mut().insert(verified.access.clone());
            req.extensions_mut().insert(verified);
            next.run(req).await
        }
        Err(AuthError::InvalidToken(why)) => refuse(format, &why, Some("invalid_token")),
        Err(e) => render(
            Err(Error::Store(match e {
                AuthError::Store(se) => se,
                other => crate::store::StoreError::Conflict(other.to_string()),
            })),
            format,
            false,
        ),
    }
}

/// 401 with an OperationOutcome and a `WWW-Authenticate` challenge (RFC 6750).
fn refuse(format: Format, why: &str, error: Option<&'static str>) -> Response {
    crate::metrics::auth_failure("api", error.unwrap_or("missing_token"));
    let mut r = render(Err(Error::Unauthorized(why.to_string())), format, false);
    let challenge = match error {
        Some(code) => format!(
            "Bearer realm=\"ehrx\", error=\"{code}\", error_description=\"{}\"",
            why.replace('"', "'")
        ),
        None => "Bearer realm=\"ehrx\"".to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Names the caller of the request being audited from its checked token:
/// user, client, patient context and the organisation its client acts for.
pub(super) fn identify(c: &token::Claims) {
    crate::audit::context::identify(
        c.fhir_user.as_deref(),
        &c.client_id,
        c.patient.as_deref(),
        c.organization.as_deref(),
    );
}
