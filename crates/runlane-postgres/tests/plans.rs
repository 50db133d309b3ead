//! A lone run's read, mark and terminal write stay index lookups as `runs` grows. PostgreSQL
//! may switch a prepared statement to a generic plan made from the statistics of that moment;
//! one made while the table was small joined a batch by a sequential scan of the whole table,
//! and kept doing so.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use runlane_core::backend::{AttemptEnd, AttemptRecord, RunStore};
use runlane_core::{RunStatus, Timestamp};
use sqlx::{Connection, Row};

fn end(n: u128) -> AttemptEnd {
    AttemptEnd {
        run: common::record(n).id,
        status: RunStatus::Completed,
        output: Some(Arc::from("null")),
        attempt: AttemptRecord {
            number: 1,
            outcome: "completed".into(),
            error: None,
            ended_at: Timestamp(2_000),
        },
    }
}

/// A lone run's trip through the store: read back (a claim of one), marked `in_queue`, ended.
async fn finish_one(store: &runlane_postgres::PostgresStore, n: u128) {
    let id = common::record(n).id;
    let read = store.get_many(&[id]).await.expect("get_many");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].as_ref().map(|r| r.id), Some(id));
    assert_eq!(store.mark_in_queue(&[id]).await.expect("mark"), 1);
    let answers = store
        .finish_many(vec![end(n)], Timestamp(2_000))
        .await
        .expect("finish_many");
    assert_eq!(answers, vec![Ok(())]);
}

#[tokio::test]
async fn terminal_writes_after_the_table_grew_do_not_scan_it() {
    let store = common::open(common::config()).await;
    let schema = store.schema().to_string();
    const TINY: u128 = 30;
    const FILL: u128 = 6_000;
    const LATER: u128 = 10;
    // While the table is tiny: enough single-run terminal writes for every writer connection
    // to run the statement more than five times (when PostgreSQL may settle on a generic plan).
    for n in 0..TINY {
        store
            .insert(vec![(common::record(n), None)], Timestamp(1_000))
            .await
            .expect("insert");
        finish_one(&store, n).await;
    }
    for chunk in (TINY..TINY + FILL).collect::<Vec<_>>().chunks(1_000) {
        let rows = chunk.iter().map(|&n| (common::record(n), None)).collect();
        store.insert(rows, Timestamp(1_000)).await.expect("fill");
    }
    for n in TINY..TINY + LATER {
        finish_one(&store, n).await;
    }
    // A backend reports its table statistics when it exits at the latest: close the pools,
    // then wait until every update is counted.
    drop(store);
    let mut conn = sqlx::PgConnection::connect(&common::url())
        .await
        .expect("connect");
    let until = Instant::now() + Duration::from_secs(30);
    let (updated, seq_read) = loop {
        let row = sqlx::query(
            "SELECT n_tup_upd, seq_tup_read FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'runs'",
        )
        .bind(&schema)
        .fetch_one(&mut conn)
        .await
        .expect("table statistics");
        let (updated, seq_read): (i64, i64) = (row.get(0), row.get(1));
        if updated >= 2 * (TINY + LATER) as i64 || Instant::now() > until {
            break (updated, seq_read);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        updated,
        2 * (TINY + LATER) as i64,
        "every mark and terminal write counted"
    );
    // Scans of the tiny table read at most a few rows each; one scan after the fill reads
    // all 6,030 (a read, a mark or a terminal write).
    assert!(
        seq_read < FILL as i64,
        "{seq_read} rows read by sequential scans: a lone run's statement scanned the table"
    );
    let _ = conn.close().await;
    runlane_postgres::admin::drop_schema(&common::url(), &schema)
        .await
        .expect("drop the test schema");
}

/// The rows the schema's `runs` table had read by sequential scans and fetched through
/// indexes, and its scans, once `settled` holds for (rows inserted, rows updated, scans) (a
/// backend reports its statistics when it exits at the latest); `None` after 30 s.
async fn rows_read(schema: &str, settled: impl Fn(i64, i64, i64) -> bool) -> Option<[i64; 3]> {
    let mut conn = sqlx::PgConnection::connect(&common::url())
        .await
        .expect("connect");
    let until = Instant::now() + Duration::from_secs(30);
    let read = loop {
        let row = sqlx::query(
            "SELECT seq_tup_read, coalesce(idx_tup_fetch, 0), seq_scan + coalesce(idx_scan, 0), \
             n_tup_ins, n_tup_upd FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'runs'",
        )
        .bind(schema)
        .fetch_one(&mut conn)
        .await
        .expect("table statistics");
        let v: [i64; 5] = [row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)];
        if settled(v[3], v[4], v[2]) {
            break Some([v[0], v[1], v[2]]);
        }
        if Instant::now() > until {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = conn.close().await;
    read
}

#[tokio::test]
async fn an_env_listing_reads_that_envs_runs_only() {
    let config = common::config();
    let schema = config.schema.clone();
    let store = common::open(config.clone()).await;
    // 3,000 runs of env `other`, then 3,000 of `prod` (later ids), a third of them finished:
    // no index keeps an env's runs in id order whatever their status, and reading all of
    // `prod`'s (then sorting them) or every run in id order up to `prod`'s would read
    // thousands of rows.
    const FILL: u128 = 3_000;
    for chunk in (0..FILL).collect::<Vec<_>>().chunks(1_000) {
        let rows = chunk
            .iter()
            .map(|&n| {
                let mut r = common::record(n);
                r.env = runlane_core::EnvName::new("other").expect("env");
                (r, None)
            })
            .collect();
        store.insert(rows, Timestamp(1_000)).await.expect("fill");
    }
    let prod: Vec<_> = (FILL..2 * FILL).map(common::record).collect();
    for chunk in prod.chunks(1_000) {
        let rows = chunk.iter().map(|r| (r.clone(), None)).collect();
        store
            .insert(rows, Timestamp(1_000))
            .await
            .expect("insert prod");
    }
    let ends: Vec<_> = (FILL..2 * FILL).step_by(3).map(end).collect();
    assert_eq!(
        store
            .finish_many(ends, Timestamp(2_000))
            .await
            .expect("finish"),
        vec![Ok(()); 1_000]
    );
    drop(store);
    let before = rows_read(&schema, |ins, upd, _| ins == 6_000 && upd == 1_000)
        .await
        .expect("the fill's statistics");

    let store = common::open(config).await;
    let filter = runlane_core::backend::RunFilter {
        env: Some(runlane_core::EnvName::new("prod").expect("env")),
        limit: Some(10),
        ..Default::default()
    };
    let listed = store.list(&filter).await.expect("list");
    let ids: Vec<_> = listed.iter().map(|r| r.id).collect();
    let expected: Vec<_> = prod.iter().take(10).map(|r| r.id).collect();
    assert_eq!(
        ids, expected,
        "the env's first ten runs, in id order, any status"
    );
    drop(store);
    let after = rows_read(&schema, |_, _, scans| scans > before[2])
        .await
        .expect("the listing's statistics");
    let (seq, idx) = (after[0] - before[0], after[1] - before[1]);
    assert!(
        seq + idx < 1_000,
        "listing ten runs of env prod read {seq} rows by sequential scans and {idx} through \
         indexes"
    );
    runlane_postgres::admin::drop_schema(&common::url(), &schema)
        .await
        .expect("drop the test schema");
}
