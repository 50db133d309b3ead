//! Opening the distributed shape: the PostgreSQL run store, the Redis queue attached to it
//! (a lost key space is rebuilt from PostgreSQL), the engine over both, and the reconciler
//! task; plus [`Health`], whether each side answers.

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{QueueBackend, RunRecord};
use runlane_core::Timestamp;
use runlane_engine::{Engine, EngineBuilder, EngineError};
use runlane_postgres::reconcile::{spawn_reconciler, ReconcileConfig};
use runlane_postgres::{PostgresConfig, PostgresError, PostgresStore};
use runlane_redis::{
    RedisConfig, RedisHealth, RedisMetaCache, RedisMetaConfig, RedisOpenError, RedisQueue,
};
use tokio::sync::Notify;

use crate::bells::{BellReader, Bells};
use crate::queue::DistributedQueue;
use crate::store::DistributedStore;
use crate::timer::{spawn_lead, TimerLead};
use crate::wake::{spawn_publisher, spawn_subscriber, Channels, Wake};

/// How long [`Distributed::shutdown`] waits for the buffered `in_queue` marks to be written
/// (PostgreSQL unreachable: the reconciler of the next process takes them).
pub const MARK_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// Settings of the distributed shape.
#[derive(Clone, Debug)]
pub struct DistributedConfig {
    /// The Redis queue backend (URL, key prefix).
    pub redis: RedisConfig,
    /// The PostgreSQL run store (URL, schema, durability, writers).
    pub postgres: PostgresConfig,
    /// The reconciler (grace period of a pending row, page size, retry delay).
    pub reconcile: ReconcileConfig,
    /// How long the marker waits after the first accepted run of a batch before it marks
    /// the batch `in_queue` (more runs join the same update; default 500 ms). A run that
    /// finishes within it costs no marker write (its terminal write sets `in_queue`). At most
    /// half the reconciler's grace is used, so a marked row never looks missed.
    pub mark_linger: Duration,
    /// Deletes the prefix's Redis keys and drops the PostgreSQL schema when the engine is
    /// dropped (tests and benchmarks with a throwaway prefix and schema; default false).
    pub throwaway: bool,
    /// The lease of the timer ownership (`{prefix}:timer`, default 2 s): one process owns the
    /// deployment's timers and renews it every third of this; when the owner dies, another
    /// process takes over within this period.
    pub timer_lease: Duration,
    /// The shared task metadata cache's Redis (`None`, the default: the queue's URL). Its keys
    /// use the queue's prefix.
    pub meta_cache_url: Option<String>,
}

impl DistributedConfig {
    /// Defaults for the servers at `redis_url` and `postgres_url` (prefix and schema
    /// `runlane`).
    pub fn new(redis_url: impl Into<String>, postgres_url: impl Into<String>) -> Self {
        DistributedConfig {
            redis: RedisConfig::new(redis_url),
            postgres: PostgresConfig::new(postgres_url),
            reconcile: ReconcileConfig::default(),
            mark_linger: Duration::from_millis(500),
            throwaway: false,
            timer_lease: Duration::from_secs(2),
            meta_cache_url: None,
        }
    }
}

/// Why the distributed shape could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The PostgreSQL run store could not be opened (unreachable server, newer schema).
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The Redis queue backend could not be opened (unreachable server, foreign format).
    #[error(transparent)]
    Redis(#[from] RedisOpenError),
    /// The engine refused to start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Whether each side of the distributed shape answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Redis answered a call just now.
    pub redis: bool,
    /// Why it did not, when it did not.
    pub redis_error: Option<String>,
    /// The Redis backend's own view (connection state, rebuilds since open).
    pub redis_backend: RedisHealth,
    /// PostgreSQL answered a query just now.
    pub postgres: bool,
    /// Why it did not, when it did not.
    pub postgres_error: Option<String>,
}

impl Health {
    /// Both sides answer.
    pub fn ok(&self) -> bool {
        self.redis && self.postgres
    }
}

