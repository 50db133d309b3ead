//! The in-memory queue backend: the rules of `docs/dispatch.md` under one mutex.
//!
//! Every trait method takes the lock once and does its whole step inside it, so each step is
//! atomic exactly as the Redis scripts will be. Indexes keep the hot paths cheap: per queue key a
//! score-ordered set, per lane and env a `ready_seq`-ordered map, per env the set of queues with
//! backlog, and one ordered set per kind of deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use runlane_core::idhash::IdBuild;

use async_trait::async_trait;
use runlane_core::admission::{admit, AdmissionInput, Blocked, Scope};
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    FencedEnd, LaneInfo, Lapsed, LeaseInfo, LeaseState, Leased, LiveRun, Placement, QueueBackend,
    QueueInfo, Tick,
};
use runlane_core::run::{transition, Event, RetryTarget};
use runlane_core::score::{score, Score};
use runlane_core::{
    ClaimChain, EnvName, EnvSettings, FencingToken, LaneName, QueueError, QueueName, QueueSettings,
    RunId, RunStatus, Timestamp, WorkerId,
};

/// Settings of the in-memory queue backend.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// A ready run whose lane has had no consumer this long returns to its queue (default 5 min).
    pub ready_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            ready_timeout: Duration::from_secs(300),
        }
    }
}

/// The stride numerator of claim fairness: an env of weight `w` advances `STRIDE / w` per run.
const STRIDE: u64 = 1_000_000;

/// The `Retry-After` hint of a refused sync trigger.
const FAST_LANE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The in-memory queue backend (implements [`QueueBackend`]).
pub struct MemoryQueue {
    state: Mutex<State>,
}

#[derive(Debug)]
struct Lease {
    token: FencingToken,
    worker: WorkerId,
    duration: Duration,
    deadline: Timestamp,
    attempt_deadline: Option<Timestamp>,
    cancel_requested_at: Option<Timestamp>,
    cancel_deadline: Option<Timestamp>,
    lapsed: bool,
}

#[derive(Debug)]
enum Place {
    Delayed,
    Queued,
    Ready { seq: u64, at: Timestamp },
    Leased(Lease),
}

#[derive(Debug)]
struct Entry {
    dispatch: Dispatch,
    score: Score,
    place: Place,
}

impl Entry {
    fn status(&self) -> RunStatus {
        match self.place {
            Place::Delayed => RunStatus::Delayed,
            Place::Queued => RunStatus::Queued,
            Place::Ready { .. } => RunStatus::Ready,
            Place::Leased(_) => RunStatus::Executing,
        }
    }

    /// Whether the run holds slots now.
    fn holds_slots(&self) -> bool {
        match &self.place {
            Place::Ready { .. } => true,
            Place::Leased(l) => !l.lapsed,
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct KeyState {
    queued: BTreeSet<Score>,
    delayed: u32,
    running: u32,
    last_served: u64,
}

impl KeyState {
    /// What a missing state reads as: nothing queued, delayed or running. A serve stamp alone
    /// keeps nothing: a key joining its queue's backlog is stamped then.
    fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.delayed == 0 && self.running == 0
    }
}

/// Applies a decrement to a queue key's state (`None` when it has none), then forgets the
/// state if it is left idle ([`KeyState::is_idle`]), so a key whose runs have all ended (a user
/// id as the key) leaves nothing behind. One lookup, and a removal only when idle.
fn decrement_key<R>(
    queue: &mut QueueState,
    key: &str,
    f: impl FnOnce(&mut KeyState) -> R,
) -> Option<R> {
    let state = queue.keys.get_mut(key)?;
    let out = f(state);
    if state.is_idle() {
        queue.keys.remove(key);
    }
    Some(out)
}

#[derive(Debug, Default)]
struct QueueState {
    settings: QueueSettings,
    running: u32,
    last_served: u64,
    keys: HashMap<Arc<str>, KeyState>,
    backlog_keys: BTreeSet<Arc<str>>,
}

#[derive(Debug)]
struct EnvState {
    settings: EnvSettings,
    running: u32,
    fast_lane_running: u32,
    queues: BTreeMap<QueueName, QueueState>,
    backlog_queues: BTreeSet<QueueName>,
}

#[derive(Debug, Default)]
struct LaneState {
    /// Ready runs per env, by `ready_seq`.
    ready: BTreeMap<EnvName, BTreeMap<u64, RunId>>,
    count: u64,
    pass: BTreeMap<EnvName, u64>,
    vtime: u64,
    orphan_since: Timestamp,
    orphaned: bool,
}

/// What one lane offers a claim: of each served env's first eligible ready run, the one of the
/// env with the smallest effective pass (ties: env name), and the smallest of their ready seqs
/// (how a wildcard compares lanes).
struct LanePick<'a> {
    first_seq: u64,
    eff: u64,
    env: &'a EnvName,
    seq: u64,
    run: RunId,
}

fn lane_pick<'a>(
    st: &State,
    lane: &'a LaneState,
    served: &impl Fn(&EnvName) -> Option<u32>,
    eligible: &impl Fn(&State, &EnvName, &RunId) -> bool,
) -> Option<LanePick<'a>> {
    let mut pick: Option<LanePick<'a>> = None;
    for (env, by_seq) in &lane.ready {
        if served(env).is_none() {
            continue;
        }
        let Some((&seq, &run)) = by_seq.iter().find(|(_, run)| eligible(st, env, run)) else {
            continue;
        };
        let eff = lane.pass.get(env).copied().unwrap_or(0).max(lane.vtime);
        match &mut pick {
            None => {
                pick = Some(LanePick {
                    first_seq: seq,
                    eff,
                    env,
                    seq,
                    run,
                })
            }
            Some(p) => {
                p.first_seq = p.first_seq.min(seq);
                if (eff, env) < (p.eff, p.env) {
                    (p.eff, p.env, p.seq, p.run) = (eff, env, seq, run);
                }
            }
        }
    }
    pick
}

#[derive(Debug)]
struct State {
    ready_timeout: Duration,
    envs: BTreeMap<EnvName, EnvState>,
    lanes: BTreeMap<LaneName, LaneState>,
    runs: HashMap<RunId, Entry, IdBuild>,
    delayed: BTreeSet<(Timestamp, RunId)>,
    ttl: BTreeSet<(Timestamp, RunId)>,
    lease_deadlines: BTreeSet<(Timestamp, RunId)>,
    attempt_deadlines: BTreeSet<(Timestamp, RunId)>,
    cancel_deadlines: BTreeSet<(Timestamp, RunId)>,
    consumers: BTreeMap<ConsumerId, ClaimChain>,
    ready_seq: u64,
    token: u64,
    serve_counter: u64,
    consumer_seq: u64,
}

