//! The reconciler of the store-first protocol (SPEC §7).
