//! CAP and DRAIN: queue caps (SPEC §7: a trigger over `max_queued` is refused, not accepted and
//! lost) and drain on stop (SPEC §5: unfinished runs go back to their queue without counting an
//! attempt).

use std::time::Duration;

use runlane_core::{QueueSettings, RunStatus};
use runlane_engine::EngineError;
use serde_json::json;

use crate::kit::{at, ok, secs, within, Backends, Harness, Probe};

/// CAP-01: `max_queued` caps the waiting (delayed + queued) runs of a queue key: with a cap of
/// 2, a queued and a delayed run fill key `k`, the third trigger is refused with `QueueFull`
/// and nothing is stored, while key `j` still accepts.
pub async fn cap_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            max_queued: Some(2),
            paused: true,
            ..QueueSettings::default()
        },
    )
    .await;
    let queued = h
        .trigger(h.engine.trigger("t").queue("q").key("k"))
        .await
        .id;
    let delayed = h
        .trigger(h.engine.trigger("t").queue("q").key("k").delay(secs(60)))
        .await
        .id;
    assert_eq!(h.status(queued).await, RunStatus::Queued);
    assert_eq!(h.status(delayed).await, RunStatus::Delayed);
    let err = h
        .refused(
            "a trigger over max_queued",
            h.engine.trigger("t").queue("q").key("k").send(),
        )
        .await;
    assert_eq!(
        err,
        EngineError::QueueFull {
            queue: "q".into(),
            max_queued: 2
        },
        "CAP-01: a clear refusal"
    );
    let other = h
        .trigger(h.engine.trigger("t").queue("q").key("j"))
        .await
        .id;
    assert_eq!(
        h.status(other).await,
        RunStatus::Queued,
        "CAP-01: the cap is per key"
    );
    assert_eq!(
        h.all_runs().await.len(),
        3,
        "CAP-01: nothing of the refused trigger stored"
    );
}

/// DRAIN-01: `worker.stop()` with no time left releases its unfinished runs back to their
/// queue (cancel token reason `Shutdown`) without counting an attempt: each run keeps attempt 1
/// with no attempt recorded, and another worker then runs them as attempt 1.
pub async fn drain_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut p1 = Probe::new();
    let w1 = h
        .start(
            h.engine
                .worker()
                .handler("t", p1.held())
                .workloops("manual>*:2")
                .stop_timeout(Duration::ZERO),
        )
        .await;
    let r1 = h.run("t").await;
    let r2 = h.run("t").await;
    let s1 = p1.next().await;
    let s2 = p1.next().await;
    let report = within("the worker to drain", w1.stop()).await;
    assert_eq!(
        (report.finished, report.released),
        (0, 2),
        "DRAIN-01: both released"
    );
    assert_eq!(
        s1.ctx.cancel_token().reason(),
        Some(runlane_core::CancelReason::Shutdown)
    );
    assert_eq!(
        s2.ctx.cancel_token().reason(),
        Some(runlane_core::CancelReason::Shutdown)
    );
    for r in [r1, r2] {
        let rec = h.get(r).await;
        assert!(
            rec.status.is_waiting(),
            "DRAIN-01: {r} is waiting again: {}",
            rec.status
        );
        assert_eq!(rec.attempt, 1, "DRAIN-01: the attempt is not counted");
        assert!(
            rec.attempts.is_empty(),
            "DRAIN-01: no attempt recorded: {:?}",
            rec.attempts
        );
        assert!(
            h.live(r).await.is_some_and(|l| l.lease.is_none()),
            "DRAIN-01: no lease held"
        );
    }
    assert_eq!(
        h.usage("default").await.running,
        2,
        "DRAIN-01: re-admitted (ready) at once"
    );

    let mut p2 = Probe::new();
    let _w2 = h.held_worker(&p2, "t", "manual>*:2").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let s = p2.next().await;
        assert_eq!(s.attempt, 1, "DRAIN-01: the next worker runs attempt 1");
        seen.push(s.run);
        s.complete(json!(null));
    }
    seen.sort();
    assert_eq!(seen, vec![r1, r2]);
    for r in [r1, r2] {
        let rec = h.wait_terminal(r).await;
        assert_eq!((rec.status, rec.attempts.len()), (RunStatus::Completed, 1));
    }
}

