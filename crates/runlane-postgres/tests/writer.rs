//! The group-commit writers: calls are batched into shared transactions, a full queue refuses
//! with `Unavailable` (backpressure), a run costs two row writes on the success path, kept
//! attempt starts are flushed only for long runs, concurrent idempotent inserts yield one run
//! across stores, and the reconciler's view of the store-first protocol.

mod common;

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{IdempotencyClaim, Inserted, RunStore};
use runlane_core::{EnvName, RunStatus, StoreError, Timestamp};
use runlane_postgres::{DispatchState, Durability, PostgresStore};
use sqlx::Connection;

/// Holds an exclusive lock on the schema's `runs` table until dropped (or released): every
/// writer transaction blocks on it, so calls pile up in the queue deterministically.
struct TableLock {
    conn: sqlx::PgConnection,
}

async fn lock_runs(schema: &str) -> TableLock {
    let mut conn = sqlx::PgConnection::connect(&common::url())
        .await
        .expect("connect");
    let sql = format!("BEGIN; LOCK TABLE \"{schema}\".runs IN ACCESS EXCLUSIVE MODE");
    sqlx::Executor::execute(&mut conn, sql.as_str())
        .await
        .expect("lock");
    TableLock { conn }
}

impl TableLock {
    async fn release(mut self) {
        sqlx::Executor::execute(&mut self.conn, "ROLLBACK")
            .await
            .expect("release the lock");
        let _ = self.conn.close().await;
    }
}

#[tokio::test]
async fn calls_queued_during_a_commit_share_one_transaction() {
    let mut config = common::config();
    config.writers = 1;
    let store = Arc::new(common::open(config.clone()).await);
    let lock = lock_runs(&config.schema).await;
    let spawn = |n: u128| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .insert(vec![(common::record(n), None)], Timestamp(1))
                .await
        })
    };
    // The writer takes call 0 and blocks on the lock; the other 49 wait in the queue.
    let mut tasks = vec![spawn(0)];
    common::until(&store, "call 0 in the writer", |s| s.batches_taken == 1).await;
    let blocked = std::time::Instant::now();
    tasks.extend((1..50).map(spawn));
    common::until(&store, "49 queued calls", |s| s.queued == 49).await;
    let queued = store.stats().queued;
    let blocked = blocked.elapsed();
    lock.release().await;
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(vec![Inserted::New]));
    }
    let stats = store.stats();
    assert_eq!(stats.calls_committed, 50);
    assert_eq!(stats.rows_inserted, 50);
    assert!(
        stats.largest_batch >= queued,
        "the queued calls committed together: {stats:?}"
    );
    assert_eq!(stats.commits, 2, "{stats:?}");
    assert_eq!(stats.largest_batch, 49, "{stats:?}");
    // The writers' time counts the first commit's wait for the lock.
    assert!(
        std::time::Duration::from_micros(stats.commit_micros) >= blocked,
        "{blocked:?} blocked: {stats:?}"
    );
    let store = Arc::try_unwrap(store).expect("last handle");
    common::finish(store).await;
}

#[tokio::test]
async fn a_full_queue_refuses_with_unavailable_and_the_accepted_calls_commit() {
    let mut config = common::config();
    config.writers = 1;
    config.batch_max = 1;
    config.queue_bound = 1;
    config.enqueue_timeout = Duration::ZERO;
    let store = Arc::new(common::open(config.clone()).await);
    let lock = lock_runs(&config.schema).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawn = |n: u128| {
        let store = store.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = store
                .insert(vec![(common::record(n), None)], Timestamp(1))
                .await;
            let _ = tx.send((n, r));
        });
    };
    // Call 0 is taken by the writer (and blocks on the lock), call 1 fills the queue.
    spawn(0);
    common::until(&store, "call 0 in the writer", |s| s.batches_taken == 1).await;
    spawn(1);
    common::until(&store, "call 1 queued", |s| s.queued == 1).await;
    // The other eight are refused at once, while the lock still blocks every commit.
    for n in 2..10 {
        spawn(n);
    }
    let mut refused_ids = Vec::new();
    for _ in 0..8 {
        let (n, r) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a refusal")
            .expect("channel");
        match r {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("queue is full"), "{m}"),
            other => panic!("call {n} should be refused while the queue is full: {other:?}"),
        }
        refused_ids.push(n);
    }
    assert_eq!(store.stats().queue_full, 8);
    lock.release().await;
    for _ in 0..2 {
        let (n, r) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an accepted call")
            .expect("channel");
        assert_eq!(r, Ok(vec![Inserted::New]), "call {n}");
        assert!(store
            .get(common::record(n).id)
            .await
            .expect("get")
            .is_some());
    }
    for n in refused_ids {
        assert_eq!(
            store.get(common::record(n).id).await.expect("get"),
            None,
            "a refused call left nothing"
        );
    }
    let store = Arc::try_unwrap(store).expect("last handle");
    common::finish(store).await;
}

