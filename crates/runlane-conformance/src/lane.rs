//! LANE: lanes and claim chains (SPEC §3, seed 001 validation steps 6–8). Filter chains claim
//! only their lanes; preference chains claim their lanes first, then every other lane (lanes
//! added later too) oldest ready first; the default chain is `manual>*`; a workloop never holds
//! more runs than its slots; runs locked to a version only go to workers serving it.

use runlane_core::{RunStatus, TaskDef, TaskName, TriggerSource, VersionDef};
use serde_json::json;

use crate::kit::{at, ok, secs, within, Backends, Harness, Probe};

/// LANE-01 (seed 001 step 6): a worker claiming with the filter chain `fast_lane` only gets
/// fast-lane runs; ready runs of `default` and `manual` stay in their lanes.
pub async fn lane_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "fast_lane:2").await;
    let d = h.trigger(h.engine.trigger("t")).await.id;
    let m = h.trigger(h.engine.trigger("t").lane("manual")).await.id;
    let f1 = h.trigger(h.engine.trigger("t").lane("fast_lane")).await.id;
    let f2 = h.trigger(h.engine.trigger("t").lane("fast_lane")).await.id;
    let a = probe.next().await;
    let c = probe.next().await;
    let mut got = vec![a.run, c.run];
    got.sort();
    assert_eq!(
        got,
        vec![f1, f2],
        "LANE-01: only fast-lane runs are claimed"
    );
    a.complete(json!(null));
    c.complete(json!(null));
    h.wait_terminal(f1).await;
    h.wait_terminal(f2).await;
    let f3 = h.trigger(h.engine.trigger("t").lane("fast_lane")).await.id;
    let s = probe.next().await;
    assert_eq!(
        s.run, f3,
        "LANE-01: the freed slot takes the next fast-lane run"
    );
    s.complete(json!(null));
    h.wait_terminal(f3).await;
    probe.assert_quiet("LANE-01: a filter chain claimed outside its lanes");
    assert_eq!(
        h.status(d).await,
        RunStatus::Ready,
        "LANE-01: default run untouched"
    );
    assert_eq!(
        h.status(m).await,
        RunStatus::Ready,
        "LANE-01: manual run untouched"
    );
    assert_eq!(h.lane_ready("default").await, 1);
    assert_eq!(h.lane_ready("manual").await, 1);
}

/// Triggers d1 (default), x1 (lane `reports`), d2 (default), m1 (lane `manual`) and m2 (a
/// manual trigger, lane `manual` by rule), in that order; returns them in that order.
async fn lane_mix(h: &Harness) -> [runlane_core::RunId; 5] {
    ok(h.engine.add_lane("reports")).await;
    let d1 = h.trigger(h.engine.trigger("t")).await.id;
    let x1 = h.trigger(h.engine.trigger("t").lane("reports")).await.id;
    let d2 = h.trigger(h.engine.trigger("t")).await.id;
    let m1 = h.trigger(h.engine.trigger("t").lane("manual")).await.id;
    let m2 = h
        .trigger(h.engine.trigger("t").source(TriggerSource::Manual))
        .await;
    assert_eq!(
        m2.lane.as_str(),
        "manual",
        "a manual trigger goes to lane manual"
    );
    [d1, x1, d2, m1, m2.id]
}

/// Completes `n` runs one at a time; returns their ids in start order.
async fn drain_in_order(probe: &mut Probe, n: usize) -> Vec<runlane_core::RunId> {
    let mut order = Vec::new();
    for _ in 0..n {
        let s = probe.next().await;
        order.push(s.run);
        s.complete(json!(null));
    }
    order
}

/// LANE-02 (seed 001 step 7): the preference chain `manual>*` claims manual runs first, then
/// every other lane oldest ready first (across `default` and a custom lane).
pub async fn lane_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let [d1, x1, d2, m1, m2] = lane_mix(&h).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let order = drain_in_order(&mut probe, 5).await;
    assert_eq!(
        order,
        vec![m1, m2, d1, x1, d2],
        "LANE-02: manual first, then oldest ready"
    );
}

/// LANE-03 (seed 001 step 8): a worker given no workloops claims with the default chain
/// `manual>*` and one slot: the same order as LANE-02, one run at a time.
pub async fn lane_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let [d1, x1, d2, m1, m2] = lane_mix(&h).await;
    let mut probe = Probe::new();
    let _w = h.start(h.engine.worker().handler("t", probe.held())).await;
    let first = probe.next().await;
    assert_eq!(
        first.run, m1,
        "LANE-03: the default chain starts with manual"
    );
    probe.assert_quiet("LANE-03: the default workloop has one slot");
    assert_eq!(h.count_live(RunStatus::Executing).await, 1);
    first.complete(json!(null));
    let order = drain_in_order(&mut probe, 4).await;
    assert_eq!(
        order,
        vec![m2, d1, x1, d2],
        "LANE-03: default chain is manual>*"
    );
}

