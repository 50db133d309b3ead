//! The server's event log: for each env that somebody follows over SSE, one engine
//! subscription pumps the env's run events into a bounded buffer (the last
//! [`EventLog::KEEP`] events) and a broadcast channel. The buffer is what `Last-Event-ID`
//! resumes from; it is kept for half to all of [`EventLog::LINGER`] after the env's last client leaves, so a
//! client that reconnects within it misses nothing the buffer still holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runlane::{Engine, RunEvent};
use tokio::sync::broadcast;

/// The logs of the followed envs.
#[derive(Default)]
pub struct EventLog {
    envs: Mutex<HashMap<String, Arc<EnvLog>>>,
}

/// One env's buffer and channel.
pub struct EnvLog {
    buffer: Mutex<VecDeque<RunEvent>>,
    tx: broadcast::Sender<RunEvent>,
    clients: AtomicUsize,
}

/// Holds an env's log open while a client follows it.
pub struct Following {
    log: Arc<EnvLog>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.log.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Following {
    /// The env's live events (subscribe before reading [`Following::since`]).
    pub fn receiver(&self) -> broadcast::Receiver<RunEvent> {
        self.log.tx.subscribe()
    }

    /// Buffered events with `seq > after`, oldest first, and whether the buffer reaches back
    /// to `after` (false: some events after it are gone).
    pub fn since(&self, after: u64) -> (Vec<RunEvent>, bool) {
        let buffer = self.log.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let complete = buffer
            .front()
            .is_none_or(|e| e.seq <= after.saturating_add(1));
        let events = buffer.iter().filter(|e| e.seq > after).cloned().collect();
        (events, complete)
    }
}

impl EventLog {
    /// Events kept per env for resumption.
    pub const KEEP: usize = 1024;
    /// How long an env's log outlives its last client.
    pub const LINGER: Duration = Duration::from_secs(60);

    /// Follows `env`, starting its pump if nobody follows it yet.
    pub fn follow(
        self: &Arc<Self>,
        engine: &Engine,
        env: &str,
    ) -> Result<Following, runlane::EngineError> {
        let mut envs = self.envs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = envs.get(env) {
            log.clients.fetch_add(1, Ordering::SeqCst);
            return Ok(Following { log: log.clone() });
        }
        let mut events = engine.subscribe_env(env)?;
        let (tx, _) = broadcast::channel(Self::KEEP);
        let log = Arc::new(EnvLog {
            buffer: Mutex::new(VecDeque::with_capacity(Self::KEEP)),
            tx,
            clients: AtomicUsize::new(1),
        });
        envs.insert(env.to_string(), log.clone());
        let pump_log = log.clone();
        let registry = self.clone();
        let name = env.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Self::LINGER / 2);
            tick.tick().await;
            let mut idle = 0u32;
            loop {
                tokio::select! {
                    next = events.next() => match next {
                        Some(event) => {
                            {
                                let mut buffer =
                                    pump_log.buffer.lock().unwrap_or_else(|p| p.into_inner());
                                if buffer.len() >= Self::KEEP {
                                    buffer.pop_front();
                                }
                                buffer.push_back(event.clone());
                            }
                            let _ = pump_log.tx.send(event);
                        }
                        // The engine shut down.
                        None => break,
                    },
                    _ = tick.tick() => {
                        // Decided under the registry's lock, so no client joins a stopping pump.
                        let mut envs = registry.envs.lock().unwrap_or_else(|p| p.into_inner());
                        if pump_log.clients.load(Ordering::SeqCst) > 0 {
                            idle = 0;
                            continue;
                        }
                        idle += 1;
                        if idle >= 2 {
                            envs.remove(&name);
                            return;
                        }
                    }
                }
            }
            let mut envs = registry.envs.lock().unwrap_or_else(|p| p.into_inner());
            if envs.get(&name).is_some_and(|l| Arc::ptr_eq(l, &pump_log)) {
                envs.remove(&name);
            }
        });
        Ok(Following { log })
    }
}
