//! Key-space format 3: a due run enqueued in order is only its key's list entry (no record)
//! until it is admitted; lookups by dispatch facts, tombstones, TTL expiry through the bucket
//! entry's location; the one-script migration from format 2 (the base commit's library, kept as
//! `testdata/dispatch_fmt2.lua`); and the refusal of an unknown newer format.

use std::time::Duration;

use runlane_core::backend::{CancelOutcome, Dispatch, EnqueueAs, Placement, QueueBackend};
use runlane_core::{EnvName, EnvSettings, LaneName, RunId, RunStatus, Timestamp};

use crate::queue::{put_env_args, Arg};
use crate::test_support::{self as support, claim_all, connect, url};
use crate::{record, RedisConfig, RedisOpenError, RedisQueue, KEYSPACE_FORMAT};

const FORMAT2_LIBRARY: &str = include_str!("testdata/dispatch_fmt2.lua");

fn dispatch(n: u128, env: &EnvName, run_after: u64, ttl: Option<u64>) -> Dispatch {
    support::dispatch(n, env, "k", run_after, ttl)
}

fn closed() -> EnvSettings {
    EnvSettings {
        limit: 0,
        ..EnvSettings::default()
    }
}

fn open_env() -> EnvSettings {
    EnvSettings {
        limit: 10,
        ..EnvSettings::default()
    }
}

async fn int(conn: &mut redis::aio::MultiplexedConnection, cmd: &str, key: &str) -> u64 {
    redis::cmd(cmd)
        .arg(key)
        .query_async(conn)
        .await
        .expect("redis command")
}

/// Records held (run hashes' fields).
async fn records(conn: &mut redis::aio::MultiplexedConnection, base: &str) -> u64 {
    let buckets: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{base}:rb"))
        .query_async(conn)
        .await
        .expect("smembers");
    let mut n = 0;
    for b in buckets {
        n += int(conn, "HLEN", &format!("{base}:run:{b}")).await;
    }
    n
}

/// A fresh key space under `prefix` with env `e` closed (limit 0: every run stays queued).
async fn open_closed(prefix: &str) -> (RedisQueue, String, EnvName) {
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    let base = queue.key_base().to_string();
    let env = EnvName::new("e").expect("env name");
    queue
        .put_env(&env, closed(), Timestamp(0))
        .await
        .expect("env");
    (queue, base, env)
}

fn low(ids: impl IntoIterator<Item = RunId>) -> Vec<u128> {
    ids.into_iter().map(|id| id.0 & 0xffff).collect()
}

