//! FP: the fast path of seed 000 (SPEC §3). A due run goes straight to its lane at trigger, in
//! one atomic step with storing it, when its queue key has no due backlog and it is admissible;
//! otherwise it waits in its queue. The eight cases of the seed's test plan.

use runlane_core::{EnvSettings, QueueSettings, RunStatus};
use serde_json::json;

use crate::kit::{at, output, retry_fixed, secs, Backends, Harness, Probe};

/// FP-01: with an empty queue and free capacity the run is `ready` as soon as the trigger
/// returns: it holds its slot, sits in its lane, and never passed through `queued`; no timer
/// woke to get it there.
pub async fn fp_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let run = h.run("t").await;
    assert_eq!(
        h.status(run).await,
        RunStatus::Ready,
        "FP-01: status right after trigger"
    );
    assert_eq!(
        h.live_status(run).await,
        Some(RunStatus::Ready),
        "FP-01: backend status"
    );
    assert_eq!(
        h.usage("default").await.running,
        1,
        "FP-01: the run holds its env slot"
    );
    assert_eq!(
        h.lane_ready("default").await,
        1,
        "FP-01: the run sits in lane default"
    );
    h.wait_status(run, RunStatus::Ready).await;
    assert!(
        !h.statuses_of(run).contains(&RunStatus::Queued),
        "FP-01: a fast-pathed run never passes through queued: {:?}",
        h.statuses_of(run)
    );
    assert!(
        h.wakeups().is_empty(),
        "FP-01: no timer wake-up: {:?}",
        h.wakeups()
    );
}

/// FP-02: with the env's `fast_path` switched off the same trigger takes the slow path: the
/// run is stored `queued`, and the admission pass of the same step makes it `ready`.
pub async fn fp_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "default",
        EnvSettings {
            fast_path: false,
            ..EnvSettings::default()
        },
    )
    .await;
    let run = h.run("t").await;
    h.wait_status(run, RunStatus::Ready).await;
    let statuses = h.statuses_of(run);
    let queued = statuses.iter().position(|s| *s == RunStatus::Queued);
    let ready = statuses.iter().position(|s| *s == RunStatus::Ready);
    assert!(
        matches!((queued, ready), (Some(q), Some(r)) if q < r),
        "FP-02: the slow path goes queued then ready: {statuses:?}"
    );
    assert_eq!(
        h.usage("default").await.running,
        1,
        "FP-02: admitted at once"
    );
    assert!(
        h.wakeups().is_empty(),
        "FP-02: admitted without a timer wake-up"
    );
}

/// FP-03: a run that would be admissible on its own takes the slow path when its queue key has
/// a due backlog, and then keeps priority order within the key: a fast-lane run with priority
/// 60 s triggered behind a waiting run is queued, and starts before it once capacity frees.
pub async fn fp_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let first = h
        .trigger(h.engine.trigger("t").queue("q").key("a"))
        .await
        .id;
    let backlog = h
        .trigger(h.engine.trigger("t").queue("q").key("b"))
        .await
        .id;
    assert_eq!(
        h.status(backlog).await,
        RunStatus::Queued,
        "FP-03: env full, key b has a backlog"
    );
    // On its own this run fits: fast-lane runs skip the full env row, key b holds no slot.
    let urgent = h
        .trigger(
            h.engine
                .trigger("t")
                .queue("q")
                .key("b")
                .lane("fast_lane")
                .priority(secs(60)),
        )
        .await
        .id;
    assert_eq!(
        h.status(urgent).await,
        RunStatus::Queued,
        "FP-03: a due backlog in the key forces the slow path"
    );
    assert_eq!(
        h.usage("default").await.fast_lane_running,
        0,
        "FP-03: no fast-lane slot taken"
    );

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let s = probe.next().await;
        order.push(s.run);
        s.complete(json!(null));
    }
    assert_eq!(
        order,
        vec![first, urgent, backlog],
        "FP-03: priority order within key b"
    );
}

/// FP-04: runs of the key that are only future-scored (delayed) are no backlog: a due run
/// triggered behind a delayed run of the same key still takes the fast path.
pub async fn fp_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let later = h
        .trigger(h.engine.trigger("t").queue("q").delay(secs(60)))
        .await
        .id;
    assert_eq!(
        h.status(later).await,
        RunStatus::Delayed,
        "FP-04: the delayed run waits"
    );
    let now = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    assert_eq!(
        h.status(now).await,
        RunStatus::Ready,
        "FP-04: fast path despite the delayed run"
    );
    h.wait_status(now, RunStatus::Ready).await;
    assert!(
        !h.statuses_of(now).contains(&RunStatus::Queued),
        "FP-04: never queued"
    );
    assert_eq!(
        h.status(later).await,
        RunStatus::Delayed,
        "FP-04: the delayed run is untouched"
    );
}

