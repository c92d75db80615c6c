//! Cross-origin requests (CORS). A SMART app running in a browser calls the
//! discovery documents, the token, introspection and revocation endpoints
//! and the FHIR API from its own origin, and the browser lets it read the
//! answers only when they name that origin. The allowed origins are the
//! configured ones, or else those of the redirect URIs of the registered
//! clients, read from the database and cached.
//!
//! The pages a person uses (sign-in, sign-up, consent), EHR launch contexts
//! and the signed-XML exchange get no CORS headers: no script of another
//! origin has any business reading them.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tower::{Layer as _, ServiceExt as _};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::AppState;
use crate::config::Config;
use crate::store::Store;

/// How long the registered origins are used before they are read again.
const FRESH: Duration = Duration::from_secs(5);
/// An origin not in the cache reads the registrations again, at most this
/// often: a client registered a moment ago works at once, and requests from
/// unknown origins cost at most one query per interval.
const MISS_REFRESH: Duration = Duration::from_secs(1);

/// Which origins may call.
pub struct Origins {
    rule: Rule,
    cache: RwLock<Cached>,
    /// Held while the registrations are read, so that one query serves
    /// every request waiting for it.
    refreshing: tokio::sync::Mutex<()>,
}

enum Rule {
    Any,
    Listed(HashSet<String>),
    Registered(Box<Store>),
}

#[derive(Default)]
struct Cached {
    origins: HashSet<String>,
    loaded: Option<Instant>,
}

impl Origins {
    /// `cors_origins` from the configuration, or else the registered
    /// clients' redirect URIs in `store`.
    pub fn new(config: &Config, store: Store) -> Origins {
        let rule = if config.cors_origins.iter().any(|o| o == "*") {
            Rule::Any
        } else if config.cors_origins.is_empty() {
            Rule::Registered(Box::new(store))
        } else {
            Rule::Listed(
                config
                    .cors_origins
                    .iter()
                    .filter_map(|o| crate::auth::clients::origin_of(o))
                    .collect(),
            )
        };
        Origins {
            rule,
            cache: RwLock::new(Cached::default()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether scripts of `origin` (an `Origin` header) may read answers.
    pub async fn allows(&self, origin: &str) -> bool {
        match &self.rule {
            Rule::Any => true,
            Rule::Listed(listed) => listed.contains(origin),
            Rule::Registered(store) => self.registered(store, origin).await,
        }
    }

    /// Whether `origin` is in the cached set; `None` when the set must be
    /// read again first.
    fn cached(&self, origin: &str) -> Option<bool> {
        let c = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let age = c.loaded?.elapsed();
        let hit = c.origins.contains(origin);
        (age < FRESH && (hit || age < MISS_REFRESH)).then_some(hit)
    }

    async fn registered(&self, store: &Store, origin: &str) -> bool {
        if let Some(hit) = self.cached(origin) {
            return hit;
        }
        let _one = self.refreshing.lock().await;
        // Another request may have read them while this one waited.
        if let Some(hit) = self.cached(origin) {
            return hit;
        }
        let read = crate::auth::clients::redirect_origins(store).await;
        let mut c = self.cache.write().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(origins) => c.origins = origins,
            // The last known set stays in use until a read succeeds.
            Err(e) => tracing::warn!("CORS origins not refreshed: {e}"),
        }
        c.loaded = Some(Instant::now());
        c.origins.contains(origin)
    }
}

/// The CORS policy: the allowed origins, the methods and request headers
/// of the FHIR API and OAuth endpoints, and the response headers a script
/// may read. No cookies: apps authenticate with bearer tokens.
pub fn layer(origins: Arc<Origins>) -> CorsLayer {
    let allow_origin = match origins.rule {
        Rule::Any => AllowOrigin::any(),
        _ => AllowOrigin::async_predicate(move |origin: HeaderValue, _| async move {
            match origin.to_str() {
                Ok(o) => origins.allows(o).await,
                Err(_) => false,
            }
        }),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::ACCEPT_LANGUAGE,
            HeaderName::from_static("prefer"),
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            HeaderName::from_static("if-none-exist"),
            header::IF_MODIFIED_SINCE,
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            header::LOCATION,
            header::ETAG,
            header::CONTENT_LOCATION,
            header::LAST_MODIFIED,
            header::WWW_AUTHENTICATE,
        ])
        .max_age(Duration::from_secs(600))
}

/// Endpoints under `/auth/` that apps call from scripts.
const AUTH_ENDPOINTS: &[&str] = &[
    "/auth/token",
    "/auth/introspect",
    "/auth/revoke",
    "/auth/jwks",
    "/auth/smart-style.json",
];

/// Whether requests to `path` get CORS headers: the discovery documents,
/// `/metadata`, the FHIR API and [`AUTH_ENDPOINTS`].
fn applies(path: &str) -> bool {
    if path == "/auth" || path.starts_with("/auth/") {
        return AUTH_ENDPOINTS.contains(&path);
    }
    !(path == "/exchange" || path.starts_with("/exchange/"))
}

/// Middleware: answers preflights and adds the CORS headers on the
/// endpoints [`applies`] names; other requests pass untouched.
pub async fn cors(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if !applies(req.uri().path()) {
        return next.run(req).await;
    }
    match s.cors.layer(next).oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::applies;

    #[test]
    fn cors_covers_the_api_and_oauth_endpoints_but_not_the_pages() {
        for p in [
            "/metadata",
            "/.well-known/smart-configuration",
            "/Patient/1",
            "/",
            "/auth/token",
            "/auth/revoke",
        ] {
            assert!(applies(p), "{p}");
        }
        for p in [
            "/auth/authorize",
            "/auth/consent",
            "/auth/login",
            "/auth/launch",
            "/exchange/documents",
        ] {
            assert!(!applies(p), "{p}");
        }
    }
}