#[tokio::test]
async fn a_due_run_in_order_is_its_list_entry_only_until_admitted() {
    let Some(mut conn) = connect().await else {
        return;
    };
    let prefix = format!("rl:test:fmt3list:{}", std::process::id());
    let (queue, base, env) = open_closed(&prefix).await;
    let kl = format!("{base}:kl:e\0q\0k");
    let mut runs: Vec<Dispatch> = (1..=5)
        .map(|n| dispatch(n, &env, 0, (n % 2 == 1).then_some(60_000)))
        .collect();
    // Run 6 jumps ahead (priority): out of order, it goes to the key's zset with a record.
    let mut prio = dispatch(6, &env, 0, None);
    prio.priority = Duration::from_millis(1_000);
    runs.push(prio);
    for d in &runs {
        let placed = queue
            .enqueue(d.clone(), EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
        assert_eq!(placed.placement, Placement::Queued);
    }
    assert_eq!(int(&mut conn, "LLEN", &kl).await, 5);
    assert_eq!(
        records(&mut conn, &base).await,
        1,
        "only run 6 has a record"
    );

    // Found from its facts, by a full read, and not by id alone.
    let live = queue
        .live_of(&runs[2])
        .await
        .expect("live_of")
        .expect("held");
    assert_eq!((live.status, &live.dispatch), (RunStatus::Queued, &runs[2]));
    let scanned = queue.live(runs[2].run_id).await.expect("live");
    assert_eq!(scanned.map(|l| l.dispatch), Some(runs[2].clone()));
    assert_eq!(
        queue
            .live_indexed(runs[2].run_id)
            .await
            .expect("live_indexed"),
        None
    );

    // An enqueue of a run already in the list is idempotent (nothing appended).
    let again = queue
        .enqueue(runs[1].clone(), EnqueueAs::Trigger, Timestamp(0))
        .await
        .expect("enqueue again");
    assert_eq!(again.placement, Placement::Queued);
    assert_eq!(int(&mut conn, "LLEN", &kl).await, 5);
    // So is one with other facts (recovery's next attempt of a run Redis still holds waiting):
    // nothing is added, the run stays as it waits.
    let mut next = runs[4].clone();
    next.attempt = 2;
    next.ever_leased = true;
    next.run_after = Timestamp(50_000);
    let again = queue
        .enqueue(next, EnqueueAs::Trigger, Timestamp(0))
        .await
        .expect("enqueue the next attempt");
    assert_eq!(again.placement, Placement::Queued);
    assert_eq!(int(&mut conn, "LLEN", &kl).await, 5);
    assert_eq!(records(&mut conn, &base).await, 1);
    assert_eq!(
        queue
            .live_of(&runs[4])
            .await
            .expect("live_of")
            .map(|l| l.dispatch),
        Some(runs[4].clone())
    );

    // Run 3 canceled out of order: a tombstone. Run 4 rescheduled: a tombstone and a record.
    let canceled = queue
        .cancel_of(&runs[2], Duration::ZERO, Timestamp(0))
        .await
        .expect("cancel_of");
    assert!(matches!(
        canceled,
        CancelOutcome::Removed {
            was: RunStatus::Queued,
            ..
        }
    ));
    assert_eq!(queue.live_of(&runs[2]).await.expect("live_of"), None);
    queue
        .reschedule_of(&runs[3], Timestamp(0), None, Timestamp(0))
        .await
        .expect("reschedule_of");
    assert_eq!(int(&mut conn, "LLEN", &kl).await, 5, "no LREM");
    assert_eq!(
        int(&mut conn, "SCARD", &format!("{base}:kt:e\0q\0k")).await,
        2
    );
    assert_eq!(records(&mut conn, &base).await, 2);
    let snapshot = queue.snapshot().await.expect("snapshot");
    assert_eq!(
        low(snapshot.iter().map(|l| l.dispatch.run_id)),
        vec![1, 2, 4, 5, 6]
    );
    let queues = queue.queues(&env).await.expect("queues");
    assert_eq!(queues[0].queued, 5, "depth counts live runs only");

    // Admission takes the key's head by (score, id): run 6, then 1, 2, 4 (zset), 5; the
    // tombstones are dropped on the way and the list is gone with its last live run.
    queue
        .put_env(&env, open_env(), Timestamp(0))
        .await
        .expect("env");
    let leased = queue
        .claim(&claim_all(&env), Timestamp(0))
        .await
        .expect("claim");
    assert_eq!(
        low(leased.iter().map(|l| l.dispatch.run_id)),
        vec![6, 1, 2, 4, 5]
    );
    // The message kept every fact (a leased run counts as ever leased).
    let mut want = runs[0].clone();
    want.ever_leased = true;
    assert_eq!(leased[1].dispatch, want);
    for key in [kl.clone(), format!("{base}:kt:e\0q\0k")] {
        assert_eq!(int(&mut conn, "EXISTS", &key).await, 0, "{key:?} is gone");
    }
    // No TTL is left waiting: the claimed runs' buckets are gone; the leases' deadline is next.
    assert_eq!(int(&mut conn, "EXISTS", &format!("{base}:tbz")).await, 0);
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(30_000))
    );
}

