//! Remote workers (`Engine::remote_worker`) on every shape: memory and embedded with a
//! `ManualClock`, distributed on the real Redis and PostgreSQL (a fresh key prefix and schema
//! per test, dropped afterwards) with the system clock and short leases. Waits are on run
//! events or on the claim's own long-poll, bounded only to fail instead of hanging.
//!
//! Redis (`RUNLANE_REDIS_URL`) and PostgreSQL (`RUNLANE_DATABASE_URL`) are required for the
//! `distributed` tests.

mod redis_support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runlane::core::{FencingToken, RunId, RunStatus, Timestamp};
use runlane::{
    ClaimedRun, DistributedConfig, Engine, EngineBuilder, EngineConfig, EngineError, LeaseState,
    ManualClock, RemoteWorker, RemoteWorkerSpec, RetryChoice, RunEventKind, SqliteConfig,
    WaitOutcome,
};
use serde_json::json;

const EPOCH: Timestamp = Timestamp(1_700_000_000_000);
const BOUND: Duration = Duration::from_secs(20);

static NEXT: AtomicU64 = AtomicU64::new(0);

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// One engine of one shape, with its clock when it is manual.
struct Fixture {
    engine: Engine,
    clock: Option<Arc<ManualClock>>,
    /// Keeps the distributed shape (and its throwaway prefix and schema) alive.
    _distributed: Option<runlane::Distributed>,
}

impl Fixture {
    async fn memory() -> Fixture {
        let clock = Arc::new(ManualClock::new(EPOCH));
        let builder = EngineBuilder::new().clock(clock.clone()).config(config());
        let engine = runlane::memory_with(builder).await.expect("memory engine");
        Fixture {
            engine,
            clock: Some(clock),
            _distributed: None,
        }
    }

    async fn embedded() -> Fixture {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("remote_worker")
            .join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let clock = Arc::new(ManualClock::new(EPOCH));
        let builder = EngineBuilder::new().clock(clock.clone()).config(config());
        let engine = runlane::embedded_with(builder, dir.join("runs.db"), SqliteConfig::default())
            .await
            .expect("embedded engine");
        Fixture {
            engine,
            clock: Some(clock),
            _distributed: None,
        }
    }

