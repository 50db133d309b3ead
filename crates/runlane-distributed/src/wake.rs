//! Doorbells across processes. An engine rings its own lanes' doorbells when a queue call
//! makes runs ready, but a worker in another process sharing the Redis queue never hears
//! those. Here every call of this process that made lanes ready also publishes their names on
//! the deployment's channel `{prefix}:wake` (one `PUBLISH` per batch, off the caller's path),
//! and a subscriber rings the named lanes in this process's engine. No polling: an idle
//! process waits on the subscription.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use runlane_core::backend::Effects;
use runlane_core::LaneName;
use runlane_engine::WeakEngine;
use tokio::sync::Notify;

/// After a lost connection, the next connect waits this long.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Lanes made ready in this process, waiting to be published.
#[derive(Default)]
pub(crate) struct Wake {
    lanes: Mutex<BTreeSet<String>>,
    notify: Notify,
    closed: AtomicBool,
}

impl Wake {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the lanes a call made ready.
    pub(crate) fn note(&self, effects: &Effects) {
        if effects.ready_lanes.is_empty() {
            return;
        }
        let first = {
            let mut lanes = self.lock();
            let was_empty = lanes.is_empty();
            for lane in &effects.ready_lanes {
                lanes.insert(lane.as_str().to_string());
            }
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

/// Publishes noted lanes, a batch per `PUBLISH`, until closed.
pub(crate) fn spawn_publisher(
    wake: Arc<Wake>,
    client: redis::Client,
    channel: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        loop {
            if wake.lock().is_empty() {
                if wake.closed.load(Ordering::SeqCst) {
                    return;
                }
                wake.notify.notified().await;
            }
            let lanes: Vec<String> = std::mem::take(&mut *wake.lock()).into_iter().collect();
            if lanes.is_empty() {
                continue;
            }
            if conn.is_none() {
                conn = client.get_multiplexed_async_connection().await.ok();
            }
            let Some(c) = conn.as_mut() else {
                // Redis is away: every process's claims fail and retry by themselves.
                continue;
            };
            let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(lanes.join(","))
                .query_async(c)
                .await;
            if published.is_err() {
                conn = None;
            }
        }
    })
}

/// Rings, in this process's engine, the lanes other processes (and this one) publish, until
/// the engine is gone. The caller aborts it at shutdown.
pub(crate) fn spawn_subscriber(
    client: redis::Client,
    channel: String,
    engine: WeakEngine,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut pubsub) = client.get_async_pubsub().await {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        let Some(engine) = engine.upgrade() else {
                            return;
                        };
                        let ready_lanes = payload
                            .split(',')
                            .filter_map(|l| LaneName::new(l).ok())
                            .collect();
                        engine
                            .apply_effects(Effects {
                                ready_lanes,
                                ..Effects::default()
                            })
                            .await;
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
