//! FAIR: a flooding env or queue does not starve a trickling one (SPEC §3, docs/dispatch.md).
//! At admission, waiting queues of an env share freed slots round-robin (least recently
//! served); at claim, a worker's slots are shared among its envs by start-time fair queueing
//! weighted by env weight.

use runlane_core::{EnvSettings, RunId};
use runlane_engine::TriggerBuilder;
use serde_json::json;

use crate::kit::{Backends, Harness, Probe};

/// FAIR-01: admission is round-robin across the queues of an env: with env limit 1, a flood of
/// six runs in queue `flood` and two in `trickle`, freed slots alternate between the queues
/// (least recently served first, ties by queue name) instead of draining the flood first.
pub async fn fair_01(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let mut flood = Vec::new();
    for _ in 0..6 {
        flood.push(h.trigger(h.engine.trigger("t").queue("flood")).await.id);
    }
    let mut trickle = Vec::new();
    for _ in 0..2 {
        trickle.push(h.trigger(h.engine.trigger("t").queue("trickle")).await.id);
    }
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let order = complete_in_order(&mut probe, 8).await;
    let want = vec![
        flood[0], flood[1], trickle[0], flood[2], trickle[1], flood[3], flood[4], flood[5],
    ];
    assert_eq!(order, want, "FAIR-01: admission alternates between queues");
}

/// FAIR-02: claim is fair across envs by weight: one worker serving env `a` (weight 2) and env
/// `b` (weight 1), each with ready runs, claims in the start-time fair order a b a a b a a b a
/// — b is never starved by a's larger backlog, and a gets twice b's share.
pub async fn fair_02(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.set_env(
        "a",
        EnvSettings {
            weight: 2,
            ..EnvSettings::default()
        },
    )
    .await;
    h.set_env(
        "b",
        EnvSettings {
            weight: 1,
            ..EnvSettings::default()
        },
    )
    .await;
    let mut env_of = std::collections::HashMap::new();
    for _ in 0..6 {
        env_of.insert(h.trigger(h.engine.trigger("t").env("a")).await.id, 'a');
    }
    for _ in 0..3 {
        env_of.insert(h.trigger(h.engine.trigger("t").env("b")).await.id, 'b');
    }
    let mut probe = Probe::new();
    let _w = h
        .start(
            h.engine
                .worker()
                .env("a")
                .env("b")
                .handler("t", probe.held())
                .workloops("manual>*:1"),
        )
        .await;
    let order: String = complete_in_order(&mut probe, 9)
        .await
        .iter()
        .map(|r| env_of[r])
        .collect();
    assert_eq!(order, "abaabaaba", "FAIR-02: weighted fair claim order");
}

/// FAIR-03: a key returning to its queue's backlog goes behind the keys already waiting, not
/// ahead on an old serve: env limit 1, keys `r`, `o`, `p` of one queue. `r` is served and
/// leaves; `o` (two runs) and `p` join; `o` then `p` are served; `r` returns while `p` runs.
/// The next slot goes to `o`, waiting since its serve, and only then to `r`.
pub async fn fair_03(b: &dyn Backends) {
    let h = Harness::open(b).await;
    returning_one_waits_its_turn(&h, "FAIR-03", |g| h.engine.trigger("t").queue("q").key(g)).await;
}

/// FAIR-05: FAIR-03 one level up: a queue returning to its env's backlog goes behind the queues
/// already waiting (queues `r`, `o`, `p`, one key each).
pub async fn fair_05(b: &dyn Backends) {
    let h = Harness::open(b).await;
    returning_one_waits_its_turn(&h, "FAIR-05", |g| h.engine.trigger("t").queue(g)).await;
}

/// FAIR-03 and FAIR-05: groups `z`, `r`, `o`, `p` (keys of one queue, or queues), env limit 1.
async fn returning_one_waits_its_turn(
    h: &Harness,
    id: &str,
    trigger: impl Fn(&str) -> TriggerBuilder,
) {
    h.limit(1).await;
    let z = h.trigger(trigger("z")).await.id; // fast path: holds the slot
    let r1 = h.trigger(trigger("r")).await.id;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let mut order = complete_in_order(&mut probe, 1).await; // z: admits r1
    let r1_running = probe.next().await;
    order.push(r1_running.run);
    let o1 = h.trigger(trigger("o")).await.id;
    let o2 = h.trigger(trigger("o")).await.id;
    let p1 = h.trigger(trigger("p")).await.id;
    r1_running.complete(json!(null)); // admits o1 (o before p: joined together, name order)
    order.extend(complete_in_order(&mut probe, 1).await); // o1: admits p1
    let p1_running = probe.next().await;
    order.push(p1_running.run);
    let r2 = h.trigger(trigger("r")).await.id; // r returns while p1 runs
    p1_running.complete(json!(null));
    order.extend(complete_in_order(&mut probe, 2).await);
    assert_eq!(
        order,
        vec![z, r1, o1, p1, o2, r2],
        "{id}: a returning one waits behind those already waiting"
    );
}

/// FAIR-04: a key joining its queue's backlog goes behind the key served just before it
/// joined, whatever their names: env limit 1, key `b` with three runs (one takes the fast
/// path), key `a` joins after `b`'s second run was admitted, while `b`'s third still waits.
/// `b`'s third run was in line first and starts before `a`'s (key text alone would put `a`
/// first).
pub async fn fair_04(b: &dyn Backends) {
    let h = Harness::open(b).await;
    h.limit(1).await;
    let trigger = |key: &str| h.engine.trigger("t").queue("q").key(key);
    let b0 = h.trigger(trigger("b")).await.id; // fast path: holds the slot
    let b1 = h.trigger(trigger("b")).await.id;
    let b2 = h.trigger(trigger("b")).await.id;
    let mut probe = Probe::new();
    let _w = h.held_worker(&probe, "t", "manual>*:1").await;
    let mut order = complete_in_order(&mut probe, 1).await; // b0: admits b1
    let b1_running = probe.next().await;
    order.push(b1_running.run);
    let a1 = h.trigger(trigger("a")).await.id; // joins while b2 waits
    b1_running.complete(json!(null));
    order.extend(complete_in_order(&mut probe, 2).await);
    assert_eq!(
        order,
        vec![b0, b1, b2, a1],
        "FAIR-04: a joining key goes behind the key served just before"
    );
}

/// Completes `n` runs one at a time; returns their ids in start order.
async fn complete_in_order(probe: &mut Probe, n: usize) -> Vec<RunId> {
    let mut order = Vec::new();
    for _ in 0..n {
        let s = probe.next().await;
        order.push(s.run);
        s.complete(json!(null));
    }
    order
}
