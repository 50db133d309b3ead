//! Dual-read of the previous key-space format: a small key space written by the format-1 script
//! (the base commit's `dispatch.lua`, kept as `testdata/dispatch_fmt1.lua`) on the shared Redis
//! under a fresh prefix, then opened with this build, which migrates it in one script.

use runlane_core::backend::{Dispatch, QueueBackend};
use runlane_core::{EnvName, EnvSettings, LaneName, RunId, RunStatus, Timestamp};

use crate::queue::{put_env_args, Arg};
use crate::test_support::{self as support, connect, url};
use crate::{record, RedisConfig, RedisQueue, KEYSPACE_FORMAT};

const FORMAT1_SCRIPT: &str = include_str!("testdata/dispatch_fmt1.lua");

/// One call of the format-1 script, as a format-1 client made it.
async fn old_call(
    conn: &mut redis::aio::MultiplexedConnection,
    base: &str,
    op: &str,
    now: u64,
    args: Vec<Arg>,
) -> String {
    support::legacy_call(conn, "EVAL", FORMAT1_SCRIPT, base, (op, now, "1"), args).await
}

fn dispatch(n: u128, env: &EnvName, run_after: u64, ttl: Option<u64>) -> Dispatch {
    support::dispatch(n, env, "", run_after, ttl)
}

