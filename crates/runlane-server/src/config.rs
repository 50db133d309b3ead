//! The server's settings.

use std::net::SocketAddr;
use std::path::PathBuf;

use runlane::DistributedConfig;

/// Which engine shape the server opens.
#[derive(Clone, Debug)]
pub enum BackendConfig {
    /// Queue state and runs in memory (no durability).
    Memory,
    /// Embedded: runs in `<data_dir>/runs.db`, keys in `<data_dir>/keys.db`.
    Embedded {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// Distributed: Redis and PostgreSQL (keys in the PostgreSQL schema).
    Distributed(Box<DistributedConfig>),
}

/// Settings of `runlane serve`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// The engine shape.
    pub backend: BackendConfig,
    /// Largest request body, in bytes (default 1 MiB).
    pub max_body_bytes: usize,
    /// Largest trigger batch (default 500).
    pub max_batch: usize,
    /// A key that becomes an admin key at start (`RUNLANE_ADMIN_KEY`).
    pub admin_key: Option<String>,
    /// Print a created admin key on stderr (default true; tests turn it off).
    pub print_admin_key: bool,
}

impl ServerConfig {
    /// Defaults: `127.0.0.1:7878`, embedded in `./runlane-data`, 1 MiB bodies, batches of 500.
    pub fn new(backend: BackendConfig) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            backend,
            max_body_bytes: 1 << 20,
            max_batch: 500,
            admin_key: None,
            print_admin_key: true,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::new(BackendConfig::Embedded {
            data_dir: PathBuf::from("./runlane-data"),
        })
    }
}
