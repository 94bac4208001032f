//! netmap (cargo feature `netmap`), soundly: [`Port`] owns a `/dev/netmap` descriptor registered on an interface (`NIOCREGIF`) and the mapping of its rings and buffers, and reads and writes ring headers, slots and buffers only at offsets checked against that mapping.
//!
//! The layout (`netmap_if`, `netmap_ring`, `netmap_slot`) is `netmap_sys`'s;
//! the kernel's offsets into it are checked once (ring headers, at open)
//! or per frame (slots and buffers: a compare each). The slots between a
//! ring's `head` and `tail` are the user's until `head` moves past them
//! and a system call (`poll`, `NIOCTXSYNC`) hands them back, so the kernel
//! does not write a buffer while it is lent.

use std::ffi::CStr;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use netmap_sys::netmap::{
    netmap_if, netmap_ring, netmap_slot, nmreq, NETMAP_API, NETMAP_RING_MASK, NIOCREGIF,
    NIOCTXSYNC, NR_REG_ALL_NIC, NR_REG_ONE_NIC,
};

use super::mmap::{Extra, Mmap};

/// `NR_EXCLUSIVE` (netmap.h): no other descriptor may bind the same rings.
const NR_EXCLUSIVE: u32 = 0x800;
const HEAD: usize = offset_of!(netmap_ring, head);
const CUR: usize = offset_of!(netmap_ring, cur);
const TAIL: usize = offset_of!(netmap_ring, tail);
const NUM_SLOTS: usize = offset_of!(netmap_ring, num_slots);
const BUF_SIZE: usize = offset_of!(netmap_ring, nr_buf_size);
const BUF_OFS: usize = offset_of!(netmap_ring, buf_ofs);
const SLOTS: usize = offset_of!(netmap_ring, slot);
const SLOT: usize = size_of::<netmap_slot>();
const SLOT_BUF: usize = offset_of!(netmap_slot, buf_idx);
const SLOT_LEN: usize = offset_of!(netmap_slot, len);

/// An interface's rings in netmap mode: the bound RX rings and the first
/// bound TX ring.
#[derive(Debug)]
pub struct Port {
    mem: Mmap,
    fd: OwnedFd,
    /// Byte offsets in `mem` of the bound RX rings' headers (checked).
    rx: Vec<usize>,
    /// Byte offset of the first bound TX ring's header (checked).
    tx: usize,
}

fn with(iface: &str, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{iface}: {what}: {e}"))
}

