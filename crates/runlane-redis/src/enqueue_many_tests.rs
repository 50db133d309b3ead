//! `enqueue_many` against one `enqueue` per run, and enqueue combining: concurrent enqueues share
//! script calls, each caller gets its own run's answer, and a caller that goes away mid-batch
//! loses nobody's run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use runlane_core::backend::{ClaimRequest, Dispatch, EnqueueAs, Placement, QueueBackend};
use runlane_core::{
    ClaimChain, EnvSettings, QueueError, QueueName, QueueSettings, RunId, RunStatus, Timestamp,
};

use crate::test_support::{self as support, env};
use crate::RedisQueue;

const NOW: u64 = 1_000;

async fn open(name: &str) -> Option<RedisQueue> {
    support::open_queue("enqmany", name).await
}

/// Env `a` admits 2 at once with the fast path; env `b` admits 1 without it, and its queue `q`
/// holds at most 3 waiting runs per key.
async fn set_up(queue: &RedisQueue) {
    support::put_envs_a_b(queue, 2).await;
    let q = QueueSettings {
        max_queued: Some(3),
        ..QueueSettings::default()
    };
    queue
        .put_queue(
            &env("b"),
            &QueueName::new("q").expect("queue"),
            q,
            Timestamp(0),
        )
        .await
        .expect("queue");
}

/// 40 enqueues over envs `a`, `b` and the unknown `c`, two keys, some delayed, some repeating
/// an earlier run, some sync, some already accepted (past `b`'s cap).
fn mix() -> Vec<(Dispatch, EnqueueAs)> {
    let envs = [env("a"), env("b"), env("c")];
    (1..=40u128)
        .map(|n| {
            let id = if n % 7 == 0 { n - 3 } else { n };
            let e = &envs[(id % 3) as usize];
            let key = if id % 2 == 0 { "k1" } else { "k2" };
            let after = if id % 5 == 0 {
                NOW + 60_000
            } else {
                NOW - id as u64
            };
            let why = match n % 4 {
                0 => EnqueueAs::SyncTrigger,
                _ if n % 9 == 0 => EnqueueAs::Accepted,
                _ => EnqueueAs::Trigger,
            };
            (support::dispatch(id, e, key, after, None), why)
        })
        .collect()
}

fn claim_request() -> ClaimRequest {
    support::claim_of(ClaimChain::default_chain(), 100, &["a", "b"])
}

/// The answers of one `enqueue` per run of `mix`, in order.
async fn one_by_one_answers(
    queue: &RedisQueue,
    mix: &[(Dispatch, EnqueueAs)],
) -> Vec<Result<Placement, QueueError>> {
    let mut answers = Vec::new();
    for (d, why) in mix {
        answers.push(
            queue
                .enqueue(d.clone(), *why, Timestamp(NOW))
                .await
                .map(|e| e.placement),
        );
    }
    answers
}

/// Both queues hold the same runs in the same places.
async fn assert_same_runs(a: &RedisQueue, b: &RedisQueue) {
    let mut live_a = a.snapshot().await.expect("snapshot");
    let mut live_b = b.snapshot().await.expect("snapshot");
    live_a.sort_by_key(|l| l.dispatch.run_id);
    live_b.sort_by_key(|l| l.dispatch.run_id);
    assert_eq!(live_a, live_b);
}

fn ids(leased: Vec<runlane_core::backend::Leased>) -> Vec<RunId> {
    leased.into_iter().map(|l| l.dispatch.run_id).collect()
}

#[tokio::test]
async fn enqueue_many_answers_and_leaves_the_queue_as_one_enqueue_per_run_does() {
    let (Some(one_by_one), Some(batched)) = (open("single").await, open("many").await) else {
        return;
    };
    set_up(&one_by_one).await;
    set_up(&batched).await;
    let mix = mix();
    let expected = one_by_one_answers(&one_by_one, &mix).await;
    let calls = batched.enqueue_calls();
    let (answers, effects) = batched
        .enqueue_many(&mix, Timestamp(NOW))
        .await
        .expect("enqueue_many");
    assert_eq!(batched.enqueue_calls() - calls, 1, "one script call");
    assert_eq!(answers, expected);
    // Every kind of answer is in the mix.
    assert!(answers.contains(&Ok(Placement::Ready)));
    assert!(answers.contains(&Ok(Placement::Queued)));
    assert!(answers.contains(&Ok(Placement::Delayed)));
    assert!(answers
        .iter()
        .any(|a| *a == Err(QueueError::unknown_env(&env("c")))));
    assert!(answers
        .iter()
        .any(|a| matches!(a, Err(QueueError::QueueFull { .. }))));
    assert!(effects
        .moved
        .iter()
        .any(|(_, s)| matches!(s, RunStatus::Queued | RunStatus::Delayed)));
    // The same runs are waiting in the same places, and claims take them in the same order.
    assert_same_runs(&one_by_one, &batched).await;
    let at = Timestamp(NOW + 1);
    let claimed_a = ids(one_by_one.claim(&claim_request(), at).await.expect("claim"));
    let claimed_b = ids(batched.claim(&claim_request(), at).await.expect("claim"));
    assert!(!claimed_a.is_empty());
    assert_eq!(claimed_a, claimed_b);
}

