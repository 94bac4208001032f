//! The I/O layer's system interface: typed, sound wrappers over Linux calls, the only place their `unsafe` lives (so far the `bpf(2)` system call, [`bpf`]; the socket, ring and netlink calls of the backends are still in their modules).
#![allow(unsafe_code)]

pub mod bpf;