    async fn distributed() -> Fixture {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let database = std::env::var("RUNLANE_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut shape = DistributedConfig::new(redis_support::url(), database);
        shape.redis.prefix = redis_support::fresh_prefix("remote");
        shape.postgres.schema = format!("rlt_remote_{}_{n}", std::process::id());
        shape.postgres.pool_size = 4;
        shape.timer_lease = Duration::from_secs(1);
        shape.throwaway = true;
        let builder = EngineBuilder::new().config(EngineConfig {
            cancel_grace: REAL_CANCEL_GRACE,
            ..config()
        });
        let distributed = match runlane::distributed_with(builder, shape).await {
            Ok(d) => d,
            Err(e) => panic!("redis and postgresql are required: {e}"),
        };
        Fixture {
            engine: distributed.engine().clone(),
            clock: None,
            _distributed: Some(distributed),
        }
    }

    /// A duration the engine's timer acts on: long on a manual clock (time is advanced past
    /// it), short on the system clock (time passes by itself).
    fn short(&self) -> Duration {
        if self.clock.is_some() {
            Duration::from_secs(30)
        } else {
            Duration::from_millis(400)
        }
    }

    /// Lets `d` pass on a manual clock (the system clock passes by itself).
    fn pass(&self, d: Duration) {
        if let Some(clock) = &self.clock {
            clock.advance(d);
        }
    }

    async fn worker(&self, workloops: &str, lease: Duration) -> RemoteWorker {
        self.engine
            .remote_worker(RemoteWorkerSpec {
                envs: vec![("default".to_owned(), None)],
                workloops: workloops.to_owned(),
                lease: Some(lease),
            })
            .await
            .expect("register a remote worker")
    }

    async fn trigger(&self, n: u64) -> RunId {
        self.engine
            .trigger("job")
            .payload(&json!({ "n": n }))
            .send()
            .await
            .expect("trigger")
            .run
            .id
    }

    async fn status(&self, run: RunId) -> RunStatus {
        self.engine.get(run).await.expect("get the run").status
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        seed: Some(7),
        ..EngineConfig::default()
    }
}

const LONG_LEASE: Duration = Duration::from_secs(60);
/// The cancel grace period on the system clock (the distributed tests).
const REAL_CANCEL_GRACE: Duration = Duration::from_secs(3);

/// Claims without waiting.
async fn claim_now(worker: &RemoteWorker, max: u32) -> Vec<ClaimedRun> {
    worker
        .claim(0, max, Duration::ZERO)
        .await
        .expect("claim without waiting")
}

/// Claims, waiting on the doorbells until `want` runs came (runs of a shared backend become
/// claimable when their trigger's effects land).
async fn claim_n(worker: &RemoteWorker, want: usize) -> Vec<ClaimedRun> {
    bounded("claimed runs", async {
        let mut got = Vec::new();
        while got.len() < want {
            let max = u32::try_from(want - got.len()).expect("small");
            got.extend(
                worker
                    .claim(0, max, Duration::from_secs(5))
                    .await
                    .expect("claim"),
            );
        }
        got
    })
    .await
}

/// Waits for the status event of the run's second attempt or its end (the engine ended the
/// first attempt); subscribed before the claim, so it cannot be missed.
async fn engine_ended(events: &mut runlane::RunEvents) -> RunStatus {
    bounded("the run's second attempt", async {
        loop {
            match events.next().await {
                Some(event) => {
                    if let RunEventKind::Status { status, attempt } = event.kind {
                        if attempt >= 2 || status.is_terminal() {
                            return status;
                        }
                    }
                }
                None => panic!("run events ended"),
            }
        }
    })
    .await
}

fn field_of(e: &EngineError) -> Option<&'static str> {
    match e {
        EngineError::Invalid(i) => Some(i.field),
        _ => None,
    }
}

// ---- scenarios -----------------------------------------------------------------------------

async fn claim_then_complete(fx: Fixture) {
    let run = fx.trigger(1).await;
    let worker = fx.worker("manual>*:2", LONG_LEASE).await;
    assert_eq!(worker.workloops().len(), 1);
    assert_eq!(worker.workloops()[0].chain, "manual>*");
    assert_eq!(worker.workloops()[0].slots, 2);
    assert_eq!(worker.lease(), LONG_LEASE);
    let claimed = claim_n(&worker, 1).await;
    let c = &claimed[0];
    assert_eq!(c.run_id, run);
    assert_eq!(c.task.as_str(), "job");
    assert_eq!(c.env.as_str(), "default");
    assert_eq!(c.attempt, 1);
    let record = fx.engine.get(run).await.expect("get");
    assert_eq!(c.lane, record.lane);
    assert_eq!(c.queue, record.queue);
    let payload: serde_json::Value = serde_json::from_str(&c.payload).expect("payload JSON");
    assert_eq!(payload, json!({ "n": 1 }));
    assert_eq!(fx.status(run).await, RunStatus::Executing);
    assert_eq!(worker.held_runs(), vec![run]);

    let beat = worker
        .heartbeat(&[(run, c.token)])
        .await
        .expect("heartbeat");
    assert_eq!(beat, vec![LeaseState::Alive]);

    worker
        .complete(run, c.token, json!({ "ok": true }))
        .await
        .expect("complete");
    let record = fx.engine.get(run).await.expect("get");
    assert_eq!(record.status, RunStatus::Completed);
    let output: serde_json::Value =
        serde_json::from_str(record.output.as_deref().expect("output")).expect("output JSON");
    assert_eq!(output, json!({ "ok": true }));
    assert!(worker.held_runs().is_empty(), "the slot is free again");

    // Once ended, the token is stale for every run call, and nothing changes.
    let again = worker.complete(run, c.token, json!(2)).await;
    assert_eq!(again, Err(EngineError::StaleToken(run)));
    let beat = worker
        .heartbeat(&[(run, c.token)])
        .await
        .expect("heartbeat");
    assert_eq!(beat, vec![LeaseState::Lost]);
    assert_eq!(
        worker.progress(run, c.token, &json!(1)),
        Err(EngineError::StaleToken(run))
    );
    assert_eq!(fx.status(run).await, RunStatus::Completed);
    worker.close().await;
}

