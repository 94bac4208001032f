//! The netmap backend (cargo feature `netmap`): every port opened through `/dev/netmap` in native mode, its NIC rings mapped, frames copied between the rings and the worker's batch; one worker per ring pair, as with afxdp.
//!
//! Needs the netmap kernel module and a netmap-enabled driver (or netmap's
//! emulated mode) on the host: without `/dev/netmap` the backend refuses to
//! start with that reason. Built by CI (`cargo clippy -p distributor
//! --features netmap`); not run there, as no CI host has netmap. Uses the
//! legacy `NIOCREGIF` request (netmap API 11, still accepted by current
//! netmap) through `netmap_sys`, which needs no netmap headers to build.
//!
//! One worker (`NetmapBackend::open` with no ring): every ring pair of
//! every port (`NR_REG_ALL_NIC`). Several workers: worker *i* binds ring
//! pair *i* of every port (`NR_REG_ONE_NIC`), so each port needs as many
//! rings as workers and a symmetric RSS hash, as for afxdp
//! (docs/operations.md).
//!
//! Receiving walks the bound RX rings of every port between `head` and
//! `tail` without a system call; when all are empty, one `poll` (which
//! syncs the RX rings) waits up to the poll time. Sending fills the port's
//! first bound TX ring and one `NIOCTXSYNC` per port per batch hands the
//! frames over.
//!
//! No FFI here (only `crate::sys` may hold it): the netmap calls and the
//! ring memory are
//! `crate::sys::netmap`'s, the `poll` `crate::sys::socket`'s.

use std::io;

use crate::io::{Backend, Batch};
use crate::sys::netmap::Port as Rings;
use crate::sys::socket::PollSet;
use crate::verdict::PortId;

/// One port: its netmap rings, and whether frames await `NIOCTXSYNC`.
#[derive(Debug)]
struct Port {
    rings: Rings,
    pending: bool,
}

/// The netmap backend of one worker.
#[derive(Debug)]
pub struct NetmapBackend {
    ports: Vec<Port>,
    /// Every port's descriptor, for the idle `poll`.
    poll_set: PollSet,
    poll_ms: i32,
}

impl NetmapBackend {
    /// Opens `interfaces` in netmap mode, one port each, in order: every
    /// ring (`ring` None: the only worker) or ring pair `ring` of each.
    pub fn open(interfaces: &[&str], ring: Option<u16>, poll_ms: u64) -> io::Result<Self> {
        let ports: Vec<Port> = interfaces
            .iter()
            .map(|i| {
                Rings::open(i, ring).map(|rings| Port {
                    rings,
                    pending: false,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(NetmapBackend {
            poll_set: PollSet::new(ports.iter().map(|p| p.rings.raw())),
            ports,
            poll_ms: poll_ms.min(1000) as i32,
        })
    }

    fn drain(&mut self, batch: &mut Batch) -> usize {
        let mut taken = 0;
        for (pi, p) in self.ports.iter_mut().enumerate() {
            for r in 0..p.rings.rx_rings() {
                let room = batch.capacity() - batch.len();
                p.rings.receive(r, room, |data| {
                    if batch.push(pi as PortId, 0, data) {
                        taken += 1;
                    }
                });
            }
        }
        taken
    }
}

impl Backend for NetmapBackend {
    fn ports(&self) -> usize {
        self.ports.len()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        let n = self.drain(batch);
        if n > 0 {
            return Ok(n);
        }
        // poll(2) also syncs the RX rings.
        self.poll_set.wait(self.poll_ms)?;
        Ok(self.drain(batch))
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        let p = self
            .ports
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?;
        for attempt in 0..2 {
            if p.rings.send(frame)? {
                p.pending = true;
                return Ok(());
            }
            if attempt == 0 {
                // Ring full: hand over what is queued, once.
                let _ = p.rings.txsync();
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "netmap TX ring full",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        for p in self.ports.iter_mut().filter(|p| p.pending) {
            p.pending = false;
            p.rings.txsync()?;
        }
        Ok(())
    }
}
