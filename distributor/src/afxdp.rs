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
//! `unsafe` here is the memory shared with the kernel (UMEM and rings)
//! and the sockets; the `bpf(2)` calls are `crate::sys::bpf`'s (typed,
//! sized, owning their descriptors).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::afpacket::{err, ifindex, kick, poll_set, sockopt, spin_until_ready, wait_readable};
use crate::io::{Backend, Batch};
pub(crate) use crate::sys::bpf::Insn;
use crate::sys::bpf::{Link, Map, MapKind, Program, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE};
use crate::verdict::PortId;
use crate::xdp_steer::XdpSteer;

/// Bytes per UMEM frame.
pub const FRAME_SIZE: usize = 2048;
/// UMEM frames per socket (half for receiving, half for sending).
pub const FRAMES: usize = 4096;
/// Descriptors per ring (each of RX, TX, fill, completion).
const RING: u32 = 2048;
/// Largest frame sent or received.
pub const MAX_FRAME: usize = FRAME_SIZE;
/// Frames one busy poll may take from the driver.
const BUSY_BUDGET: u32 = 64;
/// `sendto` wake-ups per flush at most (copy mode sends 32 frames per call).
const MAX_KICKS: usize = 64;

const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
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

/// `NETDEV_XDP_ACT_NDO_XMIT`: the interface takes frames redirected to it by
/// XDP programs.
pub(crate) const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

