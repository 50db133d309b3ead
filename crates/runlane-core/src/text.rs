//! The text of a validated name (env, task, queue, lane), interned while few.
//!
//! Every queued run carries its env, task, queue and lane, and the engine copies them at each
//! step of a run (claim, context, events). With reference-counted text each copy and drop is
//! an atomic update of one counter that every run of that name shares: with two worker threads
//! that counter's cache line moves between the cores at every step. The first
//! [`INTERN_MAX`] distinct names a process sees are therefore interned instead: kept once for
//! the life of the process, so a copy is a pointer copy and two interned names are equal
//! exactly when they are the same pointer. Names past that bound (a deployment that makes
//! names from unbounded data) are reference-counted as before, so what the process keeps for
//! ever is bounded: at most [`INTERN_MAX`] names of at most 128 bytes.
//!
//! Interning is a cache, not a behaviour: a name reads, compares, orders and hashes by its
//! text whichever way it is held.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::idhash::NameBuild;

/// At most this many distinct names are interned per process (each kept for the process's
/// life: with names of at most 128 bytes, under 1 MiB in all).
pub const INTERN_MAX: usize = 4096;

/// Names a thread remembers from the interner, so creating a name it saw before takes no lock
/// shared with other threads.
const THREAD_CACHE_MAX: usize = 256;

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

    /// The interned text of `value`, interned now if fewer than `cap` names are; `None` past
    /// the bound.
    fn intern(&mut self, value: &str) -> Option<&'static Interned> {
        if let Some(&known) = self.names.get(value) {
            return Some(known);
        }
        if self.names.len() >= self.cap {
            return None;
        }
        let kept: &'static Interned = Box::leak(Box::new(Interned(value.into())));
        self.names.insert(&kept.0, kept);
        Some(kept)
    }
}

/// The process's interned names.
static INTERNER: Mutex<Interner> = Mutex::new(Interner::new(INTERN_MAX));

thread_local! {
    /// What this thread learnt from [`INTERNER`] (at most [`THREAD_CACHE_MAX`] names).
    /// (Bounded and holding interned names only: the cheap hash cannot be flooded.)
    static SEEN: RefCell<HashMap<&'static str, &'static Interned, NameBuild>> =
        RefCell::new(HashMap::with_hasher(NameBuild::default()));
}

impl NameText {
    /// The text of `value` (already validated), interned while fewer than [`INTERN_MAX`]
    /// names are.
    pub(crate) fn new(value: &str) -> Self {
        if let Some(hit) = SEEN.with(|seen| seen.borrow().get(value).copied()) {
            return NameText::Interned(hit);
        }
        let interned = INTERNER
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .intern(value);
        match interned {
            Some(kept) => {
                SEEN.with(|seen| {
                    let mut seen = seen.borrow_mut();
                    if seen.len() < THREAD_CACHE_MAX {
                        seen.insert(&kept.0, kept);
                    }
                });
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
        assert!(
            interner.intern("c").is_none(),
            "past the bound nothing is kept"
        );
        assert!(interner.intern("b").is_some(), "known names still answer");
        assert_eq!(interner.names.len(), 2);
    }

    #[test]
    fn one_name_is_one_text() {
        let a = NameText::new("text-test-one");
        let b = NameText::new("text-test-one");
        if let (NameText::Interned(x), NameText::Interned(y)) = (&a, &b) {
            assert!(std::ptr::eq(*x, *y));
        }
        assert_eq!(a, b);
        assert_ne!(a, NameText::new("text-test-two"));
        assert_eq!(a.as_str(), "text-test-one");
    }

    #[test]
    fn interned_and_counted_texts_compare_order_and_hash_alike() {
        let kept: &'static Interned = Box::leak(Box::new(Interned("text-test-same".into())));
        let interned = NameText::Interned(kept);
        let counted = NameText::Counted(Arc::from("text-test-same"));
        assert_eq!(interned, counted);
        assert_eq!(counted, interned);
        assert_eq!(interned.cmp(&counted), Ordering::Equal);
        assert_eq!(hash_of(&interned), hash_of(&counted));
        let later = NameText::Counted(Arc::from("text-test-z"));
        assert_eq!(interned.cmp(&later), Ordering::Less);
        assert_ne!(interned, later);
        assert_eq!(interned.as_str(), "text-test-same");
    }
}
