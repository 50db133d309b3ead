//! Hooks for shapes that drive the queue backend from outside the engine: the distributed
//! shape's reconciler enqueues runs whose trigger could not, and the engine must act on those
//! calls' effects (ring doorbells, re-arm its timer) as on its own. A [`WeakEngine`] lets such a
//! background task reach the engine without keeping it open.

use std::sync::{Arc, Weak};

use runlane_core::backend::Effects;

use crate::engine::{Engine, Inner};

/// A handle on an engine that does not keep it open ([`Engine::downgrade`]).
#[derive(Clone)]
pub struct WeakEngine {
    inner: Weak<Inner>,
}

impl WeakEngine {
    /// The engine, while some [`Engine`] handle still holds it.
    pub fn upgrade(&self) -> Option<Engine> {
        self.inner.upgrade().map(|inner| Engine { inner })
    }
}

impl Engine {
    /// A handle that does not keep the engine open (for background tasks a shape owns).
    pub fn downgrade(&self) -> WeakEngine {
        WeakEngine {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Acts on the effects of a queue-backend call made outside the engine: rings the
    /// doorbells of lanes that received ready runs, publishes the moves and re-arms the timer.
    pub async fn apply_effects(&self, effects: Effects) {
        self.inner.apply(effects, None).await
    }
}
