//! TTL: expiry (SPEC §2). `ttl_deadline = max(trigger_time, run_after) + ttl`, fixed at
//! trigger and recomputed by a reschedule; a run that never held a lease and is still waiting
//! (delayed, queued or ready) at its deadline becomes `expired`, releasing any slot; a run
//! that ever held a lease never expires; a zero TTL is refused.

use std::time::Duration;

use runlane_core::{RunStatus, TaskDef, TaskName, VersionDef};
use serde_json::json;

use crate::kit::{assert_invalid, at, ok, retry_fixed, secs, Backends, Harness, Probe, EPOCH};

/// TTL-01: a delayed run whose deadline passes while it is still delayed (time jumps past both
/// its `run_after` and its deadline) expires in that one wake-up, without ever being admitted.
pub async fn ttl_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let run = h
        .trigger(h.engine.trigger("t").delay(secs(10)).ttl(secs(5)))
        .await;
    assert_eq!(
        run.ttl_deadline,
        Some(at(secs(15))),
        "TTL-01: deadline from run_after"
    );
    h.armed_at(at(secs(10))).await;
    h.set_clock(at(secs(20)));
    h.wait_status(run.id, RunStatus::Expired).await;
    let statuses = h.statuses_of(run.id);
    assert!(
        !statuses.contains(&RunStatus::Ready) && !statuses.contains(&RunStatus::Executing),
        "TTL-01: an expired run was never admitted: {statuses:?}"
    );
    assert_eq!(
        h.live(run.id).await,
        None,
        "TTL-01: gone from every structure"
    );
    assert_eq!(h.usage("default").await.running, 0);
    assert_eq!(
        h.wakeups(),
        vec![at(secs(20))],
        "TTL-01: one wake-up did it"
    );
}

/// TTL-02: a queued run expires at its deadline (not 1 ms before), woken by one timer wake-up
/// at that instant; the run holding the env slot is untouched.
pub async fn ttl_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let holder = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    let run = h
        .trigger(h.engine.trigger("t").queue("q2").ttl(secs(5)))
        .await
        .id;
    assert_eq!(h.status(run).await, RunStatus::Queued);
    h.armed_at(at(secs(5))).await;
    h.set_clock(at(secs(5)).saturating_sub(Duration::from_millis(1)));
    h.armed_at(at(secs(5))).await;
    assert_eq!(
        h.status(run).await,
        RunStatus::Queued,
        "TTL-02: not expired 1 ms early"
    );
    h.set_clock(at(secs(5)));
    h.wait_status(run, RunStatus::Expired).await;
    let rec = h.get(run).await;
    assert_eq!(
        (rec.status, rec.finished_at),
        (RunStatus::Expired, Some(at(secs(5))))
    );
    assert_eq!(h.live(run).await, None, "TTL-02: gone from its queue");
    assert_eq!(
        h.status(holder).await,
        RunStatus::Ready,
        "TTL-02: the holder is untouched"
    );
    assert_eq!(
        h.wakeups(),
        vec![at(secs(5))],
        "TTL-02: one wake-up, at the deadline"
    );
}

/// TTL-03: a ready run that expires releases its slot, and the run waiting for that slot is
/// admitted in the same step and then starts.
pub async fn ttl_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let run = h
        .trigger(h.engine.trigger("t").queue("q1").ttl(secs(5)))
        .await
        .id;
    let waiting = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(h.status(run).await, RunStatus::Ready);
    assert_eq!(h.status(waiting).await, RunStatus::Queued);
    h.armed_at(at(secs(5))).await;
    h.set_clock(at(secs(5)));
    h.wait_status(run, RunStatus::Expired).await;
    h.wait_status(waiting, RunStatus::Ready).await;
    assert_eq!(
        h.usage("default").await.running,
        1,
        "TTL-03: the slot went to the waiting run"
    );

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:2").await;
    let s = probe.next().await;
    assert_eq!(s.run, waiting, "TTL-03: the expired run never starts");
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(waiting).await.status, RunStatus::Completed);
    probe.assert_quiet("TTL-03: only the waiting run ran");
    assert_eq!(h.status(run).await, RunStatus::Expired);
}

