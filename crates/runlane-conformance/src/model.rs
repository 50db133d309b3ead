//! The reference model of the queue backend: `docs/dispatch.md` written as plainly as possible.
//!
//! [`ModelQueue`] is meant to be *obviously correct and slow*. All state sits in flat `Vec`s
//! under one `Mutex`; every call scans them. Nothing is indexed and no counter is maintained:
//! slot counts are recomputed by scanning the runs each time they are needed. The only shared
//! code is core's pure rules (`admission::admit`, `score::score`, `ttl`, `run::transition`,
//! `ClaimChain::covers`), so a backend and the model can only agree by both following the
//! document. The model-based property test applies the same operations to the model and to a
//! real backend and compares them after every step.
//!
//! Where `docs/dispatch.md` leaves a choice open, the reading taken here is written next to the
//! code as a comment starting with `Reading:`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use runlane_core::admission::{self, AdmissionInput, Blocked, Scope};
use runlane_core::backend::{
    CancelOutcome, ClaimRequest, ConsumerId, Dispatch, Effects, EnqueueAs, Enqueued, EnvUsage,
    LaneInfo, Lapsed, LeaseInfo, LeaseState, Leased, LiveRun, Placement, QueueBackend, QueueInfo,
    Tick,
};
use runlane_core::chain::ClaimChain;
use runlane_core::error::{InvalidInput, QueueError};
use runlane_core::id::{FencingToken, RunId, WorkerId};
use runlane_core::lane::LaneName;
use runlane_core::name::{EnvName, QueueName};
use runlane_core::run::{transition, Event, RetryTarget, RunStatus};
use runlane_core::score::{score, Score};
use runlane_core::settings::{EnvSettings, QueueSettings};
use runlane_core::time::Timestamp;
use runlane_core::ttl;

/// The `Retry-After` hint of a `FastLaneFull` refusal (dispatch.md, enqueue step 6).
pub const FAST_LANE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One run held by the model.
#[derive(Clone, Debug)]
struct ModelRun {
    /// The current dispatch facts (attempt, `run_after`, TTL deadline, `ever_leased` kept live).
    dispatch: Dispatch,
    /// Delayed, queued, ready or executing (a lapsed lease stays executing).
    status: RunStatus,
    /// Position in its lane while ready.
    ready_seq: u64,
    /// When it last became ready.
    ready_at: Timestamp,
    /// The lease while executing.
    lease: Option<ModelLease>,
}

/// A lease as the model holds it.
#[derive(Clone, Debug)]
struct ModelLease {
    token: FencingToken,
    worker: WorkerId,
    deadline: Timestamp,
    duration: Duration,
    /// When the attempt passes its max duration; once reported, when it is reported again.
    attempt_deadline: Option<Timestamp>,
    cancel_requested_at: Option<Timestamp>,
    /// When the cancel grace period ends; once reported, when it is reported again.
    cancel_deadline: Option<Timestamp>,
    lapsed: bool,
}

/// A queue: its settings and its place in its env's round (when the admission pass last served
/// it, or when it last joined the env's backlog, whichever is later).
#[derive(Clone, Debug)]
struct QueueRow {
    env: EnvName,
    name: QueueName,
    settings: QueueSettings,
    last_served: u64,
}

/// A queue key's place in its queue's round: when the admission pass last served it, or when
/// it last joined the backlog (stamped behind every key served so far), whichever is later.
#[derive(Clone, Debug)]
struct KeyRow {
    env: EnvName,
    queue: QueueName,
    key: Arc<str>,
    last_served: u64,
}

/// A lane and its orphan facts.
#[derive(Clone, Debug)]
struct LaneRow {
    name: LaneName,
    /// When it lost its last consumer (`None` stands for dispatch.md's 0: never had one).
    orphan_since: Option<Timestamp>,
    /// Set when tick step 6 returned a run from it; cleared by a covering consumer.
    orphaned: bool,
}

/// Start-time fair queueing state: `pass[lane][env]`.
#[derive(Clone, Debug)]
struct PassRow {
    lane: LaneName,
    env: EnvName,
    pass: u64,
}

/// Start-time fair queueing state: `vtime[lane]`.
#[derive(Clone, Debug)]
struct VtimeRow {
    lane: LaneName,
    vtime: u64,
}

/// The whole model state.
#[derive(Debug)]
struct State {
    ready_timeout: Duration,
    runs: Vec<ModelRun>,
    envs: Vec<(EnvName, EnvSettings)>,
    queues: Vec<QueueRow>,
    keys: Vec<KeyRow>,
    lanes: Vec<LaneRow>,
    passes: Vec<PassRow>,
    vtimes: Vec<VtimeRow>,
    consumers: Vec<(ConsumerId, ClaimChain)>,
    next_ready_seq: u64,
    next_token: u64,
    next_serve: u64,
    next_consumer: u64,
}

/// The reference queue backend. Slow on purpose; see the module documentation.
#[derive(Debug)]
pub struct ModelQueue {
    state: Mutex<State>,
}

