//! The AF_XDP backend: a six-instruction XDP program per port redirects each receive queue to an XDP socket, whose UMEM rings move frames in batches without a system call per frame.
//!
//! Setup ([`XdpPorts::attach`], once per process): for each port an
//! `XSKMAP` (one entry per queue) and an XDP program —
//! `return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)` — written
//! here as BPF instructions (no compiler, no libbpf) and attached with a BPF
//! link, native (driver) mode first, generic mode as the fallback where the
//! configuration allows it. The link belongs to the process: when `stdd`
//! exits, for whatever reason, the kernel detaches the program and the port
//! is an ordinary interface again. A queue without a socket passes frames
//! to the kernel (`XDP_PASS` is the map's default action).
//!
//! Each worker ([`AfXdpBackend::open`]) opens one socket per port bound to
//! its queue (worker *i* ↔ queue *i*), each with its own UMEM of
//! [`FRAMES`] frames of [`FRAME_SIZE`] bytes: the first half serves the
//! fill/RX rings, the second half is the TX pool. Receiving copies a frame
//! out of the RX ring into the batch and gives its UMEM frame straight back
//! to the fill ring; sending copies into a free TX frame and writes a TX
//! descriptor; `flush` publishes the descriptors and wakes the socket with
//! `sendto` only when the kernel asks for it (`XDP_USE_NEED_WAKEUP`), then
//! takes completed frames back. Zero-copy binding is tried first and copy
//! mode used where the driver has no zero-copy support (veth).
//!
//! Several workers need as many receive queues and a symmetric RSS hash on
//! the ports (both directions of a flow, and all its fragments, must reach
//! the same worker): see `docs/operations.md`.
//!
//! No FFI here (only `crate::sys` may hold it): the socket, its UMEM and
//! rings are
//! `crate::sys::xdp`'s, the socket calls `crate::sys::socket`'s, the
//! `bpf(2)` calls `crate::sys::bpf`'s (typed, sized, owning their
//! descriptors).

use std::io;
use std::os::fd::AsFd;

use crate::afpacket::{err, ifindex, spin_until_ready};
use crate::io::{Backend, Batch};
pub(crate) use crate::sys::bpf::Insn;
use crate::sys::bpf::{Link, Map, MapKind, Program, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE};
use crate::sys::socket::{self, BusyPoll, BusyPollBudget, PollSet, PreferBusyPoll};
use crate::sys::xdp::XdpSocket;
pub use crate::sys::xdp::{FRAMES, FRAME_SIZE, MAX_FRAME};
use crate::verdict::PortId;
use crate::xdp_steer::XdpSteer;

/// Frames one busy poll may take from the driver.
const BUSY_BUDGET: u32 = 64;

pub(crate) const XDP_PASS: i32 = 2;
pub(crate) const BPF_FUNC_REDIRECT_MAP: i32 = 51;

/// Where the XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before any socket buffer exists (fails where the
    /// driver has no XDP support).
    Native,
    /// In the kernel's generic receive path (any interface; slower).
    Generic,
    /// Native where the driver supports it, generic elsewhere.
    Auto,
}

impl<'de> serde::Deserialize<'de> for XdpMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "native" => Ok(XdpMode::Native),
            "generic" => Ok(XdpMode::Generic),
            "auto" => Ok(XdpMode::Auto),
            other => Err(serde::de::Error::custom(format!(
                "xdp_mode \"{other}\": expected \"native\", \"generic\" or \"auto\""
            ))),
        }
    }
}

/// The redirect program for an XSKMAP descriptor.
fn program(map_fd: i32) -> [Insn; 6] {
    let i = |code, dst: u8, src: u8, off, imm| Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    };
    [
        // r2 = ctx->rx_queue_index (struct xdp_md, offset 16)
        i(0x61, 2, 1, 16, 0),
        // r1 = &xsks (ld_imm64, src = BPF_PSEUDO_MAP_FD)
        i(0x18, 1, 1, 0, map_fd),
        i(0, 0, 0, 0, 0),
        // r3 = XDP_PASS (the action when the queue has no socket)
        i(0xb7, 3, 0, 0, XDP_PASS),
        // r0 = bpf_redirect_map(r1, r2, r3)
        i(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        // return r0
        i(0x95, 0, 0, 0, 0),
    ]
}

/// One port's XDP program, its socket map and the link holding it on the
/// interface.
#[derive(Debug)]
struct XdpPort {
    name: String,
    ifindex: u32,
    map: Map,
    _prog: Program,
    _link: Link,
    native: bool,
}

/// The XDP programs on every port of a process; workers open their
/// sockets against it. Dropping it detaches the programs.
#[derive(Debug)]
pub struct XdpPorts {
    ports: Vec<XdpPort>,
    queues: u32,
}

