//! Idempotency keys across the processes of a distributed deployment: a trigger whose
//! enqueue is refused takes its stored run back, unless a trigger of another process was
//! handed that run through the key meanwhile; then the run stays (enqueued past its queue's
//! cap) and runs, so a caller is never answered with a run that then vanishes. Redis
//! (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required.

mod redis_support;
mod run_counter;

use std::collections::HashSet;

use run_counter::{counting_worker, Executions};
use runlane::core::{RunId, RunStatus};
use runlane::EngineError;

/// Keys each triggered by both processes at once, at most: the loop ends once `MET` pairs met
/// (one stored the run, the other was handed it).
const KEYS: usize = 400;
const MET: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_handed_to_another_process_outlives_its_triggers_refusal() {
    let (a, b) = redis_support::two_processes("keys_refused").await;
    // Queue `job` paused and holding one run at its cap of one: every new run is refused.
    redis_support::cap_job_queue_paused(&a, 1).await;
    let filler = a
        .trigger("job")
        .send()
        .await
        .expect("fills the queue")
        .run
        .id;
    match b.trigger("job").send().await {
        Err(EngineError::QueueFull { .. }) => {}
        other => panic!("the other process finds the queue full: {other:?}"),
    }

    let mut answered: Vec<RunId> = Vec::new();
    let mut refused = 0;
    let mut tried = 0;
    for k in 0..KEYS {
        if answered.len() >= MET {
            break;
        }
        tried += 1;
        let key = format!("key-{k}");
        let (from_a, from_b) = tokio::join!(
            a.trigger("job").idempotency_key(&key).send(),
            b.trigger("job").idempotency_key(&key).send()
        );
        let mut named = HashSet::new();
        for (who, answer) in [("a", from_a), ("b", from_b)] {
            match answer {
                Ok(triggered) => {
                    let run = triggered.run.id;
                    let record = a.get(run).await.unwrap_or_else(|e| {
                        panic!("{key}: process {who} was answered run {run}, which is gone: {e}")
                    });
                    assert!(!record.status.is_terminal(), "{key}: {run} waits");
                    named.insert(run);
                    answered.push(run);
                }
                Err(EngineError::QueueFull { .. }) => refused += 1,
                Err(e) => panic!("{key}: process {who}: {e}"),
            }
        }
        assert!(named.len() <= 1, "{key}: one key, one run: {named:?}");
    }
    // Each pair either met (one stored, the other handed its run, the run kept) or did not
    // (both refused): the first kind is what this test is about.
    assert!(
        !answered.is_empty(),
        "no trigger was handed a run ({refused} refusals): the race never happened"
    );

    // The kept runs are in the queue: resumed, every answered run completes once.
    let runs = Executions::default();
    let worker = counting_worker(a.worker(), &runs).await;
    a.resume_queue("default", "job").await.expect("resume");
    let mut expected: Vec<RunId> = answered.clone();
    expected.push(filler);
    expected.sort();
    expected.dedup();
    for run in &expected {
        let record = redis_support::finished(&a, *run).await;
        assert_eq!(record.status, RunStatus::Completed, "run {run}");
    }
    let executed = runs.lock().expect("lock").clone();
    for run in &expected {
        assert_eq!(executed.get(run), Some(&1), "run {run} executed once");
    }
    println!(
        "{tried} keys triggered by both processes: {} answers kept their run, {refused} refused",
        answered.len()
    );
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}
