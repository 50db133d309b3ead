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
