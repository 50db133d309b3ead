//! What the crate's Redis tests share: the server's URL, a connection (a missing server is a
//! failure under CI, a skip elsewhere), the dispatch facts of a numbered test run, and the code
//! of a raw library answer.

use std::sync::Arc;
use std::time::Duration;

use runlane_core::backend::{ClaimRequest, Dispatch, QueueBackend, ServedEnv};
use runlane_core::{
    ClaimChain, EnvName, EnvSettings, LaneName, QueueName, RunId, Timestamp, WorkerId,
};

use crate::queue::Arg;
use crate::record;

/// The Redis the tests use (`RUNLANE_REDIS_URL`, default the loopback server).
pub(crate) fn url() -> String {
    std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Answers whether the test may go on without Redis: never under CI (this panics there).
pub(crate) fn skip_without_redis() {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no Redis at {} under CI",
        url()
    );
    eprintln!("skipped: no Redis at {}", url());
}

/// An env name the tests know to be valid.
pub(crate) fn env(name: &str) -> EnvName {
    EnvName::new(name).expect("env name")
}

/// A queue on the test server under a key prefix of its own (`rl:test:<group>:<name>:<pid>`),
/// its keys deleted when dropped; `None` (skipped) without Redis outside CI.
pub(crate) async fn open_queue(group: &str, name: &str) -> Option<crate::RedisQueue> {
    connect().await?;
    let prefix = format!("rl:test:{group}:{name}:{}", std::process::id());
    let queue = crate::RedisQueue::open(crate::RedisConfig::new(url()).with_prefix(prefix))
        .await
        .expect("open")
        .delete_keys_on_drop();
    Some(queue)
}

/// A connection of its own to the test server, or `None` (skipped) outside CI.
pub(crate) async fn connect() -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url()).expect("redis url");
    match client.get_multiplexed_async_connection().await {
        Ok(conn) => Some(conn),
        Err(_) => {
            skip_without_redis();
            None
        }
    }
}

