//! The conformance kit: scenarios with stable ids written once, generic over a backend factory,
//! and the reference model used by the model-based property test.

pub mod model;
