//! Queue key state: a key whose runs never waited in a backlog (a user id as the key, with
//! capacity to spare) leaves nothing in Redis once its run ends; a key an admission pass
//! served keeps its hash (the serve stamp that orders it among backlogged keys), and so does
//! one whose run waited in its list (the list's bookkeeping).

use std::time::Duration;

use runlane_core::backend::{CancelOutcome, Dispatch, EnqueueAs, QueueBackend};
use runlane_core::{EnvSettings, Timestamp};

use crate::test_support::{self as support, claim_all, env, open_queue};

/// The queue keys' hashes (`<base>:k:<env>\0<queue>\0<key>`), as the key names they end in.
async fn key_hashes(queue: &crate::RedisQueue) -> Vec<String> {
    support::keys_matching(&format!("{}:k:*", queue.key_base()))
        .await
        .iter()
        .map(|key| {
            let name = key.rsplit(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(name).into_owned()
        })
        .collect()
}

fn keyed(n: u128, run_after: u64) -> Dispatch {
    support::dispatch(n, &env("e"), &format!("user-{n}"), run_after, None)
}

#[tokio::test]
async fn a_key_used_once_leaves_no_hash_once_its_run_ends() {
    let Some(queue) = open_queue("keystate", "once").await else {
        return;
    };
    let settings = EnvSettings {
        limit: 2,
        ..EnvSettings::default()
    };
    queue
        .put_env(&env("e"), settings, Timestamp(0))
        .await
        .expect("env");
    // Limit 2: runs 1-2 take the fast path; run 3 waits in its key's backlog and an admission
    // pass serves it; delayed run 4 is due at 5 s; run 5 is canceled while queued, delayed
    // run 6 before it is due.
    for (n, after) in [(1, 0), (2, 0), (3, 0), (4, 5_000), (5, 0), (6, 60_000)] {
        queue
            .enqueue(keyed(n, after), EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
    }
    assert_eq!(key_hashes(&queue).await.len(), 6);
    for n in [5, 6] {
        let canceled = queue
            .cancel(keyed(n, 0).run_id, Duration::ZERO, Timestamp(0))
            .await
            .expect("cancel");
        assert!(matches!(canceled, CancelOutcome::Removed { .. }));
    }
    assert!(
        !key_hashes(&queue).await.iter().any(|k| k == "user-6"),
        "a delayed run canceled before it was due leaves no hash"
    );
    let later = Timestamp(5_000);
    for _ in 0..2 {
        let leases = queue
            .claim(&claim_all(&env("e")), later)
            .await
            .expect("claim");
        for l in leases {
            queue
                .finish(l.dispatch.run_id, l.token, later)
                .await
                .expect("finish");
        }
        queue.tick(later).await.expect("tick");
    }
    let live = queue.snapshot().await.expect("snapshot");
    assert!(live.is_empty(), "every run ended: {live:?}");
    // Runs 1, 2 and 6 never waited in a backlog: their keys' hashes are gone. Runs 3 and 4
    // (due later, a pass admitted it too) were served by admission passes, and queued run 5's
    // key keeps its list bookkeeping: those hashes stay (the memory backend keeps the stamped
    // states and forgets run 5's key too).
    let kept = key_hashes(&queue).await;
    assert_eq!(kept, vec!["user-3", "user-4", "user-5"]);
}
