//! The `runlane` command line. It parses arguments and calls the library; nothing else.

/// The process's allocator (see the crate manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod cache;
mod child;
mod client;
mod command;
mod duration;
mod footprint;
mod fsync;
mod httpbench;
mod progress;
mod quickstart;
mod separate;
mod serve;
mod table;
mod thp;
mod worker;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// runlane: a run engine for background jobs.
#[derive(Parser, Debug)]
#[command(name = "runlane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A tour: triggers a few hundred runs across queues, lanes, priorities, delays and keys,
    /// shows them progressing and prints a summary table.
    Quickstart {
        /// Runs per env (two envs).
        #[arg(long, default_value_t = 150)]
        runs: u32,
        /// Use the in-memory backends (no durability) instead of the embedded default.
        #[arg(long)]
        memory: bool,
        /// Data directory of the embedded engine.
        #[arg(long, default_value = "./runlane-data", env = "RUNLANE_DATA")]
        data: std::path::PathBuf,
    },
    /// The HTTP server: the JSON API under /v1 (docs/API.md), embedded by default.
    Serve(serve::ServeArgs),
    /// Benchmarks, one JSON line per result.
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// The child worker of `bench latency --topology separate-process` (not for direct use).
    #[command(hide = true)]
    BenchWorker {
        #[arg(long)]
        redis_url: String,
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        schema: String,
        #[arg(long)]
        slots: u32,
        #[arg(long, value_enum)]
        durability: DurabilityArg,
    },
    /// Triggers a run on a server (`--wait` waits for its end).
    Trigger(command::trigger::Args),
    /// Runs on a server: list, show, cancel, retry, reschedule.
    Runs(command::run::Args),
    /// Queues of an env: list, set limits, pause, resume.
    Queues(command::queue::Args),
    /// Cron schedules of an env: list with the next tick of each.
    Schedules(command::schedule::Args),
    /// Lanes: list, add.
    Lanes(command::lane::Args),
    /// Envs and API keys: create, list, show, set, keys, create-key, rotate, revoke.
    Env(command::env::Args),
    /// Versions of an env's task definitions: register, list, show, promote.
    Versions(command::version::Args),
    /// A worker that runs a shell command per run, over a server's worker protocol.
    Worker(worker::Args),
}

#[derive(clap::Args, Debug, Clone)]
struct BenchCommon {
    /// Backend to measure.
    #[arg(long, default_value = "memory")]
    backend: String,
    /// Runs measured.
    #[arg(long)]
    runs: Option<u32>,
    /// Worker slots.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Embedded backend: SQLite's `synchronous` (`full`: every commit durable on return).
    #[arg(long, value_enum, default_value_t = SyncArg::Full)]
    synchronous: SyncArg,
    /// Throughput: tasks triggering at once (trigger_only and concurrent phases).
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Distributed backend: the Redis server.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        env = "RUNLANE_REDIS_URL"
    )]
    redis_url: String,
    /// Distributed backend: the PostgreSQL server.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        env = "RUNLANE_DATABASE_URL"
    )]
    database_url: String,
    /// Distributed backend: `strict` (every commit durable on return) or `relaxed`
    /// (`synchronous_commit off`).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Strict)]
    durability: DurabilityArg,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
#[value(rename_all = "snake_case")]
enum DurabilityArg {
    Strict,
    Relaxed,
}

impl From<DurabilityArg> for runlane::Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Strict => runlane::Durability::Strict,
            DurabilityArg::Relaxed => runlane::Durability::Relaxed,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[value(rename_all = "kebab-case")]
