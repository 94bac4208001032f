//! Core of the statistical traffic distributor: the keyed flow hash, 4096-entry allocation tables,
//! profiles, minimal-disruption rebalancing, failover tables, self-source port tables and the table file.
//!
//! The crate is shared by the distributors, the traffic managers, stdctl and
//! the simulation harness: what it computes is a contract between them
//! (`docs/hash.md`, `docs/table-format.md`).
//!
//! ```
//! use allocation::{AllocationTable, Flow, GroupSpec, HashKey, MacAddr, Profile, Tm, rules::proto};
//!
//! let tms = (0..4)
//!     .map(|i| Tm { id: i, name: format!("tm{i}"), mac: MacAddr([2, 0, 0, 0, 0, i as u8 + 1]), weight: 1, group: 0 })
//!     .collect();
//! let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
//! let table = AllocationTable::new(1, key, tms, vec![GroupSpec::default_group(Profile::Uniform)]).unwrap();
//!
//! // A request and its reply are steered to the same TM.
//! let req = Flow::with_ports(proto::TCP, "203.0.113.7".parse().unwrap(), 6900, "198.51.100.1".parse().unwrap(), 80);
//! assert_eq!(table.steer(&req).tm, table.steer(&req.reversed()).tm);
//!
//! // Rebalancing to a Gaussian moves exactly the minimum number of buckets.
//! let change = table.rebalance(0, &Profile::Gaussian { mean: None, sigma: None }).unwrap();
//! assert_eq!(change.moves.len(), allocation::rebalance::minimum_moves(&table.counts(0), &change.table.counts(0)));
//! ```
#![deny(missing_docs)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod error;
pub mod file;
pub mod hash;
pub mod mac;
pub mod profile;
pub mod rebalance;
pub mod rules;
pub mod selfport;
pub mod shared;
pub mod table;

/// Entries in every allocation table (and buckets of the hash).
pub const TABLE_SIZE: usize = 4096;

pub use error::{FileError, ParseError, PortError, ProfileError, TableError};
pub use hash::HashKey;
pub use mac::MacAddr;
pub use profile::Profile;
pub use rebalance::{Change, Move};
pub use rules::{PortRange, Prefix, Rule};
pub use selfport::{PortAllocator, ReplyFit, SelfPorts, SnatAllocator};
pub use shared::{SharedTable, Versioned};
pub use table::{
    AllocationTable, Buckets, Flow, Group, GroupSpec, HashMode, SteerBy, Steering, Tm, TmIndex,
};
