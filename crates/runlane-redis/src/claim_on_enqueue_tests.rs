//! Claim on enqueue: an `enqueue` that carries an idle worker's claim answers and leaves the
//! queue exactly as that enqueue followed by that claim does, in one script call.

use runlane_core::backend::{ClaimRequest, Dispatch, EnqueueAs, Leased, Placement, QueueBackend};
use runlane_core::{ClaimChain, FencingToken, QueueError, RunId, Timestamp};

use crate::test_support::{self as support, env};
use crate::RedisQueue;

const NOW: u64 = 1_000;

async fn open(name: &str) -> Option<RedisQueue> {
    support::open_queue("claimenq", name).await
}

/// Env `a` admits 3 at once, env `b` 1 (without the fast path); `c` is unknown.
async fn set_up(queue: &RedisQueue) {
    support::put_envs_a_b(queue, 3).await;
}

/// A claim of `max` runs of envs `a` and `b` on `chain`.
fn request(chain: &str, max: u32) -> ClaimRequest {
    let chain = ClaimChain::parse("chain", chain).expect("chain");
    support::claim_of(chain, max, &["a", "b"])
}

/// Run `n` of env `name`, key `k`, due just before [`NOW`].
fn ready(n: u128, name: &str) -> Dispatch {
    support::dispatch(n, &env(name), "k", NOW - 1, None)
}

fn leased(leases: Vec<Leased>) -> Vec<(RunId, FencingToken)> {
    leases
        .into_iter()
        .map(|l| (l.dispatch.run_id, l.token))
        .collect()
}

type Step = Result<(Placement, Vec<(RunId, FencingToken)>), QueueError>;

/// 24 runs over envs `a`, `b` and the unknown `c`, some delayed, claimed for with 0 to 2 slots.
fn steps() -> Vec<(Dispatch, u32)> {
    let envs = [env("a"), env("b"), env("c")];
    (1..=24u128)
        .map(|n| {
            let after = if n % 5 == 0 {
                NOW + 60_000
            } else {
                NOW - 100 + n as u64
            };
            let d = support::dispatch(n, &envs[(n % 3) as usize], "k", after, None);
            (d, (n % 3) as u32)
        })
        .collect()
}

#[tokio::test]
async fn a_claim_carried_by_an_enqueue_leases_what_the_claim_after_it_would() {
    let (Some(apart), Some(together)) = (open("apart").await, open("together").await) else {
        return;
    };
    set_up(&apart).await;
    set_up(&together).await;
    let now = Timestamp(NOW);
    let mut any_leased = false;
    for (d, max) in steps() {
        let req = request("*", max);
        // Apart: the enqueue, then (when it placed the run) the claim its doorbell causes.
        let expected: Step = match apart.enqueue(d.clone(), EnqueueAs::Trigger, now).await {
            Ok(e) => Ok((
                e.placement,
                leased(apart.claim(&req, now).await.expect("claim")),
            )),
            Err(e) => Err(e),
        };
        let calls = together.enqueue_calls();
        let got: Step = together
            .enqueue_claiming(d.clone(), EnqueueAs::Trigger, now, &req)
            .await
            .map(|(e, leases)| (e.placement, leased(leases)));
        assert_eq!(together.enqueue_calls() - calls, 1, "one script call");
        assert_eq!(got, expected, "run {}", d.run_id);
        any_leased |= got.as_ref().is_ok_and(|(_, l)| !l.is_empty());
    }
    assert!(any_leased);
    let mut live_a = apart.snapshot().await.expect("snapshot");
    let mut live_b = together.snapshot().await.expect("snapshot");
    live_a.sort_by_key(|l| l.dispatch.run_id);
    live_b.sort_by_key(|l| l.dispatch.run_id);
    assert_eq!(live_a, live_b);
}

/// A queue's key space (see [`support::key_space`]) without its generation (`{p}:cfg` field
/// `gen`, random per key space) and with its TTL state as what it says of live runs: the
/// buckets' order and scores (`{p}:tbz`) and live counts (`{p}:tbn`), not the bucket lists
/// (which may keep entries of runs that left) nor the deadline each bucket last appended
/// (`{p}:tbn` fields `<s>t`).
async fn live_state(
    queue: &RedisQueue,
) -> std::collections::BTreeMap<String, (String, Vec<String>)> {
    let mut state = support::key_space(queue.key_base()).await;
    state.retain(|name, _| !name.starts_with(":tb:"));
    let drop_fields = |items: &mut Vec<String>, drop: &dyn Fn(&str) -> bool| {
        let kept: Vec<String> = items
            .chunks(2)
            .filter(|fv| !drop(&fv[0]))
            .flatten()
            .cloned()
            .collect();
        *items = kept;
    };
    if let Some((_, items)) = state.get_mut(":cfg") {
        drop_fields(items, &|f| f == "gen");
    }
    if let Some((_, items)) = state.get_mut(":tbn") {
        drop_fields(items, &|f| f.ends_with('t'));
    }
    state
}

