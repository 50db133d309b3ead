//! What crosses processes through Redis pub/sub, on two channels under the deployment's
//! prefix, each published in batches by one publisher task (one `PUBLISH` per batch and
//! channel, off the callers' paths) and read by one subscriber task per process. (Doorbells
//! do not go this way: they are per-lane streams read on a dedicated blocking connection per
//! claim chain, see `bells.rs`.)
//!
//! - `{prefix}:timer` — deadlines for the timer owner (see `timer.rs`): the earliest deadline a
//!   batch of this process's calls left, published only when Redis says (`announce`) it is
//!   earlier than what the owner sleeps until; the owner's subscriber re-arms its timer.
//! - `{prefix}:events` — terminal run statuses this process's engine published, so that
//!   `Engine::wait` and subscriptions in every other process see runs finished here. Each
//!   message starts with its sender's origin id; a process skips its own.
//!
//! Messages published while a subscriber reconnects are lost, so each time its subscription
//! is (re)established the process catches up instead (`Engine::resync_after_gap`): every
//! `wait` and run subscription reads its run from the store once (an end announced during the
//! gap is answered then, not at the wait's timeout), every idle workloop claims once (a ring
//! lost in the gap costs no stuck run), and the timer owner re-reads its deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use runlane_core::backend::Effects;
use runlane_core::{EnvName, RunId, RunStatus, Timestamp};
use runlane_engine::{RunEvent, RunEventKind, WeakEngine};
use runlane_redis::RedisQueue;
use tokio::sync::Notify;

use crate::timer::TimerLead;

/// After a lost connection, the next connect waits this long.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The channels of one deployment.
#[derive(Clone, Debug)]
pub(crate) struct Channels {
    pub(crate) timer: String,
    pub(crate) events: String,
}

impl Channels {
    pub(crate) fn new(base: &str) -> Self {
        Channels {
            timer: format!("{base}:timer"),
            events: format!("{base}:events"),
        }
    }
}

/// What this process has to publish.
#[derive(Default)]
struct Outbox {
    deadline: Option<Timestamp>,
    events: Vec<String>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.deadline.is_none() && self.events.is_empty()
    }
}

/// Deadlines created and runs finished in this process, waiting to be published.
pub(crate) struct Wake {
    outbox: Mutex<Outbox>,
    notify: Notify,
    closed: AtomicBool,
    lead: Arc<TimerLead>,
    origin: String,
}

impl Wake {
    pub(crate) fn new(lead: Arc<TimerLead>, origin: String) -> Self {
        Wake {
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            lead,
            origin,
        }
    }