#[tokio::test]
async fn a_short_run_costs_two_row_writes_and_a_long_one_gets_its_start_written() {
    let mut config = common::config();
    config.start_flush_after = Duration::from_millis(20);
    let store = common::open(config.clone()).await;
    let short = common::record(1);
    let long = common::record(2);
    store
        .insert(
            vec![(short.clone(), None), (long.clone(), None)],
            Timestamp(1),
        )
        .await
        .expect("insert");
    store.note_start(short.id, 1, Timestamp(5));
    let done = store
        .finish(short.id, RunStatus::Completed, None, None, Timestamp(6))
        .await
        .expect("finish");
    assert_eq!(
        done.started_at,
        Some(Timestamp(5)),
        "the start rides the terminal write"
    );
    store.note_start(long.id, 1, Timestamp(7));
    // Read through this store, the kept start shows at once.
    assert_eq!(
        store.get(long.id).await.expect("get").map(|r| r.started_at),
        Some(Some(Timestamp(7)))
    );
    common::until(&store, "the long run's start flushed", |s| {
        s.starts_flushed == 1
    })
    .await;
    let stats = store.stats();
    assert_eq!(
        (stats.rows_inserted, stats.rows_finished),
        (2, 1),
        "{stats:?}"
    );
    assert_eq!(
        stats.starts_flushed, 1,
        "only the still-running run's start was written"
    );
    // Another store (another process) reads it from the row.
    let other = common::reader(&config).await;
    assert_eq!(
        other.get(long.id).await.expect("get").map(|r| r.started_at),
        Some(Some(Timestamp(7)))
    );
    drop(other);
    common::finish(store).await;
}

