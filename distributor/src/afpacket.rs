//! The AF_PACKET backend: memory-mapped TPACKET_V2 receive and transmit rings per port, no syscall per frame, one socket set per worker joined in a hash fan-out group.
//!
//! Receiving takes every frame the kernel has put in a port's RX ring
//! (status `TP_STATUS_USER`) without a system call; only when every ring is
//! empty does the worker `poll` (bounded by the poll time). Sending writes
//! frames into the port's TX ring and marks them `TP_STATUS_SEND_REQUEST`;
//! `flush` kicks each port with pending frames with one `sendto`, so a batch
//! costs one system call per port, not per frame. `PACKET_QDISC_BYPASS`
//! hands frames straight to the driver; `PACKET_IGNORE_OUTGOING` keeps the
//! backend from receiving its own output (older kernels: such frames are
//! recognised by their packet type and skipped).
//!
//! Several workers: each opens its own socket per port, and the sockets of a
//! port form one `PACKET_FANOUT_HASH` group, so the kernel spreads flows over
//! the workers by a symmetric flow hash — a flow's packets, both directions
//! and every fragment (the kernel hashes fragments by addresses only), meet
//! the same worker, whose fragment and transition memories need them.
//!
//! TPACKET_V2 and not V3: V3's receive blocks only pay off with a block
//! timeout tuned against latency, and its transmit ring is V2's anyway; one
//! frame layout for both rings keeps this file small. Frames up to 2,000
//! bytes (standard MTU, VLAN tags included); larger ones are truncated by
//! the kernel and dropped here (counted as receive errors).
//!
//! This is the only module of the crate with `unsafe` code: the rings are
//! memory shared with the kernel.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::io::{Backend, Batch};
use crate::verdict::PortId;

const ETH_P_ALL: u16 = 0x0003;
const SOL_PACKET: libc::c_int = 263;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V2: libc::c_int = 1;
const PACKET_FANOUT_HASH: u32 = 0;
const PACKET_OUTGOING: u8 = 4;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;

/// Bytes per ring frame (header + data).
pub const FRAME_SIZE: usize = 2048;
/// Bytes per ring block.
const BLOCK_SIZE: usize = 1 << 20;
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

/// How frames are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    /// A memory-mapped TX ring, kicked once per batch.
    Ring,
    /// Frames copied into a per-port staging area and sent with one
    /// `sendmmsg` per batch (no zero-copy pages to copy again on delivery to
    /// a local veth peer, no per-frame completion callback).
    Sendmmsg,
}

/// Ring sizes and the send mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Blocks of 1 MiB (512 frames each) in each port's RX ring.
    pub rx_blocks: u32,
    /// Blocks in each port's TX ring (`TxMode::Ring`).
    pub tx_blocks: u32,
    /// How frames are sent.
    pub tx: TxMode,
    /// Hand sent frames straight to the driver (`PACKET_QDISC_BYPASS`).
    /// The kernel then picks the transmit queue by CPU, not by flow: a
    /// traffic generator that must spread flows over a multi-queue link's
    /// queues turns it off.
    pub qdisc_bypass: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            rx_blocks: 4,
            tx_blocks: 4,
            tx: TxMode::Sendmmsg,
            qdisc_bypass: true,
        }
    }
}

/// How long an idle worker busy-polls its rings before it sleeps in poll(2).
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Frames staged per port before a `sendmmsg`.
const STAGE_FRAMES: usize = 256;

#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

/// One port: its socket and the two mapped rings.
#[derive(Debug)]
struct Port {
    fd: libc::c_int,
    map: *mut u8,
    map_len: usize,
    rx_frames: usize,
    tx_frames: usize,
    rx_next: usize,
    tx_next: usize,
    pending: bool,
    filter_outgoing: bool,
    /// `TxMode::Sendmmsg`: staged frames, their lengths, and the message
    /// arrays (allocated once; their pointers are refreshed at each flush).
    stage: Vec<u8>,
    stage_len: Vec<usize>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    tx_ring: bool,
}

// SAFETY: the mapping is owned by this value alone (no other pointer to it
// escapes), and a `Port` is used by one thread at a time (`&mut self`).
unsafe impl Send for Port {}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are exactly what mmap returned, unmapped
        // once; `fd` is our open socket, closed once.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
            libc::close(self.fd);
        }
    }
}

fn setsockopt<T>(fd: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    sockopt(fd, SOL_PACKET, name, value)
}

/// setsockopt(2) of option `name` at `level` to `value`.
pub(crate) fn sockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed; the kernel
    // only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `e`, prefixed with the interface and what was being done.
