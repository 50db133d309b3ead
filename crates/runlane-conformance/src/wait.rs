//! WAIT: trigger-and-wait (SPEC §7). It waits through retries until a terminal state and
//! answers every terminal state with the run and its output or error; on timeout it answers
//! `Pending` and the run goes on; on a finished run it answers at once; from inside a handler,
//! waiting for a run that needs the slot the handler holds is refused (`WaitDeadlock`).

use runlane_core::admission::Scope;
use runlane_core::{QueueName, QueueSettings, RetryPolicy, RunStatus, TaskName, TriggerSource};
use runlane_engine::{EngineError, TriggerRequest, WaitOutcome};
use serde_json::json;

use crate::kit::{at, ok, output, retry_fixed, secs, within, Backends, Harness, Probe};

fn finished(outcome: WaitOutcome, what: &str) -> runlane_core::backend::RunRecord {
    match outcome {
        WaitOutcome::Finished(rec) => rec,
        WaitOutcome::Pending { run_id, status } => {
            panic!("{what}: want a finished run, got Pending {{ {run_id}, {status} }}")
        }
    }
}

/// WAIT-01: trigger-and-wait returns the completed run with its output; the run was triggered
/// with source `sync` into `fast_lane`.
pub async fn wait_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h
        .start(h.engine.worker().handler(
            "add",
            probe.auto(|ctx| {
                let v: serde_json::Value = ctx.payload()?;
                Ok(json!({"sum": v["a"].as_i64().unwrap_or(0) + v["b"].as_i64().unwrap_or(0)}))
            }),
        ))
        .await;
    let outcome = ok(h
        .engine
        .trigger("add")
        .payload(&json!({"a": 1, "b": 2}))
        .wait(secs(60)))
    .await;
    let rec = finished(outcome, "WAIT-01");
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(output(&rec), Some(json!({"sum": 3})), "WAIT-01: the output");
    assert_eq!(rec.source, TriggerSource::Sync, "WAIT-01: source sync");
    assert_eq!(
        rec.lane.as_str(),
        "fast_lane",
        "WAIT-01: sync triggers go to fast_lane"
    );
    assert_eq!(probe.next().await.run, rec.id);
}

/// WAIT-02: trigger-and-wait waits through retries: attempt 1 fails, the wait goes on while the
/// run is delayed, and returns when attempt 2 completes.
pub async fn wait_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let builder = h.engine.trigger("t").retry(retry_fixed(2, secs(1)));
    let waiter = tokio::spawn(builder.wait(secs(60)));
    let s = probe.next().await;
    assert_eq!(s.attempt, 1);
    let run = s.run;
    s.fail("first try");
    h.wait_status(run, RunStatus::Delayed).await;
    assert!(
        !waiter.is_finished(),
        "WAIT-02: the wait goes on through the retry"
    );
    h.set_clock(at(secs(1)));
    let s = probe.next().await;
    assert_eq!((s.run, s.attempt), (run, 2));
    s.complete(json!("second"));
    let outcome = within("the wait", waiter).await.expect("waiter panicked");
    let rec = finished(
        outcome.unwrap_or_else(|e| panic!("WAIT-02: {e}")),
        "WAIT-02",
    );
    assert_eq!(
        (rec.id, rec.status, rec.attempt),
        (run, RunStatus::Completed, 2)
    );
    assert_eq!(output(&rec), Some(json!("second")));
}

/// WAIT-03: trigger-and-wait returns a failed run with its error.
pub async fn wait_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h
        .start(h.engine.worker().handler(
            "t",
            probe.auto(|_| Err(runlane_engine::HandlerError::new("boom"))),
        ))
        .await;
    let outcome = ok(h
        .engine
        .trigger("t")
        .retry(RetryPolicy::none())
        .wait(secs(60)))
    .await;
    let rec = finished(outcome, "WAIT-03");
    assert_eq!(rec.status, RunStatus::Failed);
    assert!(
        rec.error.as_deref().is_some_and(|e| e.contains("boom")),
        "WAIT-03: the error: {:?}",
        rec.error
    );
    assert_eq!(rec.output, None);
    probe.next().await;
}

