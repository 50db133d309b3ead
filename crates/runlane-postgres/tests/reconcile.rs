//! The reconciler of the store-first protocol: rows left `pending_enqueue` (their enqueue was
//! missed) are handed to the enqueue callback once past the grace period, marked `in_queue`
//! when confirmed, kept pending when the callback fails; the loop runs at start-up and is
//! armed by new pending rows, its own process's and (by its idle check) another's. Its sweeps
//! hand over the runs marked `in_queue` that never started and whose TTL passed, and the
//! unfinished runs whose cancel was requested.

mod common;

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::RunStore;
use runlane_core::{RunId, Timestamp};
use runlane_postgres::reconcile::{reconcile_once, spawn_reconciler, sweep_once, ReconcileConfig};
use runlane_postgres::{DispatchState, Sweep};
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
    let ok = confirming(&seen);
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

/// Run `n` (see [`common::record`]) with a TTL deadline at `deadline`.
fn with_ttl(n: u128, deadline: Option<u64>) -> runlane_core::backend::RunRecord {
    let mut r = common::record(n);
    r.ttl = deadline.map(|_| Duration::from_millis(100));
    r.ttl_deadline = deadline.map(Timestamp);
    r
}

#[tokio::test]
async fn the_ttl_sweep_hands_over_waiting_runs_past_their_deadline_in_order() {
    let store = common::open(common::config()).await;
    let schema = store.schema().to_string();
    let swept = with_ttl(1, Some(500));
    let first = with_ttl(2, Some(400));
    let pending = with_ttl(3, Some(450));
    let same_deadline = with_ttl(9, Some(450));
    let later = with_ttl(4, Some(5_000));
    let no_ttl = with_ttl(5, None);
    let finished = with_ttl(6, Some(300));
    let started = with_ttl(7, Some(350));
    let noted = with_ttl(8, Some(600));
    // A retry waiting for its second attempt: its TTL no longer applies.
    let mut retried = with_ttl(10, Some(420));
    retried.attempt = 2;
    let all = [
        &swept,
        &first,
        &pending,
        &same_deadline,
        &later,
        &no_ttl,
        &finished,
        &started,
        &noted,
        &retried,
    ];
    store
        .insert(
            all.iter().map(|r| ((*r).clone(), None)).collect(),
            Timestamp(100),
        )
        .await
        .expect("insert");
    let marked: Vec<RunId> = all
        .iter()
        .filter(|r| r.id != pending.id)
        .map(|r| r.id)
        .collect();
    store.mark_in_queue(&marked).await.expect("mark");
    store
        .finish(
            finished.id,
            runlane_core::RunStatus::Expired,
            None,
            None,
            Timestamp(300),
        )
        .await
        .expect("finish");
    // A start another process wrote, and one this process noted but has not written yet.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&common::url())
        .await
        .expect("connect");
    sqlx::query(&format!(
        "UPDATE \"{schema}\".runs SET started_at = 200 WHERE id = $1"
    ))
    .bind(started.id.0.to_be_bytes().to_vec())
    .execute(&mut conn)
    .await
    .expect("write a start");
    store.note_start(noted.id, 1, Timestamp(200));

    let seen = std::sync::Mutex::new(Vec::new());
    let ok = confirming(&seen);
    // Pages of one: each run once, by deadline then id.
    let done = sweep_once(&store, Sweep::TtlPassed, Timestamp(1_000), 1, &ok)
        .await
        .expect("sweep");
    let expected = vec![first.id, same_deadline.id, swept.id];
    assert_eq!(*seen.lock().expect("lock"), expected);
    assert_eq!((done.handed, done.error), (3, None));
    // The next sweep starts over: a run the queue lost again is handed over again.
    seen.lock().expect("lock").clear();
    let done = sweep_once(&store, Sweep::TtlPassed, Timestamp(1_000), 10, &ok)
        .await
        .expect("sweep");
    assert_eq!(*seen.lock().expect("lock"), expected);
    assert_eq!(done.handed, 3);
    // Nothing before the cutoff: nothing handed over.
    seen.lock().expect("lock").clear();
    let done = sweep_once(&store, Sweep::TtlPassed, Timestamp(399), 10, &ok)
        .await
        .expect("sweep");
    assert!(seen.lock().expect("lock").is_empty());
    assert_eq!(done.handed, 0);
    // A failing callback stops the sweep and says why.
    let failing = |_runs: Vec<runlane_core::backend::RunRecord>| async {
        Err::<Vec<RunId>, _>("redis is down".to_string())
    };
    let done = sweep_once(&store, Sweep::TtlPassed, Timestamp(1_000), 1, &failing)
        .await
        .expect("sweep");
    assert_eq!(
        (done.handed, done.error.as_deref()),
        (0, Some("redis is down"))
    );
    drop(conn);
    common::finish(store).await;
}

#[tokio::test]
async fn the_cancel_sweep_hands_over_unfinished_runs_whose_cancel_was_requested() {
    let store = common::open(common::config()).await;
    let runs: Vec<_> = (1..=4u128).map(common::record).collect();
    store
        .insert(
            runs.iter().map(|r| (r.clone(), None)).collect(),
            Timestamp(100),
        )
        .await
        .expect("insert");
    // Requested at 300 (twice: the first instant holds), 200, and 900 (after the cutoff); run
    // 4 has no request.
    for (run, at) in [(0, 300), (0, 350), (1, 200), (2, 900)] {
        store
            .request_cancel(runs[run].id, Timestamp(at))
            .await
            .expect("request");
    }
    let ended = common::record(5);
    store
        .insert(vec![(ended.clone(), None)], Timestamp(100))
        .await
        .expect("insert");
    store
        .request_cancel(ended.id, Timestamp(250))
        .await
        .expect("request");
    store
        .finish(
            ended.id,
            runlane_core::RunStatus::Canceled,
            None,
            None,
            Timestamp(260),
        )
        .await
        .expect("finish");

    let seen = std::sync::Mutex::new(Vec::new());
    let ok = confirming(&seen);
    let done = sweep_once(&store, Sweep::CancelRequested, Timestamp(500), 1, &ok)
        .await
        .expect("sweep");
    assert_eq!(*seen.lock().expect("lock"), vec![runs[1].id, runs[0].id]);
    assert_eq!((done.handed, done.error), (2, None));
    common::finish(store).await;
}

/// A callback that confirms every run it is handed, noting their ids in `seen`.
fn confirming(
    seen: &std::sync::Mutex<Vec<RunId>>,
) -> impl Fn(Vec<runlane_core::backend::RunRecord>) -> std::future::Ready<Result<Vec<RunId>, String>> + '_
{
    move |runs| {
        let ids: Vec<RunId> = runs.iter().map(|r| r.id).collect();
        seen.lock().expect("lock").extend(ids.clone());
        std::future::ready(Ok(ids))
    }
}
