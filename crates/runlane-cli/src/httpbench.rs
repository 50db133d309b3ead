//! `runlane bench latency|throughput --topology server`: the engine behind `runlane serve`'s
//! HTTP API (hosted in this process on a loopback port), runs triggered over HTTP, and executed
//! by a `runlane worker --exec` child process over the worker protocol, the way a service in
//! another language uses runlane.
//!
//! The bench keeps the engine's handle only to observe (wait for a run's end, read queue
//! depths); every trigger, claim, heartbeat and completion crosses HTTP.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use runlane::core::RunId;
use runlane::Engine;
use runlane_server::{BackendConfig, Server, ServerConfig};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::bench::{self, Common, DataDir, LatencySampler, Phase};
use crate::progress::Progress;
use crate::separate::{micros_between, unix_nanos};

/// The admin key of the bench's server (it listens on loopback only, for the bench's length).
const KEY: &str = "rl_bench_admin_key";

/// A server on a loopback port, its engine and what it needs removed afterwards.
struct Hosted {
    base: String,
    engine: Engine,
    http: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    durability: &'static str,
    _dir: Option<DataDir>,
}

impl Hosted {
    async fn start(common: &Common) -> anyhow::Result<Hosted> {
        let mut dir = None;
        let (backend, durability) = match common.backend.as_str() {
            "memory" => (BackendConfig::Memory, "none"),
            "embedded" => {
                let d = DataDir::fresh()?;
                let backend = BackendConfig::Embedded {
                    data_dir: d.path().to_path_buf(),
                };
                dir = Some(d);
                (backend, "full")
            }
            "distributed" => {
                let (prefix, schema) = bench::fresh_distributed_names();
                let mut c =
                    runlane::DistributedConfig::new(&common.redis_url, &common.database_url);
                c.redis.prefix = prefix;
                c.postgres.schema = schema;
                c.postgres.durability = common.durability;
                c.throwaway = true;
                let durability = match common.durability {
                    runlane::Durability::Strict => "strict",
                    runlane::Durability::Relaxed => "relaxed",
                };
                (BackendConfig::Distributed(Box::new(c)), durability)
            }
            other => bail!("unknown backend {other:?} (available: memory, embedded, distributed)"),
        };
        let mut config = ServerConfig::new(backend);
        config.listen = ([127, 0, 0, 1], 0).into();
        config.admin_key = Some(KEY.to_string());
        config.print_admin_key = false;
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let engine = server.state().engine().clone();
        bench::open_wide(&engine).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
                .map_err(anyhow::Error::from)
        });
        Ok(Hosted {
            base: format!("http://{addr}"),
            engine,
            http: reqwest::Client::new(),
            stop,
            served,
            durability,
            _dir: dir,
        })
    }

    /// `POST /v1/envs/default/runs`: the run's id.
    async fn trigger(&self, payload: &Value) -> anyhow::Result<RunId> {
        let resp = self
            .http
            .post(format!("{}/v1/envs/default/runs", self.base))
            .bearer_auth(KEY)
            .json(&json!({ "task": "bench", "payload": payload }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("trigger answered {status}: {body}");
        }
        let id = body["run_id"]
            .as_str()
            .context("trigger answer without run_id")?;
        Ok(id.parse()?)
    }

    /// Waits until a consumer serves the `manual` lane (the worker child has registered).
    async fn worker_registered(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let lanes = self.engine.lanes().await?;
            if lanes
                .iter()
                .any(|l| l.name.as_str() == "manual" && l.consumers > 0)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the worker did not register within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no run of the default env is waiting or holding a slot.
    async fn drained(&self) -> anyhow::Result<()> {
        loop {
            let queues = self.engine.queues("default").await?;
            if queues.iter().all(|q| q.delayed + q.queued + q.running == 0) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.served.await??;
        Ok(())
    }
}

/// The `runlane worker --exec` child, stopped with SIGTERM (it drains, then deregisters).
struct ExecWorker(Child);

impl ExecWorker {
    fn spawn(base: &str, slots: u32, exec: &str) -> anyhow::Result<ExecWorker> {
        let exe = std::env::current_exe().context("finding this binary for the worker")?;
        let child = Command::new(exe)
            .args(["worker", "--server", base, "--key", KEY, "--env", "default"])
            .args(["--workloops", &format!("manual>*:{}", slots.max(1))])
            .args(["--exec", exec])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting runlane worker")?;
        Ok(ExecWorker(child))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.0.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        bench::wait_stopped(&mut self.0, "runlane worker").await
    }
}

/// The command each latency run executes: it prints the instant it runs (ns since the epoch),
/// which is its run's output.
const STAMP: &str = "date +%s%N";

/// Trigger request start (HTTP) → the worker's command running (its first line), sequential.
pub async fn latency(common: &Common, gap: Duration) -> anyhow::Result<Value> {
    let hosted = Hosted::start(common).await?;
    let worker = ExecWorker::spawn(&hosted.base, common.slots, STAMP)?;
    hosted.worker_registered().await?;
    let body = bench::payload(common.payload_bytes);
    let mut sampler = LatencySampler::start(common.runs, gap);
    while sampler.more() {
        let t0 = unix_nanos(SystemTime::now());
        let run = hosted.trigger(&body).await?;
        let record = match hosted.engine.wait(run, Duration::from_secs(30)).await? {
            runlane::WaitOutcome::Finished(record) => record,
            runlane::WaitOutcome::Pending { status, .. } => {
                bail!("run {run} still {status:?} after 30 s")
            }
        };
        let output = record
            .output
            .as_deref()
            .with_context(|| format!("run {run} ended {:?} without output", record.status))?;
        let started: u128 = output
            .trim()
            .parse()
            .with_context(|| format!("run {run}: output {output:?} is not an instant"))?;
        sampler.record(micros_between(t0, started)).await;
    }
    let samples = sampler.finish().await;
    worker.stop().await?;
    let line = json!({
        "scenario": "latency",
        "backend": common.backend,
        "durability": hosted.durability,
        "topology": "server",
        "worker": format!("runlane worker --exec '{STAMP}'"),
        "gap_ms": gap.as_millis() as u64,
        "phase": null,
        "depth": null,
        "batch": 1,
        "slots": common.slots,
        "runs": common.runs,
        "payload_bytes": common.payload_bytes,
        "p50_us": bench::percentile(&samples, 0.50),
        "p95_us": bench::percentile(&samples, 0.95),
        "p99_us": bench::percentile(&samples, 0.99),
        "clock": "realtime in both processes",
        "git_revision": bench::git_revision(),
    });
    hosted.stop().await?;
    Ok(line)
}

/// No-op runs (`--exec true`) per second through the HTTP API and `runlane worker` slots.
pub async fn throughput(common: &Common, phase: Phase) -> anyhow::Result<Value> {
    let hosted = Arc::new(Hosted::start(common).await?);
    let body = Arc::new(bench::payload(common.payload_bytes));
    let runs = u64::from(common.runs);
    let progress = Progress::start(phase.name(), runs);
    let producers = common.producers.max(1);
    let produce = |hosted: Arc<Hosted>, body: Arc<Value>| {
        let per = runs / u64::from(producers);
        let extra = runs % u64::from(producers);
        (0..producers)
            .map(|p| {
                let hosted = hosted.clone();
                let body = body.clone();
                let count = per + u64::from(u64::from(p) < extra);
                tokio::spawn(async move {
                    for _ in 0..count {
                        hosted.trigger(&body).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect::<Vec<_>>()
    };
    let (elapsed, worker) = match phase {
        Phase::TriggerOnly => {
            let start = Instant::now();
            for task in produce(hosted.clone(), body.clone()) {
                task.await??;
            }
            (start.elapsed(), None)
        }
        Phase::DrainOnly => {
            // The backlog is not measured: it goes in through the engine directly.
            for _ in 0..runs {
                hosted
                    .engine
                    .trigger("bench")
                    .payload(&*body)
                    .send()
                    .await?;
            }
            let start = Instant::now();
            let worker = ExecWorker::spawn(&hosted.base, common.slots, "true")?;
            hosted.drained().await?;
            (start.elapsed(), Some(worker))
        }
        Phase::Concurrent => {
            let worker = ExecWorker::spawn(&hosted.base, common.slots, "true")?;
            hosted.worker_registered().await?;
            let start = Instant::now();
            for task in produce(hosted.clone(), body.clone()) {
                task.await??;
            }
            hosted.drained().await?;
            (start.elapsed(), Some(worker))
        }
    };
    progress.inc(runs);
    progress.finish().await;
    if let Some(worker) = worker {
        worker.stop().await?;
    }
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let line = json!({
        "scenario": "throughput",
        "backend": common.backend,
        "durability": hosted.durability,
        "topology": "server",
        "worker": "runlane worker --exec 'true'",
        "phase": phase.name(),
        "gap_ms": null,
        "depth": null,
        "batch": 1,
        "producers": producers,
        "slots": common.slots,
        "runs": runs,
        "payload_bytes": common.payload_bytes,
        "elapsed_ms": elapsed.as_millis() as u64,
        "runs_per_s": (runs as f64 / secs).round() as u64,
        "git_revision": bench::git_revision(),
    });
    match Arc::try_unwrap(hosted) {
        Ok(hosted) => hosted.stop().await?,
        Err(_) => bail!("a producer still holds the server"),
    }
    Ok(line)
}