async fn fail_with_each_retry_choice(fx: Fixture) {
    let runs = [
        fx.trigger(1).await,
        fx.trigger(2).await,
        fx.trigger(3).await,
    ];
    let worker = fx.worker("manual>*:3", LONG_LEASE).await;
    let claimed = claim_n(&worker, 3).await;
    let token = |run: RunId| {
        claimed
            .iter()
            .find(|c| c.run_id == run)
            .map(|c| c.token)
            .expect("claimed")
    };

    // The policy (default: 3 attempts, 1 s first backoff): another attempt, later.
    let now = fx.engine.now();
    let policy = worker
        .fail(runs[0], token(runs[0]), "boom".into(), RetryChoice::Policy)
        .await
        .expect("fail with the policy");
    assert_eq!(policy.status, RunStatus::Delayed);
    let at = policy.retry_at.expect("a retry instant");
    assert!(at > now, "the policy's backoff is in the future");
    let record = fx.engine.get(runs[0]).await.expect("get");
    assert_eq!(record.status, RunStatus::Delayed);
    assert_eq!(record.attempt, 2);
    assert_eq!(record.run_after, at);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].outcome, "failed");
    assert_eq!(record.attempts[0].error.as_deref(), Some("boom"));

    // No retry: the run fails for good although the policy had attempts left.
    let none = worker
        .fail(
            runs[1],
            token(runs[1]),
            "fatal".into(),
            RetryChoice::NoRetry,
        )
        .await
        .expect("fail without retry");
    assert_eq!(none.status, RunStatus::Failed);
    assert_eq!(none.retry_at, None);
    let record = fx.engine.get(runs[1]).await.expect("get");
    assert_eq!(record.status, RunStatus::Failed);
    assert_eq!(record.error.as_deref(), Some("fatal"));

    // A past instant is refused, naming the field, and changes nothing.
    let past = fx.engine.now().saturating_sub(Duration::from_secs(60));
    let refused = worker
        .fail(runs[2], token(runs[2]), "x".into(), RetryChoice::At(past))
        .await
        .expect_err("a past retry instant");
    assert_eq!(field_of(&refused), Some("retry_at"), "{refused}");
    assert_eq!(fx.status(runs[2]).await, RunStatus::Executing);
    let far = fx
        .engine
        .now()
        .saturating_add(runlane::RETRY_AT_MAX_AHEAD + Duration::from_secs(60));
    let refused = worker
        .fail(runs[2], token(runs[2]), "x".into(), RetryChoice::At(far))
        .await
        .expect_err("a retry instant too far ahead");
    assert_eq!(field_of(&refused), Some("retry_at"), "{refused}");
    assert_eq!(fx.status(runs[2]).await, RunStatus::Executing);

    // An explicit instant: the next attempt is due then.
    let at = fx.engine.now().saturating_add(Duration::from_secs(3600));
    let explicit = worker
        .fail(runs[2], token(runs[2]), "later".into(), RetryChoice::At(at))
        .await
        .expect("fail with an instant");
    assert_eq!(explicit.status, RunStatus::Delayed);
    assert_eq!(explicit.retry_at, Some(at));
    let record = fx.engine.get(runs[2]).await.expect("get");
    assert_eq!(record.status, RunStatus::Delayed);
    assert_eq!(record.run_after, at);
    assert_eq!(record.attempt, 2);
    assert!(worker.held_runs().is_empty());
    worker.close().await;
}

