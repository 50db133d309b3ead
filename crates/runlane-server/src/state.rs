//! The state every handler shares: the engine, the key store and the config.

use std::sync::Arc;

use runlane::{Distributed, Engine};

use crate::config::ServerConfig;
use crate::events::EventLog;
use crate::keys::{KeyCache, KeyStore};
use crate::routes::workers::WorkerRegistry;

/// The engine in the shape the server opened.
pub enum Backend {
    /// In memory (`--memory`).
    Memory(Engine),
    /// Embedded: SQLite in the data dir.
    Embedded(Engine),
    /// Distributed: Redis and PostgreSQL.
    Distributed(Box<Distributed>),
}

impl Backend {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        match self {
            Backend::Memory(e) | Backend::Embedded(e) => e,
            Backend::Distributed(d) => d.engine(),
        }
    }

    /// The shape's name (`memory`, `embedded`, `distributed`).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "memory",
            Backend::Embedded(_) => "embedded",
            Backend::Distributed(_) => "distributed",
        }
    }

    /// Stops the engine (and the distributed shape's tasks).
    pub async fn shutdown(&self) {
        match self {
            Backend::Memory(e) | Backend::Embedded(e) => e.shutdown().await,
            Backend::Distributed(d) => d.shutdown().await,
        }
    }
}

/// Shared by every handler; cheap to clone. Other route areas (the worker protocol) add
/// their routers over the same state.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    keys: Arc<dyn KeyStore>,
    cache: KeyCache,
    config: ServerConfig,
    workers: WorkerRegistry,
    events: Arc<EventLog>,
    closing: tokio::sync::watch::Sender<bool>,
    /// Told when the last handle is gone (the engine, and so its files, with it).
    released: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tx = self
            .released
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

impl AppState {
    /// Builds the state.
    pub fn new(backend: Backend, keys: Arc<dyn KeyStore>, config: ServerConfig) -> Self {
        AppState {
            inner: Arc::new(Inner {
                backend,
                keys,
                cache: KeyCache::default(),
                config,
                workers: WorkerRegistry::default(),
                events: Arc::new(EventLog::default()),
                closing: tokio::sync::watch::channel(false).0,
                released: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        self.inner.backend.engine()
    }

    /// The backend shape.
    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The key store.
    pub fn keys(&self) -> &Arc<dyn KeyStore> {
        &self.inner.keys
    }

    /// Verified keys.
    pub fn key_cache(&self) -> &KeyCache {
        &self.inner.cache
    }

    /// The server's config.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The remote workers registered through the worker protocol.
    pub fn workers(&self) -> &WorkerRegistry {
        &self.inner.workers
    }

    /// The SSE event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.inner.events
    }

    /// Resolves once every handle on this state is dropped (and with it the engine: an
    /// embedded data dir can be opened again).
    pub fn released(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self
            .inner
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Tells long requests (SSE streams, waits) that the server is shutting down.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once the server is shutting down.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.closing.subscribe();
        async move {
            // An error means the state is gone: closing too.
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }

    /// Now, in ms since the epoch (the engine's clock).
    pub fn now_ms(&self) -> u64 {
        self.engine().now().as_millis()
    }
}