/// Runs over two lanes and envs `a` (fast path) and `b` (without), some with a TTL, a max
/// duration or locked to a version the claims do not serve, enqueued with claims of 0 to 2
/// slots on chains that cover one lane, both or all, every third step ending what is leased.
fn mixed_steps() -> Vec<(Dispatch, ClaimRequest, bool)> {
    let other = runlane_core::LaneName::new("other").expect("lane");
    let chains = ["*", "default", "other>default", "other"];
    (1..=60u128)
        .map(|n| {
            let name = if n % 4 == 3 { "b" } else { "a" };
            let ttl = (n % 3 == 0).then_some(NOW + 10_000 + (n as u64 % 7) * 100);
            let mut d = support::dispatch(n, &env(name), &format!("k{}", n % 5), NOW - 1, ttl);
            if n % 2 == 0 {
                d.lane = other.clone();
            }
            if n % 4 == 0 {
                d.max_duration = Some(std::time::Duration::from_secs(5));
            }
            if n % 11 == 0 {
                d.locked_version = Some(2);
            }
            let mut req = request(chains[(n % 4) as usize], (n % 3) as u32);
            if n % 7 == 0 {
                // A claim that does not serve env `a`.
                req.envs.retain(|s| s.env == env("b"));
            }
            (d, req, n % 3 == 0)
        })
        .collect()
}

#[tokio::test]
async fn a_run_leased_as_it_is_placed_leaves_the_key_space_as_placing_then_claiming_does() {
    let (Some(apart), Some(together)) = (open("ks-apart").await, open("ks-together").await) else {
        return;
    };
    for q in [&apart, &together] {
        set_up(q).await;
        support::add_other_lane(q).await;
    }
    let now = Timestamp(NOW);
    let mut held: Vec<(RunId, FencingToken)> = Vec::new();
    let mut leased_on_enqueue = 0u64;
    for (d, req, end_all) in mixed_steps() {
        let expected: Step = match apart.enqueue(d.clone(), EnqueueAs::Trigger, now).await {
            Ok(e) => Ok((
                e.placement,
                leased(apart.claim(&req, now).await.expect("claim")),
            )),
            Err(e) => Err(e),
        };
        let got: Step = together
            .enqueue_claiming(d.clone(), EnqueueAs::Trigger, now, &req)
            .await
            .map(|(e, leases)| (e.placement, leased(leases)));
        assert_eq!(got, expected, "run {}", d.run_id);
        if let Ok((_, leases)) = &got {
            leased_on_enqueue += leases.iter().filter(|(id, _)| *id == d.run_id).count() as u64;
            held.extend(leases.iter().copied());
        }
        if end_all {
            // Both queues leased the same runs under the same tokens (compared above).
            for (id, token) in held.drain(..) {
                apart.finish(id, token, now).await.expect("finish");
                together.finish(id, token, now).await.expect("finish");
            }
        }
        assert_eq!(
            live_state(&together).await,
            live_state(&apart).await,
            "after run {}",
            d.run_id
        );
    }
    assert!(
        leased_on_enqueue > 0,
        "some runs were leased on their enqueue"
    );
}