#[tokio::test]
async fn a_format1_key_space_is_migrated_on_open_and_read() {
    let prefix = format!("rl:test:fmt1:{}", std::process::id());
    let base = format!("{{{prefix}}}");
    let Some(mut conn) = connect().await else {
        return;
    };
    let env = EnvName::new("e").expect("env name");
    // Written by the format-1 script: limit 0, so every run stays pending.
    let mut lanes: Vec<Arg> = vec!["g1".into(), "0".into()];
    for lane in LaneName::BUILT_IN {
        lanes.push(lane.into());
    }
    assert_eq!(old_call(&mut conn, &base, "init", 0, lanes).await, "ok");
    let closed = EnvSettings {
        limit: 0,
        ..EnvSettings::default()
    };
    let put = old_call(&mut conn, &base, "put_env", 0, put_env_args(&env, &closed)).await;
    assert_eq!(put, "ok");
    let runs = [
        dispatch(1, &env, 0, Some(5_000)),      // queued, TTL 5 s
        dispatch(2, &env, 0, None),             // queued, no TTL
        dispatch(3, &env, 10_000, Some(5_500)), // delayed, TTL 5.5 s
        dispatch(4, &env, 0, Some(9_000)),      // queued, TTL 9 s
    ];
    for d in &runs {
        let args = vec![d.run_id.into(), record::pack_new(d).into(), "0".into()];
        assert_eq!(old_call(&mut conn, &base, "enqueue", 0, args).await, "ok");
    }
    let ttl_members: u64 = redis::cmd("ZCARD")
        .arg(format!("{base}:ttl"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(ttl_members, 3, "format 1 keeps one TTL zset member per run");

    // Opened by this build: migrated in one script.
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix))
        .await
        .expect("a format-1 key space opens")
        .delete_keys_on_drop();
    let fmt: String = redis::cmd("HGET")
        .arg(format!("{base}:cfg"))
        .arg("fmt")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(fmt, KEYSPACE_FORMAT.to_string());
    let old_index: u64 = redis::cmd("EXISTS")
        .arg(format!("{base}:ttl"))
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(old_index, 0, "the per-run TTL zset is gone");

    // Every run reads back as it was written.
    let snapshot = queue.snapshot().await.expect("snapshot");
    let got: Vec<(RunId, RunStatus, Option<Timestamp>)> = snapshot
        .iter()
        .map(|r| (r.dispatch.run_id, r.status, r.dispatch.ttl_deadline))
        .collect();
    let want: Vec<(RunId, RunStatus, Option<Timestamp>)> = runs
        .iter()
        .map(|d| {
            let status = if d.run_after.0 > 0 {
                RunStatus::Delayed
            } else {
                RunStatus::Queued
            };
            (d.run_id, status, d.ttl_deadline)
        })
        .collect();
    assert_eq!(got, want);

    // TTLs expire exactly at their deadlines, from the migrated buckets.
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(5_000))
    );
    let early = queue.tick(Timestamp(4_999)).await.expect("tick");
    assert!(early.expired.is_empty(), "nothing expires early");
    let tick = queue.tick(Timestamp(5_000)).await.expect("tick");
    let expired: Vec<RunId> = tick.expired.iter().map(|d| d.run_id).collect();
    assert_eq!(expired, vec![runs[0].run_id]);
    assert_eq!(tick.effects.deadline, Some(Timestamp(5_500)));
    let tick = queue.tick(Timestamp(5_500)).await.expect("tick");
    let expired: Vec<RunId> = tick.expired.iter().map(|d| d.run_id).collect();
    assert_eq!(expired, vec![runs[2].run_id]);
    assert_eq!(tick.effects.deadline, Some(Timestamp(9_000)));

    // And the queue works on: open the env, claim both remaining runs in order.
    let open = EnvSettings {
        limit: 10,
        ..EnvSettings::default()
    };
    queue
        .put_env(&env, open, Timestamp(6_000))
        .await
        .expect("put_env");
    let request = support::claim_all(&env);
    let claimed: Vec<RunId> = queue
        .claim(&request, Timestamp(6_000))
        .await
        .expect("claim")
        .iter()
        .map(|l| l.dispatch.run_id)
        .collect();
    assert_eq!(claimed, vec![runs[1].run_id, runs[3].run_id]);
    // The claimed run's TTL no longer counts: no TTL deadline is left.
    let tick = queue.tick(Timestamp(9_000)).await.expect("tick");
    assert!(tick.expired.is_empty());
    let buckets: u64 = redis::cmd("ZCARD")
        .arg(format!("{base}:tbz"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(
        buckets, 0,
        "the bucket of a claimed run is gone with its last live run"
    );
}

/// A key space rewritten in format 1 while this build has it open (an older process rebuilt it
/// after a loss) is migrated by the next call, which then reads it.
#[tokio::test]
async fn a_call_finding_format1_migrates_it_and_goes_on() {
    let prefix = format!("rl:test:fmt1late:{}", std::process::id());
    let base = format!("{{{prefix}}}");
    let Some(mut conn) = connect().await else {
        return;
    };
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    queue.delete_keys().await.expect("the key space is lost");
    let env = EnvName::new("e").expect("env name");
    let mut lanes: Vec<Arg> = vec!["old".into(), "0".into()];
    for lane in LaneName::BUILT_IN {
        lanes.push(lane.into());
    }
    assert_eq!(old_call(&mut conn, &base, "init", 0, lanes).await, "ok");
    let closed = EnvSettings {
        limit: 0,
        ..EnvSettings::default()
    };
    let put = old_call(&mut conn, &base, "put_env", 0, put_env_args(&env, &closed)).await;
    assert_eq!(put, "ok");
    let run = dispatch(7, &env, 0, Some(3_000));
    let args = vec![run.run_id.into(), record::pack_new(&run).into(), "0".into()];
    assert_eq!(old_call(&mut conn, &base, "enqueue", 0, args).await, "ok");

    let live = queue.live(run.run_id).await.expect("live after migration");
    assert_eq!(
        live.map(|l| (l.status, l.dispatch.ttl_deadline)),
        Some((RunStatus::Queued, Some(Timestamp(3_000))))
    );
    let fmt: String = redis::cmd("HGET")
        .arg(format!("{base}:cfg"))
        .arg("fmt")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(fmt, KEYSPACE_FORMAT.to_string());
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(3_000))
    );
    let tick = queue.tick(Timestamp(3_000)).await.expect("tick");
    let expired: Vec<RunId> = tick.expired.iter().map(|d| d.run_id).collect();
    assert_eq!(expired, vec![run.run_id]);
}
