//! LIFE: the run lifecycle (SPEC §2): cancel in every state and its grace period, lease loss
//! and fencing, max duration, manual retry, and idempotent acks, cancels and expiries.

use runlane_core::backend::LeaseState;
use runlane_core::{
    backend::AttemptRecord, CancelReason, QueueError, RetryPolicy, RunStatus, TriggerSource,
};
use serde_json::json;

use crate::kit::{at, ok, output, retry_fixed, secs, Backends, Harness, Probe};
use runlane_engine::EngineError;

/// LIFE-01: cancelling a delayed run ends it `canceled` at once and removes it from every
/// structure: the backend holds no deadline for it and its due instant passes without effect.
pub async fn life_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let run = h.trigger(h.engine.trigger("t").delay(secs(60))).await.id;
    let rec = h.cancel(run).await;
    assert_eq!(rec.status, RunStatus::Canceled, "LIFE-01: canceled at once");
    assert_eq!(
        h.live(run).await,
        None,
        "LIFE-01: gone from the delayed set"
    );
    assert_eq!(
        ok(h.queue.next_deadline()).await,
        None,
        "LIFE-01: no deadline left"
    );
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    h.set_clock(at(secs(60)));
    let marker = h.run("t").await;
    let s = probe.next().await;
    assert_eq!(s.run, marker, "LIFE-01: the canceled run never starts");
    s.complete(json!(null));
    assert_eq!(h.status(run).await, RunStatus::Canceled);
}

/// LIFE-02: cancelling a queued run ends it `canceled` and removes it from its queue; the run
/// holding the slot is untouched. The request is kept in the store (`cancel_requested_at`).
pub async fn life_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let holder = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    let run = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(h.status(run).await, RunStatus::Queued);
    let rec = h.cancel(run).await;
    assert_eq!(rec.status, RunStatus::Canceled, "LIFE-02: canceled at once");
    assert_eq!(
        rec.cancel_requested_at,
        Some(at(secs(0))),
        "LIFE-02: the request is kept"
    );
    assert_eq!(
        h.get(run).await,
        rec,
        "LIFE-02: the store holds what cancel answered"
    );
    assert_eq!(h.live(run).await, None);
    assert_eq!(
        h.queue_info("q2").await.queued,
        0,
        "LIFE-02: its queue is empty"
    );
    assert_eq!(h.status(holder).await, RunStatus::Ready);
    h.cancel(holder).await;
    let next = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(
        h.status(next).await,
        RunStatus::Ready,
        "LIFE-02: the canceled run holds nothing"
    );
}

/// LIFE-03: cancelling a ready run releases its slot at once: the run waiting for it is
/// admitted in the same step (no timer wake-up) and is the one that starts.
pub async fn life_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let run = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    let waiting = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    let rec = h.cancel(run).await;
    assert_eq!(rec.status, RunStatus::Canceled);
    h.wait_status(waiting, RunStatus::Ready).await;
    assert_eq!(
        h.usage("default").await.running,
        1,
        "LIFE-03: the slot passed on"
    );
    assert_eq!(h.lane_ready("default").await, 1);
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:2").await;
    let s = probe.next().await;
    assert_eq!(s.run, waiting, "LIFE-03: the canceled run never starts");
    s.complete(json!(null));
    h.wait_terminal(waiting).await;
    probe.assert_quiet("LIFE-03: only one run started");
    assert!(h.wakeups().is_empty());
}

/// LIFE-04: cancelling an executing run fires its handler's token with reason `Cancel`; when
/// the grace period (10 s) ends without a completion the run ends `canceled`, its slot is
/// released, and a completion arriving after that is refused: the run stays `canceled`. The
/// request is in the store (`cancel_requested_at`) before cancel returns.
pub async fn life_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h.run("t").await;
    let s = probe.next().await;
    let rec = h.cancel(run).await;
    assert_eq!(
        rec.status,
        RunStatus::Executing,
        "LIFE-04: executing until it stops or grace ends"
    );
    assert_eq!(
        rec.cancel_requested_at,
        Some(at(secs(0))),
        "LIFE-04: the request is kept in the store"
    );
    assert_eq!(
        s.cancelled().await,
        CancelReason::Cancel,
        "LIFE-04: token reason"
    );
    h.set_clock(at(secs(10)));
    h.wait_status(run, RunStatus::Canceled).await;
    assert_eq!(
        h.usage("default").await.running,
        0,
        "LIFE-04: slot released"
    );
    s.complete(json!("late"));
    within_stop(w).await;
    let rec = h.get(run).await;
    assert_eq!(
        rec.status,
        RunStatus::Canceled,
        "LIFE-04: the late completion is refused"
    );
    assert_eq!(
        rec.output, None,
        "LIFE-04: no output from the late completion"
    );
    assert_eq!(rec.finished_at, Some(at(secs(10))));
    assert_eq!(
        terminal_events(&h, run),
        vec![RunStatus::Canceled],
        "LIFE-04: one terminal state"
    );
}