#[tokio::test]
async fn a_run_leased_as_it_is_placed_leaves_no_ttl_entry_unless_it_was_ready_first() {
    let Some(queue) = open("alone").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    // A delayed run holds an entry in the TTL bucket of second 11.
    let held = support::dispatch(1, &env("a"), "k", NOW + 60_000, Some(NOW + 10_100));
    queue
        .enqueue(held, EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let bucket = vec![(":tb:11".to_string(), 1)];
    assert_eq!(support::ttl_entries(&queue).await, bucket);
    // An idle claim and nothing ready: the run is leased as it is placed, never ready, so it
    // never had an entry (a placement then a claim leaves the claimed run's behind).
    let alone = support::dispatch(2, &env("a"), "k2", NOW - 1, Some(NOW + 10_500));
    let (_, leases) = queue
        .enqueue_claiming(alone.clone(), EnqueueAs::Trigger, now, &request("*", 2))
        .await
        .expect("enqueue");
    let ids = support::leased_ids(&leases);
    assert_eq!(ids, vec![alone.run_id]);
    assert_eq!(
        support::ttl_entries(&queue).await,
        bucket,
        "no entry for the run"
    );
    // A ready run on another lane the claim covers (the run's own lane idle): the run is
    // placed, then the claim takes both, the other lane's older run first.
    let other = support::add_other_lane(&queue).await;
    let mut elsewhere = support::dispatch(5, &env("a"), "k5", NOW - 1, None);
    elsewhere.lane = other;
    queue
        .enqueue(elsewhere.clone(), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let next = support::dispatch(6, &env("a"), "k6", NOW - 1, Some(NOW + 10_700));
    let (_, leases) = queue
        .enqueue_claiming(next.clone(), EnqueueAs::Trigger, now, &request("*", 2))
        .await
        .expect("enqueue");
    let ids = support::leased_ids(&leases);
    assert_eq!(ids, vec![elsewhere.run_id, next.run_id]);
    let bucket = vec![(":tb:11".to_string(), 2)];
    assert_eq!(
        support::ttl_entries(&queue).await,
        bucket,
        "the placed run's entry"
    );
    for (id, token) in leased(leases) {
        queue.finish(id, token, now).await.expect("finish");
    }
    // With a run already ready (no claim took it), the new run is placed, then the claim takes
    // both, oldest first: the new run's entry stays behind, dead.
    queue
        .enqueue(ready(3, "a"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let placed = support::dispatch(4, &env("a"), "k4", NOW - 1, Some(NOW + 10_600));
    let (_, leases) = queue
        .enqueue_claiming(placed.clone(), EnqueueAs::Trigger, now, &request("*", 2))
        .await
        .expect("enqueue");
    let ids = support::leased_ids(&leases);
    assert_eq!(ids, vec![ready(3, "a").run_id, placed.run_id]);
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 3)],
        "the placed run's entry too"
    );
}

#[tokio::test]
async fn a_claim_naming_its_lanes_looks_only_at_those_for_ready_runs() {
    let Some(queue) = open("named").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    // A delayed run keeps the TTL bucket of second 11 (a dead entry stays visible beside it).
    let held = support::dispatch(9, &env("a"), "k9", NOW + 60_000, Some(NOW + 10_050));
    queue
        .enqueue(held, EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    // A run waits ready on lane `other`.
    let other = support::add_other_lane(&queue).await;
    let mut waiting = support::dispatch(1, &env("a"), "k1", NOW - 1, None);
    waiting.lane = other;
    queue
        .enqueue(waiting.clone(), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    // A claim naming `default` only: that ready run is outside it, so the new run is its one
    // candidate and is leased as it is placed (it never gets a TTL entry).
    let alone = support::dispatch(2, &env("a"), "k2", NOW - 1, Some(NOW + 10_100));
    let (_, leases) = queue
        .enqueue_claiming(
            alone.clone(),
            EnqueueAs::Trigger,
            now,
            &request("default", 2),
        )
        .await
        .expect("enqueue");
    assert_eq!(support::leased_ids(&leases), vec![alone.run_id]);
    let first = leased(leases);
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 1)],
        "leased as placed: no entry"
    );
    // A claim naming a lane that does not exist and `default`: nothing ready in either, so
    // the run is leased as it is placed too.
    let unknown = support::dispatch(4, &env("a"), "k4", NOW - 1, Some(NOW + 10_150));
    let (_, leases) = queue
        .enqueue_claiming(
            unknown.clone(),
            EnqueueAs::Trigger,
            now,
            &request("nowhere>default", 2),
        )
        .await
        .expect("enqueue");
    assert_eq!(support::leased_ids(&leases), vec![unknown.run_id]);
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 1)],
        "leased as placed: no entry"
    );
    // Env `a` runs at most 3 at once: those two end first.
    for (id, token) in leased(leases).into_iter().chain(first) {
        queue.finish(id, token, now).await.expect("finish");
    }
    // A claim naming `other` first: the run is placed, then the claim takes the waiting run
    // and it, in the chain's order; the placed run's TTL entry stays behind.
    let placed = support::dispatch(3, &env("a"), "k3", NOW - 1, Some(NOW + 10_200));
    let (_, leases) = queue
        .enqueue_claiming(
            placed.clone(),
            EnqueueAs::Trigger,
            now,
            &request("other>default", 2),
        )
        .await
        .expect("enqueue");
    assert_eq!(
        support::leased_ids(&leases),
        vec![waiting.run_id, placed.run_id]
    );
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 2)],
        "placed, then claimed"
    );
}

