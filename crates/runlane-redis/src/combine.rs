//! Enqueue combining: concurrent [`RedisQueue::enqueue`](crate::RedisQueue) calls of one
//! process share script calls.
//!
//! One enqueue is in flight at a time. A caller that finds none takes the lead and makes its own
//! call at once (a lone trigger waits for nothing). Callers arriving meanwhile wait in a list;
//! when the leading call ends, the first of them still waiting takes the lead for the list (up
//! to [`MOST`] runs) and enqueues all of it with one `enqueue_many` call in its own task,
//! answering the others; and so on. Under concurrent triggers the fixed cost of a script call
//! (the call itself, the key-space checks, the next deadline, the doorbells) is paid once per
//! batch instead of once per run, and no task or timer is added.
//!
//! A leader dropped before it answers (its caller went away) hands the list on from its drop;
//! a waiter whose leader was dropped with its run unanswered enqueues the run alone (enqueue is
//! idempotent by run id, so a run the dropped call did place is answered as placed).

use std::sync::Mutex;

use runlane_core::backend::{Dispatch, EnqueueAs, Enqueued};
use runlane_core::{QueueError, Timestamp};
use tokio::sync::oneshot;

use crate::queue::lock;

/// At most this many waiting runs go in one batch (one script call).
pub(crate) const MOST: usize = 256;

/// A caller waiting for its run's enqueue.
pub(crate) struct Waiter {
    pub(crate) dispatch: Dispatch,
    pub(crate) why: EnqueueAs,
    pub(crate) now: Timestamp,
    turn: oneshot::Sender<Turn>,
}

impl Waiter {
    /// Answers the caller (a caller that went away is not waiting for it).
    pub(crate) fn answer(self, answer: Result<Enqueued, QueueError>) {
        let _ = self.turn.send(Turn::Done(answer));
    }
}

/// What a waiting caller is told.
pub(crate) enum Turn {
    /// Its run's outcome.
    Done(Result<Enqueued, QueueError>),
    /// It leads: it enqueues its own run with these others.
    Lead(Vec<Waiter>),
}

/// How a caller joined.
pub(crate) enum Joined {
    /// Nothing was in flight: it makes its own call now.
    Lead,
    /// It waits for its turn.
    Wait(oneshot::Receiver<Turn>),
}

#[derive(Default)]
struct State {
    busy: bool,
    waiting: Vec<Waiter>,
}

/// Marks an enqueue in flight when none is: whether the caller leads.
fn take_lead(state: &mut State) -> bool {
    !std::mem::replace(&mut state.busy, true)
}

/// The enqueue in flight and the callers waiting behind it.
#[derive(Default)]
pub(crate) struct Combine {
    state: Mutex<State>,
}

impl Combine {
    /// Whether an enqueue is in flight.
    pub(crate) fn busy(&self) -> bool {
        lock(&self.state).busy
    }

    /// Leads when nothing is in flight (then the caller must hold a [`Leading`] until it has
    /// answered); `false` changes nothing.
    pub(crate) fn lead_alone(&self) -> bool {
        take_lead(&mut lock(&self.state))
    }

    /// Leads when nothing is in flight, else waits in the list. A caller that leads must hold a
    /// [`Leading`] until it has answered its batch.
    pub(crate) fn join(&self, dispatch: &Dispatch, why: EnqueueAs, now: Timestamp) -> Joined {
        let mut state = lock(&self.state);
        if take_lead(&mut state) {
            return Joined::Lead;
        }
        let (turn, rx) = oneshot::channel();
        state.waiting.push(Waiter {
            dispatch: dispatch.clone(),
            why,
            now,
            turn,
        });
        Joined::Wait(rx)
    }

    /// Passes the lead to the first caller still waiting, with the next batch; with nobody
    /// waiting, nothing is in flight any more.
    fn hand_off(&self) {
        let mut state = lock(&self.state);
        loop {
            if state.waiting.is_empty() {
                state.busy = false;
                return;
            }
            let n = state.waiting.len().min(MOST);
            let mut batch = state.waiting.drain(..n);
            let Some(first) = batch.next() else {
                continue;
            };
            let rest: Vec<Waiter> = batch.collect();
            match first.turn.send(Turn::Lead(rest)) {
                Ok(()) => return,
                // That caller went away: the others go back to the front of the list.
                Err(Turn::Lead(rest)) => {
                    let later = std::mem::replace(&mut state.waiting, rest);
                    state.waiting.extend(later);
                }
                Err(Turn::Done(_)) => {}
            }
        }
    }
}

