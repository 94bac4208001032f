//! Simulation harness and end-to-end rig. Placeholder crate: filled by issues 5 and 6.
#![deny(missing_docs)]