/// LIFE-05: a completion that lands within the grace period of a cancel wins: the run ends
/// `completed` with its output, never `canceled`.
pub async fn life_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h.run("t").await;
    let s = probe.next().await;
    h.cancel(run).await;
    assert_eq!(s.cancelled().await, CancelReason::Cancel);
    h.set_clock(at(secs(5)));
    s.complete(json!({"done": true}));
    let rec = h.wait_terminal(run).await;
    assert_eq!(
        rec.status,
        RunStatus::Completed,
        "LIFE-05: completion within grace wins"
    );
    assert_eq!(output(&rec), Some(json!({"done": true})));
    assert_eq!(terminal_events(&h, run), vec![RunStatus::Completed]);
    assert_eq!(h.usage("default").await.running, 0);
}

/// LIFE-06: cancelling a finished run is refused with `AlreadyFinished` naming its status, and
/// nothing changes — also when repeated, and for a reschedule; terminal states absorb.
pub async fn life_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h
        .start(h.engine.worker().handler("t", probe.auto(|_| Ok(json!(1)))))
        .await;
    let run = h.run("t").await;
    probe.next().await;
    let before = h.wait_terminal(run).await;
    assert_eq!(before.status, RunStatus::Completed);
    for _ in 0..2 {
        let err = h
            .refused("cancel of a finished run", h.engine.cancel(run))
            .await;
        assert_eq!(
            err,
            EngineError::AlreadyFinished {
                run,
                status: RunStatus::Completed
            },
            "LIFE-06: 409 already_finished"
        );
    }
    let err = h
        .refused(
            "reschedule of a finished run",
            h.engine.reschedule(run, at(secs(60))),
        )
        .await;
    assert!(
        matches!(
            err,
            EngineError::AlreadyFinished { .. } | EngineError::WrongState { .. }
        ),
        "LIFE-06: reschedule of a finished run: {err:?}"
    );
    assert_eq!(h.get(run).await, before, "LIFE-06: the record is unchanged");
    assert_eq!(terminal_events(&h, run), vec![RunStatus::Completed]);
}

