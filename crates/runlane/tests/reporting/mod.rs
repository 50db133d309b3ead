//! Helpers of the distributed tests whose workers report each run they start (included as a
//! module by each test file that uses them).

#![allow(dead_code)] // each test file uses a different part of it

use std::time::Duration;

use runlane::core::{RunId, RunStatus};
use runlane::{Distributed, HandlerError, RunContext, WaitOutcome, Worker};
use serde_json::Value;
use tokio::sync::mpsc;

/// Long enough that no heartbeat or expiry wakes anything during a test.
pub const LEASE: Duration = Duration::from_secs(600);

/// A worker of `engine` with `workloops`, whose `job` handler reports each run it starts.
pub async fn reporting_worker(
    engine: &Distributed,
    workloops: &str,
) -> (Worker, mpsc::UnboundedReceiver<RunId>) {
    reporting_worker_leasing(engine, workloops, LEASE).await
}

/// [`reporting_worker`] with its own lease.
pub async fn reporting_worker_leasing(
    engine: &Distributed,
    workloops: &str,
    lease: Duration,
) -> (Worker, mpsc::UnboundedReceiver<RunId>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = engine
        .worker()
        .workloops(workloops)
        .lease(lease)
        .handler("job", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.run_id());
                Ok::<Value, HandlerError>(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, rx)
}

pub async fn trigger(engine: &Distributed, lane: &str) -> RunId {
    engine
        .trigger("job")
        .lane(lane)
        .send()
        .await
        .expect("trigger")
        .run
        .id
}

pub async fn assert_completed(engine: &Distributed, run: RunId) {
    match engine
        .wait(run, Duration::from_secs(30))
        .await
        .expect("wait")
    {
        WaitOutcome::Finished(record) => assert_eq!(record.status, RunStatus::Completed),
        WaitOutcome::Pending { status, .. } => panic!("run {run} still {status:?}"),
    }
}
