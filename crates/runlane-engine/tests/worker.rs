//! Workers over the in-memory backends: execution, retries, cancellation, timeouts, lease
//! recovery, drain, progress and trigger-and-wait.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, reached, until_status, Harness};
use runlane_core::backend::QueueBackend;
use runlane_core::{CancelReason, EnvSettings, QueueSettings, RetryPolicy, RunStatus, Scope};
use runlane_engine::{
    CancelToken, DrainReport, EngineError, HandlerError, RunContext, RunEventKind, TriggerRequest,
    WaitOutcome,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const FOREVER: Duration = Duration::from_secs(24 * 3600);

fn finished(outcome: WaitOutcome) -> runlane_core::backend::RunRecord {
    match outcome {
        WaitOutcome::Finished(run) => run,
        other => panic!("expected a finished run, got {other:?}"),
    }
}

/// What a blocking handler reports.
#[derive(Debug)]
enum Seen {
    /// It started; its token, to check what fired even if it is aborted before it sees it.
    Started(CancelToken),
    /// Its token fired and it noticed.
    Stopped(CancelReason),
}

/// A handler that waits for its token and reports what it saw.
fn blocking(
    seen: mpsc::UnboundedSender<Seen>,
) -> impl Fn(
    RunContext,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Value, HandlerError>> + Send>,
> + Send
       + Sync
       + 'static {
    move |ctx: RunContext| {
        let seen = seen.clone();
        Box::pin(async move {
            let _ = seen.send(Seen::Started(ctx.cancel_token().clone()));
            let reason = ctx.cancel_token().cancelled().await;
            let _ = seen.send(Seen::Stopped(reason));
            Err(HandlerError::new(format!("stopped: {reason:?}")))
        })
    }
}

/// Waits until a blocking handler started; returns its token.
async fn started(seen: &mut mpsc::UnboundedReceiver<Seen>) -> CancelToken {
    match bounded(seen.recv()).await {
        Some(Seen::Started(token)) => token,
        other => panic!("expected the handler to start, got {other:?}"),
    }
}

#[tokio::test]
async fn a_triggered_run_is_executed_by_a_worker_and_completes() {
    let h = Harness::new().await;
    let worker = h
        .engine
        .worker()
        .handler("echo", |ctx: RunContext| async move {
            let payload: Value = ctx.payload()?;
            Ok(json!({ "echo": payload, "attempt": ctx.attempt() }))
        })
        .start()
        .await
        .expect("worker");
    let run = h
        .engine
        .trigger("echo")
        .payload(&json!({ "n": 1 }))
        .send()
        .await
        .expect("trigger")
        .run;
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.status, RunStatus::Completed);
    let output: Value =
        serde_json::from_str(done.output.as_deref().expect("output")).expect("json");
    assert_eq!(output, json!({ "echo": { "n": 1 }, "attempt": 1 }));
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].outcome, "completed");
    assert_eq!(worker.stop().await, DrainReport::default());
    assert!(
        h.queue.snapshot().await.expect("snapshot").is_empty(),
        "nothing left behind"
    );
    h.check_invariants();
}

#[tokio::test]
async fn a_sync_trigger_rides_the_fast_lane_and_waits_for_its_result() {
    let h = Harness::new().await;
    let worker = h
        .engine
        .worker()
        .workloops("fast_lane:1")
        .handler("resize", |_ctx| async { Ok(json!("small.png")) })
        .start()
        .await
        .expect("worker");
    let done = finished(
        bounded(h.engine.trigger("resize").wait(FOREVER))
            .await
            .expect("trigger and wait"),
    );
    assert_eq!(done.lane.as_str(), "fast_lane");
    assert_eq!(done.output.as_deref(), Some("\"small.png\""));
    worker.stop().await;
}