#[tokio::test]
async fn a_run_outside_the_claims_lanes_is_placed_and_left_for_a_claim_that_covers_it() {
    let Some(queue) = open("lanes").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    let d = ready(1, "a");
    let (enqueued, leases) = queue
        .enqueue_claiming(d.clone(), EnqueueAs::Trigger, now, &request("cron", 4))
        .await
        .expect("enqueue");
    assert_eq!(enqueued.placement, Placement::Ready);
    assert!(leases.is_empty(), "the cron lane's claim takes nothing");
    assert_eq!(
        enqueued.effects.ready_lanes,
        vec![d.lane.clone()],
        "the run waits: its lane rings"
    );
    // Nor does a claim for no slots, or one for an env the run is not in.
    let d2 = ready(2, "a");
    let (_, leases) = queue
        .enqueue_claiming(d2, EnqueueAs::Trigger, now, &request("*", 0))
        .await
        .expect("enqueue");
    assert!(leases.is_empty());
    let mut other_env = request("*", 4);
    other_env.envs.retain(|s| s.env == env("b"));
    let d3 = ready(3, "a");
    let (_, leases) = queue
        .enqueue_claiming(d3, EnqueueAs::Trigger, now, &other_env)
        .await
        .expect("enqueue");
    assert!(leases.is_empty());
    let claimed = queue.claim(&request("*", 4), now).await.expect("claim");
    let ids: Vec<RunId> = claimed.iter().map(|l| l.dispatch.run_id).collect();
    assert_eq!(
        ids.len(),
        3,
        "all three are ready for a covering claim: {ids:?}"
    );
    assert_eq!(ids[0], d.run_id, "oldest first");
}

