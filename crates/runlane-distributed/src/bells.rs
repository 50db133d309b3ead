//! Per-lane doorbells across processes. An engine rings its own lanes' doorbells when a queue
//! call makes runs ready, but a worker in another process never hears those. So every dispatch
//! call that made lanes ready also adds an entry, in the same atomic call, to a Redis stream per
//! lane, `{prefix}:db:<lane>`, and to `{prefix}:db:*` (its `l` field names the lanes), each
//! trimmed to one entry (`MAXLEN 1`: at most one stream node, ≤ 4.7 KB, per lane, not per
//! run). A rebuild of a lost key space adds an entry to every bell (see `dispatch.lua`).
//!
//! Each distinct claim chain of this process has one reader task with its own dedicated
//! connection (never the shared multiplexed one, no response timeout): it blocks in `XREAD`
//! on the bells of its chain (a filter chain: its named lanes; a wildcard chain: the `*` bell,
//! rung for every lane) from the last ids it saw, and rings the lanes it hears in this
//! process's engine. Streams are broadcast and a reader that passes its last id never misses a
//! later entry (with one entry kept, the newest is still returned for any older id), so the
//! workloop's order "arm the engine's bells, claim, wait" stays race-free across processes:
//!
//! - the reader's last ids are read before `register_consumer` returns, so every entry added
//!   after that is heard; a run made ready before it is found by the workloop's first claim;
//! - a ring is delivered after the entry was added, hence after the run became ready: a
//!   workloop that claimed before that had armed its bells already and is woken.
//!
//! An entry may also deliver leases an enqueue made for workloops' offers parked in Redis (an
//! `o` field: see `RedisQueue::deliveries`; the entry also rings the lanes of those runs, as
//! every entry rings: one that rang nothing could hide an older unread one): the reader hands
//! each delivery to `Engine::offer_delivered` before it rings, so the workloop whose offer it
//! was starts the runs at once. A delivery missed (trimmed, or heard while the workloop was not
//! waiting on that offer) is not lost: the ring wakes the workloop, whose next claim takes its
//! offer back with those leases.
//!
//! The reader ends when the last consumer of its chain unregisters, or when the shape shuts
//! down. A lost connection is re-established with backoff; then the last ids are read again
//! and the engine resyncs (`Engine::resync_after_gap`: idle workloops claim once), since
//! entries may have been added and trimmed in between.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use runlane_core::backend::{ConsumerId, Effects};
use runlane_core::chain::ClaimChain;
use runlane_core::{LaneName, RunId};
use runlane_engine::WeakEngine;
use runlane_redis::{Delivery, RedisQueue};

/// How long one `XREAD` blocks before it is sent again (no claim, no ring: it only proves the
/// connection is alive).
const BLOCK: Duration = Duration::from_secs(30);

/// How much longer than [`BLOCK`] an `XREAD` may take before its connection counts as dead (a
/// peer gone without a reset never answers).
const BLOCK_GRACE: Duration = Duration::from_secs(10);

/// How long a (re)connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The first and the longest wait before connecting again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What one reader task has done, for [`crate::Distributed::bells`].
#[derive(Default)]
struct ReaderStats {
    /// `XREAD` answers that carried entries (each rang the lanes it named).
    wakes: AtomicU64,
    /// Connections made (the first one included).
    connects: AtomicU64,
    connected: AtomicBool,
}

/// One reader task of a chain, and how many consumers of this process use it.
struct Reader {
    users: usize,
    keys: Vec<String>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ReaderStats>,
}

#[derive(Default)]
struct State {
    /// By chain text (`P`, or `F>a>b`).
    readers: HashMap<String, Reader>,
    /// The chain text of each registered consumer.
    consumers: HashMap<u64, String>,
    closed: bool,
}

