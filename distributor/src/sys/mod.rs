//! The I/O layer's system interface: typed, sound wrappers over every Linux call of the backends, the only place their `unsafe` lives — `bpf(2)` ([`bpf`]), sockets and their options ([`socket`]), owned mappings ([`mmap`]), AF_PACKET's TPACKET rings ([`packet`]), AF_XDP sockets with their UMEM and rings ([`xdp`]), generic netlink ([`netlink`]) and netmap ([`netmap`], feature `netmap`).
//!
//! Every `unsafe` block here carries a `// SAFETY:` comment; the rest of
//! the crate denies `unsafe_code` (the workspace lint) and reaches the
//! kernel through these modules only.
#![allow(unsafe_code)]

pub mod bpf;
pub mod mmap;
pub mod netlink;
#[cfg(feature = "netmap")]
pub mod netmap;
pub mod packet;
pub mod socket;
pub mod xdp;