/// An engine of the distributed shape. Dereferences to its [`Engine`]; also answers
/// [`Distributed::health`] and owns the reconciler, stopped by [`Distributed::shutdown`] (or
/// once the engine is dropped).
pub struct Distributed {
    engine: Engine,
    queue: Arc<DistributedQueue>,
    store: Arc<PostgresStore>,
    stop: Arc<Notify>,
    subscriber: tokio::task::JoinHandle<()>,
    lead: Arc<TimerLead>,
    lead_task: tokio::task::JoinHandle<()>,
    shared: redis::aio::ConnectionManager,
    bells: Arc<Bells>,
}

impl Drop for Distributed {
    fn drop(&mut self) {
        // Dropped without `shutdown`: the timer ownership is not released, it lapses (as when
        // the process dies).
        self.subscriber.abort();
        self.lead_task.abort();
        self.lead.abandon();
        self.bells.abort_all();
    }
}

impl std::ops::Deref for Distributed {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Distributed {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The queue backend (Redis, with the queue side of the protocol).
    pub fn queue(&self) -> &Arc<DistributedQueue> {
        &self.queue
    }

    /// The PostgreSQL run store.
    pub fn store(&self) -> &Arc<PostgresStore> {
        &self.store
    }

    /// Asks each side for an answer now.
    pub async fn health(&self) -> Health {
        let redis = self.queue.redis().next_deadline().await;
        let postgres = self.store.ping().await;
        Health {
            redis: redis.is_ok(),
            redis_error: redis.err().map(|e| e.to_string()),
            redis_backend: self.queue.redis().health(),
            postgres: postgres.is_ok(),
            postgres_error: postgres.err().map(|e| e.to_string()),
        }
    }

    /// Whether this process owns the deployment's timers now.
    pub fn owns_timers(&self) -> bool {
        self.lead.is_leader()
    }

    /// How many times this process took the timer ownership since open.
    pub fn timer_takeovers(&self) -> u64 {
        self.lead.taken()
    }

    /// The doorbell readers of this process: one per distinct claim chain of its registered
    /// consumers, each with its own blocking connection.
    pub async fn bells(&self) -> Vec<BellReader> {
        self.bells.readers().await
    }

    /// The connection name (`CLIENT SETNAME`) of this process's doorbell readers.
    pub fn bell_client_name(&self) -> &str {
        self.bells.client_name()
    }

