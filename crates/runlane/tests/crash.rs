//! The real crash test: a child process runs the embedded engine under load (triggers
//! streaming in, workers executing handlers of varying short duration, some failing once so
//! retries happen) and is killed with SIGKILL at random points, several rounds in a row, each
//! restart on the same SQLite file. A last round triggers nothing and lets the engine drain.
//!
//! The child is this very test binary, re-invoked with [`CHILD_DIR`] set. It reports on stdout,
//! one flushed line per fact, so whatever it said before the kill reaches the parent:
//! - `accepted <id>` only after `send()` returned `Ok` (the run is promised to exist);
//! - `end <id> <status>` for every terminal status event it saw;
//! - `ready` once the engine is open, `drained` once the final round saw nothing left.
//!
//! Handlers append `<id> <attempt>` to `starts-<round>.log` (one `write` per line) before doing
//! anything else. After each kill the parent opens the file itself (the child is dead, its lock
//! released by the OS) and takes a snapshot of every run. It then proves:
//! - **nothing lost**: every accepted run is in the store, after every round;
//! - **no completed run executes again**: no start in round *r* of a run that was `completed`
//!   in the snapshot taken before round *r*; within one process no `(run, attempt)` starts twice;
//! - **exactly one terminal state**: once terminal in a snapshot, a run's status, finish time
//!   and output never change; no run has two terminal events or two `completed` attempts; after
//!   the drain round every run (accepted or not) is terminal and every completed run was started.
//!
//! The kill delays come from a seeded rng; the seed is printed and `RUNLANE_CRASH_SEED=<seed>`
//! replays it (`RUNLANE_CRASH_ROUNDS` changes the number of kill rounds, 5 by default).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runlane::core::backend::{RunFilter, RunRecord, RunStore};
use runlane::core::{RetryPolicy, RunId, RunStatus};
use runlane::{HandlerError, RunContext, SqliteConfig};
use serde_json::{json, Value};

/// This test's name: the child is started with `--exact` on it.
const TEST_NAME: &str = "sigkill_under_load_loses_nothing_and_never_reruns_a_completed_run";
/// Set in the child: the data directory (database file and start logs).
const CHILD_DIR: &str = "RUNLANE_CRASH_CHILD_DIR";
/// Set in the child: the round number (1-based).
const CHILD_ROUND: &str = "RUNLANE_CRASH_CHILD_ROUND";
/// Set in the child: `load` (trigger and execute until killed) or `drain` (execute, then exit).
const CHILD_MODE: &str = "RUNLANE_CRASH_CHILD_MODE";
/// Set in the child: the seed of its payload choices.
const CHILD_SEED: &str = "RUNLANE_CRASH_CHILD_SEED";

/// Starts every line the child says (the test harness may print on the same line before it).
const MARK: &str = "crash-child: ";
/// Runs the child accepts per load round at most (bounds the final drain). The stream is paced
/// to outlast the longest kill delay, so every kill lands while runs are still coming in.
const ROUND_RUNS_MAX: u32 = 1500;
/// Concurrent triggering tasks in the child.
const TRIGGERERS: u64 = 4;
/// The task every run is of.
const TASK: &str = "crash";
/// The generous bound on any one wait of the parent (child ready, final drain).
const WAIT_MAX: Duration = Duration::from_secs(60);

#[test]
fn sigkill_under_load_loses_nothing_and_never_reruns_a_completed_run() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child::main(PathBuf::from(dir));
    }
    parent();
}

// ---------------------------------------------------------------------------------------------
// The child process.

mod child {
    use super::*;

    fn env_var(name: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for the child"))
    }