/// DRAIN-03: a drain does not lose a cancel: a run cancelled while executing whose handler is
/// still running when `worker.stop()` runs out of time ends `canceled` (its attempt recorded as
/// canceled, its slot released, gone from the queue backend) instead of going back to its
/// queue; the worker's other run is released as in DRAIN-01 and is the only one run again.
pub async fn drain_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut p1 = Probe::new();
    let w1 = h
        .start(
            h.engine
                .worker()
                .handler("t", p1.held())
                .workloops("manual>*:2")
                .stop_timeout(Duration::ZERO),
        )
        .await;
    h.run("t").await;
    h.run("t").await;
    let s1 = p1.next().await;
    let s2 = p1.next().await;
    let (cancelled, other) = (s1.run, s2.run);
    let rec = h.cancel(cancelled).await;
    assert_eq!(
        rec.status,
        RunStatus::Executing,
        "DRAIN-03: cancel requested"
    );
    assert_eq!(
        s1.cancelled().await,
        runlane_core::CancelReason::Cancel,
        "DRAIN-03: the handler was told"
    );
    // The cancelled handler keeps running past the cancel; the drain aborts it.
    let report = within("the worker to drain", w1.stop()).await;
    assert_eq!(
        (report.finished, report.released),
        (1, 1),
        "DRAIN-03: only the other run is released"
    );
    h.wait_status(cancelled, RunStatus::Canceled).await;
    let rec = h.get(cancelled).await;
    assert_eq!(
        rec.status,
        RunStatus::Canceled,
        "DRAIN-03: the cancel survives the drain"
    );
    assert_eq!(rec.attempt, 1);
    assert_eq!(
        rec.attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        vec!["canceled"],
        "DRAIN-03: the attempt is recorded as canceled"
    );
    assert_eq!(
        h.live(cancelled).await,
        None,
        "DRAIN-03: gone from the queue backend"
    );
    assert_eq!(
        h.statuses_of(cancelled)
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect::<Vec<_>>(),
        vec![RunStatus::Canceled],
        "DRAIN-03: canceled published once"
    );
    let rec = h.get(other).await;
    assert!(
        rec.status.is_waiting(),
        "DRAIN-03: the other run is waiting again: {}",
        rec.status
    );
    assert_eq!((rec.attempt, rec.attempts.len()), (1, 0));
    assert_eq!(
        h.usage("default").await.running,
        1,
        "DRAIN-03: the canceled run's slot is free, the other run re-admitted"
    );

    let mut p2 = Probe::new();
    let _w2 = h.held_worker(&p2, "t", "manual>*:2").await;
    let s = p2.next().await;
    assert_eq!(
        (s.run, s.attempt),
        (other, 1),
        "DRAIN-03: only the other run runs again"
    );
    s.complete(json!(null));
    let rec = h.wait_terminal(other).await;
    assert_eq!(rec.status, RunStatus::Completed);
    p2.assert_quiet("DRAIN-03: the canceled run never starts again");
    assert_eq!(h.status(cancelled).await, RunStatus::Canceled);
}

/// DRAIN-02: `worker.stop()` stops claiming and waits for in-flight runs: once the drain waits
/// (parked on its stop timeout), a run completing counts as finished, and the slot it frees
/// does not claim the run triggered during the drain.
pub async fn drain_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let w = h
        .start(
            h.engine
                .worker()
                .handler("t", probe.held())
                .workloops("manual>*:1")
                .stop_timeout(secs(45)),
        )
        .await;
    let r1 = h.run("t").await;
    let s1 = probe.next().await;
    let stopping = tokio::spawn(w.stop());
    h.armed_at(at(secs(45))).await;
    let lanes = ok(h.engine.lanes()).await;
    assert!(
        lanes.iter().all(|l| l.consumers == 0),
        "DRAIN-02: a draining worker stopped claiming: {lanes:?}"
    );
    let late = h.run("t").await;
    assert!(
        !stopping.is_finished(),
        "DRAIN-02: stop waits for the in-flight run"
    );
    s1.complete(json!("done"));
    let report = within("the drain", stopping).await.expect("stop panicked");
    assert_eq!(
        (report.finished, report.released),
        (1, 0),
        "DRAIN-02: one finished"
    );
    assert_eq!(h.wait_terminal(r1).await.status, RunStatus::Completed);
    probe.assert_quiet("DRAIN-02: a stopping worker claimed a new run");
    assert_eq!(
        h.status(late).await,
        RunStatus::Ready,
        "DRAIN-02: the late run waits"
    );
}

/// CAP-02: a sync trigger (trigger-and-wait) over the fast-lane limit is refused with
/// `FastLaneFull` and a `retry_after` hint, storing nothing, rather than queued behind others;
/// an ordinary trigger into `fast_lane` over the limit is queued instead.
pub async fn cap_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "default",
        runlane_core::EnvSettings {
            limit: 10,
            fast_lane_limit: Some(1),
            ..runlane_core::EnvSettings::default()
        },
    )
    .await;
    let first = h
        .trigger(h.engine.trigger("t").queue("q1").lane("fast_lane"))
        .await
        .id;
    assert_eq!(h.status(first).await, RunStatus::Ready);
    let err = h
        .refused(
            "a sync trigger over the fast-lane limit",
            h.engine.trigger("t").queue("q2").wait(secs(5)),
        )
        .await;
    match err {
        EngineError::FastLaneFull { retry_after } => {
            assert!(!retry_after.is_zero(), "CAP-02: a Retry-After hint")
        }
        other => panic!("CAP-02: want FastLaneFull, got {other:?}"),
    }
    let queued = h
        .trigger(h.engine.trigger("t").queue("q3").lane("fast_lane"))
        .await
        .id;
    assert_eq!(
        h.status(queued).await,
        RunStatus::Queued,
        "CAP-02: an ordinary trigger waits instead"
    );
    assert_eq!(h.usage("default").await.fast_lane_running, 1);
}
