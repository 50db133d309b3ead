//! TTL buckets: expiry exact to the millisecond whatever the order runs enter a bucket, with
//! stale entries (claimed, canceled, rescheduled runs) ignored and every bucket gone at the end.

use std::time::Duration;

use runlane_core::backend::{CancelOutcome, Dispatch, EnqueueAs, QueueBackend};
use runlane_core::{EnvName, EnvSettings, Timestamp};

use crate::test_support::{self as support, skip_without_redis, url};
use crate::{RedisConfig, RedisQueue};

fn dispatch(n: u128, env: &EnvName, ttl: u64) -> Dispatch {
    support::dispatch(n, env, "", 0, Some(ttl))
}

async fn expire_at(queue: &RedisQueue, now: u64) -> Vec<u128> {
    let tick = queue.tick(Timestamp(now)).await.expect("tick");
    tick.expired.iter().map(|d| d.run_id.0 & 0xffff).collect()
}

#[tokio::test]
async fn expiry_is_exact_in_any_bucket_order() {
    let prefix = format!("rl:test:ttlb:{}", std::process::id());
    let Ok(queue) = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix)).await else {
        skip_without_redis();
        return;
    };
    let queue = queue.delete_keys_on_drop();
    let env = EnvName::new("e").expect("env name");
    let closed = EnvSettings {
        limit: 0,
        ..EnvSettings::default()
    };
    queue
        .put_env(&env, closed, Timestamp(0))
        .await
        .expect("env");
    // Second 5 gets deadlines out of order; second 6 in order.
    for (n, ttl) in [
        (1, 5_700),
        (2, 5_200),
        (3, 5_900),
        (4, 5_200),
        (5, 6_100),
        (6, 6_300),
    ] {
        queue
            .enqueue(dispatch(n, &env, ttl), EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
    }
    // Run 3 is canceled, run 6 rescheduled inside its bucket to an earlier deadline, run 5 to a
    // later second: their older entries are stale.
    let canceled = queue
        .cancel(dispatch(3, &env, 0).run_id, Duration::ZERO, Timestamp(0))
        .await
        .expect("cancel");
    assert!(matches!(canceled, CancelOutcome::Removed { .. }));
    queue
        .reschedule(
            dispatch(6, &env, 0).run_id,
            Timestamp(0),
            Some(Timestamp(6_050)),
            Timestamp(0),
        )
        .await
        .expect("reschedule");
    queue
        .reschedule(
            dispatch(5, &env, 0).run_id,
            Timestamp(0),
            Some(Timestamp(7_000)),
            Timestamp(0),
        )
        .await
        .expect("reschedule");

    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(5_200))
    );
    assert_eq!(expire_at(&queue, 5_199).await, Vec::<u128>::new());
    assert_eq!(expire_at(&queue, 5_200).await, vec![2, 4]);
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(5_700))
    );
    assert_eq!(expire_at(&queue, 5_699).await, Vec::<u128>::new());
    assert_eq!(expire_at(&queue, 5_700).await, vec![1]);
    // Run 3 was canceled: nothing is left in second 5.
    assert_eq!(expire_at(&queue, 5_999).await, Vec::<u128>::new());
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(6_050))
    );
    assert_eq!(expire_at(&queue, 6_049).await, Vec::<u128>::new());
    assert_eq!(expire_at(&queue, 6_050).await, vec![6]);
    assert_eq!(expire_at(&queue, 6_999).await, Vec::<u128>::new());
    assert_eq!(expire_at(&queue, 7_000).await, vec![5]);
    assert_eq!(queue.next_deadline().await.expect("deadline"), None);
    assert!(queue.snapshot().await.expect("snapshot").is_empty());

    // No bucket, count or index entry is left behind.
    let client = redis::Client::open(url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let base = queue.key_base().to_string();
    for key in ["tbz", "tbn"] {
        let exists: u64 = redis::cmd("EXISTS")
            .arg(format!("{base}:{key}"))
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert_eq!(exists, 0, "{key} is gone");
    }
    let buckets = support::keys_matching(&format!("{base}:tb:*")).await;
    assert!(
        buckets.is_empty(),
        "no bucket list is left: {:?}",
        buckets
            .iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>()
    );
}
