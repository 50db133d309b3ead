//! Batch triggers (distributed): a batch's runs are enqueued together (Redis's combined enqueue:
//! one script call for the first run and one per 256 of the others, instead of a round trip per
//! run), placed in batch order, and a batch refused part-way is taken back whole. Redis
//! (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required: a missing one
//! fails the test.

mod redis_support;
mod reporting;

use std::time::Duration;

use reporting::reporting_worker;
use runlane::core::backend::RunFilter;
use runlane::core::{QueueName, QueueSettings, RunId};
use runlane::{Distributed, EngineError, TriggerRequest};

async fn open(tag: &str) -> Distributed {
    let config = redis_support::distributed_config(redis_support::url(), tag);
    redis_support::open_distributed(config).await
}

fn requests(n: usize, queue: &str) -> Vec<TriggerRequest> {
    (0..n)
        .map(|_| {
            let mut r = TriggerRequest::new("job").expect("request");
            r.queue = Some(QueueName::new(queue).expect("queue name"));
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_enqueued_together_and_runs_in_batch_order() {
    let engine = open("batchorder").await;
    let before = engine.queue().redis().enqueue_calls();
    let out = engine
        .trigger_batch(requests(300, "default"))
        .await
        .expect("batch");
    let calls = engine.queue().redis().enqueue_calls() - before;
    // The first run alone, then the other 299 in batches of at most 256 (one run per call
    // before the enqueues were made together: 300).
    assert!(calls <= 3, "300 runs enqueued in {calls} script calls");
    let ids: Vec<RunId> = out.iter().map(|t| t.run.id).collect();
    // One slot: the runs start in the order they were placed.
    let (worker, mut started) = reporting_worker(&engine, "default:1").await;
    for (i, want) in ids.iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), started.recv())
            .await
            .expect("started in time");
        assert_eq!(got, Some(*want), "run {i} of the batch");
    }
    // With the workloop idle (its slot offered to this process's triggers), the batch's first
    // run is leased in its own enqueue and the others are placed after it, in order.
    redis_support::until_idle_offers(&engine, 1, "the workloop goes idle").await;
    let claimed_before = engine.metrics().claimed_on_enqueue;
    let out = engine
        .trigger_batch(requests(50, "default"))
        .await
        .expect("batch");
    assert_eq!(engine.metrics().claimed_on_enqueue, claimed_before + 1);
    for (i, t) in out.iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), started.recv())
            .await
            .expect("started in time");
        assert_eq!(got, Some(t.run.id), "run {i} of the batch made while idle");
    }
    worker.stop().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_part_way_is_taken_back_whole() {
    let engine = open("batchrefused").await;
    engine
        .set_queue(
            "default",
            "mail",
            QueueSettings {
                max_queued: Some(3),
                paused: true,
                ..QueueSettings::default()
            },
        )
        .await
        .expect("queue");
    match engine.trigger_batch(requests(6, "mail")).await {
        Err(EngineError::BatchItem { index, source }) => {
            assert_eq!(index, 3, "the first run over the cap");
            assert!(
                matches!(*source, EngineError::QueueFull { max_queued: 3, .. }),
                "{source:?}"
            );
        }
        other => panic!("expected the fourth run to be refused, got {other:?}"),
    }
    let stored = engine.list(&RunFilter::default()).await.expect("list");
    assert!(stored.is_empty(), "stored after the refusal: {stored:?}");
    let queues = engine.queues("default").await.expect("queues");
    let mail = queues
        .iter()
        .find(|q| q.name.as_str() == "mail")
        .expect("mail queue");
    assert_eq!(
        (mail.queued, mail.running),
        (0, 0),
        "the placed runs were taken back"
    );
    // The queue takes a batch that fits.
    let kept = engine
        .trigger_batch(requests(3, "mail"))
        .await
        .expect("a batch that fits");
    assert_eq!(kept.len(), 3);
    engine.shutdown().await;
}