/// WAIT-04: a wait that times out answers `Pending` with the run's id and status, and the run
/// goes on: a worker started afterwards completes it.
pub async fn wait_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let outcome = h
        .drive(h.engine.trigger("t").wait(secs(5)), at(secs(5)))
        .await;
    let (run, status) = match outcome {
        Ok(WaitOutcome::Pending { run_id, status }) => (run_id, status),
        other => panic!("WAIT-04: want Pending, got {other:?}"),
    };
    assert_eq!(
        status,
        RunStatus::Ready,
        "WAIT-04: the status when the wait ended"
    );
    assert_eq!(
        h.status(run).await,
        RunStatus::Ready,
        "WAIT-04: the run goes on"
    );
    let mut probe = Probe::new();
    let _w = h
        .start(h.engine.worker().handler("t", probe.auto(|_| Ok(json!(7)))))
        .await;
    assert_eq!(probe.next().await.run, run);
    let rec = h.wait_terminal(run).await;
    assert_eq!(
        (rec.status, output(&rec)),
        (RunStatus::Completed, Some(json!(7)))
    );
}

/// WAIT-05: waiting from inside a handler for a run that needs the slot the handler holds is
/// refused with `WaitDeadlock` (queue `shared`, limit 1), and the child run is not created.
pub async fn wait_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "shared",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "parent", "manual>*:2").await;
    let parent = h
        .trigger(h.engine.trigger("parent").queue("shared"))
        .await
        .id;
    let s = probe.next().await;
    assert_eq!(s.run, parent);
    let mut child = TriggerRequest::new("child").expect("valid");
    child.queue = Some(QueueName::new("shared").expect("valid"));
    let answer = within(
        "trigger_and_wait from a handler",
        s.ctx.trigger_and_wait(child, secs(60)),
    )
    .await;
    assert_eq!(
        answer,
        Err(EngineError::WaitDeadlock {
            scope: Scope::QueueKey
        }),
        "WAIT-05: refused, naming the shared scope"
    );
    let children: Vec<_> = h
        .all_runs()
        .await
        .into_iter()
        .filter(|r| r.task == TaskName::new("child").expect("valid"))
        .collect();
    assert!(
        children.is_empty(),
        "WAIT-05: the refused child was stored: {children:?}"
    );
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(parent).await.status, RunStatus::Completed);
}

/// WAIT-06: waiting on a run that already finished answers at once (the virtual clock never
/// moves, so only an immediate answer returns within the bound).
pub async fn wait_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h
        .start(
            h.engine
                .worker()
                .handler("t", probe.auto(|_| Ok(json!("x")))),
        )
        .await;
    let run = h.run("t").await;
    probe.next().await;
    h.wait_terminal(run).await;
    let outcome = ok(h.engine.wait(run, secs(3600))).await;
    let rec = finished(outcome, "WAIT-06");
    assert_eq!((rec.id, rec.status), (run, RunStatus::Completed));
}

/// WAIT-07: every terminal state answers the wait: a waited-on run that is canceled, or that
/// expires, is returned `Finished` with that status.
pub async fn wait_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let _holder = h.trigger(h.engine.trigger("t").queue("q0")).await.id;
    let canceled = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    let expiring = h
        .trigger(h.engine.trigger("t").queue("q2").ttl(secs(5)))
        .await
        .id;
    let wait_canceled = tokio::spawn({
        let e = h.engine.clone();
        async move { e.wait(canceled, secs(60)).await }
    });
    let wait_expired = tokio::spawn({
        let e = h.engine.clone();
        async move { e.wait(expiring, secs(60)).await }
    });
    h.cancel(canceled).await;
    h.set_clock(at(secs(5)));
    let a = within("the wait", wait_canceled)
        .await
        .expect("waiter panicked");
    let b_ = within("the wait", wait_expired)
        .await
        .expect("waiter panicked");
    let a = finished(
        a.unwrap_or_else(|e| panic!("WAIT-07: {e}")),
        "WAIT-07 canceled",
    );
    let b_ = finished(
        b_.unwrap_or_else(|e| panic!("WAIT-07: {e}")),
        "WAIT-07 expired",
    );
    assert_eq!((a.id, a.status), (canceled, RunStatus::Canceled));
    assert_eq!((b_.id, b_.status), (expiring, RunStatus::Expired));
}
