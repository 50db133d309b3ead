//! Idle workloops' standing offers: claim on enqueue.
//!
//! With a queue that can claim in the same step as an enqueue
//! ([`QueueBackend::claims_on_enqueue`](runlane_core::backend::QueueBackend::claims_on_enqueue):
//! Redis), a workloop whose claim found nothing posts an offer here while it waits on its
//! doorbells: its claim request, sized to the slots it holds for it. A trigger of this process
//! whose run the offer covers (its lane in the chain, its env served) takes the offer and
//! enqueues with [`enqueue_claiming`](runlane_core::backend::QueueBackend::enqueue_claiming):
//! the queue leases exactly what that workloop's next claim would have taken, in the same
//! script call, which saves the round trip of the claim the enqueue's doorbell would cause.
//! The trigger hands the leases and the held slots back to the workloop, which runs them as it
//! runs its own claim's.
//!
//! A queue shared by processes may also keep the offer
//! ([`QueueBackend::parks_offers`](runlane_core::backend::QueueBackend::parks_offers)): the
//! workloop's empty claim parks its twin there (`Offer::parked`), an enqueue of any process
//! leases for the twin, and the leases come back through the doorbells
//! ([`Offers::delivered`], then [`Offer::fulfil_delivered`]). A trigger here that takes the
//! offer takes the twin with its carried claim, or claims nothing when another process's
//! enqueue took the twin first.
//!
//! An offer is taken at most once. The workloop withdraws an offer nobody took when a doorbell
//! rings or it stops; one that was taken is waited for. An offer dropped untaken (its trigger
//! went away mid-call) frees its slots and wakes its workloop; a lease its call may still
//! have made lapses and is recovered like any lapsed lease.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use runlane_core::backend::{ClaimRequest, Leased, ParkedOffer};
use runlane_core::{EnvName, LaneName};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// A workloop's free slots, offered to the next trigger its claim covers.
pub(crate) struct Offer {
    /// The workloop's claim, `max` = the slots `permit` holds.
    pub(crate) request: ClaimRequest,
    /// The twin parked in the queue for other processes' enqueues, if any
    /// ([`QueueBackend::parks_offers`](runlane_core::backend::QueueBackend::parks_offers)).
    pub(crate) parked: Option<ParkedOffer>,
    permit: OwnedSemaphorePermit,
    reply: oneshot::Sender<Taken>,
}

impl Offer {
    /// An offer of the slots `permit` holds, answered on the returned receiver once taken.
    pub(crate) fn new(
        mut request: ClaimRequest,
        parked: Option<ParkedOffer>,
        permit: OwnedSemaphorePermit,
    ) -> (Offer, oneshot::Receiver<Taken>) {
        request.max = u32::try_from(permit.num_permits()).unwrap_or(u32::MAX);
        let (reply, rx) = oneshot::channel();
        (
            Offer {
                request,
                parked,
                permit,
                reply,
            },
            rx,
        )
    }

    /// Gives the slots back to the workloop with what the claim leased.
    pub(crate) fn fulfil(self, leases: Vec<Leased>) {
        self.answer(leases, false);
    }

    /// Gives the slots back to the workloop with the leases another process's enqueue made
    /// for the parked twin (delivered by the doorbells).
    pub(crate) fn fulfil_delivered(self, leases: Vec<Leased>) {
        self.answer(leases, true);
    }

    fn answer(self, leases: Vec<Leased>, delivered: bool) {
        let taken = Taken {
            permit: self.permit,
            leases,
            delivered,
        };
        if let Err(taken) = self.reply.send(taken) {
            // The workloop is gone (its worker crashed): the leases lapse and are recovered.
            tracing::debug!(
                leases = taken.leases.len(),
                "an offer's workloop went away before its claim answered"
            );
        }
    }

    /// Whether the workloop's claim would take a run of `env` on `lane` locked to `locked`.
    fn covers(&self, env: &EnvName, lane: &LaneName, locked: Option<u32>) -> bool {
        self.request.chain.covers(lane)
            && self
                .request
                .envs
                .iter()
                .any(|s| &s.env == env && locked.is_none_or(|v| v == s.version))
    }
}

/// A taken offer's answer: the slots it held and the runs leased for them.
pub(crate) struct Taken {
    /// The slots the offer held (as many as its claim's `max`).
    pub(crate) permit: OwnedSemaphorePermit,
    /// At most `max` leases, in claim order.
    pub(crate) leases: Vec<Leased>,
    /// Made by another process's enqueue for the parked twin, and heard from the doorbells.
    pub(crate) delivered: bool,
}

/// The offers posted and not taken yet.
pub(crate) struct Offers {
    enabled: bool,
    posted: Mutex<Vec<(u64, Offer)>>,
    /// Offers posted, readable without the lock (a trigger skips the lock when zero).
    len: AtomicUsize,
    next_id: AtomicU64,
}

impl Offers {
    /// `enabled`: the queue claims on enqueue; otherwise nothing is ever posted.
    pub(crate) fn new(enabled: bool) -> Self {
        Offers {
            enabled,
            posted: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// Whether workloops post offers.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Offers posted and not taken or withdrawn.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Offer)>> {
        self.posted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts an offer; the id withdraws it.
    pub(crate) fn post(&self, offer: Offer) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut posted = self.lock();
        posted.push((id, offer));
        self.len.store(posted.len(), Ordering::Release);
        id
    }

    /// Takes the offer back, unless a trigger took it.
    pub(crate) fn withdraw(&self, id: u64) -> Option<Offer> {
        let mut posted = self.lock();
        let at = posted.iter().position(|(i, _)| *i == id)?;
        let (_, offer) = posted.swap_remove(at);
        self.len.store(posted.len(), Ordering::Release);
        Some(offer)
    }

    /// The offer whose parked twin is `parked`, unless it was taken or withdrawn.
    pub(crate) fn delivered(&self, parked: ParkedOffer) -> Option<Offer> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut posted = self.lock();
        let at = posted.iter().position(|(_, o)| o.parked == Some(parked))?;
        let (_, offer) = posted.swap_remove(at);
        self.len.store(posted.len(), Ordering::Release);
        Some(offer)
    }

