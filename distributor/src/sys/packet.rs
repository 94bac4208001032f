//! AF_PACKET's memory-mapped TPACKET_V2 rings, soundly: [`Rings`] sets the version and ring sizes on a socket, maps exactly those rings, and lends a frame's bytes only while its status word gives it to user space.
//!
//! Layout: blocks of [`BLOCK_SIZE`] bytes, frames of [`FRAME_SIZE`] bytes
//! (a `tpacket2_hdr`, then the frame), the RX ring first and the TX ring
//! after it in one mapping. An RX frame is ours while its status has
//! `TP_STATUS_USER`, until [`Rings::rx_release`] (which takes `&mut self`,
//! so no borrowed frame outlives it) hands it back; a TX frame is ours
//! while its status is `TP_STATUS_AVAILABLE` (or `WRONG_FORMAT`), until
//! [`Rings::tx_write`] fills it and marks it `TP_STATUS_SEND_REQUEST`.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering};

use super::mmap::{Extra, Mmap};
use super::socket::{setsockopt_raw, SOL_PACKET};

const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const TPACKET_V2: libc::c_int = 1;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;

/// `PACKET_OUTGOING`: the packet type of a frame the host sent.
pub const PACKET_OUTGOING: u8 = 4;

/// Bytes per ring frame (header + data).
pub const FRAME_SIZE: usize = 2048;
/// Bytes per ring block.
pub const BLOCK_SIZE: usize = 1 << 20;
/// Where a frame's data starts in a TX slot: TPACKET_ALIGN(sizeof(tpacket2_hdr)).
const TX_DATA: usize = 32;
/// Largest frame sent.
pub const MAX_FRAME: usize = FRAME_SIZE - TX_DATA;
// tpacket2_hdr field offsets.
const H_LEN: usize = 4;
const H_SNAPLEN: usize = 8;
const H_MAC: usize = 12;
const H_SEC: usize = 16;
const H_NSEC: usize = 20;
/// sockaddr_ll.sll_pkttype, after the 32-byte aligned header.
const H_PKTTYPE: usize = 32 + 10;
/// Frames per block.
const PER_BLOCK: usize = BLOCK_SIZE / FRAME_SIZE;

#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

impl TpacketReq {
    fn blocks(n: u32) -> TpacketReq {
        TpacketReq {
            block_size: BLOCK_SIZE as u32,
            block_nr: n,
            frame_size: FRAME_SIZE as u32,
            frame_nr: n * PER_BLOCK as u32,
        }
    }
}

/// A received frame, as the kernel described it.
#[derive(Debug, Clone, Copy)]
pub struct RxFrame<'a> {
    /// The frame's length on the wire (`tp_len`).
    pub len: usize,
    /// The bytes captured (`tp_snaplen`): less than `len` if truncated.
    pub snaplen: usize,
    /// `sll_pkttype` (e.g. [`PACKET_OUTGOING`]).
    pub pkttype: u8,
    /// Arrival time, nanoseconds since the epoch.
    pub ts_ns: u64,
    /// The captured bytes, `None` if the header places them outside the
    /// frame slot.
    pub data: Option<&'a [u8]>,
}

/// A socket's mapped RX ring and (optionally) TX ring.
#[derive(Debug)]
pub struct Rings {
    map: Mmap,
    rx_frames: usize,
    tx_frames: usize,
}