impl Port {
    /// Opens `/dev/netmap` and registers `iface`: every ring pair (`ring`
    /// None) or ring pair `ring`; maps its memory.
    pub fn open(iface: &str, ring: Option<u16>) -> io::Result<Port> {
        let path: &CStr = c"/dev/netmap";
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{iface}: /dev/netmap: {e} (is the netmap kernel module loaded?)"),
            ));
        }
        // SAFETY: `fd` was just returned by open(2) and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
        // Exclusive: no other descriptor may bind these rings, so no
        // other `Port` moves their heads (and hands back slots this one lends).
        match ring {
            None => req.nr_flags = NR_REG_ALL_NIC | NR_EXCLUSIVE,
            Some(r) => {
                req.nr_flags = NR_REG_ONE_NIC | NR_EXCLUSIVE;
                req.nr_ringid = r & NETMAP_RING_MASK as u16;
            }
        }
        // SAFETY: `req` is a live nmreq (the size NIOCREGIF encodes) the
        // kernel reads and fills during the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), NIOCREGIF as _, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{iface}: NIOCREGIF: {e}")));
        }
        let mem = Mmap::shared(fd.as_fd(), req.nr_memsize as usize, 0, Extra::None)
            .map_err(|e| with(iface, "mmap", e))?;
        let rings = u32::from(req.nr_rx_rings).max(1);
        let (first, count) = match ring {
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
        let bad = |what: &str| {
            with(
                iface,
                what,
                io::Error::new(io::ErrorKind::InvalidData, "outside the netmap memory"),
            )
        };
        // The interface's netmap_if at nr_offset: its ring offsets (from
        // the netmap_if) follow TX rings first, then the host TX ring, then
        // the RX rings.
        let nifp = req.nr_offset as usize;
        let tx_rings: u32 = mem
            .read(nifp + offset_of!(netmap_if, ni_tx_rings))
            .ok_or_else(|| bad("netmap_if"))?;
        let ring_at = |index: u32| -> Option<usize> {
            let ofs: i64 = mem
                .read(nifp + offset_of!(netmap_if, ring_ofs) + index as usize * size_of::<i64>())?;
            let at = usize::try_from((nifp as i64).checked_add(ofs)?).ok()?;
            mem.contains(at, size_of::<netmap_ring>()).then_some(at)
        };
        let rx = (first..first + count)
            .map(|i| ring_at(i + tx_rings + 1).ok_or_else(|| bad("RX ring")))
            .collect::<io::Result<Vec<_>>>()?;
        // TX and RX rings come in pairs on NICs.
        let tx = ring_at(first).ok_or_else(|| bad("TX ring"))?;
        Ok(Port { mem, fd, rx, tx })
    }

    /// The descriptor's number, for a poll set (`poll` syncs the RX rings).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// RX rings bound.
    pub fn rx_rings(&self) -> usize {
        self.rx.len()
    }

    /// A ring header's field (`head`, `cur`, `tail`, …), which the kernel
    /// may change during a sync on another thread: read atomically. In
    /// bounds and aligned: `at` is a ring header field (checked at open).
    fn u32_at(&self, at: usize) -> u32 {
        self.mem
            .atomic_u32(at)
            .map_or(0, |a| a.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Sets a ring header's `head` and `cur` (releasing the slots before them).
    fn set_head(&self, ring: usize, v: u32) {
        for at in [ring + HEAD, ring + CUR] {
            if let Some(a) = self.mem.atomic_u32(at) {
                a.store(v, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// Byte offset of the buffer of slot `i` of the ring at `ring`, if the
    /// slot and `len` bytes of its buffer lie inside the mapping; and the
    /// slot's offset.
    #[inline(always)]
    fn buffer(&self, ring: usize, i: u32, len: usize) -> Option<(usize, usize)> {
        let slot = ring + SLOTS + i as usize * SLOT;
        let idx: u32 = self.mem.read(slot + SLOT_BUF)?;
        let buf_ofs: i64 = self.mem.read(ring + BUF_OFS)?;
        let size = i64::from(self.u32_at(ring + BUF_SIZE));
        let at = (ring as i64)
            .checked_add(buf_ofs)?
            .checked_add(i64::from(idx).checked_mul(size)?)?;
        let at = usize::try_from(at).ok()?;
        self.mem.contains(at, len).then_some((slot, at))
    }

    /// Takes up to `max` frames from bound RX ring `k` (between its head
    /// and tail), lending each to `f`, and moves the ring's head past them.
    /// A slot whose buffer the kernel placed outside the mapping is skipped.
    pub fn receive(&mut self, k: usize, max: usize, mut f: impl FnMut(&[u8])) {
        let Some(&ring) = self.rx.get(k) else {
            return;
        };
        let n = self.u32_at(ring + NUM_SLOTS);
        let tail = self.u32_at(ring + TAIL);
        let mut cur = self.u32_at(ring + HEAD);
        let mut taken = 0;
        while cur != tail && cur < n && taken < max {
            let slot = ring + SLOTS + cur as usize * SLOT;
            if let Some(len) = self.mem.read::<u16>(slot + SLOT_LEN).map(usize::from) {
                if let Some((_, at)) = self.buffer(ring, cur, len) {
                    // SAFETY: the slot lies between head and tail, so its
                    // buffer is ours until head moves past it (below, after
                    // this borrow ends); the rings are bound exclusively
                    // (`NR_EXCLUSIVE`), so no other descriptor moves head,
                    // and a sync on another thread only takes slots before
                    // head. Bounds checked.
                    if let Some(data) = unsafe { self.mem.slice(at, len) } {
                        f(data);
                    }
                }
            }
            taken += 1;
            cur = if cur + 1 == n { 0 } else { cur + 1 };
        }
        self.set_head(ring, cur);
    }

    /// Copies `frame` into the TX ring's slot at head and moves head past
    /// it: `Ok(false)` if the ring is full (nothing written).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        let ring = self.tx;
        let n = self.u32_at(ring + NUM_SLOTS);
        let head = self.u32_at(ring + HEAD);
        if head == self.u32_at(ring + TAIL) {
            return Ok(false);
        }
        if frame.len() > self.u32_at(ring + BUF_SIZE) as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a netmap buffer",
            ));
        }
        let (slot, at) = self
            .buffer(ring, head, frame.len())
            .filter(|_| head < n)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "netmap slot outside the memory")
            })?;
        // The slot at head is ours while head != tail.
        self.mem.copy_in(at, frame);
        self.mem.write(slot + SLOT_LEN, frame.len() as u16);
        let next = if head + 1 == n { 0 } else { head + 1 };
        self.set_head(ring, next);
        Ok(true)
    }

    /// Hands the TX ring's new slots to the kernel (`NIOCTXSYNC`).
    pub fn txsync(&self) -> io::Result<()> {
        // SAFETY: NIOCTXSYNC takes no argument.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), NIOCTXSYNC as _) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
