//! ORD: ordering and timing (SPEC §3). Within a queue key runs go by `score = available_at −
//! priority`, ties in trigger order; delayed runs are promoted at their due instant by one
//! timer wake-up; a retry waiting for its backoff never blocks due runs; an idle engine never
//! wakes.

use std::time::Duration;

use runlane_core::{QueueSettings, RunStatus};
use serde_json::json;

use crate::kit::{at, retry_fixed, secs, Backends, Harness, Probe};

/// ORD-01: runs of one key start in priority order, then trigger order: with a queue limit of
/// 1 and one worker slot, runs triggered with priorities 0, 0, 10, 10, 5 s at t and 1, 3 s at
/// t + 2 s start in score order (ties by trigger order).
pub async fn ord_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let trigger = |p: u64| h.engine.trigger("t").queue("q").priority(secs(p));
    let r0 = h.trigger(trigger(0)).await.id;
    let r1 = h.trigger(trigger(0)).await.id;
    let r2 = h.trigger(trigger(0)).await.id;
    let r3 = h.trigger(trigger(10)).await.id;
    let r4 = h.trigger(trigger(10)).await.id;
    let r5 = h.trigger(trigger(5)).await.id;
    h.set_clock(at(secs(2)));
    let r6 = h.trigger(trigger(1)).await.id; // score t + 1 s
    let r7 = h.trigger(trigger(3)).await.id; // score t − 1 s
    assert_eq!(
        h.status(r0).await,
        RunStatus::Ready,
        "ORD-01: the first run holds the key"
    );

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let mut order = Vec::new();
    for _ in 0..8 {
        let s = probe.next().await;
        order.push(s.run);
        s.complete(json!(null));
    }
    assert_eq!(
        order,
        vec![r0, r3, r4, r5, r7, r1, r2, r6],
        "ORD-01: priority, then trigger order"
    );
}

/// ORD-02: a delayed run is promoted exactly at its due instant by exactly one timer wake-up:
/// nothing wakes before (1 ms early it is still delayed), and the one wake-up is at the due
/// instant — there is no poll.
pub async fn ord_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let run = h.trigger(h.engine.trigger("t").delay(secs(5))).await;
    assert_eq!(
        run.run_after,
        at(secs(5)),
        "ORD-02: run_after = trigger + delay"
    );
    assert_eq!(h.status(run.id).await, RunStatus::Delayed);
    h.armed_at(at(secs(5))).await;

    h.set_clock(at(secs(5)).saturating_sub(Duration::from_millis(1)));
    h.armed_at(at(secs(5))).await;
    assert_eq!(
        h.status(run.id).await,
        RunStatus::Delayed,
        "ORD-02: not promoted 1 ms early"
    );
    assert!(
        h.wakeups().is_empty(),
        "ORD-02: no wake-up before the due instant: {:?}",
        h.wakeups()
    );

    h.set_clock(at(secs(5)));
    h.wait_status(run.id, RunStatus::Ready).await;
    assert_eq!(
        h.wakeups(),
        vec![at(secs(5))],
        "ORD-02: exactly one wake-up, at the due instant"
    );
}

/// ORD-03: a retry waiting for its backoff does not block due runs of its key: with a queue
/// limit of 1, A fails (retry in 10 s) and B and C, queued behind it, run at once; A's retry
/// runs at t + 10 s, woken by one timer wake-up at that instant.
pub async fn ord_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let a = h
        .trigger(
            h.engine
                .trigger("t")
                .queue("q")
                .retry(retry_fixed(2, secs(10))),
        )
        .await
        .id;
    let b_ = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    let c = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;

    let s = probe.next().await;
    assert_eq!((s.run, s.attempt), (a, 1));
    s.fail("transient");
    let s = probe.next().await;
    assert_eq!(s.run, b_, "ORD-03: B runs while A waits for its backoff");
    s.complete(json!(null));
    let s = probe.next().await;
    assert_eq!(s.run, c, "ORD-03: C runs while A waits for its backoff");
    s.complete(json!(null));
    h.wait_terminal(c).await;
    assert_eq!(
        h.status(a).await,
        RunStatus::Delayed,
        "ORD-03: A still waits"
    );
    probe.assert_quiet("ORD-03: nothing runs before A's retry is due");

    h.set_clock(at(secs(10)));
    let s = probe.next().await;
    assert_eq!(
        (s.run, s.attempt),
        (a, 2),
        "ORD-03: A's retry at its due instant"
    );
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(a).await.status, RunStatus::Completed);
    assert_eq!(
        h.wakeups(),
        vec![at(secs(10))],
        "ORD-03: one timer wake-up, for A's retry"
    );
}

/// ORD-04: an idle engine never wakes: with an idle worker and no deadline, ten virtual
/// minutes pass with no timer wake-up, and a run triggered afterwards starts at once (the
/// worker is woken by the trigger, not by a poll).
pub async fn ord_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    h.set_clock(at(secs(600)));
    let run = h.run("t").await;
    let s = probe.next().await;
    assert_eq!(s.run, run, "ORD-04: the idle worker starts the run");
    s.complete(json!(null));
    h.wait_terminal(run).await;
    assert!(
        h.wakeups().is_empty(),
        "ORD-04: no timer wake-up while idle: {:?}",
        h.wakeups()
    );
}
