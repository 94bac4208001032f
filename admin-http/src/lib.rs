//! The admin plane's I/O, shared by stdd, tmd and stdctl: a bounded HTTP server ([`server`]), the bearer-token and loopback rules ([`auth`]), and the typed client that carries the coordinator's calls ([`client`]).

#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod server;

pub use server::{Limits, Reply, Request, Server, ServerError};