pub(crate) fn err(what: &str, iface: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{iface}: {what}: {e}"))
}

/// The interface index of `iface`, or an error naming it.
pub(crate) fn ifindex(iface: &str) -> io::Result<u32> {
    let name = CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: `name` is a valid C string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(err("no such interface", iface, io::Error::last_os_error()));
    }
    Ok(index)
}

impl Port {
    fn open(iface: &str, rings: RingConfig, fanout: Option<u16>) -> io::Result<Port> {
        let ifindex = ifindex(iface)?;
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                libc::c_int::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(err("socket", iface, io::Error::last_os_error()));
        }
        let mut port = Port {
            fd,
            map: std::ptr::null_mut(),
            map_len: 0,
            rx_frames: 0,
            tx_frames: 0,
            rx_next: 0,
            tx_next: 0,
            pending: false,
            filter_outgoing: false,
            stage: Vec::new(),
            stage_len: Vec::new(),
            iov: Vec::new(),
            msgs: Vec::new(),
            tx_ring: rings.tx == TxMode::Ring,
        };
        let per_block = BLOCK_SIZE / FRAME_SIZE;
        setsockopt(fd, PACKET_VERSION, &TPACKET_V2).map_err(|e| err("TPACKET_V2", iface, e))?;
        let rx = TpacketReq {
            block_size: BLOCK_SIZE as u32,
            block_nr: rings.rx_blocks.max(1),
            frame_size: FRAME_SIZE as u32,
            frame_nr: rings.rx_blocks.max(1) * per_block as u32,
        };
        let tx = TpacketReq {
            block_size: BLOCK_SIZE as u32,
            block_nr: rings.tx_blocks.max(1),
            frame_size: FRAME_SIZE as u32,
            frame_nr: rings.tx_blocks.max(1) * per_block as u32,
        };
        setsockopt(fd, PACKET_RX_RING, &rx).map_err(|e| err("RX ring", iface, e))?;
        port.rx_frames = rx.frame_nr as usize;
        let mut len = rx.block_nr as usize * BLOCK_SIZE;
        if port.tx_ring {
            setsockopt(fd, PACKET_TX_RING, &tx).map_err(|e| err("TX ring", iface, e))?;
            port.tx_frames = tx.frame_nr as usize;
            len += tx.block_nr as usize * BLOCK_SIZE;
        } else {
            port.stage = vec![0u8; STAGE_FRAMES * FRAME_SIZE];
            port.stage_len = Vec::with_capacity(STAGE_FRAMES);
            port.iov = Vec::with_capacity(STAGE_FRAMES);
            port.msgs = Vec::with_capacity(STAGE_FRAMES);
        }
        // SAFETY: maps the rings the kernel just allocated for this socket;
        // the result is checked before use and unmapped in `drop`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED,
                fd,
                0,
            )
        };
        let map = if map == libc::MAP_FAILED {
            // MAP_LOCKED needs RLIMIT_MEMLOCK room: try without.
            // SAFETY: as above.
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                return Err(err("mmap", iface, io::Error::last_os_error()));
            }
            m
        } else {
            map
        };
        port.map = map.cast();
        port.map_len = len;
        // Output straight to the driver; and never our own output back.
        if rings.qdisc_bypass {
            let _ = setsockopt(fd, PACKET_QDISC_BYPASS, &1i32);
        }
        port.filter_outgoing = setsockopt(fd, PACKET_IGNORE_OUTGOING, &1i32).is_err();
        // SAFETY: a zeroed sockaddr_ll is valid; we fill the fields bind reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a live sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(err("bind", iface, io::Error::last_os_error()));
        }
        if let Some(group) = fanout {
            let arg: u32 = u32::from(group) | (PACKET_FANOUT_HASH << 16);
            setsockopt(fd, PACKET_FANOUT, &arg).map_err(|e| err("fanout", iface, e))?;
        }
        Ok(port)
    }

    /// The status word of frame `i` of the ring starting at `base`.
    #[inline(always)]
    fn status(&self, base: usize, i: usize) -> &AtomicU32 {
        // SAFETY: `base + i * FRAME_SIZE` lies inside the mapping (i < frames
        // of that ring), is 4-byte aligned (frames are 2048-aligned in a
        // page-aligned mapping), and the kernel accesses this word
        // atomically too.
        unsafe { &*(self.map.add(base + i * FRAME_SIZE) as *const AtomicU32) }
    }

    #[inline(always)]
    fn frame(&self, base: usize, i: usize) -> *mut u8 {
        // SAFETY: inside the mapping, as in `status`.
        unsafe { self.map.add(base + i * FRAME_SIZE) }
    }

    fn tx_base(&self) -> usize {
        self.rx_frames * FRAME_SIZE
    }

    /// Sends the staged frames with `sendmmsg` (as many calls as it takes).
    fn send_staged(&mut self) -> io::Result<()> {
        let n = self.stage_len.len();
        self.iov.clear();
        self.msgs.clear();
        for (i, &len) in self.stage_len.iter().enumerate() {
            self.iov.push(libc::iovec {
                // SAFETY: slot i of the staging area holds `len` bytes.
                iov_base: unsafe { self.stage.as_mut_ptr().add(i * FRAME_SIZE) }.cast(),
                iov_len: len,
            });
        }
        for i in 0..n {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            // SAFETY: msgs[done..n] are live mmsghdr whose iovecs point into
            // `stage`, which outlives the call; the socket is bound to its
            // interface, so no address is needed.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd,
                    self.msgs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                result = Err(io::Error::last_os_error());
                break;
            }
            done += r as usize;
        }
        self.stage_len.clear();
        result
    }
}

