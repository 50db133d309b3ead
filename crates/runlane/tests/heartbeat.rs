//! A heartbeat never shortens a lease, on every queue backend and the reference model.
//!
//! A client may hold a call through a reconnect and run it late with the `now` it was issued
//! at (Redis's connection manager did, for 3.4 s, in the outage test). A heartbeat run that way
//! after a later one must leave the later deadline: set from its old `now`, the lease could
//! lapse while its handler still runs, and the run would run again.

mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::{
    ClaimRequest, Dispatch, EnqueueAs, LeaseState, QueueBackend, ServedEnv,
};
use runlane::core::{
    ClaimChain, EnvName, EnvSettings, LaneName, QueueName, RunId, Timestamp, WorkerId,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);
const LEASE: Duration = Duration::from_secs(30);

fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

fn env() -> EnvName {
    EnvName::new("e").expect("env")
}

async fn late_heartbeat_leaves_the_later_deadline(name: &str, q: Arc<dyn QueueBackend>) {
    let settings = EnvSettings {
        limit: 2,
        ..EnvSettings::default()
    };
    q.put_env(&env(), settings, T0).await.expect("env");
    let run = RunId(1);
    let queue = QueueName::new("q").expect("queue");
    let dispatch = Dispatch::first_attempt(run, env(), queue, LaneName::default_lane(), T0);
    q.enqueue(dispatch, EnqueueAs::Trigger, T0)
        .await
        .expect("enqueue");
    let request = ClaimRequest {
        worker: WorkerId(1),
        chain: ClaimChain::default_chain(),
        max: 1,
        envs: vec![ServedEnv {
            env: env(),
            version: 0,
        }],
        lease: LEASE,
    };
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
