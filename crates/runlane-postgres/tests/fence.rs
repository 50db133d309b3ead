//! Terminal writes are fenced by attempt: the end of an attempt that is no longer the run's
//! current one (its lease lapsed and the run was retried) is refused with `StaleAttempt` and
//! changes nothing; the current attempt's end still wins.

mod common;

use std::sync::Arc;

use runlane_core::backend::{AttemptEnd, AttemptRecord, RunRecord, RunStore};
use runlane_core::{RunId, RunStatus, StoreError, Timestamp};

fn attempt(number: u32, outcome: &str, at: u64) -> AttemptRecord {
    AttemptRecord {
        number,
        outcome: outcome.into(),
        error: None,
        ended_at: Timestamp(at),
    }
}

/// Stores run `n` and retries its attempt 1 (its lease lapsed), so attempt 2 is current;
/// returns the run's id and its record then.
async fn retried_once(store: &dyn RunStore, n: u128) -> (RunId, RunRecord) {
    let run = common::record(n);
    let id = run.id;
    store
        .insert(vec![(run, None)], Timestamp(1_000))
        .await
        .expect("insert");
    store
        .record_retry(id, attempt(1, "crashed", 2_000), Timestamp(2_000))
        .await
        .expect("attempt 1's retry");
    let before = store.get(id).await.expect("get").expect("run");
    assert_eq!(before.attempt, 2);
    assert_eq!(before.attempts.len(), 1);
    (id, before)
}

#[tokio::test]
async fn the_end_of_a_stale_attempt_is_refused_and_changes_nothing() {
    let store = common::open(common::config()).await;
    let (id, before) = retried_once(&store, 1).await;

    // The zombie of attempt 1 tries to complete the run.
    let stale = store
        .finish(
            id,
            RunStatus::Completed,
            Some(Arc::from("\"zombie\"")),
            Some(attempt(1, "completed", 3_000)),
            Timestamp(3_000),
        )
        .await;
    assert_eq!(
        stale,
        Err(StoreError::StaleAttempt {
            run: id,
            attempt: 1,
            current: 2
        })
    );
    assert_eq!(
        store.get(id).await.expect("get").expect("run"),
        before,
        "a refused stale end changes nothing"
    );

    // The same through the batched path.
    let stale_end = AttemptEnd {
        run: id,
        status: RunStatus::Completed,
        output: Some(Arc::from("\"zombie\"")),
        attempt: attempt(1, "completed", 3_000),
    };
    assert_eq!(
        store
            .finish_many(vec![stale_end], Timestamp(3_000))
            .await
            .expect("finish_many"),
        vec![Err(StoreError::StaleAttempt {
            run: id,
            attempt: 1,
            current: 2
        })]
    );
    assert_eq!(store.get(id).await.expect("get").expect("run"), before);

    // The current attempt's end wins.
    let done = store
        .finish(
            id,
            RunStatus::Completed,
            Some(Arc::from("\"ok\"")),
            Some(attempt(2, "completed", 4_000)),
            Timestamp(4_000),
        )
        .await
        .expect("the current attempt ends the run");
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.output.as_deref(), Some("\"ok\""));
    assert_eq!(done.attempts.len(), 2, "attempt 1 (crashed) and attempt 2");
    // Once finished, a stale end is `AlreadyFinished`, as any later terminal write.
    assert_eq!(
        store
            .finish(
                id,
                RunStatus::Failed,
                None,
                Some(attempt(1, "failed", 5_000)),
                Timestamp(5_000)
            )
            .await,
        Err(StoreError::AlreadyFinished {
            run: id,
            status: RunStatus::Completed
        })
    );
    common::finish(store).await;
}

/// A zombie's retry: attempt 1's lease lapsed and the run moved on to attempt 2; attempt 1's
/// `record_retry` is refused with `StaleAttempt` and changes nothing, in PostgreSQL and in
/// the memory store alike.
async fn stale_retry_is_refused(store: &dyn RunStore) {
    let (id, before) = retried_once(store, 2).await;

    // The zombie of attempt 1 fails and asks for a retry.
    assert_eq!(
        store
            .record_retry(id, attempt(1, "failed", 3_000), Timestamp(9_000))
            .await,
        Err(StoreError::StaleAttempt {
            run: id,
            attempt: 1,
            current: 2
        })
    );
    assert_eq!(
        store.get(id).await.expect("get").expect("run"),
        before,
        "a refused stale retry changes nothing"
    );
    // An attempt from the future is refused the same way.
    assert_eq!(
        store
            .record_retry(id, attempt(3, "failed", 3_000), Timestamp(9_000))
            .await,
        Err(StoreError::StaleAttempt {
            run: id,
            attempt: 3,
            current: 2
        })
    );
    assert_eq!(store.get(id).await.expect("get").expect("run"), before);

    // The current attempt's retry is recorded.
    store
        .record_retry(id, attempt(2, "failed", 4_000), Timestamp(5_000))
        .await
        .expect("attempt 2's retry");
    let after = store.get(id).await.expect("get").expect("run");
    assert_eq!(after.attempt, 3);
    assert_eq!(after.status, RunStatus::Delayed);
    assert_eq!(after.run_after, Timestamp(5_000));
    assert_eq!(after.attempts.len(), 2);

    // Once finished, a retry is `AlreadyFinished` whatever its attempt.
    store
        .finish(
            id,
            RunStatus::Completed,
            None,
            Some(attempt(3, "completed", 6_000)),
            Timestamp(6_000),
        )
        .await
        .expect("attempt 3 ends the run");
    assert_eq!(
        store
            .record_retry(id, attempt(2, "failed", 7_000), Timestamp(8_000))
            .await,
        Err(StoreError::AlreadyFinished {
            run: id,
            status: RunStatus::Completed
        })
    );
}

#[tokio::test]
async fn a_stale_attempt_cannot_record_a_retry() {
    let store = common::open(common::config()).await;
    stale_retry_is_refused(&store).await;
    common::finish(store).await;
}

#[tokio::test]
async fn a_stale_attempt_cannot_record_a_retry_in_memory() {
    stale_retry_is_refused(&runlane_memory::MemoryStore::new()).await;
}