/// What the counters of both queues say: each env's usage, each env's queues, the lanes.
async fn counters(queue: &RedisQueue) -> String {
    let mut out = String::new();
    for e in [env("a"), env("b")] {
        let usage = queue.env_usage(&e).await.expect("usage");
        let queues = queue.queues(&e).await.expect("queues");
        out.push_str(&format!("{e}: {usage:?} {queues:?}\n"));
    }
    let lanes = queue.lanes(Timestamp(NOW)).await.expect("lanes");
    out.push_str(&format!("lanes: {lanes:?}"));
    out
}

/// Runs `from..=to`: env `a` (fast path, admits 50) but every fifth in env `b` (no fast path,
/// admits 1), over three keys.
fn fast_mix(from: u128, to: u128) -> Vec<(Dispatch, EnqueueAs)> {
    (from..=to)
        .map(|n| {
            let e = if n % 5 == 0 { env("b") } else { env("a") };
            let key = ["k1", "k2", "k3"][(n % 3) as usize];
            (
                support::dispatch(n, &e, key, NOW - n as u64, None),
                EnqueueAs::Trigger,
            )
        })
        .collect()
}

/// A batch whose runs mostly take the fast path, between runs that wait: `enqueue_many` keeps
/// the fast path's counters in the call and writes them once, and what it leaves (answers,
/// waiting runs, running counters, lane depths, claims, and a second batch on top) matches one
/// enqueue per run.
#[tokio::test]
async fn a_batch_of_fast_path_runs_leaves_the_counters_one_enqueue_per_run_does() {
    let (Some(one_by_one), Some(batched)) = (open("fast-single").await, open("fast-many").await)
    else {
        return;
    };
    support::put_envs_a_b(&one_by_one, 50).await;
    support::put_envs_a_b(&batched, 50).await;
    for mix in [fast_mix(1, 60), fast_mix(61, 90)] {
        let expected = one_by_one_answers(&one_by_one, &mix).await;
        let (answers, _) = batched
            .enqueue_many(&mix, Timestamp(NOW))
            .await
            .expect("enqueue_many");
        assert_eq!(answers, expected);
        assert!(answers.contains(&Ok(Placement::Ready)));
        assert!(answers.contains(&Ok(Placement::Queued)));
        assert_eq!(counters(&batched).await, counters(&one_by_one).await);
        assert_same_runs(&one_by_one, &batched).await;
        // Claims take the same runs in the same order, and leave the same counters.
        let request = support::claim_of(ClaimChain::default_chain(), 20, &["a", "b"]);
        let at = Timestamp(NOW + 1);
        let claimed_a = ids(one_by_one.claim(&request, at).await.expect("claim"));
        let claimed_b = ids(batched.claim(&request, at).await.expect("claim"));
        assert_eq!(claimed_a.len(), 20);
        assert_eq!(claimed_a, claimed_b);
        assert_eq!(counters(&batched).await, counters(&one_by_one).await);
    }
}

/// A call that fails half-way (a run whose record cannot be read raises a script error) leaves
/// the fast-path runs it placed before the error counted, as one enqueue per run would, and
/// the next call starts from the key space, not from the failed call's kept state.
#[tokio::test]
async fn a_batch_that_fails_half_way_writes_the_counters_of_the_runs_it_placed() {
    let Some(queue) = open("half").await else {
        return;
    };
    support::put_envs_a_b(&queue, 50).await;
    let first = support::dispatch(1, &env("a"), "k1", NOW - 1, None);
    let second = support::dispatch(2, &env("a"), "k1", NOW - 2, None);
    let mut conn = queue.connection();
    // A raw call does not load the library again as the queue's calls do: when a parallel test
    // (`function_tests`) has just deleted it, the queue's next call loads it and this retries.
    let mut failed;
    let mut tries = 0;
    loop {
        failed = redis::cmd("FCALL")
            .arg(format!("{}_dispatch", queue.library_name()))
            .arg(1)
            .arg(queue.key_base())
            .arg("enqueue_many")
            .arg(NOW)
            .arg(300_000)
            .arg(crate::KEYSPACE_FORMAT)
            .arg("")
            .arg(first.run_id.to_bytes().as_slice())
            .arg(crate::record::pack_new(&first))
            .arg("0")
            .arg(second.run_id.to_bytes().as_slice())
            .arg(b"\xc1".as_slice())
            .arg("0")
            .query_async::<Vec<u8>>(&mut conn)
            .await;
        let gone = failed.as_ref().is_err_and(crate::queue::function_missing);
        tries += 1;
        if !gone || tries == 3 {
            break;
        }
        queue
            .has_lane(&runlane_core::LaneName::default_lane())
            .await
            .expect("a call loads the library again");
    }
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| !crate::queue::function_missing(e)),
        "the second record cannot be read: {failed:?}"
    );
    let usage = queue.env_usage(&env("a")).await.expect("usage");
    assert_eq!(usage.running, 1, "the first run holds its slot: {usage:?}");
    let lanes = queue.lanes(Timestamp(NOW)).await.expect("lanes");
    let ready = |lanes: &[runlane_core::backend::LaneInfo]| {
        lanes
            .iter()
            .find(|l| l.name.as_str() == "default")
            .map(|l| l.ready)
    };
    assert_eq!(ready(&lanes), Some(1), "the first run is ready: {lanes:?}");
    let third = support::dispatch(3, &env("a"), "k2", NOW - 3, None);
    let (answers, _) = queue
        .enqueue_many(&[(third, EnqueueAs::Trigger)], Timestamp(NOW))
        .await
        .expect("enqueue_many");
    assert_eq!(answers, vec![Ok(Placement::Ready)]);
    let usage = queue.env_usage(&env("a")).await.expect("usage");
    assert_eq!(usage.running, 2, "{usage:?}");
}

