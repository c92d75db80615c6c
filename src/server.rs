//! Starting the HTTP server: the API listener (HTTP or HTTPS), the
//! operator endpoints' own listener when `ops_listen` is set, the background
//! tasks (planner statistics, scheduled backups), and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::api::{ops_router, router, AppState};
use crate::auth::Auth;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("authorization server: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("exchange: {0}")]
    Exchange(String),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A server bound to its socket, ready to run.
pub struct Server {
    pub listener: TcpListener,
    pub state: AppState,
    /// Set when the server speaks HTTPS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The operator endpoints' own listener (`ops_listen`).
    pub ops_listener: Option<TcpListener>,
}

impl Server {
    /// Opens (and migrates) the database and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let store = config.open_store(config.db_pool_size).await?;
        if !store.secrets().sealing() {
            tracing::info!(
                "private keys are kept in the database unsealed; set key_encryption_key_file to seal them"
            );
        }
        if config.auth_disabled {
            tracing::warn!(
                "AUTHORIZATION IS DISABLED (auth_disabled = true): every caller may read and write everything; never run like this with real data"
            );
        }
        let auth = Auth::open(
            store.clone(),
            config.base_url(),
            config.access_token_lifetime,
            config.revocation_max_delay(),
        )
        .await?;
        auth.tokens
            .sync(&store)
            .await
            .map_err(crate::auth::AuthError::from)?;
        auth.tokens.spawn_sync(store.clone());
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let ops_listener = match &config.ops_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServeError::Bind {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        crate::metrics::install();
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => {
                Some(crate::exchange::tls::acceptor(cert, key).map_err(ServeError::Tls)?)
            }
            _ => None,
        };
        let state = AppState::new(store, config, auth);
        // The exchange key is generated on first start, not on first use.
        state
            .exchange()
            .await
            .map_err(|e| ServeError::Exchange(e.to_string()))?;
        Ok(Server {
            listener,
            state,
            tls,
            ops_listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let app = router(self.state.clone());
        let store = self.state.store.clone();
        let optimizer = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                every.tick().await;
                if let Err(e) = store.optimize().await {
                    tracing::warn!("planner statistics not refreshed: {e}");
                }
            }
        });
        let config = &self.state.config;
        let (stop_backups, backups_stopped) = tokio::sync::watch::channel(false);
        let backups = (config.backup_interval > 0).then(|| {
            tracing::info!(
                dir = %config.backup_dir.display(),
                every_seconds = config.backup_interval,
                keep = config.backup_keep,
                "scheduled backups on"
            );
            crate::backup::spawn_scheduled(
                self.state.store.clone(),
                config.backup_dir.clone(),
                Duration::from_secs(config.backup_interval),
                config.backup_keep,
                backups_stopped,
            )
        });
        // The operator endpoints stay up until the API has drained.
        let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
        let ops = self.ops_listener.map(|listener| {
            let app = ops_router(self.state.clone());
            tokio::spawn(serve_connections(listener, None, app, async {
                let _ = ops_stopped.await;
            }))
        });
        serve_connections(self.listener, self.tls, app, shutdown).await;
        let _ = ops_stop.send(());
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        optimizer.abort();
        // A scheduled backup being written is finished first.
        let _ = stop_backups.send(true);
        if let Some(b) = backups {
            let _ = b.await;
        }
        self.state.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The largest request head (request line and headers) a connection
/// buffers. Heads above [`crate::api::MAX_HEADER_BYTES`] but below this are
/// answered 431 with an OperationOutcome; above it hyper answers a bare 431.
const MAX_HEAD_BUFFER: usize = 4 * 1024 * 1024;
/// Time a client has to send a request head, and to finish a TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time requests in flight get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Accepts connections (TLS when `tls` is set) and serves `app` on each
/// with HTTP/1.1 until `shutdown` resolves; then stops accepting and lets
/// the requests in flight finish, for at most [`SHUTDOWN_GRACE`]. Over TLS
/// each request carries the connection's client certificate.
async fn serve_connections(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use crate::api::audit::Peer;
    use crate::exchange::tls::ClientCertificate;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => (tcp, addr),
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BUFFER);
            let result = match tls {
                None => {
                    let svc = app.map_request(
                        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(Peer(addr));
                            req
                        },
                    );
                    let conn =
                        http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc));
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!("TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        };
                    let peer = ClientCertificate(
                        stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.as_ref().to_vec()),
                    );
                    let svc = app.map_request(
                        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(peer.clone());
                            req.extensions_mut().insert(Peer(addr));
                            req
                        },
                    );
                    let conn =
                        http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
