//! Distributor data path: the per-frame steering decision on real bytes, and the per-core worker state around it.
//!
//! * [`wire`] — typed zero-copy views of Ethernet (802.1Q/802.1ad), ARP,
//!   IPv4, IPv6 with extension headers, ports, ICMP/ICMPv6;
//! * [`steer`] — the steering rule as a pure function of (frame, [`steer::Plan`]);
//! * [`worker`] — a core's state: fragment memory and hold pool, MAC
//!   learning, counters; turns verdicts into [`verdict::Action`]s;
//! * [`build`] — frame builders for tests, simulations and benchmarks;
//! * [`transit`] — the transition memory: flows started in moved buckets
//!   while a new table is switched in (DESIGN §4);
//! * [`pcap`] and [`replay`] — capture files, and `stdd replay`: a capture
//!   through the real steering, one capture per TM and a summary out;
//! * [`io`] and [`backend`] — batches, the backend trait and its memory,
//!   pcap-file and live pcap backends, the worker loop;
//! * [`afpacket`], [`afxdp`] and [`xdp_steer`] — the Linux fast backends,
//!   and the in-kernel steering of the common case under afxdp;
//! * [`config`] and [`admin`] — the `stdd` configuration and its admin endpoint.
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod afpacket;
pub mod afxdp;
pub mod backend;
pub mod bridge;
pub mod build;
pub mod config;
pub mod failover;
pub mod frag;
pub mod io;
#[cfg(feature = "netmap")]
pub mod netmap;
pub mod pcap;
pub mod replay;
pub mod steer;
pub mod table;
pub mod transit;
pub mod verdict;
pub mod wire;
pub mod worker;
pub mod xdp_steer;

pub use steer::{decide, FlowKey, FragKey, Moved, Plan, PlanError, PortKind, Verdict};
pub use verdict::{Action, Branch, Counters, Drop, PortId};
pub use worker::{Worker, WorkerConfig};
