//! Terminal writes are fenced by attempt: the end of an attempt that is no longer the run's
//! current one (its lease lapsed and the run was retried) is refused with `StaleAttempt` and
//! changes nothing; the current attempt's end still wins.

mod common;

use std::sync::Arc;

use runlane_core::backend::{AttemptEnd, AttemptRecord, RunStore};
use runlane_core::{RunStatus, StoreError, Timestamp};

fn attempt(number: u32, outcome: &str, at: u64) -> AttemptRecord {
    AttemptRecord {
        number,
        outcome: outcome.into(),
        error: None,
        ended_at: Timestamp(at),
    }
}

#[tokio::test]
async fn the_end_of_a_stale_attempt_is_refused_and_changes_nothing() {
    let store = common::open(common::config()).await;
    let run = common::record(1);
    let id = run.id;
    store
        .insert(vec![(run, None)], Timestamp(1_000))
        .await
        .expect("insert");
    // Attempt 1's lease lapsed: the run was retried, attempt 2 is now current.
    store
        .record_retry(id, attempt(1, "crashed", 2_000), Timestamp(2_000))
        .await
        .expect("retry");
    let before = store.get(id).await.expect("get").expect("run");
    assert_eq!(before.attempt, 2);

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