#[tokio::test]
async fn concurrent_inserts_with_one_key_from_two_stores_yield_one_run() {
    let config = common::config();
    let a = Arc::new(common::open(config.clone()).await);
    let b = Arc::new(
        PostgresStore::open(config.clone())
            .await
            .expect("second store"),
    );
    let claim = IdempotencyClaim {
        key: "once".into(),
        expires_at: Timestamp(1_000_000),
    };
    let mut tasks = Vec::new();
    for n in 0..40u128 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        let claim = claim.clone();
        tasks.push(tokio::spawn(async move {
            let r = common::record(n);
            let id = r.id;
            (
                id,
                store.insert(vec![(r, Some(claim))], Timestamp(10)).await,
            )
        }));
    }
    let mut winners = Vec::new();
    let mut hits = Vec::new();
    for t in tasks {
        let (id, answer) = t.await.expect("task");
        match answer.expect("insert").pop() {
            Some(Inserted::New) => winners.push(id),
            Some(Inserted::Existing(r)) => hits.push(r.id),
            None => panic!("no answer"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one insert made the run");
    assert!(
        hits.iter().all(|id| *id == winners[0]),
        "every hit names it"
    );
    assert_eq!(
        a.list(&Default::default()).await.expect("list").len(),
        1,
        "one run stored"
    );
    // Past its expiry the key is taken over by a new run.
    let claim = IdempotencyClaim {
        key: "once".into(),
        expires_at: Timestamp(2_000_000),
    };
    let late = common::record(100);
    let took = a
        .insert(
            vec![(late.clone(), Some(claim.clone()))],
            Timestamp(1_000_000),
        )
        .await
        .expect("insert");
    assert_eq!(took, vec![Inserted::New]);
    let again = b
        .insert(
            vec![(common::record(101), Some(claim))],
            Timestamp(1_000_000),
        )
        .await
        .expect("insert");
    assert!(
        matches!(&again[..], [Inserted::Existing(r)] if r.id == late.id),
        "{again:?}"
    );
    drop(b);
    let a = Arc::try_unwrap(a).expect("last handle");
    common::finish(a).await;
}

#[tokio::test]
async fn runs_are_pending_enqueue_until_marked_in_queue() {
    let store = common::open(common::config()).await;
    let (r1, r2) = (common::record(1), common::record(2));
    store
        .insert(vec![(r1.clone(), None)], Timestamp(100))
        .await
        .expect("insert");
    store
        .insert(vec![(r2.clone(), None)], Timestamp(200))
        .await
        .expect("insert");
    assert_eq!(
        store.dispatch_state(r1.id).await.expect("state"),
        Some(DispatchState::PendingEnqueue)
    );
    assert_eq!(
        store.oldest_pending_at().await.expect("oldest"),
        Some(Timestamp(100))
    );
    let pending: Vec<_> = store
        .pending_enqueue(10)
        .await
        .expect("pending")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, vec![r1.id, r2.id], "oldest first");
    assert_eq!(store.mark_in_queue(&[r1.id]).await.expect("mark"), 1);
    assert_eq!(store.mark_in_queue(&[r1.id]).await.expect("mark again"), 0);
    assert_eq!(
        store.dispatch_state(r1.id).await.expect("state"),
        Some(DispatchState::InQueue)
    );
    assert_eq!(
        store.oldest_pending_at().await.expect("oldest"),
        Some(Timestamp(200))
    );
    // A finished run never needs its enqueue.
    store
        .finish(r2.id, RunStatus::Canceled, None, None, Timestamp(300))
        .await
        .expect("finish");
    assert_eq!(store.oldest_pending_at().await.expect("oldest"), None);
    // Many runs at once (one statement): only the unfinished pending one changes.
    let r3 = common::record(3);
    store
        .insert(vec![(r3.clone(), None)], Timestamp(400))
        .await
        .expect("insert");
    assert_eq!(
        store
            .mark_in_queue(&[r1.id, r2.id, r3.id])
            .await
            .expect("mark many"),
        1
    );
    assert_eq!(
        store.dispatch_state(r3.id).await.expect("state"),
        Some(DispatchState::InQueue)
    );
    assert!(store.pending_enqueue(10).await.expect("pending").is_empty());
    assert_eq!(
        store
            .dispatch_state(common::record(9).id)
            .await
            .expect("state"),
        None
    );
    store.ping().await.expect("ping");
    common::finish(store).await;
}

#[tokio::test]
async fn relaxed_envs_commit_in_their_own_transactions() {
    let mut config = common::config();
    config
        .env_durability
        .insert("fast".into(), Durability::Relaxed);
    let store = common::open(config).await;
    let fast = EnvName::new("fast").expect("env");
    assert_eq!(store.durability(&fast), Durability::Relaxed);
    assert_eq!(
        store.durability(&EnvName::new("prod").expect("env")),
        Durability::Strict
    );
    let mut relaxed = common::record(1);
    relaxed.env = fast.clone();
    let strict = common::record(2);
    store
        .insert(vec![(relaxed.clone(), None)], Timestamp(1))
        .await
        .expect("relaxed insert");
    store
        .insert(vec![(strict.clone(), None)], Timestamp(1))
        .await
        .expect("strict insert");
    let done = store
        .finish(
            relaxed.id,
            RunStatus::Completed,
            Some("\"ok\"".into()),
            None,
            Timestamp(2),
        )
        .await
        .expect("relaxed finish");
    assert_eq!(done.output.as_deref(), Some("\"ok\""));
    assert_eq!(store.get(relaxed.id).await.expect("get"), Some(done));
    assert_eq!(
        store
            .synchronous_commit(Durability::Relaxed)
            .await
            .expect("show"),
        "off"
    );
    assert_eq!(
        store
            .synchronous_commit(Durability::Strict)
            .await
            .expect("show"),
        "on"
    );
    // Both pools find the store's schema first; an unknown setting is an error, not a value.
    for durability in [Durability::Strict, Durability::Relaxed] {
        let path = store
            .setting("search_path", durability)
            .await
            .expect("setting");
        assert!(path.contains(store.schema()), "{path}");
    }
    assert!(store
        .setting("no_such_setting", Durability::Strict)
        .await
        .is_err());
    store.set_durability(&fast, Durability::Strict);
    assert_eq!(store.durability(&fast), Durability::Strict);
    common::finish(store).await;
}

#[tokio::test]
async fn concurrent_terminal_writes_from_two_stores_record_exactly_one_per_run() {
    let config = common::config();
    let a = Arc::new(common::open(config.clone()).await);
    let b = Arc::new(
        PostgresStore::open(config.clone())
            .await
            .expect("second store"),
    );
    let runs: Vec<_> = (0..20u128).map(common::record).collect();
    a.insert(
        runs.iter().map(|r| (r.clone(), None)).collect(),
        Timestamp(1),
    )
    .await
    .expect("insert");
    let statuses = [
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Canceled,
        RunStatus::TimedOut,
    ];
    let mut tasks = Vec::new();
    for r in &runs {
        for (i, status) in statuses.into_iter().enumerate() {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = r.id;
            tasks.push(tokio::spawn(async move {
                (
                    id,
                    store
                        .finish(id, status, None, None, Timestamp(10 + i as u64))
                        .await,
                )
            }));
        }
    }
    let mut won = std::collections::HashMap::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (id, Ok(record)) => {
                assert!(
                    won.insert(id, record.status).is_none(),
                    "two winners for {id}"
                );
            }
            (id, Err(StoreError::AlreadyFinished { run, status })) => {
                assert_eq!(run, id);
                refused.push((id, status));
            }
            (id, Err(e)) => panic!("{id}: {e}"),
        }
    }
    assert_eq!(won.len(), runs.len(), "every run has exactly one winner");
    assert_eq!(refused.len(), runs.len() * 3);
    for (id, status) in refused {
        assert_eq!(
            won.get(&id),
            Some(&status),
            "refusals name the winning status"
        );
    }
    for r in &runs {
        let stored = a.get(r.id).await.expect("get").expect("run");
        assert_eq!(
            Some(&stored.status),
            won.get(&r.id),
            "the stored state is the winner's"
        );
    }
    drop(b);
    let a = Arc::try_unwrap(a).expect("last handle");
    common::finish(a).await;
}