/// LIFE-07: a lost lease is recovered: after `worker.crash()` and the lease (30 s) passing, the
/// attempt counts as `crashed`, the retry policy applies, and another worker runs attempt 2;
/// the crashed worker's fencing token is refused by the backend (finish, retry, release,
/// heartbeat, check) while the new lease is untouched.
pub async fn life_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut p1 = Probe::new();
    let w1 = h
        .start(
            h.engine
                .worker()
                .handler("t", p1.held())
                .lease(secs(30))
                .workloops("manual>*:1"),
        )
        .await;
    let run = h
        .trigger(h.engine.trigger("t").retry(retry_fixed(2, secs(1))))
        .await
        .id;
    let zombie = p1.next().await;
    let old = h
        .live(run)
        .await
        .and_then(|l| l.lease)
        .expect("LIFE-07: leased")
        .token;
    w1.crash();
    h.set_clock(at(secs(30)));
    h.wait_status(run, RunStatus::Delayed).await;
    let rec = h.get(run).await;
    assert_eq!(rec.attempt, 2, "LIFE-07: the retry policy applied");
    assert_eq!(rec.attempts.len(), 1);
    assert_eq!(
        rec.attempts[0].outcome, "crashed",
        "LIFE-07: the attempt counts as crashed"
    );
    assert_eq!(
        h.usage("default").await.running,
        0,
        "LIFE-07: slots released"
    );

    let mut p2 = Probe::new();
    let _w2 = h.held_worker(&p2, "t", "manual>*:1").await;
    h.set_clock(at(secs(31)));
    let s = p2.next().await;
    assert_eq!(
        (s.run, s.attempt),
        (run, 2),
        "LIFE-07: another worker runs the retry"
    );
    let lease = h
        .live(run)
        .await
        .and_then(|l| l.lease)
        .expect("LIFE-07: leased again");
    assert_ne!(lease.token, old, "LIFE-07: a new token");
    let now = h.now();
    assert_eq!(
        h.queue.finish(run, old, now).await,
        Err(QueueError::StaleToken(run)),
        "LIFE-07: finish"
    );
    assert_eq!(
        h.queue.retry(run, old, now, now).await,
        Err(QueueError::StaleToken(run)),
        "LIFE-07: retry"
    );
    assert_eq!(
        h.queue.release(run, old, now).await,
        Err(QueueError::StaleToken(run)),
        "LIFE-07: release"
    );
    assert_eq!(
        h.queue.check_lease(run, old).await,
        Err(QueueError::StaleToken(run)),
        "LIFE-07: check"
    );
    assert_eq!(
        ok(h.queue.heartbeat(&[(run, old)], now)).await,
        vec![LeaseState::Lost]
    );
    let after = h
        .live(run)
        .await
        .and_then(|l| l.lease)
        .expect("LIFE-07: still leased");
    assert_eq!(after, lease, "LIFE-07: the zombie changed nothing");
    drop(zombie);
    s.complete(json!("second"));
    let rec = h.wait_terminal(run).await;
    assert_eq!(rec.status, RunStatus::Completed);
    assert_eq!(output(&rec), Some(json!("second")));
}

/// LIFE-08: a lost lease with no attempts left ends the run `failed`, its one attempt
/// `crashed`, and releases its slot so the next run starts.
pub async fn life_08(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let mut p1 = Probe::new();
    let w1 = h.held_worker(&p1, "t", "manual>*:1").await;
    let run = h
        .trigger(h.engine.trigger("t").queue("q1").retry(RetryPolicy::none()))
        .await
        .id;
    let _zombie = p1.next().await;
    let next = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(h.status(next).await, RunStatus::Queued);
    w1.crash();
    h.set_clock(at(secs(30)));
    let rec = h.wait_terminal(run).await;
    assert_eq!(rec.status, RunStatus::Failed, "LIFE-08: attempts exhausted");
    assert_eq!(
        rec.attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        vec!["crashed"]
    );
    h.wait_status(next, RunStatus::Ready).await;
    let mut p2 = Probe::new();
    let _w2 = h.held_worker(&p2, "t", "manual>*:1").await;
    let s = p2.next().await;
    assert_eq!(
        s.run, next,
        "LIFE-08: the released slot admitted the next run"
    );
    s.complete(json!(null));
}

/// LIFE-09: an attempt running past its max duration is aborted (token reason `Timeout`) and
/// counts as a failed attempt (`timed_out`) that retries; when attempts are exhausted the run
/// ends `timed_out`.
pub async fn life_09(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h
        .trigger(
            h.engine
                .trigger("t")
                .max_duration(secs(5))
                .retry(retry_fixed(2, secs(1))),
        )
        .await
        .id;
    let s = probe.next().await;
    h.set_clock(at(secs(5)));
    assert_eq!(
        s.cancelled().await,
        CancelReason::Timeout,
        "LIFE-09: aborted at max duration"
    );
    h.wait_status(run, RunStatus::Delayed).await;
    let rec = h.get(run).await;
    assert_eq!(rec.attempt, 2);
    assert_eq!(
        rec.attempts[0].outcome, "timed_out",
        "LIFE-09: a failed attempt"
    );
    assert_eq!(rec.run_after, at(secs(6)));
    drop(s);

    h.set_clock(at(secs(6)));
    let s = probe.next().await;
    assert_eq!(s.attempt, 2);
    h.set_clock(at(secs(11)));
    assert_eq!(s.cancelled().await, CancelReason::Timeout);
    let rec = h.wait_terminal(run).await;
    assert_eq!(
        rec.status,
        RunStatus::TimedOut,
        "LIFE-09: exhausted → timed_out"
    );
    let outcomes: Vec<_> = rec
        .attempts
        .iter()
        .map(|a: &AttemptRecord| a.outcome.as_str())
        .collect();
    assert_eq!(outcomes, vec!["timed_out", "timed_out"]);
    assert_eq!(h.usage("default").await.running, 0);
}

