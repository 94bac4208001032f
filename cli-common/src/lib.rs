//! What stdd, tmd and stdctl share as programs: the command-line error path ([`cli`]) and the configuration loader with its environment overrides ([`settings`]).

#![deny(missing_docs)]

pub mod cli;
pub mod settings;
