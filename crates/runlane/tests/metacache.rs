//! The task metadata cache (SPEC §4) on the embedded shape (in-process level only) and the
//! distributed one (in-process level in front of the shared Redis level):
//!
//! - a warm trigger reads no metadata from the store (a counting store wrapper);
//! - a miss reads the store once and back-fills (1, then 0);
//! - a `lock_to_version` trigger reads the by-version keyspace;
//! - the promotion race, driven by a store wrapper that parks the back-fill's store read
//!   while a promotion completes: the newer version stays;
//! - an empty version clears the env-current entries;
//! - a promotion in one engine reaches another one's next trigger (on its announcement);
//! - an unreachable cache Redis never fails a trigger.
//!
//! Redis (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required for the
//! distributed tests; each uses its own key prefix and schema, removed on drop.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runlane::core::backend::forward::{Forward, StoreHook, StoreOp};
use runlane::core::backend::RunStore;
use runlane::core::metacache::SharedMetaCache;
use runlane::core::{EnvName, EnvSettings, TaskDef, TaskName, Timestamp, VersionDef};
use runlane::{
    DistributedConfig, DistributedStore, Engine, EngineBuilder, PostgresConfig, PostgresStore,
    RedisMetaCache, RedisMetaConfig, RedisQueue, SqliteConfig,
};
use runlane_memory::{MemoryConfig, MemoryQueue};
use tokio::sync::oneshot;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// How long a test waits for an event before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store read parked until the test releases it: (entered, release).
type Park = (oneshot::Sender<()>, oneshot::Receiver<()>);

/// A run store that counts metadata reads (`envs`, `version`, `current_version`, `versions`,
/// `current_definition`) and can park the next `current_definition` after it read.
type Counting = Forward<MetaReads>;

/// The hook of [`Counting`].
#[derive(Default)]
struct MetaReads {
    meta_reads: AtomicU64,
    park: Mutex<Option<Park>>,
}

fn counting(inner: Arc<dyn RunStore>) -> Arc<Counting> {
    Arc::new(Forward::new(inner, MetaReads::default()))
}

impl MetaReads {
    fn reads(&self) -> u64 {
        self.meta_reads.load(Ordering::SeqCst)
    }

    fn reset(&self) {
        self.meta_reads.store(0, Ordering::SeqCst);
    }

    /// Parks the next `current_definition` once it has read the store: answers (entered,
    /// release).
    fn arm(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (entered_tx, entered_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.park.lock().expect("park") = Some((entered_tx, release_rx));
        (entered_rx, release_tx)
    }
}

#[async_trait]
impl StoreHook for MetaReads {
    async fn before(&self, op: StoreOp<'_>) {
        if matches!(
            op,
            StoreOp::Envs
                | StoreOp::Version(..)
                | StoreOp::CurrentVersion(_)
                | StoreOp::Versions(_)
                | StoreOp::CurrentDefinition(_)
        ) {
            self.meta_reads.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn after(&self, op: StoreOp<'_>) {
        if !matches!(op, StoreOp::CurrentDefinition(_)) {
            return;
        }
        let park = self.park.lock().expect("park").take();
        if let Some((entered, release)) = park {
            let _ = entered.send(());
            let _ = release.await;
        }
    }
}

fn task(name: &str, ttl_secs: u64) -> TaskDef {
    let mut def = TaskDef::new(TaskName::new(name).expect("task name"));
    def.ttl = Some(Duration::from_secs(ttl_secs));
    def
}

fn version(tasks: Vec<TaskDef>) -> VersionDef {
    VersionDef { tasks }
}

/// An embedded engine (memory queue, SQLite store) over a counting store.
async fn embedded() -> (Engine, Arc<Counting>) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("metacache")
        .join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sqlite = runlane::open_sqlite(dir.join("runs.db"), SqliteConfig::default())
        .await
        .expect("open sqlite");
    let store = counting(sqlite);
    let engine = EngineBuilder::new()
        .open(
            Arc::new(MemoryQueue::new(MemoryConfig::default())),
            store.clone(),
        )
        .await
        .expect("open the embedded engine");
    (engine, store)
}

/// One deployment's names: the Redis prefix and the PostgreSQL schema.
struct Deployment {
    prefix: String,
    schema: String,
}

impl Deployment {
    fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Deployment {
            prefix: redis_support::fresh_prefix(tag),
            schema: format!("rlt_meta_{tag}_{}_{n}", std::process::id()),
        }
    }

