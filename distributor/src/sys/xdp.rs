//! AF_XDP sockets, soundly: [`XdpSocket`] owns the socket, its UMEM (registered with the kernel only here) and its four mapped rings, and keeps the books of which UMEM frame is whose, so a frame's bytes are lent only while the kernel leaves them alone.
//!
//! UMEM: [`FRAMES`] frames of [`FRAME_SIZE`] bytes; the first half serves
//! the fill and RX rings, the second half is the TX pool. A received frame
//! is lent to a closure ([`XdpSocket::receive`]) and only then put back on
//! the fill ring, published after the last one; a frame is sent by copying
//! it into a free TX frame ([`XdpSocket::send`]) and taken back from the
//! completion ring ([`XdpSocket::reap`]). Ring indexes and flags are
//! atomics in the mappings; descriptors are copied in and out, at slots
//! that lie inside their ring by construction.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::mmap::{Extra, Mmap, Pod};
use super::socket::{self, bind_raw, setsockopt_raw, XdpMmapOffsets, XdpStatistics};

/// Bytes per UMEM frame.
pub const FRAME_SIZE: usize = 2048;
/// UMEM frames per socket (half for receiving, half for sending).
pub const FRAMES: usize = 4096;
/// Descriptors per ring (each of RX, TX, fill, completion).
pub const RING: u32 = 2048;
/// Largest frame sent or received.
pub const MAX_FRAME: usize = FRAME_SIZE;
/// `sendto` wake-ups per flush at most (copy mode sends 32 frames per call).
const MAX_KICKS: usize = 64;

/// One mapped ring of descriptors of type `T`: producer and consumer
/// indexes, flags, `RING` descriptor slots.
#[derive(Debug)]
struct Ring<T: Pod> {
    map: Mmap,
    producer: usize,
    consumer: usize,
    flags: usize,
    descs: usize,
    /// Our copy of the index we advance (producer for fill/TX, consumer
    /// for RX/completion), published with a release store.
    local: u32,
    _desc: PhantomData<T>,
}

impl<T: Pod> Ring<T> {
    /// Maps the ring at page offset `pgoff` of `fd`, as `off` describes it;
    /// refuses offsets that do not lie (aligned) inside the mapping.
    fn map(fd: BorrowedFd<'_>, off: &libc::xdp_ring_offset, pgoff: u64) -> io::Result<Ring<T>> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "ring offsets out of range");
        let at = |o: u64| usize::try_from(o).map_err(|_| bad());
        let descs = at(off.desc)?;
        let map_len = descs
            .checked_add(RING as usize * std::mem::size_of::<T>())
            .ok_or_else(bad)?;
        let map = Mmap::shared(fd, map_len, pgoff, Extra::Populate)?;
        let (producer, consumer, flags) = (at(off.producer)?, at(off.consumer)?, at(off.flags)?);
        for word in [producer, consumer, flags] {
            if map.atomic_u32(word).is_none() {
                return Err(bad());
            }
        }
        Ok(Ring {
            map,
            producer,
            consumer,
            flags,
            descs,
            local: 0,
            _desc: PhantomData,
        })
    }

    #[inline(always)]
    fn producer(&self) -> &AtomicU32 {
        // SAFETY: checked in bounds and aligned in `map`.
        unsafe { self.map.atomic_u32_unchecked(self.producer) }
    }

    #[inline(always)]
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { self.map.atomic_u32_unchecked(self.consumer) }
    }

    #[inline(always)]
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as in `producer`.
        let flags = unsafe { self.map.atomic_u32_unchecked(self.flags) };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Byte offset of descriptor slot `i` (any index; wrapped here).
    #[inline(always)]
    fn slot(&self, i: u32) -> usize {
        self.descs + (i & (RING - 1)) as usize * std::mem::size_of::<T>()
    }

    /// A copy of descriptor slot `i`.
    #[inline(always)]
    fn read(&self, i: u32) -> T {
        // SAFETY: (i & (RING - 1)) < RING slots of size_of::<T>() follow
        // `descs` inside the mapping (its length, in `map`).
        unsafe { self.map.read_unchecked(self.slot(i)) }
    }

    /// Writes descriptor slot `i`.
    #[inline(always)]
    fn write(&mut self, i: u32, desc: T) {
        let at = self.slot(i);
        // SAFETY: as in `read`.
        unsafe { self.map.write_unchecked(at, desc) }
    }
}