/// LANE-04: a lane added after the worker started is reached by `*`: the idle worker is woken
/// by the trigger and starts the run.
pub async fn lane_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    ok(h.engine.add_lane("late")).await;
    let run = h.trigger(h.engine.trigger("t").lane("late")).await;
    assert_eq!(run.lane.as_str(), "late");
    let s = probe.next().await;
    assert_eq!(s.run, run.id, "LANE-04: `*` covers a lane added later");
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(run.id).await.status, RunStatus::Completed);
}

/// LANE-05: a workloop never holds more runs than its slots: `manual>*:2` with five ready runs
/// holds exactly two, and one more only after one finishes; with `fast_lane:1 manual>*:1` and
/// three fast-lane runs each workloop holds one (two in all).
pub async fn lane_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    for _ in 0..5 {
        h.run("t").await;
    }
    let mut probe = Probe::new();
    let w = h.held_worker(&probe, "t", "manual>*:2").await;
    let a = probe.next().await;
    let c = probe.next().await;
    assert_eq!(
        h.count_live(RunStatus::Executing).await,
        2,
        "LANE-05: two slots, two runs"
    );
    assert_eq!(h.lane_ready("default").await, 3);
    probe.assert_quiet("LANE-05: claimed past its slots");
    let a_run = a.run;
    a.complete(json!(null));
    let d = probe.next().await;
    h.wait_terminal(a_run).await;
    assert_eq!(
        h.count_live(RunStatus::Executing).await,
        2,
        "LANE-05: still two"
    );
    // The finished run leaves the worker's in-flight set just after its terminal status is
    // published (its slot was given back when its handler returned): wait for that, bounded.
    within("LANE-05: the worker holds two", async {
        while w.in_flight() != 2 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
    probe.assert_quiet("LANE-05: claimed past its slots after a release");
    c.complete(json!(null));
    d.complete(json!(null));

    let h2 = Harness::open(b).await;
    for _ in 0..3 {
        h2.trigger(h2.engine.trigger("t").lane("fast_lane")).await;
    }
    let mut probe2 = Probe::new();
    let _w2 = h2.held_worker(&probe2, "t", "fast_lane:1 manual>*:1").await;
    let _x = probe2.next().await;
    let _y = probe2.next().await;
    assert_eq!(
        h2.count_live(RunStatus::Executing).await,
        2,
        "LANE-05: one per workloop"
    );
    assert_eq!(h2.lane_ready("fast_lane").await, 1);
    probe2.assert_quiet("LANE-05: two workloops of one slot hold two runs");
}

/// LANE-06: runs locked to a version only go to workers serving it: with versions 1 and 2 (2
/// current), a worker serving 2 runs the run locked to 2 and the unlocked run but never the run
/// locked to 1, which waits ready until a worker serving version 1 takes it.
pub async fn lane_06(b: &dyn Backends) {
    let h = Harness::open(b).await;
    let def = || VersionDef {
        tasks: vec![TaskDef::new(TaskName::new("job").expect("valid"))],
    };
    let v1 = ok(h.engine.register_version("default", def())).await;
    let v2 = ok(h.engine.register_version("default", def())).await;
    assert!(v1 >= 1 && v2 > v1, "LANE-06: versions count up");
    ok(h.engine.promote("default", v2)).await;

    let on_v1 = h.trigger(h.engine.trigger("job").lock_to_version(v1)).await;
    let on_v2 = h.trigger(h.engine.trigger("job").lock_to_version(v2)).await;
    let unlocked = h.trigger(h.engine.trigger("job")).await;
    assert_eq!((on_v1.version, on_v1.locked), (v1, true));
    assert_eq!((on_v2.version, on_v2.locked), (v2, true));
    assert_eq!(
        (unlocked.version, unlocked.locked),
        (v2, false),
        "LANE-06: current version"
    );

    let mut p2 = Probe::new();
    let _w2 = h
        .start(
            h.engine
                .worker()
                .env_version("default", v2)
                .handler("job", p2.held())
                .workloops("manual>*:1"),
        )
        .await;
    let mut got = drain_in_order(&mut p2, 2).await;
    got.sort();
    let mut want = vec![on_v2.id, unlocked.id];
    want.sort();
    assert_eq!(
        got, want,
        "LANE-06: the v2 worker runs the v2 and unlocked runs"
    );
    h.wait_terminal(on_v2.id).await;
    h.wait_terminal(unlocked.id).await;
    assert_eq!(
        h.status(on_v1.id).await,
        RunStatus::Ready,
        "LANE-06: the v1 run waits"
    );
    p2.assert_quiet("LANE-06: a v2 worker claimed a run locked to v1");

    let mut p1 = Probe::new();
    let _w1 = h
        .start(
            h.engine
                .worker()
                .env_version("default", v1)
                .handler("job", p1.held())
                .workloops("manual>*:1"),
        )
        .await;
    let s = p1.next().await;
    assert_eq!(s.run, on_v1.id, "LANE-06: the v1 worker takes the v1 run");
    s.complete(json!(null));
    assert_eq!(h.wait_terminal(on_v1.id).await.status, RunStatus::Completed);
    p2.assert_quiet("LANE-06: the v2 worker stays idle");
}

/// LANE-07: a ready run whose lane has had no consumer for `ready_timeout` (5 min) returns to
/// its queue at that instant, releasing its slot to a run whose lane has a consumer; once a
/// consumer of its lane appears, it is admitted again and runs.
pub async fn lane_07(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    ok(h.engine.add_lane("reports")).await;
    let mut pd = Probe::new();
    let _wd = h.held_worker(&pd, "t", "default:1").await;
    let orphan = h
        .trigger(h.engine.trigger("t").queue("qr").lane("reports"))
        .await
        .id;
    let waiting = h.trigger(h.engine.trigger("t").queue("qd")).await.id;
    assert_eq!(h.status(orphan).await, RunStatus::Ready);
    assert_eq!(
        h.status(waiting).await,
        RunStatus::Queued,
        "LANE-07: env full"
    );
    h.armed_at(at(secs(300))).await;
    h.set_clock(at(secs(300)));
    let s = pd.next().await;
    assert_eq!(
        s.run, waiting,
        "LANE-07: the slot went to a lane with a consumer"
    );
    h.wait_status(orphan, RunStatus::Queued).await;
    assert_eq!(
        h.status(orphan).await,
        RunStatus::Queued,
        "LANE-07: back in its queue"
    );
    assert_eq!(h.usage("default").await.running, 1);
    assert_eq!(
        h.wakeups(),
        vec![at(secs(300))],
        "LANE-07: one wake-up at ready_timeout"
    );

    let mut pr = Probe::new();
    let _wr = h.held_worker(&pr, "t", "reports:1").await;
    s.complete(json!(null));
    let r = pr.next().await;
    assert_eq!(r.run, orphan, "LANE-07: a consumer of its lane runs it");
    r.complete(json!(null));
    assert_eq!(h.wait_terminal(orphan).await.status, RunStatus::Completed);
}

/// LANE-08: a release that admits a run in another lane wakes that lane's idle worker through
/// the lane's doorbell: env limit 1, a run of lane `x` executing on the `x` worker, a run of
/// lane `y` queued behind it; the `x` run's end admits the `y` run, and the idle `y` worker
/// (which the ending worker cannot stand in for: it claims only lane `x`) starts it, with no
/// timer wake-up. Without the ring the `y` worker would wait for ever (nothing polls).
pub async fn lane_08(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    ok(h.engine.add_lane("x")).await;
    ok(h.engine.add_lane("y")).await;
    let (mut px, mut py) = (Probe::new(), Probe::new());
    let _wx = h.held_worker(&px, "t", "x:1").await;
    let _wy = h.held_worker(&py, "t", "y:1").await;
    let rx = h
        .trigger(h.engine.trigger("t").queue("qx").lane("x"))
        .await
        .id;
    let sx = px.next().await;
    assert_eq!(sx.run, rx, "LANE-08: the x worker runs the x run");
    let ry = h
        .trigger(h.engine.trigger("t").queue("qy").lane("y"))
        .await
        .id;
    assert_eq!(
        h.status(ry).await,
        RunStatus::Queued,
        "LANE-08: the y run waits for the env"
    );
    sx.complete(json!(null));
    let sy = py.next().await;
    assert_eq!(sy.run, ry, "LANE-08: the admission woke the idle y worker");
    sy.complete(json!(null));
    assert_eq!(h.wait_terminal(ry).await.status, RunStatus::Completed);
    px.assert_quiet("LANE-08: the x worker claimed outside its lane");
    assert!(h.wakeups().is_empty(), "LANE-08: no timer wake-up");
}
