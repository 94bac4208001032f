//! The admin plane's I/O, shared by stdd, tmd and stdctl: a bounded HTTP(S) server ([`server`]), the bearer-token and loopback rules ([`auth`]), TLS and mutual TLS ([`tls`]), and the typed client that carries the coordinator's calls ([`client`]).

#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod server;
pub mod tls;

pub use server::{Limits, Reply, Request, Server, ServerError};
