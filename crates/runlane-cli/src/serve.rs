//! `runlane serve`: settings from flags > environment > `--config` file > defaults, then the
//! server until SIGINT or SIGTERM (in-flight requests drain, the engine shuts down).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use runlane_server::{BackendConfig, ServerConfig};
use serde::Deserialize;

/// Arguments of `runlane serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7878].
    #[arg(long, env = "RUNLANE_LISTEN")]
    listen: Option<SocketAddr>,
    /// In-memory backends (no durability); wins over --data, --redis and --postgres.
    #[arg(long)]
    memory: bool,
    /// Data directory of the embedded engine [default: ./runlane-data].
    #[arg(long, env = "RUNLANE_DATA")]
    data: Option<PathBuf>,
    /// Distributed: the Redis server (with --postgres); wins over --data.
    #[arg(long, env = "RUNLANE_SERVE_REDIS")]
    redis: Option<String>,
    /// Distributed: the PostgreSQL server (with --redis).
    #[arg(long, env = "RUNLANE_SERVE_POSTGRES")]
    postgres: Option<String>,
    /// Distributed: the Redis key prefix [default: runlane]; deployments sharing one Redis
    /// and PostgreSQL keep apart by prefix and schema.
    #[arg(long, env = "RUNLANE_SERVE_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Distributed: the PostgreSQL schema [default: runlane].
    #[arg(long, env = "RUNLANE_SERVE_POSTGRES_SCHEMA")]
    postgres_schema: Option<String>,
    /// Distributed: a separate Redis for the shared task metadata cache [default: the queue's
    /// --redis]; its keys use the same prefix.
    #[arg(long, env = "RUNLANE_SERVE_META_CACHE_REDIS")]
    meta_cache_redis: Option<String>,
    /// Largest request body in bytes [default: 1048576].
    #[arg(long, env = "RUNLANE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest trigger batch [default: 500].
    #[arg(long, env = "RUNLANE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// A TOML file with any of: listen, backend ("memory" | "embedded" | "distributed"),
    /// data, redis, postgres, redis_prefix, postgres_schema, meta_cache_redis, max_body_bytes,
    /// max_batch.
    #[arg(long, env = "RUNLANE_CONFIG")]
    config: Option<PathBuf>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    backend: Option<String>,
    data: Option<PathBuf>,
    redis: Option<String>,
    postgres: Option<String>,
    redis_prefix: Option<String>,
    postgres_schema: Option<String>,
    meta_cache_redis: Option<String>,
    max_body_bytes: Option<usize>,
    max_batch: Option<usize>,
}

/// Resolves the settings (flags and environment win over the file, the file over defaults).
fn resolve(args: ServeArgs) -> anyhow::Result<ServerConfig> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing --config {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let backend = if args.memory {
        BackendConfig::Memory
    } else if let (Some(redis), Some(postgres)) = (&args.redis, &args.postgres) {
        BackendConfig::Distributed(Box::new(runlane::DistributedConfig::new(redis, postgres)))
    } else if args.redis.is_some() || args.postgres.is_some() {
        anyhow::bail!(
            "--redis (RUNLANE_SERVE_REDIS) and --postgres (RUNLANE_SERVE_POSTGRES) go together"
        );
    } else if args.data.is_some() {
        BackendConfig::Embedded {
            data_dir: args.data.clone().unwrap_or_default(),
        }
    } else {
        match file.backend.as_deref() {
            Some("memory") => BackendConfig::Memory,
            Some("distributed") => {
                let redis = file
                    .redis
                    .clone()
                    .context("--config: backend \"distributed\" needs redis")?;
                let postgres = file
                    .postgres
                    .clone()
                    .context("--config: backend \"distributed\" needs postgres")?;
                BackendConfig::Distributed(Box::new(runlane::DistributedConfig::new(
                    redis, postgres,
                )))
            }
            Some("embedded") | None => BackendConfig::Embedded {
                data_dir: file
                    .data
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("./runlane-data")),
            },
            Some(other) => anyhow::bail!(
                "--config: backend {other:?} is not one of memory, embedded, distributed"
            ),
        }
    };
    let mut backend = backend;
    if let BackendConfig::Distributed(d) = &mut backend {
        if let Some(prefix) = args.redis_prefix.clone().or(file.redis_prefix.clone()) {
            d.redis.prefix = prefix;
        }
        if let Some(schema) = args
            .postgres_schema
            .clone()
            .or(file.postgres_schema.clone())
        {
            d.postgres.schema = schema;
        }
        if let Some(url) = args
            .meta_cache_redis
            .clone()
            .or(file.meta_cache_redis.clone())
        {
            d.meta_cache_url = Some(url);
        }
    } else if args.redis_prefix.is_some()
        || args.postgres_schema.is_some()
        || args.meta_cache_redis.is_some()
    {
        anyhow::bail!(
            "--redis-prefix, --postgres-schema and --meta-cache-redis apply to the distributed backend only"
        );
    }
    let mut config = ServerConfig::new(backend);
    if let Some(listen) = args.listen.or(file.listen) {
        config.listen = listen;
    }
    if let Some(n) = args.max_body_bytes.or(file.max_body_bytes) {
        config.max_body_bytes = n;
    }
    if let Some(n) = args.max_batch.or(file.max_batch) {
        anyhow::ensure!(n >= 1, "max_batch must be at least 1");
        config.max_batch = n;
    }
    config.admin_key = std::env::var("RUNLANE_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    Ok(config)
}

/// Resolves when SIGINT or SIGTERM arrives. The handlers are installed here, before the
/// future is first polled, so a signal sent as soon as the server says it serves is not lost
/// (nor does it kill the process unhandled).
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("runlane: shutting down (draining in-flight requests)");
    })
}

/// Resolves when Ctrl-C arrives.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("runlane: shutting down (draining in-flight requests)");
    })
}

/// Runs the server until a signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    let shape = match &config.backend {
        BackendConfig::Memory => "memory".to_string(),
        BackendConfig::Embedded { data_dir } => format!("embedded, data in {}", data_dir.display()),
        BackendConfig::Distributed(_) => "distributed (Redis + PostgreSQL)".to_string(),
    };
    let shutdown = shutdown_signal()?;
    let server = runlane_server::Server::bind(config)
        .await
        .context("starting the server")?;
    eprintln!("runlane: serving http://{} ({shape})", server.local_addr()?);
    server.run(shutdown).await?;
    eprintln!("runlane: stopped");
    Ok(())
}