    /// A cache handle for key names (never listens).
    fn probe(&self) -> RedisMetaCache {
        RedisMetaCache::new(RedisMetaConfig::new(redis_support::url(), &self.prefix))
            .expect("cache config")
    }

    /// An engine of the distributed kind (Redis queue, PostgreSQL store, the shared Redis
    /// cache) over a counting store; `throwaway` removes the prefix and schema on drop.
    async fn engine(&self, throwaway: bool) -> (Engine, Arc<Counting>) {
        let mut pg = PostgresConfig::new(database_url());
        pg.schema = self.schema.clone();
        pg.pool_size = 4;
        let pg = Arc::new(
            PostgresStore::open(pg)
                .await
                .unwrap_or_else(|e| panic!("postgresql is required: {e}")),
        );
        let mut store = DistributedStore::new(pg.clone());
        let mut config = redis_support::fresh_config("meta");
        config.prefix = self.prefix.clone();
        let mut queue = RedisQueue::open(config)
            .await
            .unwrap_or_else(|e| panic!("redis is required: {e}"));
        if throwaway {
            store = store.drop_schema_on_drop(database_url());
            queue = queue.delete_keys_on_drop();
        }
        queue.attach_store(pg);
        let store = counting(Arc::new(store));
        let cache = RedisMetaCache::new(RedisMetaConfig::new(redis_support::url(), &self.prefix))
            .expect("cache config");
        let engine = EngineBuilder::new()
            .shared_meta_cache(Arc::new(cache))
            .open(Arc::new(queue), store.clone())
            .await
            .expect("open the engine");
        (engine, store)
    }
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_support::url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis is required")
}

async fn stamp(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(runlane::STAMP_FIELD)
        .query_async(conn)
        .await
        .expect("HGET")
}

/// Registers and promotes `def` in `env`; answers its number.
async fn deploy(engine: &Engine, env: &str, def: VersionDef) -> u32 {
    let n = engine.register_version(env, def).await.expect("register");
    engine.promote(env, n).await.expect("promote");
    n
}

/// Warm, then cold: the checks shared by both shapes. Answers the env created cold.
async fn warm_and_cold(engine: &Engine, store: &Counting) {
    engine
        .set_env("warm", EnvSettings::default())
        .await
        .expect("env");
    let v1 = deploy(engine, "warm", version(vec![task("t", 60)])).await;
    // Warm: no metadata read, locked or not.
    store.hook().reset();
    for _ in 0..3 {
        let run = engine
            .trigger("t")
            .env("warm")
            .send()
            .await
            .expect("trigger")
            .run;
        assert_eq!((run.version, run.ttl), (v1, Some(Duration::from_secs(60))));
    }
    let locked = engine
        .trigger("t")
        .env("warm")
        .lock_to_version(v1)
        .send()
        .await
        .expect("locked trigger")
        .run;
    assert!(locked.locked);
    assert_eq!(
        store.hook().reads(),
        0,
        "a warm trigger read metadata from the store"
    );

    // Cold: a version promoted behind the engine's back in a new env.
    engine
        .set_env("cold", EnvSettings::default())
        .await
        .expect("env");
    let env = EnvName::new("cold").expect("env name");
    let n = store
        .inner()
        .add_version(&env, version(vec![task("t", 30)]), Timestamp::ZERO)
        .await
        .expect("add version");
    store.inner().promote(&env, n).await.expect("promote");
    store.hook().reset();
    let run = engine
        .trigger("t")
        .env("cold")
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!((run.version, run.ttl), (n, Some(Duration::from_secs(30))));
    assert_eq!(store.hook().reads(), 1, "a miss reads the store once");
    engine
        .trigger("t")
        .env("cold")
        .send()
        .await
        .expect("trigger");
    assert_eq!(store.hook().reads(), 1, "the miss back-filled the cache");
}

#[tokio::test]
async fn embedded_warm_trigger_reads_no_metadata_and_a_miss_reads_once() {
    let (engine, store) = embedded().await;
    warm_and_cold(&engine, &store).await;
}

#[tokio::test]
async fn distributed_warm_trigger_reads_no_metadata_and_a_miss_reads_once() {
    let d = Deployment::new("warm");
    let (engine, store) = d.engine(true).await;
    warm_and_cold(&engine, &store).await;
    // The miss back-filled the shared level: its owner stamp is the version read.
    let mut conn = redis_conn().await;
    let env = EnvName::new("cold").expect("env name");
    assert_eq!(
        stamp(&mut conn, &d.probe().current_key(&env))
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn a_locked_trigger_reads_the_by_version_keyspace() {
    let d = Deployment::new("locked");
    let (a, _) = d.engine(false).await;
    let v1 = deploy(&a, "default", version(vec![task("t", 11)])).await;
    let v2 = deploy(&a, "default", version(vec![task("t", 22)])).await;
    let env = EnvName::new("default").expect("env name");
    let key = d.probe().version_key(&env, v1);
    let mut conn = redis_conn().await;
    // Shorten the entry's expiry: a read slides it back to the full by-version TTL.
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("PEXPIRE");

    // A second engine (its in-process level cold) on the same deployment.
    let (b, store) = d.engine(true).await;
    store.hook().reset();
    let run = b
        .trigger("t")
        .lock_to_version(v1)
        .send()
        .await
        .expect("locked trigger")
        .run;
    assert_eq!((run.version, run.locked), (v1, true));
    assert_eq!(run.ttl, Some(Duration::from_secs(11)));
    assert_eq!(
        store.hook().reads(),
        0,
        "the locked version came from the cache"
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        pttl > 24 * 3600 * 1000,
        "the by-version entry was read (its expiry slid): {pttl} ms"
    );
    let current = b.trigger("t").send().await.expect("trigger").run;
    assert_eq!(current.version, v2);
    drop(a);
}

/// The race: a trigger's back-fill reads version 1 from the store and is parked; the
/// promotion to 2 completes; the back-fill lands. Answers (engine, store) for more checks.
async fn promotion_race(engine: &Engine, store: &Counting) -> (u32, u32) {
    engine
        .set_env("race", EnvSettings::default())
        .await
        .expect("env");
    let v1 = engine
        .register_version("race", version(vec![task("t", 10)]))
        .await
        .expect("register 1");
    let v2 = engine
        .register_version("race", version(vec![task("t", 20)]))
        .await
        .expect("register 2");
    // Version 1 promoted behind the engine's back: its caches know nothing of env `race`.
    let env = EnvName::new("race").expect("env name");
    store.inner().promote(&env, v1).await.expect("promote 1");

    let (entered, release) = store.hook().arm();
    let trigger = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.trigger("t").env("race").send().await })
    };
    tokio::time::timeout(PATIENCE, entered)
        .await
        .expect("the back-fill's store read never happened")
        .expect("parked");
    engine.promote("race", v2).await.expect("promote 2");
    release.send(()).expect("release");
    let raced = tokio::time::timeout(PATIENCE, trigger)
        .await
        .expect("the parked trigger never ended")
        .expect("join")
        .expect("trigger")
        .run;
    // It read version 1 before the promotion: that trigger may take 1.
    assert_eq!(raced.version, v1);
    let next = engine
        .trigger("t")
        .env("race")
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!(
        (next.version, next.ttl),
        (v2, Some(Duration::from_secs(20))),
        "the back-fill of version 1 overwrote the promotion to 2"
    );
    (v1, v2)
}