#[tokio::test]
async fn a_list_resident_run_expires_through_its_bucket_entry() {
    let Some(mut conn) = connect().await else {
        return;
    };
    let prefix = format!("rl:test:fmt3ttl:{}", std::process::id());
    let (queue, base, env) = open_closed(&prefix).await;
    let runs: Vec<Dispatch> = [5_000, 6_000, 5_500, 7_000]
        .iter()
        .zip(1..)
        .map(|(ttl, n)| dispatch(n, &env, 0, Some(*ttl)))
        .collect();
    for d in &runs {
        queue
            .enqueue(d.clone(), EnqueueAs::Trigger, Timestamp(0))
            .await
            .expect("enqueue");
    }
    assert_eq!(records(&mut conn, &base).await, 0);
    // Run 2 canceled out of order (a tombstone): its entry no longer counts.
    queue
        .cancel_of(&runs[1], Duration::ZERO, Timestamp(0))
        .await
        .expect("cancel_of");
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(5_000))
    );
    let tick = queue.tick(Timestamp(4_999)).await.expect("tick");
    assert!(tick.expired.is_empty(), "nothing expires early");
    let tick = queue.tick(Timestamp(5_000)).await.expect("tick");
    assert_eq!(tick.expired, vec![runs[0].clone()]);
    assert_eq!(tick.effects.deadline, Some(Timestamp(5_500)));
    let tick = queue.tick(Timestamp(6_999)).await.expect("tick");
    assert_eq!(
        tick.expired,
        vec![runs[2].clone()],
        "run 3, out of list order"
    );
    assert_eq!(tick.effects.deadline, Some(Timestamp(7_000)));
    let tick = queue.tick(Timestamp(7_000)).await.expect("tick");
    assert_eq!(tick.expired, vec![runs[3].clone()]);
    assert_eq!(queue.next_deadline().await.expect("deadline"), None);
    assert!(queue.snapshot().await.expect("snapshot").is_empty());
    assert_eq!(queue.queues(&env).await.expect("queues")[0].queued, 0);
    for key in ["kl:e\0q\0k", "kt:e\0q\0k", "tbz", "tbn"] {
        assert_eq!(
            int(&mut conn, "EXISTS", &format!("{base}:{key}")).await,
            0,
            "{key:?} is gone"
        );
    }
}

/// One call of the format-2 library (loaded under its own name), as a format-2 client made it.
async fn fmt2_call(
    conn: &mut redis::aio::MultiplexedConnection,
    function: &str,
    base: &str,
    op: &str,
    now: u64,
    args: Vec<Arg>,
) -> String {
    support::legacy_call(conn, "FCALL", function, base, (op, now, "2"), args).await
}