#[tokio::test]
async fn a_failed_attempt_retries_after_its_backoff_then_completes() {
    let h = Harness::new().await;
    let calls = Arc::new(AtomicU32::new(0));
    let worker = h
        .engine
        .worker()
        .handler("flaky", {
            let calls = calls.clone();
            move |ctx: RunContext| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if ctx.attempt() == 1 {
                        Err(HandlerError::new("boom"))
                    } else {
                        Ok(json!("ok"))
                    }
                }
            }
        })
        .start()
        .await
        .expect("worker");
    let policy = RetryPolicy {
        attempts_max: 2,
        min: Duration::from_secs(1),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let run = h
        .engine
        .trigger("flaky")
        .retry(policy)
        .send()
        .await
        .expect("trigger")
        .run;
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");
    reached(&h.engine, &mut events, RunStatus::Delayed).await;
    let waiting = h.engine.get(run.id).await.expect("get");
    assert_eq!(waiting.attempt, 2);
    assert_eq!(waiting.error.as_deref(), Some("boom"));
    assert_eq!(
        waiting.run_after,
        common::at(Duration::from_secs(1)),
        "backoff from the engine clock"
    );

    h.clock.advance(Duration::from_secs(1));
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempt, 2);
    let outcomes: Vec<&str> = done.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "completed"]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_task_without_a_handler_fails_with_no_handler() {
    let h = Harness::new().await;
    let worker = h.engine.worker().start().await.expect("worker");
    let run = h
        .engine
        .trigger("unknown-task")
        .retry(RetryPolicy::none())
        .send()
        .await
        .expect("trigger")
        .run;
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.status, RunStatus::Failed);
    assert_eq!(done.attempts[0].outcome, "no_handler");
    assert!(done
        .error
        .as_deref()
        .is_some_and(|e| e.contains("no handler")));

    // A finished run gets a new run by manual retry; the old one is untouched.
    let retried = h.engine.retry_run(run.id).await.expect("retry").run;
    assert_eq!(retried.retry_of, Some(run.id));
    let again = finished(
        bounded(h.engine.wait(retried.id, FOREVER))
            .await
            .expect("wait"),
    );
    assert_eq!(again.lane.as_str(), "manual");
    assert_eq!(h.engine.get(run.id).await.expect("get").attempts.len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_fails_its_attempt_and_the_worker_goes_on() {
    let h = Harness::new().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let worker = h
        .engine
        .worker()
        .handler("fragile", {
            let attempts = attempts.clone();
            move |_ctx: RunContext| {
                let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        panic!("the handler broke");
                    }
                    Ok::<Value, HandlerError>(json!("recovered"))
                }
            }
        })
        .start()
        .await
        .expect("worker");
    let policy = RetryPolicy {
        attempts_max: 2,
        min: Duration::from_secs(1),
        max: Duration::from_secs(1),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let run = h
        .engine
        .trigger("fragile")
        .retry(policy)
        .send()
        .await
        .expect("trigger")
        .run;
    // The failed attempt arms the timer at its retry instant.
    let retry_at = h.engine.now().saturating_add(Duration::from_secs(1));
    bounded(h.clock.wait_sleeper_at(retry_at)).await;
    let failed = h.engine.get(run.id).await.expect("get");
    assert_eq!(failed.status, RunStatus::Delayed);
    assert_eq!(failed.attempts[0].outcome, "failed");
    assert_eq!(
        failed.attempts[0].error.as_deref(),
        Some("handler panicked")
    );
    // The same worker, still alive, runs the retry.
    h.clock.advance(Duration::from_secs(1));
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.output.as_deref(), Some("\"recovered\""));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    worker.stop().await;
}

#[tokio::test]
async fn cancel_fires_the_running_handlers_token_at_once() {
    let h = Harness::new().await;
    let (tx, mut reasons) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .handler("block", blocking(tx))
        .start()
        .await
        .expect("worker");
    let run = h.engine.trigger("block").send().await.expect("trigger").run;
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");
    let token = started(&mut reasons).await;

    let answer = h.engine.cancel(run.id).await.expect("cancel");
    assert!(
        matches!(answer.status, RunStatus::Executing | RunStatus::Canceled),
        "executing until the handler stops: {}",
        answer.status
    );
    assert!(matches!(
        bounded(reasons.recv()).await,
        Some(Seen::Stopped(CancelReason::Cancel))
    ));
    assert_eq!(token.reason(), Some(CancelReason::Cancel));
    until_status(&mut events, RunStatus::Canceled).await;
    let done = h.engine.get(run.id).await.expect("get");
    assert_eq!(
        done.status,
        RunStatus::Canceled,
        "a canceled run never retries"
    );
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].outcome, "canceled");
    assert!(matches!(
        h.engine.cancel(run.id).await,
        Err(EngineError::AlreadyFinished {
            status: RunStatus::Canceled,
            ..
        })
    ));
    worker.stop().await;
    h.check_invariants();
}

