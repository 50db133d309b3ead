//! `PostgresStore::mark_in_queue` of several runs never waits for a row lock: a row another
//! transaction holds (a terminal write in flight) is skipped and stays `pending_enqueue`, so
//! a mark and terminal writes locking the same rows in other orders cannot deadlock.

mod common;

use std::time::Duration;

use runlane_postgres::DispatchState;
use sqlx::Connection;

/// Far longer than any mark takes; only a mark that waits for the held row reaches it.
const HANG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_mark_skips_a_row_another_transaction_holds() {
    let store = common::open(common::config()).await;
    let schema = store.schema().to_string();
    let runs = common::insert_records(&store, 3).await;

    // Another transaction holds run 1's row, as a terminal write waiting for its commit does.
    let mut holder = sqlx::PgConnection::connect(&common::url())
        .await
        .expect("connect");
    let mut tx = holder.begin().await.expect("begin");
    let id = runs[1].id.to_bytes().to_vec();
    let held: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT id FROM \"{schema}\".runs WHERE id = $1 FOR UPDATE) AS l"
    ))
    .bind(&id)
    .fetch_one(&mut *tx)
    .await
    .expect("lock run 1");
    assert_eq!(held, 1, "the test's id encoding finds the row");

    let ids: Vec<_> = runs.iter().rev().map(|r| r.id).collect();
    let marked = tokio::time::timeout(HANG, store.mark_in_queue(&ids))
        .await
        .expect("the mark waited for the held row")
        .expect("mark");
    assert_eq!(marked, 2, "runs 0 and 2 marked, run 1 skipped");
    tx.rollback().await.expect("rollback");

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
    let _ = holder.close().await;
    common::finish(store).await;
}