/// A reader of one chain's doorbells, as [`crate::Distributed::bells`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BellReader {
    /// The chain (`P…` for a wildcard chain, `F>…` for a filter chain).
    pub chain: String,
    /// The bell streams its `XREAD` blocks on.
    pub keys: Vec<String>,
    /// Consumers of this process with this chain.
    pub consumers: usize,
    /// `XREAD` answers that carried entries (each rang the lanes they named).
    pub wakes: u64,
    /// Connections made (the first one included: a reconnect makes it 2 or more).
    pub connects: u64,
    /// Whether its connection is up now.
    pub connected: bool,
}

/// The doorbell readers of one process.
pub(crate) struct Bells {
    client: redis::Client,
    base: String,
    client_name: String,
    engine: Arc<OnceLock<WeakEngine>>,
    state: tokio::sync::Mutex<State>,
    /// Set once the readers are ended for good (shutdown, or the shape's handle dropped).
    ended: AtomicBool,
}

impl Drop for Bells {
    fn drop(&mut self) {
        for reader in self.state.get_mut().readers.values() {
            reader.task.abort();
        }
    }
}

impl Bells {
    /// Readers on `client` for the key base `base`; their connections are named
    /// `client_name` (`CLIENT SETNAME`).
    pub(crate) fn new(client: redis::Client, base: &str, client_name: String) -> Self {
        Bells {
            client,
            base: base.to_string(),
            client_name,
            engine: Arc::new(OnceLock::new()),
            state: tokio::sync::Mutex::new(State::default()),
            ended: AtomicBool::new(false),
        }
    }

    /// Whether the readers still hear the bells: false from [`Bells::close`] or
    /// [`Bells::abort_all`] on (when the latter finds the readers' lock held it ends none and
    /// they run until the queue is dropped; the answer is false all the same, so the process's
    /// workloops claim at each refresh without needing to). A lease another process delivers
    /// on a bell is only heard while they run.
    pub(crate) fn reading(&self) -> bool {
        !self.ended.load(Ordering::Acquire)
    }

    /// The engine whose doorbells the readers ring (set once it is open; no workloop exists
    /// before, so nothing is lost by rings heard earlier).
    pub(crate) fn set_engine(&self, engine: WeakEngine) {
        let _ = self.engine.set(engine);
    }

    /// The connection name of the readers (`CLIENT LIST` shows it).
    pub(crate) fn client_name(&self) -> &str {
        &self.client_name
    }

    /// A consumer of `chain` was registered: starts the chain's reader when it is the first,
    /// with its last ids read before this returns (see the module docs). A reader that cannot
    /// connect now starts anyway and resyncs the engine once it does.
    pub(crate) async fn join(&self, consumer: ConsumerId, chain: &ClaimChain) {
        let text = chain_text(chain);
        let mut state = self.state.lock().await;
        if state.closed {
            return;
        }
        state.consumers.insert(consumer.0, text.clone());
        if let Some(reader) = state.readers.get_mut(&text) {
            reader.users += 1;
            return;
        }
        let bells = BellKeys::of(&self.base, chain);
        let stats = Arc::new(ReaderStats::default());
        let link = connect(&self.client, &self.client_name, &bells.keys).await;
        if link.is_some() {
            stats.connects.fetch_add(1, Ordering::Relaxed);
            stats.connected.store(true, Ordering::Relaxed);
        }
        let keys = bells.keys.clone();
        let task = tokio::spawn(read(ReadTask {
            client: self.client.clone(),
            name: self.client_name.clone(),
            bells,
            engine: self.engine.clone(),
            stats: stats.clone(),
            link,
        }));
        state.readers.insert(
            text,
            Reader {
                users: 1,
                keys,
                task,
                stats,
            },
        );
    }

    /// A consumer was unregistered: the last one of a chain ends the chain's reader (its
    /// connection closes with it).
    pub(crate) async fn leave(&self, consumer: ConsumerId) {
        let mut state = self.state.lock().await;
        let Some(text) = state.consumers.remove(&consumer.0) else {
            return;
        };
        let last = state.readers.get_mut(&text).is_some_and(|reader| {
            reader.users = reader.users.saturating_sub(1);
            reader.users == 0
        });
        if last {
            if let Some(reader) = state.readers.remove(&text) {
                reader.task.abort();
            }
        }
    }