async fn stale_token_after_lease_lapse(fx: Fixture) {
    let run = fx.trigger(1).await;
    let lease = fx.short();
    let mut events = fx.engine.subscribe(run).await.expect("subscribe");
    let worker = fx.worker("manual>*:1", lease).await;
    let c = claim_n(&worker, 1).await.remove(0);

    // No heartbeat: the lease lapses and the engine counts a crashed attempt and retries.
    fx.pass(lease + Duration::from_secs(1));
    let status = engine_ended(&mut events).await;
    assert!(
        matches!(status, RunStatus::Delayed | RunStatus::Queued),
        "the lapsed run waits for its next attempt, got {status}"
    );
    assert_eq!(
        worker.complete(run, c.token, json!(1)).await,
        Err(EngineError::StaleToken(run))
    );
    assert_eq!(
        worker
            .fail(run, c.token, "late".into(), RetryChoice::NoRetry)
            .await,
        Err(EngineError::StaleToken(run))
    );
    let beat = worker
        .heartbeat(&[(run, c.token)])
        .await
        .expect("heartbeat");
    assert_eq!(beat, vec![LeaseState::Lost]);
    assert!(worker.held_runs().is_empty(), "a lost run frees its slot");
    let record = fx.engine.get(run).await.expect("get");
    assert_eq!(record.attempt, 2, "the zombie changed nothing");
    assert_eq!(record.attempts[0].outcome, "crashed");
    worker.close().await;
}

async fn stale_token_after_timeout(fx: Fixture) {
    let max = fx.short();
    let run = fx
        .engine
        .trigger("job")
        .max_duration(max)
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    let mut events = fx.engine.subscribe(run).await.expect("subscribe");
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let c = claim_n(&worker, 1).await.remove(0);
    assert_eq!(c.max_duration, Some(max));
    fx.pass(max + Duration::from_secs(1));
    let status = engine_ended(&mut events).await;
    assert!(
        matches!(status, RunStatus::Delayed | RunStatus::Queued),
        "{status}"
    );
    assert_eq!(
        worker.complete(run, c.token, json!(1)).await,
        Err(EngineError::StaleToken(run))
    );
    let record = fx.engine.get(run).await.expect("get");
    assert_eq!(record.attempts[0].outcome, "timed_out");
    assert!(record.output.is_none());
    worker.close().await;
}

async fn cancel_is_seen_by_heartbeat(fx: Fixture) {
    let run = fx.trigger(1).await;
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let c = claim_n(&worker, 1).await.remove(0);
    fx.engine.cancel(run).await.expect("cancel");
    let beat = worker
        .heartbeat(&[(run, c.token)])
        .await
        .expect("heartbeat");
    assert_eq!(beat, vec![LeaseState::CancelRequested]);
    // The worker stops the run and reports a failure: a cancelled run ends canceled.
    let failed = worker
        .fail(run, c.token, "stopped".into(), RetryChoice::Policy)
        .await
        .expect("fail after the cancel");
    assert_eq!(failed.status, RunStatus::Canceled);
    assert_eq!(failed.retry_at, None);
    assert_eq!(fx.status(run).await, RunStatus::Canceled);
    worker.close().await;
}

async fn stale_token_after_cancel_grace(fx: Fixture) {
    let run = fx.trigger(1).await;
    let mut events = fx.engine.subscribe(run).await.expect("subscribe");
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let c = claim_n(&worker, 1).await.remove(0);
    fx.engine.cancel(run).await.expect("cancel");
    let grace = fx.engine.config().cancel_grace;
    fx.pass(grace + Duration::from_secs(1));
    let status = engine_ended(&mut events).await;
    assert_eq!(
        status,
        RunStatus::Canceled,
        "the grace period ended the run"
    );
    assert_eq!(
        worker.complete(run, c.token, json!(1)).await,
        Err(EngineError::StaleToken(run))
    );
    assert_eq!(fx.status(run).await, RunStatus::Canceled);
    assert!(
        worker.held_runs().is_empty(),
        "the ended run freed its slot"
    );
    worker.close().await;
}