/// Every key matching the SCAN `pattern` on the test server, sorted, each once: SCAN walks the
/// whole keyspace (a cursor loop) and may return a key more than once while it rehashes.
pub(crate) async fn keys_matching(pattern: &str) -> Vec<Vec<u8>> {
    use redis::AsyncCommands;
    let mut conn = connect().await.expect("redis");
    let mut iter = conn.scan_match::<_, Vec<u8>>(pattern).await.expect("scan");
    let mut keys = Vec::new();
    while let Some(key) = iter.next_item().await {
        keys.push(key);
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Test run `n` of `env` in queue `q`, key `key`, the default lane, attempt 1.
pub(crate) fn dispatch(
    n: u128,
    env: &EnvName,
    key: &str,
    run_after: u64,
    ttl: Option<u64>,
) -> Dispatch {
    Dispatch {
        run_id: RunId((1u128 << 80) | n),
        env: env.clone(),
        queue: QueueName::new("q").expect("queue name"),
        key: Arc::from(key),
        lane: LaneName::default_lane(),
        priority: Duration::ZERO,
        run_after: Timestamp(run_after),
        ttl_deadline: ttl.map(Timestamp),
        attempt: 1,
        locked_version: None,
        ever_leased: false,
        max_duration: None,
    }
}

/// A claim of up to 10 runs of `env` (version 1) on the default chain, 30 s leases.
pub(crate) fn claim_all(env: &EnvName) -> ClaimRequest {
    claim_of(ClaimChain::default_chain(), 10, &[env.as_str()])
}

/// A claim by worker 1 of up to `max` runs of `envs` (each at version 1) on `chain`, 30 s
/// leases.
pub(crate) fn claim_of(chain: ClaimChain, max: u32, envs: &[&str]) -> ClaimRequest {
    ClaimRequest {
        worker: WorkerId(1),
        chain,
        max,
        lease: Duration::from_secs(30),
        envs: envs
            .iter()
            .map(|e| ServedEnv {
                env: env(e),
                version: 1,
            })
            .collect(),
    }
}

/// Env `e` admitting `limit` runs at once (default settings otherwise).
pub(crate) async fn put_env_e(queue: &crate::RedisQueue, limit: u32) {
    let settings = EnvSettings {
        limit,
        ..EnvSettings::default()
    };
    queue
        .put_env(&env("e"), settings, Timestamp(0))
        .await
        .expect("env");
}

/// Env `a` admitting `limit_a` at once with the fast path, env `b` admitting 1 without it.
pub(crate) async fn put_envs_a_b(queue: &crate::RedisQueue, limit_a: u32) {
    let a = EnvSettings {
        limit: limit_a,
        ..EnvSettings::default()
    };
    let b = EnvSettings {
        limit: 1,
        fast_path: false,
        ..EnvSettings::default()
    };
    queue.put_env(&env("a"), a, Timestamp(0)).await.expect("a");
    queue.put_env(&env("b"), b, Timestamp(0)).await.expect("b");
}

/// The code (first element) of a raw MessagePack answer of the dispatch library.
pub(crate) fn answer_code(bytes: &[u8]) -> String {
    let answer = record::decode(bytes).expect("msgpack answer");
    let items = answer.as_array().expect("answer array");
    items[0].as_str().expect("answer code").to_string()
}

/// One call of an older format's dispatch code, as a client of that format made it, answering
/// its code: `command` is `EVAL` (`target` = the script's source) or `FCALL` (`target` = the
/// function's name); `format` is the format the caller says it speaks.
pub(crate) async fn legacy_call(
    conn: &mut redis::aio::MultiplexedConnection,
    command: &str,
    target: &str,
    base: &str,
    (op, now, format): (&str, u64, &str),
    args: Vec<Arg>,
) -> String {
    let mut cmd = redis::cmd(command);
    cmd.arg(target)
        .arg(1)
        .arg(base)
        .arg(op)
        .arg(now)
        .arg(300_000u64)
        .arg(format)
        .arg("");
    for a in &args {
        match a {
            Arg::Text(s) => cmd.arg(s.as_str()),
            Arg::Bytes(b) => cmd.arg(b.as_slice()),
        };
    }
    let bytes: Vec<u8> = cmd
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("the format-{format} code runs: {e}"));
    answer_code(&bytes)
}

/// Every key under `base` but the doorbells (`:db:`, streams whose entry ids are times), by
/// its name after `base`: its type, then its content: a hash's fields and values (field
/// order), a set's members (sorted), a zset's members and scores (in order), a list's items
/// (in order), a string's value; binary bytes escaped. Two key spaces compare equal when
/// they hold the same dispatch state.
pub(crate) async fn key_space(
    base: &str,
) -> std::collections::BTreeMap<String, (String, Vec<String>)> {
    let mut conn = connect().await.expect("redis");
    let mut out = std::collections::BTreeMap::new();
    for key in keys_matching(&format!("{base}*")).await {
        let name = String::from_utf8_lossy(&key[base.len()..]).into_owned();
        if name.starts_with(":db:") {
            continue;
        }
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("type");
        let read = |cmd: &str| {
            let mut cmd = redis::cmd(cmd);
            cmd.arg(&key);
            cmd
        };
        let items: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![read("GET").query_async(&mut conn).await.expect("get")],
            "hash" => {
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = read("HGETALL")
                    .query_async(&mut conn)
                    .await
                    .expect("hgetall");
                pairs.sort();
                pairs.into_iter().flat_map(|(f, v)| [f, v]).collect()
            }
            "set" => {
                let mut members: Vec<Vec<u8>> = read("SMEMBERS")
                    .query_async(&mut conn)
                    .await
                    .expect("smembers");
                members.sort();
                members
            }
            "zset" => read("ZRANGE")
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .expect("zrange"),
            "list" => read("LRANGE")
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .expect("lrange"),
            other => panic!("key {name} has an unexpected type {other}"),
        };
        let items = items.iter().map(|i| i.escape_ascii().to_string()).collect();
        out.insert(name, (kind, items));
    }
    out
}

/// The TTL bucket lists of a queue (`{p}:tb:<s>`): entries per list, by bucket key (the name
/// after the key base).
pub(crate) async fn ttl_entries(queue: &crate::RedisQueue) -> Vec<(String, usize)> {
    key_space(queue.key_base())
        .await
        .into_iter()
        .filter(|(name, _)| name.starts_with(":tb:"))
        .map(|(name, (_, items))| (name, items.len()))
        .collect()
}

/// Adds lane `other` to `queue` (the tests' second lane) and answers it.
pub(crate) async fn add_other_lane(queue: &crate::RedisQueue) -> LaneName {
    let other = LaneName::new("other").expect("lane");
    queue.add_lane(&other).await.expect("lane");
    other
}

/// The run ids of `leases`, in order.
pub(crate) fn leased_ids(leases: &[runlane_core::backend::Leased]) -> Vec<RunId> {
    leases.iter().map(|l| l.dispatch.run_id).collect()
}