    /// Ends every reader (shutdown); later registrations start none.
    pub(crate) async fn close(&self) {
        self.ended.store(true, Ordering::Release);
        let mut state = self.state.lock().await;
        state.closed = true;
        state.consumers.clear();
        for (_, reader) in state.readers.drain() {
            reader.task.abort();
        }
    }

    /// Ends every reader now if no registration is under way (a dropped shape handle; the
    /// rest end with the queue).
    pub(crate) fn abort_all(&self) {
        self.ended.store(true, Ordering::Release);
        if let Ok(mut state) = self.state.try_lock() {
            state.closed = true;
            for (_, reader) in state.readers.drain() {
                reader.task.abort();
            }
        }
    }

    /// The readers running now, by chain.
    pub(crate) async fn readers(&self) -> Vec<BellReader> {
        let state = self.state.lock().await;
        let mut out: Vec<BellReader> = state
            .readers
            .iter()
            .map(|(chain, r)| BellReader {
                chain: chain.clone(),
                keys: r.keys.clone(),
                consumers: r.users,
                wakes: r.stats.wakes.load(Ordering::Relaxed),
                connects: r.stats.connects.load(Ordering::Relaxed),
                connected: r.stats.connected.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.chain.cmp(&b.chain));
        out
    }
}

/// A chain's identity among readers: wildcard chains all read the `*` bell only.
fn chain_text(chain: &ClaimChain) -> String {
    if chain.is_wildcard() {
        return "P".to_string();
    }
    let mut s = String::from("F");
    let mut lanes: Vec<&str> = chain.named().iter().map(LaneName::as_str).collect();
    lanes.sort_unstable();
    for lane in lanes {
        s.push('>');
        s.push_str(lane);
    }
    s
}

/// The bell streams of one chain and the lane each one rings (`None`: the `*` bell, whose
/// entries name their lanes).
struct BellKeys {
    keys: Vec<String>,
    lanes: Vec<Option<LaneName>>,
}

impl BellKeys {
    fn of(base: &str, chain: &ClaimChain) -> Self {
        if chain.is_wildcard() {
            // Every ready lane rings the `*` bell: a wildcard chain needs no other.
            return BellKeys {
                keys: vec![format!("{base}:db:*")],
                lanes: vec![None],
            };
        }
        let mut named: Vec<LaneName> = chain.named().to_vec();
        named.sort();
        named.dedup();
        BellKeys {
            keys: named.iter().map(|l| format!("{base}:db:{l}")).collect(),
            lanes: named.into_iter().map(Some).collect(),
        }
    }
}

/// A reader's connection and the last id it saw of each bell.
struct Link {
    conn: redis::aio::MultiplexedConnection,
    ids: Vec<String>,
}

/// A dedicated connection (named, no response timeout: it blocks), and the newest id of each
/// bell (`0-0` for a bell not created yet).
async fn connect(client: &redis::Client, name: &str, keys: &[String]) -> Option<Link> {
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
    let attempt = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async::<()>(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
        }
        let newest: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let ids = newest
            .iter()
            .map(|v| {
                entries(v)
                    .last()
                    .map_or_else(|| "0-0".to_string(), |(id, _)| id.clone())
            })
            .collect();
        Ok::<_, redis::RedisError>(Link { conn, ids })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt).await {
        Ok(Ok(link)) => Some(link),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "doorbell connection failed");
            None
        }
        Err(_) => None,
    }
}

struct ReadTask {
    client: redis::Client,
    name: String,
    bells: BellKeys,
    /// The engine, once open.
    engine: Arc<OnceLock<WeakEngine>>,
    stats: Arc<ReaderStats>,
    link: Option<Link>,
}

