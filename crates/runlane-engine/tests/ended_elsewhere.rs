//! A run another process ended (its terminal status heard through
//! `Engine::publish_status_from_elsewhere`) is never started here from the hand-over its
//! trigger left, even when a stale copy of it comes back into the queue.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{finished, open_on, T0};
use runlane_core::backend::{ClaimRequest, EnqueueAs, QueueBackend, RunStore, ServedEnv};
use runlane_core::chain::ClaimChain;
use runlane_core::{EnvName, RunStatus, WorkerId};
use runlane_engine::RunContext;
use runlane_memory::{MemoryConfig, MemoryQueue, MemoryStore};
use serde_json::json;

/// Process A triggers R (its hand-over keeps R's payload); "process B" claims R, completes it
/// in the store and acks it (done here on the shared backends directly) and A hears the end;
/// then a recovery that read R as unfinished earlier enqueues it again. A's worker claims the
/// stale copy: it must read the store (R is completed) and not run it. Before, the hand-over
/// entry was still there and R ran a second time.
#[tokio::test]
async fn a_run_that_ended_elsewhere_is_not_run_from_the_hand_over() {
    let queue = Arc::new(MemoryQueue::new(MemoryConfig::default()));
    let store = Arc::new(MemoryStore::new());
    let (engine, _clock) = open_on(queue.clone(), store.clone()).await;
    let run = engine.trigger("job").send().await.expect("trigger").run;

    // Elsewhere: claimed, completed in the store, acked.
    let env = EnvName::new("default").expect("env");
    let request = ClaimRequest {
        worker: WorkerId(99),
        chain: ClaimChain::default_chain(),
        max: 1,
        envs: vec![ServedEnv {
            env: env.clone(),
            version: 0,
        }],
        lease: Duration::from_secs(30),
    };
    let leases = queue.claim(&request, T0).await.expect("claim");
    let lease = leases.first().expect("the run");
    store
        .finish(
            run.id,
            RunStatus::Completed,
            Some(Arc::from("\"elsewhere\"")),
            None,
            T0,
        )
        .await
        .expect("finish");
    queue.finish(run.id, lease.token, T0).await.expect("ack");
    engine.publish_status_from_elsewhere(run.id, &env, RunStatus::Completed, 1, T0);

    // A stale re-enqueue of the finished run (a recovery's older read), then a marker run.
    queue
        .enqueue(run.dispatch(), EnqueueAs::Trigger, T0)
        .await
        .expect("stale enqueue");
    let marker = engine.trigger("job").send().await.expect("marker").run.id;
    let ran = Arc::new(Mutex::new(Vec::new()));
    let seen = ran.clone();
    let worker = engine
        .worker()
        .workloops("*:1")
        .handler("job", move |ctx: RunContext| {
            seen.lock().expect("ran").push(ctx.run_id());
            async move { Ok(json!("here")) }
        })
        .start()
        .await
        .expect("worker");
    assert_eq!(finished(&engine, marker).await.status, RunStatus::Completed);
    worker.stop().await;
    assert_eq!(
        *ran.lock().expect("ran"),
        vec![marker],
        "only the marker ran here: the run that ended elsewhere did not run again"
    );
    let done = finished(&engine, run.id).await;
    assert_eq!(done.output.as_deref(), Some("\"elsewhere\""));
}