/// TTL-04: a run that ever held a lease never expires: past its deadline while executing it is
/// untouched, and its retry, waiting past the deadline, runs instead of expiring.
pub async fn ttl_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h
        .trigger(
            h.engine
                .trigger("t")
                .ttl(secs(5))
                .retry(retry_fixed(2, secs(20))),
        )
        .await;
    assert_eq!(run.ttl_deadline, Some(at(secs(5))));
    let s = probe.next().await;
    h.set_clock(at(secs(6)));
    assert_eq!(
        h.status(run.id).await,
        RunStatus::Executing,
        "TTL-04: leased runs never expire"
    );
    s.fail("again");
    h.wait_status(run.id, RunStatus::Delayed).await;
    h.set_clock(at(secs(26)));
    let s = probe.next().await;
    assert_eq!(
        (s.run, s.attempt),
        (run.id, 2),
        "TTL-04: the retry runs past the deadline"
    );
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(run.id).await.status, RunStatus::Completed);
    assert!(
        !h.statuses_of(run.id).contains(&RunStatus::Expired),
        "TTL-04: never expired"
    );
}

/// TTL-05: the deadline rule: `max(trigger, run_after) + ttl` for a delay, an absolute
/// `run_after` and a `run_after` in the past; a reschedule recomputes it, and expiry follows the
/// recomputed deadline, not the original one.
pub async fn ttl_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let delayed = h
        .trigger(h.engine.trigger("t").delay(secs(10)).ttl(secs(5)))
        .await;
    assert_eq!(delayed.run_after, at(secs(10)));
    assert_eq!(delayed.ttl_deadline, Some(at(secs(15))), "TTL-05: delay");
    let absolute = h
        .trigger(h.engine.trigger("t").run_after(at(secs(30))).ttl(secs(5)))
        .await;
    assert_eq!(
        absolute.ttl_deadline,
        Some(at(secs(35))),
        "TTL-05: absolute run_after"
    );
    let past = h
        .trigger(
            h.engine
                .trigger("t")
                .run_after(EPOCH.saturating_sub(secs(60)))
                .ttl(secs(5)),
        )
        .await;
    assert_eq!(
        past.ttl_deadline,
        Some(at(secs(5))),
        "TTL-05: a past run_after counts from trigger"
    );
    h.cancel(past.id).await;
    h.cancel(absolute.id).await;

    let moved = ok(h.engine.reschedule(delayed.id, at(secs(20)))).await;
    assert_eq!(moved.run_after, at(secs(20)));
    assert_eq!(
        moved.ttl_deadline,
        Some(at(secs(25))),
        "TTL-05: a reschedule recomputes it"
    );
    h.set_clock(at(secs(20)));
    h.wait_status(delayed.id, RunStatus::Ready).await;
    assert!(
        !h.statuses_of(delayed.id).contains(&RunStatus::Expired),
        "TTL-05: the original deadline (t + 15 s) no longer applies"
    );
    h.set_clock(at(secs(25)));
    h.wait_status(delayed.id, RunStatus::Expired).await;
    assert_eq!(h.get(delayed.id).await.finished_at, Some(at(secs(25))));
}

/// TTL-06: a TTL of zero is refused naming `ttl`, at trigger and in a task definition, and
/// nothing changes.
pub async fn ttl_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let err = h
        .refused(
            "a trigger with ttl 0",
            h.engine.trigger("t").ttl(Duration::ZERO).send(),
        )
        .await;
    assert_invalid(&err, "ttl");
    let mut task = TaskDef::new(TaskName::new("t").expect("valid"));
    task.ttl = Some(Duration::ZERO);
    let err = h
        .refused(
            "a version with ttl 0",
            h.engine
                .register_version("default", VersionDef { tasks: vec![task] }),
        )
        .await;
    assert_invalid(&err, "ttl");
    let good = VersionDef {
        tasks: vec![TaskDef::new(TaskName::new("t").expect("valid"))],
    };
    let number = ok(h.engine.register_version("default", good)).await;
    assert_eq!(number, 1, "TTL-06: the refused version took no number");
    let run = h
        .trigger(h.engine.trigger("t").ttl(Duration::from_millis(1)))
        .await;
    assert_eq!(
        run.ttl_deadline,
        Some(EPOCH.saturating_add(Duration::from_millis(1)))
    );
}