/// LIFE-10: a manual retry of a finished run creates a new run (`retry_of` the old one, source
/// `manual`, lane `manual`) that runs, leaving the old run unchanged; a manual retry of an
/// unfinished run is refused and creates nothing.
pub async fn life_10(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let old = h
        .trigger(
            h.engine
                .trigger("t")
                .payload(&json!({"x": 1}))
                .retry(RetryPolicy::none()),
        )
        .await
        .id;
    probe.next().await.fail("boom");
    let failed = h.wait_terminal(old).await;
    assert_eq!(failed.status, RunStatus::Failed);

    let retried = ok(h.engine.retry_run(old)).await;
    assert!(!retried.idempotent_hit);
    let new = retried.run;
    assert_ne!(new.id, old, "LIFE-10: a new run");
    assert_eq!(new.retry_of, Some(old));
    assert_eq!(new.source, TriggerSource::Manual);
    assert_eq!(new.lane.as_str(), "manual");
    assert_eq!(new.attempt, 1);
    assert_eq!(&*new.payload, &*failed.payload, "LIFE-10: same payload");
    let s = probe.next().await;
    assert_eq!((s.run, s.attempt), (new.id, 1));

    let err = h
        .refused(
            "manual retry of an executing run",
            h.engine.retry_run(new.id),
        )
        .await;
    assert!(
        matches!(err, EngineError::WrongState { .. }),
        "LIFE-10: retry of an unfinished run: {err:?}"
    );
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(new.id).await.status, RunStatus::Completed);
    assert_eq!(
        h.get(old).await,
        failed,
        "LIFE-10: the old run is unchanged"
    );
}

/// LIFE-11: cancel is idempotent: a second cancel of a canceled run answers `AlreadyFinished`
/// and changes nothing; a second cancel of an executing run answers the same and keeps the
/// first grace deadline (the run ends `canceled` at the first cancel + 10 s).
pub async fn life_11(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let waiting = h.trigger(h.engine.trigger("t").delay(secs(60))).await.id;
    let first = h.cancel(waiting).await;
    let err = h.refused("a second cancel", h.engine.cancel(waiting)).await;
    assert_eq!(
        err,
        EngineError::AlreadyFinished {
            run: waiting,
            status: RunStatus::Canceled
        }
    );
    assert_eq!(h.get(waiting).await, first, "LIFE-11: unchanged");

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h.run("t").await;
    let s = probe.next().await;
    let a = h.cancel(run).await;
    h.set_clock(at(secs(5)));
    let again = h.cancel(run).await;
    assert_eq!(
        (a.status, again.status),
        (RunStatus::Executing, RunStatus::Executing)
    );
    h.set_clock(at(secs(10)));
    h.wait_status(run, RunStatus::Canceled).await;
    assert_eq!(
        h.get(run).await.finished_at,
        Some(at(secs(10))),
        "LIFE-11: the first deadline holds"
    );
    assert_eq!(terminal_events(&h, waiting), vec![RunStatus::Canceled]);
    assert_eq!(terminal_events(&h, run), vec![RunStatus::Canceled]);
    drop(s);
}

/// LIFE-12: expiry is idempotent: an expired run stays exactly as it expired through later
/// timer wake-ups (another run expiring later), and cancelling it answers `AlreadyFinished`.
pub async fn life_12(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let _holder = h.trigger(h.engine.trigger("t").queue("q0")).await.id;
    let first = h
        .trigger(h.engine.trigger("t").queue("q1").ttl(secs(5)))
        .await
        .id;
    let second = h
        .trigger(h.engine.trigger("t").queue("q2").ttl(secs(10)))
        .await
        .id;
    h.set_clock(at(secs(5)));
    let expired = h.wait_terminal(first).await;
    assert_eq!(expired.status, RunStatus::Expired);
    h.set_clock(at(secs(10)));
    h.wait_status(second, RunStatus::Expired).await;
    assert_eq!(
        h.get(first).await,
        expired,
        "LIFE-12: unchanged by later ticks"
    );
    let err = h
        .refused("cancel of an expired run", h.engine.cancel(first))
        .await;
    assert_eq!(
        err,
        EngineError::AlreadyFinished {
            run: first,
            status: RunStatus::Expired
        }
    );
    assert_eq!(
        terminal_events(&h, first),
        vec![RunStatus::Expired],
        "LIFE-12: expired once"
    );
    assert_eq!(
        h.usage("default").await.running,
        1,
        "LIFE-12: only the holder's slot"
    );
}

