//! The distributor's data-path core: the per-frame steering decision on real bytes and the per-core worker state around it — no I/O, no system library, nothing but `allocation` below it.
//!
//! * [`wire`] — typed zero-copy views of Ethernet (802.1Q/802.1ad), ARP,
//!   IPv4, IPv6 with extension headers, ports, ICMP/ICMPv6;
//! * [`steer`] — the steering rule as a pure function of (frame, [`steer::Plan`])
//!   ([`steer::classify`]), and the step that writes its rewrite ([`steer::apply`]);
//! * [`worker`] — a core's state: fragment memory and hold pool ([`frag`]),
//!   MAC learning ([`bridge`]), counters ([`verdict`]); turns verdicts into
//!   [`verdict::Action`]s, frame by frame or a [`batch::Batch`] at a time;
//! * [`transit`] — the transition memory: flows started in moved buckets
//!   while a new table is switched in (DESIGN §4);
//! * [`pins`] — flows kept on their old owner past a table change
//!   (UDP sessions, long connections), immutable, in the plan;
//! * [`table`] — the fixed-size open-addressing maps the worker state uses;
//! * [`build`] — frame builders for tests, simulations and benchmarks.
//!
//! The I/O layer (`distributor`: backends, the XDP programs, capture
//! files) and the daemon sit on this crate; the simulator and the fuzz
//! targets use it alone.
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod batch;
pub mod bridge;
pub mod build;
pub mod frag;
pub mod pins;
pub mod steer;
pub mod table;
pub mod transit;
pub mod verdict;
pub mod wire;
pub mod worker;

pub use batch::Batch;
pub use steer::{
    apply, classify, decide, Decision, FlowKey, FragKey, Moved, Plan, PlanError, PortKind, Rewrite,
    Verdict,
};
pub use verdict::{Action, Branch, Counters, Drop, PortId};
pub use worker::{Worker, WorkerConfig};
