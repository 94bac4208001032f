//! What stdd, tmd and stdctl share as programs: the command-line error path ([`cli`]), the configuration loader with its environment overrides ([`settings`]) and the check of a secret file's mode ([`secret`]).

#![deny(missing_docs)]

pub mod cli;
pub mod secret;
pub mod settings;