/// LIFE-13: an ack is recorded once: after completion, a repeated terminal write to the store
/// answers `AlreadyFinished` with the first outcome kept, and a repeated finish of the old lease
/// in the queue backend is refused without touching any counter.
pub async fn life_13(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h.run("t").await;
    let s = probe.next().await;
    let token = h
        .live(run)
        .await
        .and_then(|l| l.lease)
        .expect("leased")
        .token;
    s.complete(json!({"v": 1}));
    let done = h.wait_terminal(run).await;
    assert_eq!(done.status, RunStatus::Completed);

    let now = h.now();
    let again = h
        .store
        .finish(run, RunStatus::Completed, Some("2".into()), None, now)
        .await;
    assert_eq!(
        again.map(|r| r.status),
        Err(runlane_core::StoreError::AlreadyFinished {
            run,
            status: RunStatus::Completed
        }),
        "LIFE-13: the first terminal write wins"
    );
    let usage = h.usage("default").await;
    let snapshot = h.snapshot().await;
    assert!(
        h.queue.finish(run, token, now).await.is_err(),
        "LIFE-13: a second queue finish is refused"
    );
    assert_eq!(
        h.usage("default").await,
        usage,
        "LIFE-13: counters untouched"
    );
    assert_eq!(h.snapshot().await, snapshot);
    assert_eq!(h.get(run).await, done, "LIFE-13: the record is unchanged");
    assert_eq!(
        terminal_events(&h, run),
        vec![RunStatus::Completed],
        "LIFE-13: completed once"
    );
}

/// LIFE-15: a lease that lapses after a cancel request (the worker died, the lease of 5 s
/// ends before the 10 s grace) ends the run `canceled`, its attempt recorded as canceled, its
/// slot released; it is never retried although its policy has attempts left.
pub async fn life_15(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut p1 = Probe::new();
    let w1 = h
        .start(
            h.engine
                .worker()
                .handler("t", p1.held())
                .lease(secs(5))
                .workloops("manual>*:1"),
        )
        .await;
    let run = h
        .trigger(h.engine.trigger("t").retry(retry_fixed(3, secs(1))))
        .await
        .id;
    let _zombie = p1.next().await;
    let rec = h.cancel(run).await;
    assert_eq!(
        rec.status,
        RunStatus::Executing,
        "LIFE-15: cancel requested"
    );
    w1.crash();
    h.set_clock(at(secs(5)));
    let rec = h.wait_terminal(run).await;
    assert_eq!(
        rec.status,
        RunStatus::Canceled,
        "LIFE-15: canceled, not retried"
    );
    assert_eq!(rec.attempt, 1);
    assert_eq!(
        rec.attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        vec!["canceled"],
        "LIFE-15: the attempt is recorded as canceled"
    );
    assert_eq!(rec.finished_at, Some(at(secs(5))));
    assert_eq!(
        h.live(run).await,
        None,
        "LIFE-15: gone from the queue backend"
    );
    assert_eq!(
        h.usage("default").await.running,
        0,
        "LIFE-15: slot released"
    );
    assert_eq!(
        terminal_events(&h, run),
        vec![RunStatus::Canceled],
        "LIFE-15: one terminal state"
    );
    assert_eq!(
        ok(h.queue.next_deadline()).await,
        None,
        "LIFE-15: no grace deadline or retry left armed"
    );
}

/// The terminal statuses `run` published, in order.
fn terminal_events(h: &Harness, run: runlane_core::RunId) -> Vec<RunStatus> {
    h.statuses_of(run)
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect()
}

/// Stops a worker (it waits for in-flight handlers), bounded.
async fn within_stop(w: runlane_engine::Worker) {
    crate::kit::within("the worker to stop", w.stop()).await;
}

