//! A tick's report about a lease (lapsed, past its max duration, cancel grace ended) comes
//! again one lease duration later while the lease is not ended, on every queue backend and the
//! reference model; a lapse releases the lease's slots the first time only.
//!
//! The process whose timer heard a report may die before it acts on it (the run would then
//! stay executing under a dead lease, or run past its max duration, for ever): the next tick
//! after the moved deadline, in whichever process owns the timer then, reports it again.

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use redis_support::{at, claim_request, enqueue_first, env, put_env, T0};
use runlane::core::backend::{CancelOutcome, LeaseState, QueueBackend};
use runlane::core::{FencingToken, RunId, Timestamp};

async fn claim(q: &dyn QueueBackend, max: u32, now: Timestamp) -> Vec<(RunId, FencingToken)> {
    let leased = q.claim(&claim_request(max), now).await.expect("claim");
    leased
        .into_iter()
        .map(|l| (l.dispatch.run_id, l.token))
        .collect()
}

async fn running(q: &dyn QueueBackend) -> u32 {
    q.env_usage(&env()).await.expect("usage").running
}

async fn reports_come_again_until_the_lease_ends(name: &str, q: Arc<dyn QueueBackend>) {
    let q = q.as_ref();
    put_env(q).await;

    // Past its max duration: reported at 5 s, and again at 35 s (not acted on).
    enqueue_first(q, 1, Some(Duration::from_secs(5)), T0).await;
    let one = claim(q, 1, T0).await[0];
    assert_eq!(
        q.tick(at(5)).await.expect("tick").timed_out,
        vec![one],
        "{name}"
    );
    assert!(
        q.tick(at(6)).await.expect("tick").timed_out.is_empty(),
        "{name}"
    );
    let hb = q.heartbeat(&[one], at(20)).await.expect("heartbeat");
    assert_eq!(hb, vec![LeaseState::Alive], "{name}");
    assert!(
        q.tick(at(34)).await.expect("tick").timed_out.is_empty(),
        "{name}"
    );
    assert_eq!(
        q.tick(at(35)).await.expect("tick").timed_out,
        vec![one],
        "{name}: again"
    );
    q.finish(one.0, one.1, at(36)).await.expect("finish");

    // A lapse: reported at 70 s and again at 100 s, its slot released once (run 3 keeps its
    // own slot throughout).
    enqueue_first(q, 2, None, at(40)).await;
    enqueue_first(q, 3, None, at(40)).await;
    let leased = claim(q, 2, at(40)).await;
    let (two, three) = (leased[0], leased[1]);
    assert_eq!((two.0, three.0), (RunId(2), RunId(3)), "{name}");
    q.heartbeat(&[three], at(60)).await.expect("heartbeat");
    let lapsed = q.tick(at(70)).await.expect("tick").lapsed;
    assert_eq!(
        lapsed
            .iter()
            .map(|l| (l.dispatch.run_id, l.token))
            .collect::<Vec<_>>(),
        vec![two],
        "{name}"
    );
    assert_eq!(running(q).await, 1, "{name}: run 2's slot released");
    q.heartbeat(&[three], at(80)).await.expect("heartbeat");
    assert!(
        q.tick(at(99)).await.expect("tick").lapsed.is_empty(),
        "{name}"
    );
    let again = q.tick(at(100)).await.expect("tick").lapsed;
    assert_eq!(again, lapsed, "{name}: the same report again");
    assert_eq!(running(q).await, 1, "{name}: released once");
    q.retry(two.0, two.1, at(101), at(101))
        .await
        .expect("retry");
    q.finish(three.0, three.1, at(102)).await.expect("finish");
    assert!(
        q.tick(at(131)).await.expect("tick").lapsed.is_empty(),
        "{name}: ended"
    );

    // A cancel's grace period: ended at 113 s, reported again at 143 s.
    let two = claim(q, 1, at(107)).await[0];
    let cancel = q.cancel(two.0, Duration::from_secs(5), at(108)).await;
    assert!(
        matches!(cancel, Ok(CancelOutcome::Requested { first: true, .. })),
        "{name}: {cancel:?}"
    );
    assert_eq!(
        q.tick(at(113)).await.expect("tick").cancel_elapsed,
        vec![two],
        "{name}"
    );
    let hb = q.heartbeat(&[two], at(130)).await.expect("heartbeat");
    assert_eq!(hb, vec![LeaseState::CancelRequested], "{name}");
    assert!(
        q.tick(at(142))
            .await
            .expect("tick")
            .cancel_elapsed
            .is_empty(),
        "{name}"
    );
    assert_eq!(
        q.tick(at(143)).await.expect("tick").cancel_elapsed,
        vec![two],
        "{name}: again"
    );
    q.finish(two.0, two.1, at(144)).await.expect("finish");
    let tick = q.tick(at(400)).await.expect("tick");
    assert!(
        tick.lapsed.is_empty() && tick.timed_out.is_empty() && tick.cancel_elapsed.is_empty(),
        "{name}: every lease ended, nothing reported: {tick:?}"
    );
    assert_eq!(q.next_deadline().await.expect("deadline"), None, "{name}");
}

#[tokio::test]
async fn on_every_queue_backend() {
    for (name, q) in redis_support::every_queue("tick_again").await {
        reports_come_again_until_the_lease_ends(name, q).await;
    }
}
