//! Opening the engine and key store, binding, serving, and shutting down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use runlane::{EngineBuilder, EngineConfig};

use crate::config::{BackendConfig, ServerConfig};
use crate::keys::{
    generate_id, generate_key, hash_key, KeyRecord, KeyStore, KeyStoreError, MemoryKeyStore,
    PostgresKeyStore, Role, SqliteKeyStore,
};
use crate::state::{AppState, Backend};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The engine could not be opened.
    #[error("opening the engine: {0}")]
    Open(#[from] runlane::OpenError),
    /// The key store could not be opened or written.
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How long `run` waits, after the drain, for the last handle on the state to go.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A bound server, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    created_admin_key: Option<String>,
}

impl Server {
    /// Opens the engine and the key store of `config` and binds `config.listen`.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        // The address first: a busy port fails before any data is opened.
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let (backend, keys): (Backend, Arc<dyn KeyStore>) = match &config.backend {
            BackendConfig::Memory => (
                Backend::Memory(
                    runlane::memory_with(engine_builder(&config))
                        .await
                        .map_err(|e| ServerError::Open(e.into()))?,
                ),
                Arc::new(MemoryKeyStore::new()),
            ),
            BackendConfig::Embedded { data_dir } => {
                let engine = runlane::embedded_with(
                    engine_builder(&config),
                    data_dir.join("runs.db"),
                    runlane::SqliteConfig::default(),
                )
                .await?;
                let path = data_dir.join("keys.db");
                let keys = tokio::task::spawn_blocking(move || SqliteKeyStore::open(&path))
                    .await
                    .map_err(|e| KeyStoreError::Unavailable(e.to_string()))??;
                (Backend::Embedded(engine), Arc::new(keys))
            }
            BackendConfig::Distributed(dist) => {
                let shape =
                    runlane::distributed_with(engine_builder(&config), (**dist).clone()).await?;
                let keys =
                    PostgresKeyStore::open(&dist.postgres.url, &dist.postgres.schema).await?;
                (Backend::Distributed(Box::new(shape)), Arc::new(keys))
            }
        };
        let state = AppState::new(backend, keys, config);
        let created_admin_key = ensure_admin(&state).await?;
        if let Some(key) = &created_admin_key {
            if state.config().print_admin_key {
                eprintln!("runlane: created an admin key (shown once): {key}");
            }
        }
        Ok(Server {
            listener,
            state,
            created_admin_key,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin key created at this start (no admin key existed and none was given).
    pub fn created_admin_key(&self) -> Option<&str> {
        self.created_admin_key.as_deref()
    }

    /// The shared state (tests and other route areas).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests and stops the engine.
    /// When it returns, the engine is closed (an embedded data dir can be opened again) unless
    /// a handle taken with [`Server::state`] still holds it.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let app = crate::router(self.state.clone());
        let state = self.state.clone();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                // Streams and waits end now, so the drain only waits for short requests;
                // remote workers are closed too: their long-polls end at once and their held
                // runs go back to their queues.
                state.close();
                state.workers().close_all().await;
            })
            .await;
        // Any worker registered while the drain ran.
        self.state.workers().close_all().await;
        self.state.backend().shutdown().await;
        // Connection tasks drop their handles on the state just after the drain returns; wait
        // (bounded) for the last one, so the engine and its files are closed when this returns.
        let released = self.state.released();
        drop(self.state);
        if tokio::time::timeout(RELEASE_WAIT, released).await.is_err() {
            tracing::warn!("the engine is still held {RELEASE_WAIT:?} after shutdown");
        }
        served?;
        Ok(())
    }
}

/// The engine's settings from the server's: a batch as large as the server takes, a payload
/// as large as a body.
fn engine_builder(config: &ServerConfig) -> EngineBuilder {
    EngineBuilder::new().config(EngineConfig {
        batch_max: config.max_batch.max(1),
        payload_max_bytes: config.max_body_bytes.max(1),
        ..EngineConfig::default()
    })
}

/// Binds and serves `config` until `shutdown` resolves.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let server = Server::bind(config).await?;
    tracing::info!(addr = %server.local_addr()?, "runlane serving");
    server.run(shutdown).await
}

/// Stores `RUNLANE_ADMIN_KEY` if given and new; else creates an admin key when none is
/// usable. Answers a created key.
async fn ensure_admin(state: &AppState) -> Result<Option<String>, KeyStoreError> {
    let now = state.now_ms();
    let keys = state.keys();
    if let Some(given) = &state.config().admin_key {
        let hash = hash_key(given);
        if keys.by_hash(&hash).await?.is_none() {
            keys.insert(&KeyRecord {
                id: generate_id(),
                hash,
                role: Role::Admin,
                envs: Vec::new(),
                label: Some("RUNLANE_ADMIN_KEY".to_string()),
                created_at_ms: now,
                revoked_at_ms: None,
            })
            .await?;
        }
        return Ok(None);
    }
    let has_admin = keys
        .list()
        .await?
        .iter()
        .any(|k| k.role == Role::Admin && k.revoked_at_ms.is_none());
    if has_admin {
        return Ok(None);
    }
    let key = generate_key();
    keys.insert(&KeyRecord {
        id: generate_id(),
        hash: hash_key(&key),
        role: Role::Admin,
        envs: Vec::new(),
        label: Some("first start".to_string()),
        created_at_ms: now,
        revoked_at_ms: None,
    })
    .await?;
    Ok(Some(key))
}
