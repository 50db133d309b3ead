//! Parked offers: an idle workloop's empty claim parks its claim, an enqueue of any process
//! leases for it in its own step and delivers the leases on the doorbells, and the workloop's
//! next claim takes the offer back (with the leases it did not hear of).

use runlane_core::backend::{
    ClaimRequest, ConsumerId, Dispatch, EnqueueAs, Enqueued, Leased, OfferSteps, QueueBackend,
};
use runlane_core::{ClaimChain, RunId, RunStatus, Timestamp, WorkerId};

use crate::test_support::{self as support, env};
use crate::{Delivery, RedisQueue};

const NOW: u64 = 1_000;
/// When the offers these tests park stop being taken.
const UNTIL: u64 = NOW + 5_000;

async fn open(name: &str) -> Option<RedisQueue> {
    let queue = support::open_queue("parked", name).await?;
    // Env `a` admits 10 at once: no test here reaches its limit.
    support::put_envs_a_b(&queue, 10).await;
    Some(queue)
}

/// Worker `worker`'s claim of `max` runs of envs `a` and `b` on `chain`.
fn request(worker: u64, chain: &str, max: u32) -> ClaimRequest {
    let chain = ClaimChain::parse("chain", chain).expect("chain");
    let mut r = support::claim_of(chain, max, &["a", "b"]);
    r.worker = WorkerId(worker);
    r
}

/// Run `n` of env `a`, due just before [`NOW`].
fn ready(n: u128) -> Dispatch {
    support::dispatch(n, &env("a"), "k", NOW - 1, None)
}

/// Consumer `c`'s steps: take back offer `withdraw` (heard or not), park offer `park`.
fn steps(c: u64, withdraw: Option<(u64, bool)>, park: Option<u64>) -> OfferSteps {
    OfferSteps {
        consumer: ConsumerId(c),
        withdraw,
        park: park.map(|s| (s, Timestamp(UNTIL))),
    }
}

/// Worker 7's claim of `max` runs on every lane, as consumer `steps.consumer` with `steps`.
async fn park(queue: &RedisQueue, max: u32, steps: OfferSteps, now: Timestamp) -> Vec<Leased> {
    queue
        .claim_parking(&request(7, "*", max), &steps, now)
        .await
        .expect("claim")
}

/// An enqueue in which parked offers may lease (nothing sent with it).
async fn take(queue: &RedisQueue, d: Dispatch, now: Timestamp) -> Enqueued {
    queue
        .enqueue_handing(d, EnqueueAs::Trigger, now, None, Some(b""))
        .await
        .expect("enqueue")
        .0
}