enum TopologyArg {
    SameProcess,
    SeparateProcess,
    Server,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
#[value(rename_all = "snake_case")]
enum SyncArg {
    Full,
    Normal,
}

#[derive(Subcommand, Debug)]
enum BenchScenario {
    /// Trigger call start → handler's first line, sequential.
    Latency {
        #[command(flatten)]
        common: BenchCommon,
        /// Pause between runs, in milliseconds.
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
        /// Where the worker runs: `same-process`; `separate-process` (a child process of the
        /// distributed shape: `--backend distributed`); `server` (triggers over the HTTP API,
        /// a `runlane worker --exec` child process over the worker protocol).
        #[arg(long, value_enum, default_value_t = TopologyArg::SameProcess)]
        topology: TopologyArg,
    },
    /// Trigger and claim cost with `--depth` runs pending vs 1,000 pending.
    Scale {
        #[command(flatten)]
        common: BenchCommon,
        /// Runs pending in the measured queue key.
        #[arg(long, default_value_t = 1_000_000)]
        depth: u64,
    },
    /// Env B's start latency while env A floods at its limit (backlog 100× B's runs) vs alone.
    Fairness {
        #[command(flatten)]
        common: BenchCommon,
        /// Pause between B's runs, in milliseconds.
        #[arg(long, default_value_t = 2)]
        gap_ms: u64,
    },
    /// Redis memory per pending run (SPEC §6), on a private redis-server.
    Footprint {
        /// Backend to measure (`redis`).
        #[arg(long, default_value = "redis")]
        backend: String,
        /// Which load mix.
        #[arg(long, value_enum, default_value_t = MixArg::Reference)]
        mix: MixArg,
        /// Pending runs loaded per mix.
        #[arg(long, default_value_t = 100_000)]
        runs: u64,
    },
    /// What one durable commit costs the disk under `--dir`: 8 KiB rewritten in place and
    /// `fdatasync`, back to back and after each pause of `--gaps-us` (one line per gap).
    Fsync {
        /// A directory on the disk to probe (e.g. PostgreSQL's or the SQLite file's).
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Measured flushes per gap.
        #[arg(long, default_value_t = 300)]
        writes: u32,
        /// Pauses before each flush, in microseconds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,200,1000,5000")]
        gaps_us: Vec<u64>,
    },
    /// What walking a working set of `--kib` costs back to back and after each idle pause of
    /// `--gaps-us` (one line per gap): how cold the machine leaves the CPU caches.
    Cache {
        /// Size of the working set, KiB.
        #[arg(long, default_value_t = 32)]
        kib: usize,
        /// Measured walks per gap.
        #[arg(long, default_value_t = 300)]
        walks: u32,
        /// Pauses before each walk, in microseconds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,20000")]
        gaps_us: Vec<u64>,
    },
    /// Task metadata resolution: warm cache vs the store lookup (SPEC §4).
    Resolve {
        #[command(flatten)]
        common: BenchCommon,
        /// Task definitions in the measured version.
        #[arg(long, default_value_t = 10)]
        tasks: usize,
    },
    /// No-op runs per second.
    Throughput {
        #[command(flatten)]
        common: BenchCommon,
        /// Which phase to measure.
        #[arg(long, value_enum, default_value_t = PhaseArg::Concurrent)]
        phase: PhaseArg,
        /// Runs per trigger call (`trigger_batch`); 1 sends each run on its own.
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// `same-process` (the library), or `server`: triggers over the HTTP API and a
        /// `runlane worker --exec true` child process (default runs: 2,000).
        #[arg(long, value_enum, default_value_t = TopologyArg::SameProcess)]
        topology: TopologyArg,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum MixArg {
    #[value(name = "reference")]
    Reference,
    #[value(name = "delayed_prioritized")]
    DelayedPrioritized,
    #[value(name = "10k_queues")]
    TenKQueues,
    #[value(name = "all")]
    All,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
#[value(rename_all = "snake_case")]
enum PhaseArg {
    TriggerOnly,
    DrainOnly,
    Concurrent,
}

fn common(c: &BenchCommon, default_runs: u32) -> bench::Common {
    bench::Common {
        backend: c.backend.clone(),
        runs: c.runs.unwrap_or(default_runs),
        slots: c.slots,
        payload_bytes: c.payload_bytes,
        synchronous: match c.synchronous {
            SyncArg::Full => runlane::Synchronous::Full,
            SyncArg::Normal => runlane::Synchronous::Normal,
        },
        producers: c.producers,
        redis_url: c.redis_url.clone(),
        database_url: c.database_url.clone(),
        durability: c.durability.into(),
    }
}

fn main() -> std::process::ExitCode {
    thp::off_unless_kept(std::env::var_os("RUNLANE_THP").is_some_and(|v| v == "1"));
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the causes, no backtrace: the server's code, message and field
            // are what a user or a script needs.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Trigger(args) => {
                let code = command::trigger::run(args).await?;
                if code != 0 {
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    std::process::exit(code);
                }
                Ok(())
            }
            Command::Runs(args) => command::run::run(args).await,
            Command::Queues(args) => command::queue::run(args).await,
            Command::Schedules(args) => command::schedule::run(args).await,
            Command::Lanes(args) => command::lane::run(args).await,
            Command::Env(args) => command::env::run(args).await,
            Command::Versions(args) => command::version::run(args).await,
            Command::Worker(args) => worker::run(args).await,
            Command::Quickstart { runs, memory, data } => {
                quickstart::run(quickstart::Options { runs, memory, data }).await
            }
            Command::Serve(args) => serve::run(args).await,
            Command::Bench { scenario } => {
                let lines = match scenario {
                    BenchScenario::Latency {
                        common: c,
                        gap_ms,
                        topology,
                    } => {
                        let gap = Duration::from_millis(gap_ms);
                        vec![match topology {
                            TopologyArg::SameProcess => {
                                bench::latency(&common(&c, 2_000), gap).await?
                            }
                            TopologyArg::SeparateProcess => {
                                separate::latency(&common(&c, 2_000), gap).await?
                            }
                            TopologyArg::Server => {
                                httpbench::latency(&common(&c, 2_000), gap).await?
                            }
                        }]
                    }
                    BenchScenario::Throughput {
                        common: c,
                        phase,
                        batch,
                        topology,
                    } => {
                        let phase = match phase {
                            PhaseArg::TriggerOnly => bench::Phase::TriggerOnly,
                            PhaseArg::DrainOnly => bench::Phase::DrainOnly,
                            PhaseArg::Concurrent => bench::Phase::Concurrent,
                        };
                        if topology == TopologyArg::SeparateProcess {
                            anyhow::bail!(
                                "throughput --topology: same-process or server \
                                 (separate-process is a latency topology)"
                            );
                        }
                        if topology == TopologyArg::Server {
                            if batch > 1 {
                                anyhow::bail!("--batch is not available with --topology server");
                            }
                            vec![httpbench::throughput(&common(&c, 2_000), phase).await?]
                        } else if batch > 1 {
                            vec![
                                bench::throughput_batched(&common(&c, 200_000), phase, batch)
                                    .await?,
                            ]
                        } else {
                            vec![bench::throughput(&common(&c, 200_000), phase).await?]
                        }
                    }
                    BenchScenario::Scale { common: c, depth } => {
                        vec![bench::scale(&common(&c, 2_000), depth).await?]
                    }
                    BenchScenario::Fairness { common: c, gap_ms } => {
                        vec![
                            bench::fairness(&common(&c, 300), Duration::from_millis(gap_ms))
                                .await?,
                        ]
                    }
                    BenchScenario::Resolve { common: c, tasks } => {
                        bench::resolve(&common(&c, 10_000), tasks).await?
                    }
                    BenchScenario::Fsync {
                        dir,
                        writes,
                        gaps_us,
                    } => fsync::fsync(dir, writes, gaps_us).await?,
                    BenchScenario::Cache {
                        kib,
                        walks,
                        gaps_us,
                    } => cache::cache(kib, walks, gaps_us).await?,
                    BenchScenario::Footprint { backend, mix, runs } => {
                        use footprint::Mix;
                        let mixes: Vec<Mix> = match mix {
                            MixArg::Reference => vec![Mix::Reference],
                            MixArg::DelayedPrioritized => vec![Mix::DelayedPrioritized],
                            MixArg::TenKQueues => vec![Mix::TenKQueues],
                            MixArg::All => {
                                vec![Mix::Reference, Mix::DelayedPrioritized, Mix::TenKQueues]
                            }
                        };
                        footprint::footprint(&backend, &mixes, runs).await?
                    }
                };
                for line in lines {
                    println!("{line}");
                }
                Ok(())
            }
            Command::BenchWorker {
                redis_url,
                database_url,
                prefix,
                schema,
                slots,
                durability,
            } => {
                separate::worker(separate::WorkerArgs {
                    redis_url,
                    database_url,
                    prefix,
                    schema,
                    slots,
                    durability: durability.into(),
                })
                .await
            }
        }
    })
}