async fn progress_is_published(fx: Fixture) {
    let run = fx.trigger(1).await;
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let c = claim_n(&worker, 1).await.remove(0);
    let mut events = fx.engine.subscribe(run).await.expect("subscribe");
    worker
        .progress(run, c.token, &json!({ "done": 3 }))
        .expect("progress");
    let progress = bounded("the progress event", async {
        loop {
            match events.next().await {
                Some(event) => {
                    if let RunEventKind::Progress(text) = event.kind {
                        return text;
                    }
                }
                None => panic!("run events ended"),
            }
        }
    })
    .await;
    let value: serde_json::Value = serde_json::from_str(&progress).expect("progress JSON");
    assert_eq!(value, json!({ "done": 3 }));
    let wrong = FencingToken(c.token.0.wrapping_add(1));
    assert_eq!(
        worker.progress(run, wrong, &json!(1)),
        Err(EngineError::StaleToken(run))
    );
    worker.close().await;
}

async fn long_poll_is_woken_by_a_trigger(fx: Fixture) {
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let waiting = {
        let worker = worker.clone();
        // Far longer than the test's bound: only a doorbell ends this wait with a run.
        tokio::spawn(async move { worker.claim(0, 1, Duration::from_secs(600)).await })
    };
    let run = fx.trigger(1).await;
    let claimed = bounded("the long-poll to return the run", waiting)
        .await
        .expect("claim task")
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].run_id, run);
    worker.close().await;
}

async fn slots_are_respected(fx: Fixture) {
    let mut runs = Vec::new();
    for n in 0..5 {
        runs.push(fx.trigger(n).await);
    }
    let worker = fx.worker("manual>*:2", LONG_LEASE).await;
    // `max` caps a claim below the free slots.
    let first = claim_n(&worker, 1).await;
    assert_eq!(first.len(), 1);
    // The free slots cap a claim below `max`.
    let second = bounded(
        "a second claim",
        worker.claim(0, 10, Duration::from_secs(5)),
    )
    .await
    .expect("claim");
    assert_eq!(second.len(), 1, "one slot was free");
    assert_eq!(worker.held_runs().len(), 2);
    // No free slot: the claim waits (here not at all) and returns nothing.
    assert!(claim_now(&worker, 10).await.is_empty());

    // A long-poll with no free slot is woken when a slot frees.
    let waiting = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.claim(0, 10, Duration::from_secs(600)).await })
    };
    worker
        .complete(first[0].run_id, first[0].token, json!(null))
        .await
        .expect("complete");
    let third = bounded("the long-poll after a slot freed", waiting)
        .await
        .expect("claim task")
        .expect("claim");
    assert_eq!(third.len(), 1, "one slot freed");
    assert_eq!(worker.held_runs().len(), 2);
    let held: Vec<RunId> = worker.held_runs();
    assert!(held.iter().all(|r| runs.contains(r)));
    worker.close().await;
}

async fn a_slot_the_engine_frees_wakes_a_long_poll(fx: Fixture) {
    let max = fx.short();
    let first = fx
        .engine
        .trigger("job")
        .max_duration(max)
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let held = claim_n(&worker, 1).await;
    assert_eq!(held[0].run_id, first);
    let second = fx.trigger(2).await;
    // No free slot: this long-poll waits although a run is ready...
    let waiting = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.claim(0, 1, Duration::from_secs(600)).await })
    };
    // ...until the engine ends the held run (it ran past its max duration).
    fx.pass(max + Duration::from_secs(1));
    let claimed = bounded("the long-poll after the engine freed the slot", waiting)
        .await
        .expect("claim task")
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert!(
        c.run_id == second || (c.run_id == first && c.attempt == 2),
        "the freed slot took a ready run, got {c:?}"
    );
    assert_eq!(
        worker.complete(first, held[0].token, json!(1)).await,
        Err(EngineError::StaleToken(first))
    );
    worker.close().await;
}

