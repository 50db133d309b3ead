//! Redis going away: FLUSHALL under load (nothing lost, order kept), a killed server (calls fail
//! with `Unavailable`, then recover by themselves), an unreachable address at start, and a key
//! space of a foreign format. Everything that flushes or kills runs on a private server.

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use redis_support::PrivateRedis;
use runlane::core::backend::{ClaimRequest, QueueBackend, RunStore, ServedEnv};
use runlane::core::{ClaimChain, EnvName, EnvSettings, QueueError, RunId, Timestamp, WorkerId};
use runlane::{EngineBuilder, ManualClock, RedisConfig, RedisOpenError, RedisQueue};
use runlane_memory::MemoryStore;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn config(url: String, prefix: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url).with_prefix(prefix);
    c.response_timeout = Duration::from_secs(2);
    c
}

fn claim_one() -> ClaimRequest {
    ClaimRequest {
        worker: WorkerId(7),
        chain: ClaimChain::default_chain(),
        max: 1,
        envs: vec![ServedEnv {
            env: EnvName::new("default").expect("env"),
            version: 0,
        }],
        lease: Duration::from_secs(60),
    }
}

/// Takes every run out one at a time (claim, finish) and returns the order.
async fn drain_order(queue: &RedisQueue) -> Vec<RunId> {
    let mut order = Vec::new();
    loop {
        let got = queue.claim(&claim_one(), T0).await.expect("claim");
        let Some(leased) = got.into_iter().next() else {
            return order;
        };
        order.push(leased.dispatch.run_id);
        queue
            .finish(leased.dispatch.run_id, leased.token, T0)
            .await
            .expect("finish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_under_load_loses_nothing_and_keeps_order() {
    const RUNS: usize = 1000;
    let server = PrivateRedis::start("flush");
    let store: Arc<dyn RunStore> = Arc::new(MemoryStore::new());
    let queue = Arc::new(
        RedisQueue::open(config(server.url(), "rl:flush"))
            .await
            .expect("open"),
    );
    queue.attach_store(store.clone());
    let clock = Arc::new(ManualClock::new(T0));
    let engine = EngineBuilder::new()
        .clock(clock)
        .open(queue.clone(), store.clone())
        .await
        .expect("engine");
    engine
        .set_env(
            "default",
            EnvSettings {
                limit: 1,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("limit 1");
    // Paused queues admit nothing, so every run waits in its queue key and the drain below sees
    // pure queue order (a fast-pathed first run would otherwise race the producers).
    for q in 0..5 {
        engine
            .pause_queue("default", &format!("q{q}"))
            .await
            .expect("pause");
    }

    // Two producers; the key space is flushed when half of the runs are in.
    let (half_tx, half_rx) = tokio::sync::oneshot::channel::<()>();
    let half_tx = Arc::new(std::sync::Mutex::new(Some(half_tx)));
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut producers = Vec::new();
    for p in 0..2 {
        let engine = engine.clone();
        let counter = counter.clone();
        let half_tx = half_tx.clone();
        producers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..RUNS / 2 {
                let run = engine
                    .trigger("job")
                    .queue(&format!("q{}", (p * 7 + i) % 5))
                    .send()
                    .await
                    .expect("trigger");
                ids.push((run.run.id, run.run.queue.to_string()));
                if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == RUNS / 2 {
                    if let Some(tx) = half_tx.lock().expect("lock").take() {
                        let _ = tx.send(());
                    }
                }
            }
            ids
        }));
    }
    half_rx.await.expect("half of the runs triggered");
    server.flushall();
    let mut triggered = Vec::new();
    for p in producers {
        triggered.extend(p.await.expect("producer"));
    }
    assert_eq!(triggered.len(), RUNS);

    let snapshot = queue.snapshot().await.expect("snapshot after the flush");
    assert_eq!(
        snapshot.len(),
        RUNS,
        "lost {} runs after FLUSHALL",
        RUNS - snapshot.len()
    );
    assert!(queue.health().rebuilds >= 1, "the loss was detected");

    // Same run_after and priority for all: within each queue the order must be id order.
    for q in 0..5 {
        engine
            .resume_queue("default", &format!("q{q}"))
            .await
            .expect("resume (the paused settings survived the rebuild)");
    }
    let order = drain_order(&queue).await;
    assert_eq!(order.len(), RUNS, "every run is claimed once");
    let mut by_queue: std::collections::BTreeMap<String, Vec<RunId>> = Default::default();
    let queue_of: std::collections::HashMap<RunId, String> = triggered.iter().cloned().collect();
    for id in &order {
        by_queue
            .entry(queue_of.get(id).cloned().unwrap_or_default())
            .or_default()
            .push(*id);
    }
    for (q, ids) in &by_queue {
        let inversions = ids.windows(2).filter(|w| w[0] > w[1]).count();
        assert_eq!(inversions, 0, "queue {q} kept its order");
    }
    eprintln!(
        "flushall under load: runs {RUNS}, lost {}, order kept in {} queues, rebuilds {}",
        RUNS - order.len(),
        by_queue.len(),
        queue.health().rebuilds
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_fast_then_recovers_by_itself() {
    let mut server = PrivateRedis::start("kill");
    let store: Arc<dyn RunStore> = Arc::new(MemoryStore::new());
    let queue = RedisQueue::open(config(server.url(), "rl:kill"))
        .await
        .expect("open");
    queue.attach_store(store.clone());
    let env = EnvName::new("default").expect("env");
    queue
        .put_env(&env, EnvSettings::default(), T0)
        .await
        .expect("env");
    assert!(queue.health().connected);

    server.kill();
    let err = queue.env_usage(&env).await.expect_err("server is gone");
    assert!(
        matches!(err, QueueError::Unavailable(_)),
        "an outage is Unavailable, got {err:?}"
    );
    assert!(!queue.health().connected, "health reports the outage");
    assert!(queue.health().last_error.is_some());
    let again = queue.env_usage(&env).await.expect_err("still gone");
    assert!(
        again.to_string().contains("fail fast"),
        "a call while the link is known down fails at once: {again}"
    );

    server.restart();
    // While the link is down calls fail fast; the backend's probe pings the server over the
    // reconnecting connection and marks it up once it answers.
    let mut recovered = None;
    for _ in 0..3000 {
        match queue.env_usage(&env).await {
            Ok(usage) => {
                recovered = Some(usage);
                break;
            }
            Err(QueueError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    let usage = recovered.expect("calls succeed again once the server is back");
    assert_eq!(usage.running, 0);
    assert!(queue.health().connected, "health reports the recovery");
    assert!(
        queue.health().rebuilds >= 1,
        "the empty restarted server was detected and rebuilt"
    );
}

#[tokio::test]
async fn unreachable_address_is_named() {
    let err = RedisQueue::open(config("redis://127.0.0.1:1".to_string(), "rl:x"))
        .await
        .err()
        .expect("nothing listens on port 1");
    let text = err.to_string();
    assert!(matches!(err, RedisOpenError::Unreachable { .. }), "{err:?}");
    assert!(
        text.contains("127.0.0.1:1"),
        "message names the address: {text}"
    );
}

#[tokio::test]
async fn foreign_format_is_refused_naming_both_versions() {
    let server = PrivateRedis::start("fmt");
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client.get_connection().expect("connection");
    redis::cmd("HSET")
        .arg("{rl:fmt}:cfg")
        .arg("fmt")
        .arg("99")
        .arg("gen")
        .arg("x")
        .query::<()>(&mut conn)
        .expect("plant a foreign key space");
    let err = RedisQueue::open(config(server.url(), "rl:fmt"))
        .await
        .err()
        .expect("format 99 is refused");
    let text = err.to_string();
    assert!(matches!(err, RedisOpenError::Format { .. }), "{err:?}");
    let ours = format!("version {}", runlane_redis::KEYSPACE_FORMAT);
    assert!(text.contains("99") && text.contains(&ours), "{text}");
    let fmt: String = redis::cmd("HGET")
        .arg("{rl:fmt}:cfg")
        .arg("fmt")
        .query(&mut conn)
        .expect("read back");
    assert_eq!(fmt, "99", "the foreign key space is left untouched");
}

#[tokio::test]
async fn bad_prefix_is_refused() {
    let err = RedisQueue::open(config("redis://127.0.0.1:1".to_string(), "a{b}"))
        .await
        .err()
        .expect("braces break the hash tag");
    assert!(matches!(err, RedisOpenError::Prefix(_)), "{err:?}");
}
