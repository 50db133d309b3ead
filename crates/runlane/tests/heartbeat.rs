//! A heartbeat never shortens a lease, on every queue backend and the reference model.
//!
//! A client may hold a call through a reconnect and run it late with the `now` it was issued
//! at (Redis's connection manager did, for 3.4 s, in the outage test). A heartbeat run that way
//! after a later one must leave the later deadline: set from its old `now`, the lease could
//! lapse while its handler still runs, and the run would run again.

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use redis_support::{at, claim_request, enqueue_first, put_env, LEASE, T0};
use runlane::core::backend::{LeaseState, QueueBackend};
use runlane::core::RunId;

async fn late_heartbeat_leaves_the_later_deadline(name: &str, q: Arc<dyn QueueBackend>) {
    put_env(q.as_ref()).await;
    let run = RunId(1);
    enqueue_first(q.as_ref(), 1, None, T0).await;
    let request = claim_request(1);
    let leased = q.claim(&request, T0).await.expect("claim");
    assert_eq!(leased.len(), 1, "{name}: claimed");
    let token = leased[0].token;

    // A heartbeat at T0 + 10 s, then one issued at T0 + 5 s that ran late.
    for now in [at(10), at(5)] {
        let states = q.heartbeat(&[(run, token)], now).await.expect("heartbeat");
        assert_eq!(
            states,
            vec![LeaseState::Alive],
            "{name}: heartbeat at {now:?}"
        );
    }
    let lease = q
        .live(run)
        .await
        .expect("live")
        .and_then(|l| l.lease)
        .expect("leased");
    assert_eq!(
        lease.deadline,
        at(10).saturating_add(LEASE),
        "{name}: the later heartbeat's deadline stands"
    );
    // Past the deadline the late heartbeat would have set, before the later one: no lapse.
    let tick = q
        .tick(
            at(5)
                .saturating_add(LEASE)
                .saturating_add(Duration::from_secs(1)),
        )
        .await
        .expect("tick");
    assert!(tick.lapsed.is_empty(), "{name}: lapsed {:?}", tick.lapsed);
    assert_eq!(
        q.check_lease(run, token).await,
        Ok(()),
        "{name}: still held"
    );
    // A heartbeat that does extend it still does.
    let states = q
        .heartbeat(&[(run, token)], at(20))
        .await
        .expect("heartbeat");
    assert_eq!(states, vec![LeaseState::Alive]);
    let lease = q.live(run).await.expect("live").and_then(|l| l.lease);
    assert_eq!(
        lease.map(|l| l.deadline),
        Some(at(20).saturating_add(LEASE)),
        "{name}: extended from the newer heartbeat"
    );
}

#[tokio::test]
async fn on_every_queue_backend() {
    for (name, q) in redis_support::every_queue("heartbeat").await {
        late_heartbeat_leaves_the_later_deadline(name, q).await;
    }
}