async fn close_releases_held_runs(fx: Fixture) {
    let a = fx.trigger(1).await;
    let b = fx.trigger(2).await;
    let worker = fx.worker("manual>*:2", LONG_LEASE).await;
    let claimed = claim_n(&worker, 2).await;
    let token = claimed[0].token;
    // A long-poll waiting for a slot ends when the worker closes: empty when it was waiting,
    // refused (`worker`) when it only started after the close.
    let waiting = {
        let worker = worker.clone();
        tokio::spawn(async move { worker.claim(0, 1, Duration::from_secs(600)).await })
    };
    worker.close().await;
    match bounded("the long-poll to end at close", waiting)
        .await
        .expect("claim task")
    {
        Ok(runs) => assert!(runs.is_empty(), "{runs:?}"),
        Err(e) => assert_eq!(field_of(&e), Some("worker"), "{e}"),
    }
    assert!(worker.is_closed());
    for run in [a, b] {
        let record = fx.engine.get(run).await.expect("get");
        assert!(
            matches!(record.status, RunStatus::Queued | RunStatus::Ready),
            "run {run} is back in its queue, got {}",
            record.status
        );
        assert_eq!(record.attempt, 1, "a release counts no attempt");
    }
    let refused = worker
        .complete(claimed[0].run_id, token, json!(1))
        .await
        .expect_err("a closed worker");
    assert_eq!(field_of(&refused), Some("worker"), "{refused}");
    let refused = worker
        .claim(0, 1, Duration::ZERO)
        .await
        .expect_err("closed");
    assert_eq!(field_of(&refused), Some("worker"), "{refused}");
    worker.close().await; // A second close does nothing.

    // Another worker gets both runs, at the same attempt.
    let other = fx.worker("manual>*:2", LONG_LEASE).await;
    let again = claim_n(&other, 2).await;
    let mut ids: Vec<RunId> = again.iter().map(|c| c.run_id).collect();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);
    assert!(again.iter().all(|c| c.attempt == 1));
    for c in &again {
        other
            .complete(c.run_id, c.token, json!("done"))
            .await
            .expect("complete");
    }
    match bounded("the run's end", fx.engine.wait(a, Duration::from_secs(1))).await {
        Ok(WaitOutcome::Finished(record)) => assert_eq!(record.status, RunStatus::Completed),
        other => panic!("run {a} did not finish: {other:?}"),
    }
    other.close().await;
}

/// Checks that a cancelled run ended `canceled` at its first attempt (the attempt recorded as
/// canceled, the terminal status published) instead of going back to its queue.
async fn assert_ended_canceled(fx: &Fixture, run: RunId, events: &mut runlane::RunEvents) {
    assert_eq!(
        engine_ended(events).await,
        RunStatus::Canceled,
        "the cancel survives"
    );
    let record = fx.engine.get(run).await.expect("get");
    assert_eq!(record.status, RunStatus::Canceled);
    assert_eq!(record.attempt, 1, "no attempt after the cancelled one");
    assert_eq!(record.attempts.len(), 1, "{:?}", record.attempts);
    assert_eq!(record.attempts[0].outcome, "canceled");
    assert!(record.output.is_none());
}

async fn release_after_cancel_ends_canceled(fx: Fixture) {
    let a = fx.trigger(1).await;
    let mut events = fx.engine.subscribe(a).await.expect("subscribe");
    let worker = fx.worker("manual>*:1", LONG_LEASE).await;
    let c = claim_n(&worker, 1).await.remove(0);
    fx.engine.cancel(a).await.expect("cancel");
    // The worker hands the run back instead of stopping it: the cancel is not lost.
    worker
        .release(a, c.token)
        .await
        .expect("release after the cancel");
    assert_ended_canceled(&fx, a, &mut events).await;
    assert!(worker.held_runs().is_empty(), "the slot is free");
    assert_eq!(
        worker.complete(a, c.token, json!(1)).await,
        Err(EngineError::StaleToken(a))
    );
    // The freed slot takes the next run; the canceled one never comes back.
    let b = fx.trigger(2).await;
    let next = claim_n(&worker, 1).await;
    assert_eq!(next[0].run_id, b);
    assert_eq!(next[0].attempt, 1);
    worker.close().await;
}