#[tokio::test]
async fn a_completion_within_the_grace_period_wins_and_a_silent_handler_is_canceled_after_it() {
    let h = Harness::new().await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let polite_started = started_tx.clone();
    let worker = h
        .engine
        .worker()
        .workloops("manual>*:2")
        .handler("polite", move |ctx: RunContext| {
            let started = polite_started.clone();
            async move {
                let _ = started.send(ctx.run_id());
                ctx.cancel_token().cancelled().await;
                Ok(json!("finished anyway"))
            }
        })
        .handler("deaf", move |ctx: RunContext| {
            let (tx, started) = (tx.clone(), started_tx.clone());
            async move {
                // Ignores its token; only an abort stops it.
                let _guard = DropSignal(tx);
                let _ = started.send(ctx.run_id());
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    let polite = h
        .engine
        .trigger("polite")
        .send()
        .await
        .expect("trigger")
        .run;
    let deaf = h.engine.trigger("deaf").send().await.expect("trigger").run;
    let mut running = vec![
        bounded(started.recv()).await.expect("started"),
        bounded(started.recv()).await.expect("started"),
    ];
    running.sort();
    assert_eq!(running, vec![polite.id, deaf.id]);
    h.engine.cancel(polite.id).await.expect("cancel");
    let polite = finished(
        bounded(h.engine.wait(polite.id, FOREVER))
            .await
            .expect("wait"),
    );
    assert_eq!(
        polite.status,
        RunStatus::Completed,
        "completion within the grace wins"
    );

    h.engine.cancel(deaf.id).await.expect("cancel");
    let mut events = h.engine.subscribe(deaf.id).await.expect("subscribe");
    let grace_end = h
        .engine
        .now()
        .saturating_add(h.engine.config().cancel_grace);
    bounded(h.clock.wait_sleeper_at(grace_end)).await;
    h.clock.set(grace_end);
    until_status(&mut events, RunStatus::Canceled).await;
    assert_eq!(
        bounded(seen.recv()).await,
        Some(()),
        "the handler was aborted"
    );
    assert_eq!(h.engine.timer_stats().wakeups, vec![grace_end]);
    worker.stop().await;
    h.check_invariants();
}

/// Sends once when dropped (proves a handler future was dropped).
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[tokio::test]
async fn an_attempt_past_its_max_duration_is_aborted_and_ends_timed_out() {
    let h = Harness::new().await;
    let (tx, mut reasons) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .handler("slow", blocking(tx))
        .start()
        .await
        .expect("worker");
    let run = h
        .engine
        .trigger("slow")
        .max_duration(Duration::from_secs(5))
        .retry(RetryPolicy::none())
        .send()
        .await
        .expect("trigger")
        .run;
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");
    let token = started(&mut reasons).await;
    let deadline = common::at(Duration::from_secs(5));
    bounded(h.clock.wait_sleeper_at(deadline)).await;
    h.clock.set(deadline);
    until_status(&mut events, RunStatus::TimedOut).await;
    assert_eq!(token.reason(), Some(CancelReason::Timeout));
    let done = h.engine.get(run.id).await.expect("get");
    assert_eq!(done.attempts[0].outcome, "timed_out");
    let report = worker.stop().await;
    assert_eq!(
        report.released, 0,
        "the timed out run was not in flight any more"
    );
    h.check_invariants();
}

#[tokio::test]
async fn a_crashed_workers_lease_lapses_and_the_run_is_recovered_with_a_crashed_attempt() {
    let h = Harness::new().await;
    let (tx, mut reasons) = mpsc::unbounded_channel();
    let crashing = h
        .engine
        .worker()
        .handler("job", blocking(tx))
        .start()
        .await
        .expect("worker");
    let policy = RetryPolicy {
        attempts_max: 3,
        min: Duration::from_secs(1),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let run = h
        .engine
        .trigger("job")
        .retry(policy)
        .send()
        .await
        .expect("trigger")
        .run;
    let mut events = h.engine.subscribe(run.id).await.expect("subscribe");
    // The crash drops the handler; nobody is left to see its token.
    let _token = started(&mut reasons).await;
    crashing.crash();

    let lease_end = common::at(h.engine.config().lease);
    bounded(h.clock.wait_sleeper_at(lease_end)).await;
    h.clock.set(lease_end);
    let retry = until_status(&mut events, RunStatus::Delayed).await;
    assert_eq!(
        retry.kind,
        RunEventKind::Status {
            status: RunStatus::Delayed,
            attempt: 2
        }
    );
    let waiting = h.engine.get(run.id).await.expect("get");
    assert_eq!(waiting.attempts[0].outcome, "crashed");
    h.check_invariants();

    let healthy = h
        .engine
        .worker()
        .handler(
            "job",
            |ctx: RunContext| async move { Ok(json!(ctx.attempt())) },
        )
        .start()
        .await
        .expect("worker");
    h.clock.advance(Duration::from_secs(1));
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.output.as_deref(), Some("2"));
    healthy.stop().await;
}

#[tokio::test]
async fn drain_cancels_with_shutdown_and_releases_without_counting_an_attempt() {
    let h = Harness::new().await;
    let (tx, mut reasons) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .handler("long", blocking(tx))
        .stop_timeout(Duration::ZERO)
        .start()
        .await
        .expect("worker");
    let run = h.engine.trigger("long").send().await.expect("trigger").run;
    let token = started(&mut reasons).await;
    assert_eq!(worker.in_flight(), 1);

    let report = bounded(worker.stop()).await;
    assert_eq!(
        report,
        DrainReport {
            finished: 0,
            released: 1
        }
    );
    assert_eq!(token.reason(), Some(CancelReason::Shutdown));
    let back = h.engine.get(run.id).await.expect("get");
    assert!(
        back.status.is_waiting(),
        "back in its queue: {}",
        back.status
    );
    assert_eq!(back.attempt, 1, "no attempt counted");
    assert!(back.attempts.is_empty());
    h.check_invariants();

    // Nothing is lost: the next worker runs it as attempt 1.
    let next = h
        .engine
        .worker()
        .handler(
            "long",
            |ctx: RunContext| async move { Ok(json!(ctx.attempt())) },
        )
        .start()
        .await
        .expect("worker");
    let done = finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    assert_eq!(done.output.as_deref(), Some("1"));
    next.stop().await;
}

#[tokio::test]
async fn a_workloop_claims_only_its_free_slots_and_wakes_when_one_frees() {
    let h = Harness::new().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let worker = h
        .engine
        .worker()
        .workloops("manual>*:2")
        .handler("gated", {
            let (gate, running, peak) = (gate.clone(), running.clone(), peak.clone());
            move |_ctx: RunContext| {
                let (gate, running, peak) = (gate.clone(), running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let permit = gate
                        .acquire()
                        .await
                        .map_err(|e| HandlerError::new(e.to_string()))?;
                    permit.forget();
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(Value::Null)
                }
            }
        })
        .start()
        .await
        .expect("worker");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            h.engine
                .trigger("gated")
                .send()
                .await
                .expect("trigger")
                .run
                .id,
        );
    }
    let mut second = h.engine.subscribe(ids[1]).await.expect("subscribe");
    reached(&h.engine, &mut second, RunStatus::Executing).await;
    assert_eq!(worker.in_flight(), 2, "two slots, two runs");
    let waiting = h.engine.get(ids[2]).await.expect("get");
    assert_eq!(
        waiting.status,
        RunStatus::Ready,
        "the third waits in its lane"
    );

    gate.add_permits(5);
    for id in &ids {
        let done = finished(bounded(h.engine.wait(*id, FOREVER)).await.expect("wait"));
        assert_eq!(done.status, RunStatus::Completed);
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "never more than the free slots"
    );
    worker.stop().await;
    h.check_invariants();
}

#[tokio::test]
async fn late_subscribers_get_the_latest_progress_first() {
    let h = Harness::new().await;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (reported_tx, mut reported) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .handler("progress", move |ctx: RunContext| {
            let (mut go, reported) = (go_rx.clone(), reported_tx.clone());
            async move {
                ctx.progress(&json!({ "pct": 10 }));
                ctx.progress(&json!({ "pct": 50 }));
                let _ = reported.send(());
                let _ = go.wait_for(|go| *go).await;
                Ok(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    let run = h
        .engine
        .trigger("progress")
        .send()
        .await
        .expect("trigger")
        .run;
    bounded(reported.recv()).await;
    let mut late = h.engine.subscribe(run.id).await.expect("subscribe");
    let first = bounded(late.next()).await.expect("event");
    assert_eq!(
        first.kind,
        RunEventKind::Progress(Arc::from("{\"pct\":50}"))
    );
    let _ = go_tx.send(true);
    until_status(&mut late, RunStatus::Completed).await;
    assert!(bounded(late.next()).await.is_none());
    let record = h.engine.get(run.id).await.expect("get");
    assert!(
        record.output.is_some_and(|o| !o.contains("pct")),
        "progress is not stored"
    );
    worker.stop().await;
}

#[tokio::test]
async fn trigger_and_wait_from_a_handler_refuses_a_self_deadlock() {
    let h = Harness::new().await;
    h.engine
        .set_queue(
            "default",
            "parent",
            QueueSettings {
                limit: Some(1),
                ..QueueSettings::default()
            },
        )
        .await
        .expect("queue");
    let (tx, mut answers) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .workloops("manual>*:2")
        .handler("parent", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let mut same_key = TriggerRequest::new("child").expect("request");
                same_key.queue = Some(runlane_core::QueueName::new("parent").expect("queue"));
                let refused = ctx.trigger_and_wait(same_key, FOREVER).await;
                let other = TriggerRequest::new("child").expect("request");
                let allowed = ctx.trigger_and_wait(other, FOREVER).await;
                let _ = tx.send((refused.map(|_| ()), allowed.map(finished)));
                Ok(Value::Null)
            }
        })
        .handler("child", |_ctx| async { Ok(json!("child done")) })
        .start()
        .await
        .expect("worker");
    let run = h
        .engine
        .trigger("parent")
        .queue("parent")
        .send()
        .await
        .expect("trigger")
        .run;
    let (refused, allowed) = bounded(answers.recv()).await.expect("answers");
    assert_eq!(
        refused,
        Err(EngineError::WaitDeadlock {
            scope: Scope::QueueKey
        })
    );
    let child = allowed.expect("a child in another queue runs");
    assert_eq!(child.output.as_deref(), Some("\"child done\""));
    assert_eq!(child.lane.as_str(), "fast_lane");
    finished(bounded(h.engine.wait(run.id, FOREVER)).await.expect("wait"));
    worker.stop().await;
}

#[tokio::test]
async fn env_limit_one_refuses_an_ordinary_child_but_not_a_fast_lane_one() {
    let h = Harness::new().await;
    h.engine
        .set_env(
            "default",
            EnvSettings {
                limit: 1,
                ..EnvSettings::default()
            },
        )
        .await
        .expect("env");
    let (tx, mut answers) = mpsc::unbounded_channel();
    let worker = h
        .engine
        .worker()
        .workloops("manual>*:2")
        .handler("parent", move |ctx: RunContext| {
            let tx = tx.clone();
            async move {
                let mut ordinary = TriggerRequest::new("child").expect("request");
                ordinary.lane = Some(runlane_core::LaneName::default_lane());
                let refused = ctx.trigger_and_wait(ordinary, FOREVER).await;
                let _ = tx.send(refused.map(|_| ()));
                Ok(Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    h.engine.trigger("parent").send().await.expect("trigger");
    let refused = bounded(answers.recv()).await.expect("answer");
    assert_eq!(
        refused,
        Err(EngineError::WaitDeadlock { scope: Scope::Env })
    );
    worker.stop().await;
}

/// The heartbeat's timer is armed by a worker's first run and left alone by runs that start
/// and end after it: a run started while that timer is armed is renewed when it fires, not a
/// full interval after its own start (a timer per run would re-arm it then).
#[tokio::test]
async fn a_run_started_while_the_heartbeat_is_armed_is_renewed_when_it_fires() {
    let h = Harness::new().await;
    let lease = h.engine.config().lease;
    let interval = lease / 3;
    let (release, gate) = tokio::sync::watch::channel(false);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let _worker = h
        .engine
        .worker()
        .handler("job", |_ctx: RunContext| async { Ok(json!("done")) })
        .handler("held", move |_ctx: RunContext| {
            let mut gate = gate.clone();
            let started = started_tx.clone();
            async move {
                let _ = started.send(());
                let _ = gate.wait_for(|open| *open).await;
                Ok(json!("released"))
            }
        })
        .start()
        .await
        .expect("worker");

    // The first run arms the heartbeat at T0 + interval, and ends before it fires.
    let first = h.engine.trigger("job").send().await.expect("trigger");
    common::finished(&h.engine, first.run.id).await;
    bounded(h.clock.wait_sleeper_at(common::at(interval))).await;

    // Half an interval later a second run starts while that timer is still armed.
    h.clock.set(common::at(interval / 2));
    let second = h.engine.trigger("held").send().await.expect("trigger");
    let second = second.run.id;
    bounded(started.recv()).await.expect("the held run started");
    let granted = h.queue.live(second).await.expect("live").expect("held");
    let granted = granted.lease.expect("leased").deadline;
    assert_eq!(granted, common::at(interval / 2 + lease));

    // At T0 + interval the armed beat renews it.
    h.clock.set(common::at(interval));
    let renewed = common::at(interval + lease);
    bounded(async {
        loop {
            let live = h.queue.live(second).await.expect("live").expect("held");
            if live.lease.expect("leased").deadline == renewed {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;

    release.send_replace(true);
    common::finished(&h.engine, second).await;
}
