//! `PostgresStore::finish_many`: the terminal writes of a batch of ended attempts go in one
//! statement per durability (one commit each), answered per run (written, already finished,
//! stale attempt, unknown), two row writes per run on the success path.

mod common;

use std::sync::Arc;

use runlane_core::backend::{AttemptEnd, AttemptRecord, RunStore};
use runlane_core::{EnvName, RunId, RunStatus, StoreError, Timestamp};
use runlane_postgres::Durability;
use sqlx::Connection;

fn end(run: RunId, number: u32, output: &str) -> AttemptEnd {
    AttemptEnd {
        run,
        status: RunStatus::Completed,
        output: Some(Arc::from(output)),
        attempt: AttemptRecord {
            number,
            outcome: "completed".into(),
            error: None,
            ended_at: Timestamp(50),
        },
    }
}

#[tokio::test]
async fn a_batch_of_ends_commits_together_and_is_answered_per_run() {
    let mut config = common::config();
    config
        .env_durability
        .insert("fast".into(), Durability::Relaxed);
    let store = common::open(config).await;
    assert!(store.group_commits());
    let runs = common::insert_records(&store, 8).await;
    let mut relaxed = common::record(100);
    relaxed.env = EnvName::new("fast").expect("env");
    store
        .insert(vec![(relaxed.clone(), None)], Timestamp(1))
        .await
        .expect("relaxed insert");
    let id = |i: usize| runs[i].id;
    // Run 3 already finished, run 4 moved on to attempt 2, run 0 has a kept start.
    store
        .finish(id(3), RunStatus::Canceled, None, None, Timestamp(10))
        .await
        .expect("cancel 3");
    store
        .record_retry(
            id(4),
            AttemptRecord {
                number: 1,
                outcome: "crashed".into(),
                error: None,
                ended_at: Timestamp(10),
            },
            Timestamp(10),
        )
        .await
        .expect("retry 4");
    store.note_start(id(0), 1, Timestamp(20));
    let unknown = RunId(7 << 100);
    let before = store.stats();
    let answers = store
        .finish_many(
            vec![
                end(id(0), 1, "\"a\""),
                end(id(1), 1, "\"b\""),
                end(relaxed.id, 1, "\"r\""),
                end(id(3), 1, "\"late\""),
                end(id(4), 1, "\"zombie\""),
                end(unknown, 1, "null"),
                end(id(5), 1, "\"first\""),
                end(id(5), 1, "\"second\""),
                end(id(6), 1, "\"c\""),
            ],
            Timestamp(60),
        )
        .await
        .expect("finish_many");
    assert_eq!(
        answers,
        vec![
            Ok(()),
            Ok(()),
            Ok(()),
            Err(StoreError::AlreadyFinished {
                run: id(3),
                status: RunStatus::Canceled
            }),
            Err(StoreError::StaleAttempt {
                run: id(4),
                attempt: 1,
                current: 2
            }),
            Err(StoreError::NotFound(unknown)),
            Ok(()),
            Err(StoreError::AlreadyFinished {
                run: id(5),
                status: RunStatus::Completed
            }),
            Ok(()),
        ]
    );
    let after = store.stats();
    assert!(
        after.commits - before.commits <= 2,
        "one commit per durability: {before:?} → {after:?}"
    );
    assert_eq!(after.rows_finished - before.rows_finished, 5);
    for (i, output) in [(0, "\"a\""), (1, "\"b\""), (5, "\"first\""), (6, "\"c\"")] {
        let r = store.get(id(i)).await.expect("get").expect("run");
        assert_eq!(r.status, RunStatus::Completed, "run {i}");
        assert_eq!(r.output.as_deref(), Some(output), "run {i}");
        assert_eq!(r.finished_at, Some(Timestamp(60)), "run {i}");
        assert_eq!(r.attempts.len(), 1, "run {i}");
    }
    let r0 = store.get(id(0)).await.expect("get").expect("run");
    assert_eq!(
        r0.started_at,
        Some(Timestamp(20)),
        "the kept start is written"
    );
    let r = store.get(relaxed.id).await.expect("get").expect("run");
    assert_eq!(r.status, RunStatus::Completed);
    assert_eq!(r.output.as_deref(), Some("\"r\""));
    let r3 = store.get(id(3)).await.expect("get").expect("run");
    assert_eq!(
        r3.status,
        RunStatus::Canceled,
        "a refused end changes nothing"
    );
    let r4 = store.get(id(4)).await.expect("get").expect("run");
    assert_eq!(
        (r4.status, r4.attempt, r4.output),
        (RunStatus::Queued, 2, None)
    );
    assert_eq!(
        store.get(id(2)).await.expect("get").expect("run").status,
        RunStatus::Queued
    );
    common::finish(store).await;
}

#[tokio::test]
async fn batched_ends_cost_one_update_per_run() {
    let config = common::config();
    let store = common::open(config.clone()).await;
    let s = &config.schema;
    let mut conn = common::count_row_writes(s).await;
    let runs = common::insert_records(&store, 40).await;
    for r in &runs {
        store.note_start(r.id, 1, Timestamp(2));
    }
    let answers = store
        .finish_many(
            runs.iter().map(|r| end(r.id, 1, "null")).collect(),
            Timestamp(3),
        )
        .await
        .expect("finish_many");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let per_run: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE op = 'INSERT'), count(*) FILTER (WHERE op = 'UPDATE') \
         FROM \"{s}\".row_writes GROUP BY id"
    ))
    .fetch_all(&mut conn)
    .await
    .expect("count");
    assert_eq!(per_run.len(), 40);
    assert!(
        per_run.iter().all(|&c| c == (1, 1)),
        "one insert and one update per run: {per_run:?}"
    );
    let _ = conn.close().await;
    common::finish(store).await;
}
