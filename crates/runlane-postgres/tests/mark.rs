//! The writes that may lock the same rows as a batch of terminal writes never wait for a row
//! lock, so they cannot deadlock with it: `PostgresStore::mark_in_queue` of several runs skips
//! a row another transaction holds (a terminal write in flight), which stays `pending_enqueue`;
//! a flush of attempt starts skips such a row too (its holder moves the run on).

mod common;

use std::time::Duration;

use runlane_core::backend::{RunRecord, RunStore};
use runlane_core::{RunStatus, Timestamp};
use runlane_postgres::{DispatchState, PostgresStore};
use sqlx::{Connection, Executor};

/// Far longer than any mark takes; only a mark that waits for the held row reaches it.
const HANG: Duration = Duration::from_secs(30);

/// A connection whose open transaction holds `run`'s row lock (`FOR UPDATE`), as a terminal
/// write waiting for its commit does; `ROLLBACK` on it lets go.
async fn hold(store: &PostgresStore, run: &RunRecord) -> sqlx::PgConnection {
    let mut holder = sqlx::PgConnection::connect(&common::url())
        .await
        .expect("connect");
    holder.execute("BEGIN").await.expect("begin");
    let held: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT id FROM \"{}\".runs WHERE id = $1 FOR UPDATE) AS l",
        store.schema()
    ))
    .bind(run.id.to_bytes().to_vec())
    .fetch_one(&mut holder)
    .await
    .expect("lock the run's row");
    assert_eq!(held, 1, "the test's id encoding finds the row");
    holder
}

async fn let_go(mut holder: sqlx::PgConnection) {
    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
}

#[tokio::test]
async fn a_mark_skips_a_row_another_transaction_holds() {
    let store = common::open(common::config()).await;
    let runs = common::insert_records(&store, 3).await;
    let holder = hold(&store, &runs[1]).await;

    let ids: Vec<_> = runs.iter().rev().map(|r| r.id).collect();
    let marked = tokio::time::timeout(HANG, store.mark_in_queue(&ids))
        .await
        .expect("the mark waited for the held row")
        .expect("mark");
    assert_eq!(marked, 2, "runs 0 and 2 marked, run 1 skipped");
    let_go(holder).await;

    let state = |n: usize| store.dispatch_state(runs[n].id);
    assert_eq!(state(0).await.expect("state"), Some(DispatchState::InQueue));
    assert_eq!(
        state(1).await.expect("state"),
        Some(DispatchState::PendingEnqueue),
        "a skipped row is left for the reconciler"
    );
    assert_eq!(state(2).await.expect("state"), Some(DispatchState::InQueue));
    // Once nobody holds it, the next mark takes it.
    assert_eq!(store.mark_in_queue(&ids).await.expect("mark again"), 1);
    assert_eq!(state(1).await.expect("state"), Some(DispatchState::InQueue));
    common::finish(store).await;
}

#[tokio::test]
async fn a_start_flush_skips_a_row_another_transaction_holds() {
    let mut config = common::config();
    config.start_flush_after = Duration::from_millis(20);
    let store = common::open(config.clone()).await;
    let runs = common::insert_records(&store, 3).await;
    let holder = hold(&store, &runs[1]).await;

    // Three long runs' starts, flushed together once they are 20 ms old.
    for r in runs.iter().rev() {
        store.note_start(r.id, 1, Timestamp(9));
    }
    // A flush that waited for run 1's row would count nothing until the holder lets go (and
    // would hold runs 0 and 2 meanwhile, against their terminal writes).
    common::until(&store, "runs 0 and 2's starts written", |s| {
        s.starts_flushed == 2
    })
    .await;
    // Run 2's terminal write is not held up by the flush.
    let done = tokio::time::timeout(
        HANG,
        store.finish(runs[2].id, RunStatus::Completed, None, None, Timestamp(10)),
    )
    .await
    .expect("the terminal write waited")
    .expect("finish");
    assert_eq!(done.started_at, Some(Timestamp(9)));
    let_go(holder).await;

    // Another store reads the rows themselves, not this one's kept starts.
    let other = common::reader(&config).await;
    let started = |n: usize| {
        let other = &other;
        let id = runs[n].id;
        async move { other.get(id).await.expect("get").map(|r| r.started_at) }
    };
    assert_eq!(started(0).await, Some(Some(Timestamp(9))));
    assert_eq!(
        started(1).await,
        Some(None),
        "the held row's start was skipped, not waited for"
    );
    assert_eq!(started(2).await, Some(Some(Timestamp(9))));
    drop(other);
    common::finish(store).await;
}