fn ctx(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// An XDP socket, its UMEM and rings, and the books of its frames.
#[derive(Debug)]
pub struct XdpSocket {
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    fill: Ring<u64>,
    comp: Ring<u64>,
    /// Closed before the UMEM is unmapped (fields drop in order); the
    /// kernel holds its own references to the UMEM pages until it lets go.
    fd: OwnedFd,
    umem: Mmap,
    /// TX frames not in flight.
    free: Vec<u64>,
    /// RX frames taken back but not yet on the fill ring (only if it was full).
    spare: Vec<u64>,
    pending: bool,
    zerocopy: bool,
}

impl XdpSocket {
    /// A new XDP socket with its UMEM registered, its four rings of
    /// [`RING`] descriptors mapped and the receive half of the UMEM on the
    /// fill ring; not yet bound. The error says which step failed.
    pub fn new() -> io::Result<XdpSocket> {
        let fd = socket::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0)
            .map_err(|e| ctx("AF_XDP socket", e))?;
        let umem = Mmap::anonymous(FRAMES * FRAME_SIZE).map_err(|e| ctx("UMEM", e))?;
        // SAFETY: a zeroed xdp_umem_reg is valid; the fields bind reads are set.
        let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
        reg.addr = umem.addr();
        reg.len = umem.len() as u64;
        reg.chunk_size = FRAME_SIZE as u32;
        // SAFETY: the UMEM is the mapping above, owned by the value
        // returned together with the socket. The kernel pins its pages at
        // registration and reaches them through its own page list from
        // then on, so even a clone of the socket's descriptor that outlives
        // this value (`AsFd`) never makes it touch unmapped memory.
        unsafe { setsockopt_raw(fd.as_fd(), libc::SOL_XDP, libc::XDP_UMEM_REG, &reg) }
            .map_err(|e| ctx("UMEM registration", e))?;
        for (opt, what) in [
            (libc::XDP_UMEM_FILL_RING, "fill ring"),
            (libc::XDP_UMEM_COMPLETION_RING, "completion ring"),
            (libc::XDP_RX_RING, "RX ring"),
            (libc::XDP_TX_RING, "TX ring"),
        ] {
            // SAFETY: the ring-size options take a u32 and no address; the
            // kernel allocates the rings.
            unsafe { setsockopt_raw(fd.as_fd(), libc::SOL_XDP, opt, &RING) }
                .map_err(|e| ctx(what, e))?;
        }
        let off = socket::get(fd.as_fd(), XdpMmapOffsets).map_err(|e| ctx("ring offsets", e))?;
        let b = fd.as_fd();
        let rings = (|| {
            Ok::<_, io::Error>((
                Ring::map(b, &off.rx, libc::XDP_PGOFF_RX_RING as u64)?,
                Ring::map(b, &off.tx, libc::XDP_PGOFF_TX_RING as u64)?,
                Ring::map(b, &off.fr, libc::XDP_UMEM_PGOFF_FILL_RING)?,
                Ring::map(b, &off.cr, libc::XDP_UMEM_PGOFF_COMPLETION_RING)?,
            ))
        })();
        let (rx, tx, fill, comp) = rings.map_err(|e| ctx("mapping rings", e))?;
        let half = (FRAMES / 2) as u64;
        let mut xsk = XdpSocket {
            rx,
            tx,
            fill,
            comp,
            fd,
            umem,
            free: (half..FRAMES as u64)
                .map(|f| f * FRAME_SIZE as u64)
                .collect(),
            spare: Vec::with_capacity(FRAMES / 2),
            pending: false,
            zerocopy: false,
        };
        // The receive half of the UMEM goes to the fill ring.
        for f in 0..half {
            xsk.fill.write(xsk.fill.local, f * FRAME_SIZE as u64);
            xsk.fill.local = xsk.fill.local.wrapping_add(1);
        }
        xsk.publish_fill();
        Ok(xsk)
    }

    /// Binds the socket to queue `queue` of interface `ifindex`, in
    /// zero-copy mode (`zerocopy`) or copy mode, asking for wake-ups only
    /// when the kernel needs them (`XDP_USE_NEED_WAKEUP`).
    pub fn bind(&mut self, ifindex: u32, queue: u32, zerocopy: bool) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_xdp is valid; the fields bind reads are set.
        let mut sa: libc::sockaddr_xdp = unsafe { std::mem::zeroed() };
        sa.sxdp_family = libc::AF_XDP as u16;
        let mode = if zerocopy {
            libc::XDP_ZEROCOPY
        } else {
            libc::XDP_COPY
        };
        sa.sxdp_flags = mode | libc::XDP_USE_NEED_WAKEUP;
        sa.sxdp_ifindex = ifindex;
        sa.sxdp_queue_id = queue;
        // SAFETY: a sockaddr_xdp, the address type of AF_XDP.
        unsafe { bind_raw(self.fd.as_fd(), &sa) }?;
        self.zerocopy = zerocopy;
        Ok(())
    }

    /// True if bound in zero-copy mode.
    pub fn zerocopy(&self) -> bool {
        self.zerocopy
    }

    /// The descriptor's number (for an XSKMAP entry and a poll set).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// True if frames have been sent since the last flush.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// The kernel's running drop counts.
    pub fn statistics(&self) -> io::Result<libc::xdp_statistics> {
        socket::get(self.fd.as_fd(), XdpStatistics)
    }

    /// True if the RX ring holds frames not yet taken.
    #[inline(always)]
    pub fn rx_ready(&self) -> bool {
        self.rx.producer().load(Ordering::Acquire) != self.rx.local
    }

    /// Free slots in the fill ring.
    fn fill_room(&self) -> u32 {
        RING.wrapping_sub(
            self.fill
                .local
                .wrapping_sub(self.fill.consumer().load(Ordering::Acquire)),
        )
    }

    /// Gives a receive frame back to the fill ring (published by
    /// `publish_fill`), or keeps it in `spare` if the ring is full.
    #[inline(always)]
    fn give_back(&mut self, addr: u64, room: &mut u32) {
        if *room > 0 {
            self.fill.write(self.fill.local, addr);
            self.fill.local = self.fill.local.wrapping_add(1);
            *room -= 1;
        } else {
            self.spare.push(addr);
        }
    }

    fn publish_fill(&self) {
        self.fill
            .producer()
            .store(self.fill.local, Ordering::Release);
    }

    /// Takes up to `max` received frames, lending each to `f` (`None`:
    /// the kernel described a frame larger than a UMEM frame or outside
    /// the UMEM), and gives their frames back to the fill ring. The
    /// frames taken.
    #[inline(always)]
    pub fn receive(&mut self, max: u32, mut f: impl FnMut(Option<&[u8]>)) -> u32 {
        let ready = self
            .rx
            .producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.rx.local);
        let take = ready.min(max);
        if take == 0 {
            return 0;
        }
        let start = self.rx.local;
        let mut room = self.fill_room();
        while room > 0 {
            match self.spare.pop() {
                Some(a) => self.give_back(a, &mut room),
                None => break,
            }
        }
        for j in 0..take {
            // An RX slot the kernel published, not yet released.
            let d = self.rx.read(start.wrapping_add(j));
            let (addr, len) = (d.addr as usize, d.len as usize);
            let frame = addr / FRAME_SIZE;
            // Inside one frame of the receive half, or not lent at all.
            if len > MAX_FRAME || frame >= FRAMES / 2 || addr % FRAME_SIZE + len > FRAME_SIZE {
                f(None);
                // A descriptor the kernel got wrong: its frame is not
                // known to be ours, so it is not given back either.
            } else {
                // SAFETY: the frame (one frame of the receive half, checked)
                // came off the RX ring and is on no other ring: it goes to
                // the fill ring only below, after `f` returns, and each RX
                // slot is given back once (`rx.local` moves past it at
                // once, even if `f` unwinds); so the kernel does not write
                // it while `f` holds it, nor can `send` (`&mut self`).
                f(unsafe { self.umem.slice(addr, len) });
                self.give_back((frame * FRAME_SIZE) as u64, &mut room);
            }
            self.rx.local = start.wrapping_add(j + 1);
        }
        self.rx.consumer().store(self.rx.local, Ordering::Release);
        self.publish_fill();
        take
    }

    /// Takes completed TX frames back into the free pool.
    pub fn reap(&mut self) {
        let ready = self
            .comp
            .producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.comp.local);
        for k in 0..ready {
            // A completion slot the kernel published.
            let a = self.comp.read(self.comp.local.wrapping_add(k));
            // Only frames of the TX half come back here (one the kernel
            // got wrong is dropped, never put in the TX pool).
            let frame = a as usize / FRAME_SIZE;
            if (FRAMES / 2..FRAMES).contains(&frame) {
                self.free.push((frame * FRAME_SIZE) as u64);
            }
        }
        if ready > 0 {
            self.comp.local = self.comp.local.wrapping_add(ready);
            self.comp
                .consumer()
                .store(self.comp.local, Ordering::Release);
        }
    }

    /// Copies `frame` into a free TX frame and writes its TX descriptor
    /// (published by [`XdpSocket::flush`]); with none free, takes
    /// completions back, then flushes, before giving up (`WouldBlock`).
    #[inline(always)]
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a UMEM frame",
            ));
        }
        if self.free.is_empty() {
            self.reap();
            if self.free.is_empty() {
                self.flush()?;
            }
        }
        let addr = self
            .free
            .pop()
            .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "TX frames all in flight"))?;
        // The frame at `addr` is ours (from the free pool); the TX slot at
        // `local` is ours until the producer index is published (the ring
        // has as many slots as there are TX frames, so it is free).
        if !self.umem.copy_in(addr as usize, frame) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "completion outside the UMEM",
            ));
        }
        self.tx.write(
            self.tx.local,
            libc::xdp_desc {
                addr,
                len: frame.len() as u32,
                options: 0,
            },
        );
        self.tx.local = self.tx.local.wrapping_add(1);
        self.pending = true;
        Ok(())
    }

    /// Runs the queue's NAPI poll in this thread (busy polling, with the
    /// busy-poll options set): the driver fills the RX ring now.
    pub fn busy_poll(&self) {
        socket::poke_rx(self.fd.as_fd());
    }

    /// Publishes the written TX descriptors and wakes the kernel: in copy
    /// mode the `sendto` itself transmits (up to 32 frames a call), so it is
    /// repeated until the ring is taken; a zero-copy driver sends on its
    /// own and is woken only when it asks.
    pub fn flush(&mut self) -> io::Result<()> {
        self.pending = false;
        self.tx.producer().store(self.tx.local, Ordering::Release);
        if self.zerocopy {
            if self.tx.needs_wakeup() {
                socket::kick(self.fd.as_fd())?;
            }
        } else {
            let mut kicks = 0;
            while kicks < MAX_KICKS && self.tx.consumer().load(Ordering::Acquire) != self.tx.local {
                socket::kick(self.fd.as_fd())?;
                kicks += 1;
            }
        }
        self.reap();
        Ok(())
    }
}

impl AsFd for XdpSocket {
    /// For the typed socket options (busy polling); mapping the rings
    /// again is `sys`'s alone.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