/// Held by the leading caller: passes the lead on when dropped, answered or not.
pub(crate) struct Leading<'a>(pub(crate) &'a Combine);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.hand_off();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::{EnvName, LaneName, QueueName, RunId};
    use std::sync::Arc;
    use std::time::Duration;

    fn dispatch(n: u128) -> Dispatch {
        Dispatch {
            run_id: RunId(n),
            env: EnvName::new("e").expect("env"),
            queue: QueueName::new("q").expect("queue"),
            key: Arc::from(""),
            lane: LaneName::new("default").expect("lane"),
            priority: Duration::ZERO,
            run_after: Timestamp(0),
            ttl_deadline: None,
            attempt: 1,
            locked_version: None,
            ever_leased: false,
            max_duration: None,
        }
    }

    fn waits(joined: Joined) -> oneshot::Receiver<Turn> {
        match joined {
            Joined::Wait(rx) => rx,
            Joined::Lead => panic!("expected to wait"),
        }
    }

    #[test]
    fn the_first_leads_the_next_wait_and_the_first_waiter_leads_them_after() {
        let c = Combine::default();
        assert!(matches!(
            c.join(&dispatch(1), EnqueueAs::Trigger, Timestamp(0)),
            Joined::Lead
        ));
        let mut second = waits(c.join(&dispatch(2), EnqueueAs::Trigger, Timestamp(0)));
        let mut third = waits(c.join(&dispatch(3), EnqueueAs::SyncTrigger, Timestamp(5)));
        drop(Leading(&c));
        match second.try_recv() {
            Ok(Turn::Lead(rest)) => {
                assert_eq!(rest.len(), 1);
                assert_eq!(rest[0].dispatch.run_id, RunId(3));
                assert_eq!(rest[0].why, EnqueueAs::SyncTrigger);
                assert_eq!(rest[0].now, Timestamp(5));
                rest.into_iter()
                    .for_each(|w| w.answer(Err(QueueError::Unavailable("x".into()))));
            }
            _ => panic!("the first waiter leads"),
        }
        assert!(matches!(third.try_recv(), Ok(Turn::Done(Err(_)))));
        // Still in flight (the second leads) until its lead ends; then nothing is.
        let mut fourth = waits(c.join(&dispatch(4), EnqueueAs::Trigger, Timestamp(0)));
        drop(Leading(&c));
        assert!(matches!(fourth.try_recv(), Ok(Turn::Lead(rest)) if rest.is_empty()));
        drop(Leading(&c));
        assert!(matches!(
            c.join(&dispatch(5), EnqueueAs::Trigger, Timestamp(0)),
            Joined::Lead
        ));
    }

    #[test]
    fn a_waiter_that_went_away_is_skipped_and_batches_are_bounded() {
        let c = Combine::default();
        assert!(matches!(
            c.join(&dispatch(0), EnqueueAs::Trigger, Timestamp(0)),
            Joined::Lead
        ));
        drop(waits(c.join(
            &dispatch(1),
            EnqueueAs::Trigger,
            Timestamp(0),
        )));
        let mut rxs: Vec<_> = (2..(MOST as u128) + 10)
            .map(|n| waits(c.join(&dispatch(n), EnqueueAs::Trigger, Timestamp(0))))
            .collect();
        drop(Leading(&c));
        // Run 1's caller is gone: run 2's leads the next MOST − 1 runs (its batch is MOST).
        let rest = match rxs[0].try_recv() {
            Ok(Turn::Lead(rest)) => rest,
            _ => panic!("run 2's caller leads"),
        };
        assert_eq!(rest.len(), MOST - 1);
        assert_eq!(rest[0].dispatch.run_id, RunId(3));
        assert!(
            matches!(rxs[1].try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "in run 2's batch, not answered yet"
        );
        drop(rest);
        drop(Leading(&c));
        // The runs beyond the first batch: the first of them leads the rest.
        let first_left = MOST;
        match rxs[first_left].try_recv() {
            Ok(Turn::Lead(rest)) => assert_eq!(rest.len(), rxs.len() - first_left - 1),
            _ => panic!("the first run beyond the batch leads"),
        }
    }
}