#[tokio::test]
async fn embedded_promotion_race_keeps_the_newer_version() {
    let (engine, store) = embedded().await;
    promotion_race(&engine, &store).await;
}

#[tokio::test]
async fn distributed_promotion_race_keeps_the_newer_version() {
    let d = Deployment::new("race");
    let (a, store) = d.engine(false).await;
    let (_, v2) = promotion_race(&a, &store).await;
    let env = EnvName::new("race").expect("env name");
    let mut conn = redis_conn().await;
    assert_eq!(
        stamp(&mut conn, &d.probe().current_key(&env)).await,
        Some(v2.to_string()),
        "the shared env-current entry lost the promotion"
    );
    // An engine with a cold in-process level reads the shared level: version 2.
    let (b, store_b) = d.engine(true).await;
    store_b.hook().reset();
    let run = b
        .trigger("t")
        .env("race")
        .send()
        .await
        .expect("trigger")
        .run;
    assert_eq!(run.version, v2);
    assert_eq!(store_b.hook().reads(), 0);
    drop(a);
}

#[tokio::test]
async fn an_empty_version_clears_env_current() {
    let d = Deployment::new("empty");
    let (a, _) = d.engine(false).await;
    let mut with_queue = task("t", 10);
    with_queue.queue = Some(runlane::core::QueueName::new("q1").expect("queue"));
    deploy(&a, "default", version(vec![with_queue])).await;
    let env = EnvName::new("default").expect("env name");
    let key = d.probe().current_key(&env);
    let mut conn = redis_conn().await;
    let fields: i64 = redis::cmd("HLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("HLEN");
    assert_eq!(fields, 2, "stamp and task t");
    let empty = deploy(&a, "default", VersionDef::default()).await;
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("HKEYS");
    assert_eq!(fields, vec![runlane::STAMP_FIELD.to_string()]);
    assert_eq!(stamp(&mut conn, &key).await, Some(empty.to_string()));
    // Both this engine and a cold one now resolve `t` without a definition.
    let (b, store_b) = d.engine(true).await;
    store_b.hook().reset();
    for engine in [&a, &b] {
        let run = engine.trigger("t").send().await.expect("trigger").run;
        assert_eq!(run.version, empty);
        assert_eq!(
            run.queue.as_str(),
            "t",
            "the old definition's queue is gone"
        );
        assert_eq!(run.ttl, None);
    }
    assert_eq!(store_b.hook().reads(), 0);
    drop(a);
}

fn shape_config(d: &Deployment, throwaway: bool) -> DistributedConfig {
    let mut config = DistributedConfig::new(redis_support::url(), database_url());
    config.redis.prefix = d.prefix.clone();
    config.postgres.schema = d.schema.clone();
    config.postgres.pool_size = 4;
    config.throwaway = throwaway;
    config
}

#[tokio::test]
async fn a_promotion_in_one_process_reaches_the_next_trigger_of_another() {
    let d = Deployment::new("procs");
    let a = runlane::distributed_with(EngineBuilder::new(), shape_config(&d, false))
        .await
        .expect("open a");
    let v1 = deploy(&a, "default", version(vec![task("t", 10)])).await;
    // A long staleness bound: only the announcement can make `b` see version 2 in time.
    let b = runlane::distributed_with(
        EngineBuilder::new().meta_max_age(Duration::from_secs(3600)),
        shape_config(&d, true),
    )
    .await
    .expect("open b");
    let mut heard = b.meta_announcements();
    tokio::time::timeout(PATIENCE, heard.wait_for(|w| w.subscribed >= 1))
        .await
        .expect("b never subscribed")
        .expect("watch");
    assert_eq!(
        b.trigger("t").send().await.expect("trigger").run.version,
        v1
    );
    let v2 = deploy(&a, "default", version(vec![task("t", 20)])).await;
    tokio::time::timeout(PATIENCE, heard.wait_for(|w| w.promotions >= 1))
        .await
        .expect("b never heard of the promotion")
        .expect("watch");
    let run = b.trigger("t").send().await.expect("trigger").run;
    assert_eq!((run.version, run.ttl), (v2, Some(Duration::from_secs(20))));
    a.shutdown().await;
    b.shutdown().await;
    drop(a);
}

#[tokio::test]
async fn an_unreachable_cache_never_fails_a_trigger() {
    // A loopback port nobody listens on (privileged: no test or service binds it).
    let port = 1;
    let d = Deployment::new("down");
    let mut config = shape_config(&d, true);
    config.meta_cache_url = Some(format!("redis://127.0.0.1:{port}"));
    let engine = runlane::distributed_with(EngineBuilder::new(), config)
        .await
        .expect("open with the cache down");
    let v1 = deploy(&engine, "default", version(vec![task("t", 10)])).await;
    let v2 = deploy(&engine, "default", version(vec![task("t", 20)])).await;
    let run = engine.trigger("t").send().await.expect("trigger").run;
    assert_eq!((run.version, run.ttl), (v2, Some(Duration::from_secs(20))));
    let locked = engine
        .trigger("t")
        .lock_to_version(v1)
        .send()
        .await
        .expect("locked trigger")
        .run;
    assert_eq!(
        (locked.version, locked.ttl),
        (v1, Some(Duration::from_secs(10)))
    );
    // Straight to the cache: it answers an error, which the engine only logs.
    let cache = RedisMetaCache::new(RedisMetaConfig::new(
        format!("redis://127.0.0.1:{port}"),
        &d.prefix,
    ))
    .expect("cache config");
    let env = EnvName::new("default").expect("env name");
    assert!(cache.current(&env).await.is_err());
    engine.shutdown().await;
}
