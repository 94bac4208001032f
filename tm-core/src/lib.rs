//! The traffic manager's bookkeeping without I/O, shared by `tmd` and the simulator: [`snat`] — self-source port leases from the `allocation` allocator, released on drop; [`tables`] — the running and the prepared table, and the open connections a transition must wait for.
#![deny(missing_docs)]

pub mod snat;
pub mod tables;