/// The fields of a bell's last entry (none when it never rang).
async fn last_entry(queue: &RedisQueue, bell: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = support::connect().await.expect("connection");
    let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
        .arg(format!("{}:db:{bell}", queue.key_base()))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("xrevrange");
    let Some((_, fields)) = entries.into_iter().next() else {
        return Vec::new();
    };
    fields
        .chunks_exact(2)
        .map(|kv| (String::from_utf8_lossy(&kv[0]).into_owned(), kv[1].clone()))
        .collect()
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// The deliveries of a bell's last entry.
async fn delivered(queue: &RedisQueue, bell: &str) -> Vec<Delivery> {
    let fields = last_entry(queue, bell).await;
    field(&fields, "o").map_or_else(Vec::new, |o| {
        RedisQueue::deliveries(o).expect("a delivery decodes")
    })
}

/// Entries in the parked offers' hash.
async fn offers_kept(queue: &RedisQueue) -> u64 {
    let mut conn = support::connect().await.expect("connection");
    redis::cmd("HLEN")
        .arg(format!("{}:of", queue.key_base()))
        .query_async(&mut conn)
        .await
        .expect("hlen")
}

fn ids(d: &Delivery) -> Vec<RunId> {
    d.runs.iter().map(|(l, _)| l.dispatch.run_id).collect()
}

#[tokio::test]
async fn an_enqueue_leases_for_a_parked_offer_and_delivers_on_the_bells() {
    let Some(queue) = open("deliver").await else {
        return;
    };
    let now = Timestamp(NOW);
    let empty = park(&queue, 2, steps(3, None, Some(1)), now).await;
    assert!(empty.is_empty(), "nothing ready: the offer parks");
    let d = ready(1);
    let (enqueued, leases) = queue
        .enqueue_handing(
            d.clone(),
            EnqueueAs::Trigger,
            now,
            None,
            Some(b"what the worker needs"),
        )
        .await
        .expect("enqueue");
    assert!(
        leases.is_empty(),
        "no carried claim: nothing for the caller"
    );
    assert!(
        enqueued.effects.ready_lanes.is_empty(),
        "the run is leased, its lane has nothing ready: {:?}",
        enqueued.effects
    );
    assert_eq!(
        enqueued.effects.moved,
        vec![(d.run_id, RunStatus::Executing)],
        "reported leased, so the trigger publishes no `ready` after the worker's events"
    );
    let live = queue.live(d.run_id).await.expect("live").expect("held");
    assert_eq!(live.status, RunStatus::Executing);
    let lease = live.lease.expect("leased");
    assert_eq!(lease.worker, WorkerId(7), "for the offer's worker");
    // Delivered on the `*` bell and on the run's lane's bell, which ring the lane (an entry
    // that rang nothing could hide an unread one), without naming the run in a hint.
    let star = delivered(&queue, "*").await;
    assert_eq!(star.len(), 1);
    assert_eq!((star[0].consumer, star[0].seq), (ConsumerId(3), 1));
    assert_eq!(ids(&star[0]), vec![d.run_id]);
    let (leased, handed) = &star[0].runs[0];
    assert_eq!(leased.token, lease.token);
    assert_eq!(leased.lease_deadline, lease.deadline);
    assert_eq!(handed.as_deref(), Some(&b"what the worker needs"[..]));
    let star_fields = last_entry(&queue, "*").await;
    assert_eq!(field(&star_fields, "l"), Some(&b"default"[..]));
    assert_eq!(field(&star_fields, "h"), None, "the run is not ready");
    let lane_fields = last_entry(&queue, "default").await;
    assert_eq!(field(&lane_fields, "r"), Some(&b"1"[..]));
    assert_eq!(field(&lane_fields, "h"), None);
    assert_eq!(delivered(&queue, "default").await.len(), 1);
    // Taken once: the next run stays ready and rings.
    let d2 = ready(2);
    let enqueued = take(&queue, d2.clone(), now).await;
    assert_eq!(enqueued.effects.ready_lanes, vec![d2.lane.clone()]);
    // The workloop heard the delivery: taking the offer back answers nothing more, and its
    // claim leases the ready run.
    let claimed = park(&queue, 2, steps(3, Some((1, true)), Some(2)), now).await;
    let got: Vec<RunId> = claimed.iter().map(|l| l.dispatch.run_id).collect();
    assert_eq!(got, vec![d2.run_id]);
}

#[tokio::test]
async fn a_withdrawn_offer_answers_the_leases_its_workloop_did_not_hear_of() {
    let Some(queue) = open("unheard").await else {
        return;
    };
    let now = Timestamp(NOW);
    park(&queue, 2, steps(3, None, Some(1)), now).await;
    let d = ready(1);
    take(&queue, d.clone(), now).await;
    let token = queue
        .live(d.run_id)
        .await
        .expect("live")
        .and_then(|l| l.lease)
        .expect("leased for the offer")
        .token;
    take(&queue, ready(2), now).await;
    // Not heard: the withdrawn offer's lease comes first, then one ready run (max 2).
    let claimed = park(&queue, 2, steps(3, Some((1, false)), Some(2)), now).await;
    let got: Vec<(RunId, u64)> = claimed
        .iter()
        .map(|l| (l.dispatch.run_id, l.token.0))
        .collect();
    assert_eq!(got, vec![(d.run_id, token.0), (ready(2).run_id, got[1].1)]);
    // Leases were answered: nothing parked, so the next run is not taken.
    let enqueued = take(&queue, ready(3), now).await;
    assert_eq!(enqueued.effects.ready_lanes.len(), 1, "ready, not leased");
    // A run no longer held under the offer's lease (its attempt failed and it waits for its
    // retry) is not answered.
    queue
        .claim(&request(9, "*", 5), now)
        .await
        .expect("drain the ready run");
    let empty = park(&queue, 1, steps(3, None, Some(3)), now).await;
    assert!(empty.is_empty());
    let d4 = ready(4);
    take(&queue, d4.clone(), now).await;
    let held = queue
        .live(d4.run_id)
        .await
        .expect("live")
        .and_then(|l| l.lease)
        .expect("leased for the offer");
    assert_eq!(held.worker, WorkerId(7));
    queue
        .retry(d4.run_id, held.token, Timestamp(NOW + 60_000), now)
        .await
        .expect("retry");
    let claimed = park(&queue, 1, steps(3, Some((3, false)), None), now).await;
    assert!(
        claimed.iter().all(|l| l.dispatch.run_id != d4.run_id),
        "a run waiting for its retry is not answered: {claimed:?}"
    );
}

#[tokio::test]
async fn an_offer_is_not_taken_past_its_deadline_nor_for_a_lane_it_does_not_cover() {
    let Some(queue) = open("stale").await else {
        return;
    };
    let now = Timestamp(NOW);
    queue
        .claim_parking(&request(7, "cron", 2), &steps(3, None, Some(1)), now)
        .await
        .expect("claim");
    let enqueued = take(&queue, ready(1), now).await;
    assert_eq!(
        enqueued.effects.ready_lanes.len(),
        1,
        "the cron offer takes nothing"
    );
    park(&queue, 2, steps(3, Some((1, false)), Some(2)), now).await;
    queue.claim(&request(9, "*", 5), now).await.expect("drain");
    let late = Timestamp(UNTIL);
    let d = ready(2);
    let enqueued = take(&queue, d.clone(), late).await;
    assert_eq!(
        enqueued.effects.ready_lanes,
        vec![d.lane.clone()],
        "past its deadline"
    );
    let live = queue.live(d.run_id).await.expect("live").expect("held");
    assert_eq!(live.status, RunStatus::Ready);
    assert_eq!(
        offers_kept(&queue).await,
        0,
        "the expired offer was deleted"
    );
    // A taken offer nobody withdrew (its process died) goes once its leases' deadline passed.
    queue.claim(&request(9, "*", 5), late).await.expect("drain");
    let parked = OfferSteps {
        park: Some((1, Timestamp(UNTIL + 5_000))),
        ..steps(4, None, None)
    };
    park(&queue, 1, parked, late).await;
    take(&queue, ready(3), late).await;
    assert_eq!(offers_kept(&queue).await, 1, "taken, kept for its workloop");
    queue
        .enqueue_handing(
            ready(5),
            EnqueueAs::Trigger,
            Timestamp(UNTIL + 29_999),
            None,
            Some(b""),
        )
        .await
        .expect("enqueue");
    assert_eq!(
        offers_kept(&queue).await,
        1,
        "kept while its leases may be held"
    );
    let after_lease = Timestamp(UNTIL + 30_000);
    take(&queue, ready(4), after_lease).await;
    assert_eq!(offers_kept(&queue).await, 0);
}

#[tokio::test]
async fn a_withdrawn_offer_does_not_answer_a_lapsed_lease() {
    let Some(queue) = open("lapsed").await else {
        return;
    };
    let now = Timestamp(NOW);
    park(&queue, 1, steps(3, None, Some(1)), now).await;
    let d = ready(1);
    take(&queue, d.clone(), now).await;
    // The 30 s lease lapses (the timer saw it) before the workloop takes its offer back.
    let later = Timestamp(NOW + 31_000);
    queue.tick(later).await.expect("tick");
    let back = park(&queue, 0, steps(3, Some((1, false)), None), later).await;
    assert!(
        back.is_empty(),
        "a lapsed lease is recovered, not run: {back:?}"
    );
}

#[tokio::test]
async fn a_stopping_workloop_takes_its_offer_back_with_the_leases_it_did_not_start() {
    let Some(queue) = open("stop").await else {
        return;
    };
    let now = Timestamp(NOW);
    park(&queue, 2, steps(3, None, Some(1)), now).await;
    let d = ready(1);
    take(&queue, d.clone(), now).await;
    // A claim of no runs that only takes the offer back answers its lease (to be released).
    let back = park(&queue, 0, steps(3, Some((1, false)), None), now).await;
    let got: Vec<RunId> = back.iter().map(|l| l.dispatch.run_id).collect();
    assert_eq!(got, vec![d.run_id]);
    assert_eq!(offers_kept(&queue).await, 0);
}

#[tokio::test]
async fn a_carried_claim_takes_its_parked_twin_unless_another_enqueue_took_it_first() {
    let Some(queue) = open("twin").await else {
        return;
    };
    let now = Timestamp(NOW);
    let req = request(7, "*", 1);
    queue
        .claim_parking(&req, &steps(3, None, Some(1)), now)
        .await
        .expect("claim");
    // The carried claim of offer 1 leases the run and removes the twin.
    let d1 = ready(1);
    let (_, leases) = queue
        .enqueue_handing(
            d1.clone(),
            EnqueueAs::Trigger,
            now,
            Some((&req, Some((ConsumerId(3), 1)))),
            None,
        )
        .await
        .expect("enqueue");
    assert_eq!(leases.len(), 1);
    assert!(delivered(&queue, "*").await.is_empty(), "nothing delivered");
    let enqueued = take(&queue, ready(2), now).await;
    assert_eq!(enqueued.effects.ready_lanes.len(), 1, "the twin is gone");
    queue.claim(&request(9, "*", 5), now).await.expect("drain");
    // Another enqueue takes offer 2 first: the carried claim then leases nothing.
    queue
        .claim_parking(&req, &steps(3, Some((1, false)), Some(2)), now)
        .await
        .expect("claim");
    take(&queue, ready(3), now).await;
    assert_eq!(delivered(&queue, "*").await.len(), 1);
    let (enqueued, leases) = queue
        .enqueue_handing(
            ready(4),
            EnqueueAs::Trigger,
            now,
            Some((&req, Some((ConsumerId(3), 2)))),
            None,
        )
        .await
        .expect("enqueue");
    assert!(leases.is_empty(), "its slots went to the delivered lease");
    assert_eq!(enqueued.effects.ready_lanes.len(), 1, "the run waits");
}

#[tokio::test]
async fn an_enqueue_that_may_not_lease_for_parked_offers_leaves_them_parked() {
    let Some(queue) = open("plain").await else {
        return;
    };
    let now = Timestamp(NOW);
    park(&queue, 1, steps(3, None, Some(1)), now).await;
    // A busy process's enqueue (no `handed`), a retry's, a rebuild's: the run waits and rings.
    let d = ready(1);
    let enqueued = queue
        .enqueue(d.clone(), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    assert_eq!(enqueued.effects.ready_lanes, vec![d.lane.clone()]);
    let live = queue.live(d.run_id).await.expect("live").expect("held");
    assert_eq!(live.status, RunStatus::Ready);
    assert_eq!(offers_kept(&queue).await, 1, "still parked");
}

#[tokio::test]
async fn unregistering_drops_the_parked_offer() {
    let Some(queue) = open("gone").await else {
        return;
    };
    let now = Timestamp(NOW);
    let chain = ClaimChain::default_chain();
    let consumer = queue
        .register_consumer(&chain, now)
        .await
        .expect("register");
    park(
        &queue,
        1,
        OfferSteps {
            consumer,
            withdraw: None,
            park: Some((1, Timestamp(UNTIL))),
        },
        now,
    )
    .await;
    queue
        .unregister_consumer(consumer, now)
        .await
        .expect("unregister");
    let d = ready(1);
    take(&queue, d.clone(), now).await;
    let live = queue.live(d.run_id).await.expect("live").expect("held");
    assert_eq!(live.status, RunStatus::Ready);
}

#[tokio::test]
async fn the_offer_that_would_take_a_run_takes_it_as_it_is_placed_unless_other_runs_are_ready() {
    let Some(queue) = open("as-placed").await else {
        return;
    };
    let other = support::add_other_lane(&queue).await;
    let now = Timestamp(NOW);
    // Consumer 3's offer serves env `b` only, consumer 4's env `a` (one slot each).
    let mut only_b = request(7, "*", 1);
    only_b.envs.retain(|s| s.env == env("b"));
    let mut only_a = request(7, "*", 1);
    only_a.envs.retain(|s| s.env == env("a"));
    let parks = |c: u64, seq: u64, withdraw: Option<(u64, bool)>| steps(c, withdraw, Some(seq));
    let empty = queue
        .claim_parking(&only_b, &parks(3, 1, None), now)
        .await
        .expect("claim");
    assert!(empty.is_empty());
    let empty = queue
        .claim_parking(&only_a, &parks(4, 1, None), now)
        .await
        .expect("claim");
    assert!(empty.is_empty());
    // A delayed run holds an entry in the TTL bucket of second 11.
    let delayed = support::dispatch(1, &env("a"), "k1", NOW + 60_000, Some(NOW + 10_100));
    queue
        .enqueue(delayed, EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    // Nothing ready: consumer 3's offer would lease nothing, consumer 4's takes the run as it
    // is placed (it never is ready, so it never gets a TTL entry).
    let first = support::dispatch(2, &env("a"), "k2", NOW - 1, Some(NOW + 10_500));
    let enqueued = take(&queue, first.clone(), now).await;
    assert_eq!(
        enqueued.effects.moved,
        vec![(first.run_id, RunStatus::Executing)]
    );
    let star = delivered(&queue, "*").await;
    assert_eq!(star.len(), 1);
    assert_eq!(
        (star[0].consumer, ids(&star[0])),
        (ConsumerId(4), vec![first.run_id])
    );
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 1)]
    );
    // A ready run of env `b` on lane `other` (placed where no offer may lease), consumer 4
    // parks again: now consumer 3's offer leases that run, and consumer 4's takes the new run
    // once it is ready (a placement then a claim: its TTL entry stays behind, dead).
    let mut of_b = support::dispatch(3, &env("b"), "k3", NOW - 1, None);
    of_b.lane = other;
    queue
        .enqueue(of_b.clone(), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let live = queue.live(of_b.run_id).await.expect("live").expect("held");
    assert_eq!(live.status, RunStatus::Ready, "queued, then admitted");
    let back = queue
        .claim_parking(&only_a, &parks(4, 2, Some((1, true))), now)
        .await
        .expect("claim");
    assert!(back.is_empty(), "consumer 4 does not serve env b");
    let second = support::dispatch(4, &env("a"), "k4", NOW - 1, Some(NOW + 10_600));
    take(&queue, second.clone(), now).await;
    let mut star = delivered(&queue, "*").await;
    star.sort_by_key(|d| d.consumer);
    let got: Vec<(ConsumerId, Vec<RunId>)> = star.iter().map(|d| (d.consumer, ids(d))).collect();
    assert_eq!(
        got,
        vec![
            (ConsumerId(3), vec![of_b.run_id]),
            (ConsumerId(4), vec![second.run_id])
        ]
    );
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 2)]
    );
}

