//! What is written survives the store: drop, reopen, everything is there; recovery sees exactly
//! the runs that are not finished. Retention deletes finished runs past their keep time, with
//! their attempts and idempotency keys, and nothing else.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{attempt, env, id, record, task};
use runlane_core::backend::{IdempotencyClaim, Inserted, RunFilter, RunRecord, RunStore};
use runlane_core::{EnvSettings, RunStatus, TaskDef, Timestamp, VersionDef};
use runlane_sqlite::{Retention, SqliteConfig, SqliteStore};

fn all() -> RunFilter {
    RunFilter {
        limit: Some(1_000),
        ..Default::default()
    }
}

#[tokio::test]
async fn everything_written_is_there_after_reopening() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let prod = env("prod");
    let store = common::open(&path);
    let settings = EnvSettings {
        limit: 12,
        burst: 2.5,
        ..EnvSettings::default()
    };
    store.put_env(&prod, settings).await.expect("put_env");
    let v1 = VersionDef {
        tasks: vec![TaskDef::new(task("email"))],
    };
    assert_eq!(
        store.add_version(&prod, v1.clone(), Timestamp(1)).await,
        Ok(1)
    );
    store.promote(&prod, 1).await.expect("promote");

    // Twenty runs, left in every state the store records.
    let mut runs = Vec::new();
    for n in 0..20u64 {
        let mut r = record(id(1_000 + n, u128::from(n)), "prod", "email", 1_000 + n);
        r.idempotency_key = Some(format!("key-{n}"));
        let claim = IdempotencyClaim {
            key: format!("key-{n}"),
            expires_at: Timestamp(1_000_000),
        };
        runs.push((r, Some(claim)));
    }
    let ids: Vec<_> = runs.iter().map(|(r, _)| r.id).collect();
    store.insert(runs, Timestamp(1_000)).await.expect("insert");
    for (n, run) in ids.iter().enumerate() {
        match n % 4 {
            0 => {
                store
                    .finish(
                        *run,
                        RunStatus::Completed,
                        Some(Arc::from("{\"ok\":true}")),
                        Some(attempt(1, "completed", None, 2_000)),
                        Timestamp(2_000),
                    )
                    .await
                    .expect("finish");
            }
            1 => store
                .record_retry(
                    *run,
                    attempt(1, "failed", Some("boom"), 2_000),
                    Timestamp(9_000),
                )
                .await
                .expect("retry"),
            2 => store
                .reschedule(*run, Timestamp(50_000), Some(Timestamp(90_000)))
                .await
                .expect("reschedule"),
            _ => {}
        }
    }
    let before: Vec<RunRecord> = store.list(&all()).await.expect("list");
    assert_eq!(before.len(), 20);
    drop(store);

    let store = common::open(&path);
    assert_eq!(store.list(&all()).await.expect("list"), before);
    assert_eq!(store.envs().await, Ok(vec![(prod.clone(), settings)]));
    assert_eq!(store.current_version(&prod).await, Ok(1));
    assert_eq!(store.version(&prod, 1).await, Ok(Some(v1)));
    // Idempotency keys survived too.
    let mut dup = record(id(3_000, 99), "prod", "email", 3_000);
    dup.idempotency_key = Some("key-7".into());
    let claim = IdempotencyClaim {
        key: "key-7".into(),
        expires_at: Timestamp(1_000_000),
    };
    let answer = store
        .insert(vec![(dup, Some(claim))], Timestamp(3_000))
        .await
        .expect("insert");
    assert!(
        matches!(&answer[..], [Inserted::Existing(r)] if r.id == ids[7]),
        "{answer:?}"
    );
    // Recovery sees exactly the runs that are not finished, in id order.
    let unfinished = store.unfinished().await.expect("unfinished");
    let expected: Vec<_> = before
        .iter()
        .filter(|r| !r.status.is_terminal())
        .cloned()
        .collect();
    assert_eq!(unfinished.len(), 15);
    assert_eq!(unfinished, expected);
}