#[inline(always)]
fn read_u32(p: *const u8, off: usize) -> u32 {
    // SAFETY: callers pass a frame pointer and a header offset inside it.
    unsafe { std::ptr::read_unaligned(p.add(off).cast::<u32>()) }
}

#[inline(always)]
fn read_u16(p: *const u8, off: usize) -> u16 {
    // SAFETY: as in `read_u32`.
    unsafe { std::ptr::read_unaligned(p.add(off).cast::<u16>()) }
}

/// The AF_PACKET backend of one worker.
#[derive(Debug)]
pub struct AfPacketBackend {
    ports: Vec<Port>,
    /// Every port's descriptor, for the idle `poll`.
    poll_set: Vec<libc::pollfd>,
    /// The last wait ended with nothing: no spin before the next.
    quiet: bool,
    poll_ms: i32,
    next_port: usize,
    /// Frames the kernel truncated (larger than a ring frame), dropped.
    pub oversized: u64,
    /// Frames the kernel dropped for want of ring room (PACKET_STATISTICS
    /// resets on read: the running sum).
    kernel_drops: u64,
}

impl AfPacketBackend {
    /// Opens `interfaces` (one port each, in order) for one worker. With
    /// `group_base`, each port's socket joins the fan-out group
    /// `group_base + port`, which every worker of the process joins: the
    /// kernel then spreads the port's flows over the workers.
    pub fn open(
        interfaces: &[&str],
        rings: RingConfig,
        poll_ms: u64,
        group_base: Option<u16>,
    ) -> io::Result<Self> {
        let ports = interfaces
            .iter()
            .enumerate()
            .map(|(i, name)| Port::open(name, rings, group_base.map(|g| g.wrapping_add(i as u16))))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(AfPacketBackend {
            poll_set: poll_set(ports.iter().map(|p| p.fd)),
            quiet: false,
            ports,
            poll_ms: poll_ms.min(1000) as i32,
            next_port: 0,
            oversized: 0,
            kernel_drops: 0,
        })
    }

    /// Takes what the RX rings hold into `batch`; the number taken.
    fn drain_rx(&mut self, batch: &mut Batch) -> usize {
        let n = self.ports.len();
        let mut taken = 0;
        for k in 0..n {
            let pi = (self.next_port + k) % n;
            let port = &mut self.ports[pi];
            while batch.len() < batch.capacity() {
                let st = port.status(0, port.rx_next);
                let status = st.load(Ordering::Acquire);
                if status & TP_STATUS_USER == 0 {
                    break;
                }
                let f = port.frame(0, port.rx_next);
                let snap = read_u32(f, H_SNAPLEN) as usize;
                let len = read_u32(f, H_LEN) as usize;
                let mac = usize::from(read_u16(f, H_MAC));
                // SAFETY: the pkttype byte lies in the frame's sockaddr_ll.
                let pkttype = unsafe { *f.add(H_PKTTYPE) };
                let ts =
                    u64::from(read_u32(f, H_SEC)) * 1_000_000_000 + u64::from(read_u32(f, H_NSEC));
                if snap < len || mac + snap > FRAME_SIZE {
                    self.oversized += 1;
                } else if !(port.filter_outgoing && pkttype == PACKET_OUTGOING) {
                    // SAFETY: [mac, mac + snap) lies inside this frame (checked above).
                    let data = unsafe { std::slice::from_raw_parts(f.add(mac), snap) };
                    if batch.push(pi as PortId, ts, data) {
                        taken += 1;
                    }
                }
                st.store(TP_STATUS_KERNEL, Ordering::Release);
                port.rx_next = (port.rx_next + 1) % port.rx_frames;
            }
        }
        self.next_port = (self.next_port + 1) % n.max(1);
        taken
    }
}