async fn close_after_cancel_ends_canceled(fx: Fixture) {
    let a = fx.trigger(1).await;
    let b = fx.trigger(2).await;
    let mut events = fx.engine.subscribe(a).await.expect("subscribe");
    let worker = fx.worker("manual>*:2", LONG_LEASE).await;
    let claimed = claim_n(&worker, 2).await;
    assert_eq!(claimed.len(), 2);
    fx.engine.cancel(a).await.expect("cancel");
    // The worker deregisters (`DELETE /v1/workers/{id}`) while the cancelled run still runs.
    worker.close().await;
    assert_ended_canceled(&fx, a, &mut events).await;
    let record = fx.engine.get(b).await.expect("get");
    assert!(
        matches!(record.status, RunStatus::Queued | RunStatus::Ready),
        "the other run is back in its queue, got {}",
        record.status
    );
    assert_eq!(record.attempt, 1, "a release counts no attempt");

    // Another worker gets only the run that was not cancelled.
    let other = fx.worker("manual>*:2", LONG_LEASE).await;
    let again = claim_n(&other, 1).await;
    assert_eq!((again[0].run_id, again[0].attempt), (b, 1));
    assert!(
        claim_now(&other, 1).await.is_empty(),
        "the canceled run stays gone"
    );
    other
        .complete(b, again[0].token, json!("done"))
        .await
        .expect("complete");
    other.close().await;
}

async fn lapse_after_cancel_ends_canceled(fx: Fixture) {
    let run = fx.trigger(1).await;
    let mut events = fx.engine.subscribe(run).await.expect("subscribe");
    // A lease shorter than the cancel grace: the worker dies after the cancel and its lease
    // lapses before the grace ends; the run (which has attempts left) is not retried.
    let lease = if fx.clock.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(400)
    };
    assert!(lease < fx.engine.config().cancel_grace);
    let worker = fx.worker("manual>*:1", lease).await;
    let c = claim_n(&worker, 1).await.remove(0);
    fx.engine.cancel(run).await.expect("cancel");
    fx.pass(lease + Duration::from_secs(1));
    assert_ended_canceled(&fx, run, &mut events).await;
    assert_eq!(
        worker.complete(run, c.token, json!(1)).await,
        Err(EngineError::StaleToken(run))
    );
    worker.close().await;
}

