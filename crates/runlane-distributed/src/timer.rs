//! Timer ownership across processes. Every engine has a timer service that sleeps until the
//! queue backend's earliest deadline and then ticks (promotes delayed runs, expires TTLs,
//! recovers lapsed leases). With several processes on one deployment, one of them owns the
//! timers: it holds the leader key `{prefix}:timer` (`SET NX PX <lease>`, renewed every
//! `lease / 3` while its value is still this process's), and only its timer reads Redis's
//! earliest deadline; the other processes' timers see none (their engines still purge on
//! their own retention deadlines).
//!
//! Deadlines created by other processes reach the owner through announcements: the owner's
//! read records the deadline it sleeps until in `{prefix}:cfg.tarm` in the same script; a
//! process whose call created an earlier deadline asks Redis (`announce`, atomic with the
//! comparison) and, when it is earlier, publishes it on `{prefix}:timer`; the owner's
//! subscriber re-arms its timer. A process that is not the owner watches the leader key with
//! its remaining time to live (one `PTTL` per lease period, no fast poll) and takes over when
//! it lapses, so a crashed owner is replaced within one lease period, and the new owner re-arms
//! its timer at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use runlane_core::backend::Effects;
use runlane_core::Timestamp;
use runlane_engine::WeakEngine;

/// How long a process waits before it calls again after an error.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Renews the leader key only while it still holds this process's value.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

/// Deletes the leader key only while it still holds this process's value.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

/// This process's side of the timer ownership.
pub(crate) struct TimerLead {
    leader: AtomicBool,
    /// This process's value of the leader key.
    me: String,
    /// The leader key, `{prefix}:timer`.
    key: String,
    lease: Duration,
    /// How many times this process took the ownership.
    taken: AtomicU64,
}

impl TimerLead {
    /// A lead on `{base}:timer` with `lease` (the owner renews at a third of it).
    pub(crate) fn new(base: &str, origin: &str, lease: Duration) -> Self {
        TimerLead {
            leader: AtomicBool::new(false),
            me: origin.to_string(),
            key: format!("{base}:timer"),
            lease: lease.max(Duration::from_millis(30)),
            taken: AtomicU64::new(0),
        }
    }

    /// Whether this process owns the timers now.
    pub(crate) fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// How many times this process took the ownership since open.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Stops claiming the ownership without giving the key up (this process's handle is gone
    /// without a shutdown: the key lapses as if the process had died).
    pub(crate) fn abandon(&self) {
        self.leader.store(false, Ordering::SeqCst);
    }

    /// Gives the ownership up (clean shutdown), so another process takes over at once
    /// instead of after the lease.
    pub(crate) async fn release(&self, conn: &ConnectionManager) {
        if !self.leader.swap(false, Ordering::SeqCst) {
            return;
        }
        let _: redis::RedisResult<i64> = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.me)
            .invoke_async(&mut conn.clone())
            .await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Takes, holds and renews the leader key for `engine` until the engine is gone (the caller
/// aborts it at shutdown). On taking it, re-arms the engine's timer (which then reads Redis's
/// earliest deadline); on losing it, stops answering deadlines to the timer.
pub(crate) fn spawn_lead(
    lead: Arc<TimerLead>,
    mut conn: ConnectionManager,
    engine: WeakEngine,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let renew = redis::Script::new(RENEW);
        let lease_ms = millis(lead.lease);
        loop {
            let Some(engine_now) = engine.upgrade() else {
                return;
            };
            drop(engine_now);
            let c = &mut conn;
            if lead.is_leader() {
                let renewed: redis::RedisResult<i64> = renew
                    .key(&lead.key)
                    .arg(&lead.me)
                    .arg(lease_ms)
                    .invoke_async(c)
                    .await;
                match renewed {
                    Ok(1) => tokio::time::sleep(lead.lease / 3).await,
                    Ok(_) => {
                        tracing::warn!(key = %lead.key, "timer ownership lost");
                        lead.leader.store(false, Ordering::SeqCst);
                    }
                    Err(_) => {
                        // Redis is away: nobody can prove ownership; nobody ticks anyway.
                        lead.leader.store(false, Ordering::SeqCst);
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
                continue;
            }
            let taken: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&lead.key)
                .arg(&lead.me)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async(c)
                .await;
            match taken {
                Ok(Some(_)) => {
                    lead.leader.store(true, Ordering::SeqCst);
                    lead.taken.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(key = %lead.key, "this process owns the timers");
                    if let Some(engine) = engine.upgrade() {
                        // Any deadline is earlier than a timer armed for none: it re-reads.
                        engine
                            .apply_effects(Effects {
                                deadline: Some(Timestamp::ZERO),
                                ..Effects::default()
                            })
                            .await;
                    }
                    tokio::time::sleep(lead.lease / 3).await;
                }
                Ok(None) => {
                    // Another process owns it: look again when its lease would lapse.
                    let ttl: redis::RedisResult<i64> =
                        redis::cmd("PTTL").arg(&lead.key).query_async(c).await;
                    let wait = match ttl {
                        Ok(ms) if ms >= 0 => Duration::from_millis(ms.unsigned_abs() + 1),
                        Ok(-2) => Duration::ZERO, // Just gone: try again at once.
                        Ok(_) => lead.lease,
                        Err(_) => RETRY_AFTER,
                    };
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                Err(_) => tokio::time::sleep(RETRY_AFTER).await,
            }
        }
    })
}