impl ModelQueue {
    /// An empty model with the built-in lanes (`default`, `fast_lane`, `manual`). A ready run
    /// whose lane has had no consumer for `ready_timeout` returns to its queue.
    pub fn new(ready_timeout: Duration) -> Self {
        let lanes = [
            LaneName::default_lane(),
            LaneName::fast_lane(),
            LaneName::manual(),
        ]
        .into_iter()
        .map(|name| LaneRow {
            name,
            orphan_since: None,
            orphaned: false,
        })
        .collect();
        ModelQueue {
            state: Mutex::new(State {
                ready_timeout,
                runs: Vec::new(),
                envs: Vec::new(),
                queues: Vec::new(),
                keys: Vec::new(),
                lanes,
                passes: Vec::new(),
                vtimes: Vec::new(),
                consumers: Vec::new(),
                // Both counters start at 1 and only grow (dispatch.md, "State per run").
                next_ready_seq: 1,
                next_token: 1,
                // Serve numbers are even, 2, 4, … (dispatch.md, "Admission pass").
                next_serve: 2,
                // Reading: consumer ids are not fixed by dispatch.md; they start at 1 and grow.
                next_consumer: 1,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a model bug that already failed the test; the
        // state is still readable for the report.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The status `event` leads to; every move of the model goes through core's state machine.
fn next_status(run: &ModelRun, event: Event) -> RunStatus {
    match transition(run.status, run.dispatch.ever_leased, event) {
        Ok(status) => status,
        Err(illegal) => panic!("model bug: run {} {illegal}", run.dispatch.run_id),
    }
}

/// Applies `event` to a run that stays held.
fn apply(run: &mut ModelRun, event: Event) {
    run.status = next_status(run, event);
}

/// Asserts `event` is legal for a run that leaves the model (cancel, expiry).
fn check_removal(run: &ModelRun, event: Event) {
    let to = next_status(run, event);
    assert!(
        to.is_terminal(),
        "model bug: removal of run {} to {to}",
        run.dispatch.run_id
    );
}

fn run_score(run: &ModelRun) -> Score {
    score(
        run.dispatch.run_after,
        run.dispatch.priority,
        run.dispatch.run_id,
    )
}

fn same_key(a: &Dispatch, b: &Dispatch) -> bool {
    a.env == b.env && a.queue == b.queue && a.key == b.key
}

/// A run holds slots while ready or leased with a live (not lapsed) lease.
fn holds_slots(run: &ModelRun) -> bool {
    match run.status {
        RunStatus::Ready => true,
        RunStatus::Executing => run.lease.as_ref().is_some_and(|l| !l.lapsed),
        _ => false,
    }
}

fn push_moved(fx: &mut Effects, run: RunId, status: RunStatus) {
    fx.moved.push((run, status));
}

fn push_lane(fx: &mut Effects, lane: &LaneName) {
    if !fx.ready_lanes.contains(lane) {
        fx.ready_lanes.push(lane.clone());
    }
}

fn unknown(field: &'static str, what: &str) -> QueueError {
    QueueError::Invalid(InvalidInput::new(
        field,
        format!("unknown {field} {what:?}"),
    ))
}

impl State {
    // ---- lookups (all scans) ----

    fn env(&self, env: &EnvName) -> Option<EnvSettings> {
        self.envs
            .iter()
            .find(|(name, _)| name == env)
            .map(|(_, s)| *s)
    }

    fn known_env(&self, env: &EnvName) -> Result<EnvSettings, QueueError> {
        self.env(env).ok_or_else(|| unknown("env", env.as_str()))
    }

    fn queue_settings(&self, env: &EnvName, queue: &QueueName) -> QueueSettings {
        self.queues
            .iter()
            .find(|q| &q.env == env && &q.name == queue)
            .map(|q| q.settings)
            .unwrap_or_default()
    }

    fn queue_last_served(&self, env: &EnvName, queue: &QueueName) -> u64 {
        self.queues
            .iter()
            .find(|q| &q.env == env && &q.name == queue)
            .map_or(0, |q| q.last_served)
    }

    fn key_last_served(&self, env: &EnvName, queue: &QueueName, key: &str) -> u64 {
        self.keys
            .iter()
            .find(|k| &k.env == env && &k.queue == queue && &*k.key == key)
            .map_or(0, |k| k.last_served)
    }

    /// Creates the queue row when missing (default settings).
    fn touch_queue(&mut self, env: &EnvName, queue: &QueueName) -> usize {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| &q.env == env && &q.name == queue)
        {
            return i;
        }
        self.queues.push(QueueRow {
            env: env.clone(),
            name: queue.clone(),
            settings: QueueSettings::default(),
            last_served: 0,
        });
        self.queues.len() - 1
    }

    fn mark_served(&mut self, env: &EnvName, queue: &QueueName, key: &Arc<str>) {
        let serve = self.next_serve;
        self.next_serve += 2;
        let qi = self.touch_queue(env, queue);
        self.queues[qi].last_served = serve;
        self.stamp_key(env, queue, key, serve);
    }

    fn stamp_key(&mut self, env: &EnvName, queue: &QueueName, key: &Arc<str>, stamp: u64) {
        match self
            .keys
            .iter_mut()
            .find(|k| &k.env == env && &k.queue == queue && k.key == *key)
        {
            Some(row) => row.last_served = stamp,
            None => self.keys.push(KeyRow {
                env: env.clone(),
                queue: queue.clone(),
                key: key.clone(),
                last_served: stamp,
            }),
        }
    }

    /// Run `i` just became queued: when no other run of its key is, the key joins its queue's
    /// backlog, stamped one past the last serve number (behind every key served so far, ahead
    /// of every key served later; keys that join between the same two serves go by key text);
    /// when no other run of its queue is, the queue joins its env's backlog, stamped so too.
    fn joined(&mut self, i: usize) {
        if self.runs[i].status != RunStatus::Queued {
            return;
        }
        let d = &self.runs[i].dispatch;
        let others = |same: &dyn Fn(&Dispatch) -> bool| {
            self.runs
                .iter()
                .enumerate()
                .any(|(j, r)| j != i && r.status == RunStatus::Queued && same(&r.dispatch))
        };
        let key_waits = others(&|o| same_key(o, d));
        let queue_waits = others(&|o| o.env == d.env && o.queue == d.queue);
        let (env, queue, key) = (d.env.clone(), d.queue.clone(), d.key.clone());
        let stamp = self.next_serve - 1;
        if !queue_waits {
            let qi = self.touch_queue(&env, &queue);
            self.queues[qi].last_served = stamp;
        }
        if !key_waits {
            self.stamp_key(&env, &queue, &key, stamp);
        }
    }

    fn run_index(&self, run: RunId) -> Option<usize> {
        self.runs.iter().position(|r| r.dispatch.run_id == run)
    }

    fn lane(&self, lane: &LaneName) -> Option<&LaneRow> {
        self.lanes.iter().find(|l| &l.name == lane)
    }

    fn lane_orphaned(&self, lane: &LaneName) -> bool {
        self.lane(lane).is_some_and(|l| l.orphaned)
    }

    fn consumers_of(&self, lane: &LaneName) -> u32 {
        let n = self
            .consumers
            .iter()
            .filter(|(_, chain)| chain.covers(lane))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    // ---- slots, recomputed by scanning ----

    fn env_running(&self, env: &EnvName, fast_lane: bool) -> u32 {
        let n = self
            .runs
            .iter()
            .filter(|r| {
                &r.dispatch.env == env
                    && r.dispatch.lane.is_fast_lane() == fast_lane
                    && holds_slots(r)
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn queue_running(&self, env: &EnvName, queue: &QueueName) -> u32 {
        let n = self
            .runs
            .iter()
            .filter(|r| &r.dispatch.env == env && &r.dispatch.queue == queue && holds_slots(r))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn key_running(&self, d: &Dispatch) -> u32 {
        let n = self
            .runs
            .iter()
            .filter(|r| same_key(&r.dispatch, d) && holds_slots(r))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// `admission::admit` for run `d` against the current counters (an unknown env admits
    /// nothing).
    fn admits(&self, d: &Dispatch) -> Result<(), Blocked> {
        let Some(env) = self.env(&d.env) else {
            return Err(Blocked(Scope::Env));
        };
        let queue = self.queue_settings(&d.env, &d.queue);
        admission::admit(&AdmissionInput {
            fast_lane: d.lane.is_fast_lane(),
            env_limit: env.limit,
            burst: env.burst,
            fast_lane_limit: env.fast_lane_cap(),
            env_running: self.env_running(&d.env, false),
            fast_lane_running: self.env_running(&d.env, true),
            queue_limit: queue.limit,
            key_running: self.key_running(d),
            key_total_limit: queue.key_total_limit,
            queue_running: self.queue_running(&d.env, &d.queue),
            paused: queue.paused,
        })
    }

    // ---- the admission pass ----

    /// `admit_env(env)`: repeated until nothing is admitted.
    fn admit_env(&mut self, env: &EnvName, now: Timestamp, fx: &mut Effects) {
        loop {
            // Step 1: the head (smallest score) of every queue key of the env with queued runs.
            // `heads` is scratch for this one scan, rebuilt every round.
            let mut heads: Vec<usize> = Vec::new();
            for (i, run) in self.runs.iter().enumerate() {
                if run.status != RunStatus::Queued || &run.dispatch.env != env {
                    continue;
                }
                match heads
                    .iter_mut()
                    .find(|h| same_key(&self.runs[**h].dispatch, &run.dispatch))
                {
                    Some(h) => {
                        if run_score(run) < run_score(&self.runs[*h]) {
                            *h = i;
                        }
                    }
                    None => heads.push(i),
                }
            }
            // Skip a key whose head's lane is orphaned or whose head admission refuses.
            heads.retain(|&i| {
                let d = &self.runs[i].dispatch;
                !self.lane_orphaned(&d.lane) && self.admits(d).is_ok()
            });
            // Step 2: least recently served queue (ties: name), then key (ties: key text).
            let pick = heads.into_iter().min_by(|&a, &b| {
                let (da, db) = (&self.runs[a].dispatch, &self.runs[b].dispatch);
                let ka = (
                    self.queue_last_served(env, &da.queue),
                    &da.queue,
                    self.key_last_served(env, &da.queue, &da.key),
                    &da.key,
                );
                let kb = (
                    self.queue_last_served(env, &db.queue),
                    &db.queue,
                    self.key_last_served(env, &db.queue, &db.key),
                    &db.key,
                );
                ka.cmp(&kb)
            });
            let Some(i) = pick else { break };
            // Step 3: admit that head.
            let seq = self.next_ready_seq;
            self.next_ready_seq += 1;
            let run = &mut self.runs[i];
            apply(run, Event::Admit);
            run.ready_seq = seq;
            run.ready_at = now;
            let (id, lane) = (run.dispatch.run_id, run.dispatch.lane.clone());
            let (queue, key) = (run.dispatch.queue.clone(), run.dispatch.key.clone());
            push_moved(fx, id, RunStatus::Ready);
            push_lane(fx, &lane);
            self.mark_served(env, &queue, &key);
        }
    }

    fn admit_all(&mut self, now: Timestamp, fx: &mut Effects) {
        let mut names: Vec<EnvName> = self.envs.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        for env in names {
            self.admit_env(&env, now, fx);
        }
    }

    // ---- deadlines ----

    fn lane_consumed(&self, lane: &LaneName) -> bool {
        self.consumers_of(lane) > 0
    }

    /// When a ready run in a lane with no consumer returns to its queue.
    fn ready_return_at(&self, run: &ModelRun) -> Option<Timestamp> {
        if run.status != RunStatus::Ready || self.lane_consumed(&run.dispatch.lane) {
            return None;
        }
        let since = self
            .lane(&run.dispatch.lane)
            .and_then(|l| l.orphan_since)
            .unwrap_or(Timestamp::ZERO);
        Some(run.ready_at.max(since).saturating_add(self.ready_timeout))
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        let mut all: Vec<Timestamp> = Vec::new();
        for run in &self.runs {
            if run.status == RunStatus::Delayed {
                all.push(run.dispatch.run_after);
            }
            if run.status.is_waiting() && !run.dispatch.ever_leased {
                all.extend(run.dispatch.ttl_deadline);
            }
            // A lapsed lease keeps only its deadline (when it is reported again): lapsing drops
            // its attempt and cancel deadlines (tick steps 4 and 5 look at live leases only).
            if let Some(lease) = run.lease.as_ref() {
                all.push(lease.deadline);
                if !lease.lapsed {
                    all.extend(lease.attempt_deadline);
                    all.extend(lease.cancel_deadline);
                }
            }
            all.extend(self.ready_return_at(run));
        }
        all.into_iter().min()
    }

    fn seal(&self, mut fx: Effects) -> Effects {
        fx.deadline = self.next_deadline();
        fx
    }

    // ---- lease checks ----

    /// The run's index when it is leased with `token` (lapsed allowed when `lapsed_ok`).
    fn leased_with(
        &self,
        run: RunId,
        token: FencingToken,
        lapsed_ok: bool,
    ) -> Result<usize, QueueError> {
        let i = self.run_index(run).ok_or(QueueError::NotFound(run))?;
        match &self.runs[i].lease {
            Some(l) if l.token == token && (lapsed_ok || !l.lapsed) => Ok(i),
            _ => Err(QueueError::StaleToken(run)),
        }
    }

    fn live_run(run: &ModelRun) -> LiveRun {
        LiveRun {
            dispatch: run.dispatch.clone(),
            status: run.status,
            lease: run.lease.as_ref().map(|l| LeaseInfo {
                token: l.token,
                worker: l.worker,
                deadline: l.deadline,
                cancel_requested_at: l.cancel_requested_at,
                lapsed: l.lapsed,
            }),
        }
    }

    // ---- enqueue ----

    fn enqueue(
        &mut self,
        d: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        // 1. A run id already held: no change; answer its current placement (a leased run
        //    answers `Ready`), with empty effects except `deadline`.
        if let Some(i) = self.run_index(d.run_id) {
            let placement = match self.runs[i].status {
                RunStatus::Delayed => Placement::Delayed,
                RunStatus::Queued => Placement::Queued,
                _ => Placement::Ready,
            };
            return Ok(Enqueued {
                placement,
                effects: self.seal(Effects::default()),
            });
        }
        // 2. Unknown env, then unknown lane.
        let Some(env) = self.env(&d.env) else {
            return Err(unknown("env", d.env.as_str()));
        };
        if self.lane(&d.lane).is_none() {
            return Err(unknown("lane", d.lane.as_str()));
        }
        let due = d.run_after <= now;
        let key_has_queued = self
            .runs
            .iter()
            .any(|r| r.status == RunStatus::Queued && same_key(&r.dispatch, &d));
        let admitted = self.admits(&d);
        let fast = due
            && env.fast_path
            && !key_has_queued
            && !self.lane_orphaned(&d.lane)
            && admitted.is_ok();
        // 3. It would wait: the key's cap on delayed + queued runs (new work only: a run
        //    already accepted is never refused by it).
        if !fast && why.capped() {
            let settings = self.queue_settings(&d.env, &d.queue);
            if let Some(max_queued) = settings.max_queued {
                let waiting = self
                    .runs
                    .iter()
                    .filter(|r| {
                        matches!(r.status, RunStatus::Delayed | RunStatus::Queued)
                            && same_key(&r.dispatch, &d)
                    })
                    .count();
                if waiting >= max_queued as usize {
                    return Err(QueueError::QueueFull {
                        queue: d.queue.as_str().to_owned(),
                        key: d.key.to_string(),
                        max_queued,
                    });
                }
            }
        }
        // 6. A due sync run that is not fast-pathed and that the fast-lane row refuses.
        if due && !fast && why.sync() && admitted == Err(Blocked(Scope::FastLane)) {
            return Err(QueueError::FastLaneFull {
                env: d.env.as_str().to_owned(),
                retry_after: FAST_LANE_RETRY_AFTER,
            });
        }
        self.touch_queue(&d.env, &d.queue);
        let mut fx = Effects::default();
        let mut run = ModelRun {
            dispatch: d,
            // The status a run has as it enters; the transitions below start from it.
            status: RunStatus::Delayed,
            ready_seq: 0,
            ready_at: Timestamp::ZERO,
            lease: None,
        };
        // The enqueued run's placement is the first entry of `moved` (dispatch.md, Effects).
        let placement = if !due {
            // 4. Delayed.
            Placement::Delayed
        } else if fast {
            // 5. Fast path: straight to its lane.
            // Reading: it takes a `ready_seq` like any admission but does not touch
            // `last_served`, which belongs to the admission pass.
            apply(&mut run, Event::Promote);
            apply(&mut run, Event::Admit);
            run.ready_seq = self.next_ready_seq;
            self.next_ready_seq += 1;
            run.ready_at = now;
            push_lane(&mut fx, &run.dispatch.lane);
            Placement::Ready
        } else {
            // 7. Queued.
            apply(&mut run, Event::Promote);
            Placement::Queued
        };
        push_moved(&mut fx, run.dispatch.run_id, run.status);
        let env_name = run.dispatch.env.clone();
        self.runs.push(run);
        self.joined(self.runs.len() - 1);
        if placement == Placement::Queued && !env.fast_path {
            // The placement stays `Queued` even when this pass admits the new run at once;
            // `moved` then lists it queued, then ready.
            self.admit_env(&env_name, now, &mut fx);
        }
        Ok(Enqueued {
            placement,
            effects: self.seal(fx),
        })
    }

    // ---- claim ----

    fn eligible(run: &ModelRun, req: &ClaimRequest) -> bool {
        if run.status != RunStatus::Ready {
            return false;
        }
        // Reading: when an env is listed twice, its first entry's version counts.
        match req.envs.iter().find(|s| s.env == run.dispatch.env) {
            None => false,
            Some(served) => run
                .dispatch
                .locked_version
                .is_none_or(|v| v == served.version),
        }
    }

    fn pass(&self, lane: &LaneName, env: &EnvName) -> u64 {
        self.passes
            .iter()
            .find(|p| &p.lane == lane && &p.env == env)
            .map_or(0, |p| p.pass)
    }

    fn vtime(&self, lane: &LaneName) -> u64 {
        self.vtimes
            .iter()
            .find(|v| &v.lane == lane)
            .map_or(0, |v| v.vtime)
    }

    fn claim(&mut self, req: &ClaimRequest, now: Timestamp) -> Vec<Leased> {
        let mut out = Vec::new();
        for _ in 0..req.max {
            // 2. The lane: the first named lane with an eligible run ...
            let mut lane: Option<LaneName> = req
                .chain
                .named()
                .iter()
                .find(|l| {
                    self.runs
                        .iter()
                        .any(|r| &r.dispatch.lane == *l && Self::eligible(r, req))
                })
                .cloned();
            // ... else, for `*`, the other lane whose smallest eligible ready_seq is smallest.
            if lane.is_none() && req.chain.is_wildcard() {
                lane = self
                    .runs
                    .iter()
                    .filter(|r| {
                        Self::eligible(r, req) && !req.chain.named().contains(&r.dispatch.lane)
                    })
                    .min_by_key(|r| r.ready_seq)
                    .map(|r| r.dispatch.lane.clone());
            }
            let Some(lane) = lane else { break };
            // 3. The env: smallest eff = max(pass, vtime) (ties: env name).
            let vtime = self.vtime(&lane);
            let env = self
                .runs
                .iter()
                .filter(|r| r.dispatch.lane == lane && Self::eligible(r, req))
                .map(|r| {
                    (
                        self.pass(&lane, &r.dispatch.env).max(vtime),
                        r.dispatch.env.clone(),
                    )
                })
                .min();
            let Some((eff, env)) = env else { break };
            let weight = u64::from(self.env(&env).map_or(1, |s| s.weight).max(1));
            match self.vtimes.iter_mut().find(|v| v.lane == lane) {
                Some(v) => v.vtime = eff,
                None => self.vtimes.push(VtimeRow {
                    lane: lane.clone(),
                    vtime: eff,
                }),
            }
            let pass = eff + 1_000_000 / weight;
            match self
                .passes
                .iter_mut()
                .find(|p| p.lane == lane && p.env == env)
            {
                Some(p) => p.pass = pass,
                None => self.passes.push(PassRow {
                    lane: lane.clone(),
                    env: env.clone(),
                    pass,
                }),
            }
            // 4. The run: smallest ready_seq of that lane and env.
            let pick = self
                .runs
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.dispatch.lane == lane && r.dispatch.env == env && Self::eligible(r, req)
                })
                .min_by_key(|(_, r)| r.ready_seq)
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            // 5. Lease it.
            let token = FencingToken(self.next_token);
            self.next_token += 1;
            let run = &mut self.runs[i];
            apply(run, Event::Claim);
            run.dispatch.ever_leased = true;
            let lease = ModelLease {
                token,
                worker: req.worker,
                deadline: now.saturating_add(req.lease),
                duration: req.lease,
                attempt_deadline: run.dispatch.max_duration.map(|d| now.saturating_add(d)),
                cancel_requested_at: None,
                cancel_deadline: None,
                lapsed: false,
            };
            // Reading: the `Leased` dispatch is the one stored after the lease, so it says
            // `ever_leased: true`.
            out.push(Leased {
                dispatch: run.dispatch.clone(),
                token,
                lease_deadline: lease.deadline,
                attempt_deadline: lease.attempt_deadline,
            });
            run.lease = Some(lease);
        }
        out
    }

    // ---- releases ----

    fn finish(
        &mut self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let i = self.leased_with(run, token, true)?;
        // The finished run leaves the backend: removals are not listed in `moved`
        // (dispatch.md, Effects); the engine records the terminal status.
        assert_eq!(
            self.runs[i].status,
            RunStatus::Executing,
            "model bug: leased run not executing"
        );
        let removed = self.runs.remove(i);
        let mut fx = Effects::default();
        self.admit_env(&removed.dispatch.env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn retry(
        &mut self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let i = self.leased_with(run, token, true)?;
        let target = if run_after > now {
            RetryTarget::Delayed
        } else {
            RetryTarget::Queued
        };
        let r = &mut self.runs[i];
        apply(
            r,
            Event::Fail {
                retry: Some(target),
            },
        );
        r.lease = None;
        r.dispatch.attempt += 1;
        r.dispatch.run_after = run_after;
        let (status, env) = (r.status, r.dispatch.env.clone());
        self.joined(i);
        let mut fx = Effects::default();
        push_moved(&mut fx, run, status);
        self.admit_env(&env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn release(
        &mut self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let i = self.leased_with(run, token, false)?;
        if self.runs[i]
            .lease
            .as_ref()
            .is_some_and(|l| l.cancel_requested_at.is_some())
        {
            return Err(QueueError::CancelRequested(run));
        }
        let r = &mut self.runs[i];
        apply(r, Event::Release);
        r.lease = None;
        let env = r.dispatch.env.clone();
        self.joined(i);
        let mut fx = Effects::default();
        push_moved(&mut fx, run, RunStatus::Queued);
        self.admit_env(&env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn cancel(&mut self, run: RunId, grace: Duration, now: Timestamp) -> CancelOutcome {
        let Some(i) = self.run_index(run) else {
            return CancelOutcome::NotFound;
        };
        if self.runs[i].lease.is_some() {
            // Reading: a lapsed lease is still in the lease table, so cancelling it answers
            // `Requested` like a live one and records the request; since lapsing dropped its
            // deadlines, the grace end is neither armed nor reported (tick step 5).
            let r = &mut self.runs[i];
            apply(r, Event::Cancel);
            let Some(lease) = r.lease.as_mut() else {
                unreachable!("lease checked above")
            };
            let first = lease.cancel_requested_at.is_none();
            if first {
                lease.cancel_requested_at = Some(now);
                lease.cancel_deadline = Some(now.saturating_add(grace));
            }
            return CancelOutcome::Requested {
                token: lease.token,
                grace_deadline: lease.cancel_deadline.unwrap_or(now),
                first,
            };
        }
        let was = self.runs[i].status;
        check_removal(&self.runs[i], Event::Cancel);
        let removed = self.runs.remove(i);
        let mut fx = Effects::default();
        // Reading: only a ready run's cancel frees slots, so only it runs the admission pass
        // ("cancel or expiry of a ready run"); a queued head's removal waits for the next pass.
        if was == RunStatus::Ready {
            self.admit_env(&removed.dispatch.env, now, &mut fx);
        }
        CancelOutcome::Removed {
            was,
            effects: self.seal(fx),
        }
    }

    fn reschedule(
        &mut self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        let i = self.run_index(run).ok_or(QueueError::NotFound(run))?;
        let r = &mut self.runs[i];
        if !matches!(r.status, RunStatus::Delayed | RunStatus::Queued) {
            return Err(QueueError::WrongState {
                run,
                status: r.status,
                operation: "reschedule",
            });
        }
        apply(
            r,
            Event::Reschedule {
                delayed: run_after > now,
            },
        );
        r.dispatch.run_after = run_after;
        r.dispatch.ttl_deadline = ttl_deadline;
        let (after, env) = (r.status, r.dispatch.env.clone());
        self.joined(i);
        let mut fx = Effects::default();
        // The rescheduled run is listed with its new status even when it did not change
        // (delayed -> delayed), as dispatch.md's Effects section says for reschedule.
        push_moved(&mut fx, run, after);
        self.admit_env(&env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn heartbeat(&mut self, leases: &[(RunId, FencingToken)], now: Timestamp) -> Vec<LeaseState> {
        leases
            .iter()
            .map(|&(run, token)| {
                let lease = self
                    .runs
                    .iter_mut()
                    .filter_map(|r| {
                        if r.dispatch.run_id == run {
                            r.lease.as_mut()
                        } else {
                            None
                        }
                    })
                    .find(|l| l.token == token && !l.lapsed);
                match lease {
                    Some(l) => {
                        l.deadline = l.deadline.max(now.saturating_add(l.duration));
                        if l.cancel_requested_at.is_some() {
                            LeaseState::CancelRequested
                        } else {
                            LeaseState::Alive
                        }
                    }
                    None => LeaseState::Lost,
                }
            })
            .collect()
    }

    // ---- tick ----

    fn tick(&mut self, now: Timestamp) -> Tick {
        let mut tick = Tick::default();
        let mut fx = Effects::default();

        // 1. Delayed runs with run_after <= now -> queued, in (run_after, run_id) order.
        let mut due: Vec<(Timestamp, RunId)> = self
            .runs
            .iter()
            .filter(|r| r.status == RunStatus::Delayed && r.dispatch.run_after <= now)
            .map(|r| (r.dispatch.run_after, r.dispatch.run_id))
            .collect();
        due.sort();
        for (_, id) in due {
            if let Some(i) = self.run_index(id) {
                apply(&mut self.runs[i], Event::Promote);
                self.joined(i);
                push_moved(&mut fx, id, RunStatus::Queued);
            }
        }

        // 2. Waiting runs never leased at their TTL deadline -> removed, reported.
        let mut kept = Vec::with_capacity(self.runs.len());
        for run in std::mem::take(&mut self.runs) {
            if run.status.is_waiting()
                && ttl::is_expired(run.dispatch.ttl_deadline, run.dispatch.ever_leased, now)
            {
                check_removal(&run, Event::Expire);
                tick.expired.push(run.dispatch);
            } else {
                kept.push(run);
            }
        }
        self.runs = kept;

        // 3. Leases at their deadline -> lapsed (slots released once); a lapsed lease still
        //    held at its deadline is reported again.
        // 4. Live leases past their attempt deadline.
        // 5. Live leases past their cancel deadline.
        // Each report moves its deadline one lease duration on: one the engine did not act on
        // (its process died in between) comes again.
        // Steps 3, 4 and 5 touch only the run's own lease, so one pass per step in run order
        // is the same as the document's order.
        for run in &mut self.runs {
            if let Some(l) = run.lease.as_mut() {
                if l.deadline <= now {
                    l.lapsed = true;
                    l.deadline = now.saturating_add(l.duration);
                    tick.lapsed.push(Lapsed {
                        dispatch: run.dispatch.clone(),
                        token: l.token,
                    });
                }
            }
        }
        for run in &mut self.runs {
            if let Some(l) = run.lease.as_mut() {
                if !l.lapsed && l.attempt_deadline.is_some_and(|d| d <= now) {
                    l.attempt_deadline = Some(now.saturating_add(l.duration));
                    tick.timed_out.push((run.dispatch.run_id, l.token));
                }
            }
        }
        for run in &mut self.runs {
            if let Some(l) = run.lease.as_mut() {
                if !l.lapsed && l.cancel_deadline.is_some_and(|d| d <= now) {
                    l.cancel_deadline = Some(now.saturating_add(l.duration));
                    tick.cancel_elapsed.push((run.dispatch.run_id, l.token));
                }
            }
        }

        // 6. Ready runs in lanes with no consumer past max(ready_at, orphan_since) +
        //    ready_timeout -> queued again; their lane becomes orphaned.
        // Reading: dispatch.md gives no order for step 6; they are listed in `moved`
        // (ready -> queued) in run id order, the order of every list in `Tick`, not lane by
        // lane.
        let mut returned: Vec<RunId> = self
            .runs
            .iter()
            .filter(|r| self.ready_return_at(r).is_some_and(|at| at <= now))
            .map(|r| r.dispatch.run_id)
            .collect();
        returned.sort();
        for id in &returned {
            if let Some(i) = self.run_index(*id) {
                apply(&mut self.runs[i], Event::ReadyTimeout);
                self.joined(i);
                let lane = self.runs[i].dispatch.lane.clone();
                if let Some(row) = self.lanes.iter_mut().find(|l| l.name == lane) {
                    row.orphaned = true;
                }
                push_moved(&mut fx, *id, RunStatus::Queued);
            }
        }
        tick.ready_returned = returned;

        // 7. The admission pass for every env, in name order.
        self.admit_all(now, &mut fx);

        tick.expired.sort_by_key(|d| d.run_id);
        tick.lapsed.sort_by_key(|l| l.dispatch.run_id);
        tick.timed_out.sort();
        tick.cancel_elapsed.sort();
        tick.effects = self.seal(fx);
        tick
    }

    // ---- consumers ----

    fn register_consumer(&mut self, chain: &ClaimChain, now: Timestamp) -> ConsumerId {
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        self.consumers.push((id, chain.clone()));
        for lane in &mut self.lanes {
            if chain.covers(&lane.name) {
                lane.orphan_since = None;
                lane.orphaned = false;
            }
        }
        // Reading: the pass runs for every env on every registration, and its admissions
        // are not reported (the method answers only the consumer id).
        let mut fx = Effects::default();
        self.admit_all(now, &mut fx);
        id
    }

    fn unregister_consumer(&mut self, id: ConsumerId, now: Timestamp) -> Effects {
        // Reading: an unknown id changes nothing (idempotent), and only lanes that exist get
        // an orphan clock; a lane added later has never had a consumer (orphan_since = 0).
        if let Some(pos) = self.consumers.iter().position(|(c, _)| *c == id) {
            let (_, chain) = self.consumers.remove(pos);
            let names: Vec<LaneName> = self
                .lanes
                .iter()
                .filter(|l| chain.covers(&l.name))
                .map(|l| l.name.clone())
                .collect();
            for name in names {
                if !self.lane_consumed(&name) {
                    if let Some(row) = self.lanes.iter_mut().find(|l| l.name == name) {
                        row.orphan_since = Some(now);
                    }
                }
            }
        }
        self.seal(Effects::default())
    }

    // ---- settings and views ----

    fn put_env(
        &mut self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        // Reading: invalid settings are refused with the field at fault, changing nothing
        // (a weight of 0 would divide by zero at claim).
        settings.validate()?;
        match self.envs.iter_mut().find(|(n, _)| n == env) {
            Some((_, s)) => *s = settings,
            None => self.envs.push((env.clone(), settings)),
        }
        let mut fx = Effects::default();
        self.admit_env(env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn put_queue(
        &mut self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        // Reading: invalid settings are refused with the field at fault (checked first, as in
        // `put_env`), and a queue belongs to a known env (unknown: `Invalid { field: "env" }`,
        // as for `queue_settings`).
        settings.validate()?;
        if self.env(env).is_none() {
            return Err(unknown("env", env.as_str()));
        }
        let i = self.touch_queue(env, queue);
        self.queues[i].settings = settings;
        let mut fx = Effects::default();
        self.admit_env(env, now, &mut fx);
        Ok(self.seal(fx))
    }

    fn lanes_info(&self) -> Vec<LaneInfo> {
        let mut out: Vec<LaneInfo> = self
            .lanes
            .iter()
            .map(|l| {
                let ready = self
                    .runs
                    .iter()
                    .filter(|r| r.status == RunStatus::Ready && r.dispatch.lane == l.name)
                    .count();
                let consumers = self.consumers_of(&l.name);
                // A lane with no consumer and ready runs reports the later of when it lost its
                // last consumer and its oldest ready run's `ready_at` (dispatch.md, Effects).
                let oldest = self
                    .runs
                    .iter()
                    .filter(|r| r.status == RunStatus::Ready && r.dispatch.lane == l.name)
                    .map(|r| r.ready_at)
                    .min();
                let since = l.orphan_since.unwrap_or(Timestamp::ZERO);
                let orphan_since = oldest.filter(|_| consumers == 0).map(|o| o.max(since));
                LaneInfo {
                    name: l.name.clone(),
                    ready: u64::try_from(ready).unwrap_or(u64::MAX),
                    consumers,
                    orphan_since,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn queues_info(&self, env: &EnvName) -> Vec<QueueInfo> {
        // Reading: a queue exists once `put_queue` or an enqueue named it, and stays listed
        // (by name) after its runs are gone.
        let mut out: Vec<QueueInfo> = self
            .queues
            .iter()
            .filter(|q| &q.env == env)
            .map(|q| {
                let mine = |r: &&ModelRun| r.dispatch.env == q.env && r.dispatch.queue == q.name;
                let count = |f: &dyn Fn(&ModelRun) -> bool| {
                    let n = self.runs.iter().filter(mine).filter(|r| f(r)).count();
                    u64::try_from(n).unwrap_or(u64::MAX)
                };
                QueueInfo {
                    env: q.env.clone(),
                    name: q.name.clone(),
                    delayed: count(&|r| r.status == RunStatus::Delayed),
                    queued: count(&|r| r.status == RunStatus::Queued),
                    running: count(&holds_slots),
                    settings: q.settings,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn env_usage(&self, env: &EnvName) -> EnvUsage {
        EnvUsage {
            running: self.env_running(env, false),
            fast_lane_running: self.env_running(env, true),
        }
    }

    fn snapshot(&self) -> Vec<LiveRun> {
        let mut out: Vec<LiveRun> = self.runs.iter().map(Self::live_run).collect();
        out.sort_by_key(|r| r.dispatch.run_id);
        out
    }
}

#[async_trait]
impl QueueBackend for ModelQueue {
    async fn put_env(
        &self,
        env: &EnvName,
        settings: EnvSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().put_env(env, settings, now)
    }

    async fn put_queue(
        &self,
        env: &EnvName,
        queue: &QueueName,
        settings: QueueSettings,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().put_queue(env, queue, settings, now)
    }

    async fn queue_settings(
        &self,
        env: &EnvName,
        queue: &QueueName,
    ) -> Result<QueueSettings, QueueError> {
        // An unknown env is refused; an unknown queue has the defaults (dispatch.md).
        let state = self.lock();
        state.known_env(env)?;
        Ok(state.queue_settings(env, queue))
    }

    async fn add_lane(&self, lane: &LaneName) -> Result<(), QueueError> {
        let mut state = self.lock();
        if state.lane(lane).is_none() {
            state.lanes.push(LaneRow {
                name: lane.clone(),
                orphan_since: None,
                orphaned: false,
            });
        }
        Ok(())
    }

    async fn has_lane(&self, lane: &LaneName) -> Result<bool, QueueError> {
        Ok(self.lock().lane(lane).is_some())
    }

    async fn lanes(&self, _now: Timestamp) -> Result<Vec<LaneInfo>, QueueError> {
        Ok(self.lock().lanes_info())
    }

    async fn queues(&self, env: &EnvName) -> Result<Vec<QueueInfo>, QueueError> {
        // Reading: like `queue_settings`, `queues` and `env_usage` refuse an unknown env.
        let state = self.lock();
        state.known_env(env)?;
        Ok(state.queues_info(env))
    }

    async fn env_usage(&self, env: &EnvName) -> Result<EnvUsage, QueueError> {
        let state = self.lock();
        state.known_env(env)?;
        Ok(state.env_usage(env))
    }

    async fn enqueue(
        &self,
        dispatch: Dispatch,
        why: EnqueueAs,
        now: Timestamp,
    ) -> Result<Enqueued, QueueError> {
        self.lock().enqueue(dispatch, why, now)
    }

    async fn claim(
        &self,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Vec<Leased>, QueueError> {
        Ok(self.lock().claim(request, now))
    }

    async fn heartbeat(
        &self,
        leases: &[(RunId, FencingToken)],
        now: Timestamp,
    ) -> Result<Vec<LeaseState>, QueueError> {
        Ok(self.lock().heartbeat(leases, now))
    }

    async fn check_lease(&self, run: RunId, token: FencingToken) -> Result<(), QueueError> {
        self.lock().leased_with(run, token, false).map(|_| ())
    }

    async fn finish(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().finish(run, token, now)
    }

    async fn retry(
        &self,
        run: RunId,
        token: FencingToken,
        run_after: Timestamp,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().retry(run, token, run_after, now)
    }

    async fn release(
        &self,
        run: RunId,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().release(run, token, now)
    }

    async fn cancel(
        &self,
        run: RunId,
        grace: Duration,
        now: Timestamp,
    ) -> Result<CancelOutcome, QueueError> {
        Ok(self.lock().cancel(run, grace, now))
    }

    async fn reschedule(
        &self,
        run: RunId,
        run_after: Timestamp,
        ttl_deadline: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        self.lock().reschedule(run, run_after, ttl_deadline, now)
    }

    async fn tick(&self, now: Timestamp) -> Result<Tick, QueueError> {
        Ok(self.lock().tick(now))
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>, QueueError> {
        Ok(self.lock().next_deadline())
    }

    async fn live(&self, run: RunId) -> Result<Option<LiveRun>, QueueError> {
        let state = self.lock();
        Ok(state
            .run_index(run)
            .map(|i| State::live_run(&state.runs[i])))
    }

    async fn snapshot(&self) -> Result<Vec<LiveRun>, QueueError> {
        Ok(self.lock().snapshot())
    }

    async fn register_consumer(
        &self,
        chain: &ClaimChain,
        now: Timestamp,
    ) -> Result<ConsumerId, QueueError> {
        Ok(self.lock().register_consumer(chain, now))
    }

    async fn unregister_consumer(
        &self,
        id: ConsumerId,
        now: Timestamp,
    ) -> Result<Effects, QueueError> {
        Ok(self.lock().unregister_consumer(id, now))
    }
}

#[cfg(test)]
mod tests {
    //! Hand-written scenarios of `docs/dispatch.md`, run against the model alone.

    use super::*;
    use runlane_core::backend::ServedEnv;

    const T0: Timestamp = Timestamp(1_700_000_000_000);

    fn at(secs: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(secs))
    }

    fn env(name: &str) -> EnvName {
        EnvName::new(name).expect("valid env")
    }

    fn queue(name: &str) -> QueueName {
        QueueName::new(name).expect("valid queue")
    }

    fn lane(name: &str) -> LaneName {
        LaneName::new(name).expect("valid lane")
    }

    /// A model driven synchronously, with a minter of run ids.
    struct Harness {
        q: ModelQueue,
        rt: tokio::runtime::Runtime,
        next_id: u128,
    }

    impl Harness {
        fn new() -> Self {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            Harness {
                q: ModelQueue::new(Duration::from_secs(60)),
                rt,
                next_id: 1,
            }
        }

        fn env(&self, name: &str, settings: EnvSettings) {
            self.rt
                .block_on(self.q.put_env(&env(name), settings, T0))
                .expect("put_env");
        }

        fn limit(&self, name: &str, limit: u32, fast_path: bool) {
            self.env(
                name,
                EnvSettings {
                    limit,
                    fast_path,
                    ..EnvSettings::default()
                },
            );
        }

        fn dispatch(&mut self, e: &str, q: &str, l: &str) -> Dispatch {
            let id = RunId(self.next_id);
            self.next_id += 1;
            Dispatch::first_attempt(id, env(e), queue(q), lane(l), T0)
        }

        fn enqueue(&self, d: &Dispatch, now: Timestamp) -> Result<Enqueued, QueueError> {
            self.rt
                .block_on(self.q.enqueue(d.clone(), EnqueueAs::Trigger, now))
        }

        fn trigger(&mut self, e: &str, q: &str, l: &str) -> (RunId, Placement) {
            let d = self.dispatch(e, q, l);
            let placement = self.enqueue(&d, T0).expect("enqueue").placement;
            (d.run_id, placement)
        }

        fn claim(&self, envs: &[&str], chain: ClaimChain, max: u32, now: Timestamp) -> Vec<Leased> {
            let req = ClaimRequest {
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
            };
            self.rt.block_on(self.q.claim(&req, now)).expect("claim")
        }

        fn status(&self, run: RunId) -> Option<RunStatus> {
            self.rt
                .block_on(self.q.live(run))
                .expect("live")
                .map(|r| r.status)
        }

        fn tick(&self, now: Timestamp) -> Tick {
            self.rt.block_on(self.q.tick(now)).expect("tick")
        }

        fn finish(&self, leased: &Leased, now: Timestamp) -> Effects {
            self.rt
                .block_on(self.q.finish(leased.dispatch.run_id, leased.token, now))
                .expect("finish")
        }

        fn usage(&self, e: &str) -> EnvUsage {
            self.rt.block_on(self.q.env_usage(&env(e))).expect("usage")
        }
    }

    fn any_lane() -> ClaimChain {
        ClaimChain::Preference(vec![])
    }

    #[test]
    fn fast_path_goes_straight_to_the_lane_only_without_backlog() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let d = h.dispatch("prod", "email", "default");
        let first = h.enqueue(&d, T0).expect("enqueue");
        assert_eq!(first.placement, Placement::Ready);
        assert_eq!(first.effects.ready_lanes, vec![lane("default")]);
        assert_eq!(first.effects.moved, vec![(d.run_id, RunStatus::Ready)]);
        // The env is full: the next one waits in its queue.
        assert_eq!(h.trigger("prod", "email", "default").1, Placement::Queued);
        // The limit is raised: the queued one is admitted by put_env's pass...
        h.limit("prod", 3, true);
        // ...and a third run is fast-pathed since the key has no queued run again.
        assert_eq!(h.trigger("prod", "email", "default").1, Placement::Ready);
        assert_eq!(h.usage("prod").running, 3);
        // Idempotent by run id: same answer, nothing changes.
        let again = h.enqueue(&d, T0).expect("re-enqueue");
        assert_eq!(again.placement, Placement::Ready);
        assert!(again.effects.moved.is_empty());
        assert_eq!(h.usage("prod").running, 3);
    }

    #[test]
    fn fast_path_off_queues_then_admits_in_the_same_call() {
        let mut h = Harness::new();
        h.limit("prod", 5, false);
        let d = h.dispatch("prod", "email", "default");
        let out = h.enqueue(&d, T0).expect("enqueue");
        assert_eq!(out.placement, Placement::Queued);
        assert_eq!(
            out.effects.moved,
            vec![(d.run_id, RunStatus::Queued), (d.run_id, RunStatus::Ready)]
        );
        assert_eq!(out.effects.ready_lanes, vec![lane("default")]);
        assert_eq!(h.status(d.run_id), Some(RunStatus::Ready));
    }

    #[test]
    fn delayed_runs_are_promoted_at_their_due_time_and_arm_the_deadline() {
        let mut h = Harness::new();
        h.limit("prod", 5, true);
        let mut d = h.dispatch("prod", "email", "default");
        d.run_after = at(10);
        assert_eq!(
            h.enqueue(&d, T0).expect("enqueue").placement,
            Placement::Delayed
        );
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(10))
        );
        assert!(h.tick(at(9)).effects.moved.is_empty());
        let tick = h.tick(at(10));
        assert_eq!(
            tick.effects.moved,
            vec![(d.run_id, RunStatus::Queued), (d.run_id, RunStatus::Ready)]
        );
        assert_eq!(tick.effects.ready_lanes, vec![lane("default")]);
        assert_eq!(
            tick.effects.deadline,
            Some(at(70)),
            "default has no consumer: ready_at + ready_timeout"
        );
    }

    #[test]
    fn admission_is_round_robin_across_queues_then_keys() {
        let mut h = Harness::new();
        h.limit("prod", 1, false);
        // Nothing is admitted while the env limit is 0.
        h.limit("prod", 0, false);
        let mut ids = Vec::new();
        for (q, key) in [
            ("qa", "x"),
            ("qa", "x"),
            ("qa", "y"),
            ("qb", ""),
            ("qb", ""),
        ] {
            let mut d = h.dispatch("prod", q, "default");
            d.key = Arc::from(key);
            assert_eq!(
                h.enqueue(&d, T0).expect("enqueue").placement,
                Placement::Queued
            );
            ids.push(d.run_id);
        }
        h.limit("prod", 1, false);
        let mut order = Vec::new();
        for i in 0..5 {
            let leased = h.claim(&["prod"], any_lane(), 1, at(i));
            assert_eq!(leased.len(), 1, "exactly one run holds the env's slot");
            order.push(leased[0].dispatch.run_id);
            h.finish(&leased[0], at(i));
        }
        // qa (ties by name), qb, qa (key y: never served), qb, qa (key x again).
        assert_eq!(order, vec![ids[0], ids[3], ids[2], ids[4], ids[1]]);
    }

    #[test]
    fn a_release_admits_from_every_queue_blocked_on_the_scope_it_freed() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, pa) = h.trigger("prod", "qa", "default");
        let (b, pb) = h.trigger("prod", "qb", "default");
        assert_eq!((pa, pb), (Placement::Ready, Placement::Queued));
        let leased = h.claim(&["prod"], any_lane(), 3, T0);
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].dispatch.run_id, a);
        assert!(leased[0].dispatch.ever_leased);
        let fx = h.finish(&leased[0], at(1));
        assert_eq!(fx.moved, vec![(b, RunStatus::Ready)], "A's finish starts B");
        assert_eq!(h.status(a), None);
        // The token is now unknown: the run is gone.
        let again = h.rt.block_on(h.q.finish(a, leased[0].token, at(1)));
        assert_eq!(again, Err(QueueError::NotFound(a)));
    }

    #[test]
    fn a_key_at_its_cap_never_blocks_keys_below_it() {
        let mut h = Harness::new();
        h.limit("prod", 10, true);
        h.rt.block_on(h.q.put_queue(
            &env("prod"),
            &queue("q"),
            QueueSettings {
                limit: Some(1),
                ..Default::default()
            },
            T0,
        ))
        .expect("put_queue");
        let mut d1 = h.dispatch("prod", "q", "default");
        d1.key = Arc::from("hot");
        let mut d2 = h.dispatch("prod", "q", "default");
        d2.key = Arc::from("hot");
        let mut d3 = h.dispatch("prod", "q", "default");
        d3.key = Arc::from("cold");
        assert_eq!(h.enqueue(&d1, T0).expect("1").placement, Placement::Ready);
        assert_eq!(h.enqueue(&d2, T0).expect("2").placement, Placement::Queued);
        assert_eq!(h.enqueue(&d3, T0).expect("3").placement, Placement::Ready);
    }

    #[test]
    fn claim_shares_a_lane_by_env_weight() {
        let mut h = Harness::new();
        h.env(
            "light",
            EnvSettings {
                limit: 100,
                weight: 1,
                ..Default::default()
            },
        );
        h.env(
            "heavy",
            EnvSettings {
                limit: 100,
                weight: 3,
                ..Default::default()
            },
        );
        for _ in 0..40 {
            h.trigger("light", "q", "default");
            h.trigger("heavy", "q", "default");
        }
        let mut order = Vec::new();
        for i in 0..40 {
            let leased = h.claim(&["light", "heavy"], any_lane(), 1, at(i));
            order.push(leased[0].dispatch.env.as_str().to_owned());
        }
        // pass(light) grows by 1_000_000 per claim, pass(heavy) by 333_333; ties go to the
        // smaller name.
        let first: Vec<&str> = order.iter().take(10).map(String::as_str).collect();
        assert_eq!(
            first,
            [
                "heavy", "light", "heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy",
                "light"
            ]
        );
        let light = order.iter().filter(|e| *e == "light").count();
        assert_eq!(light, 10, "a quarter of the claims: weights 1 and 3");
    }

    #[test]
    fn claim_chains_filter_and_prefer() {
        let mut h = Harness::new();
        h.limit("prod", 100, true);
        h.rt.block_on(h.q.add_lane(&lane("gpu"))).expect("add_lane");
        let (d1, _) = h.trigger("prod", "q", "default");
        let (g1, _) = h.trigger("prod", "q", "gpu");
        let (m1, _) = h.trigger("prod", "q", "manual");
        let (d2, _) = h.trigger("prod", "q", "default");
        let filter = h.claim(
            &["prod"],
            ClaimChain::Filter(vec![lane("gpu"), lane("fast_lane")]),
            3,
            T0,
        );
        assert_eq!(
            filter.iter().map(|l| l.dispatch.run_id).collect::<Vec<_>>(),
            vec![g1]
        );
        let pref = h.claim(&["prod"], ClaimChain::default_chain(), 3, T0);
        assert_eq!(
            pref.iter().map(|l| l.dispatch.run_id).collect::<Vec<_>>(),
            vec![m1, d1, d2]
        );
        let tokens: Vec<u64> = filter.iter().chain(&pref).map(|l| l.token.0).collect();
        assert_eq!(tokens, vec![1, 2, 3, 4]);
    }

    #[test]
    fn versions_at_claim() {
        let mut h = Harness::new();
        h.limit("prod", 100, true);
        let mut d = h.dispatch("prod", "q", "default");
        d.locked_version = Some(2);
        h.enqueue(&d, T0).expect("enqueue");
        assert!(
            h.claim(&["prod"], any_lane(), 1, T0).is_empty(),
            "serves version 0"
        );
        let req = ClaimRequest {
            worker: WorkerId(2),
            chain: any_lane(),
            max: 1,
            envs: vec![ServedEnv {
                env: env("prod"),
                version: 2,
            }],
            lease: Duration::from_secs(30),
        };
        assert_eq!(h.rt.block_on(h.q.claim(&req, T0)).expect("claim").len(), 1);
    }

    #[test]
    fn an_orphan_lane_returns_its_runs_and_frees_slots_for_lanes_with_consumers() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        h.rt.block_on(h.q.add_lane(&lane("gpu"))).expect("add_lane");
        let def =
            h.rt.block_on(h.q.register_consumer(&ClaimChain::Filter(vec![lane("default")]), T0))
                .expect("register");
        assert_eq!(def, ConsumerId(1));
        let (g, pg) = h.trigger("prod", "qg", "gpu");
        let (d, pd) = h.trigger("prod", "qd", "default");
        assert_eq!((pg, pd), (Placement::Ready, Placement::Queued));
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(60))
        );
        assert!(h.tick(at(59)).ready_returned.is_empty());
        let tick = h.tick(at(60));
        assert_eq!(tick.ready_returned, vec![g]);
        assert_eq!(
            tick.effects.moved,
            vec![(g, RunStatus::Queued), (d, RunStatus::Ready)]
        );
        let lanes = h.rt.block_on(h.q.lanes(at(60))).expect("lanes");
        let gpu = lanes.iter().find(|l| l.name == lane("gpu")).expect("gpu");
        assert_eq!(
            (gpu.ready, gpu.consumers, gpu.orphan_since),
            (0, 0, None),
            "no ready run: not reported as orphan"
        );
        // An orphaned lane is not fast-pathed either.
        h.limit("prod", 5, true);
        assert_eq!(h.status(g), Some(RunStatus::Queued));
        let (g2, pg2) = h.trigger("prod", "qx", "gpu");
        assert_eq!(pg2, Placement::Queued);
        // A consumer of gpu clears the mark and admits.
        h.rt.block_on(h.q.register_consumer(&ClaimChain::Filter(vec![lane("gpu")]), at(61)))
            .expect("register");
        assert_eq!(h.status(g), Some(RunStatus::Ready));
        assert_eq!(h.status(g2), Some(RunStatus::Ready));
    }

    #[test]
    fn ready_returns_are_listed_by_run_id_across_lanes() {
        let mut h = Harness::new();
        h.limit("prod", 5, true);
        h.rt.block_on(h.q.add_lane(&lane("custom")))
            .expect("add_lane");
        let (a, _) = h.trigger("prod", "q", "default");
        let (b, _) = h.trigger("prod", "q", "custom");
        let tick = h.tick(at(60));
        assert_eq!(tick.ready_returned, vec![a, b]);
        assert_eq!(
            tick.effects.moved,
            vec![(a, RunStatus::Queued), (b, RunStatus::Queued)],
            "run id order, not lane by lane (custom < default)"
        );
    }

    #[test]
    fn unregistering_the_last_consumer_starts_the_orphan_clock() {
        let mut h = Harness::new();
        h.limit("prod", 5, true);
        let c =
            h.rt.block_on(h.q.register_consumer(&any_lane(), T0))
                .expect("register");
        let (r, _) = h.trigger("prod", "q", "default");
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            None,
            "consumed lanes never time out"
        );
        let fx =
            h.rt.block_on(h.q.unregister_consumer(c, at(100)))
                .expect("unregister");
        assert_eq!(
            fx.deadline,
            Some(at(160)),
            "max(ready_at, orphan_since) + ready_timeout"
        );
        let lanes = h.rt.block_on(h.q.lanes(at(100))).expect("lanes");
        let names: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["default", "fast_lane", "manual"], "sorted by name");
        assert_eq!(lanes[0].orphan_since, Some(at(100)));
        assert_eq!(lanes[1].orphan_since, None, "no ready run");
        assert_eq!(h.tick(at(160)).ready_returned, vec![r]);
    }

    #[test]
    fn ttl_expiry_releases_slots() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let mut a = h.dispatch("prod", "q", "default");
        a.ttl_deadline = Some(at(10));
        assert_eq!(h.enqueue(&a, T0).expect("a").placement, Placement::Ready);
        let (b, _) = h.trigger("prod", "q", "default");
        let tick = h.tick(at(10));
        assert_eq!(
            tick.expired.iter().map(|d| d.run_id).collect::<Vec<_>>(),
            vec![a.run_id]
        );
        assert_eq!(tick.effects.moved, vec![(b, RunStatus::Ready)]);
        assert_eq!(h.status(a.run_id), None);
        // A run that held a lease never expires.
        let mut c = h.dispatch("prod", "q2", "default");
        c.ttl_deadline = Some(at(20));
        c.ever_leased = true;
        h.enqueue(&c, at(10)).expect("c");
        assert!(h.tick(at(30)).expired.is_empty());
    }

    #[test]
    fn a_lapsed_lease_releases_slots_and_waits_for_the_engine() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, _) = h.trigger("prod", "q", "default");
        let (b, _) = h.trigger("prod", "q", "default");
        let leased = h.claim(&["prod"], any_lane(), 1, T0).remove(0);
        assert_eq!(leased.dispatch.run_id, a);
        let hb =
            h.rt.block_on(h.q.heartbeat(&[(a, leased.token), (a, FencingToken(99))], at(20)))
                .expect("hb");
        assert_eq!(hb, vec![LeaseState::Alive, LeaseState::Lost]);
        assert!(h.tick(at(30)).lapsed.is_empty(), "extended to 50 s");
        let tick = h.tick(at(50));
        assert_eq!(
            tick.lapsed,
            vec![Lapsed {
                dispatch: leased.dispatch.clone(),
                token: leased.token
            }]
        );
        assert_eq!(tick.effects.moved, vec![(b, RunStatus::Ready)]);
        assert_eq!(h.usage("prod").running, 1);
        let live = h.rt.block_on(h.q.live(a)).expect("live").expect("held");
        assert!(live.lease.is_some_and(|l| l.lapsed));
        // Everything but retry/finish refuses the lapsed token.
        let hb =
            h.rt.block_on(h.q.heartbeat(&[(a, leased.token)], at(51)))
                .expect("hb");
        assert_eq!(hb, vec![LeaseState::Lost]);
        assert_eq!(
            h.rt.block_on(h.q.release(a, leased.token, at(51))),
            Err(QueueError::StaleToken(a))
        );
        assert_eq!(
            h.rt.block_on(h.q.check_lease(a, leased.token)),
            Err(QueueError::StaleToken(a))
        );
        // A cancel is recorded, but a lapsed lease has no grace deadline to arm or report.
        let cancel = h.rt.block_on(h.q.cancel(a, Duration::from_secs(5), at(51)));
        assert!(matches!(
            cancel,
            Ok(CancelOutcome::Requested { first: true, .. })
        ));
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(80)),
            "a's lapse reported again (b's ready timeout is at 110 s)"
        );
        assert!(h.tick(at(60)).cancel_elapsed.is_empty());
        let fx =
            h.rt.block_on(h.q.retry(a, leased.token, at(61), at(61)))
                .expect("retry");
        assert_eq!(
            fx.moved,
            vec![(a, RunStatus::Queued)],
            "b holds the only slot"
        );
        let live = h.rt.block_on(h.q.live(a)).expect("live").expect("held");
        assert_eq!((live.status, live.dispatch.attempt), (RunStatus::Queued, 2));
    }

    #[test]
    fn cancel_removes_waiting_runs_and_marks_executing_ones() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, _) = h.trigger("prod", "q", "default");
        let (b, _) = h.trigger("prod", "q", "default");
        let leased = h.claim(&["prod"], any_lane(), 1, T0).remove(0);
        let grace = Duration::from_secs(10);
        let first = h.rt.block_on(h.q.cancel(a, grace, at(1))).expect("cancel");
        let want = CancelOutcome::Requested {
            token: leased.token,
            grace_deadline: at(11),
            first: true,
        };
        assert_eq!(first, want);
        let second = h.rt.block_on(h.q.cancel(a, grace, at(5))).expect("cancel");
        assert_eq!(
            second,
            CancelOutcome::Requested {
                token: leased.token,
                grace_deadline: at(11),
                first: false
            }
        );
        let hb =
            h.rt.block_on(h.q.heartbeat(&[(a, leased.token)], at(6)))
                .expect("hb");
        assert_eq!(hb, vec![LeaseState::CancelRequested]);
        assert_eq!(h.tick(at(11)).cancel_elapsed, vec![(a, leased.token)]);
        assert!(h.tick(at(12)).cancel_elapsed.is_empty(), "reported once");
        let removed = h.rt.block_on(h.q.cancel(b, grace, at(12))).expect("cancel");
        assert!(matches!(
            removed,
            CancelOutcome::Removed {
                was: RunStatus::Queued,
                ..
            }
        ));
        assert_eq!(
            h.rt.block_on(h.q.cancel(b, grace, at(12))).expect("cancel"),
            CancelOutcome::NotFound
        );
    }

    #[test]
    fn release_of_a_cancelled_lease_is_refused_and_changes_nothing() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, _) = h.trigger("prod", "q", "default");
        let leased = h.claim(&["prod"], any_lane(), 1, T0).remove(0);
        h.rt.block_on(h.q.cancel(a, Duration::from_secs(10), at(1)))
            .expect("cancel");
        let before = h.rt.block_on(h.q.snapshot()).expect("snapshot");
        assert_eq!(
            h.rt.block_on(h.q.release(a, leased.token, at(2))),
            Err(QueueError::CancelRequested(a))
        );
        assert_eq!(h.rt.block_on(h.q.snapshot()).expect("snapshot"), before);
        // The engine then ends it: the lease is still live for `finish`.
        h.rt.block_on(h.q.finish(a, leased.token, at(2)))
            .expect("finish");
        assert_eq!(h.rt.block_on(h.q.live(a)).expect("live"), None);
    }

    #[test]
    fn reschedule_moves_waiting_runs_only() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, _) = h.trigger("prod", "q", "default");
        let (b, _) = h.trigger("prod", "q", "default");
        let err = h.rt.block_on(h.q.reschedule(a, at(5), None, T0));
        assert_eq!(
            err,
            Err(QueueError::WrongState {
                run: a,
                status: RunStatus::Ready,
                operation: "reschedule"
            })
        );
        let fx =
            h.rt.block_on(h.q.reschedule(b, at(5), Some(at(15)), T0))
                .expect("reschedule");
        assert_eq!(fx.moved, vec![(b, RunStatus::Delayed)]);
        assert_eq!(fx.deadline, Some(at(5)));
        let missing = RunId(999);
        assert_eq!(
            h.rt.block_on(h.q.reschedule(missing, T0, None, T0)),
            Err(QueueError::NotFound(missing))
        );
    }

    #[test]
    fn priority_then_fifo_within_a_key() {
        let mut h = Harness::new();
        h.limit("prod", 0, true);
        let plain = h.dispatch("prod", "q", "default");
        let mut urgent = h.dispatch("prod", "q", "default");
        urgent.priority = Duration::from_secs(5);
        urgent.run_after = at(2);
        let later = h.dispatch("prod", "q", "default");
        for d in [&plain, &urgent, &later] {
            h.enqueue(d, at(2)).expect("enqueue");
        }
        h.limit("prod", 3, true);
        let order: Vec<RunId> = h
            .claim(&["prod"], any_lane(), 3, at(3))
            .iter()
            .map(|l| l.dispatch.run_id)
            .collect();
        assert_eq!(order, vec![urgent.run_id, plain.run_id, later.run_id]);
    }

    #[test]
    fn caps_refuse_instead_of_losing_runs() {
        let mut h = Harness::new();
        h.env(
            "prod",
            EnvSettings {
                limit: 1,
                fast_lane_limit: Some(1),
                ..Default::default()
            },
        );
        h.rt.block_on(h.q.put_queue(
            &env("prod"),
            &queue("q"),
            QueueSettings {
                max_queued: Some(1),
                ..Default::default()
            },
            T0,
        ))
        .expect("put_queue");
        let (_, p1) = h.trigger("prod", "q", "default");
        let (_, p2) = h.trigger("prod", "q", "default");
        assert_eq!((p1, p2), (Placement::Ready, Placement::Queued));
        let d3 = h.dispatch("prod", "q", "default");
        let full = QueueError::QueueFull {
            queue: "q".into(),
            key: String::new(),
            max_queued: 1,
        };
        assert_eq!(h.enqueue(&d3, T0), Err(full));
        // A run already accepted (recovery at open, a reconciler) is not refused by the cap.
        let again = h.rt.block_on(h.q.enqueue(d3, EnqueueAs::Accepted, T0));
        assert_eq!(again.expect("accepted").placement, Placement::Queued);
        // Sync into a full fast lane is refused, not queued.
        let f1 = h.dispatch("prod", "f", "fast_lane");
        assert_eq!(
            h.rt.block_on(h.q.enqueue(f1, EnqueueAs::SyncTrigger, T0))
                .expect("f1")
                .placement,
            Placement::Ready
        );
        let f2 = h.dispatch("prod", "g", "fast_lane");
        let refused =
            h.rt.block_on(h.q.enqueue(f2.clone(), EnqueueAs::SyncTrigger, T0));
        assert!(matches!(refused, Err(QueueError::FastLaneFull { .. })));
        assert_eq!(h.status(f2.run_id), None);
        assert_eq!(
            h.usage("prod"),
            EnvUsage {
                running: 1,
                fast_lane_running: 1
            }
        );
        // Unknown env or lane.
        let bad_env = h.dispatch("nope", "q", "default");
        assert!(matches!(h.enqueue(&bad_env, T0), Err(QueueError::Invalid(e)) if e.field == "env"));
        let mut bad_lane = h.dispatch("prod", "q2", "default");
        bad_lane.lane = lane("gpu");
        assert!(
            matches!(h.enqueue(&bad_lane, T0), Err(QueueError::Invalid(e)) if e.field == "lane")
        );
    }

    #[test]
    fn a_timeout_is_reported_again_one_lease_duration_later_until_the_lease_ends() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let mut d = h.dispatch("prod", "q", "default");
        d.max_duration = Some(Duration::from_secs(5));
        h.enqueue(&d, T0).expect("enqueue");
        let leased = h.claim(&["prod"], any_lane(), 1, T0).remove(0);
        assert_eq!(leased.attempt_deadline, Some(at(5)));
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(5))
        );
        assert_eq!(h.tick(at(5)).timed_out, vec![(d.run_id, leased.token)]);
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(30)),
            "the lease"
        );
        assert!(h.tick(at(6)).timed_out.is_empty());
        // Not acted on (the process that heard it died): reported again at 5 + 30 s.
        let hb =
            h.rt.block_on(h.q.heartbeat(&[(d.run_id, leased.token)], at(20)))
                .expect("hb");
        assert_eq!(hb, vec![LeaseState::Alive]);
        assert!(h.tick(at(34)).timed_out.is_empty());
        assert_eq!(h.tick(at(35)).timed_out, vec![(d.run_id, leased.token)]);
        // Ended: never again.
        h.rt.block_on(h.q.finish(d.run_id, leased.token, at(36)))
            .expect("finish");
        assert!(h.tick(at(70)).timed_out.is_empty());
    }

    #[test]
    fn a_lapsed_lease_not_ended_is_reported_again_one_lease_duration_later() {
        let mut h = Harness::new();
        h.limit("prod", 1, true);
        let (a, _) = h.trigger("prod", "q", "default");
        let leased = h.claim(&["prod"], any_lane(), 1, T0).remove(0);
        let first = h.tick(at(30));
        assert_eq!(first.lapsed.len(), 1);
        assert_eq!(
            h.usage("prod").running,
            0,
            "slots released at the first report"
        );
        assert_eq!(
            h.rt.block_on(h.q.next_deadline()).expect("deadline"),
            Some(at(60))
        );
        assert!(h.tick(at(59)).lapsed.is_empty());
        assert_eq!(h.tick(at(60)).lapsed, first.lapsed, "the same report again");
        assert_eq!(h.usage("prod").running, 0, "released once");
        h.rt.block_on(h.q.retry(a, leased.token, at(61), at(61)))
            .expect("retry");
        assert!(h.tick(at(200)).lapsed.is_empty(), "ended by the retry");
    }
}