#[tokio::test]
async fn a_format2_key_space_is_migrated_on_open_and_read() {
    let Some(mut conn) = connect().await else {
        return;
    };
    let prefix = format!("rl:test:fmt2:{}", std::process::id());
    let base = format!("{{{prefix}}}");
    let library = "runlane_fmt2_test";
    let function = format!("{library}_dispatch");
    let source = FORMAT2_LIBRARY
        .replace("__RUNLANE_LIBRARY__", library)
        .replace("__RUNLANE_FUNCTION__", &function);
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(source)
        .query_async(&mut conn)
        .await
        .expect("the format-2 library loads");
    let env = EnvName::new("e").expect("env name");
    let mut lanes: Vec<Arg> = vec!["g2".into(), "0".into()];
    for lane in LaneName::BUILT_IN {
        lanes.push(lane.into());
    }
    let call = |op: &'static str, args: Vec<Arg>| (op, args);
    let mut prio = dispatch(5, &env, 0, None);
    prio.priority = Duration::from_millis(500);
    let runs = [
        dispatch(1, &env, 0, Some(5_000)),      // listed, TTL 5 s
        dispatch(2, &env, 0, None),             // listed, then canceled: a tombstone
        dispatch(3, &env, 10_000, Some(5_500)), // delayed, TTL 5.5 s
        dispatch(4, &env, 0, Some(9_000)),      // listed, TTL 9 s
        prio,                                   // in the key's zset
    ];
    let mut steps = vec![
        call("init", lanes),
        call("put_env", put_env_args(&env, &closed())),
    ];
    for d in &runs {
        steps.push(call(
            "enqueue",
            vec![d.run_id.into(), record::pack_new(d).into(), "0".into()],
        ));
    }
    steps.push(call("cancel", vec![runs[1].run_id.into(), "0".into()]));
    for (op, args) in steps {
        let code = fmt2_call(&mut conn, &function, &base, op, 0, args).await;
        assert!(code == "ok" || code == "removed", "{op}: {code}");
    }
    let _: String = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(library)
        .query_async(&mut conn)
        .await
        .expect("function delete");
    let kl = format!("{base}:kl:e\0q\0k");
    assert_eq!(
        int(&mut conn, "LLEN", &kl).await,
        3,
        "format 2: ids, one tombstone"
    );
    assert_eq!(records(&mut conn, &base).await, 4);

    // Opened by this build: migrated in one script.
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix))
        .await
        .expect("a format-2 key space opens")
        .delete_keys_on_drop();
    let fmt: String = redis::cmd("HGET")
        .arg(format!("{base}:cfg"))
        .arg("fmt")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(fmt, KEYSPACE_FORMAT.to_string());
    assert_eq!(
        int(&mut conn, "LLEN", &kl).await,
        2,
        "messages, tombstone dropped"
    );
    assert_eq!(
        records(&mut conn, &base).await,
        2,
        "records of the delayed and the zset run only"
    );

    let snapshot = queue.snapshot().await.expect("snapshot");
    let got: Vec<(u128, RunStatus, Option<Timestamp>)> = snapshot
        .iter()
        .map(|r| {
            (
                r.dispatch.run_id.0 & 0xffff,
                r.status,
                r.dispatch.ttl_deadline,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, RunStatus::Queued, Some(Timestamp(5_000))),
            (3, RunStatus::Delayed, Some(Timestamp(5_500))),
            (4, RunStatus::Queued, Some(Timestamp(9_000))),
            (5, RunStatus::Queued, None),
        ]
    );
    let live = queue.live_of(&runs[3]).await.expect("live_of");
    assert_eq!(live.map(|l| l.dispatch), Some(runs[3].clone()));

    // TTLs expire exactly, through the migrated bucket entries.
    assert_eq!(
        queue.next_deadline().await.expect("deadline"),
        Some(Timestamp(5_000))
    );
    let tick = queue.tick(Timestamp(5_000)).await.expect("tick");
    assert_eq!(low(tick.expired.iter().map(|d| d.run_id)), vec![1]);
    let tick = queue.tick(Timestamp(5_500)).await.expect("tick");
    assert_eq!(low(tick.expired.iter().map(|d| d.run_id)), vec![3]);
    assert_eq!(tick.effects.deadline, Some(Timestamp(9_000)));

    // And the queue works on: the zset run (priority) first, then the listed one.
    queue
        .put_env(&env, open_env(), Timestamp(6_000))
        .await
        .expect("put_env");
    let leased = queue
        .claim(&claim_all(&env), Timestamp(6_000))
        .await
        .expect("claim");
    assert_eq!(low(leased.iter().map(|l| l.dispatch.run_id)), vec![5, 4]);
    let tick = queue.tick(Timestamp(9_000)).await.expect("tick");
    assert!(tick.expired.is_empty());
    assert_eq!(int(&mut conn, "EXISTS", &format!("{base}:tbz")).await, 0);
}

#[tokio::test]
async fn an_unknown_newer_format_is_refused() {
    let Some(mut conn) = connect().await else {
        return;
    };
    let prefix = format!("rl:test:fmtnew:{}", std::process::id());
    let queue = RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    let base = queue.key_base().to_string();
    let _: u64 = redis::cmd("HSET")
        .arg(format!("{base}:cfg"))
        .arg("fmt")
        .arg(KEYSPACE_FORMAT + 1)
        .query_async(&mut conn)
        .await
        .expect("hset");
    match RedisQueue::open(RedisConfig::new(url()).with_prefix(&prefix)).await {
        Err(RedisOpenError::Format {
            found, expected, ..
        }) => {
            assert_eq!(found, (KEYSPACE_FORMAT + 1).to_string());
            assert_eq!(expected, KEYSPACE_FORMAT);
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a newer format was opened"),
    }
    // A process that has it open refuses every call, naming both versions, and changes nothing.
    let env = EnvName::new("e").expect("env name");
    let refused = queue
        .enqueue(dispatch(1, &env, 0, None), EnqueueAs::Trigger, Timestamp(0))
        .await
        .expect_err("refused");
    let text = refused.to_string();
    assert!(
        text.contains(&format!("format version {}", KEYSPACE_FORMAT + 1)),
        "{text}"
    );
    let fmt: String = redis::cmd("HGET")
        .arg(format!("{base}:cfg"))
        .arg("fmt")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(fmt, (KEYSPACE_FORMAT + 1).to_string());
}