    /// One line on stdout, flushed: it is what the parent sees even if a kill follows.
    pub(super) fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        out.write_all(MARK.as_bytes())
            .and_then(|()| out.write_all(line.as_bytes()))
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
            .expect("write to the parent");
    }

    pub(super) fn main(dir: PathBuf) -> ! {
        let round: u32 = env_var(CHILD_ROUND).parse().expect("round");
        let seed: u64 = env_var(CHILD_SEED).parse().expect("seed");
        let drain = match env_var(CHILD_MODE).as_str() {
            "load" => false,
            "drain" => true,
            other => panic!("unknown child mode {other:?}"),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(dir, round, seed, drain));
        // A drained child ends here; a loading one is killed before.
        std::process::exit(0);
    }

    fn retry_policy() -> RetryPolicy {
        RetryPolicy {
            attempts_max: 5,
            factor: 2.0,
            min: Duration::from_millis(5),
            max: Duration::from_millis(50),
            jitter: 0.1,
        }
    }

    async fn run(dir: PathBuf, round: u32, seed: u64, drain: bool) {
        let engine = runlane::embedded(dir.join("runs.db"))
            .await
            .expect("open the embedded engine");
        let log = Arc::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("starts-{round}.log")))
                .expect("start log"),
        );
        // Subscribe before the worker starts, so every terminal event of this process is seen.
        let mut events = engine.subscribe_env("default").expect("subscribe");
        let worker = engine
            .worker()
            .workloops("manual>*:8")
            .handler(TASK, move |ctx: RunContext| {
                let log = log.clone();
                async move {
                    // First thing: record the start (one write(2), so a kill cannot tear it).
                    let line = format!("{} {}\n", ctx.run_id(), ctx.attempt());
                    (&*log)
                        .write_all(line.as_bytes())
                        .map_err(|e| HandlerError::new(format!("start log: {e}")))?;
                    let payload: Value = ctx.payload()?;
                    let ms = payload["ms"].as_u64().unwrap_or(0);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if payload["fail_once"].as_bool() == Some(true) && ctx.attempt() == 1 {
                        return Err(HandlerError::new("planned failure of the first attempt"));
                    }
                    Ok(json!({ "ms": ms }))
                }
            })
            .start()
            .await
            .expect("start the worker");
        say("ready");

        if drain {
            drain_all(&engine, &mut events).await;
            worker.stop().await;
            engine.shutdown().await;
            say("drained");
            return;
        }

        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                report_end(&event);
            }
        });
        let accepted = Arc::new(AtomicU32::new(0));
        let mut triggerers = Vec::new();
        for t in 0..TRIGGERERS {
            let engine = engine.clone();
            let accepted = accepted.clone();
            let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(round) << 32) ^ t);
            triggerers.push(tokio::spawn(async move {
                while accepted.fetch_add(1, Ordering::Relaxed) < ROUND_RUNS_MAX {
                    let queue = ["alpha", "beta", "gamma"][rng.gen_range(0..3)];
                    let ms: u64 = rng.gen_range(0..=20);
                    let fail_once = rng.gen_bool(0.2);
                    let mut trigger = engine
                        .trigger(TASK)
                        .queue(queue)
                        .retry(retry_policy())
                        .payload(&json!({ "ms": ms, "fail_once": fail_once }));
                    if rng.gen_bool(0.1) {
                        trigger = trigger.delay(Duration::from_millis(rng.gen_range(1..30)));
                    }
                    match trigger.send().await {
                        Ok(triggered) => say(&format!("accepted {}", triggered.run.id)),
                        Err(e) => eprintln!("trigger refused: {e}"),
                    }
                    // Pace the stream so execution keeps up roughly (a load, not a flood).
                    let gap = rng.gen_range(0..=3);
                    if gap > 0 {
                        tokio::time::sleep(Duration::from_millis(gap)).await;
                    }
                }
            }));
        }
        for t in triggerers {
            t.await.expect("triggerer");
        }
        // Keep executing until the parent kills us.
        std::future::pending::<()>().await;
    }

    fn report_end(event: &runlane::RunEvent) {
        if let Some(status) = event.status().filter(|s| s.is_terminal()) {
            say(&format!("end {} {}", event.run, status.as_str()));
        }
    }

    /// Waits, on events, until the queue backend holds nothing of env `default`.
    async fn drain_all(engine: &runlane::Engine, events: &mut runlane::EnvEvents) {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let queues = engine.queues("default").await.expect("queues");
            if queues
                .iter()
                .all(|q| q.delayed == 0 && q.queued == 0 && q.running == 0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the drain did not end: {queues:?}"
            );
            // Every terminal event re-checks; the timeout only bounds a wait with no event at
            // all (a deadline ahead, e.g. a retry's backoff, always produces one).
            if let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(1), events.next()).await
            {
                report_end(&event);
            }
        }
        // Report the terminal events already delivered.
        while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, events.next()).await {
            report_end(&event);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: rounds, kills, snapshots and the checks.

/// What a child said before it died.
#[derive(Default)]
struct Said {
    accepted: Vec<RunId>,
    ends: Vec<(RunId, String)>,
    ready: bool,
    drained: bool,
}

/// A run as the store holds it after a round.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    status: RunStatus,
    finished_at: Option<u64>,
    output: Option<String>,
    completed_attempts: usize,
}

fn seen(record: &RunRecord) -> Seen {
    Seen {
        status: record.status,
        finished_at: record.finished_at.map(|t| t.0),
        output: record.output.as_deref().map(str::to_owned),
        completed_attempts: record
            .attempts
            .iter()
            .filter(|a| a.outcome == "completed")
            .count(),
    }
}

/// Kills the child if the parent panics, so no child outlives a failed test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(dir: &Path, round: u32, mode: &str, seed: u64) -> KillOnDrop {
    let stderr = File::create(dir.join(format!("child-{round}.stderr"))).expect("stderr file");
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST_NAME, "--nocapture"])
        .env(CHILD_DIR, dir)
        .env(CHILD_ROUND, round.to_string())
        .env(CHILD_MODE, mode)
        .env(CHILD_SEED, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map(KillOnDrop)
        .expect("spawn the child")
}