/// LIFE-14: reschedule moves a delayed or queued run (its TTL deadline recomputed): a delayed
/// run brought forward is promoted at the new instant, a queued run pushed back becomes
/// delayed and stops waiting for a slot; a ready or executing run is refused (`WrongState`)
/// and nothing changes.
pub async fn life_14(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let holder = h.trigger(h.engine.trigger("t").queue("q0")).await.id;
    let delayed = h
        .trigger(h.engine.trigger("t").queue("q1").delay(secs(60)))
        .await
        .id;
    let queued = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    let moved = ok(h.engine.reschedule(queued, at(secs(30)))).await;
    assert_eq!(
        (moved.status, moved.run_after),
        (RunStatus::Delayed, at(secs(30)))
    );
    assert_eq!(h.live_status(queued).await, Some(RunStatus::Delayed));
    let earlier = ok(h.engine.reschedule(delayed, at(secs(10)))).await;
    assert_eq!(earlier.run_after, at(secs(10)));
    let err = h
        .refused(
            "reschedule of a ready run",
            h.engine.reschedule(holder, at(secs(5))),
        )
        .await;
    assert!(
        matches!(
            err,
            EngineError::WrongState {
                status: RunStatus::Ready,
                ..
            }
        ),
        "LIFE-14: {err:?}"
    );
    h.cancel(holder).await;
    h.set_clock(at(secs(10)));
    h.wait_status(delayed, RunStatus::Ready).await;
    assert_eq!(
        h.status(queued).await,
        RunStatus::Delayed,
        "LIFE-14: the pushed-back run waits"
    );

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let s = probe.next().await;
    assert_eq!(s.run, delayed);
    let err = h
        .refused(
            "reschedule of an executing run",
            h.engine.reschedule(delayed, at(secs(50))),
        )
        .await;
    assert!(
        matches!(
            err,
            EngineError::WrongState {
                status: RunStatus::Executing,
                ..
            }
        ),
        "LIFE-14: {err:?}"
    );
    s.complete(json!(null));
    h.wait_terminal(delayed).await;
}

/// LIFE-16: cancelling a queued run in the middle of its key's backlog (neither first nor last)
/// ends it `canceled` and takes it out of the depth at once; the runs before and after it
/// start in trigger order and it never starts.
pub async fn life_16(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let q = |h: &Harness| h.engine.trigger("t").queue("q");
    let holder = h.trigger(q(&h)).await.id;
    let mut backlog = Vec::new();
    for _ in 0..3 {
        backlog.push(h.trigger(q(&h)).await.id);
    }
    assert_eq!(h.queue_info("q").await.queued, 3);
    let rec = h.cancel(backlog[1]).await;
    assert_eq!(rec.status, RunStatus::Canceled, "LIFE-16: canceled at once");
    assert_eq!(
        h.live(backlog[1]).await,
        None,
        "LIFE-16: gone from the queue"
    );
    assert_eq!(
        h.queue_info("q").await.queued,
        2,
        "LIFE-16: the depth excludes it"
    );
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    for expected in [holder, backlog[0], backlog[2]] {
        let s = probe.next().await;
        assert_eq!(
            s.run, expected,
            "LIFE-16: the others start in order, it never does"
        );
        s.complete(json!(null));
    }
    for run in [holder, backlog[0], backlog[2]] {
        h.wait_status(run, RunStatus::Completed).await;
    }
    assert_eq!(h.status(backlog[1]).await, RunStatus::Canceled);
    assert_eq!(h.queue_info("q").await.queued, 0);
}

/// LIFE-17: an attempt's error holding a NUL character is kept with U+FFFD in its place, in the
/// attempt and the run, and the run goes on to its retry (a store that refused the text would
/// leave the attempt's end unwritable and the run executing).
pub async fn life_17(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h
        .trigger(h.engine.trigger("t").retry(retry_fixed(2, secs(0))))
        .await
        .id;
    assert!(probe.next().await.fail("bad\0byte"));
    let s = probe.next().await;
    assert_eq!((s.run, s.attempt), (run, 2), "LIFE-17: the retry runs");
    assert!(s.fail("again\0"));
    let rec = h.wait_terminal(run).await;
    assert_eq!(rec.status, RunStatus::Failed);
    let errors: Vec<Option<&str>> = rec.attempts.iter().map(|a| a.error.as_deref()).collect();
    assert_eq!(
        errors,
        [Some("bad\u{FFFD}byte"), Some("again\u{FFFD}")],
        "LIFE-17: both attempts kept, NUL replaced"
    );
    assert_eq!(rec.error.as_deref(), Some("again\u{FFFD}"));
}
