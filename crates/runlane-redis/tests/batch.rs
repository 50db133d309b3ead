//! The batched calls of the Redis backend (`finish_many`, `check_leases`): one script call for
//! the batch, each run answered as its single call would be, in order, with the admissions
//! the finishes unblock. Needs the shared server (`RUNLANE_REDIS_URL`, default
//! `redis://127.0.0.1:6379`); every test uses its own key prefix and deletes it.

use std::time::Duration;

use runlane_core::backend::{ClaimRequest, Dispatch, EnqueueAs, QueueBackend, ServedEnv};
use runlane_core::chain::ClaimChain;
use runlane_core::{
    EnvName, EnvSettings, FencingToken, LaneName, QueueError, QueueName, RunId, RunStatus,
    Timestamp, WorkerId,
};
use runlane_redis::{RedisConfig, RedisQueue};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn url() -> String {
    std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

fn env() -> EnvName {
    EnvName::new("e").expect("env")
}

fn dispatch(id: u128) -> Dispatch {
    let queue = QueueName::new("q").expect("queue");
    Dispatch::first_attempt(RunId(id), env(), queue, LaneName::default_lane(), T0)
}

fn claim(max: u32) -> ClaimRequest {
    ClaimRequest {
        worker: WorkerId(1),
        chain: ClaimChain::default_chain(),
        max,
        envs: vec![ServedEnv {
            env: env(),
            version: 0,
        }],
        lease: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn finish_many_and_check_leases_answer_per_run_in_one_call() {
    let prefix = format!("rl:test:batch:{}", std::process::id());
    let q = RedisQueue::open(RedisConfig::new(url()).with_prefix(prefix))
        .await
        .expect("redis is required for this test (RUNLANE_REDIS_URL)")
        .delete_keys_on_drop();
    let settings = EnvSettings {
        limit: 2,
        ..EnvSettings::default()
    };
    q.put_env(&env(), settings, T0).await.expect("env");
    q.add_lane(&LaneName::new("default").expect("lane"))
        .await
        .expect("lane");
    for id in 1..=4 {
        q.enqueue(dispatch(id), EnqueueAs::Trigger, T0)
            .await
            .expect("enqueue");
    }
    let leased = q.claim(&claim(4), T0).await.expect("claim");
    assert_eq!(leased.len(), 2, "the env limit is 2");
    let token = |run: u128| {
        leased
            .iter()
            .find(|l| l.dispatch.run_id == RunId(run))
            .map(|l| l.token)
            .expect("leased")
    };
    let (t1, t2) = (token(1), token(2));
    let bad = FencingToken(t2.0 + 100);
    assert_eq!(
        q.check_leases(&[(RunId(1), t1), (RunId(2), bad), (RunId(9), t1)])
            .await
            .expect("check_leases"),
        vec![
            Ok(()),
            Err(QueueError::StaleToken(RunId(2))),
            Err(QueueError::NotFound(RunId(9)))
        ]
    );
    let (answers, effects) = q
        .finish_many(&[(RunId(1), t1), (RunId(2), bad), (RunId(9), t1)], T0)
        .await
        .expect("finish_many");
    assert_eq!(
        answers,
        vec![
            Ok(()),
            Err(QueueError::StaleToken(RunId(2))),
            Err(QueueError::NotFound(RunId(9)))
        ]
    );
    assert_eq!(
        effects.moved,
        vec![(RunId(3), RunStatus::Ready)],
        "run 1's slot admits run 3"
    );
    assert_eq!(
        q.check_leases(&[(RunId(1), t1), (RunId(2), t2)])
            .await
            .expect("check_leases"),
        vec![Err(QueueError::NotFound(RunId(1))), Ok(())]
    );
    let (answers, effects) = q
        .finish_many(&[(RunId(2), t2)], T0)
        .await
        .expect("finish_many");
    assert_eq!(answers, vec![Ok(())]);
    assert_eq!(effects.moved, vec![(RunId(4), RunStatus::Ready)]);
    assert_eq!(q.env_usage(&env()).await.expect("usage").running, 2);
    assert!(q.live(RunId(2)).await.expect("live").is_none());
    q.delete_keys().await.expect("delete keys");
}