    /// Stops the reconciler, the cross-process tasks and the engine's timer service, gives
    /// the timer ownership up so another process takes it at once, and writes the `in_queue`
    /// marks still buffered (at most [`MARK_FLUSH_BOUND`] with PostgreSQL unreachable).
    pub async fn shutdown(&self) {
        self.stop.notify_one();
        self.subscriber.abort();
        self.lead_task.abort();
        self.lead.release(&self.shared).await;
        self.engine.shutdown().await;
        self.bells.close().await;
        self.queue.flush_marks(MARK_FLUSH_BOUND).await;
    }
}

/// Opens the distributed shape: connects to PostgreSQL (migrating the schema) and Redis,
/// opens the engine over them (recovering what Redis lost from PostgreSQL) and starts the
/// reconciler, which makes one pass at once.
pub async fn open(
    builder: EngineBuilder,
    config: DistributedConfig,
) -> Result<Distributed, DistributedError> {
    let url = config.postgres.url.clone();
    let redis_url = config.redis.url.clone();
    let config_prefix = config.redis.prefix.clone();
    // The task metadata cache: on the queue's Redis it shares the queue's connection; on a
    // Redis of its own, its own connection (made at first use, so an unreachable cache Redis
    // never stops the open). Its announcements channel is its own either way.
    let meta = RedisMetaCache::new(RedisMetaConfig::new(
        config
            .meta_cache_url
            .clone()
            .unwrap_or_else(|| redis_url.clone()),
        config.redis.prefix.clone(),
    ))?;
    let own_meta_redis = config.meta_cache_url.is_some();
    let store = Arc::new(PostgresStore::open(config.postgres).await?);
    // A throwaway schema goes with `run_store`: also when a later step of the open fails.
    let mut run_store = DistributedStore::new(store.clone());
    if config.throwaway {
        run_store = run_store.drop_schema_on_drop(url);
    }
    let mut redis = RedisQueue::open(config.redis).await?;
    if config.throwaway {
        redis = redis.delete_keys_on_drop();
    }
    let redis = Arc::new(redis);
    redis.attach_store(store.clone());
    RedisQueue::tidy_key_state(&redis);
    // One multiplexed connection for every non-blocking call of this process: the queue's
    // scripts, the publisher, the timer lead, the metadata cache (on this Redis). Blocking
    // reads (bells) and subscriptions have connections of their own.
    let shared = redis.connection();
    let meta = if own_meta_redis {
        meta
    } else {
        meta.with_connection(shared.clone())
    };
    let builder = builder.shared_meta_cache(Arc::new(meta));
    let channels = Channels::new(redis.key_base());
    let origin = format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let lead = Arc::new(TimerLead::new(
        redis.key_base(),
        &origin,
        config.timer_lease,
    ));
    let client =
        redis::Client::open(redis_url.as_str()).map_err(|e| RedisOpenError::Unreachable {
            address: redis_url.clone(),
            reason: e.to_string(),
        })?;
    let bells = Arc::new(Bells::new(
        client.clone(),
        redis.key_base(),
        format!("runlane-bell:{}:{origin}", config_prefix),
    ));
    let wake = Arc::new(Wake::new(lead.clone(), origin));
    {
        let wake = Arc::downgrade(&wake);
        redis.on_rebuilt(move |effects| {
            if let Some(wake) = wake.upgrade() {
                wake.note_rebuilt(&effects);
            }
        });
    }
    spawn_publisher(
        wake.clone(),
        shared.clone(),
        channels.clone(),
        Arc::downgrade(&redis),
    );
    let queue = Arc::new(
        DistributedQueue::new(
            redis,
            store.clone(),
            config.mark_linger.min(config.reconcile.grace / 2),
        )
        .with_wake(wake.clone())
        .with_bells(bells.clone()),
    );
    let engine = builder
        .open(queue.clone() as Arc<dyn QueueBackend>, Arc::new(run_store))
        .await?;
    bells.set_engine(engine.downgrade());
    {
        let wake = wake.clone();
        engine.tap_statuses(Arc::new(move |event| wake.note_event(event)));
    }
    let stop = Arc::new(Notify::new());
    let now = {
        let weak = engine.downgrade();
        move || weak.upgrade().map_or(Timestamp::ZERO, |e| e.now())
    };
    let enqueue = {
        let weak = engine.downgrade();
        let queue = Arc::downgrade(&queue);
        let stop = stop.clone();
        move |records: Vec<RunRecord>| {
            let engine = weak.upgrade();
            let queue = queue.upgrade();
            let stop = stop.clone();
            async move {
                let (Some(engine), Some(queue)) = (engine, queue) else {
                    // The engine is gone: end the reconciler.
                    stop.notify_one();
                    return Err("the engine is gone".to_string());
                };
                // A run whose cancel was requested is ended, not run: the cancel is applied
                // again (the requesting process may have died before the terminal write).
                let (cancelled, records): (Vec<RunRecord>, Vec<RunRecord>) = records
                    .into_iter()
                    .partition(|r| r.cancel_requested_at.is_some());
                let mut ended = Vec::with_capacity(cancelled.len());
                for record in &cancelled {
                    match engine.recover_requested_cancel(record).await {
                        Ok(()) => ended.push(record.id),
                        Err(e) => {
                            tracing::warn!(run = %record.id, error = %e, "requested cancel not applied again")
                        }
                    }
                }
                if records.is_empty() {
                    return Ok(ended);
                }
                let (confirmed, effects) = queue.reconcile(records, engine.now()).await;
                engine.apply_effects(effects).await;
                confirmed.map(|mut ids| {
                    ids.extend(ended);
                    ids
                })
            }
        }
    };
    spawn_reconciler(store.clone(), config.reconcile, now, enqueue, stop.clone());
    let subscriber = spawn_subscriber(client.clone(), channels, engine.downgrade(), wake);
    let lead_task = spawn_lead(lead.clone(), shared.clone(), engine.downgrade());
    Ok(Distributed {
        engine,
        queue,
        store,
        stop,
        subscriber,
        lead,
        lead_task,
        shared,
        bells,
    })
}