#[tokio::test]
async fn a_refused_enqueue_claims_nothing() {
    let Some(queue) = open("refused").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    // A ready run of `a` a claim would take, then an enqueue into the unknown env `c`.
    queue
        .enqueue(ready(1, "a"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let refused = queue
        .enqueue_claiming(ready(2, "c"), EnqueueAs::Trigger, now, &request("*", 4))
        .await;
    assert_eq!(refused.err(), Some(QueueError::unknown_env(&env("c"))));
    let claimed = queue.claim(&request("*", 4), now).await.expect("claim");
    assert_eq!(claimed.len(), 1, "the ready run is still there");
}

#[tokio::test]
async fn a_lane_the_carried_claim_emptied_rings_no_doorbell() {
    let Some(queue) = open("quiet").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    let bell = |queue: &RedisQueue| format!("{}:db:default", queue.key_base());
    let mut conn = support::connect().await.expect("connection");
    let len = |conn: &mut redis::aio::MultiplexedConnection, key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("XLEN")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await
                .expect("xlen")
        }
    };
    // The claim takes the run it carries: no ready run is left, nothing rings.
    let d1 = ready(1, "a");
    let (enqueued, leases) = queue
        .enqueue_claiming(d1.clone(), EnqueueAs::Trigger, now, &request("*", 1))
        .await
        .expect("enqueue");
    assert_eq!(leases.len(), 1);
    assert!(
        enqueued.effects.ready_lanes.is_empty(),
        "{:?}",
        enqueued.effects
    );
    assert_eq!(len(&mut conn, bell(&queue)).await, 0, "no bell entry");
    // Two ready runs, a claim of one: the lane still holds a ready run and rings.
    queue
        .enqueue(ready(2, "a"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let (enqueued, leases) = queue
        .enqueue_claiming(ready(3, "a"), EnqueueAs::Trigger, now, &request("*", 1))
        .await
        .expect("enqueue");
    assert_eq!(leases.len(), 1);
    assert_eq!(enqueued.effects.ready_lanes, vec![d1.lane.clone()]);
    assert_eq!(len(&mut conn, bell(&queue)).await, 1, "the bell rang");
}

#[tokio::test]
async fn enqueue_and_claim_calls_are_counted_with_their_time() {
    let Some(queue) = open("timed").await else {
        return;
    };
    set_up(&queue).await;
    let now = Timestamp(NOW);
    let counts = |q: &RedisQueue| (q.enqueue_calls(), q.claim_calls());
    assert_eq!(counts(&queue), (0, 0));
    assert_eq!((queue.enqueue_micros(), queue.claim_micros()), (0, 0));
    // A claim riding on an enqueue is the enqueue's call; a claim for no slots makes no call.
    let (_, leases) = queue
        .enqueue_claiming(ready(1, "a"), EnqueueAs::Trigger, now, &request("*", 1))
        .await
        .expect("enqueue");
    assert_eq!(leases.len(), 1);
    queue
        .enqueue(ready(2, "a"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let none = queue.claim(&request("*", 0), now).await.expect("claim");
    assert!(none.is_empty());
    assert_eq!(counts(&queue), (2, 0));
    let claimed = queue.claim(&request("*", 4), now).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(counts(&queue), (2, 1));
    // Each call is a round trip to Redis: tens of µs at least, never nothing.
    assert!(queue.enqueue_micros() > 0 && queue.claim_micros() > 0);
}

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// The `h` field of the newest entry of `key` (a bell), if it has one.
async fn bell_hint(conn: &mut redis::aio::MultiplexedConnection, key: String) -> Option<Vec<u8>> {
    let newest: Vec<Entry> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .expect("xrevrange");
    let (_, fields) = newest.into_iter().next().expect("a bell entry");
    fields.into_iter().find(|(k, _)| k == "h").map(|(_, v)| v)
}

#[tokio::test]
async fn a_bell_names_the_runs_its_call_made_ready_up_to_four() {
    let Some(queue) = open("hint").await else {
        return;
    };
    support::put_envs_a_b(&queue, 100).await;
    let now = Timestamp(NOW);
    let lane_bell = format!("{}:db:default", queue.key_base());
    let star_bell = format!("{}:db:*", queue.key_base());
    let mut conn = support::connect().await.expect("connection");
    let ids = |runs: &[u128]| -> Option<Vec<u8>> {
        Some(
            runs.iter()
                .flat_map(|n| ready(*n, "a").run_id.to_bytes())
                .collect(),
        )
    };
    let of_a =
        |max: u32| support::claim_of(ClaimChain::parse("chain", "*").expect("chain"), max, &["a"]);
    // One run made ready: both bells name it.
    queue
        .enqueue(ready(1, "a"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    assert_eq!(bell_hint(&mut conn, lane_bell.clone()).await, ids(&[1]));
    assert_eq!(bell_hint(&mut conn, star_bell.clone()).await, ids(&[1]));
    queue
        .enqueue(ready(2, "b"), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    assert_eq!(bell_hint(&mut conn, lane_bell.clone()).await, ids(&[2]));
    // A carried claim leases run 1 (env a's oldest ready run): the hint names run 3 only.
    let (_, leases) = queue
        .enqueue_claiming(ready(3, "a"), EnqueueAs::Trigger, now, &of_a(1))
        .await
        .expect("enqueue");
    assert_eq!(leases[0].dispatch.run_id, ready(1, "a").run_id);
    assert_eq!(bell_hint(&mut conn, lane_bell.clone()).await, ids(&[3]));
    // A carried claim takes the run its call made ready (and run 3); run 2 (env b) still
    // rings the lane, with no hint: nothing this call made ready is left to read.
    let (_, leases) = queue
        .enqueue_claiming(ready(4, "a"), EnqueueAs::Trigger, now, &of_a(2))
        .await
        .expect("enqueue");
    assert_eq!(leases.len(), 2, "runs 3 and 4");
    assert_eq!(bell_hint(&mut conn, lane_bell.clone()).await, None);
    // Four runs made ready in one call are named; five are not (their claims read them).
    let many = |from: u128, n: u128| -> Vec<(Dispatch, EnqueueAs)> {
        (from..from + n)
            .map(|i| (ready(i, "a"), EnqueueAs::Trigger))
            .collect()
    };
    queue
        .enqueue_many(&many(10, 4), now)
        .await
        .expect("enqueue");
    assert_eq!(
        bell_hint(&mut conn, lane_bell.clone()).await,
        ids(&[10, 11, 12, 13])
    );
    queue
        .enqueue_many(&many(20, 5), now)
        .await
        .expect("enqueue");
    assert_eq!(bell_hint(&mut conn, lane_bell.clone()).await, None);
    assert_eq!(bell_hint(&mut conn, star_bell.clone()).await, None);
    // A lane's bell names its lane's runs; the `*` bell names them all.
    let other = runlane_core::LaneName::new("other").expect("lane");
    queue.add_lane(&other).await.expect("lane");
    let mut elsewhere = ready(31, "a");
    elsewhere.lane = other;
    let mixed = vec![
        (ready(30, "a"), EnqueueAs::Trigger),
        (elsewhere, EnqueueAs::Trigger),
    ];
    queue.enqueue_many(&mixed, now).await.expect("enqueue");
    assert_eq!(bell_hint(&mut conn, lane_bell).await, ids(&[30]));
    let other_bell = format!("{}:db:other", queue.key_base());
    assert_eq!(bell_hint(&mut conn, other_bell).await, ids(&[31]));
    assert_eq!(bell_hint(&mut conn, star_bell).await, ids(&[30, 31]));
}
