//! Record buckets (`{p}:rb`): a bucket joins the set with its first record and stays when its
//! records go, so a run's end is one `HDEL` (no `HLEN` to find out whether its bucket emptied);
//! a snapshot still reads exactly the records held.

use runlane_core::backend::{Dispatch, EnqueueAs, QueueBackend};
use runlane_core::{EnvName, EnvSettings, FencingToken, RunId, Timestamp};

use crate::test_support::{self as support, url};
use crate::{RedisConfig, RedisQueue};

fn dispatch(n: u128, env: &EnvName) -> Dispatch {
    support::dispatch(n, env, "", 0, None)
}

/// The bucket of a run's record (its id's low 12 bits), as `{p}:rb` lists it.
fn bucket(n: u128) -> String {
    (((1u128 << 80) | n) & 0xfff).to_string()
}

#[tokio::test]
async fn an_ended_runs_bucket_stays_listed_and_snapshots_read_the_records_held() {
    let Some(mut conn) = support::connect().await else {
        return;
    };
    let prefix = format!("rl:test:buckets:{}", std::process::id());
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    let rb = format!("{}:rb", queue.key_base());
    let env = EnvName::new("e").expect("env name");
    let settings = EnvSettings {
        limit: 10,
        ..EnvSettings::default()
    };
    queue
        .put_env(&env, settings, Timestamp(0))
        .await
        .expect("env");
    // Fast path: each run is ready at once, with a record.
    for n in 1..=3 {
        queue
            .enqueue(dispatch(n, &env), EnqueueAs::Trigger, Timestamp(1))
            .await
            .expect("enqueue");
    }
    let request = support::claim_all(&env);
    let leased = queue.claim(&request, Timestamp(2)).await.expect("claim");
    assert_eq!(leased.len(), 3);
    let ends: Vec<(RunId, FencingToken)> = leased
        .iter()
        .map(|l| (l.dispatch.run_id, l.token))
        .collect();
    let (answers, _) = queue
        .finish_many(&ends, Timestamp(3))
        .await
        .expect("finish_many");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    for n in 1..=3 {
        let listed: bool = redis::cmd("SISMEMBER")
            .arg(&rb)
            .arg(bucket(n))
            .query_async(&mut conn)
            .await
            .expect("sismember");
        assert!(listed, "run {n}'s emptied bucket stays in {rb}");
    }
    assert!(
        queue.snapshot().await.expect("snapshot").is_empty(),
        "no record is held"
    );
    // New records in the emptied buckets and in a fresh one are all read back.
    for n in [1, 2, 4] {
        queue
            .enqueue(dispatch(n + 16, &env), EnqueueAs::Trigger, Timestamp(4))
            .await
            .expect("enqueue");
    }
    let ids: Vec<RunId> = queue
        .snapshot()
        .await
        .expect("snapshot")
        .iter()
        .map(|l| l.dispatch.run_id)
        .collect();
    assert_eq!(
        ids,
        [17, 18, 20]
            .iter()
            .map(|n| RunId((1u128 << 80) | n))
            .collect::<Vec<_>>()
    );
}
