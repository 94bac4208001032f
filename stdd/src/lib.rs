//! stdd, the distributor daemon, on the I/O layer (`distributor`) and the data-path core (`datapath`): its configuration ([`config`]), its admin endpoint ([`admin`]), `check-config` ([`check`]), the history of committed tables ([`history`]), the transition marker a restart recovers from ([`recovery`]) and TM liveness probes with automatic failover ([`failover`]); the binary (`src/bin/stdd.rs`) joins them to the backends and workers.
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod check;
pub mod config;
pub mod failover;
pub mod history;
pub mod recovery;
