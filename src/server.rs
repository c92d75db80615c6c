//! Starting the HTTP server.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::api::{router, AppState};
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
        )
        .await?;
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
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
        match self.tls {
            Some(acceptor) => {
                crate::exchange::tls::serve(self.listener, acceptor, app, shutdown).await?
            }
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await?
            }
        }
        optimizer.abort();
        self.state.store.close().await;
        Ok(())
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