async fn bad_input_is_refused_by_name(fx: Fixture) {
    let spec = |envs: Vec<(&str, Option<u32>)>, workloops: &str, lease: Option<Duration>| {
        RemoteWorkerSpec {
            envs: envs.into_iter().map(|(e, v)| (e.to_owned(), v)).collect(),
            workloops: workloops.to_owned(),
            lease,
        }
    };
    let e = fx
        .engine
        .remote_worker(spec(vec![("nowhere", None)], "manual>*:1", None))
        .await
        .err()
        .expect("unknown env");
    assert_eq!(e, EngineError::EnvNotFound("nowhere".into()));
    let e = fx
        .engine
        .remote_worker(spec(vec![("default", None)], "manual>*:x", None))
        .await
        .err()
        .expect("bad workloops");
    assert_eq!(field_of(&e), Some("workloops"), "{e}");
    let e = fx
        .engine
        .remote_worker(spec(vec![("default", None)], "", None))
        .await
        .err()
        .expect("empty workloops");
    assert_eq!(field_of(&e), Some("workloops"), "{e}");
    let e = fx
        .engine
        .remote_worker(spec(vec![], "manual>*:1", None))
        .await
        .err()
        .expect("no env");
    assert_eq!(field_of(&e), Some("envs"), "{e}");
    let e = fx
        .engine
        .remote_worker(spec(
            vec![("default", None)],
            "manual>*:1",
            Some(Duration::ZERO),
        ))
        .await
        .err()
        .expect("zero lease");
    assert_eq!(field_of(&e), Some("lease"), "{e}");
    let e = fx
        .engine
        .remote_worker(spec(vec![("default", Some(99))], "manual>*:1", None))
        .await
        .err()
        .expect("unknown version");
    assert!(
        matches!(e, EngineError::UnknownVersion { version: 99, .. }),
        "{e}"
    );

    let worker = fx.worker("manual>*:1 fast_lane:1", LONG_LEASE).await;
    assert_eq!(worker.workloops().len(), 2);
    let e = worker.claim(2, 1, Duration::ZERO).await.expect_err("index");
    assert_eq!(field_of(&e), Some("workloop"), "{e}");
    let e = worker.claim(0, 0, Duration::ZERO).await.expect_err("max 0");
    assert_eq!(field_of(&e), Some("max"), "{e}");
    // Unknown runs are stale tokens.
    let ghost = RunId(42);
    assert_eq!(
        worker.complete(ghost, FencingToken(1), json!(1)).await,
        Err(EngineError::StaleToken(ghost))
    );
    assert_eq!(
        worker.heartbeat(&[(ghost, FencingToken(1))]).await,
        Ok(vec![LeaseState::Lost])
    );
    assert_eq!(worker.heartbeat(&[]).await, Ok(vec![]));
    worker.close().await;
}

async fn declared_tasks_are_accepted_by_a_strict_env(fx: Fixture) {
    let settings = runlane::core::EnvSettings {
        strict_tasks: true,
        ..runlane::core::EnvSettings::default()
    };
    fx.engine.set_env("strict", settings).await.expect("env");
    let refused = fx.engine.trigger("resize").env("strict").send().await;
    assert!(
        matches!(refused, Err(EngineError::UnknownTask { .. })),
        "{refused:?}"
    );
    let bad = fx
        .engine
        .declare_tasks("strict", &["ok".to_owned(), "bad name!".to_owned()])
        .await
        .expect_err("a bad task name");
    assert_eq!(field_of(&bad), Some("tasks"), "{bad}");
    let version = fx
        .engine
        .declare_tasks("strict", &["resize".to_owned(), "crop".to_owned()])
        .await
        .expect("declare");
    assert!(version.is_some(), "a new version defines the tasks");
    for task in ["resize", "crop"] {
        fx.engine
            .trigger(task)
            .env("strict")
            .send()
            .await
            .expect("a declared task is accepted");
    }
    let again = fx
        .engine
        .declare_tasks("strict", &["resize".to_owned()])
        .await
        .expect("declare again");
    assert_eq!(again, None, "nothing to declare");
    let e = fx
        .engine
        .declare_tasks("nowhere", &["resize".to_owned()])
        .await
        .expect_err("unknown env");
    assert_eq!(e, EngineError::EnvNotFound("nowhere".into()));
}

macro_rules! on_every_shape {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Fixture::memory().await).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Fixture::embedded().await).await;
                }
            )*
        }
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Fixture::distributed().await).await;
                }
            )*
        }
    };
}

on_every_shape!(
    claim_then_complete,
    fail_with_each_retry_choice,
    stale_token_after_lease_lapse,
    stale_token_after_timeout,
    cancel_is_seen_by_heartbeat,
    stale_token_after_cancel_grace,
    progress_is_published,
    long_poll_is_woken_by_a_trigger,
    slots_are_respected,
    a_slot_the_engine_frees_wakes_a_long_poll,
    close_releases_held_runs,
    release_after_cancel_ends_canceled,
    close_after_cancel_ends_canceled,
    lapse_after_cancel_ends_canceled,
    bad_input_is_refused_by_name,
    declared_tasks_are_accepted_by_a_strict_env,
);
