//! Shared by the Redis tests: the server address, a unique key prefix per scenario, and the
//! rule that under `CI=true` a missing server fails the test instead of skipping it.

#![allow(dead_code)] // each test file uses a different part of it

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::backend::{ClaimRequest, Dispatch, EnqueueAs, QueueBackend, ServedEnv};
use runlane::core::{
    ClaimChain, EnvName, EnvSettings, LaneName, QueueName, RunId, Timestamp, WorkerId,
};
use runlane::RedisConfig;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// `RUNLANE_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn url() -> String {
    std::env::var("RUNLANE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// A prefix no other test (or process) uses: `rl:test:<pid>:<n>`.
pub fn fresh_prefix(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("rl:test:{tag}:{}:{n}", std::process::id())
}

/// `RUNLANE_DATABASE_URL`, default the local trust-auth server's `test` database.
pub fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A distributed deployment for one test on `redis_url`: a fresh key prefix and schema
/// (`rlt_<tag>_<pid>_<n>`), 4 PostgreSQL connections, both dropped at shutdown (`throwaway`).
pub fn distributed_config(redis_url: String, tag: &str) -> runlane::DistributedConfig {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut config = runlane::DistributedConfig::new(redis_url, database_url());
    config.redis.prefix = fresh_prefix(tag);
    config.postgres.schema = format!("rlt_{tag}_{}_{n}", std::process::id());
    config.postgres.pool_size = 4;
    config.throwaway = true;
    config
}

/// Opens `config`'s deployment; the servers must be there (these tests never skip).
/// Waits (10 s at most) until `engine` has `n` idle workloops (each posted its offer: it waits
/// on its doorbells); `what` names the wait in the failure.
pub async fn until_idle_offers(engine: &runlane::Engine, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.idle_offers() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} idle workloops, not {n}",
            engine.idle_offers()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn open_distributed(config: runlane::DistributedConfig) -> runlane::Distributed {
    match runlane::distributed_with(runlane::EngineBuilder::new(), config).await {
        Ok(engine) => engine,
        Err(e) => panic!("redis and postgresql are required: {e}"),
    }
}

/// Two processes of one deployment on the shared Redis under a fresh prefix and schema; the
/// first cleans up.
pub async fn two_processes(tag: &str) -> (runlane::Distributed, runlane::Distributed) {
    let shared = distributed_config(url(), tag);
    let open = |throwaway: bool| {
        let mut config = shared.clone();
        config.throwaway = throwaway;
        open_distributed(config)
    };
    (open(true).await, open(false).await)
}

/// Waits (at most a minute) for `run` to finish and answers its record; a run still
/// unfinished then fails the test.
pub async fn finished(engine: &runlane::Engine, run: RunId) -> runlane::core::backend::RunRecord {
    match engine
        .wait(run, Duration::from_secs(60))
        .await
        .expect("wait")
    {
        runlane::WaitOutcome::Finished(record) => record,
        runlane::WaitOutcome::Pending { status, .. } => panic!("run {run} still {status:?}"),
    }
}

/// A config on the shared server under a fresh prefix.
pub fn fresh_config(tag: &str) -> RedisConfig {
    let mut config = RedisConfig::new(url()).with_prefix(fresh_prefix(tag));
    config.response_timeout = Duration::from_secs(5);
    config
}

/// Pauses queue `job` of env `default` and caps it at `cap` waiting runs: paused, so its runs
/// wait in it (a run that goes straight to ready is not capped).
pub async fn cap_job_queue_paused(engine: &runlane::Engine, cap: u32) {
    let capped = runlane::core::QueueSettings {
        max_queued: Some(cap),
        paused: true,
        ..runlane::core::QueueSettings::default()
    };
    engine
        .set_queue("default", "job", capped)
        .await
        .expect("cap the queue");
}

// ---- queue-level scenarios (a scenario run on `every_queue`) ----

/// Where a queue-level scenario's time starts.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);
/// The lease a queue-level scenario's claims take.
pub const LEASE: Duration = Duration::from_secs(30);

/// `T0 + secs`.
pub fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

/// The env of a queue-level scenario.
pub fn env() -> EnvName {
    EnvName::new("e").expect("env")
}

/// Creates [`env`] with room for two runs at once.
pub async fn put_env(q: &dyn QueueBackend) {
    let settings = EnvSettings {
        limit: 2,
        ..EnvSettings::default()
    };
    q.put_env(&env(), settings, T0).await.expect("env");
}

/// Triggers run `run`'s first attempt in queue `q` of [`env`] at `now`.
pub async fn enqueue_first(
    q: &dyn QueueBackend,
    run: u128,
    max_duration: Option<Duration>,
    now: Timestamp,
) {
    let queue = QueueName::new("q").expect("queue");
    let mut dispatch =
        Dispatch::first_attempt(RunId(run), env(), queue, LaneName::default_lane(), now);
    dispatch.max_duration = max_duration;
    q.enqueue(dispatch, EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
}

/// A claim of up to `max` runs of [`env`] by worker 1 for [`LEASE`].
pub fn claim_request(max: u32) -> ClaimRequest {
    ClaimRequest {
        worker: WorkerId(1),
        chain: ClaimChain::default_chain(),
        max,
        envs: vec![ServedEnv {
            env: env(),
            version: 0,
        }],
        lease: LEASE,
    }
}

/// The queue backends a queue-level scenario runs on, each with its name: the memory queue,
/// the reference model and a Redis queue under a fresh prefix (its keys deleted on drop).
pub async fn every_queue(tag: &str) -> Vec<(&'static str, Arc<dyn QueueBackend>)> {
    let redis = runlane::RedisQueue::open(fresh_config(tag))
        .await
        .expect("redis must be reachable (set RUNLANE_REDIS_URL)")
        .delete_keys_on_drop();
    vec![
        (
            "memory",
            Arc::new(runlane_memory::MemoryQueue::new(
                runlane_memory::MemoryConfig::default(),
            )),
        ),
        (
            "model",
            Arc::new(runlane_conformance::model::ModelQueue::new(
                Duration::from_secs(300),
            )),
        ),
        ("redis", Arc::new(redis)),
    ]
}

/// A private `redis-server` on a unix socket in a scratch directory (`--save "" --appendonly
/// no`): the only kind of server a test may FLUSHALL or kill. Killed on drop.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    /// Starts a server and waits for its "Ready to accept connections" log line.
    pub fn start(tag: &str) -> PrivateRedis {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("redis")
            .join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the private redis directory");
        let mut server = PrivateRedis { child: None, dir };
        server.spawn();
        server
    }

    /// The socket path.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("redis.sock")
    }

    /// The URL of the socket.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self) {
        use std::io::BufRead;
        let mut child = std::process::Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(self.socket())
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run the private-server tests");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line))
                    if line
                        .to_ascii_lowercase()
                        .contains("ready to accept connections") =>
                {
                    break
                }
                Some(Ok(_)) => continue,
                _ => panic!("private redis-server exited before it was ready"),
            }
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        self.child = Some(child);
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts it again on the same socket, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// FLUSHALL on this private server.
    pub fn flushall(&self) {
        let client = redis::Client::open(self.url()).expect("private url");
        let mut conn = client.get_connection().expect("private connection");
        redis::cmd("FLUSHALL")
            .query::<()>(&mut conn)
            .expect("flushall");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