impl Backend for AfPacketBackend {
    fn ports(&self) -> usize {
        self.ports.len()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        let n = self.drain_rx(batch);
        if n > 0 {
            self.quiet = false;
            return Ok(n);
        }
        let ports = &self.ports;
        if !self.quiet
            && spin_until_ready(|| {
                ports
                    .iter()
                    .any(|p| p.status(0, p.rx_next).load(Ordering::Acquire) & TP_STATUS_USER != 0)
            })
        {
            return Ok(self.drain_rx(batch));
        }
        wait_readable(&mut self.poll_set, self.poll_ms)?;
        let n = self.drain_rx(batch);
        self.quiet = n == 0;
        Ok(n)
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        let p = self
            .ports
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?;
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a ring slot",
            ));
        }
        if !p.tx_ring {
            if p.stage_len.len() == STAGE_FRAMES {
                p.send_staged()?;
            }
            let at = p.stage_len.len() * FRAME_SIZE;
            p.stage[at..at + frame.len()].copy_from_slice(frame);
            p.stage_len.push(frame.len());
            p.pending = true;
            return Ok(());
        }
        let base = p.tx_base();
        let mut tries = 0;
        loop {
            let st = p.status(base, p.tx_next);
            match st.load(Ordering::Acquire) {
                TP_STATUS_AVAILABLE | TP_STATUS_WRONG_FORMAT => break,
                _ if tries == 0 => {
                    // Ring full: let the kernel send what is queued, once.
                    tries += 1;
                    kick(p.fd)?;
                }
                _ => return Err(io::Error::new(io::ErrorKind::WouldBlock, "TX ring full")),
            }
        }
        let f = p.frame(base, p.tx_next);
        // SAFETY: the slot is ours (status AVAILABLE) until we hand it over;
        // [TX_DATA, TX_DATA + len) fits in it (len ≤ MAX_FRAME), and
        // tp_len is a 4-byte field at offset 4.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), f.add(TX_DATA), frame.len());
            std::ptr::write_unaligned(f.add(H_LEN).cast::<u32>(), frame.len() as u32);
        }
        p.status(base, p.tx_next)
            .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        p.tx_next = (p.tx_next + 1) % p.tx_frames;
        p.pending = true;
        Ok(())
    }

    fn dropped(&mut self) -> u64 {
        for p in &self.ports {
            let mut st = libc::tpacket_stats {
                tp_packets: 0,
                tp_drops: 0,
            };
            let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
            // SAFETY: `st` is a live tpacket_stats of `len` bytes.
            let r = unsafe {
                libc::getsockopt(
                    p.fd,
                    SOL_PACKET,
                    PACKET_STATISTICS,
                    (&mut st as *mut libc::tpacket_stats).cast(),
                    &mut len,
                )
            };
            if r == 0 {
                self.kernel_drops += u64::from(st.tp_drops);
            }
        }
        self.oversized + self.kernel_drops
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for p in self.ports.iter_mut().filter(|p| p.pending) {
            p.pending = false;
            let sent = if p.tx_ring {
                kick(p.fd)
            } else {
                p.send_staged()
            };
            if let Err(e) = sent {
                result = Err(e);
            }
        }
        result
    }
}

/// Busy-polls `ready` for up to [`SPIN`] before a worker sleeps in
/// poll(2): under load the next frames are microseconds away, and a wake-up
/// per frame (with a batch of one) would cost more than the frame itself.
/// True as soon as `ready` is.
pub(crate) fn spin_until_ready(mut ready: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + SPIN;
    while std::time::Instant::now() < until {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// The `poll` set of some descriptors, built once.
pub(crate) fn poll_set(fds: impl Iterator<Item = libc::c_int>) -> Vec<libc::pollfd> {
    fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    })
    .collect()
}

/// Waits up to `ms` milliseconds for any descriptor of `set` to be
/// readable (one `poll`, no allocation); an interrupted wait is not an error.
pub(crate) fn wait_readable(set: &mut [libc::pollfd], ms: i32) -> io::Result<()> {
    // SAFETY: `set` is a live array of `set.len()` pollfd structures.
    let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Asks the kernel to send what a socket's TX ring holds (one syscall);
/// a full queue or a busy socket is not an error (the frames stay queued).
pub(crate) fn kick(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: sendto with no buffer and no address: the TX ring is the data.
    let r = unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}