    /// Whether a posted offer's workloop claims on one of `lanes` (any env).
    pub(crate) fn covers_any_lane(&self, lanes: &[LaneName]) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lock()
            .iter()
            .any(|(_, o)| lanes.iter().any(|l| o.request.chain.covers(l)))
    }

    /// The first offer covering a run of `env` on `lane` (locked to version `locked`) whose
    /// workloop still waits for it.
    pub(crate) fn take(
        &self,
        env: &EnvName,
        lane: &LaneName,
        locked: Option<u32>,
    ) -> Option<Offer> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut posted = self.lock();
        // Offers of workloops that went away (crashed workers) are dropped on the way.
        posted.retain(|(_, o)| !o.reply.is_closed());
        let at = posted.iter().position(|(_, o)| o.covers(env, lane, locked));
        let offer = at.map(|at| posted.swap_remove(at).1);
        self.len.store(posted.len(), Ordering::Release);
        offer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runlane_core::backend::{ConsumerId, ServedEnv};
    use runlane_core::{ClaimChain, WorkerId};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    fn request(chain: &str, env: &str) -> ClaimRequest {
        ClaimRequest {
            worker: WorkerId(1),
            chain: ClaimChain::parse("chain", chain).expect("chain"),
            max: 0,
            envs: vec![ServedEnv {
                env: EnvName::new(env).expect("env"),
                version: 0,
            }],
            lease: Duration::from_secs(30),
        }
    }

    fn lane(name: &str) -> LaneName {
        LaneName::new(name).expect("lane")
    }

    fn env(name: &str) -> EnvName {
        EnvName::new(name).expect("env")
    }

    #[tokio::test]
    async fn an_offer_is_sized_by_its_permits_and_taken_once_by_a_covered_run() {
        let slots = Arc::new(Semaphore::new(4));
        let permit = slots.clone().try_acquire_many_owned(3).expect("permits");
        let offers = Offers::new(true);
        let (offer, rx) = Offer::new(request("cron", "prod"), None, permit);
        assert_eq!(offer.request.max, 3);
        let id = offers.post(offer);
        // Another lane or another env is not covered.
        assert!(offers.take(&env("prod"), &lane("default"), None).is_none());
        assert!(offers.take(&env("dev"), &lane("cron"), None).is_none());
        // Nor a run locked to a version the workloop does not run (it runs version 0).
        assert!(offers.take(&env("prod"), &lane("cron"), Some(2)).is_none());
        let taken = offers
            .take(&env("prod"), &lane("cron"), Some(0))
            .expect("covered");
        assert!(
            offers.take(&env("prod"), &lane("cron"), None).is_none(),
            "taken once"
        );
        assert!(
            offers.withdraw(id).is_none(),
            "a taken offer cannot be withdrawn"
        );
        taken.fulfil(Vec::new());
        let answer = rx.await.expect("answered");
        assert_eq!(answer.permit.num_permits(), 3);
        assert!(answer.leases.is_empty());
        assert_eq!(
            slots.available_permits(),
            1,
            "the slots stay held until the workloop lets go"
        );
    }

    #[tokio::test]
    async fn a_withdrawn_or_abandoned_offer_frees_its_slots() {
        let slots = Arc::new(Semaphore::new(2));
        let offers = Offers::new(true);
        let (offer, _rx) = Offer::new(
            request("*", "prod"),
            None,
            slots.clone().try_acquire_owned().expect("permit"),
        );
        let id = offers.post(offer);
        drop(offers.withdraw(id).expect("not taken"));
        assert_eq!(slots.available_permits(), 2);
        // A workloop that went away: its offer is skipped and dropped.
        let (offer, rx) = Offer::new(
            request("*", "prod"),
            None,
            slots.clone().try_acquire_owned().expect("permit"),
        );
        offers.post(offer);
        drop(rx);
        assert!(offers.take(&env("prod"), &lane("default"), None).is_none());
        assert_eq!(slots.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_delivery_takes_only_the_offer_of_its_parked_twin() {
        let slots = Arc::new(Semaphore::new(2));
        let offers = Offers::new(true);
        let (offer, mut rx) = Offer::new(
            request("*", "prod"),
            Some((ConsumerId(7), 3)),
            slots.clone().try_acquire_many_owned(2).expect("permits"),
        );
        let id = offers.post(offer);
        assert!(
            offers.delivered((ConsumerId(7), 2)).is_none(),
            "an older seq"
        );
        assert!(
            offers.delivered((ConsumerId(8), 3)).is_none(),
            "another workloop"
        );
        let offer = offers.delivered((ConsumerId(7), 3)).expect("its twin");
        assert!(offers.withdraw(id).is_none(), "taken once");
        offer.fulfil_delivered(Vec::new());
        let taken = rx.try_recv().expect("answered");
        assert!(taken.delivered);
        assert_eq!(taken.permit.num_permits(), 2);
        assert!(
            offers.delivered((ConsumerId(7), 3)).is_none(),
            "delivered once"
        );
    }
}