impl XdpPorts {
    /// Loads and attaches the redirect program on each interface, for
    /// `queues` queues (one per worker).
    ///
    /// With `steer`, the ports it names as outside ports run the in-kernel
    /// steering program instead (`crate::xdp_steer`): it sends the common
    /// case to its TM itself and everything else to the sockets.
    pub fn attach(
        interfaces: &[&str],
        queues: u32,
        mode: XdpMode,
        steer: Option<&XdpSteer>,
    ) -> io::Result<Self> {
        let ports = interfaces
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let s = steer.filter(|s| s.steers_port(i));
                XdpPort::attach(name, queues.max(1), mode, s)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(XdpPorts {
            ports,
            queues: queues.max(1),
        })
    }

    /// Which ports run the program in their driver (the others: generic).
    pub fn native(&self) -> Vec<(String, bool)> {
        self.ports
            .iter()
            .map(|p| (p.name.clone(), p.native))
            .collect()
    }
}

/// `bpf_redirect`.
const BPF_FUNC_REDIRECT: i32 = 23;

/// The trivial forwarder: a 4-instruction XDP program that redirects every
/// frame of one interface out of another (`bpf_redirect`), unchanged, in
/// native mode — the forwarding rig's physical limit, which
/// `testbed/bench-forward` holds the in-kernel steering against. Detached
/// when dropped.
#[derive(Debug)]
pub struct RedirectAll {
    _prog: Program,
    _link: Link,
}

/// The trivial forwarder's program alone, loaded (for a benchmark that
/// attaches and swaps programs itself): see [`RedirectAll`].
pub fn redirect_program(to: &str, touch: Touch) -> io::Result<Program> {
    Program::load_xdp(&RedirectAll::program(ifindex(to)?, touch), "std_redirect")
        .map_err(|e| err("loading the redirect program", to, e))
}

/// What the trivial forwarder does to a frame before redirecting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// Nothing: the frame leaves unchanged.
    Nothing,
    /// Sets its destination MAC to this one (the least a steering device
    /// writes).
    SetMac([u8; 6]),
    /// Reads its destination MAC and redirects it only if it is this one
    /// (`XDP_PASS` otherwise): the least a steering device reads.
    CheckMac([u8; 6]),
}

impl RedirectAll {
    /// The program for frames to `to_ifindex` (a frame shorter than 6
    /// bytes is redirected unchanged).
    fn program(to_ifindex: u32, touch: Touch) -> Vec<Insn> {
        let i = |code, dst: u8, src: u8, off, imm| Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        };
        let halves = |m: [u8; 6]| {
            (
                i32::from_le_bytes([m[0], m[1], m[2], m[3]]),
                i32::from(i16::from_le_bytes([m[4], m[5]])),
            )
        };
        // r2 = ctx->data, r3 = ctx->data_end, r4 = r2 + 6; then, if
        // r4 > r3, skip the `n` instructions that follow.
        let bounds = |n: i16| {
            [
                i(0x61, 2, 1, 0, 0),
                i(0x61, 3, 1, 4, 0),
                i(0xbf, 4, 2, 0, 0),
                i(0x07, 4, 0, 0, 6),
                i(0x2d, 4, 3, n, 0),
            ]
        };
        let mut p = Vec::new();
        match touch {
            Touch::Nothing => {}
            Touch::SetMac(m) => {
                let (lo, hi) = halves(m);
                p.extend(bounds(2));
                // *(u32 *)(r2 + 0) = lo; *(u16 *)(r2 + 4) = hi
                p.extend([i(0x62, 2, 0, 0, lo), i(0x6a, 2, 0, 4, hi)]);
            }
            Touch::CheckMac(m) => {
                let (lo, hi) = halves(m);
                p.extend(bounds(7));
                p.extend([
                    // r5 = *(u32 *)(r2 + 0); if r5 != lo: pass
                    i(0x61, 5, 2, 0, 0),
                    i(0x55, 5, 0, 3, lo),
                    // r5 = *(u16 *)(r2 + 4); if r5 != hi: pass
                    i(0x69, 5, 2, 4, 0),
                    i(0x55, 5, 0, 1, hi & 0xffff),
                    i(0x05, 0, 0, 2, 0), // to the redirect
                    // pass: r0 = XDP_PASS; return
                    i(0xb7, 0, 0, 0, XDP_PASS),
                    i(0x95, 0, 0, 0, 0),
                ]);
            }
        }
        p.extend([
            // r1 = the target interface; r2 = flags (0)
            i(0xb7, 1, 0, 0, to_ifindex as i32),
            i(0xb7, 2, 0, 0, 0),
            // r0 = bpf_redirect(r1, r2); return r0
            i(0x85, 0, 0, 0, BPF_FUNC_REDIRECT),
            i(0x95, 0, 0, 0, 0),
        ]);
        p
    }

    /// Attaches it to `from` (native XDP), redirecting to `to`.
    pub fn attach(from: &str, to: &str) -> io::Result<Self> {
        let from_index = ifindex(from)?;
        let prog = redirect_program(to, Touch::Nothing)?;
        let link = Link::xdp(&prog, from_index, XDP_FLAGS_DRV_MODE)
            .map_err(|e| err("attaching the redirect program in native mode", from, e))?;
        Ok(RedirectAll {
            _prog: prog,
            _link: link,
        })
    }
}