/// The XDP features the kernel reports for `ifindex` (the generic netlink
/// family `netdev`, Linux 6.3 and later): which XDP actions it supports,
/// `NETDEV_XDP_ACT_*` bits. A veth pair reports `NDO_XMIT` only while its
/// peer can receive redirected frames (an XDP program or GRO on the peer).
pub(crate) fn xdp_features(ifindex: u32) -> io::Result<u64> {
    // SAFETY: a plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_GENERIC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    sockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // One request, one answer: generic netlink header (cmd, version) and attributes.
    let ask = |family: u16, cmd: u8, attr_type: u16, value: &[u8]| -> io::Result<Vec<u8>> {
        let alen = 4 + value.len();
        let mut m = Vec::with_capacity(32 + value.len());
        let total = 16 + 4 + alen.div_ceil(4) * 4;
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        m.extend_from_slice(&[cmd, 1, 0, 0]);
        m.extend_from_slice(&(alen as u16).to_ne_bytes());
        m.extend_from_slice(&attr_type.to_ne_bytes());
        m.extend_from_slice(value);
        m.resize(total, 0);
        // SAFETY: `m` is a live buffer of the length passed.
        let sent = unsafe { libc::send(sock.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        // SAFETY: `buf` is a live, writable buffer of the length passed.
        let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(got as usize);
        if buf.len() >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return Err(io::Error::from_raw_os_error(-code));
        }
        Ok(buf)
    };
    // Attribute `want` of an answer (after its 16 + 4 header bytes).
    let find = |msg: &[u8], want: u16| -> Option<Vec<u8>> {
        let mut i = 20;
        while i + 4 <= msg.len() {
            let len = usize::from(u16::from_ne_bytes([msg[i], msg[i + 1]]));
            let ty = u16::from_ne_bytes([msg[i + 2], msg[i + 3]]) & 0x3fff;
            if len < 4 || i + len > msg.len() {
                return None;
            }
            if ty == want {
                return Some(msg[i + 4..i + len].to_vec());
            }
            i += len.div_ceil(4) * 4;
        }
        None
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    // CTRL_CMD_GETFAMILY (3) by CTRL_ATTR_FAMILY_NAME (2) → CTRL_ATTR_FAMILY_ID (1).
    let fam = ask(libc::GENL_ID_CTRL as u16, 3, 2, b"netdev\0")?;
    let id = find(&fam, 1)
        .filter(|v| v.len() >= 2)
        .ok_or_else(|| bad("no netdev family"))?;
    let family = u16::from_ne_bytes([id[0], id[1]]);
    // NETDEV_CMD_DEV_GET (1) by NETDEV_A_DEV_IFINDEX (1) → NETDEV_A_DEV_XDP_FEATURES (3).
    let dev = ask(family, 1, 1, &ifindex.to_ne_bytes())?;
    let f = find(&dev, 3)
        .filter(|v| v.len() >= 8)
        .ok_or_else(|| bad("no xdp-features"))?;
    Ok(u64::from_ne_bytes([
        f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
    ]))
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

impl RedirectAll {
    /// The program for frames to `to_ifindex`.
    fn program(to_ifindex: u32) -> [Insn; 4] {
        let i = |code, dst: u8, src: u8, off, imm| Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        };
        [
            // r1 = the target interface; r2 = flags (0)
            i(0xb7, 1, 0, 0, to_ifindex as i32),
            i(0xb7, 2, 0, 0, 0),
            // r0 = bpf_redirect(r1, r2); return r0
            i(0x85, 0, 0, 0, BPF_FUNC_REDIRECT),
            i(0x95, 0, 0, 0, 0),
        ]
    }

    /// Attaches it to `from` (native XDP), redirecting to `to`.
    pub fn attach(from: &str, to: &str) -> io::Result<Self> {
        let (from_index, to_index) = (ifindex(from)?, ifindex(to)?);
        let prog = Program::load_xdp(&Self::program(to_index), "std_redirect")
            .map_err(|e| err("loading the redirect program", from, e))?;
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

/// One mapped ring: producer and consumer indexes, flags, descriptors.
#[derive(Debug)]
struct Ring {
    map: *mut u8,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut u8,
    /// Our copy of the index we advance (producer for fill/TX, consumer
    /// for RX/completion), published with a release store.
    local: u32,
}

impl Ring {
    fn map(
        fd: i32,
        off: &libc::xdp_ring_offset,
        desc_size: usize,
        pgoff: libc::off_t,
    ) -> io::Result<Ring> {
        let map_len = off.desc as usize + RING as usize * desc_size;
        // SAFETY: maps the ring the kernel allocated for this socket at the
        // offset it documents; checked before use, unmapped in `drop`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = map.cast::<u8>();
        // SAFETY: the offsets come from XDP_MMAP_OFFSETS and lie inside the
        // mapping; the index words are 4-byte aligned u32 the kernel also
        // accesses atomically.
        unsafe {
            Ok(Ring {
                map,
                map_len,
                producer: map.add(off.producer as usize).cast(),
                consumer: map.add(off.consumer as usize).cast(),
                flags: map.add(off.flags as usize).cast(),
                descs: map.add(off.desc as usize),
                local: 0,
            })
        }
    }

    #[inline(always)]
    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`).
        unsafe { &*self.producer }
    }

    #[inline(always)]
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { &*self.consumer }
    }

    #[inline(always)]
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as in `producer`.
        unsafe { &*self.flags }.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Descriptor slot `i` (any index; wrapped here) of `size` bytes.
    #[inline(always)]
    fn slot(&self, i: u32, size: usize) -> *mut u8 {
        // SAFETY: (i & (RING - 1)) < RING slots of `size` bytes follow `descs`.
        unsafe { self.descs.add((i & (RING - 1)) as usize * size) }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

const DESC: usize = std::mem::size_of::<libc::xdp_desc>();

/// One XDP socket (a port's queue for one worker) and its UMEM.
#[derive(Debug)]
struct Xsk {
    fd: OwnedFd,
    umem: *mut u8,
    rx: Ring,
    tx: Ring,
    fill: Ring,
    comp: Ring,
    /// TX frames not in flight.
    free: Vec<u64>,
    /// RX frames taken back but not yet on the fill ring (only if it was full).
    spare: Vec<u64>,
    pending: bool,
    zerocopy: bool,
}

// SAFETY: the UMEM and ring mappings are owned by this value alone (no
// other pointer to them escapes) and an `Xsk` is used by one thread at a
// time (`&mut self`).
unsafe impl Send for Xsk {}

impl Drop for Xsk {
    fn drop(&mut self) {
        // SAFETY: the UMEM mapping made in `open`, unmapped once; the socket
        // (closed after, by `OwnedFd`) no longer needs it once closed, and
        // the kernel holds its own page references until then.
        unsafe {
            libc::munmap(self.umem.cast(), FRAMES * FRAME_SIZE);
        }
    }
}

fn set<T>(fd: i32, name: libc::c_int, value: &T) -> io::Result<()> {
    sockopt(fd, libc::SOL_XDP, name, value)
}

impl Xsk {
    fn open(port: &XdpPort, queue: u32, busy_poll_us: u32) -> io::Result<Xsk> {
        let name = port.name.as_str();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("AF_XDP socket", name, io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let len = FRAMES * FRAME_SIZE;
        // SAFETY: an anonymous private mapping, checked; unmapped in `drop`.
        let umem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if umem == libc::MAP_FAILED {
            return Err(err("UMEM", name, io::Error::last_os_error()));
        }
        let umem = umem.cast::<u8>();
        let unmap = |e: io::Error| {
            // SAFETY: the mapping above, on the error path, once.
            unsafe { libc::munmap(umem.cast(), len) };
            e
        };
        // SAFETY: a zeroed xdp_umem_reg is valid; the fields bind reads are set.
        let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
        reg.addr = umem as u64;
        reg.len = len as u64;
        reg.chunk_size = FRAME_SIZE as u32;
        set(raw, libc::XDP_UMEM_REG, &reg).map_err(|e| unmap(err("UMEM registration", name, e)))?;
        for (opt, what) in [
            (libc::XDP_UMEM_FILL_RING, "fill ring"),
            (libc::XDP_UMEM_COMPLETION_RING, "completion ring"),
            (libc::XDP_RX_RING, "RX ring"),
            (libc::XDP_TX_RING, "TX ring"),
        ] {
            set(raw, opt, &RING).map_err(|e| unmap(err(what, name, e)))?;
        }
        // SAFETY: zeroed offsets are valid; the kernel fills them in.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut optlen = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` is a live buffer of `optlen` bytes.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut optlen,
            )
        };
        if r != 0 {
            return Err(unmap(err("ring offsets", name, io::Error::last_os_error())));
        }
        let rings = (|| {
            Ok::<_, io::Error>((
                Ring::map(raw, &off.rx, DESC, libc::XDP_PGOFF_RX_RING)?,
                Ring::map(raw, &off.tx, DESC, libc::XDP_PGOFF_TX_RING)?,
                Ring::map(
                    raw,
                    &off.fr,
                    8,
                    libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
                )?,
                Ring::map(
                    raw,
                    &off.cr,
                    8,
                    libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
                )?,
            ))
        })();
        let (rx, tx, fill, comp) = rings.map_err(|e| unmap(err("mapping rings", name, e)))?;
        let half = (FRAMES / 2) as u64;
        let mut xsk = Xsk {
            fd,
            umem,
            rx,
            tx,
            fill,
            comp,
            free: (half..FRAMES as u64)
                .map(|f| f * FRAME_SIZE as u64)
                .collect(),
            spare: Vec::with_capacity(FRAMES / 2),
            pending: false,
            zerocopy: false,
        };
        // The receive half of the UMEM goes to the fill ring.
        for f in 0..half {
            xsk.fill_slot(xsk.fill.local, f * FRAME_SIZE as u64);
            xsk.fill.local = xsk.fill.local.wrapping_add(1);
        }
        xsk.fill.producer().store(xsk.fill.local, Ordering::Release);
        let bind = |flags: u16| {
            // SAFETY: zeroed sockaddr_xdp is valid; the fields bind reads are set.
            let mut sa: libc::sockaddr_xdp = unsafe { std::mem::zeroed() };
            sa.sxdp_family = libc::AF_XDP as u16;
            sa.sxdp_flags = flags;
            sa.sxdp_ifindex = port.ifindex;
            sa.sxdp_queue_id = queue;
            // SAFETY: `sa` is a live sockaddr_xdp of the size passed.
            let r = unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_xdp).cast(),
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let wake = libc::XDP_USE_NEED_WAKEUP;
        if port.native && bind(libc::XDP_ZEROCOPY | wake).is_ok() {
            xsk.zerocopy = true;
        } else {
            bind(libc::XDP_COPY | wake).map_err(|e| {
                err(
                    &format!("binding an XDP socket to queue {queue} (the interface needs that many queues)"),
                    name,
                    e,
                )
            })?;
        }
        if busy_poll_us > 0 {
            let sock = |opt, v: u32| sockopt(raw, libc::SOL_SOCKET, opt, &v);
            sock(SO_PREFER_BUSY_POLL, 1)
                .and_then(|()| sock(SO_BUSY_POLL, busy_poll_us))
                .and_then(|()| sock(SO_BUSY_POLL_BUDGET, BUSY_BUDGET))
                .map_err(|e| err("busy-poll options", name, e))?;
        }
        port.update(queue, raw)
            .map_err(|e| err("XSKMAP entry", name, e))?;
        Ok(xsk)
    }

    #[inline(always)]
    fn fill_slot(&self, i: u32, addr: u64) {
        // SAFETY: a fill-ring slot (8 bytes, 8-aligned), ours until published.
        unsafe { std::ptr::write(self.fill.slot(i, 8).cast::<u64>(), addr) }
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
            self.fill_slot(self.fill.local, addr);
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

    /// Takes completed TX frames back into the free pool.
    fn reap(&mut self) {
        let ready = self
            .comp
            .producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.comp.local);
        for k in 0..ready {
            // SAFETY: a completion slot the kernel published (8 bytes).
            let a = unsafe {
                std::ptr::read(
                    self.comp
                        .slot(self.comp.local.wrapping_add(k), 8)
                        .cast::<u64>(),
                )
            };
            self.free.push(a & !(FRAME_SIZE as u64 - 1));
        }
        if ready > 0 {
            self.comp.local = self.comp.local.wrapping_add(ready);
            self.comp
                .consumer()
                .store(self.comp.local, Ordering::Release);
        }
    }

    /// Runs the queue's NAPI poll in this thread (busy polling): the
    /// driver fills the RX ring now, without a softirq or a thread switch.
    fn busy_poll(&self) {
        // SAFETY: recvfrom with no buffer: the RX ring is the data; the
        // socket's busy-poll options make the call poll the queue.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Wakes the kernel to send what the TX ring holds.
    fn kick(&self) -> io::Result<()> {
        kick(self.fd.as_raw_fd())
    }

    /// Publishes the written TX descriptors and wakes the kernel: in copy
    /// mode the `sendto` itself transmits (up to 32 frames a call), so it is
    /// repeated until the ring is taken; a zero-copy driver sends on its
    /// own and is woken only when it asks.
    fn flush(&mut self) -> io::Result<()> {
        self.pending = false;
        self.tx.producer().store(self.tx.local, Ordering::Release);
        if self.zerocopy {
            if self.tx.needs_wakeup() {
                self.kick()?;
            }
        } else {
            let mut kicks = 0;
            while kicks < MAX_KICKS && self.tx.consumer().load(Ordering::Acquire) != self.tx.local {
                self.kick()?;
                kicks += 1;
            }
        }
        self.reap();
        Ok(())
    }
}

/// The AF_XDP backend of one worker: a socket per port on the worker's queue.
#[derive(Debug)]
pub struct AfXdpBackend {
    /// One socket per port. Closing one takes it out of its port's map
    /// (the kernel does), and the queue's frames pass to the kernel again.
    xsks: Vec<Xsk>,
    poll_set: Vec<libc::pollfd>,
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
            .map(|p| Xsk::open(p, queue, busy_poll_us))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(AfXdpBackend {
            poll_set: poll_set(xsks.iter().map(|x| x.fd.as_raw_fd())),
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
        self.xsks.iter().all(|x| x.zerocopy)
    }

    fn drain_rx(&mut self, batch: &mut Batch) -> usize {
        let n = self.xsks.len();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut taken = 0;
        for k in 0..n {
            let pi = (self.next_port + k) % n;
            let x = &mut self.xsks[pi];
            let ready =
                x.rx.producer()
                    .load(Ordering::Acquire)
                    .wrapping_sub(x.rx.local);
            let room = (batch.capacity() - batch.len()) as u32;
            let take = ready.min(room);
            if take == 0 {
                continue;
            }
            let start = x.rx.local;
            let mut room = x.fill_room();
            while room > 0 {
                match x.spare.pop() {
                    Some(a) => x.give_back(a, &mut room),
                    None => break,
                }
            }
            for j in 0..take {
                // SAFETY: an RX slot the kernel published (a 16-byte xdp_desc),
                // not yet released.
                let d = unsafe {
                    std::ptr::read_unaligned(
                        x.rx.slot(start.wrapping_add(j), DESC)
                            .cast::<libc::xdp_desc>(),
                    )
                };
                let (addr, len) = (d.addr as usize, d.len as usize);
                if len > MAX_FRAME || addr.saturating_add(len) > FRAMES * FRAME_SIZE {
                    self.oversized += 1;
                } else {
                    // SAFETY: [addr, addr + len) lies inside the UMEM (checked);
                    // the kernel does not write this frame until it is refilled.
                    let data = unsafe { std::slice::from_raw_parts(x.umem.add(addr), len) };
                    if batch.push(pi as PortId, ts, data) {
                        taken += 1;
                    }
                }
                x.give_back(d.addr & !(FRAME_SIZE as u64 - 1), &mut room);
            }
            x.rx.local = start.wrapping_add(take);
            x.rx.consumer().store(x.rx.local, Ordering::Release);
            x.publish_fill();
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
                xsks.iter()
                    .any(|x| x.rx.producer().load(Ordering::Acquire) != x.rx.local)
            })
        {
            return Ok(self.drain_rx(batch));
        }
        for x in &mut self.xsks {
            // Completions come back while idle too.
            x.reap();
        }
        wait_readable(&mut self.poll_set, self.poll_ms)?;
        let n = self.drain_rx(batch);
        self.quiet = n == 0;
        Ok(n)
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        let x = self
            .xsks
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such port"))?;
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a UMEM frame",
            ));
        }
        if x.free.is_empty() {
            x.reap();
            if x.free.is_empty() {
                x.flush()?;
            }
        }
        let addr = x
            .free
            .pop()
            .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "TX frames all in flight"))?;
        // SAFETY: the frame at `addr` is ours (from the free pool) and
        // FRAME_SIZE ≥ frame.len() bytes long inside the UMEM; the TX slot at
        // `local` is ours until the producer index is published (the ring
        // has as many slots as there are TX frames, so it is free).
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), x.umem.add(addr as usize), frame.len());
            std::ptr::write_unaligned(
                x.tx.slot(x.tx.local, DESC).cast::<libc::xdp_desc>(),
                libc::xdp_desc {
                    addr,
                    len: frame.len() as u32,
                    options: 0,
                },
            );
        }
        x.tx.local = x.tx.local.wrapping_add(1);
        x.pending = true;
        Ok(())
    }

    fn dropped(&mut self) -> u64 {
        let mut kernel = 0;
        for x in &self.xsks {
            // SAFETY: zeroed statistics are valid; the kernel fills them in.
            let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::xdp_statistics>() as libc::socklen_t;
            // SAFETY: `st` is a live xdp_statistics of `len` bytes.
            let r = unsafe {
                libc::getsockopt(
                    x.fd.as_raw_fd(),
                    libc::SOL_XDP,
                    libc::XDP_STATISTICS,
                    (&mut st as *mut libc::xdp_statistics).cast(),
                    &mut len,
                )
            };
            if r == 0 {
                // Running totals (not reset on read).
                kernel += st.rx_dropped + st.rx_ring_full + st.tx_invalid_descs;
            }
        }
        self.oversized + kernel
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for x in self.xsks.iter_mut().filter(|x| x.pending) {
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
