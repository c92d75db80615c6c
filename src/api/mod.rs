//! HTTP: the axum router and thin handlers. A handler turns the request into
//! plain values, calls an `interaction` function, and renders the result or
//! error in the negotiated format.

mod authenticate;
pub mod authorization;
mod capability;
pub mod cors;
mod handlers;
mod request;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::auth::Auth;
use crate::config::Config;
use crate::interaction::Env;
use crate::store::Store;

pub use capability::capability_statement;
pub use request::{FhirRequest, FhirResponse};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub env: Arc<Env>,
    pub config: Arc<Config>,
    /// The signed-XML exchange (key, mapping rules), loaded at start.
    pub exchange: Arc<tokio::sync::OnceCell<Arc<crate::exchange::inbound::Exchange>>>,
    pub auth: Arc<Auth>,
    /// The CORS policy of the endpoints browser apps call.
    pub cors: tower_http::cors::CorsLayer,
}

impl AppState {
    pub fn new(store: Store, config: Config, auth: Auth) -> AppState {
        let env = Env::from_config(&config);
        let cors = cors::layer(Arc::new(cors::Origins::new(&config, store.clone())));
        AppState {
            cors,
            store,
            env: Arc::new(env),
            config: Arc::new(config),
            exchange: Arc::new(tokio::sync::OnceCell::new()),
            auth: Arc::new(auth),
        }
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
        .route("/{rtype}/{id}/{what}", get(compartment_or_operation))
        .route("/{rtype}/{id}/_history/{vid}", get(vread))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate::authenticate,
        ));
    Router::new()
        .route("/metadata", get(metadata))
        // The sender of a document is authenticated by its signature.
        .route("/exchange/documents", post(exchange_document))
        .merge(authorization::router())
        .merge(fhir)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One log line per request: method, route template, status, latency.
/// Query strings and bodies are never logged (they may carry PHI).
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        %method,
        route,
        status = response.status().as_u16(),
        micros = start.elapsed().as_micros() as u64,
        "request"
    );
    response
}