#[tokio::test]
async fn retention_purges_finished_runs_past_their_keep_time_in_batches() {
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let store = SqliteStore::open(
        &path,
        SqliteConfig {
            purge_batch: 3,
            ..common::config()
        },
    )
    .expect("open");
    assert_eq!(store.earliest_finished_at().await, Ok(None));

    // Ten runs with idempotency keys: completed at 10_000 + n, failed at 20_000 + n,
    // or still waiting.
    let mut runs = Vec::new();
    for n in 0..10u64 {
        let mut r = record(id(1_000, u128::from(n)), "prod", "email", 1_000);
        r.idempotency_key = Some(format!("k{n}"));
        let claim = IdempotencyClaim {
            key: format!("k{n}"),
            expires_at: Timestamp(10_000_000),
        };
        runs.push((r, Some(claim)));
    }
    let ids: Vec<_> = runs.iter().map(|(r, _)| r.id).collect();
    store.insert(runs, Timestamp(1_000)).await.expect("insert");
    for (n, run) in ids.iter().enumerate() {
        let n = n as u64;
        let (status, at) = match n {
            0..=3 => (RunStatus::Completed, 10_000 + n),
            4..=6 => (RunStatus::Failed, 20_000 + n),
            _ => continue,
        };
        store
            .finish(
                *run,
                status,
                None,
                Some(attempt(1, status.as_str(), None, at)),
                Timestamp(at),
            )
            .await
            .expect("finish");
    }
    assert_eq!(
        store.earliest_finished_at().await,
        Ok(Some(Timestamp(10_000)))
    );
    let retention = Retention {
        completed: Some(Duration::from_secs(1)),
        failed: Some(Duration::from_secs(60)),
        ..Retention::default()
    };
    assert_eq!(
        store.next_purge_at(&retention).await,
        Ok(Some(Timestamp(11_000))),
        "the earliest completed run passes its keep time first"
    );

    // At 11_001 the completed runs finished at or before 10_001 are due (inclusive, the
    // instant next_purge_at reports): 0 and 1.
    assert_eq!(
        store.purge_finished(&retention, Timestamp(11_001)).await,
        Ok(2)
    );
    assert_eq!(store.get(ids[0]).await, Ok(None));
    assert_eq!(store.get(ids[1]).await, Ok(None));
    assert!(store.get(ids[2]).await.expect("get").is_some());
    // Far later, every completed and failed run is due (7 - 2 = 5, in batches of 3); the
    // waiting runs are never purged.
    assert_eq!(
        store.purge_finished(&retention, Timestamp(1_000_000)).await,
        Ok(5)
    );
    let left: Vec<_> = store
        .list(&all())
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, ids[7..].to_vec());
    assert_eq!(store.earliest_finished_at().await, Ok(None));
    assert_eq!(store.next_purge_at(&retention).await, Ok(None));
    assert_eq!(
        store.purge_finished(&retention, Timestamp(2_000_000)).await,
        Ok(0)
    );

    // Purged runs took their idempotency keys with them; live runs kept theirs.
    for (n, expect_new) in [(0usize, true), (5, true), (8, false)] {
        let mut r = record(id(2_000_000, 100 + n as u128), "prod", "email", 2_000_000);
        r.idempotency_key = Some(format!("k{n}"));
        let claim = IdempotencyClaim {
            key: format!("k{n}"),
            expires_at: Timestamp(10_000_000),
        };
        let answer = store
            .insert(vec![(r, Some(claim))], Timestamp(2_000_000))
            .await
            .expect("insert");
        assert_eq!(matches!(answer[..], [Inserted::New]), expect_new, "k{n}");
    }
    // And their attempts are gone from disk.
    let conn = rusqlite::Connection::open(&path).expect("raw");
    let attempts: i64 = conn
        .query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
        .expect("count");
    assert_eq!(attempts, 0, "only purged runs had attempts");
    let stats = store.stats();
    assert!(stats.failed_batches == 0, "{stats:?}");
}

#[tokio::test]
async fn size_reports_bytes_per_run() {
    let dir = common::tempdir();
    let store = common::open(&dir.path().join("runs.db"));
    let empty = store.size().await.expect("size");
    assert_eq!(empty.runs, 0);
    assert_eq!(empty.bytes_per_run(), None);
    let runs: Vec<_> = (0..500u64)
        .map(|n| {
            (
                record(id(1_000 + n, u128::from(n)), "prod", "email", 1_000 + n),
                None,
            )
        })
        .collect();
    let ids: Vec<_> = runs.iter().map(|(r, _)| r.id).collect();
    store.insert(runs, Timestamp(1_000)).await.expect("insert");
    for run in &ids[..100] {
        store
            .finish(*run, RunStatus::Completed, None, None, Timestamp(5_000))
            .await
            .expect("finish");
    }
    let size = store.size().await.expect("size");
    assert_eq!((size.runs, size.finished_runs), (500, 100));
    assert!(size.bytes > empty.bytes, "{size:?}");
    let per_run = size.bytes_per_run().expect("runs stored");
    eprintln!("sqlite bytes per run (small payload): {per_run:.0} ({size:?})");
    assert!(per_run > 50.0 && per_run < 2_000.0, "{per_run}");
}

/// Set in the child process of the crash test: the database path it writes to.
const CRASH_CHILD: &str = "RUNLANE_SQLITE_CRASH_CHILD";
/// The child's exit code once every write it made was acknowledged.
const CRASH_EXIT: i32 = 17;

#[tokio::test]
async fn acknowledged_writes_survive_a_crash() {
    if let Some(path) = std::env::var_os(CRASH_CHILD) {
        // The child: write, and once every call returned, die without closing anything (no
        // destructor runs, no checkpoint: the commits live only in the WAL).
        let store = common::open(Path::new(&path));
        let runs: Vec<_> = (0..10u64)
            .map(|n| {
                (
                    record(id(1_000, u128::from(n)), "prod", "email", 1_000),
                    None,
                )
            })
            .collect();
        store.insert(runs, Timestamp(1_000)).await.expect("insert");
        for n in 0..3u128 {
            store
                .finish(
                    id(1_000, n),
                    RunStatus::Completed,
                    None,
                    None,
                    Timestamp(2_000),
                )
                .await
                .expect("finish");
        }
        std::process::exit(CRASH_EXIT);
    }
    let dir = common::tempdir();
    let path = dir.path().join("runs.db");
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "acknowledged_writes_survive_a_crash",
            "--nocapture",
        ])
        .env(CRASH_CHILD, &path)
        .status()
        .expect("run the child");
    assert_eq!(
        status.code(),
        Some(CRASH_EXIT),
        "the child wrote, then died"
    );

    let wal = std::fs::metadata(dir.path().join("runs.db-wal")).expect("the child left a WAL");
    assert!(
        wal.len() > 0,
        "the commits are in the WAL, not checkpointed"
    );

    // The OS released the dead process's lock; the WAL is replayed.
    let store = common::open(&path);
    let runs = store.list(&all()).await.expect("list");
    assert_eq!(runs.len(), 10);
    let unfinished = store.unfinished().await.expect("unfinished");
    assert_eq!(
        unfinished.iter().map(|r| r.id).collect::<Vec<_>>(),
        (3..10u128).map(|n| id(1_000, n)).collect::<Vec<_>>()
    );
}