/// Reads the child's stdout on a thread (so its pipe never fills), line by line.
fn read_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn parse_line(said: &mut Said, line: &str) {
    // Other lines are the test harness's own ("running 1 test", ...).
    let Some(at) = line.find(MARK) else { return };
    let mut words = line[at + MARK.len()..].split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("ready"), None, None) => said.ready = true,
        (Some("drained"), None, None) => said.drained = true,
        (Some("accepted"), Some(id), None) => said
            .accepted
            .push(id.parse().expect("the child prints run ids")),
        (Some("end"), Some(id), Some(status)) => said.ends.push((
            id.parse().expect("the child prints run ids"),
            status.to_owned(),
        )),
        _ => panic!("the child said something unexpected: {line:?}"),
    }
}

/// Waits (bounded) for the child's `ready` line; panics with its stderr if it died first.
fn wait_ready(lines: &mpsc::Receiver<String>, said: &mut Said, dir: &Path, round: u32) {
    let deadline = Instant::now() + WAIT_MAX;
    while !said.ready {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => parse_line(said, &line),
            Err(e) => panic!(
                "round {round}: the child never became ready ({e}); stderr:\n{}",
                child_stderr(dir, round)
            ),
        }
    }
}

fn child_stderr(dir: &Path, round: u32) -> String {
    std::fs::read_to_string(dir.join(format!("child-{round}.stderr"))).unwrap_or_default()
}

/// Every run in the store (the child is dead: the file is free).
fn snapshot(runtime: &tokio::runtime::Runtime, db: &Path) -> BTreeMap<RunId, Seen> {
    runtime.block_on(async {
        let store = runlane::open_sqlite(db.to_path_buf(), SqliteConfig::default())
            .await
            .expect("open the dead child's database");
        let mut all = BTreeMap::new();
        let mut after = None;
        loop {
            let page = store
                .list(&RunFilter {
                    after,
                    limit: Some(1000),
                    ..RunFilter::default()
                })
                .await
                .expect("list runs");
            let Some(last) = page.last().map(|r| r.id) else {
                break;
            };
            for record in &page {
                all.insert(record.id, seen(record));
            }
            after = Some(last);
        }
        all
    })
}

/// The `(run, attempt)` starts a round's handlers logged (only whole lines).
fn starts(dir: &Path, round: u32) -> Vec<(RunId, u32)> {
    let text = std::fs::read_to_string(dir.join(format!("starts-{round}.log"))).unwrap_or_default();
    let whole = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    whole
        .lines()
        .map(|line| {
            let (id, attempt) = line.split_once(' ').expect("`<id> <attempt>`");
            (
                id.parse().expect("run id"),
                attempt.parse().expect("attempt"),
            )
        })
        .collect()
}

