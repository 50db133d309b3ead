//! LIM: the admission table of SPEC §3, row by row — no limit is ever exceeded, and capacity is
//! handed on by events: a freed slot, a raised limit or a resumed queue admits at once, with no
//! timer wake-up.

use runlane_core::{EnvSettings, QueueSettings, RunStatus};
use serde_json::json;

use crate::kit::{ok, Backends, Harness, Probe};

/// LIM-01: the env row: with env limit 2 and five runs in five queues, exactly two start on a
/// worker with five free slots; the other three stay queued; finishing one starts exactly one.
pub async fn lim_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(2).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:5").await;
    for i in 0..5 {
        h.trigger(h.engine.trigger("t").queue(&format!("q{i}")))
            .await;
    }
    let first = probe.next().await;
    let second = probe.next().await;
    assert_ne!(first.run, second.run);
    assert_eq!(
        h.count_live(RunStatus::Executing).await,
        2,
        "LIM-01: two executing"
    );
    assert_eq!(
        h.count_live(RunStatus::Queued).await,
        3,
        "LIM-01: three wait for the env"
    );
    assert_eq!(
        h.usage("default").await.running,
        2,
        "LIM-01: env limit 2 holds"
    );
    probe.assert_quiet("LIM-01: a third run started past the env limit");

    let first_run = first.run;
    first.complete(json!(null));
    let third = probe.next().await;
    assert_eq!(
        h.wait_terminal(first_run).await.status,
        RunStatus::Completed
    );
    assert_eq!(
        h.count_live(RunStatus::Executing).await,
        2,
        "LIM-01: still two executing"
    );
    assert_eq!(h.count_live(RunStatus::Queued).await, 2);
    assert_eq!(h.usage("default").await.running, 2);
    probe.assert_quiet("LIM-01: one release admits one run");
    second.complete(json!(null));
    third.complete(json!(null));
}

/// LIM-02: the env × burst row: env limit 2 with burst 1.5 holds floor(3) runs, no more.
pub async fn lim_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "default",
        EnvSettings {
            limit: 2,
            burst: 1.5,
            ..EnvSettings::default()
        },
    )
    .await;
    let mut runs = Vec::new();
    for i in 0..5 {
        runs.push(
            h.trigger(h.engine.trigger("t").queue(&format!("q{i}")))
                .await
                .id,
        );
    }
    let mut statuses = Vec::new();
    for r in &runs {
        statuses.push(h.status(*r).await);
    }
    use RunStatus::{Queued, Ready};
    assert_eq!(
        statuses,
        vec![Ready, Ready, Ready, Queued, Queued],
        "LIM-02: floor(2 × 1.5) = 3"
    );
    assert_eq!(h.usage("default").await.running, 3);
}

/// LIM-03: the queue-key row: with a queue limit of 2, a key holds two slots and its other runs
/// queue, while another key of the same queue is admitted.
pub async fn lim_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(2),
            ..QueueSettings::default()
        },
    )
    .await;
    let mut k = Vec::new();
    for _ in 0..4 {
        k.push(
            h.trigger(h.engine.trigger("t").queue("q").key("k"))
                .await
                .id,
        );
    }
    let j = h
        .trigger(h.engine.trigger("t").queue("q").key("j"))
        .await
        .id;
    use RunStatus::{Queued, Ready};
    let mut statuses = Vec::new();
    for r in &k {
        statuses.push(h.status(*r).await);
    }
    assert_eq!(
        statuses,
        vec![Ready, Ready, Queued, Queued],
        "LIM-03: key k holds 2"
    );
    assert_eq!(h.status(j).await, Ready, "LIM-03: key j is admitted");
    let info = h.queue_info("q").await;
    assert_eq!((info.running, info.queued), (3, 2));
}

/// LIM-04: the queue-total row: with a per-key limit of 2 and `key_total_limit` 3, the queue
/// never holds more than 3 slots across keys, also after a release re-admits.
pub async fn lim_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(2),
            key_total_limit: Some(3),
            ..QueueSettings::default()
        },
    )
    .await;
    let mut runs = Vec::new();
    for key in ["a", "a", "a", "b", "b", "b"] {
        runs.push(
            h.trigger(h.engine.trigger("t").queue("q").key(key))
                .await
                .id,
        );
    }
    assert_eq!(
        h.queue_info("q").await.running,
        3,
        "LIM-04: key_total_limit 3"
    );
    assert_eq!(
        h.status(runs[2]).await,
        RunStatus::Queued,
        "LIM-04: key a at its cap"
    );
    assert_eq!(
        h.status(runs[3]).await,
        RunStatus::Ready,
        "LIM-04: b1 fits the total"
    );
    assert_eq!(
        h.status(runs[4]).await,
        RunStatus::Queued,
        "LIM-04: the total is reached"
    );

    h.cancel(runs[0]).await;
    let info = h.queue_info("q").await;
    assert_eq!(
        (info.running, info.queued),
        (3, 2),
        "LIM-04: one released, one admitted"
    );
    let mut per_key = [0, 0];
    for l in h.snapshot().await {
        if l.status == RunStatus::Ready {
            per_key[usize::from(&*l.dispatch.key == "b")] += 1;
        }
    }
    assert!(
        per_key.iter().all(|n| *n <= 2),
        "LIM-04: a key above its cap: {per_key:?}"
    );
}

