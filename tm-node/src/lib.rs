//! Traffic-manager node: `tmd`, an L4 proxy whose server-side connections come from self-source ports that steer the replies back to it.
//!
//! * [`balance`] — server choice per pool (round robin, weighted, least
//!   connections, source hash), pure;
//! * [`snat`] — (SNAT address, self-source port) leases from the
//!   `allocation` allocator, released on drop; connect with retries on
//!   address-in-use; refusal on exhaustion, never a port that steers elsewhere;
//! * [`health`] — TCP and HTTP probes (from self-source ports) and the
//!   rise/fall hysteresis, a pure state machine;
//! * [`persist`] — source-address affinity with a netmask and a timeout;
//! * [`proxy`] — TCP virtual servers: accept, pick, connect, relay;
//! * [`relay`] — the bytes both ways: copied while small, spliced (zero
//!   copy, pipes from a per-thread pool) once a direction moves full buffers;
//! * [`admin`] — `/metrics`, `/healthz`, GET and PUT `/table`;
//! * [`udp`] — UDP virtual servers: per-client sessions on self-source ports;
//! * [`config`] — `tmd`'s configuration;
//! * [`fds`] — the descriptor limit raised at start and the budget
//!   connections and sessions take from.
//!
//! DNAT-only mode keeps the client's address toward the server when the
//! server's reply steers back to this node anyway (`proxy`), and falls back
//! to a self-source port otherwise.
#![deny(missing_docs)]

pub mod admin;
pub mod balance;
pub mod check;
pub mod config;
pub mod fds;
pub mod health;
pub mod persist;
pub mod proxy;
pub mod relay;
pub mod snat;
pub use tm_core::tables;
pub mod udp;
