//! Claim on enqueue (distributed): an idle workloop offers its free slots to the triggers of
//! its process, and a trigger whose run it covers has Redis lease the run to it in the enqueue's
//! own script call. Runs outside the workloop's lanes, and triggers while no workloop is idle,
//! take the usual path (doorbell, then claim). Redis (`RUNLANE_REDIS_URL`) and PostgreSQL
//! (`RUNLANE_DATABASE_URL`) are required: a missing one fails the test.

mod redis_support;
mod reporting;

use std::future::Future;
use std::time::Duration;

use reporting::{assert_completed, reporting_worker, trigger};
use runlane::Distributed;

const BOUND: Duration = Duration::from_secs(10);

async fn open(tag: &str) -> Distributed {
    let config = redis_support::distributed_config(redis_support::url(), tag);
    let engine = redis_support::open_distributed(config).await;
    engine.add_lane("reports").await.expect("lane");
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_workloop_gets_the_runs_it_covers_in_the_enqueue_and_the_others_take_the_bell() {
    let engine = open("claimenq").await;
    let (worker, mut started) = reporting_worker(&engine, "reports:2").await;
    let mut claimed_on_enqueue = 0;
    for i in 0..3 {
        redis_support::until_idle_offers(&engine, 1, "the idle workloop offers its slots").await;
        let run = trigger(&engine, "reports").await;
        let got = tokio::time::timeout(BOUND, started.recv()).await;
        assert_eq!(got.expect("started in time"), Some(run), "run {i}");
        assert_completed(&engine, run).await;
        claimed_on_enqueue += 1;
        let m = engine.metrics();
        assert_eq!(m.claimed_on_enqueue, claimed_on_enqueue, "run {i}: {m:?}");
    }
    // Runs leased in their enqueue left no ready run behind: no doorbell rang for them.
    let wakes: u64 = engine.bells().await.iter().map(|r| r.wakes).sum();
    assert_eq!(wakes, 0, "runs claimed in their enqueue ring no doorbell");
    // A run on a lane the workloop does not read is only enqueued; the offer stays posted.
    redis_support::until_idle_offers(&engine, 1, "idle again").await;
    let other = trigger(&engine, "default").await;
    assert_eq!(engine.metrics().claimed_on_enqueue, claimed_on_enqueue);
    assert_eq!(engine.idle_offers(), 1);
    // Stopping withdraws the offer and drains nothing.
    let report = worker.stop().await;
    assert_eq!(engine.idle_offers(), 0);
    assert_eq!(report.released, 0, "{report:?}");
    // A worker of the default lane, started after the run was enqueued, claims it as usual.
    let (default, mut started) = reporting_worker(&engine, "default:1").await;
    let got = tokio::time::timeout(BOUND, started.recv()).await;
    assert_eq!(got.expect("started in time"), Some(other));
    assert_completed(&engine, other).await;
    assert_eq!(engine.metrics().claimed_on_enqueue, claimed_on_enqueue);
    default.stop().await;
    engine.shutdown().await;
}

/// A trigger that goes away mid-call (a dropped HTTP request, a timeout) does not lose its
/// run nor what its enqueue leased: once polled, its store-and-enqueue runs in a task of its
/// own, which takes the idle workloop's offer; the run starts at once, not after a lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_dropped_mid_call_still_hands_its_leases_over() {
    let engine = open("claimenq_drop").await;
    let (worker, mut started) = reporting_worker(&engine, "reports:1").await;
    redis_support::until_idle_offers(&engine, 1, "the idle workloop offers its slot").await;
    let mut call = Box::pin(engine.trigger("job").lane("reports").send());
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
    assert!(polled.is_pending(), "the trigger is in flight");
    drop(call);
    let got = tokio::time::timeout(BOUND, started.recv()).await;
    let run = got.expect("the run started in time").expect("worker alive");
    assert_completed(&engine, run).await;
    assert_eq!(engine.metrics().claimed_on_enqueue, 1);
    worker.stop().await;
    engine.shutdown().await;
}