/// Polls a future once, keeping it when it is not done.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *f).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

// On one thread the order is fixed: the first task's call is in flight while the 49 others
// join the list, so they go in exactly one more call.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_enqueues_share_one_call_and_each_gets_its_own_runs_answer() {
    let Some(queue) = open("combine").await else {
        return;
    };
    set_up(&queue).await;
    let e = EnvSettings {
        limit: 1_000,
        ..EnvSettings::default()
    };
    queue.put_env(&env("a"), e, Timestamp(0)).await.expect("a");
    let queue = Arc::new(queue);
    let calls = queue.enqueue_calls();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 1..=50u128 {
        let queue = queue.clone();
        tasks.spawn(async move {
            let d = support::dispatch(n, &env("a"), "", NOW - 1, None);
            (
                n,
                queue.enqueue(d, EnqueueAs::Trigger, Timestamp(NOW)).await,
            )
        });
    }
    let mut moved = 0;
    while let Some(done) = tasks.join_next().await {
        let (n, answer) = done.expect("task");
        let answer = answer.expect("enqueued");
        assert_eq!(answer.placement, Placement::Ready);
        let run = RunId((1u128 << 80) | n);
        // Its own run's moves only (the batch's other moves went to their callers).
        assert!(answer.effects.moved.iter().all(|(r, _)| *r == run));
        assert!(answer.effects.moved.contains(&(run, RunStatus::Ready)));
        moved += answer.effects.moved.len();
    }
    assert_eq!(moved, 50, "each move reported once");
    assert_eq!(
        queue.enqueue_calls() - calls,
        2,
        "one alone, then one batch of 49"
    );
    let live = queue.snapshot().await.expect("snapshot");
    assert_eq!(live.len(), 50);
}

#[tokio::test(flavor = "current_thread")]
async fn callers_that_go_away_mid_batch_lose_no_other_callers_run() {
    let Some(queue) = open("gone").await else {
        return;
    };
    set_up(&queue).await;
    let queue = Arc::new(queue);
    let run = |n: u128| support::dispatch(n, &env("b"), &format!("k{n}"), NOW - 1, None);
    // Run 1's caller leads; run 2's waits; run 3's waits in a task of its own.
    let mut first = queue.enqueue(run(1), EnqueueAs::Trigger, Timestamp(NOW));
    assert!(poll_once(&mut first).await.is_none(), "in flight");
    let mut second = queue.enqueue(run(2), EnqueueAs::Trigger, Timestamp(NOW));
    assert!(poll_once(&mut second).await.is_none(), "waiting");
    let third = tokio::spawn({
        let queue = queue.clone();
        async move {
            queue
                .enqueue(run(3), EnqueueAs::Trigger, Timestamp(NOW))
                .await
        }
    });
    tokio::task::yield_now().await;
    // The leader goes away: run 2's caller leads runs 2 and 3, then goes away mid-call too.
    drop(first);
    assert!(poll_once(&mut second).await.is_none(), "leading its batch");
    drop(second);
    // Run 3's caller was in that batch, unanswered: it enqueues its run alone.
    let answer = third.await.expect("task").expect("run 3 enqueued");
    assert_eq!(answer.placement, Placement::Queued);
    let live = queue.snapshot().await.expect("snapshot");
    assert!(live
        .iter()
        .any(|l| l.dispatch.run_id == RunId((1u128 << 80) | 3)));
    // Nothing is left in flight: the next caller leads at once, and runs 1 and 2 (placed or not
    // by the calls that went away) are enqueued again idempotently.
    let calls = queue.enqueue_calls();
    for n in 1..=3 {
        let again = queue
            .enqueue(run(n), EnqueueAs::Trigger, Timestamp(NOW))
            .await
            .expect("enqueued");
        assert_ne!(again.placement, Placement::Delayed);
    }
    assert_eq!(queue.enqueue_calls() - calls, 3);
    let live = queue.snapshot().await.expect("snapshot");
    assert_eq!(live.len(), 3, "each run once: {live:?}");
}
