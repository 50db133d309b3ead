//! The once-per-key-space tidy of queue key hashes an earlier library left behind: hashes of
//! keys with no queued run lose their stamps, list bookkeeping, key ids and zero counters (and
//! go), hashes of keys with queued or running runs keep what they count, and the key space is
//! marked tidied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use runlane_core::backend::{EnqueueAs, QueueBackend};
use runlane_core::Timestamp;

use crate::test_support::{self as support, env, open_queue};
use crate::RedisQueue;

#[tokio::test]
async fn an_earlier_librarys_key_state_is_tidied_once() {
    let Some(queue) = open_queue("tidy", "old").await else {
        return;
    };
    let queue = Arc::new(queue);
    support::put_env_e(&queue, 1).await;
    // Run 1 (key `busy`) takes the slot; run 2 (key `live`) waits queued.
    for (n, key) in [(1, "busy"), (2, "live")] {
        let d = support::dispatch(n, &env("e"), key, 0, None);
        queue
            .enqueue(d, EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
    }
    // What an earlier library left: a served key's stamp with its drained list's bookkeeping
    // and key id, and a zero running count.
    let base = queue.key_base().to_string();
    let hash = |key: &str| format!("{base}:k:e\0q\0{key}");
    let mut conn = support::connect().await.expect("redis");
    let _: () = conn
        .hset_multiple(
            hash("served"),
            &[
                ("served", "12"),
                ("run", "0"),
                ("qd", "0"),
                ("lseq", "3"),
                ("lts", "100"),
                ("id", "7"),
            ],
        )
        .await
        .expect("hset");
    let _: () = conn
        .hset(format!("{base}:kn"), "7", "e\0q\0served")
        .await
        .expect("hset");
    let _: () = conn.hset(hash("zero"), "run", "0").await.expect("hset");
    let _: () = conn
        .hdel(format!("{base}:cfg"), "tidy")
        .await
        .expect("unmark");

    RedisQueue::tidy_key_state(&queue);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mark: Option<String> = conn
            .hget(format!("{base}:cfg"), "tidy")
            .await
            .expect("hget");
        if mark.as_deref() == Some("1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key space was never marked tidied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reader = conn.clone();
    let fields = |key: &str| {
        let mut conn = reader.clone();
        let name = hash(key);
        async move {
            let mut f: Vec<String> = conn.hkeys(name).await.expect("hkeys");
            f.sort_unstable();
            f
        }
    };
    let interned: u64 = conn.hlen(format!("{base}:kn")).await.expect("hlen");
    assert_eq!(interned, 0, "the key id went with its key");
    assert_eq!(fields("served").await, Vec::<String>::new(), "gone");
    assert_eq!(fields("zero").await, Vec::<String>::new(), "gone");
    let interned: u64 = conn.hlen(format!("{base}:kn")).await.expect("hlen");
    assert_eq!(interned, 0, "the key id went with its key");
    assert_eq!(
        fields("busy").await,
        vec!["run"],
        "a running key keeps its count"
    );
    let live = fields("live").await;
    assert!(
        live.contains(&"qd".to_string()) && live.contains(&"served".to_string()),
        "a queued key keeps its count and stamp: {live:?}"
    );
    // The queued run is still admitted when the slot frees.
    let leases = queue
        .claim(&support::claim_all(&env("e")), Timestamp(0))
        .await
        .expect("claim");
    assert_eq!(leases.len(), 1);
    queue
        .finish(leases[0].dispatch.run_id, leases[0].token, Timestamp(0))
        .await
        .expect("finish");
    let leases = queue
        .claim(&support::claim_all(&env("e")), Timestamp(0))
        .await
        .expect("claim");
    assert_eq!(leases.len(), 1, "the queued run was admitted");
    assert_eq!(leases[0].dispatch.key.as_ref(), "live");
}
