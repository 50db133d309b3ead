//! The conformance suite on the distributed shape's wiring: [`DistributedQueue`] (Redis, with
//! the queue side of the store-first protocol: lazy `in_queue` marks, deferral to the
//! reconciler when Redis fails) over [`DistributedStore`] (PostgreSQL). The same scenarios as
//! every backend, unchanged, one Redis key prefix and one PostgreSQL schema per scenario, both
//! removed when the scenario's engine is dropped. Redis (`RUNLANE_REDIS_URL`) and PostgreSQL
//! (`RUNLANE_DATABASE_URL`) are required: a missing server fails the tests.
//!
//! The reconciler task is not started here (the kit opens the engine itself and a scenario
//! never loses an enqueue); `distributed_reconcile.rs` exercises it.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::{QueueBackend, RunStore};
use runlane::{DistributedQueue, DistributedStore, PostgresConfig, PostgresStore, RedisQueue};

const SCHEMA_PREFIX: &str = "rlt_dist_";

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh prefix and schema per scenario.
struct Distributed;

#[async_trait::async_trait]
impl runlane_conformance::Backends for Distributed {
    fn name(&self) -> &'static str {
        "distributed"
    }

    async fn open(&self) -> (Arc<dyn QueueBackend>, Arc<dyn RunStore>) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut config = PostgresConfig::new(database_url());
        config.schema = format!("{SCHEMA_PREFIX}{}_{n}", std::process::id());
        config.pool_size = 4;
        config.writers = 1;
        let store = match PostgresStore::open(config).await {
            Ok(store) => Arc::new(store),
            Err(e) => panic!("postgresql is required (RUNLANE_DATABASE_URL): {e}"),
        };
        let redis = RedisQueue::open(redis_support::fresh_config("dist"))
            .await
            .expect("redis must be reachable (set RUNLANE_REDIS_URL)")
            .delete_keys_on_drop();
        redis.attach_store(store.clone());
        let queue = DistributedQueue::new(Arc::new(redis), store.clone(), Duration::from_millis(1));
        let run_store = DistributedStore::new(store).drop_schema_on_drop(database_url());
        (Arc::new(queue), Arc::new(run_store))
    }
}

runlane_conformance::conformance_suite!(Distributed);

/// Without the shape's doorbell readers nothing would deliver a lease an enqueue made for a
/// parked offer (the workloop would start it only at its offer's refresh): such a queue parks
/// none. (With the readers, `distributed_bells.rs` shows deliveries starting runs.)
#[tokio::test]
async fn a_queue_without_doorbell_readers_parks_no_offers() {
    use runlane_conformance::Backends;
    let (queue, _store) = Distributed.open().await;
    assert!(queue.claims_on_enqueue(), "it still claims on enqueue");
    assert!(
        !queue.parks_offers(),
        "no reader delivers parked offers' leases"
    );
}
