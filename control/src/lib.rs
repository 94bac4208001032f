//! The cluster's control plane without I/O: the admin API's typed messages ([`api`]) and the transition coordinator ([`coordinator`]) that stdctl drives over HTTP and the simulator drives in process.
//!
//! Nothing here opens a socket or reads a clock: the coordinator is a
//! state machine that says which node to call with what and how long to
//! wait, and is told the answers and the time (the smoltcp way). Both
//! drivers therefore run the very same protocol code.

#![deny(missing_docs)]

pub mod api;
pub mod coordinator;

pub use api::{
    AbortAnswer, CommitAnswer, DistributorPhase, DistributorTransition, HeldPort, PrepareRequest,
    TableId, TmPhase, TmTransition,
};
pub use coordinator::{Call, CallError, NodeId, Outcome, Push, PushSpec, Step, Summary};
