//! Per-lane doorbells across processes (issue 4): a run made ready in one process reaches the
//! idle workloops of another through the Redis bell of its lane (`{prefix}:db:<lane>`, or the
//! `*` bell for wildcard chains), read by one reader per distinct claim chain on its own
//! blocking connection. Each engine here is a "process" of its own (its own connections and
//! readers). Leases are long, so no heartbeat or lease expiry wakes a workloop: only a bell
//! does. Redis (`RUNLANE_REDIS_URL`), PostgreSQL (`RUNLANE_DATABASE_URL`) and `redis-server`
//! are required: a missing one fails the test.

mod redis_support;
mod reporting;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis_support::PrivateRedis;
use reporting::{assert_completed, reporting_worker, reporting_worker_leasing, trigger};
use runlane::core::backend::QueueBackend;
use runlane::core::RunId;
use runlane::{Distributed, DistributedConfig, EngineBuilder};
use tokio::sync::mpsc;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// How long a run may take to reach an idle worker of another process.
const BOUND: Duration = Duration::from_secs(5);

fn database_url() -> String {
    std::env::var("RUNLANE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// One deployment (prefix and schema) on the Redis at `url`; each `open` is one process.
struct Deployment {
    url: String,
    prefix: String,
    schema: String,
}

impl Deployment {
    fn new(tag: &str, url: String) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Deployment {
            url,
            prefix: redis_support::fresh_prefix(tag),
            schema: format!("rlt_{tag}_{}_{n}", std::process::id()),
        }
    }

    /// A process of the deployment; `throwaway` for the one that cleans up.
    async fn open(&self, throwaway: bool) -> Distributed {
        let mut config = DistributedConfig::new(self.url.clone(), database_url());
        config.redis.prefix = self.prefix.clone();
        config.redis.response_timeout = Duration::from_secs(5);
        config.postgres.schema = self.schema.clone();
        config.postgres.pool_size = 4;
        config.throwaway = throwaway;
        let engine = match runlane::distributed_with(EngineBuilder::new(), config).await {
            Ok(engine) => engine,
            Err(e) => panic!("redis and postgresql are required: {e}"),
        };
        for lane in ["reports", "other", "x", "y"] {
            engine.add_lane(lane).await.expect("add lane");
        }
        engine
    }
}

/// The next run `rx` reports, within [`BOUND`].
async fn taken(rx: &mut mpsc::UnboundedReceiver<RunId>, what: &str) -> RunId {
    tokio::time::timeout(BOUND, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: not taken within {BOUND:?}"))
        .expect("worker alive")
}

/// `INFO clients` → `connected_clients` of a (private) server.
fn connected_clients(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("clients").query(conn).expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("connected_clients")
}

/// The `CLIENT LIST` lines of connections named `name`.
fn clients_named(conn: &mut redis::Connection, name: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(conn)
        .expect("client list");
    let field = format!(" name={name} ");
    list.lines()
        .filter(|l| l.contains(&field))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until `check` holds for the bell readers of `engine`.
async fn until_bells(
    engine: &Distributed,
    what: &str,
    check: impl Fn(&[runlane::BellReader]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let bells = engine.bells().await;
        if check(&bells) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: bells are {bells:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_of_another_process_takes_runs_through_its_lane_bell() {
    let deployment = Deployment::new("bells_take", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let base = format!("{{{}}}", deployment.prefix);

    // A named-lane chain: B's reader blocks on the `reports` bell only.
    let (filter, mut started) = reporting_worker(&b, "reports:1").await;
    let bells = b.bells().await;
    assert_eq!(bells.len(), 1, "{bells:?}");
    assert_eq!(bells[0].keys, vec![format!("{base}:db:reports")]);
    for i in 0..5 {
        let run = trigger(&a, "reports").await;
        assert_eq!(taken(&mut started, &format!("reports run {i}")).await, run);
        assert_completed(&a, run).await;
    }
    let wakes = b.bells().await[0].wakes;
    assert!(wakes >= 5, "each run rang B's bell: {wakes} wakes");
    filter.stop().await;
    until_bells(&b, "the last consumer of a chain ends its reader", |r| {
        r.is_empty()
    })
    .await;

    // A wildcard chain: B's reader blocks on the `*` bell, rung for every lane.
    let (wildcard, mut started) = reporting_worker(&b, "*:1").await;
    let bells = b.bells().await;
    assert_eq!(bells.len(), 1, "{bells:?}");
    assert_eq!(bells[0].keys, vec![format!("{base}:db:*")]);
    for (i, lane) in ["other", "reports", "other"].into_iter().enumerate() {
        let run = trigger(&a, lane).await;
        assert_eq!(taken(&mut started, &format!("{lane} run {i}")).await, run);
        assert_completed(&a, run).await;
    }
    assert!(b.bells().await[0].wakes >= 3);
    wildcard.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blocking_connection_per_distinct_chain_whatever_the_number_of_runs() {
    let server = PrivateRedis::start("bells-conns");
    let deployment = Deployment::new("bells_conns", server.url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let admin = redis::Client::open(server.url()).expect("private url");
    let mut admin = admin.get_connection().expect("admin connection");

    // Five workers, three distinct chains: `reports` (twice), `other>reports`, wildcards
    // (`*` and `manual>*` read the same `*` bell).
    let mut workers = Vec::new();
    let mut receivers = Vec::new();
    for spec in [
        "reports:2",
        "reports:1",
        "other>reports:1",
        "*:1",
        "manual>*:1",
    ] {
        let (w, rx) = reporting_worker(&b, spec).await;
        workers.push(w);
        receivers.push(rx);
    }
    let bells = b.bells().await;
    assert_eq!(
        bells.iter().map(|r| r.chain.as_str()).collect::<Vec<_>>(),
        vec!["F>other>reports", "F>reports", "P"],
    );
    assert_eq!(bells.iter().map(|r| r.consumers).sum::<usize>(), 5);
    let named = clients_named(&mut admin, b.bell_client_name());
    assert_eq!(
        named.len(),
        3,
        "one blocking connection per distinct chain: {named:#?}"
    );
    assert!(
        clients_named(&mut admin, a.bell_client_name()).is_empty(),
        "A has no workers"
    );

    // A first run warms every lazily made connection up.
    let run = trigger(&a, "reports").await;
    assert_completed(&a, run).await;
    let before = connected_clients(&mut admin);

    let mut runs = Vec::new();
    for i in 0..500 {
        let lane = ["reports", "other", "manual", "default"][i % 4];
        runs.push(trigger(&a, lane).await);
    }
    for run in &runs {
        assert_completed(&a, *run).await;
    }
    assert_eq!(
        connected_clients(&mut admin),
        before,
        "500 runs open no connection"
    );
    assert_eq!(clients_named(&mut admin, b.bell_client_name()).len(), 3);

    for w in workers {
        w.stop().await;
    }
    until_bells(&b, "stopped workers end their readers", |r| r.is_empty()).await;
    assert!(
        clients_named(&mut admin, b.bell_client_name()).is_empty(),
        "the readers' connections are closed with them"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bell_connection_is_reestablished_and_idle_workers_wake_again() {
    let server = PrivateRedis::start("bells-kill");
    let deployment = Deployment::new("bells_kill", server.url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let admin = redis::Client::open(server.url()).expect("private url");
    let mut admin = admin.get_connection().expect("admin connection");

    let (worker, mut started) = reporting_worker(&b, "reports:1").await;
    let run = trigger(&a, "reports").await;
    assert_eq!(taken(&mut started, "before the kill").await, run);
    assert_completed(&a, run).await;
    assert_eq!(b.bells().await[0].connects, 1);

    // Kill B's bell connection (only it).
    let named = clients_named(&mut admin, b.bell_client_name());
    assert_eq!(named.len(), 1, "{named:#?}");
    let id = named[0]
        .split(' ')
        .find_map(|f| f.strip_prefix("id="))
        .expect("client id")
        .to_string();
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query(&mut admin)
        .expect("client kill");
    assert_eq!(killed, 1);

    // B's idle workloop takes the next run (its reader reconnected, then resynced or rang).
    let run = trigger(&a, "reports").await;
    assert_eq!(taken(&mut started, "after the kill").await, run);
    assert_completed(&a, run).await;
    until_bells(&b, "the reader reconnects", |r| {
        r.len() == 1 && r[0].connects == 2 && r[0].connected
    })
    .await;

    // And the bell alone wakes it again, over the new connection.
    let wakes = b.bells().await[0].wakes;
    let run = trigger(&a, "reports").await;
    assert_eq!(taken(&mut started, "over the new connection").await, run);
    assert_completed(&a, run).await;
    assert!(b.bells().await[0].wakes > wakes, "the new connection rang");
    let named = clients_named(&mut admin, b.bell_client_name());
    assert_eq!(named.len(), 1, "one connection again: {named:#?}");
    assert_ne!(
        named[0].split(' ').find_map(|f| f.strip_prefix("id=")),
        Some(id.as_str()),
        "a new connection"
    );

    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_one_lane_does_not_ring_a_process_that_only_claims_another() {
    let deployment = Deployment::new("bells_only", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;

    let (x_worker, mut x_started) = reporting_worker(&a, "x:1").await;
    let (y_worker, mut y_started) = reporting_worker(&b, "y:1").await;
    for i in 0..20 {
        let run = trigger(&a, "x").await;
        assert_eq!(taken(&mut x_started, &format!("x run {i}")).await, run);
        assert_completed(&a, run).await;
    }
    let y = b.bells().await;
    assert_eq!(y.len(), 1, "{y:?}");
    assert_eq!(y[0].wakes, 0, "lane x never rang B's lane y bell");

    // Lane y rings it: once.
    let run = trigger(&a, "y").await;
    assert_eq!(taken(&mut y_started, "the y run").await, run);
    assert_completed(&a, run).await;
    assert_eq!(b.bells().await[0].wakes, 1, "one ready run in y, one ring");
    assert!(y_started.try_recv().is_err());
    assert!(x_started.try_recv().is_err());

    x_worker.stop().await;
    y_worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_rings_every_bell_after_the_loss_even_with_nothing_to_re_enqueue() {
    let server = PrivateRedis::start("bells-rebuild");
    let deployment = Deployment::new("bells_rebuild", server.url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let admin = redis::Client::open(server.url()).expect("private url");
    let mut admin = admin.get_connection().expect("admin connection");
    let bell = format!("{{{}}}:db:reports", deployment.prefix);
    let newest = |conn: &mut redis::Connection| -> Option<(u64, u64)> {
        let v: redis::Value = redis::cmd("XREVRANGE")
            .arg(&bell)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(conn)
            .expect("xrevrange");
        let redis::Value::Array(entries) = v else {
            return None;
        };
        let redis::Value::Array(entry) = entries.first()? else {
            return None;
        };
        let redis::Value::BulkString(id) = entry.first()? else {
            return None;
        };
        let id = String::from_utf8(id.clone()).ok()?;
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    };

    // B's reader has heard the `reports` bell once.
    let (worker, mut started) = reporting_worker(&b, "reports:1").await;
    let run = trigger(&a, "reports").await;
    assert_eq!(taken(&mut started, "before the loss").await, run);
    assert_completed(&a, run).await;
    let before = newest(&mut admin).expect("the bell has an entry");
    let wakes = b.bells().await[0].wakes;
    assert!(wakes >= 1);

    // The key space is lost with no run unfinished: the rebuild re-enqueues nothing, yet its
    // last call rings every bell with an id after the loss, and B's reader hears it.
    server.flushall();
    a.queue().snapshot().await.expect("snapshot (rebuilds)");
    assert_eq!(a.health().await.redis_backend.rebuilds, 1);
    let after = newest(&mut admin).expect("the rebuild rang the bell");
    assert!(after > before, "{after:?} after {before:?}");
    until_bells(&b, "B hears the rebuild's ring", |r| {
        r.len() == 1 && r[0].wakes > wakes
    })
    .await;

    // And the bell works on: the next run reaches B's idle workloop.
    let run = trigger(&a, "reports").await;
    assert_eq!(taken(&mut started, "after the rebuild").await, run);
    assert_completed(&a, run).await;
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Every non-blocking call of a process goes over one multiplexed connection (the queue's
/// scripts, the publisher, the timer lead, the metadata cache): besides it, a process holds
/// only its subscriptions (the `timer`/`events` channels, the metadata announcements) and one
/// bell reader per chain, however many runs it triggers and executes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_other_traffic_of_a_process_shares_one_connection() {
    let server = PrivateRedis::start("bells-shared");
    let deployment = Deployment::new("bells_shared", server.url());
    let admin = redis::Client::open(server.url()).expect("private url");
    let mut admin = admin.get_connection().expect("admin connection");
    let alone = connected_clients(&mut admin);

    let engine = deployment.open(true).await;
    let (worker, mut rx) = reporting_worker(&engine, "reports:4").await;
    // A first run makes every lazily made connection (the metadata cache's included).
    let run = trigger(&engine, "reports").await;
    taken(&mut rx, "warm-up").await;
    assert_completed(&engine, run).await;
    until_bells(&engine, "the reader is connected", |r| {
        r.len() == 1 && r[0].connected
    })
    .await;
    let opened = connected_clients(&mut admin) - alone;
    // 1 shared + 2 subscriptions (channels, metadata announcements) + 1 bell reader.
    assert_eq!(
        opened,
        4,
        "one shared connection, two subscriptions, one bell reader: {:#?}",
        redis::cmd("CLIENT")
            .arg("LIST")
            .query::<String>(&mut admin)
            .expect("client list")
    );
    let mut runs = Vec::new();
    for _ in 0..200 {
        runs.push(trigger(&engine, "reports").await);
    }
    for run in &runs {
        assert_completed(&engine, *run).await;
    }
    assert_eq!(
        connected_clients(&mut admin) - alone,
        opened,
        "200 runs open none"
    );
    worker.stop().await;
    engine.shutdown().await;
}

/// A worker of `b` on every lane, one slot, that reports each run it starts with its payload.
async fn payload_worker(
    b: &Distributed,
) -> (runlane::Worker, mpsc::UnboundedReceiver<(RunId, String)>) {
    let (tx, started) = mpsc::unbounded_channel();
    let worker = b
        .worker()
        .workloops("*:1")
        .lease(reporting::LEASE)
        .handler("job", move |ctx: runlane::RunContext| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((ctx.run_id(), ctx.payload_text().to_string()));
                Ok::<_, runlane::HandlerError>(serde_json::Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, started)
}

/// Triggers `payload` on `a` (due after `delay`) once `b`'s workloop waits idle; answers the run
/// once `b` started it with that payload.
async fn trigger_for_idle(
    a: &Distributed,
    b: &Distributed,
    started: &mut mpsc::UnboundedReceiver<(RunId, String)>,
    payload: serde_json::Value,
    delay: Option<Duration>,
) -> RunId {
    redis_support::until_idle_offers(b, 1, "B's workloop idle").await;
    let mut trigger = a.trigger("job").payload(&payload);
    if let Some(delay) = delay {
        trigger = trigger.delay(delay);
    }
    let run = trigger.send().await.expect("trigger").run.id;
    let (got, text) = tokio::time::timeout(BOUND, started.recv())
        .await
        .expect("started in time")
        .expect("worker alive");
    assert_eq!(got, run);
    assert_eq!(
        text,
        payload.to_string(),
        "the payload it was triggered with"
    );
    assert_completed(a, run).await;
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_of_another_process_reads_a_run_ahead_while_it_claims_it() {
    let deployment = Deployment::new("bells_ahead", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let (worker, mut started) = payload_worker(&b).await;
    let before = b.metrics();
    assert_eq!((before.read_ahead, before.read_ahead_used), (0, 0));
    // Each run that comes due while B's workloop waits is named by its bell (a timer's call
    // made it ready, not an enqueue that could lease it for B's parked offer): B reads it from
    // the store while its claim is on the way, and starts it from that read.
    for i in 0..5 {
        let payload = serde_json::json!({ "i": i });
        trigger_for_idle(
            &a,
            &b,
            &mut started,
            payload,
            Some(Duration::from_millis(20)),
        )
        .await;
    }
    let m = b.metrics();
    assert_eq!((m.read_ahead, m.read_ahead_used), (5, 5), "{m:?}");
    assert_eq!(m.claimed_delivered, 0, "{m:?}");
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_of_another_process_starts_a_run_the_trigger_leased_for_it() {
    let deployment = Deployment::new("bells_parked", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let (worker, mut started) = payload_worker(&b).await;
    // Each run A triggers while B's workloop waits is leased in A's enqueue for the offer B's
    // empty claim parked, and delivered on the bells with its payload: B starts it without a
    // claim call of its own and without reading it.
    for i in 0..5 {
        let payload = serde_json::json!({ "i": i });
        trigger_for_idle(&a, &b, &mut started, payload, None).await;
    }
    let m = b.metrics();
    assert_eq!((m.claimed_delivered, m.claimed), (5, 5), "{m:?}");
    assert_eq!((m.read_ahead, m.read_ahead_used), (0, 5), "{m:?}");
    // A payload too large to send goes with no hand-over: B reads the run it was leased.
    let large = serde_json::json!({ "blob": "x".repeat(20 << 10) });
    trigger_for_idle(&a, &b, &mut started, large, None).await;
    let m = b.metrics();
    assert_eq!((m.claimed_delivered, m.read_ahead_used), (6, 5), "{m:?}");
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A worker of `b` on every lane, two slots, whose handlers report their run and then wait
/// until the returned sender says `true`.
async fn held_worker(
    b: &Distributed,
) -> (
    runlane::Worker,
    mpsc::UnboundedReceiver<RunId>,
    tokio::sync::watch::Sender<bool>,
) {
    let (tx, started) = mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let worker = b
        .worker()
        .workloops("*:2")
        .lease(reporting::LEASE)
        .handler("job", move |ctx: runlane::RunContext| {
            let tx = tx.clone();
            let mut release = release.clone();
            async move {
                let _ = tx.send(ctx.run_id());
                let _ = release.wait_for(|r| *r).await;
                Ok::<_, runlane::HandlerError>(serde_json::Value::Null)
            }
        })
        .start()
        .await
        .expect("worker");
    (worker, started, release_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_lease_runs_once_while_its_workloop_parks_again() {
    let deployment = Deployment::new("bells_heard", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let (worker, mut started, release_tx) = held_worker(&b).await;
    // The first run is delivered to B's parked offer and keeps its slot; the workloop's next
    // claim (parking the other slot) must not answer that lease again: it heard of it.
    redis_support::until_idle_offers(&b, 1, "B's workloop idle").await;
    let first = trigger(&a, "default").await;
    assert_eq!(taken(&mut started, "the first run").await, first);
    redis_support::until_idle_offers(&b, 1, "B's other slot offered").await;
    let second = trigger(&a, "default").await;
    assert_eq!(taken(&mut started, "the second run").await, second);
    release_tx.send(true).expect("release");
    assert_completed(&a, first).await;
    assert_completed(&a, second).await;
    assert!(started.try_recv().is_err(), "each run started once");
    assert_eq!(b.metrics().claimed_delivered, 2, "{:?}", b.metrics());
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_executing_here_is_not_read_ahead() {
    let deployment = Deployment::new("bells_busy", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let (worker, mut started, release_tx) = held_worker(&b).await;
    redis_support::until_idle_offers(&b, 1, "B's workloop idle").await;
    let run = trigger(&a, "default").await;
    assert_eq!(taken(&mut started, "the run").await, run);
    // One slot runs it, the other waits idle: a hint naming the executing run reads nothing
    // (a late bell of its trigger); one naming a run not here is read.
    redis_support::until_idle_offers(&b, 1, "B's workloop idle").await;
    let before = b.metrics().read_ahead;
    let lanes = [runlane::core::LaneName::default_lane()];
    b.read_ahead(&lanes, &[run]);
    assert_eq!(b.metrics().read_ahead, before, "the run executes here");
    let elsewhere = RunId(run.0 + 1);
    b.read_ahead(&lanes, &[elsewhere]);
    assert_eq!(b.metrics().read_ahead, before + 1);
    release_tx.send(true).expect("release");
    assert_completed(&a, run).await;
    worker.stop().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_bell_readers_ended_parks_no_more_offers() {
    let deployment = Deployment::new("bells_deaf", redis_support::url());
    let a = deployment.open(true).await;
    let b = deployment.open(false).await;
    let offers_key = format!("{{{}}}:of", deployment.prefix);
    let mut conn = redis::Client::open(deployment.url.as_str())
        .expect("redis url")
        .get_connection()
        .expect("redis connection");
    let mut parked = move || -> u64 {
        redis::cmd("HLEN")
            .arg(&offers_key)
            .query(&mut conn)
            .expect("hlen")
    };
    // A short lease: the idle workloop refreshes its parked offer every quarter second.
    let (worker, mut rx) = reporting_worker_leasing(&b, "*:1", Duration::from_secs(2)).await;
    redis_support::until_idle_offers(&b, 1, "B's workloop idle").await;
    assert_eq!(parked(), 1, "the idle workloop's offer is parked in Redis");
    let b_engine: runlane::Engine = (*b).clone();
    // B's shape handle is dropped without shutdown: its doorbell readers end while the worker
    // (holding the engine) runs on. A lease another process's enqueue made for B's offer would
    // be delivered on a bell nobody reads, so the workloop's next claim takes the offer back
    // and parks none again.
    drop(b);
    let deadline = tokio::time::Instant::now() + BOUND;
    while parked() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's workloop still parks an offer {BOUND:?} after its readers ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Deaf to A's bells, B's idle workloop still claims at each refresh (every quarter
    // second with this lease): a run A triggers now (no worker of A, no offer parked to lease
    // it for) is left ready and taken there.
    let run = a.trigger("job").send().await.expect("trigger").run.id;
    assert_eq!(
        taken(&mut rx, "the run of a process with no worker").await,
        run
    );
    assert_completed(&a, run).await;
    assert_eq!(parked(), 0, "B parked no offer again");
    worker.stop().await;
    // B's triggers still lease for other processes' parked offers (their readers deliver):
    // a run B triggers while A's worker waits idle goes to A's offer in B's enqueue.
    let (a_worker, mut rx) = reporting_worker(&a, "*:1").await;
    redis_support::until_idle_offers(&a, 1, "A's workloop idle").await;
    let before = a.metrics().claimed_delivered;
    let run = b_engine
        .trigger("job")
        .send()
        .await
        .expect("trigger")
        .run
        .id;
    assert_eq!(taken(&mut rx, "B's run").await, run);
    assert_eq!(
        a.metrics().claimed_delivered,
        before + 1,
        "A started B's run from the lease B's enqueue made for A's parked offer"
    );
    a_worker.stop().await;
    a.shutdown().await;
}
