//! A trigger whose enqueue was refused takes its run back (`remove_refused`) only while no
//! other trigger was handed that run through its idempotency key: each hit is counted on the
//! run's row (`key_hits`), in whichever process it came from, and a counted run stays.

mod common;

use std::sync::Arc;

use runlane_core::backend::{IdempotencyClaim, Inserted, RunStore};
use runlane_core::{RunId, Timestamp};

fn claim(key: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        expires_at: Timestamp(u64::MAX / 2),
    }
}

async fn insert(store: &runlane_postgres::PostgresStore, n: u128, key: &str) -> Inserted {
    store
        .insert(vec![(common::record(n), Some(claim(key)))], Timestamp(10))
        .await
        .expect("insert")
        .pop()
        .expect("one answer")
}

#[tokio::test]
async fn a_refused_run_whose_key_answered_another_trigger_stays() {
    let store = common::open(common::config()).await;
    let first = common::record(1).id;
    assert!(matches!(insert(&store, 1, "k").await, Inserted::New));
    match insert(&store, 2, "k").await {
        Inserted::Existing(holder) => assert_eq!(holder.id, first),
        Inserted::New => panic!("the second trigger with the key is a hit"),
    }
    assert!(
        !store.remove_refused(first).await.expect("remove"),
        "the run was handed to the second trigger: it stays"
    );
    assert!(store.get(first).await.expect("get").is_some());
    match insert(&store, 3, "k").await {
        Inserted::Existing(holder) => assert_eq!(holder.id, first, "it keeps its key"),
        Inserted::New => panic!("the key still names the kept run"),
    }

    // Nobody was handed it: it goes, with its key.
    let alone = common::record(4).id;
    assert!(matches!(insert(&store, 4, "alone").await, Inserted::New));
    assert!(store.remove_refused(alone).await.expect("remove"));
    assert!(store.get(alone).await.expect("get").is_none());
    assert!(
        matches!(insert(&store, 5, "alone").await, Inserted::New),
        "the key is free again"
    );
    // A run that is not stored is gone.
    assert!(store
        .remove_refused(RunId(u128::MAX))
        .await
        .expect("remove"));
    common::finish(store).await;
}

/// Triggers with one key arriving together (one writer batch or several): one stores the
/// run, every other one is a hit, and the run then stays when its own trigger is refused.
#[tokio::test]
async fn concurrent_hits_in_one_batch_or_many_are_all_counted() {
    let store = Arc::new(common::open(common::config()).await);
    for round in 0..5u128 {
        let key = format!("together-{round}");
        let mut tasks = Vec::new();
        for i in 0..16u128 {
            let store = store.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let n = 100 + round * 100 + i;
                (common::record(n).id, insert(&store, n, &key).await)
            }));
        }
        let mut stored = Vec::new();
        let mut hits = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                (id, Inserted::New) => stored.push(id),
                (_, Inserted::Existing(holder)) => hits.push(holder.id),
            }
        }
        assert_eq!(stored.len(), 1, "round {round}: one run stored");
        assert_eq!(hits.len(), 15, "round {round}: every other trigger hit");
        assert!(hits.iter().all(|h| *h == stored[0]));
        assert!(
            !store.remove_refused(stored[0]).await.expect("remove"),
            "round {round}: the run answered 15 triggers and stays"
        );
    }
    let store = Arc::into_inner(store).expect("the last handle");
    common::finish(store).await;
}