#[tokio::test]
async fn an_offer_that_covers_a_lane_with_a_ready_run_takes_it_before_the_placed_run() {
    let Some(queue) = open("as-placed-busy").await else {
        return;
    };
    let other = support::add_other_lane(&queue).await;
    let now = Timestamp(NOW);
    // An offer already past its deadline comes first; consumer 4's live offer (two slots,
    // every lane) comes next.
    let stale = OfferSteps {
        consumer: ConsumerId(2),
        withdraw: None,
        park: Some((1, Timestamp(NOW))),
    };
    assert!(park(&queue, 2, stale, Timestamp(NOW - 10)).await.is_empty());
    assert!(park(&queue, 2, steps(4, None, Some(1)), now)
        .await
        .is_empty());
    assert_eq!(offers_kept(&queue).await, 2);
    // A delayed run holds an entry in the TTL bucket of second 11.
    let delayed = support::dispatch(3, &env("a"), "k3", NOW + 60_000, Some(NOW + 10_100));
    queue
        .enqueue(delayed, EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    // A ready run on lane `other` (placed where no offer may lease), then a run of the
    // default lane that the offer could take alone were the other lane idle: the offer's
    // claim takes both, the older first.
    let mut elsewhere = support::dispatch(1, &env("a"), "k1", NOW - 1, None);
    elsewhere.lane = other;
    queue
        .enqueue(elsewhere.clone(), EnqueueAs::Trigger, now)
        .await
        .expect("enqueue");
    let d = support::dispatch(2, &env("a"), "k2", NOW - 1, Some(NOW + 10_500));
    take(&queue, d.clone(), now).await;
    let star = delivered(&queue, "*").await;
    let got: Vec<(ConsumerId, Vec<RunId>)> = star.iter().map(|x| (x.consumer, ids(x))).collect();
    assert_eq!(got, vec![(ConsumerId(4), vec![elsewhere.run_id, d.run_id])]);
    // Placed, then claimed: its TTL entry stays behind, dead. The stale offer is gone.
    assert_eq!(
        support::ttl_entries(&queue).await,
        vec![(":tb:11".to_string(), 2)]
    );
    assert_eq!(offers_kept(&queue).await, 1);
}