/// Blocks on the chain's bells and rings what it hears, until aborted or the engine is gone.
async fn read(mut task: ReadTask) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut link = match task.link.take() {
            Some(link) => link,
            None => {
                match connect(&task.client, &task.name, &task.bells.keys).await {
                    Some(link) => {
                        backoff = BACKOFF_MIN;
                        task.stats.connects.fetch_add(1, Ordering::Relaxed);
                        task.stats.connected.store(true, Ordering::Relaxed);
                        // Entries added while no connection was up may be trimmed: idle
                        // workloops claim once (and waits re-read the store).
                        match engine_of(&task) {
                            Ok(Some(engine)) => engine.resync_after_gap(),
                            Ok(None) => {}
                            Err(Gone) => return,
                        }
                        link
                    }
                    None => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("BLOCK")
                .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(u64::MAX))
                .arg("STREAMS")
                .arg(&task.bells.keys)
                .arg(&link.ids);
            let answer = tokio::time::timeout(
                BLOCK + BLOCK_GRACE,
                cmd.query_async::<redis::Value>(&mut link.conn),
            )
            .await;
            let value = match answer {
                Ok(Ok(value)) => value,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "doorbell read failed; reconnecting");
                    break;
                }
                Err(_) => {
                    tracing::debug!("doorbell read got no answer; reconnecting");
                    break;
                }
            };
            let mut lanes: Vec<LaneName> = Vec::new();
            let mut hinted: Vec<RunId> = Vec::new();
            let mut delivered: Vec<Delivery> = Vec::new();
            for (key, stream) in streams(&value) {
                let Some(i) = task.bells.keys.iter().position(|k| k.as_bytes() == key) else {
                    continue;
                };
                let Some((id, fields)) = entries(stream).pop() else {
                    continue;
                };
                link.ids[i] = id;
                match &task.bells.lanes[i] {
                    Some(lane) => lanes.push(lane.clone()),
                    None => lanes.extend(named_lanes(&fields)),
                }
                hinted.extend(hinted_runs(&fields));
                delivered.extend(deliveries(&fields));
            }
            if lanes.is_empty() && delivered.is_empty() {
                // The block expired (or a `*` entry named no lane): block again.
                continue;
            }
            task.stats.wakes.fetch_add(1, Ordering::Relaxed);
            lanes.sort();
            lanes.dedup();
            hinted.sort_unstable();
            hinted.dedup();
            match engine_of(&task) {
                Ok(Some(engine)) => {
                    // Leases made for workloops here start before any workloop wakes (one
                    // heard twice, on two of its chain's bells, is taken once).
                    for d in delivered {
                        engine.offer_delivered((d.consumer, d.seq), d.runs);
                    }
                    if !lanes.is_empty() {
                        // The read goes out before the workloops wake to claim.
                        engine.read_ahead(&lanes, &hinted);
                        engine
                            .apply_effects(Effects {
                                ready_lanes: lanes,
                                ..Effects::default()
                            })
                            .await;
                    }
                }
                Ok(None) => {}
                Err(Gone) => return,
            }
        }
        task.stats.connected.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The engine is gone: the reader ends.
struct Gone;

/// The engine of a reader task: `None` before it is open (no workloop exists yet).
fn engine_of(task: &ReadTask) -> Result<Option<runlane_engine::Engine>, Gone> {
    match task.engine.get() {
        None => Ok(None),
        Some(weak) => weak.upgrade().map(Some).ok_or(Gone),
    }
}

/// The `(key, entries)` pairs of an `XREAD` answer (RESP2 array or RESP3 map).
fn streams(value: &redis::Value) -> Vec<(&[u8], &redis::Value)> {
    match value {
        redis::Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                redis::Value::Array(pair) => match pair.as_slice() {
                    [redis::Value::BulkString(key), entries] => Some((key.as_slice(), entries)),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| match k {
                redis::Value::BulkString(key) => Some((key.as_slice(), v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A stream entry's fields, values as bytes (a hint holds binary run ids).
type Fields = Vec<(String, Vec<u8>)>;

/// The `(id, fields)` entries of a stream answer, oldest first.
fn entries(value: &redis::Value) -> Vec<(String, Fields)> {
    let redis::Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let redis::Value::Array(entry) = item else {
                return None;
            };
            let [id, fields] = entry.as_slice() else {
                return None;
            };
            let id = text(id)?;
            let pairs = match fields {
                redis::Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|p| match p {
                        [k, v] => Some((text(k)?, bytes(v)?)),
                        _ => None,
                    })
                    .collect(),
                redis::Value::Map(map) => map
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, bytes(v)?)))
                    .collect(),
                _ => Vec::new(),
            };
            Some((id, pairs))
        })
        .collect()
}