/// FP-05: with the env at its concurrency limit the run takes the slow path and waits
/// `queued` (in another queue, so only the env row blocks it).
pub async fn fp_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let holder = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    assert_eq!(h.status(holder).await, RunStatus::Ready);
    let waiting = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(
        h.status(waiting).await,
        RunStatus::Queued,
        "FP-05: env full, slow path"
    );
    assert_eq!(h.live_status(waiting).await, Some(RunStatus::Queued));
    assert_eq!(
        h.usage("default").await.running,
        1,
        "FP-05: the env limit holds"
    );
    assert!(
        !h.statuses_of(waiting).contains(&RunStatus::Ready),
        "FP-05: not admitted"
    );
}

/// FP-06: a fast-pathed run is acknowledged like any other: it ends `completed` with its
/// output, its slot is released, and the run waiting for that slot is admitted and starts with
/// no timer wake-up.
pub async fn fp_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:2").await;
    let fast = h.trigger(h.engine.trigger("t").queue("q1")).await.id;
    let s = probe.next().await;
    assert_eq!(s.run, fast);
    let next = h.trigger(h.engine.trigger("t").queue("q2")).await.id;
    assert_eq!(
        h.status(next).await,
        RunStatus::Queued,
        "FP-06: env full while the fast run runs"
    );
    assert!(s.complete(json!({"n": 1})));
    let done = h.wait_terminal(fast).await;
    assert_eq!(done.status, RunStatus::Completed, "FP-06: acked");
    assert_eq!(output(&done), Some(json!({"n": 1})), "FP-06: output stored");
    let s2 = probe.next().await;
    assert_eq!(
        s2.run, next,
        "FP-06: the released slot admits the waiting run"
    );
    assert_eq!(
        h.usage("default").await.running,
        1,
        "FP-06: one slot held, by the next run"
    );
    assert!(
        h.wakeups().is_empty(),
        "FP-06: no timer involved: {:?}",
        h.wakeups()
    );
    s2.complete(json!(null));
}

/// FP-07: a fast-pathed run whose handler fails with attempts left is nacked: its slot is
/// released, it waits (delayed by its backoff) with attempt 2, and retries at the due instant.
pub async fn fp_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let run = h
        .trigger(h.engine.trigger("t").retry(retry_fixed(2, secs(1))))
        .await
        .id;
    let s = probe.next().await;
    assert_eq!((s.run, s.attempt), (run, 1));
    assert!(s.fail("boom"));
    h.wait_status(run, RunStatus::Delayed).await;
    let rec = h.get(run).await;
    assert_eq!(
        (rec.status, rec.attempt),
        (RunStatus::Delayed, 2),
        "FP-07: back to wait, attempt 2"
    );
    assert_eq!(rec.run_after, at(secs(1)), "FP-07: retry after the backoff");
    let live = h
        .live(run)
        .await
        .expect("FP-07: the queue backend holds the retry");
    assert_eq!(
        (live.status, live.dispatch.attempt),
        (RunStatus::Delayed, 2)
    );
    assert_eq!(
        h.usage("default").await.running,
        0,
        "FP-07: the slot is released"
    );

    h.set_clock(at(secs(1)));
    let s2 = probe.next().await;
    assert_eq!((s2.run, s2.attempt), (run, 2), "FP-07: the retry runs");
    s2.complete(json!("ok"));
    let done = h.wait_terminal(run).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempts.len(), 2, "FP-07: two attempts recorded");
    assert_eq!(done.attempts[0].outcome, "failed");
    assert!(done.attempts[0]
        .error
        .as_deref()
        .is_some_and(|e| e.contains("boom")));
}

/// FP-08: the fast path obeys per-key limits: with a queue limit of 1 a second run of the same
/// key is queued, while a run of another key still takes the fast path.
pub async fn fp_08(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let a1 = h
        .trigger(h.engine.trigger("t").queue("q").key("k1"))
        .await
        .id;
    let a2 = h
        .trigger(h.engine.trigger("t").queue("q").key("k1"))
        .await
        .id;
    let b1 = h
        .trigger(h.engine.trigger("t").queue("q").key("k2"))
        .await
        .id;
    assert_eq!(
        h.status(a1).await,
        RunStatus::Ready,
        "FP-08: first of key k1"
    );
    assert_eq!(
        h.status(a2).await,
        RunStatus::Queued,
        "FP-08: key k1 at its cap"
    );
    assert_eq!(
        h.status(b1).await,
        RunStatus::Ready,
        "FP-08: key k2 is not blocked by k1"
    );
    h.wait_status(b1, RunStatus::Ready).await;
    assert!(
        !h.statuses_of(b1).contains(&RunStatus::Queued),
        "FP-08: k2 took the fast path"
    );
    let info = h.queue_info("q").await;
    assert_eq!((info.running, info.queued), (2, 1), "FP-08: queue counts");
}