impl XdpPort {
    fn attach(
        name: &str,
        queues: u32,
        mode: XdpMode,
        steer: Option<&XdpSteer>,
    ) -> io::Result<XdpPort> {
        let ifindex = ifindex(name)?;
        let map = Map::create(MapKind::XskMap, 4, queues, "std_xsks")
            .map_err(|e| err("XSKMAP", name, e))?;
        let prog = match steer {
            Some(s) => Program::load_xdp(&s.program(map.raw()), "std_steer"),
            None => Program::load_xdp(&program(map.raw()), "std_xsk"),
        }
        .map_err(|e| err("loading the XDP program", name, e))?;
        let link = |flags: u32| Link::xdp(&prog, ifindex, flags);
        let (link, native) = match mode {
            XdpMode::Native => (link(XDP_FLAGS_DRV_MODE), true),
            XdpMode::Generic => (link(XDP_FLAGS_SKB_MODE), false),
            // Generic only where the driver has no native XDP; any other
            // failure (a program already there) is reported as it is.
            XdpMode::Auto => match link(XDP_FLAGS_DRV_MODE) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    (link(XDP_FLAGS_SKB_MODE), false)
                }
                other => (other, true),
            },
        };
        let link = link.map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EBUSY | libc::EEXIST) => {
                    " (another XDP program is attached: see `ip link show`; `ip link set dev IF xdp off` removes one attached by ip)"
                }
                _ => "",
            };
            err(
                &format!(
                    "attaching the XDP program in {} mode{hint}",
                    if native { "native" } else { "generic" }
                ),
                name,
                e,
            )
        })?;
        Ok(XdpPort {
            name: name.to_string(),
            ifindex,
            map,
            _prog: prog,
            _link: link,
            native,
        })
    }

    fn update(&self, queue: u32, xsk: i32) -> io::Result<()> {
        self.map.update(queue, &(xsk as u32).to_ne_bytes())
    }
}

/// One XDP socket (a port's queue for one worker), bound, in its port's
/// XSKMAP.
fn open_xsk(port: &XdpPort, queue: u32, busy_poll_us: u32) -> io::Result<XdpSocket> {
    let name = port.name.as_str();
    let on = |e: io::Error| io::Error::new(e.kind(), format!("{name}: {e}"));
    let mut xsk = XdpSocket::new().map_err(on)?;
    if !(port.native && xsk.bind(port.ifindex, queue, true).is_ok()) {
        xsk.bind(port.ifindex, queue, false).map_err(|e| {
            err(
                &format!(
                    "binding an XDP socket to queue {queue} (the interface needs that many queues)"
                ),
                name,
                e,
            )
        })?;
    }
    if busy_poll_us > 0 {
        let fd = xsk.as_fd();
        socket::set(fd, PreferBusyPoll, 1)
            .and_then(|()| socket::set(fd, BusyPoll, busy_poll_us))
            .and_then(|()| socket::set(fd, BusyPollBudget, BUSY_BUDGET))
            .map_err(|e| err("busy-poll options", name, e))?;
    }
    port.update(queue, xsk.raw())
        .map_err(|e| err("XSKMAP entry", name, e))?;
    Ok(xsk)
}

/// The AF_XDP backend of one worker: a socket per port on the worker's queue.
#[derive(Debug)]
pub struct AfXdpBackend {
    /// One socket per port. Closing one takes it out of its port's map
    /// (the kernel does), and the queue's frames pass to the kernel again.
    xsks: Vec<XdpSocket>,
    poll_set: PollSet,
    /// The last wait ended with nothing: no spin before the next (an idle
    /// worker — the kernel steering every frame — sleeps in poll(2)).
    quiet: bool,
    poll_ms: i32,
    next_port: usize,
    /// Frames the kernel reported larger than a UMEM frame, dropped.
    pub oversized: u64,
    busy: bool,
}

