//! HTTP: the axum router and thin handlers. A handler turns the request into
//! plain values, calls an `interaction` function, and renders the result or
//! error in the negotiated format.

pub mod audit;
mod authenticate;
pub mod authorization;
mod capability;
pub mod cors;
mod handlers;
pub mod ops;
mod request;
mod throttle;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::auth::Auth;
use crate::config::Config;
use crate::interaction::Env;
use crate::store::Store;

pub use capability::capability_statement;
pub use request::{FhirRequest, FhirResponse};

/// Shared state of every handler: one reference-counted pointer, so the
/// clone every middleware layer and handler takes costs one increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] points to.
pub struct Shared {
    pub store: Store,
    pub env: Arc<Env>,
    pub config: Arc<Config>,
    /// The signed-XML exchange (key, mapping rules), loaded at start.
    pub exchange: Arc<tokio::sync::OnceCell<Arc<crate::exchange::inbound::Exchange>>>,
    pub auth: Arc<Auth>,
    /// Sign-in and token request rates.
    pub throttle: Arc<throttle::Throttle>,
    /// The CORS policy of the endpoints browser apps call.
    pub cors: tower_http::cors::CorsLayer,
    /// The insurers' permitted part (`insurer_policy`).
    pub insurers: Arc<crate::policy::insurer::InsurerPolicy>,
    /// The audit log (`None` when `audit = false`).
    pub audit: Option<crate::store::audit::AuditLog>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(store: Store, config: Config, auth: Auth) -> AppState {
        let env = Env::from_config(&config);
        let throttle = throttle::Throttle::new(
            config.login_attempts_per_minute,
            config.token_requests_per_minute,
        );
        let cors = cors::layer(Arc::new(cors::Origins::new(&config, store.clone())));
        let insurers = config.insurer_policy().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the insurer policy cannot be read; insurers see nothing");
            crate::policy::insurer::InsurerPolicy::empty()
        });
        let audit = config.audit.then(|| {
            crate::store::audit::AuditLog::start(
                store.clone(),
                config.base_url(),
                std::time::Duration::from_secs(config.audit_checkpoint_interval),
                config.audit_retention_days,
                std::time::Duration::from_micros(config.audit_batch_window_us),
            )
        });
        if let Some(log) = &audit {
            log.complete_upgrades();
        }
        AppState(Arc::new(Shared {
            insurers: Arc::new(insurers),
            audit,
            throttle: Arc::new(throttle),
            cors,
            store,
            env: Arc::new(env),
            config: Arc::new(config),
            exchange: Arc::new(tokio::sync::OnceCell::new()),
            auth: Arc::new(auth),
        }))
    }

    /// The exchange, loaded (and its key generated) on first use.
    pub async fn exchange(&self) -> crate::Result<Arc<crate::exchange::inbound::Exchange>> {
        self.exchange
            .get_or_try_init(|| async {
                crate::exchange::inbound::Exchange::load(&self.store, &self.config)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

/// The FHIR REST API behind bearer-token authentication, the public
/// capability statement, and the authorization server.
pub fn router(state: AppState) -> Router {
    use handlers::*;
    let fhir = Router::new()
        // The audit log, read through the caller-scoped store; never written.
        .route(
            "/AuditEvent",
            get(audit::search)
                .post(audit::not_writable)
                .put(audit::not_writable)
                .delete(audit::not_writable)
                .patch(audit::not_writable),
        )
        .route(
            "/AuditEvent/{id}",
            get(audit::read)
                .put(audit::not_writable)
                .delete(audit::not_writable)
                .patch(audit::not_writable)
                .post(audit::not_writable),
        )
        .route("/Patient/{id}/$access-log", get(audit::access_log))
        .route("/", post(transaction).get(system_search))
        .route("/_history", get(history_system))
        .route(
            "/{rtype}",
            get(search_type)
                .post(create)
                .put(conditional_update)
                .delete(conditional_delete)
                .patch(conditional_patch),
        )
        .route("/{rtype}/_search", post(search_post))
        .route("/{rtype}/_history", get(history_type))
        .route(
            "/{rtype}/{id}",
            get(read).put(update).delete(delete).patch(patch),
        )
        .route("/{rtype}/{id}/_history", get(history_instance))
        .route(
            "/{rtype}/{id}/{what}",
            get(compartment_or_operation).post(instance_operation),
        )
        .route("/{rtype}/{id}/_history/{vid}", get(vread))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate::authenticate,
        ))
        // Outside authentication, so refused tokens are recorded too.
        .route_layer(middleware::from_fn_with_state(state.clone(), audit::fhir));
    // Operator endpoints sit beside the API unless they have their own
    // address (`ops_listen`, served by `server`).
    let ops = if state.config.ops_listen.is_none() {
        ops::router()
    } else {
        Router::new()
    };
    Router::new()
        .route("/metadata", get(metadata))
        .merge(ops)
        // The sender of a document is authenticated by its signature.
        .route(
            "/exchange/documents",
            post(exchange_document).route_layer(middleware::from_fn_with_state(
                state.clone(),
                audit::exchange,
            )),
        )
        .route("/audit/checkpoint", get(audit::checkpoint))
        .route("/audit/key", get(audit::key))
        .route("/audit/keys", get(audit::keys))
        .route("/audit/proof/inclusion", get(audit::inclusion))
        .route("/audit/proof/consistency", get(audit::consistency))
        .merge(
            authorization::router()
                .route_layer(middleware::from_fn_with_state(state.clone(), audit::smart)),
        )
        .merge(fhir)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), bound_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_outcome,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors))
        .layer(middleware::from_fn(log_request))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(NewRequestId))
        .layer(middleware::from_fn(screen_request_id))
        .with_state(state)
}

