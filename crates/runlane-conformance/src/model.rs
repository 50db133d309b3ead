//! The reference model of the queue backend.