impl MemoryQueue {
    /// An empty backend with the built-in lanes.
    pub fn new(config: MemoryConfig) -> Self {
        let mut lanes = BTreeMap::new();
        for name in LaneName::BUILT_IN {
            if let Ok(lane) = LaneName::new(name) {
                lanes.insert(lane, LaneState::default());
            }
        }
        MemoryQueue {
            state: Mutex::new(State {
                ready_timeout: config.ready_timeout,
                envs: BTreeMap::new(),
                lanes,
                runs: HashMap::default(),
                delayed: BTreeSet::new(),
                ttl: BTreeSet::new(),
                lease_deadlines: BTreeSet::new(),
                attempt_deadlines: BTreeSet::new(),
                cancel_deadlines: BTreeSet::new(),
                consumers: BTreeMap::new(),
                ready_seq: 0,
                token: 0,
                serve_counter: 0,
                consumer_seq: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this file (or in the store's write that
        // `end_fenced` makes under it, before this state changes); the state stays usable
        // because every step validates before it mutates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records a status change, checked against the core state machine.
fn moved(effects: &mut Effects, run: RunId, from: RunStatus, ever_leased: bool, event: Event) {
    match transition(from, ever_leased, event) {
        Ok(to) => effects.moved.push((run, to)),
        Err(e) => debug_assert!(false, "illegal transition: {e}"),
    }
}

fn ring(effects: &mut Effects, lane: &LaneName) {
    if !effects.ready_lanes.contains(lane) {
        effects.ready_lanes.push(lane.clone());
    }
}

impl State {
    fn has_consumer(&self, lane: &LaneName) -> bool {
        self.consumers.values().any(|c| c.covers(lane))
    }

    fn admission_input(&self, d: &Dispatch) -> Option<AdmissionInput> {
        let env = self.envs.get(&d.env)?;
        let queue = env.queues.get(&d.queue);
        let key = queue.and_then(|q| q.keys.get(&d.key));
        let qs = queue.map(|q| q.settings).unwrap_or_default();
        Some(AdmissionInput {
            fast_lane: d.lane.is_fast_lane(),
            env_limit: env.settings.limit,
            burst: env.settings.burst,
            fast_lane_limit: env.settings.fast_lane_cap(),
            env_running: env.running,
            fast_lane_running: env.fast_lane_running,
            queue_limit: qs.limit,
            key_running: key.map_or(0, |k| k.running),
            key_total_limit: qs.key_total_limit,
            queue_running: queue.map_or(0, |q| q.running),
            paused: qs.paused,
        })
    }

    fn admission(&self, d: &Dispatch) -> Result<(), Blocked> {
        match self.admission_input(d) {
            Some(input) => admit(&input),
            None => Err(Blocked(Scope::Env)),
        }
    }

    fn take_slots(&mut self, d: &Dispatch) {
        if let Some(env) = self.envs.get_mut(&d.env) {
            if d.lane.is_fast_lane() {
                env.fast_lane_running += 1;
            } else {
                env.running += 1;
            }
            let queue = env.queues.entry(d.queue.clone()).or_default();
            queue.running += 1;
            queue.keys.entry(d.key.clone()).or_default().running += 1;
        }
    }

    fn release_slots(&mut self, d: &Dispatch) {
        if let Some(env) = self.envs.get_mut(&d.env) {
            if d.lane.is_fast_lane() {
                env.fast_lane_running = env.fast_lane_running.saturating_sub(1);
            } else {
                env.running = env.running.saturating_sub(1);
            }
            if let Some(queue) = env.queues.get_mut(&d.queue) {
                queue.running = queue.running.saturating_sub(1);
                decrement_key(queue, &d.key, |k| k.running = k.running.saturating_sub(1));
            }
        }
    }

    /// Puts a run into its queue key (queued).
    fn push_queued(&mut self, run: RunId) {
        let Some(entry) = self.runs.get_mut(&run) else {
            return;
        };
        entry.place = Place::Queued;
        let d = &entry.dispatch;
        let sc = entry.score;
        if let Some(env) = self.envs.get_mut(&d.env) {
            let queue = env.queues.entry(d.queue.clone()).or_default();
            let ks = queue.keys.entry(d.key.clone()).or_default();
            if ks.queued.is_empty() {
                // The key joins its queue's backlog: behind every key served so far (serve
                // numbers are even).
                ks.last_served = self.serve_counter + 1;
            }
            ks.queued.insert(sc);
            queue.backlog_keys.insert(d.key.clone());
            if env.backlog_queues.insert(d.queue.clone()) {
                // The queue joins its env's backlog: behind every queue served so far.
                queue.last_served = self.serve_counter + 1;
            }
        }
    }

    /// Takes a run out of its queue key's queued set.
    fn pull_queued(&mut self, d: &Dispatch, sc: Score) {
        if let Some(env) = self.envs.get_mut(&d.env) {
            if let Some(queue) = env.queues.get_mut(&d.queue) {
                let emptied = decrement_key(queue, &d.key, |k| {
                    k.queued.remove(&sc);
                    k.queued.is_empty()
                });
                if emptied == Some(true) {
                    queue.backlog_keys.remove(&d.key);
                }
                if queue.backlog_keys.is_empty() {
                    env.backlog_queues.remove(&d.queue);
                }
            }
        }
    }

    fn push_delayed(&mut self, run: RunId) {
        let Some(entry) = self.runs.get_mut(&run) else {
            return;
        };
        entry.place = Place::Delayed;
        let d = &entry.dispatch;
        self.delayed.insert((d.run_after, run));
        if let Some(env) = self.envs.get_mut(&d.env) {
            let queue = env.queues.entry(d.queue.clone()).or_default();
            queue.keys.entry(d.key.clone()).or_default().delayed += 1;
        }
    }

    fn pull_delayed(&mut self, d: &Dispatch) {
        self.delayed.remove(&(d.run_after, d.run_id));
        if let Some(queue) = self
            .envs
            .get_mut(&d.env)
            .and_then(|e| e.queues.get_mut(&d.queue))
        {
            decrement_key(queue, &d.key, |k| k.delayed = k.delayed.saturating_sub(1));
        }
    }

    /// Puts an admitted (or fast-pathed) run into its lane, holding slots.
    fn push_ready(&mut self, run: RunId, now: Timestamp, effects: &mut Effects) {
        self.ready_seq += 1;
        let seq = self.ready_seq;
        let Some(entry) = self.runs.get_mut(&run) else {
            return;
        };
        entry.place = Place::Ready { seq, at: now };
        let d = entry.dispatch.clone();
        self.take_slots(&d);
        let lane = self.lanes.entry(d.lane.clone()).or_default();
        lane.ready
            .entry(d.env.clone())
            .or_default()
            .insert(seq, run);
        lane.count += 1;
        ring(effects, &d.lane);
    }

    fn pull_ready(&mut self, d: &Dispatch, seq: u64) {
        if let Some(lane) = self.lanes.get_mut(&d.lane) {
            if let Some(by_seq) = lane.ready.get_mut(&d.env) {
                if by_seq.remove(&seq).is_some() {
                    lane.count = lane.count.saturating_sub(1);
                }
                if by_seq.is_empty() {
                    lane.ready.remove(&d.env);
                }
            }
        }
        self.release_slots(d);
    }

    fn drop_lease_deadlines(&mut self, run: RunId, lease: &Lease) {
        self.lease_deadlines.remove(&(lease.deadline, run));
        if let Some(at) = lease.attempt_deadline {
            self.attempt_deadlines.remove(&(at, run));
        }
        if let Some(at) = lease.cancel_deadline {
            self.cancel_deadlines.remove(&(at, run));
        }
    }

    /// Removes a waiting run from wherever it waits (slots released when ready).
    fn unplace_waiting(&mut self, run: RunId) {
        let Some(entry) = self.runs.get(&run) else {
            return;
        };
        let d = entry.dispatch.clone();
        let sc = entry.score;
        match entry.place {
            Place::Delayed => self.pull_delayed(&d),
            Place::Queued => self.pull_queued(&d, sc),
            Place::Ready { seq, .. } => self.pull_ready(&d, seq),
            Place::Leased(_) => {}
        }
        if let Some(deadline) = d.ttl_deadline {
            self.ttl.remove(&(deadline, run));
        }
    }

    /// The admission pass of `docs/dispatch.md` for one env.
    fn admit_env(&mut self, env_name: &EnvName, now: Timestamp, effects: &mut Effects) {
        loop {
            let Some(env) = self.envs.get(env_name) else {
                return;
            };
            let mut best: Option<(u64, &QueueName, u64, &Arc<str>, RunId)> = None;
            for qname in &env.backlog_queues {
                let Some(queue) = env.queues.get(qname) else {
                    continue;
                };
                for key in &queue.backlog_keys {
                    let Some(ks) = queue.keys.get(key) else {
                        continue;
                    };
                    let Some(head) = ks.queued.first() else {
                        continue;
                    };
                    let Some(entry) = self.runs.get(&head.run_id) else {
                        continue;
                    };
                    let d = &entry.dispatch;
                    if self.lanes.get(&d.lane).is_some_and(|l| l.orphaned) {
                        continue;
                    }
                    let input = AdmissionInput {
                        fast_lane: d.lane.is_fast_lane(),
                        env_limit: env.settings.limit,
                        burst: env.settings.burst,
                        fast_lane_limit: env.settings.fast_lane_cap(),
                        env_running: env.running,
                        fast_lane_running: env.fast_lane_running,
                        queue_limit: queue.settings.limit,
                        key_running: ks.running,
                        key_total_limit: queue.settings.key_total_limit,
                        queue_running: queue.running,
                        paused: queue.settings.paused,
                    };
                    if admit(&input).is_err() {
                        continue;
                    }
                    let cand = (queue.last_served, qname, ks.last_served, key, head.run_id);
                    let better = match &best {
                        None => true,
                        Some(b) => (cand.0, cand.1, cand.2, cand.3) < (b.0, b.1, b.2, b.3),
                    };
                    if better {
                        best = Some(cand);
                    }
                }
            }
            let Some((_, qname, _, key, run)) = best else {
                return;
            };
            let (qname, key) = (qname.clone(), key.clone());
            let Some(entry) = self.runs.get(&run) else {
                return;
            };
            let (d, sc) = (entry.dispatch.clone(), entry.score);
            self.serve_counter += 2;
            let served = self.serve_counter;
            if let Some(queue) = self
                .envs
                .get_mut(env_name)
                .and_then(|e| e.queues.get_mut(&qname))
            {
                queue.last_served = served;
                if let Some(ks) = queue.keys.get_mut(&key) {
                    ks.last_served = served;
                }
            }
            self.pull_queued(&d, sc);
            self.push_ready(run, now, effects);
            moved(effects, run, RunStatus::Queued, d.ever_leased, Event::Admit);
        }
    }

    fn admit_all(&mut self, now: Timestamp, effects: &mut Effects) {
        let names: Vec<EnvName> = self.envs.keys().cloned().collect();
        for env in names {
            self.admit_env(&env, now, effects);
        }
    }

    fn orphan_deadline(&self) -> Option<Timestamp> {
        let mut best: Option<Timestamp> = None;
        for (name, lane) in &self.lanes {
            if lane.count == 0 || self.has_consumer(name) {
                continue;
            }
            for by_seq in lane.ready.values() {
                if let Some((_, run)) = by_seq.first_key_value() {
                    if let Some(Place::Ready { at, .. }) = self.runs.get(run).map(|e| &e.place) {
                        let d = (*at)
                            .max(lane.orphan_since)
                            .saturating_add(self.ready_timeout);
                        best = Some(best.map_or(d, |b| b.min(d)));
                    }
                }
            }
        }
        best
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        [
            self.delayed.first().map(|x| x.0),
            self.ttl.first().map(|x| x.0),
            self.lease_deadlines.first().map(|x| x.0),
            self.attempt_deadlines.first().map(|x| x.0),
            self.cancel_deadlines.first().map(|x| x.0),
            self.orphan_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn finish_effects(&self, mut effects: Effects) -> Effects {
        effects.deadline = self.next_deadline();
        effects
    }

    /// Looks up a leased run; lapsed leases pass only when `allow_lapsed`.
    fn leased(
        &self,
        run: RunId,
        token: FencingToken,
        allow_lapsed: bool,
    ) -> Result<&Entry, QueueError> {
        let entry = self.runs.get(&run).ok_or(QueueError::NotFound(run))?;
        match &entry.place {
            Place::Leased(l) if l.token == token && (allow_lapsed || !l.lapsed) => Ok(entry),
            _ => Err(QueueError::StaleToken(run)),
        }
    }

    /// Acks one leased run: checks its fencing token, ends the lease, forgets the run and admits
    /// the env's next due runs into the slots it freed (`finish` and `finish_many` alike).
    fn finish_one(
        &mut self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
        effects: &mut Effects,
    ) -> Result<(), QueueError> {
        self.leased(run, token, true)?;
        if let Some(d) = self.end_lease(run) {
            self.runs.remove(&run);
            self.admit_env(&d.env, now, effects);
        }
        Ok(())
    }

    /// Ends a lease (removing its deadlines and, unless lapsed, its slots); returns the run's
    /// dispatch facts and whether it was lapsed.
    fn end_lease(&mut self, run: RunId) -> Option<Dispatch> {
        let entry = self.runs.get_mut(&run)?;
        let place = std::mem::replace(&mut entry.place, Place::Queued);
        let d = entry.dispatch.clone();
        if let Place::Leased(lease) = place {
            self.drop_lease_deadlines(run, &lease);
            if !lease.lapsed {
                self.release_slots(&d);
            }
        }
        Some(d)
    }

    /// Places a run that is (again) waiting: delayed when its `run_after` is in the future.
    fn place_waiting(
        &mut self,
        run: RunId,
        now: Timestamp,
        effects: &mut Effects,
        from: RunStatus,
        event_for: fn(bool) -> Event,
    ) {
        let Some(entry) = self.runs.get_mut(&run) else {
            return;
        };
        let d = &entry.dispatch;
        entry.score = score(d.run_after, d.priority, run);
        let delayed = d.run_after > now;
        let ever = d.ever_leased;
        if let Some(deadline) = d.ttl_deadline.filter(|_| !ever) {
            self.ttl.insert((deadline, run));
        }
        if delayed {
            self.push_delayed(run);
        } else {
            self.push_queued(run);
        }
        moved(effects, run, from, ever, event_for(delayed));
    }
}

fn retry_event(delayed: bool) -> Event {
    Event::Fail {
        retry: Some(if delayed {
            RetryTarget::Delayed
        } else {
            RetryTarget::Queued
        }),
    }
}

fn reschedule_event(delayed: bool) -> Event {
    Event::Reschedule { delayed }
}

fn release_event(_delayed: bool) -> Event {
    Event::Release
}

/// Takes up to `request.max` runs out of the chain's lanes and leases them (`claim`, and the
/// claim of `finish_then_claim`).
fn claim_locked(st: &mut State, request: &ClaimRequest, now: Timestamp) -> Vec<Leased> {
    // A worker serves a few envs: a scan of its list costs less than building a map.
    let served = |env: &EnvName| -> Option<u32> {
        request
            .envs
            .iter()
            .find(|s| &s.env == env)
            .map(|s| s.version)
    };
    let eligible = |st: &State, env: &EnvName, run: &RunId| -> bool {
        let Some(version) = served(env) else {
            return false;
        };
        st.runs
            .get(run)
            .is_some_and(|e| e.dispatch.locked_version.is_none_or(|v| v == version))
    };
    let mut out = Vec::new();
    while (out.len() as u32) < request.max {
        // A named lane with an eligible run wins in chain order; past a wildcard, the lane
        // whose eligible run became ready first. No allocation per claim: the pick borrows
        // the state until the env it names is cloned once.
        let mut pick: Option<(&LaneName, LanePick<'_>)> = None;
        for name in request.chain.named() {
            if let Some(p) = st
                .lanes
                .get(name)
                .and_then(|l| lane_pick(st, l, &served, &eligible))
            {
                pick = Some((name, p));
                break;
            }
        }
        if pick.is_none() && request.chain.is_wildcard() {
            for (name, lane) in &st.lanes {
                if lane.count == 0 || request.chain.named().contains(name) {
                    continue;
                }
                if let Some(p) = lane_pick(st, lane, &served, &eligible) {
                    if pick.as_ref().is_none_or(|(_, b)| p.first_seq < b.first_seq) {
                        pick = Some((name, p));
                    }
                }
            }
        }
        let Some((lane_name, p)) = pick else {
            break;
        };
        let (lane_name, env, eff, seq, run) =
            (lane_name.clone(), p.env.clone(), p.eff, p.seq, p.run);
        let weight = st
            .envs
            .get(&env)
            .map_or(1, |e| u64::from(e.settings.weight.max(1)));
        if let Some(lane) = st.lanes.get_mut(&lane_name) {
            lane.vtime = eff;
            let next = eff + STRIDE / weight;
            match lane.pass.get_mut(&env) {
                Some(pass) => *pass = next,
                None => {
                    lane.pass.insert(env.clone(), next);
                }
            }
            if let Some(by_seq) = lane.ready.get_mut(&env) {
                by_seq.remove(&seq);
                if by_seq.is_empty() {
                    lane.ready.remove(&env);
                }
            }
            lane.count = lane.count.saturating_sub(1);
        }
        st.token += 1;
        let token = FencingToken(st.token);
        let Some(entry) = st.runs.get_mut(&run) else {
            break;
        };
        let was_leased = entry.dispatch.ever_leased;
        entry.dispatch.ever_leased = true;
        let deadline = now.saturating_add(request.lease);
        let attempt_deadline = entry.dispatch.max_duration.map(|m| now.saturating_add(m));
        entry.place = Place::Leased(Lease {
            token,
            worker: request.worker,
            duration: request.lease,
            deadline,
            attempt_deadline,
            cancel_requested_at: None,
            cancel_deadline: None,
            lapsed: false,
        });
        let d = entry.dispatch.clone();
        if let (Some(ttl), false) = (d.ttl_deadline, was_leased) {
            st.ttl.remove(&(ttl, run));
        }
        st.lease_deadlines.insert((deadline, run));
        if let Some(at) = attempt_deadline {
            st.attempt_deadlines.insert((at, run));
        }
        out.push(Leased {
            dispatch: d,
            token,
            lease_deadline: deadline,
            attempt_deadline,
        });
    }
    out
}

#[async_trait]
impl QueueBackend for MemoryQueue {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        settings.validate()?;
        let mut st = self.lock();
        match st.envs.get_mut(env) {
            Some(e) => e.settings = settings,
            None => {
                st.envs.insert(
                    env.clone(),
                    EnvState {
                        settings,
                        running: 0,
                        fast_lane_running: 0,
                        queues: BTreeMap::new(),
                        backlog_queues: BTreeSet::new(),
                    },
                );
            }
        }
        let mut effects = Effects::default();
        st.admit_env(env, now, &mut effects);
        Ok(st.finish_effects(effects))
    }

    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        settings.validate()?;
        let mut st = self.lock();
        let e = st
            .envs
            .get_mut(env)
            .ok_or_else(|| QueueError::unknown_env(env))?;
        e.queues.entry(queue.clone()).or_default().settings = settings;
        let mut effects = Effects::default();
        st.admit_env(env, now, &mut effects);
        Ok(st.finish_effects(effects))
    }

    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        let st = self.lock();
        let e = st
            .envs
            .get(env)
            .ok_or_else(|| QueueError::unknown_env(env))?;
        Ok(e.queues.get(queue).map(|q| q.settings).unwrap_or_default())
    }

    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        self.lock().lanes.entry(lane.clone()).or_default();
        Ok(())
    }

    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        Ok(self.lock().lanes.contains_key(lane))
    }

    async fn lanes(&self, _now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        let st = self.lock();
        Ok(st
            .lanes
            .iter()
            .map(|(name, lane)| {
                let consumers = st.consumers.values().filter(|c| c.covers(name)).count() as u32;
                let orphan_since = (consumers == 0 && lane.count > 0).then(|| {
                    let oldest = lane
                        .ready
                        .values()
                        .filter_map(|m| m.first_key_value())
                        .filter_map(|(_, run)| match st.runs.get(run).map(|e| &e.place) {
                            Some(Place::Ready { at, .. }) => Some(*at),
                            _ => None,
                        })
                        .min()
                        .unwrap_or(Timestamp::ZERO);
                    lane.orphan_since.max(oldest)
                });
                LaneInfo {
                    name: name.clone(),
                    ready: lane.count,
                    consumers,
                    orphan_since,
                }
            })
            .collect())
    }

    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        let st = self.lock();
        let e = st
            .envs
            .get(env)
            .ok_or_else(|| QueueError::unknown_env(env))?;
        Ok(e.queues
            .iter()
            .map(|(name, q)| QueueInfo {
                env: env.clone(),
                name: name.clone(),
                delayed: q.keys.values().map(|k| u64::from(k.delayed)).sum(),
                queued: q.keys.values().map(|k| k.queued.len() as u64).sum(),
                running: u64::from(q.running),
                settings: q.settings,
            })
            .collect())
    }

    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        let st = self.lock();
        let e = st
            .envs
            .get(env)
            .ok_or_else(|| QueueError::unknown_env(env))?;
        Ok(EnvUsage {
            running: e.running,
            fast_lane_running: e.fast_lane_running,
        })
    }

    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        let mut st = self.lock();
        let run = dispatch.run_id;
        if let Some(entry) = st.runs.get(&run) {
            let placement = match entry.place {
                Place::Delayed => Placement::Delayed,
                Place::Queued => Placement::Queued,
                Place::Ready { .. } | Place::Leased(_) => Placement::Ready,
            };
            let effects = st.finish_effects(Effects::default());
            return Ok(Enqueued { placement, effects });
        }
        let env = st
            .envs
            .get(&dispatch.env)
            .ok_or_else(|| QueueError::unknown_env(&dispatch.env))?;
        if !st.lanes.contains_key(&dispatch.lane) {
            return Err(QueueError::unknown_lane(&dispatch.lane));
        }
        let fast_path_on = env.settings.fast_path;
        let queue = env.queues.get(&dispatch.queue);
        let key = queue.and_then(|q| q.keys.get(&dispatch.key));
        let backlog = key.is_some_and(|k| !k.queued.is_empty());
        let waiting = key.map_or(0, |k| k.delayed as usize + k.queued.len());
        // The cap limits new work; a run already accepted returns whatever the key holds.
        let max_queued = queue
            .and_then(|q| q.settings.max_queued)
            .filter(|_| why.capped());
        let delayed = dispatch.run_after > now;
        let orphaned = st.lanes.get(&dispatch.lane).is_some_and(|l| l.orphaned);
        let admission = st.admission(&dispatch);
        let fast = !delayed && fast_path_on && !backlog && !orphaned && admission.is_ok();
        if !fast {
            if let Some(max) = max_queued {
                if waiting >= max as usize {
                    return Err(QueueError::QueueFull {
                        queue: dispatch.queue.to_string(),
                        key: dispatch.key.to_string(),
                        max_queued: max,
                    });
                }
            }
        }
        if !delayed && !fast && why.sync() && admission == Err(Blocked(Scope::FastLane)) {
            return Err(QueueError::FastLaneFull {
                env: dispatch.env.to_string(),
                retry_after: FAST_LANE_RETRY_AFTER,
            });
        }
        let ever = dispatch.ever_leased;
        let env_name = dispatch.env.clone();
        let entry = Entry {
            score: score(dispatch.run_after, dispatch.priority, run),
            place: Place::Queued,
            dispatch,
        };
        if let Some(deadline) = entry.dispatch.ttl_deadline.filter(|_| !ever) {
            st.ttl.insert((deadline, run));
        }
        st.runs.insert(run, entry);
        let mut effects = Effects::default();
        let placement = if delayed {
            st.push_delayed(run);
            effects.moved.push((run, RunStatus::Delayed));
            Placement::Delayed
        } else if fast {
            st.push_ready(run, now, &mut effects);
            effects.moved.push((run, RunStatus::Ready));
            Placement::Ready
        } else {
            st.push_queued(run);
            effects.moved.push((run, RunStatus::Queued));
            if !fast_path_on {
                st.admit_env(&env_name, now, &mut effects);
            }
            Placement::Queued
        };
        Ok(Enqueued {
            placement,
            effects: st.finish_effects(effects),
        })
    }

    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        Ok(claim_locked(&mut self.lock(), request, now))
    }

    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(leases.len());
        for &(run, token) in leases {
            let extended = match st.runs.get_mut(&run).map(|e| &mut e.place) {
                Some(Place::Leased(l)) if l.token == token && !l.lapsed => {
                    // Never shortened: a heartbeat that ran late (its `now` older than an
                    // earlier heartbeat's) leaves the later deadline.
                    let old = l.deadline;
                    l.deadline = old.max(now.saturating_add(l.duration));
                    Some((old, l.deadline, l.cancel_requested_at.is_some()))
                }
                _ => None,
            };
            match extended {
                Some((old, new, cancelled)) => {
                    st.lease_deadlines.remove(&(old, run));
                    st.lease_deadlines.insert((new, run));
                    out.push(if cancelled {
                        LeaseState::CancelRequested
                    } else {
                        LeaseState::Alive
                    });
                }
                None => out.push(LeaseState::Lost),
            }
        }
        Ok(out)
    }

    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        self.lock().leased(run, token, false).map(|_| ())
    }

    async fn check_leases(
        &self,
        leases: &[(RunId, FencingToken)],
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        // One lock for the whole batch (the completer checks every completion of a batch).
        let st = self.lock();
        Ok(leases
            .iter()
            .map(|&(run, token)| st.leased(run, token, false).map(|_| ()))
            .collect())
    }

    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let mut st = self.lock();
        let mut effects = Effects::default();
        st.finish_one(run, token, now, &mut effects)?;
        Ok(st.finish_effects(effects))
    }

    /// One lock for a slot's ack and its next claim: the two worker threads of a drain met on
    /// this mutex at every step of a run (lock spinning ~10 % of a drain's samples).
    async fn finish_then_claim(
        &self,
        run: RunId,
        token: FencingToken,
        next: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Effects, Result<Vec<Leased>, QueueError>), QueueError> {
        let mut st = self.lock();
        let mut effects = Effects::default();
        st.finish_one(run, token, now, &mut effects)?;
        let effects = st.finish_effects(effects);
        Ok((effects, Ok(claim_locked(&mut st, next, now))))
    }

    /// The lease check, the store's write and the ack with the slot's next claim under one
    /// lock: the lease check was the drain's most contended step (4 % of its samples spinning
    /// on this mutex, measured), and no lapse can fall between the check and the write.
    fn end_fenced(
        &self,
        run: RunId,
        token: FencingToken,
        next: Option<&ClaimRequest>,
        now: Timestamp,
        write: &mut dyn FnMut() -> bool,
    ) -> Option<Result<FencedEnd, QueueError>> {
        let mut st = self.lock();
        if let Err(e) = st.leased(run, token, false) {
            return Some(Err(e));
        }
        if !write() {
            return Some(Ok(FencedEnd { acked: None }));
        }
        let mut effects = Effects::default();
        let acked = st.finish_one(run, token, now, &mut effects).map(|()| {
            let effects = st.finish_effects(effects);
            (effects, next.map(|next| claim_locked(&mut st, next, now)))
        });
        Some(Ok(FencedEnd { acked: Some(acked) }))
    }

    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let mut st = self.lock();
        st.leased(run, token, true)?;
        let mut effects = Effects::default();
        if let Some(d) = st.end_lease(run) {
            if let Some(entry) = st.runs.get_mut(&run) {
                entry.dispatch.attempt += 1;
                entry.dispatch.run_after = run_after;
            }
            st.place_waiting(run, now, &mut effects, RunStatus::Executing, retry_event);
            st.admit_env(&d.env, now, &mut effects);
        }
        Ok(st.finish_effects(effects))
    }

    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let mut st = self.lock();
        let entry = st.leased(run, token, false)?;
        if matches!(&entry.place, Place::Leased(l) if l.cancel_requested_at.is_some()) {
            return Err(QueueError::CancelRequested(run));
        }
        let mut effects = Effects::default();
        if let Some(d) = st.end_lease(run) {
            // Back to its queue with its original run_after: it keeps its place.
            if let Some(entry) = st.runs.get_mut(&run) {
                entry.score = score(entry.dispatch.run_after, entry.dispatch.priority, run);
            }
            st.push_queued(run);
            moved(
                &mut effects,
                run,
                RunStatus::Executing,
                true,
                release_event(false),
            );
            st.admit_env(&d.env, now, &mut effects);
        }
        Ok(st.finish_effects(effects))
    }

    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        let mut st = self.lock();
        let Some(entry) = st.runs.get_mut(&run) else {
            return Ok(CancelOutcome::NotFound);
        };
        let status = entry.status();
        if let Place::Leased(lease) = &mut entry.place {
            let token = lease.token;
            return Ok(match lease.cancel_deadline {
                Some(grace_deadline) => CancelOutcome::Requested {
                    token,
                    grace_deadline,
                    first: false,
                },
                None => {
                    let grace_deadline = now.saturating_add(grace);
                    lease.cancel_requested_at = Some(now);
                    lease.cancel_deadline = Some(grace_deadline);
                    if !lease.lapsed {
                        st.cancel_deadlines.insert((grace_deadline, run));
                    }
                    CancelOutcome::Requested {
                        token,
                        grace_deadline,
                        first: true,
                    }
                }
            });
        }
        let env = entry.dispatch.env.clone();
        st.unplace_waiting(run);
        st.runs.remove(&run);
        let mut effects = Effects::default();
        if status == RunStatus::Ready {
            st.admit_env(&env, now, &mut effects);
        }
        Ok(CancelOutcome::Removed {
            was: status,
            effects: st.finish_effects(effects),
        })
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let mut st = self.lock();
        let entry = st.runs.get(&run).ok_or(QueueError::NotFound(run))?;
        let status = entry.status();
        if !matches!(status, RunStatus::Delayed | RunStatus::Queued) {
            return Err(QueueError::WrongState {
                run,
                status,
                operation: "reschedule",
            });
        }
        let env = entry.dispatch.env.clone();
        st.unplace_waiting(run);
        if let Some(entry) = st.runs.get_mut(&run) {
            entry.dispatch.run_after = run_after;
            entry.dispatch.ttl_deadline = ttl_deadline;
        }
        let mut effects = Effects::default();
        st.place_waiting(run, now, &mut effects, status, reschedule_event);
        st.admit_env(&env, now, &mut effects);
        Ok(st.finish_effects(effects))
    }

    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        let mut st = self.lock();
        let mut tick = Tick::default();
        let mut effects = Effects::default();
        // 1. Delayed runs that came due.
        while let Some(&(at, run)) = st.delayed.first() {
            if at > now {
                break;
            }
            let Some(d) = st.runs.get(&run).map(|e| e.dispatch.clone()) else {
                st.delayed.remove(&(at, run));
                continue;
            };
            st.pull_delayed(&d);
            st.push_queued(run);
            moved(
                &mut effects,
                run,
                RunStatus::Delayed,
                d.ever_leased,
                Event::Promote,
            );
        }
        // 2. TTL expiry of waiting runs that never held a lease.
        while let Some(&(at, run)) = st.ttl.first() {
            if at > now {
                break;
            }
            let Some(entry) = st.runs.get(&run) else {
                st.ttl.remove(&(at, run));
                continue;
            };
            let d = entry.dispatch.clone();
            st.unplace_waiting(run);
            st.ttl.remove(&(at, run));
            st.runs.remove(&run);
            tick.expired.push(d);
        }
        // Each report of steps 3 to 5 moves its deadline one lease duration on, so a report the
        // engine did not act on (the process that heard it died first) comes again; acting on
        // it ends the lease, and its deadlines with it.
        // 3. Lapsed leases (slots released the first time only).
        let mut again = Vec::new();
        while let Some(&(at, run)) = st.lease_deadlines.first() {
            if at > now {
                break;
            }
            st.lease_deadlines.remove(&(at, run));
            let Some(entry) = st.runs.get_mut(&run) else {
                continue;
            };
            let d = entry.dispatch.clone();
            let Place::Leased(lease) = &mut entry.place else {
                continue;
            };
            let first = !lease.lapsed;
            lease.lapsed = true;
            lease.deadline = now.saturating_add(lease.duration);
            again.push((lease.deadline, run));
            let token = lease.token;
            let (attempt_at, cancel_at) = (lease.attempt_deadline, lease.cancel_deadline);
            if first {
                if let Some(a) = attempt_at {
                    st.attempt_deadlines.remove(&(a, run));
                }
                if let Some(c) = cancel_at {
                    st.cancel_deadlines.remove(&(c, run));
                }
                st.release_slots(&d);
            }
            tick.lapsed.push(Lapsed { dispatch: d, token });
        }
        st.lease_deadlines.extend(again);
        // 4. Attempts past their max duration.
        let mut again = Vec::new();
        while let Some(&(at, run)) = st.attempt_deadlines.first() {
            if at > now {
                break;
            }
            st.attempt_deadlines.remove(&(at, run));
            if let Some(Place::Leased(l)) = st.runs.get_mut(&run).map(|e| &mut e.place) {
                let next = now.saturating_add(l.duration);
                l.attempt_deadline = Some(next);
                again.push((next, run));
                tick.timed_out.push((run, l.token));
            }
        }
        st.attempt_deadlines.extend(again);
        // 5. Cancel grace periods that ended.
        let mut again = Vec::new();
        while let Some(&(at, run)) = st.cancel_deadlines.first() {
            if at > now {
                break;
            }
            st.cancel_deadlines.remove(&(at, run));
            if let Some(Place::Leased(l)) = st.runs.get_mut(&run).map(|e| &mut e.place) {
                let next = now.saturating_add(l.duration);
                l.cancel_deadline = Some(next);
                again.push((next, run));
                tick.cancel_elapsed.push((run, l.token));
            }
        }
        st.cancel_deadlines.extend(again);
        // 6. Ready runs in lanes with no consumer for ready_timeout, in run id order across
        // lanes (like every list of a tick).
        let rt = st.ready_timeout;
        let mut due: Vec<(RunId, u64)> = Vec::new();
        for (name, lane) in &st.lanes {
            if lane.count == 0 || st.has_consumer(name) {
                continue;
            }
            for by_seq in lane.ready.values() {
                for (seq, run) in by_seq {
                    if let Some(Place::Ready { at, .. }) = st.runs.get(run).map(|e| &e.place) {
                        if (*at).max(lane.orphan_since).saturating_add(rt) <= now {
                            due.push((*run, *seq));
                        }
                    }
                }
            }
        }
        due.sort();
        for (run, seq) in due {
            let Some(d) = st.runs.get(&run).map(|e| e.dispatch.clone()) else {
                continue;
            };
            st.pull_ready(&d, seq);
            st.push_queued(run);
            moved(
                &mut effects,
                run,
                RunStatus::Ready,
                d.ever_leased,
                Event::ReadyTimeout,
            );
            tick.ready_returned.push(run);
            if let Some(lane) = st.lanes.get_mut(&d.lane) {
                lane.orphaned = true;
            }
        }
        // 7. Admission for every env.
        st.admit_all(now, &mut effects);
        tick.expired.sort_by_key(|d| d.run_id);
        tick.lapsed.sort_by_key(|l| l.dispatch.run_id);
        tick.timed_out.sort();
        tick.cancel_elapsed.sort();
        tick.ready_returned.sort();
        tick.effects = st.finish_effects(effects);
        Ok(tick)
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        Ok(self.lock().next_deadline())
    }

    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        Ok(self.lock().runs.get(&run).map(live_run))
    }

    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        let st = self.lock();
        let mut out: Vec<LiveRun> = st.runs.values().map(live_run).collect();
        out.sort_by_key(|r| r.dispatch.run_id);
        Ok(out)
    }

    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        let mut st = self.lock();
        st.consumer_seq += 1;
        let id = ConsumerId(st.consumer_seq);
        st.consumers.insert(id, chain.clone());
        for (name, lane) in st.lanes.iter_mut() {
            if chain.covers(name) {
                lane.orphan_since = Timestamp::ZERO;
                lane.orphaned = false;
            }
        }
        let mut effects = Effects::default();
        st.admit_all(now, &mut effects);
        Ok(id)
    }

    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let mut st = self.lock();
        if let Some(chain) = st.consumers.remove(&id) {
            let lost: Vec<LaneName> = st
                .lanes
                .keys()
                .filter(|name| chain.covers(name) && !st.has_consumer(name))
                .cloned()
                .collect();
            for name in lost {
                if let Some(lane) = st.lanes.get_mut(&name) {
                    lane.orphan_since = now;
                }
            }
        }
        Ok(st.finish_effects(Effects::default()))
    }

    fn claims_in_process(&self) -> bool {
        true
    }

    async fn finish_many(
        &self,
        runs: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<(Vec<Result<(), QueueError>>, Effects), QueueError> {
        let mut st = self.lock();
        let mut effects = Effects::default();
        let answers = runs
            .iter()
            .map(|&(run, token)| st.finish_one(run, token, now, &mut effects))
            .collect();
        Ok((answers, st.finish_effects(effects)))
    }
}

