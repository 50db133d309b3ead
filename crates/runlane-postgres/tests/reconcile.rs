//! The reconciler of the store-first protocol: rows left `pending_enqueue` (their enqueue was
//! missed) are handed to the enqueue callback once past the grace period, marked `in_queue`
//! when confirmed, kept pending when the callback fails; the loop runs at start-up and is
//! armed by new pending rows, its own process's and (by its idle check) another's.

mod common;

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunStore;
use runlane_core::{RunId, Timestamp};
use runlane_postgres::reconcile::{reconcile_once, spawn_reconciler, ReconcileConfig};
use runlane_postgres::DispatchState;
use tokio::sync::{mpsc, Notify};

#[tokio::test]
async fn a_pass_enqueues_old_pending_rows_and_keeps_failures_pending() {
    let store = common::open(common::config()).await;
    let (r1, r2, r3) = (common::record(1), common::record(2), common::record(3));
    for (r, at) in [(&r1, 100), (&r2, 200), (&r3, 300)] {
        store
            .insert(vec![(r.clone(), None)], Timestamp(at))
            .await
            .expect("insert");
    }
    store.mark_in_queue(&[r1.id]).await.expect("mark");

    // Only rows at or before the cutoff are touched (r3 is still in its trigger's hands).
    let seen = std::sync::Mutex::new(Vec::new());
    let ok = |runs: Vec<runlane_core::backend::RunRecord>| {
        let ids: Vec<RunId> = runs.iter().map(|r| r.id).collect();
        seen.lock().expect("lock").extend(ids.clone());
        async move { Ok::<_, String>(ids) }
    };
    let done = reconcile_once(&store, Timestamp(250), 10, &ok)
        .await
        .expect("pass");
    assert_eq!((done.enqueued, done.failed), (1, 0));
    assert_eq!(*seen.lock().expect("lock"), vec![r2.id]);
    assert_eq!(
        store.dispatch_state(r2.id).await.expect("state"),
        Some(DispatchState::InQueue)
    );

    // A failing callback leaves the rows pending, and says why.
    let failing = |_runs: Vec<runlane_core::backend::RunRecord>| async {
        Err::<Vec<RunId>, _>("redis is down".to_string())
    };
    let done = reconcile_once(&store, Timestamp(1_000), 10, &failing)
        .await
        .expect("pass");
    assert_eq!((done.enqueued, done.failed), (0, 1));
    assert_eq!(done.error.as_deref(), Some("redis is down"));
    assert_eq!(
        store.dispatch_state(r3.id).await.expect("state"),
        Some(DispatchState::PendingEnqueue)
    );
    // Pages: with a batch of 1 the pass still reaches every row.
    let done = reconcile_once(&store, Timestamp(1_000), 1, &ok)
        .await
        .expect("pass");
    assert_eq!((done.enqueued, done.failed), (1, 0));
    assert_eq!(store.oldest_pending_at().await.expect("oldest"), None);
    common::finish(store).await;
}

fn wall_now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

#[tokio::test]
async fn the_loop_runs_at_start_up_and_is_armed_by_new_pending_rows() {
    let store = Arc::new(common::open(common::config()).await);
    // Left pending before the reconciler starts (a trigger that died after its commit).
    let orphan = common::record(1);
    store
        .insert(vec![(orphan.clone(), None)], wall_now())
        .await
        .expect("insert");

    let (tx, mut rx) = mpsc::unbounded_channel::<RunId>();
    let shutdown = Arc::new(Notify::new());
    let config = ReconcileConfig {
        grace: Duration::ZERO,
        batch: 100,
        retry_after: Duration::from_millis(50),
        // Long enough that only the insert's signal can wake the idle loop in this test.
        idle_check: Duration::from_secs(3600),
    };
    let task = spawn_confirming(store.clone(), config, tx, shutdown.clone());
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the start-up pass")
        .expect("channel");
    assert_eq!(first, orphan.id);

    // A new pending row wakes the idle reconciler.
    let later = common::record(2);
    store
        .insert(vec![(later.clone(), None)], wall_now())
        .await
        .expect("insert");
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the armed pass")
        .expect("channel");
    assert_eq!(second, later.id);
    // Marked once confirmed: wait for the mark (it follows the callback).
    until_none_pending(&store).await;
    shutdown.notify_one();
    task.await.expect("the reconciler ends on shutdown");
    let store = Arc::try_unwrap(store).expect("last handle");
    common::finish(store).await;
}

/// A row another process committed and left behind (it died before its enqueue) signals no
/// insert in this one: the idle reconciler finds it by its periodic look at the store, without
/// a trigger or a restart here.
#[tokio::test]
async fn an_idle_loop_finds_a_row_another_process_left_pending() {
    let config = common::config();
    let here = Arc::new(common::open(config.clone()).await);
    let elsewhere = common::open(config).await;

    let (tx, mut rx) = mpsc::unbounded_channel::<RunId>();
    let shutdown = Arc::new(Notify::new());
    let config = ReconcileConfig {
        grace: Duration::ZERO,
        batch: 100,
        retry_after: Duration::from_millis(50),
        idle_check: Duration::from_millis(100),
    };
    let task = spawn_confirming(here.clone(), config, tx, shutdown.clone());
    // The start-up pass finds nothing: the loop is idle, waiting for a local insert.
    assert_eq!(here.oldest_pending_at().await.expect("oldest"), None);

    // Committed through another handle (another process's pool): no signal reaches `here`.
    let orphan = common::record(7);
    elsewhere
        .insert(vec![(orphan.clone(), None)], wall_now())
        .await
        .expect("insert elsewhere");
    let found = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the idle check finds the orphan")
        .expect("channel");
    assert_eq!(found, orphan.id);
    until_none_pending(&here).await;
    shutdown.notify_one();
    task.await.expect("the reconciler ends on shutdown");
    drop(elsewhere);
    let here = Arc::try_unwrap(here).expect("last handle");
    common::finish(here).await;
}

/// Starts the reconciler with a callback that confirms every run it gets and sends its id.
fn spawn_confirming(
    store: Arc<runlane_postgres::PostgresStore>,
    config: ReconcileConfig,
    tx: mpsc::UnboundedSender<RunId>,
    shutdown: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    spawn_reconciler(
        store,
        config,
        wall_now,
        move |runs: Vec<runlane_core::backend::RunRecord>| {
            let tx = tx.clone();
            async move {
                let ids: Vec<RunId> = runs.iter().map(|r| r.id).collect();
                for id in &ids {
                    let _ = tx.send(*id);
                }
                Ok::<_, String>(ids)
            }
        },
        shutdown,
    )
}

/// Waits (at most 10 s) until no row is pending: a confirmed run is marked after its callback.
async fn until_none_pending(store: &runlane_postgres::PostgresStore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.oldest_pending_at().await.expect("oldest").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows stayed pending"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