/// LIM-05: the paused row: a paused queue admits nothing — not at trigger, not on a release —
/// and resuming it admits at once, with no timer wake-up.
pub async fn lim_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let holder = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    let waiting = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    ok(h.engine.pause_queue("default", "q")).await;
    assert!(h.queue_info("q").await.settings.paused, "LIM-05: paused");
    let other_key = h
        .trigger(h.engine.trigger("t").queue("q").key("other"))
        .await
        .id;
    assert_eq!(
        h.status(other_key).await,
        RunStatus::Queued,
        "LIM-05: no fast path into a paused queue"
    );
    h.cancel(holder).await;
    assert_eq!(
        h.status(waiting).await,
        RunStatus::Queued,
        "LIM-05: a release admits nothing paused"
    );
    assert_eq!(h.queue_info("q").await.running, 0);

    ok(h.engine.resume_queue("default", "q")).await;
    h.wait_status(waiting, RunStatus::Ready).await;
    h.wait_status(other_key, RunStatus::Ready).await;
    assert_eq!(
        h.queue_info("q").await.running,
        2,
        "LIM-05: resume admits what fits"
    );
    assert!(h.wakeups().is_empty(), "LIM-05: no timer involved");
}

/// LIM-06: a freed slot admits the next run of the key in the release's own step: with a queue
/// limit of 1, finishing the first run starts the second, and the timer never wakes.
pub async fn lim_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:2").await;
    let first = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    let second = h.trigger(h.engine.trigger("t").queue("q")).await.id;
    let s = probe.next().await;
    assert_eq!(s.run, first);
    assert_eq!(h.status(second).await, RunStatus::Queued);
    s.complete(json!(null));
    let s = probe.next().await;
    assert_eq!(s.run, second, "LIM-06: the freed slot starts the next run");
    s.complete(json!(null));
    h.wait_terminal(second).await;
    assert!(
        h.wakeups().is_empty(),
        "LIM-06: no timer wake-up: {:?}",
        h.wakeups()
    );
}

/// LIM-07: a release admits from every queue blocked on the scope it freed: env limit 1, queues
/// A and B with one run each — A's finish starts B's.
pub async fn lim_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:2").await;
    let a = h.trigger(h.engine.trigger("t").queue("A")).await.id;
    let b_ = h.trigger(h.engine.trigger("t").queue("B")).await.id;
    let s = probe.next().await;
    assert_eq!(s.run, a);
    assert_eq!(
        h.status(b_).await,
        RunStatus::Queued,
        "LIM-07: B waits for the env"
    );
    s.complete(json!(null));
    let s = probe.next().await;
    assert_eq!(s.run, b_, "LIM-07: A's finish starts B's run");
    s.complete(json!(null));
    h.wait_terminal(b_).await;
    assert!(h.wakeups().is_empty(), "LIM-07: no timer wake-up");
}

