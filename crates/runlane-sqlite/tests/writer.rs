//! The writer thread under concurrency: group commit, backpressure, and one run per
//! idempotency key however many triggers race for it.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{env, id, record};
use runlane_core::backend::{IdempotencyClaim, Inserted, RunFilter, RunStore};
use runlane_core::{StoreError, Timestamp};
use runlane_sqlite::{SqliteConfig, SqliteStore};
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inserts_share_commits() {
    let dir = common::tempdir();
    let store = Arc::new(common::open(&dir.path().join("runs.db")));
    const CALLS: u64 = 1_000;
    let mut calls = JoinSet::new();
    for n in 0..CALLS {
        let store = store.clone();
        calls.spawn(async move {
            let run = record(id(1_000 + n, u128::from(n)), "prod", "email", 1_000 + n);
            store.insert(vec![(run, None)], Timestamp(1_000 + n)).await
        });
    }
    while let Some(answer) = calls.join_next().await {
        let answer = answer.expect("task");
        assert!(
            matches!(answer.as_deref(), Ok([Inserted::New])),
            "{answer:?}"
        );
    }
    let stats = store.stats();
    eprintln!("group commit: {stats:?}");
    assert_eq!(stats.calls_committed, CALLS, "every call was committed");
    assert_eq!(stats.failed_batches, 0);
    assert!(
        stats.commits < CALLS,
        "calls were grouped into fewer commits: {stats:?}"
    );
    assert!(stats.largest_batch > 1, "{stats:?}");
    let stored = store
        .list(&RunFilter {
            limit: Some(1_000),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(stored.len() as u64, CALLS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_triggers_with_one_idempotency_key_yield_one_run() {
    let dir = common::tempdir();
    let store = Arc::new(common::open(&dir.path().join("runs.db")));
    let mut calls = JoinSet::new();
    for n in 0..50u64 {
        let store = store.clone();
        calls.spawn(async move {
            let mut run = record(id(5_000, u128::from(n)), "prod", "charge", 5_000);
            run.idempotency_key = Some("order-42".into());
            let claim = IdempotencyClaim {
                key: "order-42".into(),
                expires_at: Timestamp(100_000),
            };
            let answer = store
                .insert(vec![(run.clone(), Some(claim))], Timestamp(5_000))
                .await;
            (run.id, answer)
        });
    }
    let mut winners = Vec::new();
    let mut named = HashSet::new();
    while let Some(joined) = calls.join_next().await {
        let (run, answer) = joined.expect("task");
        match answer.expect("insert").as_slice() {
            [Inserted::New] => winners.push(run),
            [Inserted::Existing(existing)] => {
                named.insert(existing.id);
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one trigger created a run");
    assert_eq!(named, HashSet::from([winners[0]]), "every hit names it");
    let runs = store
        .list(&RunFilter {
            env: Some(env("prod")),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, winners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_fails_fast_with_unavailable_instead_of_hanging() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let store = Arc::new(
        SqliteStore::open(
            &path,
            SqliteConfig {
                write_queue: 1,
                write_batch_max: 1,
                enqueue_timeout: Duration::from_millis(50),
                // The writer waits on the foreign lock for the whole test, never failing on it.
                busy_timeout: Duration::from_secs(60),
                ..common::config()
            },
        )
        .expect("open"),
    );
    // Another connection holds the write lock: the writer blocks on its first batch.
    let blocker = rusqlite::Connection::open(&path).expect("raw connection");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");

    // At most two calls fit (one held by the writer, one in the queue of 1); the rest must
    // fail once `enqueue_timeout` has passed.
    const CALLS: usize = 6;
    let mut calls = JoinSet::new();
    for n in 0..CALLS {
        let store = store.clone();
        calls.spawn(async move {
            let name = env(&format!("env-{n}"));
            store.put_env(&name, Default::default()).await
        });
    }
    for _ in 0..CALLS - 2 {
        let answer = calls.join_next().await.expect("a call").expect("task");
        // Nothing can commit while the lock is held, so whatever finishes first was refused.
        assert!(
            matches!(&answer, Err(StoreError::Unavailable(m)) if m.contains("queue")),
            "{answer:?}"
        );
    }
    blocker.execute_batch("ROLLBACK").expect("release the lock");
    // The calls that were queued now commit (or also timed out, if the writer thread had not
    // taken the first one before the others gave up).
    let mut committed = 0;
    while let Some(answer) = calls.join_next().await {
        match answer.expect("task") {
            Ok(()) => committed += 1,
            Err(StoreError::Unavailable(m)) => assert!(m.contains("queue"), "{m}"),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        committed >= 1,
        "a queued call commits once the lock is gone"
    );
    let stats = store.stats();
    assert_eq!(stats.queue_timeouts as usize, CALLS - committed);
    assert_eq!(store.envs().await.expect("envs").len(), committed);
    // And the store works normally afterwards.
    store
        .put_env(&env("after"), Default::default())
        .await
        .expect("writes resume");
}
