//! Cron schedules across processes: two engines of the distributed shape on one key prefix and
//! schema (each with its own connections, tasks and scheduler, as two processes would) and one
//! shared `ManualClock` make exactly one run per tick. One engine promotes the version; the
//! other re-plans on the promotion's announcement. At each tick both fire (one run: the tick's
//! idempotency key) and both go on to arm the next tick (the cursor moved once).
//!
//! Redis (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::{RunFilter, RunRecord};
use runlane::core::{Timestamp, TriggerSource, VersionDef};
use runlane::{Clock, DistributedConfig, Engine, EngineBuilder, ManualClock};
use serde_json::json;

static NEXT: AtomicU64 = AtomicU64::new(0);

const EPOCH: Timestamp = Timestamp(1_700_000_000_000);
const BOUND: Duration = Duration::from_secs(20);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn open(
    prefix: &str,
    schema: &str,
    throwaway: bool,
    clock: &Arc<ManualClock>,
) -> runlane::Distributed {
    let mut config = DistributedConfig::new(redis_support::url(), database_url());
    config.redis.prefix = prefix.to_string();
    config.postgres.schema = schema.to_string();
    config.postgres.pool_size = 4;
    config.throwaway = throwaway;
    let builder = EngineBuilder::new().clock(clock.clone() as Arc<dyn Clock>);
    match runlane::distributed_with(builder, config).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    }
}

/// Waits until `n` sleepers are parked on `clock` until exactly `at` (each engine's scheduler
/// armed for that tick).
async fn armed(clock: &ManualClock, at: Timestamp, n: usize) {
    let parked = async {
        while clock.sleeping_until().iter().filter(|t| **t == at).count() < n {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(BOUND, parked)
        .await
        .unwrap_or_else(|_| panic!("{n} sleepers at {at} within {BOUND:?}"));
}

async fn scheduled_runs(engine: &Engine) -> Vec<RunRecord> {
    let filter = RunFilter {
        source: Some(TriggerSource::Scheduled),
        ..Default::default()
    };
    engine.list(&filter).await.expect("list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_make_exactly_one_run_per_tick() {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = redis_support::fresh_prefix("sched");
    let schema = format!("rlt_sched_{}_{n}", std::process::id());
    let clock = Arc::new(ManualClock::new(EPOCH));
    let a = open(&prefix, &schema, false, &clock).await;
    let b = open(&prefix, &schema, true, &clock).await;

    // Second 7 of every minute: EPOCH is 22:13:20, so ticks at +47 s, +107 s, ...
    let at = |s: u64| EPOCH.saturating_add(Duration::from_secs(s));
    let def: VersionDef = serde_json::from_value(json!({"tasks": [
        {"name": "report", "schedules": [{"cron": "7 * * * * *"}]}
    ]}))
    .expect("definition");
    let v = a
        .engine()
        .register_version("default", def)
        .await
        .expect("register");
    a.engine().promote("default", v).await.expect("promote");
    // A plans at its own promotion, B at the announcement of it.
    armed(&clock, at(47), 2).await;

    for (round, (tick, next)) in [(at(47), at(107)), (at(107), at(167))]
        .into_iter()
        .enumerate()
    {
        clock.set(tick);
        // Both fired and both re-planned from the moved cursor.
        armed(&clock, next, 2).await;
        let runs = scheduled_runs(a.engine()).await;
        assert_eq!(runs.len(), round + 1, "exactly one run per tick: {runs:?}");
        let fired =
            a.engine().metrics().schedule_ticks_fired + b.engine().metrics().schedule_ticks_fired;
        assert_eq!(
            fired,
            round as u64 + 1,
            "one process counts each tick as fired; the other's trigger was an idempotency hit"
        );
        let key = format!("schedule:report:0:{}", tick.as_millis());
        assert_eq!(runs[round].idempotency_key.as_deref(), Some(key.as_str()));
        for engine in [a.engine(), b.engine()] {
            let info = engine.schedules("default").await.expect("schedules");
            assert_eq!(
                (info[0].last_tick, info[0].next_tick),
                (Some(tick), Some(next))
            );
        }
    }
    b.shutdown().await;
    a.shutdown().await;
}