/// The operator endpoints alone, for their own listener (`ops_listen`).
pub fn ops_router(state: AppState) -> Router {
    ops::router().with_state(state)
}

/// A fresh request id: a random UUID.
#[derive(Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        header::HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// The longest `X-Request-Id` a caller may choose.
const MAX_REQUEST_ID: usize = 128;

/// Keeps a caller's `X-Request-Id` (so a request can be followed across
/// systems) only when it is short and plain (letters, digits, `.`, `_`, `-`);
/// any other is replaced by a fresh one, so log lines cannot be forged
/// through it.
async fn screen_request_id(mut req: Request, next: Next) -> Response {
    let plain = |v: &header::HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    };
    let ids = req.headers().get_all(X_REQUEST_ID).iter().count();
    if ids > 1 || req.headers().get(X_REQUEST_ID).is_some_and(|v| !plain(v)) {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    next.run(req).await
}

/// The request id header, set on every request and answer.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The largest request head (all header names and values) answered: above
/// it, 431 with an OperationOutcome.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// An OperationOutcome response built outside any handler.
fn outcome_response(status: StatusCode, code: &'static str, message: String) -> Response {
    let body = crate::fhir::operation_outcome(&[crate::fhir::Issue::error(code, message)]);
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

/// Refuses oversized request heads, runs the request under its server's
/// [`crate::limits`], and answers 503 when it runs longer than
/// `request_timeout`: its handler (and the database work it awaits) is
/// dropped.
async fn bound_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path().len()
        + req.uri().query().map_or(0, str::len);
    if head > MAX_HEADER_BYTES {
        return outcome_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too-costly",
            format!("the request line and headers exceed {MAX_HEADER_BYTES} bytes"),
        );
    }
    let limit = std::time::Duration::from_secs(state.config.request_timeout);
    let run = crate::limits::scope(
        state.config.limits,
        crate::interaction::rights::scope(
            std::sync::Arc::clone(&state.env.amendment_types),
            next.run(req),
        ),
    );
    match tokio::time::timeout(limit, run).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(seconds = limit.as_secs(), "request timed out");
            outcome_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request took longer than {} seconds and was abandoned; narrow it",
                    limit.as_secs()
                ),
            )
        }
    }
}

/// A handler that panicked still answers (500, an OperationOutcome); the
/// process and the other requests go on. The panic message stays in the
/// log: it may quote input.
fn panic_outcome(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    outcome_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "internal error".into(),
    )
}

/// One log line per request: method, route template, status, latency; and
/// the request's metrics. Every line logged while the request runs carries
/// its request id. Query strings and bodies are never logged (they may
/// carry PHI).
async fn log_request(req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!("request", request_id = %id);
    let start = Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    crate::metrics::request(method.as_str(), &route, status, elapsed);
    span.in_scope(|| {
        tracing::info!(
            %method,
            route,
            status,
            micros = elapsed.as_micros() as u64,
            "request"
        )
    });
    response
}
