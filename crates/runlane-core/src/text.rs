//! The text of a validated name (env, task, queue, lane), interned while few.
//!
//! Every queued run carries its env, task, queue and lane, and the engine copies them at each
//! step of a run (claim, context, events). With reference-counted text each copy and drop is
//! an atomic update of a counter shared with the name's other copies: with two worker threads
//! that counter's cache line moves between the cores at every step. The first
//! [`INTERN_MAX`] distinct names a process sees are therefore interned instead: kept once for
//! the life of the process, so a copy is a pointer copy and two interned names are equal
//! exactly when they are the same pointer. Names past that bound (a deployment that makes
//! names from unbounded data) are reference-counted as before, so what the process keeps for
//! ever is bounded: at most [`INTERN_MAX`] names of at most 128 bytes. The slots go to the
//! first names a process sees, whatever their use (a caller naming envs that do not exist uses
//! them up too); a name that finds them taken costs what every name cost before.
//!
//! Interning is a cache, not a behaviour: a name reads, compares, orders and hashes by its
//! text whichever way it is held.

use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock};

/// At most this many distinct names are interned per process (each kept for the process's
/// life: with names of at most 128 bytes, under 1 MiB in all).
pub const INTERN_MAX: usize = 4096;

/// Slots of a thread's cache of interned names (direct-mapped by the name's hash: a name takes
/// its slot over from whatever held it, so the names a thread uses most stay there).
const THREAD_SLOTS: usize = 256;

/// An interned name's text: one leaked allocation per distinct name.
pub(crate) struct Interned(Box<str>);

/// The text of a name: interned (a pointer to text kept for the process's life) or
/// reference-counted (past [`INTERN_MAX`]).
#[derive(Clone)]
pub(crate) enum NameText {
    Interned(&'static Interned),
    Counted(Arc<str>),
}

/// Interned names by text, up to a bound.
struct Interner {
    names: BTreeMap<&'static str, &'static Interned>,
    cap: usize,
}

impl Interner {
    const fn new(cap: usize) -> Self {
        Interner {
            names: BTreeMap::new(),
            cap,
        }
    }

    /// The interned text of `value`.
    fn get(&self, value: &str) -> Option<&'static Interned> {
        self.names.get(value).copied()
    }

    /// The interned text of `value`, interned now if fewer than `cap` names are; `None` past
    /// the bound.
    fn intern(&mut self, value: &str) -> Option<&'static Interned> {
        if let Some(known) = self.get(value) {
            return Some(known);
        }
        if self.is_full() {
            return None;
        }
        let kept: &'static Interned = Box::leak(Box::new(Interned(value.into())));
        self.names.insert(&kept.0, kept);
        Some(kept)
    }

    fn is_full(&self) -> bool {
        self.names.len() >= self.cap
    }
}

/// The process's interned names (read-locked to find one, write-locked to add one).
static INTERNER: RwLock<Interner> = RwLock::new(Interner::new(INTERN_MAX));

/// Set once [`INTERNER`] holds [`INTERN_MAX`] names: a name it does not hold then takes no
/// write lock.
static FULL: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's cache of interned names, by slot (see [`THREAD_SLOTS`]).
    static SEEN: [Cell<Option<&'static Interned>>; THREAD_SLOTS] =
        const { [const { Cell::new(None) }; THREAD_SLOTS] };
}

/// The slot of `value` in a thread's cache (a fixed hash: the core draws no randomness, and a
/// slot collision only costs a lookup in the interner).
fn slot_of(value: &str) -> usize {
    (foldhash::fast::FixedState::default().hash_one(value) as usize) % THREAD_SLOTS
}

/// Finds `value` in the process's interner, interning it while there is room.
fn interned(value: &str) -> Option<&'static Interned> {
    let found = INTERNER
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(value);
    if found.is_some() || FULL.load(AtomicOrdering::Acquire) {
        return found;
    }
    let mut interner = INTERNER.write().unwrap_or_else(|e| e.into_inner());
    let kept = interner.intern(value);
    if interner.is_full() {
        FULL.store(true, AtomicOrdering::Release);
    }
    kept
}

impl NameText {
    /// The text of `value` (already validated), interned while fewer than [`INTERN_MAX`]
    /// names are.
    pub(crate) fn new(value: &str) -> Self {
        let slot = slot_of(value);
        // A thread whose locals are being torn down skips its cache.
        let cached = SEEN
            .try_with(|seen| seen[slot].get())
            .ok()
            .flatten()
            .filter(|kept| &*kept.0 == value);
        if let Some(kept) = cached {
            return NameText::Interned(kept);
        }
        match interned(value) {
            Some(kept) => {
                let _ = SEEN.try_with(|seen| seen[slot].set(Some(kept)));
                NameText::Interned(kept)
            }
            None => NameText::Counted(Arc::from(value)),
        }
    }

    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            NameText::Interned(kept) => &kept.0,
            NameText::Counted(text) => text,
        }
    }
}

impl std::fmt::Debug for NameText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq for NameText {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            // One text per interned name: the same pointer or different names.
            (NameText::Interned(a), NameText::Interned(b)) => std::ptr::eq(*a, *b),
            _ => self.as_str() == other.as_str(),
        }
    }
}

impl Eq for NameText {}

impl PartialOrd for NameText {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NameText {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for NameText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of(t: &NameText) -> u64 {
        let mut h = DefaultHasher::new();
        t.hash(&mut h);
        h.finish()
    }

    #[test]
    fn an_interner_keeps_one_text_per_name_up_to_its_bound() {
        let mut interner = Interner::new(2);
        let a = interner.intern("a").expect("first name");
        let again = interner.intern("a").expect("known name");
        assert!(std::ptr::eq(a, again), "one text per name");
        let b = interner.intern("b").expect("second name");
        assert!(!std::ptr::eq(a, b));
        assert!(interner.is_full());
        assert!(
            interner.intern("c").is_none(),
            "past the bound nothing is kept"
        );
        assert!(interner.get("c").is_none());
        assert!(std::ptr::eq(interner.intern("b").expect("known"), b));
        assert_eq!(interner.names.len(), 2);
    }

    #[test]
    fn one_name_is_one_text_and_a_thread_finds_it_again() {
        let a = NameText::new("text-test-one");
        let b = NameText::new("text-test-one");
        let elsewhere = std::thread::spawn(|| NameText::new("text-test-one"))
            .join()
            .expect("thread");
        for other in [&b, &elsewhere] {
            match (&a, other) {
                (NameText::Interned(x), NameText::Interned(y)) => assert!(std::ptr::eq(*x, *y)),
                // The process interned 4,096 other names first (no test here does).
                _ => assert!(FULL.load(AtomicOrdering::Acquire)),
            }
            assert_eq!(&a, other);
        }
        assert_ne!(a, NameText::new("text-test-two"));
        assert_eq!(a.as_str(), "text-test-one");
    }

    #[test]
    fn interned_and_counted_texts_compare_order_and_hash_alike() {
        let interned = NameText::new("text-test-same");
        let counted = NameText::Counted(Arc::from("text-test-same"));
        assert_eq!(interned, counted);
        assert_eq!(counted, interned);
        assert_eq!(interned.cmp(&counted), Ordering::Equal);
        assert_eq!(hash_of(&interned), hash_of(&counted));
        let later = NameText::Counted(Arc::from("text-test-z"));
        assert_eq!(interned.cmp(&later), Ordering::Less);
        assert_eq!(later.cmp(&interned), Ordering::Greater);
        assert_ne!(interned, later);
        assert_eq!(interned.as_str(), "text-test-same");
    }
}