    /// Whether this process owns the deployment's timers now.
    pub(crate) fn owns_timers(&self) -> bool {
        self.lead.is_leader()
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the earliest deadline a call left (its ready lanes ring the Redis doorbells in
    /// the call itself).
    pub(crate) fn note(&self, effects: &Effects) {
        self.note_deadline(effects.deadline);
    }

    /// Notes what a rebuild of the key space re-enqueued: its earliest deadline is announced
    /// even when this process owns the timers, since no call of the owner's engine carried it.
    /// (Its lanes, and every other, were rung by the rebuild's last call, in every process.)
    pub(crate) fn note_rebuilt(&self, effects: &Effects) {
        self.note_any_deadline(effects.deadline);
    }

    /// Notes a deadline a call created (a claim's lease).
    pub(crate) fn note_deadline(&self, deadline: Option<Timestamp>) {
        // The owner's own calls re-arm its own timer through the engine.
        self.note_any_deadline(deadline.filter(|_| !self.lead.is_leader()));
    }

    fn note_any_deadline(&self, deadline: Option<Timestamp>) {
        let Some(d) = deadline else {
            return;
        };
        let first = {
            let mut out = self.lock();
            let was_empty = out.is_empty();
            out.deadline = Some(out.deadline.map_or(d, |o| o.min(d)));
            was_empty
        };
        if first {
            self.notify.notify_one();
        }
    }

    /// Notes a status event of this process's engine (terminal ones cross processes).
    pub(crate) fn note_event(&self, event: &RunEvent) {
        let RunEventKind::Status { status, attempt } = event.kind else {
            return;
        };
        if !status.is_terminal() {
            return;
        }
        let line = format!(
            "{}\t{}\t{}\t{}\t{}",
            event.run,
            event.env.as_str(),
            status.as_str(),
            attempt,
            event.at.as_millis()
        );
        let first = {
            let mut out = self.lock();
            let was_empty = out.is_empty();
            out.events.push(line);
            was_empty
        };
        if first {
            self.notify.notify_one();
        }
    }

    /// Ends the publisher once what is noted is published.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// Publishes what is noted, a batch per `PUBLISH` and channel, until closed, on the process's
/// one multiplexed connection (the Redis backend's: it reconnects by itself).
pub(crate) fn spawn_publisher(
    wake: Arc<Wake>,
    mut conn: ConnectionManager,
    channels: Channels,
    redis: Weak<RedisQueue>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The last deadline Redis answered `announce` for: the owner is armed for it or
        // earlier (or it was announced), so the same deadline needs no second round trip.
        let mut covered: Option<Timestamp> = None;
        loop {
            if wake.lock().is_empty() {
                if wake.closed.load(Ordering::SeqCst) {
                    return;
                }
                wake.notify.notified().await;
            }
            let out = std::mem::take(&mut *wake.lock());
            if out.is_empty() {
                continue;
            }
            // While Redis is away a publish fails and its message is lost: every process
            // catches up when its subscription is re-established (`resync_after_gap`).
            if let Some(d) = out.deadline.filter(|d| Some(*d) != covered) {
                if let Some(redis) = redis.upgrade() {
                    match redis.announce(d).await {
                        Ok(announce) => {
                            covered = Some(d);
                            if announce {
                                publish(&mut conn, &channels.timer, d.as_millis().to_string())
                                    .await;
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "announcing a deadline failed"),
                    }
                }
            }
            if !out.events.is_empty() {
                let mut text = wake.origin.clone();
                for line in &out.events {
                    text.push('\n');
                    text.push_str(line);
                }
                publish(&mut conn, &channels.events, text).await;
            }
        }
    })
}

/// Publishes `text` on `channel` (a failure is logged: the message is lost).
async fn publish(conn: &mut ConnectionManager, channel: &str, text: String) {
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(text)
        .query_async(conn)
        .await;
    if let Err(e) = published {
        tracing::debug!(error = %e, channel, "publishing failed");
    }
}

/// One terminal status line of an events message.
fn parse_event(line: &str) -> Option<(RunId, EnvName, RunStatus, u32, Timestamp)> {
    let mut parts = line.split('\t');
    let run = parts.next()?.parse().ok()?;
    let env = EnvName::new(parts.next()?).ok()?;
    let status = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let at = Timestamp::from_millis(parts.next()?.parse().ok()?);
    Some((run, env, status, attempt, at))
}

/// Acts, in this process's engine, on what other processes (and this one) publish, until
/// the engine is gone: re-arms the timer when this process owns it, and
/// publishes other processes' terminal statuses on the local event bus. The caller aborts it
/// at shutdown.
pub(crate) fn spawn_subscriber(
    client: redis::Client,
    channels: Channels,
    engine: WeakEngine,
    wake: Arc<Wake>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut pubsub) = client.get_async_pubsub().await {
                let names = [&channels.timer, &channels.events];
                if pubsub.subscribe(&names[..]).await.is_ok() {
                    // Messages published while this process was not subscribed are lost: waits
                    // here read their runs from the store, idle workloops claim once, and the
                    // timer owner re-reads its deadline, now that it listens again.
                    if let Some(engine) = engine.upgrade() {
                        engine.resync_after_gap();
                        if wake.lead.is_leader() {
                            engine
                                .apply_effects(Effects {
                                    deadline: Some(Timestamp::ZERO),
                                    ..Effects::default()
                                })
                                .await;
                        }
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        let Some(engine) = engine.upgrade() else {
                            return;
                        };
                        let channel = msg.get_channel_name();
                        if channel == channels.timer {
                            if !wake.lead.is_leader() {
                                continue;
                            }
                            let Ok(ms) = payload.parse::<u64>() else {
                                continue;
                            };
                            engine
                                .apply_effects(Effects {
                                    deadline: Some(Timestamp::from_millis(ms)),
                                    ..Effects::default()
                                })
                                .await;
                        } else if channel == channels.events {
                            let mut lines = payload.split('\n');
                            if lines.next() == Some(wake.origin.as_str()) {
                                continue;
                            }
                            for line in lines {
                                if let Some((run, env, status, attempt, at)) = parse_event(line) {
                                    engine.publish_status_from_elsewhere(
                                        run, &env, status, attempt, at,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            if engine.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    })
}
