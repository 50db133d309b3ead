//! The state every handler shares: the engine, the key store and the config.

use std::sync::Arc;

use runlane::{Distributed, Engine};

use crate::config::ServerConfig;
use crate::keys::{KeyCache, KeyStore};

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

    /// Now, in ms since the epoch (the engine's clock).
    pub fn now_ms(&self) -> u64 {
        self.engine().now().as_millis()
    }
}