fn ctx(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Rings {
    /// Sets TPACKET_V2 on `fd`, an RX ring of `rx_blocks` blocks and, with
    /// `tx_blocks`, a TX ring (both at least a block), and maps them
    /// (locked in memory where the limit allows). The error says which step
    /// failed (`TPACKET_V2`, `RX ring`, `TX ring`, `mmap`).
    pub fn setup(fd: BorrowedFd<'_>, rx_blocks: u32, tx_blocks: Option<u32>) -> io::Result<Rings> {
        // SAFETY: PACKET_VERSION takes an int and no address.
        unsafe { setsockopt_raw(fd, SOL_PACKET, PACKET_VERSION, &TPACKET_V2) }
            .map_err(|e| ctx("TPACKET_V2", e))?;
        let rx = TpacketReq::blocks(rx_blocks.max(1));
        // SAFETY: PACKET_RX_RING takes a tpacket_req; the kernel allocates
        // the ring itself (no caller memory).
        unsafe { setsockopt_raw(fd, SOL_PACKET, PACKET_RX_RING, &rx) }
            .map_err(|e| ctx("RX ring", e))?;
        let mut len = rx.block_nr as usize * BLOCK_SIZE;
        let mut tx_frames = 0;
        if let Some(tx_blocks) = tx_blocks {
            let tx = TpacketReq::blocks(tx_blocks.max(1));
            // SAFETY: as for the RX ring.
            unsafe { setsockopt_raw(fd, SOL_PACKET, PACKET_TX_RING, &tx) }
                .map_err(|e| ctx("TX ring", e))?;
            tx_frames = tx.frame_nr as usize;
            len += tx.block_nr as usize * BLOCK_SIZE;
        }
        // The kernel maps only a length equal to the rings it allocated.
        let map = Mmap::shared(fd, len, 0, Extra::Locked)
            // MAP_LOCKED needs RLIMIT_MEMLOCK room: try without.
            .or_else(|_| Mmap::shared(fd, len, 0, Extra::None))
            .map_err(|e| ctx("mmap", e))?;
        Ok(Rings {
            map,
            rx_frames: rx.frame_nr as usize,
            tx_frames,
        })
    }

    /// Frames in the RX ring.
    pub fn rx_frames(&self) -> usize {
        self.rx_frames
    }

    /// Frames in the TX ring (0 without one).
    pub fn tx_frames(&self) -> usize {
        self.tx_frames
    }

    /// The status word of frame `i` of the ring starting at frame `first`;
    /// `None` past the end.
    #[inline(always)]
    fn status(&self, first: usize, i: usize, frames: usize) -> Option<&AtomicU32> {
        if i >= frames {
            return None;
        }
        let off = (first + i) * FRAME_SIZE;
        debug_assert!(self.map.contains(off, FRAME_SIZE));
        // SAFETY: frame `first + i` lies inside the mapping (the rings are
        // `rx_frames + tx_frames` frames of FRAME_SIZE, the length mapped)
        // and is 4-byte aligned (frames are 2048-aligned in a page-aligned
        // mapping).
        Some(unsafe { self.map.atomic_u32_unchecked(off) })
    }

    /// True if RX frame `i` is the user's (a frame is waiting there).
    #[inline(always)]
    pub fn rx_ready(&self, i: usize) -> bool {
        self.status(0, i, self.rx_frames)
            .is_some_and(|s| s.load(Ordering::Acquire) & TP_STATUS_USER != 0)
    }

    /// RX frame `i`, if the kernel has handed it to user space; until
    /// [`Rings::rx_release`] the kernel leaves it alone.
    #[inline(always)]
    pub fn rx_frame(&self, i: usize) -> Option<RxFrame<'_>> {
        if !self.rx_ready(i) {
            return None;
        }
        let at = i * FRAME_SIZE;
        // SAFETY: `i` < rx_frames (`rx_ready` checked it), so these header
        // fields (offsets < 64 of frame `i`'s FRAME_SIZE bytes) lie inside
        // the mapping.
        let (snaplen, len, mac, sec, nsec, pkttype) = unsafe {
            (
                self.map.read_unchecked::<u32>(at + H_SNAPLEN) as usize,
                self.map.read_unchecked::<u32>(at + H_LEN) as usize,
                usize::from(self.map.read_unchecked::<u16>(at + H_MAC)),
                self.map.read_unchecked::<u32>(at + H_SEC),
                self.map.read_unchecked::<u32>(at + H_NSEC),
                self.map.read_unchecked::<u8>(at + H_PKTTYPE),
            )
        };
        let data = if mac + snaplen > FRAME_SIZE {
            None
        } else {
            // SAFETY: [mac, mac + snaplen) lies inside frame `i` (checked);
            // its status is TP_STATUS_USER, so the kernel does not write it
            // until `rx_release`, which needs `&mut self` (this borrow ended).
            unsafe { self.map.slice(at + mac, snaplen) }
        };
        Some(RxFrame {
            len,
            snaplen,
            pkttype,
            ts_ns: u64::from(sec) * 1_000_000_000 + u64::from(nsec),
            data,
        })
    }

    /// Hands RX frame `i` back to the kernel.
    #[inline(always)]
    pub fn rx_release(&mut self, i: usize) {
        if let Some(s) = self.status(0, i, self.rx_frames) {
            s.store(TP_STATUS_KERNEL, Ordering::Release);
        }
    }

    /// Writes `frame` into TX frame `i` and hands it to the kernel to
    /// send (at the next kick); false (nothing written) if the slot is
    /// still the kernel's, `i` past the ring or `frame` longer than
    /// [`MAX_FRAME`].
    #[inline(always)]
    pub fn tx_write(&mut self, i: usize, frame: &[u8]) -> bool {
        let free = match self.status(self.rx_frames, i, self.tx_frames) {
            Some(s) => matches!(
                s.load(Ordering::Acquire),
                TP_STATUS_AVAILABLE | TP_STATUS_WRONG_FORMAT
            ),
            None => false,
        };
        if !free || frame.len() > MAX_FRAME {
            return false;
        }
        let at = (self.rx_frames + i) * FRAME_SIZE;
        // The slot is ours (status AVAILABLE) until we hand it over:
        // [TX_DATA, TX_DATA + len) fits in it (len ≤ MAX_FRAME), and tp_len
        // is a 4-byte field at offset 4.
        let copied = self.map.copy_in(at + TX_DATA, frame);
        let written = self.map.write(at + H_LEN, frame.len() as u32);
        debug_assert!(copied && written);
        if let Some(s) = self.status(self.rx_frames, i, self.tx_frames) {
            s.store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        }
        true
    }
}