fn text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bytes(value: &redis::Value) -> Option<Vec<u8>> {
    match value {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// The lanes a `*` bell entry names (its `l` field, comma-separated).
fn named_lanes(fields: &[(String, Vec<u8>)]) -> Vec<LaneName> {
    fields
        .iter()
        .filter(|(k, _)| k == "l")
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|l| LaneName::new(l).ok())
        .collect()
}

/// The leases a bell entry delivers for parked offers (its `o` field); a malformed one is
/// logged and skipped (the workloop's next claim answers those leases).
fn deliveries(fields: &[(String, Vec<u8>)]) -> Vec<Delivery> {
    fields
        .iter()
        .filter(|(k, _)| k == "o")
        .filter_map(|(_, v)| match RedisQueue::deliveries(v) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable delivery on a doorbell");
                None
            }
        })
        .flatten()
        .collect()
}

/// The runs a bell entry's hint names (its `h` field: 16-byte run ids, concatenated; a
/// field of another length names none).
fn hinted_runs(fields: &[(String, Vec<u8>)]) -> Vec<RunId> {
    fields
        .iter()
        .filter(|(k, v)| k == "h" && v.len() % 16 == 0)
        .flat_map(|(_, v)| v.chunks_exact(16))
        .filter_map(|c| <[u8; 16]>::try_from(c).ok().map(RunId::from_bytes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_chains_read_their_lanes_and_wildcards_the_star_bell() {
        let filter = ClaimChain::parse("chain", "b>a").expect("chain");
        let keys = BellKeys::of("{p}", &filter);
        assert_eq!(keys.keys, vec!["{p}:db:a", "{p}:db:b"]);
        assert_eq!(chain_text(&filter), "F>a>b");
        let wildcard = ClaimChain::parse("chain", "a>*").expect("chain");
        assert_eq!(BellKeys::of("{p}", &wildcard).keys, vec!["{p}:db:*"]);
        assert_eq!(
            chain_text(&wildcard),
            chain_text(&ClaimChain::default_chain())
        );
    }

    #[test]
    fn an_xread_answer_names_its_streams_entries_and_lanes() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let answer = redis::Value::Array(vec![redis::Value::Array(vec![
            bulk("{p}:db:*"),
            redis::Value::Array(vec![redis::Value::Array(vec![
                bulk("5-1"),
                redis::Value::Array(vec![bulk("l"), bulk("a,b_2,bad lane")]),
            ])]),
        ])]);
        let found = streams(&answer);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, b"{p}:db:*");
        let e = entries(found[0].1);
        assert_eq!(e[0].0, "5-1");
        let lanes: Vec<String> = named_lanes(&e[0].1)
            .iter()
            .map(|l| l.as_str().to_string())
            .collect();
        assert_eq!(lanes, vec!["a", "b_2"]);
    }

    #[test]
    fn a_hint_names_whole_run_ids_only() {
        let ids: Vec<u8> = [RunId(7), RunId(u128::MAX)]
            .iter()
            .flat_map(|r| r.to_bytes())
            .collect();
        let fields = vec![("r".to_string(), b"1".to_vec()), ("h".to_string(), ids)];
        assert_eq!(hinted_runs(&fields), vec![RunId(7), RunId(u128::MAX)]);
        let torn = vec![("h".to_string(), vec![0u8; 17])];
        assert!(hinted_runs(&torn).is_empty(), "not a whole number of ids");
        assert!(hinted_runs(&[]).is_empty());
    }
}