#[tokio::test]
async fn a_call_the_server_refuses_fails_alone_and_its_batch_commits() {
    let mut config = common::config();
    config.writers = 1;
    let store = Arc::new(common::open(config.clone()).await);
    let lock = lock_runs(&config.schema).await;
    let spawn = |r: runlane_core::backend::RunRecord| {
        let store = store.clone();
        tokio::spawn(async move { store.insert(vec![(r, None)], Timestamp(1)).await })
    };
    let first = spawn(common::record(0));
    common::until(&store, "call 0 in the writer", |s| s.batches_taken == 1).await;
    // PostgreSQL text cannot hold a NUL character: this call's rows are refused by the server.
    let mut bad = common::record(2);
    bad.payload = Arc::from("\"a\u{0}b\"");
    let good = spawn(common::record(1));
    let bad = spawn(bad);
    common::until(&store, "two queued calls", |s| s.queued == 2).await;
    lock.release().await;
    assert_eq!(first.await.expect("task"), Ok(vec![Inserted::New]));
    assert_eq!(good.await.expect("task"), Ok(vec![Inserted::New]));
    let refused = bad.await.expect("task");
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    let stats = store.stats();
    assert_eq!(stats.split_batches, 1, "{stats:?}");
    assert!(store
        .get(common::record(1).id)
        .await
        .expect("get")
        .is_some());
    assert_eq!(store.get(common::record(2).id).await.expect("get"), None);
    let store = Arc::try_unwrap(store).expect("last handle");
    common::finish(store).await;
}

#[tokio::test]
async fn the_server_sees_exactly_two_row_writes_per_successful_run() {
    let config = common::config();
    let store = Arc::new(common::open(config.clone()).await);
    // A row trigger (test only) records every insert and update of `runs` on the server side.
    let s = &config.schema;
    let mut conn = common::count_row_writes(s).await;
    let mut tasks = Vec::new();
    for n in 0..30u128 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let r = common::record(n);
            store.insert(vec![(r.clone(), None)], Timestamp(1)).await?;
            store.note_start(r.id, 1, Timestamp(2));
            store
                .finish(
                    r.id,
                    RunStatus::Completed,
                    Some(Arc::from("null")),
                    None,
                    Timestamp(3),
                )
                .await
        }));
    }
    let mut finished = Vec::new();
    for t in tasks {
        let done = t.await.expect("task").expect("run");
        assert_eq!(done.started_at, Some(Timestamp(2)));
        finished.push(done.id);
    }
    // The distributed shape's marker batch for these runs lands after they finished (a quick
    // run): it writes none of them (the terminal write already set `in_queue`).
    assert_eq!(
        store.mark_in_queue(&finished).await.expect("late mark"),
        0,
        "a late in_queue mark writes no finished row"
    );
    let per_run: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE op = 'INSERT'), count(*) FILTER (WHERE op = 'UPDATE') \
         FROM \"{s}\".row_writes GROUP BY id"
    ))
    .fetch_all(&mut conn)
    .await
    .expect("count");
    assert_eq!(per_run.len(), 30);
    assert!(
        per_run.iter().all(|&c| c == (1, 1)),
        "one insert and one update per run: {per_run:?}"
    );
    // A run the queue holds that has not finished yet is still marked (one update), and one
    // whose enqueue never happened stays `pending_enqueue` for the reconciler.
    let (held, missed) = (common::record(100), common::record(101));
    store
        .insert(
            vec![(held.clone(), None), (missed.clone(), None)],
            Timestamp(1),
        )
        .await
        .expect("insert");
    assert_eq!(store.mark_in_queue(&[held.id]).await.expect("mark"), 1);
    let pending: Vec<_> = store
        .pending_enqueue(10)
        .await
        .expect("pending")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, vec![missed.id], "the missed enqueue is found");
    for (run, writes) in [(held.id, (1, 1)), (missed.id, (1, 0))] {
        let counted: (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE op = 'INSERT'), count(*) FILTER (WHERE op = 'UPDATE') \
             FROM \"{s}\".row_writes WHERE id = $1"
        ))
        .bind(run.to_bytes().to_vec())
        .fetch_one(&mut conn)
        .await
        .expect("count");
        assert_eq!(counted, writes, "row writes of {run}");
    }
    let _ = conn.close().await;
    let store = Arc::try_unwrap(store).expect("last handle");
    common::finish(store).await;
}