/// LIM-08: `fast_lane` runs skip the env row: with env limit 1 held by an ordinary run,
/// fast-lane runs start up to `fast_lane_limit` (2), the third waits, an ordinary run still
/// waits, and a fast-lane release admits the waiting fast-lane run.
pub async fn lim_08(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "default",
        EnvSettings {
            limit: 1,
            fast_lane_limit: Some(2),
            ..EnvSettings::default()
        },
    )
    .await;
    let ordinary = h.trigger(h.engine.trigger("t").queue("qd")).await.id;
    let f: Vec<_> = {
        let mut f = Vec::new();
        for i in 0..3 {
            f.push(
                h.trigger(
                    h.engine
                        .trigger("t")
                        .queue(&format!("qf{i}"))
                        .lane("fast_lane"),
                )
                .await
                .id,
            );
        }
        f
    };
    let ordinary2 = h.trigger(h.engine.trigger("t").queue("qd2")).await.id;
    assert_eq!(h.status(ordinary).await, RunStatus::Ready);
    assert_eq!(
        h.status(f[0]).await,
        RunStatus::Ready,
        "LIM-08: fast lane while the env is full"
    );
    assert_eq!(h.status(f[1]).await, RunStatus::Ready);
    assert_eq!(
        h.status(f[2]).await,
        RunStatus::Queued,
        "LIM-08: fast_lane_limit 2"
    );
    assert_eq!(
        h.status(ordinary2).await,
        RunStatus::Queued,
        "LIM-08: the env is full"
    );
    let usage = h.usage("default").await;
    assert_eq!((usage.running, usage.fast_lane_running), (1, 2));

    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:5").await;
    let mut started = Vec::new();
    for _ in 0..3 {
        started.push(probe.next().await);
    }
    let mut ids: Vec<_> = started.iter().map(|s| s.run).collect();
    ids.sort();
    let mut want = vec![ordinary, f[0], f[1]];
    want.sort();
    assert_eq!(ids, want, "LIM-08: the three admitted runs start");
    probe.assert_quiet("LIM-08: nothing past the limits");
    let f0 = started
        .iter()
        .position(|s| s.run == f[0])
        .expect("f0 started");
    started.swap_remove(f0).complete(json!(null));
    let s = probe.next().await;
    assert_eq!(
        s.run, f[2],
        "LIM-08: a fast-lane release admits the waiting fast-lane run"
    );
    assert_eq!(
        h.status(ordinary2).await,
        RunStatus::Queued,
        "LIM-08: the env is still full"
    );
    let usage = h.usage("default").await;
    assert_eq!((usage.running, usage.fast_lane_running), (1, 2));
}

/// LIM-09: a key at its cap never blocks the keys below it: env limit 1 with runs a1 (running),
/// a2, a3 and b1 (queued) in one queue with a per-key limit of 1; raising the env limit to 3
/// admits b1 at once and leaves a2, a3 queued behind key a's cap.
pub async fn lim_09(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    h.set_queue(
        "q",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let a1 = h
        .trigger(h.engine.trigger("t").queue("q").key("a"))
        .await
        .id;
    let a2 = h
        .trigger(h.engine.trigger("t").queue("q").key("a"))
        .await
        .id;
    let a3 = h
        .trigger(h.engine.trigger("t").queue("q").key("a"))
        .await
        .id;
    let b1 = h
        .trigger(h.engine.trigger("t").queue("q").key("b"))
        .await
        .id;
    assert_eq!(h.status(b1).await, RunStatus::Queued, "LIM-09: env full");
    h.limit(3).await;
    h.wait_status(b1, RunStatus::Ready).await;
    assert_eq!(h.status(a1).await, RunStatus::Ready);
    assert_eq!(
        h.status(a2).await,
        RunStatus::Queued,
        "LIM-09: key a at its cap"
    );
    assert_eq!(h.status(a3).await, RunStatus::Queued);
    assert_eq!(
        h.usage("default").await.running,
        2,
        "LIM-09: b1 admitted past key a's head"
    );
    assert!(h.wakeups().is_empty());
}

/// LIM-10: raising a limit admits as many runs as now fit, at once: env limit 1 → 3 admits two
/// of three waiting runs; a queue limit 1 → 3 admits its key's waiting runs; no timer wakes.
pub async fn lim_10(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let mut runs = Vec::new();
    for i in 0..4 {
        runs.push(
            h.trigger(h.engine.trigger("t").queue(&format!("q{i}")))
                .await
                .id,
        );
    }
    assert_eq!(h.count_live(RunStatus::Queued).await, 3);
    h.limit(3).await;
    h.wait_status(runs[1], RunStatus::Ready).await;
    h.wait_status(runs[2], RunStatus::Ready).await;
    assert_eq!(
        h.status(runs[3]).await,
        RunStatus::Queued,
        "LIM-10: only what fits"
    );
    assert_eq!(h.usage("default").await.running, 3);

    h.limit(100).await;
    h.wait_status(runs[3], RunStatus::Ready).await;
    h.set_queue(
        "k",
        QueueSettings {
            limit: Some(1),
            ..QueueSettings::default()
        },
    )
    .await;
    let mut k = Vec::new();
    for _ in 0..3 {
        k.push(h.trigger(h.engine.trigger("t").queue("k")).await.id);
    }
    assert_eq!(h.queue_info("k").await.queued, 2);
    h.set_queue(
        "k",
        QueueSettings {
            limit: Some(3),
            ..QueueSettings::default()
        },
    )
    .await;
    h.wait_status(k[1], RunStatus::Ready).await;
    h.wait_status(k[2], RunStatus::Ready).await;
    assert_eq!(
        h.queue_info("k").await.running,
        3,
        "LIM-10: the raised queue limit admits"
    );
    assert!(h.wakeups().is_empty(), "LIM-10: no timer involved");
}
