//! Time for the engine: the real clock, and a manual clock for tests that counts wake-ups.
//!
//! Every instant the engine acts on comes from a [`Clock`]: trigger times, deadlines passed to
//! the queue backend, the timer service's sleeps, heartbeats, drain timeouts and wait timeouts.
//! A test that installs a [`ManualClock`] therefore controls all of them, and can prove "no
//! poll" by counting sleepers and wake-ups instead of measuring wall time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runlane_core::Timestamp;
use tokio::sync::{oneshot, Notify};

/// A source of `now` and of sleeps until an instant.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
    /// Completes once `now() >= at`.
    fn sleep_until(&self, at: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock (tokio timers).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl SystemClock {
    fn read() -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp(ms)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Self::read()
    }

    fn sleep_until(&self, at: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            // Tokio sleeps at millisecond granularity and the wall clock may step; loop until
            // the wall clock really reached `at`, so callers can rely on `now() >= at`.
            loop {
                let now = Self::read();
                if now >= at {
                    return;
                }
                tokio::time::sleep(at.since(now)).await;
            }
        })
    }
}

#[derive(Debug, Default)]
struct ManualState {
    now: Timestamp,
    sleepers: Vec<(Timestamp, oneshot::Sender<()>)>,
}

/// A clock that moves only when told; sleepers wake when `advance`/`set` passes their instant.
#[derive(Debug, Default)]
pub struct ManualClock {
    state: Mutex<ManualState>,
    /// Rung whenever a sleeper registers, for [`ManualClock::wait_sleepers`].
    parked: Notify,
}

impl ManualClock {
    /// A manual clock at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            state: Mutex::new(ManualState {
                now: start,
                sleepers: Vec::new(),
            }),
            parked: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves time forward by `d`, waking every sleeper whose instant is reached.
    pub fn advance(&self, d: Duration) {
        let mut st = self.lock();
        let to = st.now.saturating_add(d);
        Self::move_to(&mut st, to);
    }

    /// Moves time to `t` (never backwards), waking due sleepers.
    pub fn set(&self, t: Timestamp) {
        let mut st = self.lock();
        Self::move_to(&mut st, t);
    }

    fn move_to(st: &mut ManualState, t: Timestamp) {
        st.now = st.now.max(t);
        let now = st.now;
        let (due, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut st.sleepers)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        st.sleepers = pending;
        for (_, tx) in due {
            // A dropped sleeper (its future was cancelled) has nobody to wake.
            let _ = tx.send(());
        }
    }

    /// How many sleepers are waiting (useful to wait until a task is parked).
    pub fn sleepers(&self) -> usize {
        let mut st = self.lock();
        st.sleepers.retain(|(_, tx)| !tx.is_closed());
        st.sleepers.len()
    }

    /// The instants sleepers wait for, earliest first (tests: what is armed).
    pub fn sleeping_until(&self) -> Vec<Timestamp> {
        let mut st = self.lock();
        st.sleepers.retain(|(_, tx)| !tx.is_closed());
        let mut at: Vec<Timestamp> = st.sleepers.iter().map(|(at, _)| *at).collect();
        at.sort();
        at
    }

    /// Waits until at least `n` sleepers are parked. Waits on registrations, never polls.
    pub async fn wait_sleepers(&self, n: usize) {
        self.wait_parked(|clock| clock.sleepers() >= n).await;
    }

    /// Waits until a sleeper is parked until exactly `at` (a timer armed for that instant).
    pub async fn wait_sleeper_at(&self, at: Timestamp) {
        self.wait_parked(|clock| clock.sleeping_until().contains(&at))
            .await;
    }

    async fn wait_parked(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let parked = self.parked.notified();
            tokio::pin!(parked);
            parked.as_mut().enable();
            if done(self) {
                return;
            }
            parked.await;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.lock().now
    }

    fn sleep_until(&self, at: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let rx = {
            let mut st = self.lock();
            if at <= st.now {
                None
            } else {
                st.sleepers.retain(|(_, tx)| !tx.is_closed());
                let (tx, rx) = oneshot::channel();
                st.sleepers.push((at, tx));
                Some(rx)
            }
        };
        if rx.is_some() {
            self.parked.notify_waiters();
        }
        Box::pin(async move {
            if let Some(rx) = rx {
                // The sender is only dropped by waking; an error cannot leave us early in a
                // way that matters (the clock itself is gone).
                let _ = rx.await;
            }
        })
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }

    fn sleep_until(&self, at: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        (**self).sleep_until(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_exactly_when_passed() {
        let clock = Arc::new(ManualClock::new(Timestamp(1_000)));
        let woke = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for at in [1_500u64, 2_000, 3_000] {
            let (clock, woke) = (clock.clone(), woke.clone());
            tasks.push(tokio::spawn(async move {
                clock.sleep_until(Timestamp(at)).await;
                woke.lock().expect("lock").push((at, clock.now()));
            }));
        }
        clock.wait_sleepers(3).await;
        assert_eq!(clock.sleepers(), 3);
        assert_eq!(
            clock.sleeping_until(),
            vec![Timestamp(1_500), Timestamp(2_000), Timestamp(3_000)]
        );

        clock.advance(Duration::from_millis(499));
        tokio::task::yield_now().await;
        assert_eq!(clock.sleepers(), 3, "1 ms early wakes nobody");
        assert!(woke.lock().expect("lock").is_empty());

        clock.advance(Duration::from_millis(1));
        clock.set(Timestamp(2_000));
        for t in tasks.drain(..2) {
            t.await.expect("sleeper");
        }
        assert_eq!(clock.sleepers(), 1);
        assert_eq!(
            *woke.lock().expect("lock"),
            vec![(1_500, Timestamp(2_000)), (2_000, Timestamp(2_000))]
        );

        clock.set(Timestamp(100)); // never backwards
        assert_eq!(clock.now(), Timestamp(2_000));
        clock.advance(Duration::from_secs(1));
        tasks.pop().expect("last").await.expect("sleeper");
        assert_eq!(clock.sleepers(), 0);
    }

    #[tokio::test]
    async fn past_and_present_instants_complete_at_once() {
        let clock = ManualClock::new(Timestamp(5_000));
        clock.sleep_until(Timestamp(4_000)).await;
        clock.sleep_until(Timestamp(5_000)).await;
        assert_eq!(clock.sleepers(), 0, "nothing was parked");
    }

    #[tokio::test]
    async fn dropped_sleepers_are_not_counted() {
        let clock = ManualClock::new(Timestamp(0));
        let sleep = clock.sleep_until(Timestamp(10));
        assert_eq!(clock.sleepers(), 1);
        drop(sleep);
        assert_eq!(clock.sleepers(), 0);
    }

    #[tokio::test]
    async fn system_clock_past_instant_completes_at_once() {
        let clock = SystemClock;
        let now = clock.now();
        assert!(now > Timestamp(1_600_000_000_000), "reads the wall clock");
        clock
            .sleep_until(now.saturating_sub(Duration::from_secs(1)))
            .await;
    }
}