fn parent() {
    let seed: u64 = match std::env::var("RUNLANE_CRASH_SEED") {
        Ok(s) => s.parse().expect("RUNLANE_CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let kill_rounds: u32 = std::env::var("RUNLANE_CRASH_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("RUNLANE_CRASH_ROUNDS is a number"))
        .unwrap_or(5);
    println!(
        "crash test seed {seed} (replay with RUNLANE_CRASH_SEED={seed}), {kill_rounds} kill rounds"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("crash")
        .join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");
    let db = dir.join("runs.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut accepted: Vec<RunId> = Vec::new();
    let mut ends: HashMap<RunId, Vec<String>> = HashMap::new();
    // The snapshot taken after the previous round (what the next child opens).
    let mut before: BTreeMap<RunId, Seen> = BTreeMap::new();
    let mut started: HashSet<RunId> = HashSet::new();
    let mut starts_total = 0usize;
    let mut reexecuted = Vec::new();
    let mut unfinished_at_kills = 0usize;

    for round in 1..=kill_rounds + 1 {
        let drain = round > kill_rounds;
        let mut child = spawn_child(&dir, round, if drain { "drain" } else { "load" }, seed);
        let lines = read_lines(&mut child.0);
        let mut said = Said::default();
        wait_ready(&lines, &mut said, &dir, round);
        if drain {
            let deadline = Instant::now() + WAIT_MAX;
            while !said.drained {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(left) {
                    Ok(line) => parse_line(&mut said, &line),
                    Err(e) => {
                        let _ = child.0.kill();
                        panic!(
                            "the drain round did not finish ({e}); stderr:\n{}",
                            child_stderr(&dir, round)
                        );
                    }
                }
            }
            let status = child.0.wait().expect("wait for the drained child");
            assert!(status.success(), "the drain child exited with {status}");
            println!("round {round}: drain, no triggers");
        } else {
            let delay = Duration::from_millis(rng.gen_range(100..=1500));
            // The kill point: a random instant of the load (sleeping is the point here).
            std::thread::sleep(delay);
            child.0.kill().expect("SIGKILL the child");
            let status = child.0.wait().expect("reap the child");
            assert!(!status.success(), "the child died by the kill: {status}");
            println!("round {round}: killed {} ms after ready", delay.as_millis());
        }
        // The pipe closes with the child: everything it said is here.
        for line in lines.iter() {
            parse_line(&mut said, &line);
        }
        let after = snapshot(&runtime, &db);
        let round_starts = starts(&dir, round);

        // Nothing lost: every run ever accepted is stored.
        accepted.extend(said.accepted.iter().copied());
        let lost: Vec<_> = accepted
            .iter()
            .filter(|id| !after.contains_key(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: accepted runs lost: {lost:?}"
        );

        // No completed run executes again: nothing started here was completed before.
        for (run, attempt) in &round_starts {
            if before
                .get(run)
                .is_some_and(|s| s.status == RunStatus::Completed)
            {
                reexecuted.push(format!("{run} attempt {attempt}"));
            }
        }
        assert!(
            reexecuted.is_empty(),
            "round {round}: runs completed before this round started again: {reexecuted:?}"
        );
        // Within one process an attempt starts once.
        let mut once = HashSet::new();
        let twice: Vec<String> = round_starts
            .iter()
            .filter(|s| !once.insert(**s))
            .map(|(run, attempt)| format!("{run} attempt {attempt}"))
            .collect();
        assert!(
            twice.is_empty(),
            "round {round}: attempts started twice in one process: {twice:?}"
        );
        starts_total += round_starts.len();
        started.extend(round_starts.iter().map(|(run, _)| *run));

        // Exactly one terminal state: what was terminal stays exactly as it was.
        for (run, then) in before.iter().filter(|(_, s)| s.status.is_terminal()) {
            assert_eq!(
                after.get(run),
                Some(then),
                "round {round}: run {run}'s terminal state changed"
            );
        }
        for (run, status) in said.ends {
            ends.entry(run).or_default().push(status);
        }
        let waiting = after.values().filter(|s| !s.status.is_terminal()).count();
        let interrupted = round_starts
            .iter()
            .filter(|(run, _)| after.get(run).is_some_and(|s| !s.status.is_terminal()))
            .count();
        println!(
            "round {round}: {} accepted ({} in all), {} starts, {} runs stored, {waiting} not \
             terminal after it, {interrupted} of this round's starts were of those",
            said.accepted.len(),
            accepted.len(),
            round_starts.len(),
            after.len(),
        );
        unfinished_at_kills += waiting;
        before = after;
    }

    // After the drain: every run is terminal, recorded once, and completed runs ran.
    let last = &before;
    let unfinished: Vec<_> = last
        .iter()
        .filter(|(_, s)| !s.status.is_terminal())
        .map(|(id, s)| format!("{id} {}", s.status))
        .collect();
    assert!(
        unfinished.is_empty(),
        "runs not terminal after the drain: {unfinished:?}"
    );
    let mut duplicate_terminal = Vec::new();
    for (run, s) in last {
        let expected = usize::from(s.status == RunStatus::Completed);
        if s.completed_attempts != expected {
            duplicate_terminal.push(format!(
                "{run}: {} completed attempts",
                s.completed_attempts
            ));
        }
        if s.status == RunStatus::Completed {
            assert!(
                started.contains(run),
                "run {run} completed but never started"
            );
        }
    }
    for (run, statuses) in &ends {
        if statuses.len() > 1 {
            duplicate_terminal.push(format!("{run}: terminal events {statuses:?}"));
        }
        let stored = last.get(run).map(|s| s.status.as_str());
        assert_eq!(
            stored,
            statuses.first().map(String::as_str),
            "run {run}: its terminal event and the store disagree"
        );
    }
    assert!(
        duplicate_terminal.is_empty(),
        "duplicate terminal states: {duplicate_terminal:?}"
    );
    let completed = last
        .values()
        .filter(|s| s.status == RunStatus::Completed)
        .count();
    let failed = last
        .values()
        .filter(|s| s.status == RunStatus::Failed)
        .count();
    // The test proves something only if the kills hit work in progress.
    assert!(
        kill_rounds == 0 || unfinished_at_kills > 0,
        "no kill landed while runs were in flight"
    );
    assert!(completed > 0, "runs completed");
    println!(
        "crash test (seed {seed}): rounds {kill_rounds} killed + 1 drain, runs accepted {}, \
         stored {}, completed {completed}, failed {failed}, starts {starts_total}, lost 0, \
         completed runs executed again 0, duplicate terminal states 0, terminal events {}, \
         unfinished runs at the kills (summed) {unfinished_at_kills}",
        accepted.len(),
        last.len(),
        ends.values().map(Vec::len).sum::<usize>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
