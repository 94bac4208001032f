//! The distributor's I/O layer on top of the data-path core (`datapath`): backends, the worker loop, the in-kernel steering, capture files and replay. The daemon (`stdd`: configuration, admin endpoint, failover) sits on it.
//!
//! The core's modules are re-exported under their names
//! (`distributor::steer`, `distributor::wire`, …) for the code above it:
//!
//! * [`pcap`] and [`replay`] — capture files, and `stdd replay`: a capture
//!   through the real steering, one capture per TM and a summary out;
//! * [`io`] and [`backend`] — batches, the backend trait and its memory,
//!   pcap-file and live pcap backends, the worker loop;
//! * [`capture`] — the live capture tap: frames copied while armed, from
//!   the workers and the in-kernel steering, annotated, as pcapng;
//! * [`afpacket`], [`afxdp`] and [`xdp_steer`] — the Linux fast backends,
//!   and the in-kernel steering of the common case under afxdp;
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod afpacket;
pub mod afxdp;
pub mod backend;
pub mod capture;
pub mod io;
#[cfg(feature = "netmap")]
pub mod netmap;
pub mod pcap;
pub mod replay;
pub mod sys;
pub mod xdp_steer;

pub use datapath::{
    batch, bridge, build, frag, pins, steer, table, transit, verdict, wire, worker,
};
pub use datapath::{
    decide, Action, Branch, Counters, Drop, FlowKey, FragKey, Moved, Plan, PlanError, PortId,
    PortKind, Verdict, Worker, WorkerConfig,
};