fn live_run(entry: &Entry) -> LiveRun {
    let lease = match &entry.place {
        Place::Leased(l) => Some(LeaseInfo {
            token: l.token,
            worker: l.worker,
            deadline: l.deadline,
            cancel_requested_at: l.cancel_requested_at,
            lapsed: l.lapsed,
        }),
        _ => None,
    };
    LiveRun {
        dispatch: entry.dispatch.clone(),
        status: entry.status(),
        lease,
    }
}

impl MemoryQueue {
    /// Recounts every slot counter from the runs and checks them against the maintained ones,
    /// and checks every index entry points at a run in the matching place. Test support: a
    /// mismatch is a bug in this file.
    pub fn check_invariants(&self) -> Result<(), String> {
        let st = self.lock();
        let mut env_running: HashMap<&EnvName, (u32, u32)> = HashMap::new();
        let mut queue_running: HashMap<(&EnvName, &QueueName), u32> = HashMap::new();
        let mut key_running: HashMap<(&EnvName, &QueueName, &str), u32> = HashMap::new();
        for entry in st.runs.values() {
            if entry.holds_slots() {
                let d = &entry.dispatch;
                let e = env_running.entry(&d.env).or_default();
                if d.lane.is_fast_lane() {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
                *queue_running.entry((&d.env, &d.queue)).or_default() += 1;
                *key_running.entry((&d.env, &d.queue, &d.key)).or_default() += 1;
            }
        }
        for (name, env) in &st.envs {
            let (r, f) = env_running.get(name).copied().unwrap_or_default();
            if (env.running, env.fast_lane_running) != (r, f) {
                return Err(format!(
                    "env {name}: counters {}/{} but runs {r}/{f}",
                    env.running, env.fast_lane_running
                ));
            }
            for (qname, q) in &env.queues {
                let want = queue_running.get(&(name, qname)).copied().unwrap_or(0);
                if q.running != want {
                    return Err(format!(
                        "queue {qname}: counter {} but runs {want}",
                        q.running
                    ));
                }
                for (key, ks) in &q.keys {
                    // Spelled out, not `is_idle`: the check must not share the predicate it
                    // checks.
                    if ks.queued.is_empty() && ks.delayed == 0 && ks.running == 0 {
                        return Err(format!("key {qname}/{key}: an idle state is kept"));
                    }
                    let want = key_running
                        .get(&(name, qname, &**key))
                        .copied()
                        .unwrap_or(0);
                    if ks.running != want {
                        return Err(format!(
                            "key {qname}/{key}: counter {} but runs {want}",
                            ks.running
                        ));
                    }
                    for sc in &ks.queued {
                        if !matches!(
                            st.runs.get(&sc.run_id).map(|e| &e.place),
                            Some(Place::Queued)
                        ) {
                            return Err(format!(
                                "queued index holds {} which is not queued",
                                sc.run_id
                            ));
                        }
                    }
                }
            }
        }
        for (_, run) in &st.delayed {
            if !matches!(st.runs.get(run).map(|e| &e.place), Some(Place::Delayed)) {
                return Err(format!("delayed index holds {run} which is not delayed"));
            }
        }
        let queued = st
            .runs
            .values()
            .filter(|e| matches!(e.place, Place::Queued))
            .count();
        let indexed: usize = st
            .envs
            .values()
            .flat_map(|e| e.queues.values())
            .flat_map(|q| q.keys.values())
            .map(|k| k.queued.len())
            .sum();
        if queued != indexed {
            return Err(format!("{queued} queued runs but {indexed} indexed"));
        }
        let ready = st
            .runs
            .values()
            .filter(|e| matches!(e.place, Place::Ready { .. }))
            .count() as u64;
        let in_lanes: u64 = st.lanes.values().map(|l| l.count).sum();
        if ready != in_lanes {
            return Err(format!("{ready} ready runs but {in_lanes} in lanes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::backend::ServedEnv;

    const T0: Timestamp = Timestamp(1_700_000_000_000);
    const T1: Timestamp = Timestamp(1_700_000_000_250);

    fn env(name: &str) -> EnvName {
        EnvName::new(name).expect("valid env")
    }

    fn queue(name: &str) -> QueueName {
        QueueName::new(name).expect("valid queue")
    }

    fn lane(name: &str) -> LaneName {
        LaneName::new(name).expect("valid lane")
    }

    fn dispatch(id: u128, env_name: &str, queue_name: &str, lane_name: &str) -> Dispatch {
        Dispatch::first_attempt(
            RunId(id),
            env(env_name),
            queue(queue_name),
            lane(lane_name),
            T0,
        )
    }

    fn claim_req(envs: &[&str], max: u32, chain: ClaimChain) -> ClaimRequest {
        ClaimRequest {
            worker: WorkerId(1),
            chain,
            max,
            envs: envs
                .iter()
                .map(|e| ServedEnv {
                    env: env(e),
                    version: 0,
                })
                .collect(),
            lease: Duration::from_secs(30),
        }
    }

    async fn backend(limits: &[(&str, u32, u32)]) -> MemoryQueue {
        let q = MemoryQueue::new(MemoryConfig::default());
        for (name, limit, weight) in limits {
            let settings = EnvSettings {
                limit: *limit,
                weight: *weight,
                ..EnvSettings::default()
            };
            q.put_env(&env(name), settings, T0).await.expect("env");
        }
        q
    }

    #[tokio::test]
    async fn fast_path_then_backlog_then_cross_queue_promotion() {
        let q = backend(&[("e", 1, 1)]).await;
        let a = q
            .enqueue(dispatch(1, "e", "qa", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("a");
        assert_eq!(a.placement, Placement::Ready, "empty and open: fast path");
        assert_eq!(a.effects.ready_lanes, vec![lane("default")]);
        let b = q
            .enqueue(dispatch(2, "e", "qb", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("b");
        assert_eq!(b.placement, Placement::Queued, "env full: slow path");
        let leased = q
            .claim(&claim_req(&["e"], 5, ClaimChain::default_chain()), T0)
            .await
            .expect("claim");
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].dispatch.run_id, RunId(1));
        let fx = q
            .finish(RunId(1), leased[0].token, T0)
            .await
            .expect("finish");
        assert_eq!(
            fx.moved,
            vec![(RunId(2), RunStatus::Ready)],
            "A's finish admits B from another queue"
        );
        q.check_invariants().expect("invariants");
    }

    /// Two queues with the same history: an env of one slot, three runs in two queues, the
    /// first claimed (same token on both). Answers them, the claim and the lease's token.
    async fn twin_queues() -> (MemoryQueue, MemoryQueue, ClaimRequest, FencingToken) {
        let (one, two) = (backend(&[("e", 1, 1)]).await, backend(&[("e", 1, 1)]).await);
        let req = claim_req(&["e"], 1, ClaimChain::default_chain());
        let mut first = Vec::new();
        for q in [&one, &two] {
            for (id, queue) in [(1, "qa"), (2, "qb"), (3, "qa")] {
                let d = dispatch(id, "e", queue, "default");
                q.enqueue(d, EnqueueAs::Trigger, T0).await.expect("enqueue");
            }
            first.push(q.claim(&req, T0).await.expect("claim"));
        }
        assert_eq!(first[0], first[1]);
        let token = first[0][0].token;
        (one, two, req, token)
    }

    #[tokio::test]
    async fn a_slot_turn_in_one_step_answers_and_leaves_what_its_two_steps_do() {
        // The same history on two queues: an ack then a claim, as two calls and as one.
        let (one, two, req, token) = twin_queues().await;
        let stale = FencingToken(token.0 + 100);
        let before = one.snapshot().await.expect("snapshot");
        let refused = one.finish_then_claim(RunId(1), stale, &req, T1).await;
        assert!(
            matches!(refused, Err(QueueError::StaleToken(RunId(1)))),
            "{refused:?}"
        );
        assert_eq!(
            one.snapshot().await.expect("snapshot"),
            before,
            "a refused ack claims nothing"
        );

        let (effects, leases) = one
            .finish_then_claim(RunId(1), token, &req, T1)
            .await
            .expect("one step");
        let leases = leases.expect("its claim");
        let fx = two.finish(RunId(1), token, T1).await.expect("ack");
        let claimed = two.claim(&req, T1).await.expect("claim");
        assert_eq!(effects, fx);
        assert_eq!(leases, claimed);
        assert_eq!(leases.len(), 1, "the ack freed the env's one slot");
        let admitted = leases[0].dispatch.run_id;
        assert!(
            effects.moved.contains(&(admitted, RunStatus::Ready)),
            "the claimed run is the one the ack admitted: {effects:?}"
        );
        assert_eq!(
            one.snapshot().await.expect("snapshot"),
            two.snapshot().await.expect("snapshot")
        );
        assert_eq!(
            one.next_deadline().await.expect("deadline"),
            two.next_deadline().await.expect("deadline")
        );
        one.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn a_fenced_end_writes_only_under_a_live_lease_and_acks_as_its_steps_do() {
        // The same history on two queues: the one-step end, and its steps one by one.
        let (one, two, req, token) = twin_queues().await;
        let before = one.snapshot().await.expect("snapshot");

        // A stale token: refused as the lease check refuses it, the write never made.
        let mut writes = 0;
        let stale = FencingToken(token.0 + 100);
        let refused = one.end_fenced(RunId(1), stale, Some(&req), T1, &mut || {
            writes += 1;
            true
        });
        assert!(
            matches!(refused, Some(Err(QueueError::StaleToken(RunId(1))))),
            "{refused:?}"
        );
        assert_eq!(writes, 0, "no write under a stale token");
        assert_eq!(one.snapshot().await.expect("snapshot"), before);

        // A write that fails: no ack, the lease still held.
        let declined = one.end_fenced(RunId(1), token, Some(&req), T1, &mut || {
            writes += 1;
            false
        });
        assert!(
            matches!(declined, Some(Ok(FencedEnd { acked: None }))),
            "{declined:?}"
        );
        assert_eq!(writes, 1);
        assert_eq!(one.snapshot().await.expect("snapshot"), before);
        assert_eq!(one.check_lease(RunId(1), token).await, Ok(()));

        // A write made: the ack and the next claim, as the lease check, finish and claim do.
        let done = one.end_fenced(RunId(1), token, Some(&req), T1, &mut || {
            writes += 1;
            true
        });
        assert_eq!(writes, 2);
        let Some(Ok(FencedEnd {
            acked: Some(Ok((effects, Some(leases)))),
        })) = done
        else {
            panic!("a live lease's end is acked with its claim: {done:?}");
        };
        assert_eq!(two.check_lease(RunId(1), token).await, Ok(()));
        let fx = two.finish(RunId(1), token, T1).await.expect("ack");
        let claimed = two.claim(&req, T1).await.expect("claim");
        assert_eq!(effects, fx);
        assert_eq!(leases, claimed);
        assert_eq!(leases.len(), 1, "the ack freed the env's one slot");
        assert_eq!(
            one.snapshot().await.expect("snapshot"),
            two.snapshot().await.expect("snapshot")
        );

        // Without a claim asked for, none is made; a lapsed lease is refused.
        let token = leases[0].token;
        let run = leases[0].dispatch.run_id;
        let alone = one.end_fenced(run, token, None, T1, &mut || true);
        assert!(
            matches!(
                alone,
                Some(Ok(FencedEnd {
                    acked: Some(Ok((_, None)))
                }))
            ),
            "{alone:?}"
        );
        let third = one.claim(&req, T1).await.expect("claim");
        assert_eq!(third.len(), 1);
        one.tick(T1.saturating_add(Duration::from_secs(60)))
            .await
            .expect("tick");
        let lapsed = one.end_fenced(
            third[0].dispatch.run_id,
            third[0].token,
            None,
            T1,
            &mut || {
                writes += 1;
                true
            },
        );
        assert!(matches!(lapsed, Some(Err(_))), "{lapsed:?}");
        assert_eq!(writes, 2, "no write under a lapsed lease");
        one.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn stale_tokens_and_lapsed_leases() {
        let q = backend(&[("e", 2, 1)]).await;
        q.enqueue(dispatch(1, "e", "q", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("enqueue");
        let l = q
            .claim(&claim_req(&["e"], 1, ClaimChain::default_chain()), T0)
            .await
            .expect("claim");
        let token = l[0].token;
        assert_eq!(
            q.check_lease(RunId(1), FencingToken(token.0 + 1)).await,
            Err(QueueError::StaleToken(RunId(1)))
        );
        let tick = q
            .tick(T0.saturating_add(Duration::from_secs(30)))
            .await
            .expect("tick");
        assert_eq!(tick.lapsed.len(), 1);
        assert_eq!(
            q.env_usage(&env("e")).await.expect("usage").running,
            0,
            "lapse releases slots"
        );
        assert_eq!(
            q.check_lease(RunId(1), token).await,
            Err(QueueError::StaleToken(RunId(1)))
        );
        assert_eq!(
            q.heartbeat(&[(RunId(1), token)], T0).await.expect("hb"),
            vec![LeaseState::Lost]
        );
        q.retry(
            RunId(1),
            token,
            T0,
            T0.saturating_add(Duration::from_secs(30)),
        )
        .await
        .expect("recover");
        let live = q.live(RunId(1)).await.expect("live").expect("held");
        assert_eq!(live.dispatch.attempt, 2);
        q.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn check_leases_answers_per_run_as_check_lease_does() {
        let q = backend(&[("e", 2, 1)]).await;
        q.enqueue(dispatch(1, "e", "q", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("enqueue");
        let l = q
            .claim(&claim_req(&["e"], 1, ClaimChain::default_chain()), T0)
            .await
            .expect("claim");
        let token = l[0].token;
        let asked = [
            (RunId(1), token),
            (RunId(1), FencingToken(token.0 + 1)),
            (RunId(9), token),
        ];
        let answers = q.check_leases(&asked).await.expect("one call");
        let mut one_by_one = Vec::new();
        for &(run, token) in &asked {
            one_by_one.push(q.check_lease(run, token).await);
        }
        assert_eq!(answers, one_by_one);
        assert_eq!(
            answers,
            vec![
                Ok(()),
                Err(QueueError::StaleToken(RunId(1))),
                Err(QueueError::NotFound(RunId(9))),
            ]
        );
    }

    /// The keys the queue holds a state of, over every env and queue, in name order.
    fn key_states(q: &MemoryQueue) -> Vec<String> {
        let st = q.lock();
        let mut keys: Vec<String> = st
            .envs
            .values()
            .flat_map(|e| e.queues.values())
            .flat_map(|q| q.keys.keys())
            .map(|k| k.to_string())
            .collect();
        keys.sort_unstable();
        keys
    }

    #[tokio::test]
    async fn a_key_leaves_no_state_once_its_runs_end() {
        // Limit 2: runs 1-2 take the fast path; run 3 waits in its key's backlog and an
        // admission pass serves it; delayed run 4 is due later (a pass admits it too); run 5
        // is canceled while queued, delayed run 6 before it is due.
        let q = backend(&[("e", 2, 1)]).await;
        let keyed = |n: u128, after: Timestamp| {
            let mut d = dispatch(n, "e", "q", "default");
            d.key = Arc::from(format!("user-{n}"));
            d.run_after = after;
            d
        };
        let later = T0.saturating_add(Duration::from_secs(5));
        let much_later = T0.saturating_add(Duration::from_secs(60));
        for (n, after) in [
            (1, T0),
            (2, T0),
            (3, T0),
            (4, later),
            (5, T0),
            (6, much_later),
        ] {
            q.enqueue(keyed(n, after), EnqueueAs::Trigger, T0)
                .await
                .expect("enqueue");
        }
        assert_eq!(key_states(&q).len(), 6);
        for run in [5, 6] {
            let cancel = q
                .cancel(RunId(run), Duration::ZERO, T0)
                .await
                .expect("cancel");
            assert!(matches!(cancel, CancelOutcome::Removed { .. }));
        }
        assert_eq!(
            key_states(&q),
            vec!["user-1", "user-2", "user-3", "user-4"],
            "a canceled waiting run's key goes with it"
        );
        let req = claim_req(&["e"], 10, ClaimChain::default_chain());
        for _ in 0..2 {
            let leases = q.claim(&req, later).await.expect("claim");
            for l in leases {
                q.finish(l.dispatch.run_id, l.token, later)
                    .await
                    .expect("finish");
            }
            q.tick(later).await.expect("tick");
        }
        // Every run ended: no key keeps a state, whether its run took the fast path (1, 2) or
        // waited and was served by an admission pass (3, 4).
        assert_eq!(q.lock().runs.len(), 0, "every run ended");
        assert_eq!(key_states(&q), Vec::<String>::new());
        q.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn claim_fairness_follows_weights() {
        let q = backend(&[("a", 100, 1), ("b", 100, 3)]).await;
        for i in 0..40u128 {
            let e = if i % 2 == 0 { "a" } else { "b" };
            q.enqueue(dispatch(i + 1, e, "q", "default"), EnqueueAs::Trigger, T0)
                .await
                .expect("enqueue");
        }
        let got = q
            .claim(&claim_req(&["a", "b"], 16, ClaimChain::default_chain()), T0)
            .await
            .expect("claim");
        let from_b = got
            .iter()
            .filter(|l| l.dispatch.env.as_str() == "b")
            .count();
        assert_eq!(got.len(), 16);
        assert_eq!(from_b, 12, "weight 3 vs 1 gets three quarters");
        q.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn ttl_expiry_releases_the_slot_and_admits_the_next() {
        let q = backend(&[("e", 1, 1)]).await;
        let mut first = dispatch(1, "e", "q", "default");
        first.ttl_deadline = Some(T0.saturating_add(Duration::from_secs(5)));
        q.enqueue(first, EnqueueAs::Trigger, T0)
            .await
            .expect("first");
        q.enqueue(dispatch(2, "e", "q", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("second");
        assert_eq!(
            q.next_deadline().await.expect("deadline"),
            Some(T0.saturating_add(Duration::from_secs(5)))
        );
        let tick = q
            .tick(T0.saturating_add(Duration::from_secs(5)))
            .await
            .expect("tick");
        assert_eq!(tick.expired.len(), 1);
        assert_eq!(tick.effects.moved, vec![(RunId(2), RunStatus::Ready)]);
        q.check_invariants().expect("invariants");
    }

    #[tokio::test]
    async fn orphan_lane_returns_runs_and_stops_admitting_into_it() {
        let q = backend(&[("e", 1, 1)]).await;
        q.enqueue(dispatch(1, "e", "q1", "fast_lane"), EnqueueAs::Trigger, T0)
            .await
            .expect("orphan run");
        q.enqueue(dispatch(2, "e", "q2", "default"), EnqueueAs::Trigger, T0)
            .await
            .expect("default run");
        let consumer = q
            .register_consumer(&ClaimChain::Filter(vec![lane("default")]), T0)
            .await
            .expect("consumer");
        let later = T0.saturating_add(Duration::from_secs(300));
        let tick = q.tick(later).await.expect("tick");
        assert_eq!(tick.ready_returned, vec![RunId(1)]);
        let live = q.live(RunId(1)).await.expect("live").expect("held");
        assert_eq!(
            live.status,
            RunStatus::Queued,
            "not re-admitted into its orphaned lane"
        );
        q.unregister_consumer(consumer, later)
            .await
            .expect("unregister");
        q.register_consumer(&ClaimChain::Preference(vec![]), later)
            .await
            .expect("wildcard");
        let live = q.live(RunId(1)).await.expect("live").expect("held");
        assert_eq!(
            live.status,
            RunStatus::Ready,
            "a consumer clears the orphan mark"
        );
        q.check_invariants().expect("invariants");
    }
}
