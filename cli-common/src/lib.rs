//! What stdd, tmd and stdctl share as programs: the command-line error path ([`cli`]), the configuration loader with its environment overrides ([`settings`]), the check of a secret file's mode ([`secret`]), and the man pages and completions made from each program's clap definition ([`generate`]).

#![deny(missing_docs)]

pub mod cli;
pub mod generate;
pub mod secret;
pub mod settings;
