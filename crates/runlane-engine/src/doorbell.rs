//! Lane doorbells: how an idle workloop learns, without polling, that a lane it claims from
//! received ready runs.
//!
//! One `Notify` per lane, plus one rung for every lane that wildcard chains (`…>*`) wait on.
//! A workloop creates its `notified()` futures *before* it calls `claim`; `notify_waiters`
//! reaches every future created before it, so a run that becomes ready between an empty claim
//! and the wait still wakes the loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use runlane_core::idhash::NameBuild;
use runlane_core::{ClaimChain, LaneName};
use tokio::sync::Notify;

/// The doorbells of every lane this process has seen.
#[derive(Debug, Default)]
pub(crate) struct Doorbells {
    lanes: Mutex<HashMap<LaneName, Arc<Notify>, NameBuild>>,
    any: Arc<Notify>,
}

impl Doorbells {
    /// The bell of one lane (created on first use).
    pub(crate) fn bell(&self, lane: &LaneName) -> Arc<Notify> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.entry(lane.clone()).or_default().clone()
    }

    /// The bells a workloop with `chain` waits on.
    pub(crate) fn bells_for(&self, chain: &ClaimChain) -> Vec<Arc<Notify>> {
        let mut bells: Vec<Arc<Notify>> = chain.named().iter().map(|l| self.bell(l)).collect();
        if chain.is_wildcard() {
            bells.push(self.any.clone());
        }
        bells
    }

    /// Wakes the idle consumers of `lane` (and every wildcard consumer).
    pub(crate) fn ring(&self, lane: &LaneName) {
        self.bell(lane).notify_waiters();
        self.any.notify_waiters();
    }

    /// Wakes every idle consumer (admissions whose lanes the backend did not report).
    pub(crate) fn ring_all(&self) {
        let bells: Vec<Arc<Notify>> = {
            let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            lanes.values().cloned().collect()
        };
        for bell in bells {
            bell.notify_waiters();
        }
        self.any.notify_waiters();
    }
}

/// Completes when any of the futures completes (a tiny `select_all` for doorbells).
pub(crate) async fn any_of<F: std::future::Future<Output = ()> + Unpin>(futures: &mut [F]) {
    std::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ring_before_the_wait_is_not_lost() {
        let bells = Doorbells::default();
        let chain = ClaimChain::parse("workloops", "fast_lane").expect("chain");
        let own = bells.bells_for(&chain);
        assert_eq!(own.len(), 1, "filter chains wait on their lanes only");
        let mut waits: Vec<_> = own.iter().map(|b| Box::pin(b.notified())).collect();
        // The ring lands after the futures exist but before anybody awaits them.
        bells.ring(&LaneName::fast_lane());
        any_of(&mut waits).await;

        let wildcard = bells.bells_for(&ClaimChain::default_chain());
        assert_eq!(wildcard.len(), 2, "manual plus the any-lane bell");
        let mut waits: Vec<_> = wildcard.iter().map(|b| Box::pin(b.notified())).collect();
        bells.ring(&LaneName::new("reports").expect("lane"));
        any_of(&mut waits).await;
    }
}
