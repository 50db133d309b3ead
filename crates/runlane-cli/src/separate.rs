//! `runlane bench latency --topology separate-process`: the trigger in this process, the worker
//! in a child process (this binary's hidden `bench-worker` command) sharing the distributed
//! shape's Redis key prefix and PostgreSQL schema, as an application and its worker fleet are
//! deployed.
//!
//! The child prints `ready` once its worker is registered, then one line `<run id> <unix ns>`
//! per run: the wall-clock instant its handler's first line ran. Both processes read the same
//! machine's realtime clock, so trigger call start → handler start is a difference of two
//! readings of one clock. Closing the child's stdin stops it.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use runlane::{EngineBuilder, HandlerError, RunContext};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

use crate::bench::{self, Common, LatencySampler};

/// Where the child worker connects: the servers, the key prefix and schema, its slots.
#[derive(Clone, Debug)]
pub struct WorkerArgs {
    /// The Redis server.
    pub redis_url: String,
    /// The PostgreSQL server.
    pub database_url: String,
    /// The key prefix the parent opened.
    pub prefix: String,
    /// The schema the parent opened.
    pub schema: String,
    /// Worker slots.
    pub slots: u32,
    /// `strict` or `relaxed`.
    pub durability: runlane::Durability,
}

pub(crate) fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// From one wall-clock reading to a later one (ns since the epoch), in µs.
pub(crate) fn micros_between(from: u128, to: u128) -> u64 {
    u64::try_from(to.saturating_sub(from) / 1_000).unwrap_or(u64::MAX)
}

/// The child: a worker of the distributed shape that reports each handler start on stdout,
/// until its stdin closes.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let mut config = runlane::DistributedConfig::new(&args.redis_url, &args.database_url);
    config.redis.prefix = args.prefix;
    config.postgres.schema = args.schema;
    config.postgres.durability = args.durability;
    let shape = runlane::distributed_with(EngineBuilder::new(), config).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u128)>();
    let worker = shape
        .worker()
        .workloops(&format!("manual>*:{}", args.slots.max(1)))
        .handler("bench", move |ctx: RunContext| {
            let started = unix_nanos(SystemTime::now());
            let _ = tx.send((ctx.run_id().to_string(), started));
            async move { Ok::<_, HandlerError>(Value::Null) }
        })
        .start()
        .await?;
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some((run, at)) => {
                    out.write_all(format!("{run} {at}\n").as_bytes()).await?;
                    out.flush().await?;
                }
                None => break,
            },
            read = stdin.read(&mut sink) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
        }
    }
    worker.stop().await;
    shape.shutdown().await;
    Ok(())
}

/// The child process, its report lines, and a way to stop it.
struct ChildWorker {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ChildWorker {
    async fn spawn(args: &WorkerArgs) -> anyhow::Result<ChildWorker> {
        let exe = std::env::current_exe().context("finding this binary for the child worker")?;
        let durability = match args.durability {
            runlane::Durability::Strict => "strict",
            runlane::Durability::Relaxed => "relaxed",
        };
        let mut child = Command::new(exe)
            .args(["bench-worker", "--redis-url", &args.redis_url])
            .args(["--database-url", &args.database_url])
            .args(["--prefix", &args.prefix, "--schema", &args.schema])
            .args([
                "--slots",
                &args.slots.to_string(),
                "--durability",
                durability,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the child worker")?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => Ok(ChildWorker { child, lines }),
            Ok(Ok(other)) => bail!("the child worker said {other:?} instead of ready"),
            Ok(Err(e)) => Err(e).context("reading the child worker"),
            Err(_) => bail!("the child worker was not ready within 60 s"),
        }
    }

    /// The start instant the child reports for `run` (earlier lines are warm-up leftovers).
    async fn started(&mut self, run: &str) -> anyhow::Result<u128> {
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .context("the child worker stopped")?;
            let (id, at) = line
                .split_once(' ')
                .with_context(|| format!("a bad line from the child worker: {line:?}"))?;
            if id == run {
                return at
                    .parse()
                    .with_context(|| format!("a bad instant from the child worker: {line:?}"));
            }
        }
    }

    /// Closes the child's stdin and waits for it to stop (killed after 30 s).
    async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        bench::wait_stopped(&mut self.child, "the child worker").await
    }
}

/// Trigger call start (here) → the handler's first line (in the child), sequential.
pub async fn latency(common: &Common, gap: Duration) -> anyhow::Result<Value> {
    if common.backend != "distributed" {
        bail!(
            "--topology separate-process needs a backend processes share: --backend distributed \
             (memory and embedded keep their queue inside one process)"
        );
    }
    let (prefix, schema) = bench::fresh_distributed_names();
    let engine = bench::open_distributed_at(common, &prefix, &schema).await?;
    bench::open_wide(&engine).await?;
    let mut child = ChildWorker::spawn(&WorkerArgs {
        redis_url: common.redis_url.clone(),
        database_url: common.database_url.clone(),
        prefix,
        schema,
        slots: common.slots,
        durability: common.durability,
    })
    .await?;
    let body = bench::payload(common.payload_bytes);
    let mut sampler = LatencySampler::start(common.runs, gap);
    while sampler.more() {
        let t0 = unix_nanos(SystemTime::now());
        let run = engine.trigger("bench").payload(&body).send().await?;
        let started = child.started(&run.run.id.to_string()).await?;
        engine.wait(run.run.id, Duration::from_secs(10)).await?;
        sampler.record(micros_between(t0, started)).await;
    }
    let samples = sampler.finish().await;
    child.stop().await?;
    let line = json!({
        "scenario": "latency",
        "backend": common.backend,
        "topology": "separate-process",
        "gap_ms": gap.as_millis() as u64,
        "slots": common.slots,
        "runs": common.runs,
        "payload_bytes": common.payload_bytes,
        "p50_us": bench::percentile(&samples, 0.50),
        "p95_us": bench::percentile(&samples, 0.95),
        "p99_us": bench::percentile(&samples, 0.99),
        "clock": "realtime in both processes",
        "git_revision": bench::git_revision(),
    });
    bench::finish(engine, line).await
}
