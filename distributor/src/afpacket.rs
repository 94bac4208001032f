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
//! No FFI here (only `crate::sys` may hold it): the socket calls are `crate::sys::socket`'s, the
//! rings `crate::sys::packet`'s (which lends a frame only while the ring
//! gives it to user space).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::io::{Backend, Batch};
use crate::sys::packet::{Rings, PACKET_OUTGOING};
pub use crate::sys::packet::{FRAME_SIZE, MAX_FRAME};
use crate::sys::socket::{
    self, PacketFanout, PacketIgnoreOutgoing, PacketQdiscBypass, PacketStatistics, PollSet,
    SendBatch,
};
use crate::verdict::PortId;

const ETH_P_ALL: u16 = 0x0003;
const PACKET_FANOUT_HASH: u32 = 0;

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

/// One port: its socket and the two mapped rings (or the staging area
/// of `TxMode::Sendmmsg`).
#[derive(Debug)]
struct Port {
    rings: Rings,
    fd: OwnedFd,
    rx_next: usize,
    tx_next: usize,
    pending: bool,
    filter_outgoing: bool,
    /// `TxMode::Sendmmsg`: the staged frames.
    stage: Option<SendBatch>,
}

/// `e`, prefixed with the interface and what was being done.
pub(crate) fn err(what: &str, iface: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{iface}: {what}: {e}"))
}

/// `e` (which names the step), prefixed with the interface.
fn on(iface: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{iface}: {e}"))
}

/// The interface index of `iface`, or an error naming it.
pub fn ifindex(iface: &str) -> io::Result<u32> {
    let name = CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    socket::if_nametoindex(&name).map_err(|e| err("no such interface", iface, e))
}

impl Port {
    fn open(iface: &str, rings: RingConfig, fanout: Option<u16>) -> io::Result<Port> {
        let ifindex = ifindex(iface)?;
        let fd = socket::packet_socket(ETH_P_ALL).map_err(|e| err("socket", iface, e))?;
        let tx_ring = rings.tx == TxMode::Ring;
        let ring = Rings::setup(
            fd.as_fd(),
            rings.rx_blocks,
            tx_ring.then_some(rings.tx_blocks),
        )
        .map_err(|e| on(iface, e))?;
        let stage = (!tx_ring).then(|| SendBatch::new(STAGE_FRAMES, FRAME_SIZE));
        // Output straight to the driver; and never our own output back.
        if rings.qdisc_bypass {
            let _ = socket::set(fd.as_fd(), PacketQdiscBypass, 1);
        }
        let filter_outgoing = socket::set(fd.as_fd(), PacketIgnoreOutgoing, 1).is_err();
        socket::bind_packet(fd.as_fd(), ifindex, ETH_P_ALL).map_err(|e| err("bind", iface, e))?;
        if let Some(group) = fanout {
            let arg: u32 = u32::from(group) | (PACKET_FANOUT_HASH << 16);
            socket::set(fd.as_fd(), PacketFanout, arg).map_err(|e| err("fanout", iface, e))?;
        }
        Ok(Port {
            rings: ring,
            fd,
            rx_next: 0,
            tx_next: 0,
            pending: false,
            filter_outgoing,
            stage,
        })
    }
}

/// The AF_PACKET backend of one worker.
#[derive(Debug)]
pub struct AfPacketBackend {
    ports: Vec<Port>,
    /// Every port's descriptor, for the idle `poll`.
    poll_set: PollSet,
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
            poll_set: PollSet::new(ports.iter().map(|p| p.fd.as_raw_fd())),
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
                let Some(f) = port.rings.rx_frame(port.rx_next) else {
                    break;
                };
                match f.data {
                    Some(data) if f.snaplen >= f.len => {
                        if !(port.filter_outgoing && f.pkttype == PACKET_OUTGOING)
                            && batch.push(pi as PortId, f.ts_ns, data)
                        {
                            taken += 1;
                        }
                    }
                    _ => self.oversized += 1,
                }
                port.rings.rx_release(port.rx_next);
                port.rx_next = (port.rx_next + 1) % port.rings.rx_frames();
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
        if !self.quiet && spin_until_ready(|| ports.iter().any(|p| p.rings.rx_ready(p.rx_next))) {
            return Ok(self.drain_rx(batch));
        }
        self.poll_set.wait(self.poll_ms)?;
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
        if let Some(stage) = &mut p.stage {
            if stage.is_full() {
                stage.send(p.fd.as_fd())?;
            }
            stage.push(frame);
            p.pending = true;
            return Ok(());
        }
        let mut tries = 0;
        // The slot is written only when it is ours (status AVAILABLE).
        while !p.rings.tx_write(p.tx_next, frame) {
            if tries == 0 {
                // Ring full: let the kernel send what is queued, once.
                tries += 1;
                socket::kick(p.fd.as_fd())?;
            } else {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "TX ring full"));
            }
        }
        p.tx_next = (p.tx_next + 1) % p.rings.tx_frames();
        p.pending = true;
        Ok(())
    }

    fn dropped(&mut self) -> u64 {
        for p in &self.ports {
            if let Ok(st) = socket::get(p.fd.as_fd(), PacketStatistics) {
                self.kernel_drops += u64::from(st.tp_drops);
            }
        }
        self.oversized + self.kernel_drops
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for p in self.ports.iter_mut().filter(|p| p.pending) {
            p.pending = false;
            let sent = match &mut p.stage {
                Some(stage) => stage.send(p.fd.as_fd()),
                None => socket::kick(p.fd.as_fd()),
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