impl AfXdpBackend {
    /// Opens a socket on queue `queue` of every port of `ports`, in order.
    /// With `busy_poll_us` > 0 the worker runs the queues' NAPI polls
    /// itself (`SO_PREFER_BUSY_POLL`; pair it with the interfaces'
    /// `napi_defer_hard_irqs` and `gro_flush_timeout`, docs/operations.md).
    pub fn open(ports: &XdpPorts, queue: u32, poll_ms: u64, busy_poll_us: u32) -> io::Result<Self> {
        if queue >= ports.queues {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue {queue}: the programs were set up for {} queues",
                    ports.queues
                ),
            ));
        }
        let xsks = ports
            .ports
            .iter()
            .map(|p| open_xsk(p, queue, busy_poll_us))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(AfXdpBackend {
            poll_set: PollSet::new(xsks.iter().map(|x| x.raw())),
            quiet: false,
            xsks,
            poll_ms: poll_ms.min(1000) as i32,
            next_port: 0,
            oversized: 0,
            busy: busy_poll_us > 0,
        })
    }

    /// True if every socket runs zero-copy.
    pub fn zerocopy(&self) -> bool {
        self.xsks.iter().all(|x| x.zerocopy())
    }

    fn drain_rx(&mut self, batch: &mut Batch) -> usize {
        let n = self.xsks.len();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut taken = 0;
        for k in 0..n {
            let pi = (self.next_port + k) % n;
            let room = (batch.capacity() - batch.len()) as u32;
            let oversized = &mut self.oversized;
            self.xsks[pi].receive(room, |frame| match frame {
                Some(data) => {
                    if batch.push(pi as PortId, ts, data) {
                        taken += 1;
                    }
                }
                None => *oversized += 1,
            });
        }
        self.next_port = (self.next_port + 1) % n.max(1);
        taken
    }
}

impl Backend for AfXdpBackend {
    fn ports(&self) -> usize {
        self.xsks.len()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        if self.busy {
            for x in &self.xsks {
                x.busy_poll();
            }
        }
        let n = self.drain_rx(batch);
        if n > 0 {
            self.quiet = false;
            return Ok(n);
        }
        let (xsks, busy) = (&self.xsks, self.busy);
        if !self.quiet
            && spin_until_ready(|| {
                if busy {
                    for x in xsks {
                        x.busy_poll();
                    }
                }
                xsks.iter().any(|x| x.rx_ready())
            })
        {
            return Ok(self.drain_rx(batch));
        }
        for x in &mut self.xsks {
            // Completions come back while idle too.
            x.reap();
        }
        self.poll_set.wait(self.poll_ms)?;
        let n = self.drain_rx(batch);
        self.quiet = n == 0;
        Ok(n)
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        self.xsks
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?
            .send(frame)
    }

    fn dropped(&mut self) -> u64 {
        let mut kernel = 0;
        for x in &self.xsks {
            if let Ok(st) = x.statistics() {
                // Running totals (not reset on read).
                kernel += st.rx_dropped + st.rx_ring_full + st.tx_invalid_descs;
            }
        }
        self.oversized + kernel
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for x in self.xsks.iter_mut().filter(|x| x.pending()) {
            if let Err(e) = x.flush() {
                result = Err(e);
            }
        }
        result
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// The program's bytes, instruction by instruction (`struct bpf_insn`
    /// little-endian: code, dst | src << 4, off, imm).
    #[test]
    fn the_redirect_program_encodes_as_written() {
        let bytes: Vec<[u8; 8]> = program(7)
            .iter()
            .map(|i| {
                let mut b = [0u8; 8];
                b[0] = i.code;
                b[1] = i.regs;
                b[2..4].copy_from_slice(&i.off.to_le_bytes());
                b[4..].copy_from_slice(&i.imm.to_le_bytes());
                b
            })
            .collect();
        assert_eq!(
            bytes,
            vec![
                [0x61, 0x12, 16, 0, 0, 0, 0, 0], // r2 = *(u32 *)(r1 + 16)
                [0x18, 0x11, 0, 0, 7, 0, 0, 0],  // r1 = map fd 7 (pseudo)
                [0, 0, 0, 0, 0, 0, 0, 0],        // (upper half of the imm64)
                [0xb7, 0x03, 0, 0, 2, 0, 0, 0],  // r3 = XDP_PASS
                [0x85, 0x00, 0, 0, 51, 0, 0, 0], // call bpf_redirect_map
                [0x95, 0, 0, 0, 0, 0, 0, 0],     // exit
            ]
        );
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn a_missing_interface_is_a_clear_error() {
        let e =
            XdpPorts::attach(&["stdx-no-such0"], 1, XdpMode::Auto, None).expect_err("no interface");
        assert!(e.to_string().contains("stdx-no-such0"), "{e}");
        assert!(e.to_string().contains("no such interface"), "{e}");
    }
}
