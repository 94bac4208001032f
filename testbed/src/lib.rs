//! The cluster in one process: a seeded, virtual-time simulation that drives the real distributor steering and the real tm-node port allocator on real frames (the end-to-end rig with real programs is `testbed/rig`).
//!
//! * [`scenario`] — what a run is: cluster, traffic mix, operator events;
//! * [`sim`] — the engine ([`sim::simulate`]);
//! * [`report`] — what a run found (text, JSON, SVG);
//! * [`stats`] — the seeded generator and the chi-square test.
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod report;
pub mod scenario;
pub mod sim;
pub mod stats;

pub use report::Report;
pub use scenario::{Event, Family, PortPattern, Scenario, Timed};
pub use sim::{simulate, Sim, SimError};
