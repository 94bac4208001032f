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
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;

use netmap_sys::netmap::{
    netmap_if, netmap_ring, nmreq, NETMAP_API, NETMAP_RING_MASK, NIOCREGIF, NIOCTXSYNC,
    NR_REG_ALL_NIC, NR_REG_ONE_NIC,
};
use netmap_sys::netmap_user::{NETMAP_BUF, NETMAP_IF, NETMAP_RXRING, NETMAP_TXRING};

use crate::io::{Backend, Batch};
use crate::verdict::PortId;

/// One port: its `/dev/netmap` descriptor and mapped rings.
#[derive(Debug)]
struct Port {
    fd: libc::c_int,
    mem: *mut libc::c_void,
    mem_len: usize,
    nifp: *mut netmap_if,
    /// The bound RX rings: `first..first + count`.
    first: u32,
    count: u32,
    pending: bool,
}

// SAFETY: the mapping is owned by this value alone and used by one thread
// at a time (`&mut self`).
unsafe impl Send for Port {}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: `mem`/`mem_len` are what mmap returned and `fd` is our
        // descriptor; each released once.
        unsafe {
            if !self.mem.is_null() {
                libc::munmap(self.mem, self.mem_len);
            }
            libc::close(self.fd);
        }
    }
}

impl Port {
    fn open(iface: &str, ring: Option<u16>) -> io::Result<Port> {
        let path = CString::new("/dev/netmap").map_err(io::Error::other)?;
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{iface}: /dev/netmap: {e} (is the netmap kernel module loaded?)"),
            ));
        }
        let mut port = Port {
            fd,
            mem: std::ptr::null_mut(),
            mem_len: 0,
            nifp: std::ptr::null_mut(),
            first: 0,
            count: 0,
            pending: false,
        };
        // SAFETY: an all-zero nmreq is the documented starting point.
        let mut req: nmreq = unsafe { std::mem::zeroed() };
        let name = iface.as_bytes();
        if name.len() >= req.nr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{iface}: name too long"),
            ));
        }
        for (d, &s) in req.nr_name.iter_mut().zip(name) {
            *d = s as libc::c_char;
        }
        req.nr_version = NETMAP_API as u32;
        match ring {
            None => req.nr_flags = NR_REG_ALL_NIC,
            Some(r) => {
                req.nr_flags = NR_REG_ONE_NIC;
                req.nr_ringid = r & NETMAP_RING_MASK as u16;
            }
        }
        // SAFETY: `req` is a live nmreq the kernel reads and fills.
        if unsafe { libc::ioctl(fd, NIOCREGIF as _, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{iface}: NIOCREGIF: {e}")));
        }
        port.mem_len = req.nr_memsize as usize;
        // SAFETY: maps the region NIOCREGIF just described; checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                port.mem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{iface}: mmap: {e}")));
        }
        port.mem = mem;
        // SAFETY: nr_offset locates this interface's netmap_if in the mapping.
        port.nifp = unsafe { NETMAP_IF(mem, req.nr_offset as isize) };
        let rings = u32::from(req.nr_rx_rings).max(1);
        (port.first, port.count) = match ring {
            None => (0, rings),
            Some(r) if u32::from(r) < rings => (u32::from(r), 1),
            Some(r) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                    "{iface}: ring {r}: the interface has {rings} rings (one per worker is needed)"
                ),
                ))
            }
        };
        Ok(port)
    }

    fn rx_ring(&self, i: u32) -> *mut netmap_ring {
        // SAFETY: i < the interface's RX ring count; the offsets come from
        // the kernel's netmap_if.
        unsafe { NETMAP_RXRING(self.nifp, i as isize) }
    }

    fn tx_ring(&self) -> *mut netmap_ring {
        // SAFETY: the first bound ring exists (checked in `open`; TX and RX
        // rings come in pairs on NICs).
        unsafe { NETMAP_TXRING(self.nifp, self.first as isize) }
    }
}

/// The netmap backend of one worker.
#[derive(Debug)]
pub struct NetmapBackend {
    ports: Vec<Port>,
    /// Every port's descriptor, for the idle `poll`.
    poll_set: Vec<libc::pollfd>,
    poll_ms: i32,
}

impl NetmapBackend {
    /// Opens `interfaces` in netmap mode, one port each, in order: every
    /// ring (`ring` None: the only worker) or ring pair `ring` of each.
    pub fn open(interfaces: &[&str], ring: Option<u16>, poll_ms: u64) -> io::Result<Self> {
        let ports: Vec<Port> = interfaces
            .iter()
            .map(|i| Port::open(i, ring))
            .collect::<io::Result<_>>()?;
        Ok(NetmapBackend {
            poll_set: crate::afpacket::poll_set(ports.iter().map(|p| p.fd)),
            ports,
            poll_ms: poll_ms.min(1000) as i32,
        })
    }

    fn drain(&mut self, batch: &mut Batch) -> usize {
        let mut taken = 0;
        for (pi, p) in self.ports.iter().enumerate() {
            for r in p.first..p.first + p.count {
                let ring = p.rx_ring(r);
                // SAFETY: `ring` points to a live netmap_ring in our mapping;
                // slots between head and tail belong to us until head moves;
                // each slot's buffer holds `len` bytes of a frame.
                unsafe {
                    let n = (*ring).num_slots;
                    let mut cur = (*ring).head;
                    while cur != (*ring).tail && batch.len() < batch.capacity() {
                        let slot = *(*ring).slot.as_ptr().add(cur as usize);
                        let buf = NETMAP_BUF(ring, slot.buf_idx as isize) as *const u8;
                        let data = std::slice::from_raw_parts(buf, usize::from(slot.len));
                        if batch.push(pi as PortId, 0, data) {
                            taken += 1;
                        }
                        cur = if cur + 1 == n { 0 } else { cur + 1 };
                    }
                    (*ring).head = cur;
                    (*ring).cur = cur;
                }
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
        crate::afpacket::wait_readable(&mut self.poll_set, self.poll_ms)?;
        Ok(self.drain(batch))
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        let p = self
            .ports
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?;
        let ring = p.tx_ring();
        for attempt in 0..2 {
            // SAFETY: `ring` is our TX ring; the slot at head is ours while
            // head != tail; its buffer holds nr_buf_size bytes.
            unsafe {
                let n = (*ring).num_slots;
                let head = (*ring).head;
                if head != (*ring).tail {
                    if frame.len() > (*ring).nr_buf_size as usize {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "frame larger than a netmap buffer",
                        ));
                    }
                    let slot = (*ring).slot.as_mut_ptr().add(head as usize);
                    let buf = NETMAP_BUF(ring, (*slot).buf_idx as isize) as *mut u8;
                    std::ptr::copy_nonoverlapping(frame.as_ptr(), buf, frame.len());
                    (*slot).len = frame.len() as u16;
                    let next = if head + 1 == n { 0 } else { head + 1 };
                    (*ring).head = next;
                    (*ring).cur = next;
                    p.pending = true;
                    return Ok(());
                }
            }
            if attempt == 0 {
                // Ring full: hand over what is queued, once.
                // SAFETY: NIOCTXSYNC takes no argument.
                unsafe { libc::ioctl(p.fd, NIOCTXSYNC as _) };
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
            // SAFETY: NIOCTXSYNC takes no argument.
            if unsafe { libc::ioctl(p.fd, NIOCTXSYNC as _) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
