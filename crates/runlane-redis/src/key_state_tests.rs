//! Queue key state: a key leaves nothing in Redis once its runs end (a user id as the key),
//! whether its runs took the fast path, waited in its list with a TTL (the list's bookkeeping,
//! the interned key id) or were served by an admission pass (the serve stamp).

use std::time::Duration;

use runlane_core::backend::{CancelOutcome, Dispatch, EnqueueAs, QueueBackend};
use runlane_core::Timestamp;

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
async fn a_key_leaves_no_state_once_its_runs_end() {
    let Some(queue) = open_queue("keystate", "once").await else {
        return;
    };
    support::put_env_e(&queue, 2).await;
    // Limit 2: runs 1-2 take the fast path; run 3 waits in its key's list (with a TTL: its key
    // gets an interned id) and an admission pass serves it; delayed run 4 is due at 5 s; run 5
    // is canceled while queued, delayed run 6 before it is due.
    for (n, after) in [(1, 0), (2, 0), (3, 0), (4, 5_000), (5, 0), (6, 60_000)] {
        let mut d = keyed(n, after);
        if n == 3 {
            d.ttl_deadline = Some(Timestamp(600_000));
        }
        queue
            .enqueue(d, EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
    }
    let interned = format!("{}:kn", queue.key_base());
    assert_eq!(
        support::keys_matching(&interned).await.len(),
        1,
        "run 3's key id"
    );
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
    // No key keeps anything: not the fast-path keys (1, 2), nor those a pass served (3, 4),
    // nor the one whose queued run was canceled (5); no key list, tombstone set or key id is
    // left either.
    assert_eq!(key_hashes(&queue).await, Vec::<String>::new());
    let base = queue.key_base();
    for kind in ["kl", "kt", "kq", "kn"] {
        let left = support::keys_matching(&format!("{base}:{kind}*")).await;
        assert!(left.is_empty(), "{kind}: {} keys left", left.len());
    }
}