#[tokio::test]
async fn kept_starts_are_written_when_the_store_is_dropped_or_flushed() {
    let mut config = common::config();
    config.start_flush_after = Duration::from_secs(3600);
    let store = common::open(config.clone()).await;
    let (a, b) = (common::record(1), common::record(2));
    store
        .insert(vec![(a.clone(), None), (b.clone(), None)], Timestamp(1))
        .await
        .expect("insert");
    store.note_start(a.id, 1, Timestamp(5));
    assert_eq!(store.flush_starts().await.expect("flush"), 1);
    assert_eq!(store.stats().starts_kept, 0);
    store.note_start(b.id, 1, Timestamp(6));
    drop(store);
    // Another store sees both starts in the rows (the dropped one's writers commit the last).
    let other = PostgresStore::open(config.clone()).await.expect("reopen");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = vec![
            started_at(&other, a.id).await,
            started_at(&other, b.id).await,
        ];
        if got == vec![Some(Timestamp(5)), Some(Timestamp(6))] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "starts not written: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    common::finish(other).await;
}

async fn started_at(store: &PostgresStore, run: runlane_core::RunId) -> Option<Timestamp> {
    store
        .get(run)
        .await
        .expect("get")
        .and_then(|r| r.started_at)
}

#[tokio::test]
async fn new_runs_skip_the_conflict_checks_and_a_stored_id_is_still_replaced() {
    let store = common::open(common::config()).await;
    // Generated ids are new: a lone insert and a call of many go in without `ON CONFLICT`.
    let inserted = store
        .insert(vec![(common::record(0), None)], Timestamp(1))
        .await
        .expect("insert one");
    assert_eq!(inserted, vec![Inserted::New]);
    let many: Vec<_> = (1..4).map(|n| (common::record(n), None)).collect();
    let inserted = store.insert(many, Timestamp(1)).await.expect("insert many");
    assert_eq!(inserted, vec![Inserted::New; 3]);
    assert_eq!(store.stats().insert_conflicts, 0, "{:?}", store.stats());

    // A run stored again under its id (alone, then among new ones) is replaced, as with the
    // checks: the statement that failed on the stored id is made again with them.
    let mut again = common::record(0);
    again.payload = Arc::from(r#"{"to": "b@example.com"}"#);
    let inserted = store
        .insert(vec![(again.clone(), None)], Timestamp(2))
        .await
        .expect("insert a stored id");
    assert_eq!(inserted, vec![Inserted::New]);
    assert_eq!(store.stats().insert_conflicts, 1, "{:?}", store.stats());
    let mut twice = common::record(2);
    twice.payload = Arc::from(r#"{"to": "c@example.com"}"#);
    let mixed = vec![
        (common::record(4), None),
        (twice.clone(), None),
        (common::record(5), None),
    ];
    let inserted = store
        .insert(mixed, Timestamp(2))
        .await
        .expect("insert among new ones");
    assert_eq!(inserted, vec![Inserted::New; 3]);
    let stats = store.stats();
    assert_eq!(stats.insert_conflicts, 2, "{stats:?}");
    assert_eq!(stats.rows_replaced, 2, "{stats:?}");
    assert_eq!(stats.failed_batches, 0, "{stats:?}");
    for (run, payload) in [
        (common::record(0).id, again.payload.clone()),
        (common::record(2).id, twice.payload.clone()),
        (common::record(4).id, common::record(4).payload),
        (common::record(5).id, common::record(5).payload),
    ] {
        let stored = store.get(run).await.expect("get").expect("stored");
        assert_eq!(stored.payload, payload, "{run}");
    }
    let listed = store
        .list(&runlane_core::backend::RunFilter::default())
        .await
        .expect("list");
    assert_eq!(listed.len(), 6, "one row per id");
    common::finish(store).await;
}
