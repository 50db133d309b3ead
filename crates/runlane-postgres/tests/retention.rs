//! Retention: finished runs past their keep time are deleted in bounded statements (with
//! their idempotency keys), unfinished ones never; `next_purge_at` arms the timer at the
//! earliest finished run's purge instant.

mod common;

use std::time::Duration;

use runlane_core::backend::{IdempotencyClaim, Inserted, Retention, RunStore};
use runlane_core::{RunStatus, Timestamp};

#[tokio::test]
async fn finished_runs_past_retention_are_purged_in_batches_with_their_keys() {
    let mut config = common::config();
    config.purge_batch = 2;
    let store = common::open(config).await;
    let claim = IdempotencyClaim {
        key: "k".into(),
        expires_at: Timestamp(u64::MAX / 2),
    };
    let mut runs = Vec::new();
    for n in 0..5u128 {
        let r = common::record(n);
        let key = (n == 0).then(|| claim.clone());
        store
            .insert(vec![(r.clone(), key)], Timestamp(10))
            .await
            .expect("insert");
        runs.push(r);
    }
    // Four finish at t = 100..=400 (two completed, one failed, one canceled); one stays queued.
    let statuses = [
        RunStatus::Completed,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Canceled,
    ];
    for (i, status) in statuses.into_iter().enumerate() {
        store
            .finish(
                runs[i].id,
                status,
                None,
                None,
                Timestamp(100 * (i as u64 + 1)),
            )
            .await
            .expect("finish");
    }
    let mut retention = Retention::uniform(Duration::from_millis(1_000));
    retention.failed = None; // failed runs are kept forever
    assert_eq!(
        store.next_purge_at(&retention).await.expect("next"),
        Some(Timestamp(1_100))
    );
    assert_eq!(
        store
            .purge_finished(&retention, Timestamp(1_099))
            .await
            .expect("purge"),
        0,
        "nothing is due before its instant"
    );
    // Completed at 100 and 200, canceled at 400: three runs, in statements of two.
    assert_eq!(
        store
            .purge_finished(&retention, Timestamp(1_400))
            .await
            .expect("purge"),
        3
    );
    let left: Vec<_> = store
        .list(&Default::default())
        .await
        .expect("list")
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    assert_eq!(
        left,
        vec![
            (runs[2].id, RunStatus::Failed),
            (runs[4].id, RunStatus::Queued)
        ]
    );
    assert_eq!(store.next_purge_at(&retention).await.expect("next"), None);
    // The purged run's key no longer deduplicates.
    let again = store
        .insert(vec![(common::record(9), Some(claim))], Timestamp(2_000))
        .await
        .expect("insert");
    assert_eq!(again, vec![Inserted::New]);
    common::finish(store).await;
}
