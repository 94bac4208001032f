//! In-kernel steering for the afxdp backend: an XDP program on the outside ports that steers the common case to its TM itself, from maps projected from the running plan, and hands every other frame to the XDP sockets.
//!
//! The steering rule stays one function ([`crate::steer::decide`]); this is
//! a second implementation of its most common branch only, held equal to it
//! by a test that runs the loaded program on the kernel's own
//! `BPF_PROG_TEST_RUN` against `decide` frame by frame
//! (`distributor/tests/xdp_steer.rs`). The program steers a frame only when
//! all of these hold, and otherwise redirects it to the queue's XDP socket,
//! where the worker decides as it does for every frame:
//!
//! * the steering is enabled (the plan has one group, hashing endpoints);
//! * the frame is at most [`MAX_STEERED`] bytes (what the sockets take: a
//!   longer one is dropped and counted alike on both paths);
//! * the destination MAC is the group MAC, the EtherType IPv4 or IPv6 (no
//!   VLAN tag);
//! * IPv4 without options (IHL 5), total length within the frame and at
//!   least 24, not a fragment, protocol TCP or UDP; or IPv6 with TCP or UDP
//!   as the first next header (no extension headers), payload length within
//!   the frame and at least 4;
//! * source and destination ports differ (equal ports: the group's
//!   predetermined TM, left to the worker);
//! * the greater-port endpoint's address is not IPv4-mapped IPv6;
//! * the bucket of the greater-port endpoint — SipHash-1-3 over
//!   `addr ‖ port`, the low 12 bits (DESIGN §2) — is steerable: its TM has a
//!   port, and no transition has moved it;
//! * the queue's MAC-learning sample is not due: once a second per queue a
//!   steerable UDP datagram or TCP SYN still goes to the worker, which
//!   learns its source MAC (the bridge's table would otherwise age the
//!   router out); never another TCP segment, which the detour could
//!   reorder within its connection. The control path arms each queue's
//!   byte once a second ([`XdpSteer::arm_learning`]); the program reads it
//!   directly (a map value address, one byte load — no helper call, no
//!   clock) and clears it when it takes the sample.
//!
//! Steering rewrites the destination MAC to the TM's and redirects the frame
//! out of the TM's port (`bpf_redirect`), counted once in per-CPU counters:
//! the TM's packets and bytes (`std_tm_packets_total` and
//! `std_tm_bytes_total` add them to the workers'; their sum is
//! `std_xdp_frames_total{path="steered"}`).
//!
//! The maps are written by the control path only ([`XdpSteer::install`]):
//! before a plan change the steering is disabled (every frame to the
//! workers, which are always right), the plan is stored, then the buckets
//! are rewritten from the new plan and the steering enabled again. A frame
//! is thus steered by the kernel only with maps that agree with the running
//! plan, and a transition's moved buckets are never steered in the kernel.
//!
//! No FFI here (only `crate::sys` may hold it): maps, programs and test
//! runs are `crate::sys::bpf`'s.

use std::io;
use std::sync::Mutex;

use allocation::{SharedTable, TABLE_SIZE};

use crate::afxdp::{BPF_FUNC_REDIRECT_MAP, XDP_PASS};
use crate::steer::{Plan, PortKind};
use crate::sys::bpf::{Insn, Map, MapKind, Program};

const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// The configuration entry (map `std_cfg`, one entry), as the program
/// reads it: the one definition of its layout — the writer
/// ([`CfgEntry::bytes`]) and the program's loads both take their offsets
/// from it (`offset_of!`). Integers little-endian.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CfgEntry {
    /// The group MAC (frames to it are steered).
    pub group_mac: [u8; 6],
    /// Nonzero: the kernel steers.
    pub enabled: u16,
    /// The running table's version (what a capture record carries).
    pub version: u64,
    /// SipHash's initial v0..v3 under the table's key.
    pub sip: [u64; 4],
}

/// A bucket entry (map `std_buckets`, one per bucket): the one definition
/// of its layout, as for [`CfgEntry`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketEntry {
    /// The TM's MAC (the frame's new destination).
    pub tm_mac: [u8; 6],
    /// Nonzero: steer frames of this bucket (zero: to the workers).
    pub steerable: u16,
    /// The TM port's interface.
    pub ifindex: u32,
    /// The TM's route index (its counters' slot).
    pub route: u16,
    /// Unused.
    pub reserved: u16,
}

/// Bytes of the configuration entry.
pub const CFG_SIZE: usize = std::mem::size_of::<CfgEntry>();
/// Bytes of a bucket entry.
pub const BUCKET_SIZE: usize = std::mem::size_of::<BucketEntry>();

/// A field's offset in a map entry, as the instructions' `off` (i16).
macro_rules! at {
    ($t:ty, $f:ident) => {
        std::mem::offset_of!($t, $f) as i16
    };
    ($t:ty, $f:ident, $i:expr) => {
        (std::mem::offset_of!($t, $f) + $i) as i16
    };
}

impl CfgEntry {
    /// The entry as the map stores it.
    pub fn bytes(&self) -> [u8; CFG_SIZE] {
        let mut b = [0u8; CFG_SIZE];
        b[std::mem::offset_of!(CfgEntry, group_mac)..][..6].copy_from_slice(&self.group_mac);
        b[std::mem::offset_of!(CfgEntry, enabled)..][..2]
            .copy_from_slice(&self.enabled.to_le_bytes());
        b[std::mem::offset_of!(CfgEntry, version)..][..8]
            .copy_from_slice(&self.version.to_le_bytes());
        for (i, x) in self.sip.iter().enumerate() {
            b[std::mem::offset_of!(CfgEntry, sip) + 8 * i..][..8].copy_from_slice(&x.to_le_bytes());
        }
        b
    }
}

impl BucketEntry {
    /// The entry as the map stores it.
    pub fn bytes(&self) -> [u8; BUCKET_SIZE] {
        let mut b = [0u8; BUCKET_SIZE];
        b[std::mem::offset_of!(BucketEntry, tm_mac)..][..6].copy_from_slice(&self.tm_mac);
        b[std::mem::offset_of!(BucketEntry, steerable)..][..2]
            .copy_from_slice(&self.steerable.to_le_bytes());
        b[std::mem::offset_of!(BucketEntry, ifindex)..][..4]
            .copy_from_slice(&self.ifindex.to_le_bytes());
        b[std::mem::offset_of!(BucketEntry, route)..][..2]
            .copy_from_slice(&self.route.to_le_bytes());
        b[std::mem::offset_of!(BucketEntry, reserved)..][..2]
            .copy_from_slice(&self.reserved.to_le_bytes());
        b
    }
}
/// TM routes with their own kernel counters (packets, bytes); frames to
/// routes beyond are steered all the same, counted only in the total.
pub const TM_SLOTS: u32 = 1024;
/// The longest frame steered: what an XDP socket receives (a UMEM frame
/// less the kernel's 256-byte XDP headroom).
pub const MAX_STEERED: i32 = (crate::afxdp::FRAME_SIZE - 256) as i32;
/// How often the control path arms each queue's MAC-learning sample (one
/// steerable frame to its worker), ms.
pub const LEARN_EVERY_MS: u64 = 1000;
/// `BPF_PSEUDO_MAP_VALUE`: a `ld_imm64` of a map value's address.
const BPF_PSEUDO_MAP_VALUE: u8 = 2;

/// Counter slots of the per-CPU statistics map. Frames steered are
/// counted once, per TM (`std_xdp_tms`); this map only holds what has no
/// TM slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Frames steered to a TM route beyond the [`TM_SLOTS`] counted ones.
    SteeredUncounted = 0,
    /// Frames handed to the XDP sockets (the workers decide).
    ToWorkers = 1,
    /// Frames a capture wanted that found its ring full.
    CaptureDropped = 2,
}

/// The capture entry (map `std_capture`, one entry): what the program
/// copies into the capture ring, read only on the steering path (frames for
/// the workers are captured by them). Integers little-endian.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureEntry {
    /// Nonzero: a capture is armed.
    pub armed: u32,
    /// Only frames to this TM route ([`ANY_TM`]: every TM).
    pub tm: u32,
    /// Take a frame when a random u32 is at most this (0: every frame).
    pub sample: u32,
    /// Unused.
    pub reserved: u32,
}

/// [`CaptureEntry::tm`] for every TM.
pub const ANY_TM: u32 = 0xffff;
/// Bytes of a capture entry.
pub const CAPTURE_SIZE: usize = std::mem::size_of::<CaptureEntry>();

impl CaptureEntry {
    /// The entry as the map stores it.
    pub fn bytes(&self) -> [u8; CAPTURE_SIZE] {
        let mut b = [0u8; CAPTURE_SIZE];
        b[..4].copy_from_slice(&self.armed.to_le_bytes());
        b[4..8].copy_from_slice(&self.tm.to_le_bytes());
        b[8..12].copy_from_slice(&self.sample.to_le_bytes());
        b[12..].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }
}

/// A record of the capture ring as the program writes it: this header, then
/// the frame's first [`SNAP`] bytes as steered (the TM's MAC written).
/// Integers in the machine's order (little-endian here).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// The frame's length (0: its bytes could not be copied).
    pub len: u32,
    /// The TM route it was steered to.
    pub route: u16,
    /// Its bucket.
    pub bucket: u16,
    /// The receive queue.
    pub queue: u32,
    /// The interface it came in on.
    pub ifindex: u32,
    /// The table version of the maps that steered it.
    pub version: u64,
    /// When (`bpf_ktime_get_ns`: CLOCK_MONOTONIC).
    pub ktime_ns: u64,
}

/// Bytes of a record header.
pub const RECORD_HEADER: usize = std::mem::size_of::<RecordHeader>();
/// Bytes of a frame a capture record holds at most.
pub const SNAP: usize = 256;
/// The capture ring's data bytes (about 14,000 records).
pub const CAPTURE_RING_BYTES: u32 = 4 << 20;

impl RecordHeader {
    /// The header at the start of `rec`; `None` if shorter.
    pub fn parse(rec: &[u8]) -> Option<RecordHeader> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(rec.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(rec.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(rec.get(o..o + 8)?.try_into().ok()?));
        Some(RecordHeader {
            len: u32_at(std::mem::offset_of!(RecordHeader, len))?,
            route: u16_at(std::mem::offset_of!(RecordHeader, route))?,
            bucket: u16_at(std::mem::offset_of!(RecordHeader, bucket))?,
            queue: u32_at(std::mem::offset_of!(RecordHeader, queue))?,
            ifindex: u32_at(std::mem::offset_of!(RecordHeader, ifindex))?,
            version: u64_at(std::mem::offset_of!(RecordHeader, version))?,
            ktime_ns: u64_at(std::mem::offset_of!(RecordHeader, ktime_ns))?,
        })
    }
}

/// What the kernel counted, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Frames steered to a TM by the kernel.
    pub steered: u64,
    /// Frames handed to the XDP sockets.
    pub to_workers: u64,
    /// (frames, bytes) steered to each TM route index, [`TM_SLOTS`] of them.
    pub per_tm: Vec<(u64, u64)>,
}

/// The maps the program reads, projected from the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The configuration entry.
    pub cfg: CfgEntry,
    /// One entry per bucket.
    pub buckets: Vec<BucketEntry>,
}

/// The maps for `plan`, given each port's interface index; `None` when the
/// kernel must steer nothing (the table has several groups, or a
/// source-address group, or a transition between tables that cannot be
/// compared bucket by bucket).
pub fn project(plan: &Plan, ifindex: &[Option<u32>]) -> Option<Projection> {
    let (key, buckets, moved) = plan.single_endpoint_group()?;
    let cfg = CfgEntry {
        group_mac: plan.group_mac().0,
        enabled: 1,
        version: plan.table().version(),
        sip: key.sip_state(),
    };
    let entries = (0..TABLE_SIZE)
        .map(|b| {
            let none = BucketEntry::default();
            if moved.is_some_and(|m| m.contains(b)) {
                return none;
            }
            let tm = buckets.get(b);
            let Some((port, mac)) = plan.tm_route(tm) else {
                return none;
            };
            let Some(Some(ifindex)) = ifindex.get(usize::from(port)) else {
                return none;
            };
            BucketEntry {
                tm_mac: mac.0,
                steerable: 1,
                ifindex: *ifindex,
                route: tm,
                reserved: 0,
            }
        })
        .collect();
    Some(Projection {
        cfg,
        buckets: entries,
    })
}

/// The steering maps of one process, shared by every outside port's program.
#[derive(Debug)]
pub struct XdpSteer {
    cfg: Map,
    buckets: Map,
    /// One entry: a byte per queue, armed (1) by the control path, cleared
    /// by the program when it takes the queue's learning sample.
    learn: Map,
    /// Queues with a learning byte.
    queues: u32,
    stats: Map,
    tm_stats: Map,
    /// What a capture takes (one [`CaptureEntry`]).
    capture: Map,
    /// The capture ring (`None`: the kernel has none; kernel-steered frames
    /// are then not captured, and the capture says so).
    ring: Option<Mutex<crate::sys::bpf::RingBuf>>,
    /// Each port's kind (the outside ports run the steering program).
    kinds: Vec<PortKind>,
    /// Each port's interface index.
    ifindex: Vec<Option<u32>>,
    /// Check that TM ports take XDP redirects (off only for test runs,
    /// which send nothing).
    check_targets: bool,
    /// Serialises plan changes against map writes; holds the TM ports the
    /// maps were last written with (those that take redirects).
    lock: Mutex<Vec<Option<u32>>>,
}

/// Entry `key` of a per-CPU map whose value is `N` u64 counters, each
/// summed over the possible CPUs.
fn percpu_sums<const N: usize>(map: &Map, key: u32) -> io::Result<[u64; N]> {
    let mut v = vec![0u8; map.value_len()];
    map.lookup(key, &mut v)?;
    let mut sums = [0u64; N];
    for (i, c) in v.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        sums[i % N] += u64::from_le_bytes(w);
    }
    Ok(sums)
}

impl XdpSteer {
    /// Creates the maps (steering disabled) for ports of `kinds` on
    /// `interfaces` (port by port), for `queues` queues.
    pub fn new(kinds: &[PortKind], interfaces: &[Option<&str>], queues: u32) -> io::Result<Self> {
        let e = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        let ifindex = interfaces
            .iter()
            .map(|i| i.map(crate::afpacket::ifindex).transpose())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(XdpSteer {
            cfg: Map::create(MapKind::Array, CFG_SIZE as u32, 1, "std_cfg")
                .map_err(|x| e("creating the steering configuration map", x))?,
            buckets: Map::create(
                MapKind::Array,
                BUCKET_SIZE as u32,
                TABLE_SIZE as u32,
                "std_buckets",
            )
            .map_err(|x| e("creating the bucket map", x))?,
            learn: Map::create(MapKind::Array, learn_bytes(queues), 1, "std_learn")
                .map_err(|x| e("creating the learning map", x))?,
            queues: queues.max(1),
            stats: Map::create(MapKind::PerCpuArray, 8, 3, "std_xdp_stats")
                .map_err(|x| e("creating the statistics map", x))?,
            tm_stats: Map::create(MapKind::PerCpuArray, 16, TM_SLOTS, "std_xdp_tms")
                .map_err(|x| e("creating the per-TM statistics map", x))?,
            capture: Map::create(MapKind::Array, CAPTURE_SIZE as u32, 1, "std_capture")
                .map_err(|x| e("creating the capture map", x))?,
            ring: match crate::sys::bpf::RingBuf::create(CAPTURE_RING_BYTES, "std_capture_rb") {
                Ok(r) => Some(Mutex::new(r)),
                Err(x) => {
                    log::warn!("in-kernel steering: no capture ring ({x}): captures will not hold the frames the kernel steers");
                    None
                }
            },
            ifindex,
            kinds: kinds.to_vec(),
            check_targets: true,
            lock: Mutex::new(Vec::new()),
        })
    }

    /// Skips the check that TM ports take XDP redirects: for test runs
    /// (`BPF_PROG_TEST_RUN` reports a redirect and sends nothing).
    pub fn assume_redirect_targets(mut self) -> Self {
        self.check_targets = false;
        self
    }

    /// Each port's interface index where frames may be redirected to it:
    /// TM ports whose interface reports `NDO_XMIT` in its XDP features. A TM
    /// port that does not (a veth whose peer has neither an XDP program nor
    /// GRO on; a driver without `ndo_xdp_xmit`; a kernel before 6.3, which
    /// does not say) keeps its TMs' frames with the workers, and is logged.
    fn targets(&self) -> Vec<Option<u32>> {
        self.ifindex
            .iter()
            .zip(&self.kinds)
            .map(|(&ifindex, &kind)| {
                let i = ifindex?;
                if kind != PortKind::Tm {
                    return None;
                }
                if !self.check_targets {
                    return Some(i);
                }
                match crate::sys::netlink::xdp_features(i) {
                    Ok(f) if f & crate::sys::netlink::XDP_ACT_NDO_XMIT != 0 => Some(i),
                    Ok(_) => None,
                    Err(e) => {
                        log::debug!("ifindex {i}: XDP features unknown: {e}");
                        None
                    }
                }
            })
            .collect()
    }

    /// True if port `i` runs the steering program.
    pub fn steers_port(&self, i: usize) -> bool {
        self.kinds.get(i) == Some(&PortKind::Outside)
    }

    /// Writes the maps for `plan`: disabled first, buckets, then the
    /// configuration (enabled, if the plan can be steered in the kernel).
    pub fn sync(&self, plan: &Plan) -> io::Result<bool> {
        let mut last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write(plan, &mut last)
    }

    fn write(&self, plan: &Plan, last: &mut Vec<Option<u32>>) -> io::Result<bool> {
        self.cfg.update(0, &[0u8; CFG_SIZE])?;
        let targets = self.targets();
        for (port, (t, i)) in targets.iter().zip(&self.ifindex).enumerate() {
            if self.kinds.get(port) == Some(&PortKind::Tm) && t.is_none() {
                log::warn!(
                    "in-kernel steering: TM port {port} (ifindex {}) does not take XDP redirects (for a veth: GRO or an XDP program on its peer); the workers steer its TMs' frames",
                    i.unwrap_or(0)
                );
            }
        }
        let projection = project(plan, &targets);
        *last = targets;
        let Some(p) = projection else {
            return Ok(false);
        };
        for (b, e) in p.buckets.iter().enumerate() {
            self.buckets.update(b as u32, &e.bytes())?;
        }
        self.cfg.update(0, &p.cfg.bytes())?;
        Ok(true)
    }

    /// Runs `store` — a change of the running plan — with the steering
    /// disabled, then writes the maps for the plan now running. A failed
    /// map write leaves the steering disabled (every frame to the workers)
    /// and is logged.
    pub fn install<R>(&self, plan: &SharedTable<Plan>, store: impl FnOnce() -> R) -> R {
        let mut last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.cfg.update(0, &[0u8; CFG_SIZE]) {
            log::error!("in-kernel steering: disabling it failed: {e}");
        }
        let r = store();
        match self.write(&plan.snapshot(), &mut last) {
            Ok(true) => {}
            Ok(false) => log::info!(
                "in-kernel steering off for this table (several groups, or a transition between incomparable tables): the workers steer every frame"
            ),
            Err(e) => {
                let _ = self.cfg.update(0, &[0u8; CFG_SIZE]);
                log::error!("in-kernel steering: writing its maps failed, the workers steer every frame: {e}");
            }
        }
        r
    }

    /// Re-checks which TM ports take XDP redirects (a veth peer's GRO may
    /// have been switched) and rewrites the maps if that changed. For a
    /// periodic call from the control path.
    pub fn refresh(&self, plan: &SharedTable<Plan>) {
        let changed = {
            let last = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            *last != self.targets()
        };
        if changed {
            log::info!(
                "in-kernel steering: the TM ports that take XDP redirects changed; maps rewritten"
            );
            self.install(plan, || ());
        }
    }

    /// The kernel's counters, summed over CPUs (a lookup per TM slot: for
    /// the control path, at scrape time).
    pub fn counters(&self) -> io::Result<KernelCounters> {
        let per_tm = (0..TM_SLOTS)
            .map(|tm| {
                let s = percpu_sums::<2>(&self.tm_stats, tm)?;
                Ok((s[0], s[1]))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let [uncounted] = percpu_sums::<1>(&self.stats, Stat::SteeredUncounted as u32)?;
        let [to_workers] = percpu_sums::<1>(&self.stats, Stat::ToWorkers as u32)?;
        Ok(KernelCounters {
            steered: uncounted + per_tm.iter().map(|&(p, _)| p).sum::<u64>(),
            to_workers,
            per_tm,
        })
    }

    /// Arms every queue's MAC-learning sample: its next steerable UDP
    /// datagram or TCP SYN goes to its worker (stdd calls this every
    /// [`LEARN_EVERY_MS`]).
    pub fn arm_learning(&self) -> io::Result<()> {
        let mut v = vec![0u8; learn_bytes(self.queues) as usize];
        v[..self.queues as usize].fill(1);
        self.learn.update(0, &v)
    }

    /// Arms (or disarms) queue `queue`'s learning sample alone (tests).
    pub fn set_learning(&self, queue: u32, armed: bool) -> io::Result<()> {
        let mut v = vec![0u8; learn_bytes(self.queues) as usize];
        self.learn.lookup(0, &mut v)?;
        let slot = v.get_mut(queue as usize).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no queue {queue}"))
        })?;
        *slot = u8::from(armed);
        self.learn.update(0, &v)
    }

    /// The steering program for a port whose XDP sockets are in `xsks`.
    pub(crate) fn program(&self, xsks: i32) -> Vec<Insn> {
        program(&Maps {
            cfg: self.cfg.raw(),
            buckets: self.buckets.raw(),
            learn: self.learn.raw(),
            queues: self.queues,
            stats: self.stats.raw(),
            tm_stats: self.tm_stats.raw(),
            capture: self.ring.as_ref().map(|r| {
                let raw = r.lock().unwrap_or_else(|p| p.into_inner()).raw();
                (self.capture.raw(), raw)
            }),
            xsks,
        })
    }

    /// True if the kernel can copy the frames it steers into a capture.
    pub fn can_capture(&self) -> bool {
        self.ring.is_some()
    }

    /// Arms (or with `None`, disarms) the kernel's side of a capture.
    pub fn set_capture(&self, entry: Option<CaptureEntry>) -> io::Result<()> {
        self.capture.update(0, &entry.unwrap_or_default().bytes())
    }

    /// Hands the capture ring's records to `f` (at most `max`), each as
    /// (header, the frame's bytes held); returns how many were read.
    pub fn drain_capture(&self, max: usize, mut f: impl FnMut(RecordHeader, &[u8])) -> usize {
        let Some(ring) = &self.ring else { return 0 };
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = [0u8; RECORD_HEADER + SNAP];
        // The header, then the bytes the program copied (the frame's
        // length, at most SNAP), not the whole reservation.
        let want = |head: &[u8]| {
            RECORD_HEADER + RecordHeader::parse(head).map_or(0, |h| (h.len as usize).min(SNAP))
        };
        ring.drain(&mut buf, max, RECORD_HEADER, want, |rec, _| {
            if let Some(h) = RecordHeader::parse(rec) {
                let held = rec.len().saturating_sub(RECORD_HEADER).min(h.len as usize);
                f(h, &rec[RECORD_HEADER..RECORD_HEADER + held]);
            }
        })
    }

    /// Frames the kernel could not copy into a full capture ring.
    pub fn capture_dropped(&self) -> io::Result<u64> {
        let [n] = percpu_sums::<1>(&self.stats, Stat::CaptureDropped as u32)?;
        Ok(n)
    }
}

/// The steering program loaded but attached nowhere: the kernel runs it on
/// a given frame (`BPF_PROG_TEST_RUN`), redirects reported, not carried
/// out. For the tests that hold it equal to [`crate::steer::decide`].
#[derive(Debug)]
pub struct TestProgram {
    prog: Program,
    _xsks: Map,
}

/// What the program did with a frame in a test run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestVerdict {
    /// Steered by the kernel: the frame as it leaves.
    Steered(Vec<u8>),
    /// Handed to the workers (`XDP_PASS` here: the queue has no socket).
    ToWorkers,
    /// Any other XDP action (a defect).
    Other(u32),
}

impl TestProgram {
    /// The loaded program, to attach elsewhere (benchmarks): frames for
    /// the workers pass to the kernel's stack.
    pub fn program(&self) -> &Program {
        &self.prog
    }

    /// Runs the program on `frame` (at least 14 bytes: the kernel refuses
    /// shorter ones).
    pub fn run(&self, frame: &[u8]) -> io::Result<TestVerdict> {
        let r = self.prog.test_run(frame)?;
        Ok(match r.retval {
            4 => TestVerdict::Steered(r.out),
            2 => TestVerdict::ToWorkers,
            x => TestVerdict::Other(x),
        })
    }
}

impl XdpSteer {
    /// Loads the program for a test run (an empty socket map: frames for
    /// the workers come back as `XDP_PASS`).
    pub fn test_program(&self) -> io::Result<TestProgram> {
        let xsks = Map::create(MapKind::XskMap, 4, 1, "std_test_xsks")?;
        let prog = Program::load_xdp(&self.program(xsks.raw()), "std_steer_test")?;
        Ok(TestProgram { prog, _xsks: xsks })
    }
}

// ---- a small BPF assembler -------------------------------------------------

/// A jump target, placed once with [`Asm::place`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Label(usize);

struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, Label)>,
    /// Where each label was placed.
    at: Vec<Option<usize>>,
}

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

// Opcodes (class | size/op | source).
const LDXW: u8 = 0x61;
const LDXH: u8 = 0x69;
const LDXB: u8 = 0x71;
const LDXDW: u8 = 0x79;
const STXW: u8 = 0x63;
const STXH: u8 = 0x6b;
const STXDW: u8 = 0x7b;
const STW: u8 = 0x62;
const STB: u8 = 0x72;
const ADD_K: u8 = 0x07;
const ADD_X: u8 = 0x0f;
const SUB_X: u8 = 0x1f;
const OR_X: u8 = 0x4f;
const AND_K: u8 = 0x57;
const LSH_K: u8 = 0x67;
const RSH_K: u8 = 0x77;
const XOR_K: u8 = 0xa7;
const XOR_X: u8 = 0xaf;
const MOV_K: u8 = 0xb7;
const MOV_X: u8 = 0xbf;
const TO_BE: u8 = 0xdc;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JEQ_X: u8 = 0x1d;
const JGT_K: u8 = 0x25;
const JGT_X: u8 = 0x2d;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const JLT_K: u8 = 0xa5;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;

impl Asm {
    fn new() -> Self {
        Asm {
            insns: Vec::with_capacity(512),
            fixups: Vec::new(),
            at: Vec::new(),
        }
    }

    fn label(&mut self) -> Label {
        self.at.push(None);
        Label(self.at.len() - 1)
    }

    fn place(&mut self, l: Label) {
        debug_assert!(self.at[l.0].is_none(), "label placed twice");
        self.at[l.0] = Some(self.insns.len());
    }

    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }

    fn map(&mut self, dst: u8, fd: i32) {
        self.op(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd);
        self.op(0, 0, 0, 0, 0);
    }

    /// `dst` = the address of byte `offset` of a one-entry array map's value.
    fn map_value(&mut self, dst: u8, fd: i32, offset: i32) {
        self.op(LD_IMM64, dst, BPF_PSEUDO_MAP_VALUE, 0, fd);
        self.op(0, 0, 0, 0, offset);
    }

    /// `dst = rotl(dst, n)` with `R0` as scratch.
    fn rotl(&mut self, dst: u8, n: i32) {
        self.op(MOV_X, R0, dst, 0, 0);
        self.op(RSH_K, R0, 0, 0, 64 - n);
        self.op(LSH_K, dst, 0, 0, n);
        self.op(OR_X, dst, R0, 0, 0);
    }

    /// One SipRound on v0..v3 = R2..R5 (as `allocation::hash`).
    fn sipround(&mut self) {
        let (v0, v1, v2, v3) = (R2, R3, R4, R5);
        self.op(ADD_X, v0, v1, 0, 0);
        self.rotl(v1, 13);
        self.op(XOR_X, v1, v0, 0, 0);
        self.rotl(v0, 32);
        self.op(ADD_X, v2, v3, 0, 0);
        self.rotl(v3, 16);
        self.op(XOR_X, v3, v2, 0, 0);
        self.op(ADD_X, v0, v3, 0, 0);
        self.rotl(v3, 21);
        self.op(XOR_X, v3, v0, 0, 0);
        self.op(ADD_X, v2, v1, 0, 0);
        self.rotl(v1, 17);
        self.op(XOR_X, v1, v2, 0, 0);
        self.rotl(v2, 32);
    }

    /// SipHash-1-3's compression of the block in R1.
    fn compress(&mut self) {
        self.op(XOR_X, R5, R1, 0, 0);
        self.sipround();
        self.op(XOR_X, R2, R1, 0, 0);
    }

    /// v0..v3 = R2..R5 from the configuration entry (R9).
    fn sip_init(&mut self) {
        self.op(LDXDW, R2, R9, at!(CfgEntry, sip, 0), 0);
        self.op(LDXDW, R3, R9, at!(CfgEntry, sip, 8), 0);
        self.op(LDXDW, R4, R9, at!(CfgEntry, sip, 16), 0);
        self.op(LDXDW, R5, R9, at!(CfgEntry, sip, 24), 0);
    }

    /// SipHash's finish: the hash in R2.
    fn sip_finish(&mut self) {
        self.op(XOR_K, R4, 0, 0, 0xff);
        self.sipround();
        self.sipround();
        self.sipround();
        self.op(XOR_X, R2, R3, 0, 0);
        self.op(XOR_X, R2, R4, 0, 0);
        self.op(XOR_X, R2, R5, 0, 0);
    }

    /// `map_lookup_elem(map, &fp[-4] = key)` → R0; clobbers R1..R5.
    fn lookup_stack_key(&mut self, map: i32) {
        self.map(R1, map);
        self.op(MOV_X, R2, FP, 0, 0);
        self.op(ADD_K, R2, 0, 0, -4);
        self.op(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM);
    }

    /// Adds one to per-CPU counter `slot`; clobbers R0..R5.
    fn count(&mut self, stats: i32, slot: Stat) {
        let none = self.label();
        self.op(STW, FP, 0, -4, slot as i32);
        self.lookup_stack_key(stats);
        self.jump(JEQ_K, R0, 0, 0, none); // no counter: skip
        self.op(LDXDW, R1, R0, 0, 0);
        self.op(ADD_K, R1, 0, 0, 1);
        self.op(STXDW, R0, R1, 0, 0);
        self.place(none);
    }

    fn finish(mut self) -> Vec<Insn> {
        for &(at, to) in &self.fixups {
            let target = self.at.get(to.0).copied().flatten();
            debug_assert!(target.is_some(), "label {to:?} never placed");
            let target = target.unwrap_or(at + 1);
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The learning map's value size: a byte per queue, rounded up to 8.
fn learn_bytes(queues: u32) -> u32 {
    queues.max(1).div_ceil(8) * 8
}

/// The maps a program uses.
struct Maps {
    cfg: i32,
    buckets: i32,
    learn: i32,
    /// Queues with a learning byte.
    queues: u32,
    stats: i32,
    tm_stats: i32,
    /// The capture entry and ring, when there is a ring.
    capture: Option<(i32, i32)>,
    xsks: i32,
}

/// Where a family's headers put what the common tail reads.
struct Family {
    /// The protocol byte (IPv4 protocol, IPv6 next header).
    proto: i16,
    /// The transport header (its ports).
    l4: i16,
    /// The TCP flags byte, and the frame length that holds it.
    flags: i16,
}

const V4: Family = Family {
    proto: 14 + 9,
    l4: 14 + 20,
    flags: 14 + 20 + 13,
};
const V6: Family = Family {
    proto: 14 + 6,
    l4: 14 + 40,
    flags: 14 + 40 + 13,
};

/// The steering program. Registers: R6 the context, R7 the frame's start,
/// R8 its end (later the bucket entry), R9 the configuration entry (later
/// the learning slot, then the frame's length).
fn program(m: &Maps) -> Vec<Insn> {
    let mut a = Asm::new();
    let to_workers = a.label();
    let ipv6 = a.label();
    a.op(MOV_X, R6, R1, 0, 0);
    a.op(LDXW, R7, R6, 0, 0); // ctx->data
    a.op(LDXW, R8, R6, 4, 0); // ctx->data_end
                              // Ethernet (14) + IPv4 without options (20) + the two ports (4); IPv6
                              // checks its own, longer, minimum.
    a.op(MOV_X, R1, R7, 0, 0);
    a.op(ADD_K, R1, 0, 0, 38);
    a.jump(JGT_X, R1, R8, 0, to_workers);
    // Longer than the sockets take: to them all the same, where it is
    // dropped and counted as on the workers' path (never steered by one
    // path and dropped by the other).
    a.op(MOV_X, R1, R8, 0, 0);
    a.op(SUB_X, R1, R7, 0, 0);
    a.jump(JGT_K, R1, 0, MAX_STEERED, to_workers);
    // The configuration (a one-entry map: its value's address, no lookup): enabled?
    a.map_value(R9, m.cfg, 0);
    a.op(LDXH, R1, R9, at!(CfgEntry, enabled), 0);
    a.jump(JEQ_K, R1, 0, 0, to_workers);
    // Destination MAC == group MAC.
    a.op(LDXW, R1, R7, 0, 0);
    a.op(LDXW, R2, R9, at!(CfgEntry, group_mac), 0);
    a.jump(JNE_X, R1, R2, 0, to_workers);
    a.op(LDXH, R1, R7, 4, 0);
    a.op(LDXH, R2, R9, at!(CfgEntry, group_mac, 4), 0);
    a.jump(JNE_X, R1, R2, 0, to_workers);
    // EtherType (read little-endian): IPv4 08 00, IPv6 86 dd; else (ARP,
    // VLAN tags, …) the workers'.
    a.op(LDXH, R1, R7, 12, 0);
    a.jump(JEQ_K, R1, 0, 0xdd86, ipv6);
    a.jump(JNE_K, R1, 0, 0x0008, to_workers);

    // ---- IPv4: version 4, IHL 5.
    a.op(LDXB, R1, R7, 14, 0);
    a.jump(JNE_K, R1, 0, 0x45, to_workers);
    // 24 <= total length, and 14 + total length within the frame.
    length_within(&mut a, 16, 24, 14, to_workers);
    // Not a fragment: flags/offset & 0x3fff == 0 (bytes 20, 21 read little-endian).
    a.op(LDXH, R1, R7, 20, 0);
    a.op(AND_K, R1, 0, 0, 0xff3f);
    a.jump(JNE_K, R1, 0, 0, to_workers);
    let src_side = a.label();
    let hash = a.label();
    ports(&mut a, &V4, to_workers, src_side);
    // Destination port greater: the destination endpoint.
    a.op(LDXW, R1, R7, 30, 0);
    a.op(MOV_X, R2, R3, 0, 0);
    a.jump(JA, 0, 0, 0, hash);
    a.place(src_side);
    a.op(LDXW, R1, R7, 26, 0);
    a.place(hash);
    // m = addr | port << 32 | 6 << 56: the one SipHash block of the
    // 6-byte message.
    a.op(LSH_K, R2, 0, 0, 32);
    a.op(OR_X, R1, R2, 0, 0);
    a.op(MOV_K, R2, 0, 0, 6);
    a.op(LSH_K, R2, 0, 0, 56);
    a.op(OR_X, R1, R2, 0, 0);
    a.sip_init();
    a.compress();
    a.sip_finish();
    tail(&mut a, m, &V4, to_workers);

    // ---- IPv6 without extension headers: 14 + 40 + the two ports.
    a.place(ipv6);
    a.op(MOV_X, R1, R7, 0, 0);
    a.op(ADD_K, R1, 0, 0, 58);
    a.jump(JGT_X, R1, R8, 0, to_workers);
    a.op(LDXB, R1, R7, 14, 0);
    a.op(AND_K, R1, 0, 0, 0xf0);
    a.jump(JNE_K, R1, 0, 0x60, to_workers);
    // 4 <= payload length, and 14 + 40 + payload length within the frame.
    length_within(&mut a, 18, 4, 54, to_workers);
    // Next header TCP or UDP (an extension header: the workers'), the
    // ports; R8 points at the endpoint's address, the port (frame order)
    // waits on the stack.
    let src_side6 = a.label();
    let hash6 = a.label();
    ports(&mut a, &V6, to_workers, src_side6);
    a.op(MOV_X, R8, R7, 0, 0);
    a.op(ADD_K, R8, 0, 0, 38);
    a.op(STXW, FP, R3, -8, 0);
    a.jump(JA, 0, 0, 0, hash6);
    a.place(src_side6);
    a.op(MOV_X, R8, R7, 0, 0);
    a.op(ADD_K, R8, 0, 0, 22);
    a.op(STXW, FP, R2, -8, 0);
    a.place(hash6);
    // An IPv4-mapped address (::ffff:a.b.c.d) hashes as its IPv4
    // endpoint: the workers'.
    let not_mapped = a.label();
    a.op(LDXDW, R1, R8, 0, 0);
    a.jump(JNE_K, R1, 0, 0, not_mapped);
    a.op(LDXW, R1, R8, 8, 0);
    a.op(AND_K, R1, 0, 0, 0xffff);
    a.jump(JNE_K, R1, 0, 0, not_mapped);
    a.op(LDXH, R1, R8, 10, 0);
    a.jump(JEQ_K, R1, 0, 0xffff, to_workers);
    a.place(not_mapped);
    // SipHash-1-3 over addr (16) ‖ port (2): three blocks.
    a.sip_init();
    a.op(LDXDW, R1, R8, 0, 0);
    a.compress();
    a.op(LDXDW, R1, R8, 8, 0);
    a.compress();
    a.op(LDXW, R1, FP, -8, 0);
    a.op(MOV_K, R0, 0, 0, 18);
    a.op(LSH_K, R0, 0, 0, 56);
    a.op(OR_X, R1, R0, 0, 0);
    a.compress();
    a.sip_finish();
    tail(&mut a, m, &V6, to_workers);

    // ---- To the queue's XDP socket (XDP_PASS if it has none).
    a.place(to_workers);
    a.count(m.stats, Stat::ToWorkers);
    a.op(LDXW, R2, R6, 16, 0);
    a.map(R1, m.xsks);
    a.op(MOV_K, R3, 0, 0, XDP_PASS);
    a.op(CALL, 0, 0, 0, BPF_FUNC_REDIRECT_MAP);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// The IP length field at `at` (big-endian) is at least `min`, and
/// `before` + that length lies within the frame (R8 its end).
fn length_within(a: &mut Asm, at: i16, min: i32, before: i32, to_workers: Label) {
    a.op(LDXH, R1, R7, at, 0);
    a.op(TO_BE, R1, 0, 0, 16);
    a.op(AND_K, R1, 0, 0, 0xffff);
    a.jump(JLT_K, R1, 0, min, to_workers);
    a.op(MOV_X, R2, R7, 0, 0);
    a.op(ADD_K, R2, 0, 0, before);
    a.op(ADD_X, R2, R1, 0, 0);
    a.jump(JGT_X, R2, R8, 0, to_workers);
}

/// TCP or UDP, unequal ports: R2, R3 the source and destination ports as
/// they sit in the frame (the hash's byte order), R4, R5 as numbers; on to
/// `src_side` if the source port is the greater.
fn ports(a: &mut Asm, f: &Family, to_workers: Label, src_side: Label) {
    let tcp_or_udp = a.label();
    a.op(LDXB, R1, R7, f.proto, 0);
    a.jump(JEQ_K, R1, 0, 6, tcp_or_udp);
    a.jump(JNE_K, R1, 0, 17, to_workers);
    a.place(tcp_or_udp);
    a.op(LDXH, R2, R7, f.l4, 0);
    a.op(LDXH, R3, R7, f.l4 + 2, 0);
    a.op(MOV_X, R4, R2, 0, 0);
    a.op(TO_BE, R4, 0, 0, 16);
    a.op(MOV_X, R5, R3, 0, 0);
    a.op(TO_BE, R5, 0, 0, 16);
    a.jump(JEQ_X, R4, R5, 0, to_workers);
    a.jump(JGT_X, R4, R5, 0, src_side);
}

/// From the hash in R2 to the verdict: the bucket, the learning sample,
/// the rewrite and redirect (emitted once per family).
fn tail(a: &mut Asm, m: &Maps, f: &Family, to_workers: Label) {
    let steer = a.label();
    let sample = a.label();
    a.op(AND_K, R2, 0, 0, (TABLE_SIZE - 1) as i32);
    a.op(STXW, FP, R2, -4, 0);
    a.op(STXW, FP, R2, -12, 0); // the bucket, for a capture
    a.lookup_stack_key(m.buckets);
    a.jump(JEQ_K, R0, 0, 0, to_workers);
    a.op(MOV_X, R8, R0, 0, 0);
    a.op(LDXH, R1, R8, at!(BucketEntry, steerable), 0);
    a.jump(JEQ_K, R1, 0, 0, to_workers);
    // The queue's learning sample, only from frames a detour through the
    // worker cannot reorder within their flow: UDP, and TCP SYN (without
    // ACK: nothing of the connection can be in flight behind it).
    a.op(LDXB, R1, R7, f.proto, 0);
    a.jump(JEQ_K, R1, 0, 17, sample);
    a.op(LDXW, R2, R6, 4, 0); // ctx->data_end again (R8 is the bucket now)
    a.op(MOV_X, R1, R7, 0, 0);
    a.op(ADD_K, R1, 0, 0, i32::from(f.flags) + 1);
    a.jump(JGT_X, R1, R2, 0, steer);
    a.op(LDXB, R1, R7, f.flags, 0); // TCP flags
    a.op(AND_K, R1, 0, 0, 0x12);
    a.jump(JNE_K, R1, 0, 0x02, steer);
    // Armed → to the worker, and disarmed until the control path arms it
    // again: one byte load when not armed.
    a.place(sample);
    a.op(LDXW, R2, R6, 16, 0); // ctx->rx_queue_index
    a.jump(JGT_K, R2, 0, m.queues.saturating_sub(1) as i32, steer);
    a.map_value(R1, m.learn, 0);
    a.op(ADD_X, R1, R2, 0, 0);
    a.op(LDXB, R3, R1, 0, 0);
    a.jump(JEQ_K, R3, 0, 0, steer);
    a.op(STB, R1, 0, 0, 0);
    a.jump(JA, 0, 0, 0, to_workers);
    // Steer: the TM's MAC, out of its port.
    a.place(steer);
    a.op(LDXW, R1, R8, at!(BucketEntry, tm_mac), 0);
    a.op(STXW, R7, R1, 0, 0);
    a.op(LDXH, R1, R8, at!(BucketEntry, tm_mac, 4), 0);
    a.op(STXH, R7, R1, 4, 0);
    // Counted once: the TM's packets and bytes (a route beyond the
    // counted ones in a single counter).
    let uncounted = a.label();
    let redirect = a.label();
    a.op(LDXW, R9, R6, 4, 0); // ctx->data_end
    a.op(SUB_X, R9, R7, 0, 0); // the frame's length
    a.op(LDXH, R1, R8, at!(BucketEntry, route), 0);
    a.op(STXW, FP, R1, -4, 0);
    a.lookup_stack_key(m.tm_stats);
    a.jump(JEQ_K, R0, 0, 0, uncounted);
    a.op(LDXDW, R1, R0, 0, 0);
    a.op(ADD_K, R1, 0, 0, 1);
    a.op(STXDW, R0, R1, 0, 0);
    a.op(LDXDW, R1, R0, 8, 0);
    a.op(ADD_X, R1, R9, 0, 0);
    a.op(STXDW, R0, R1, 8, 0);
    a.jump(JA, 0, 0, 0, redirect);
    a.place(uncounted);
    a.count(m.stats, Stat::SteeredUncounted);
    a.place(redirect);
    if let Some((entry, ring)) = m.capture {
        capture(a, m.stats, m.cfg, entry, ring);
    }
    a.op(LDXW, R1, R8, at!(BucketEntry, ifindex), 0);
    a.op(MOV_K, R2, 0, 0, 0);
    a.op(CALL, 0, 0, 0, BPF_FUNC_REDIRECT);
    a.op(EXIT, 0, 0, 0, 0);
}

const BPF_FUNC_KTIME_GET_NS: i32 = 5;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
const BPF_FUNC_RINGBUF_RESERVE: i32 = 131;
const BPF_FUNC_RINGBUF_SUBMIT: i32 = 132;
const BPF_FUNC_RINGBUF_DISCARD: i32 = 133;
const BPF_FUNC_XDP_LOAD_BYTES: i32 = 189;
/// `BPF_RB_NO_WAKEUP`: the collector polls; no wake-up per record.
const BPF_RB_NO_WAKEUP: i32 = 1;

/// The capture of a steered frame (its MAC already the TM's; R6 the
/// context, R8 the bucket entry, R9 the frame's length, the bucket at
/// fp-12): when armed, and the frame passes the TM filter and the sample,
/// a record into the ring — or, the ring full, a count. One load and a
/// jump when no capture is armed. Clobbers R0..R5 and R7.
fn capture(a: &mut Asm, stats: i32, cfg: i32, entry: i32, ring: i32) {
    let done = a.label();
    let tm_ok = a.label();
    let take = a.label();
    let reserved = a.label();
    let cap = a.label();
    let load = a.label();
    let submit = a.label();
    let discard = a.label();
    a.map_value(R1, entry, 0);
    a.op(LDXW, R2, R1, at!(CaptureEntry, armed), 0);
    a.jump(JEQ_K, R2, 0, 0, done);
    a.op(LDXW, R2, R1, at!(CaptureEntry, tm), 0);
    a.jump(JEQ_K, R2, 0, ANY_TM as i32, tm_ok);
    a.op(LDXH, R3, R8, at!(BucketEntry, route), 0);
    a.jump(JNE_X, R2, R3, 0, done);
    a.place(tm_ok);
    a.op(LDXW, R2, R1, at!(CaptureEntry, sample), 0);
    a.jump(JEQ_K, R2, 0, 0, take);
    a.op(STXW, FP, R2, -16, 0);
    a.op(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32);
    a.op(LDXW, R2, FP, -16, 0);
    a.jump(JGT_X, R0, R2, 0, done);
    a.place(take);
    a.map(R1, ring);
    a.op(MOV_K, R2, 0, 0, (RECORD_HEADER + SNAP) as i32);
    a.op(MOV_K, R3, 0, 0, 0);
    a.op(CALL, 0, 0, 0, BPF_FUNC_RINGBUF_RESERVE);
    a.jump(JNE_K, R0, 0, 0, reserved);
    a.count(stats, Stat::CaptureDropped);
    a.jump(JA, 0, 0, 0, done);
    a.place(reserved);
    a.op(MOV_X, R7, R0, 0, 0);
    a.op(STXW, R7, R9, at!(RecordHeader, len), 0);
    a.op(LDXH, R1, R8, at!(BucketEntry, route), 0);
    a.op(STXH, R7, R1, at!(RecordHeader, route), 0);
    a.op(LDXW, R1, FP, -12, 0);
    a.op(STXH, R7, R1, at!(RecordHeader, bucket), 0);
    a.op(LDXW, R1, R6, 16, 0); // ctx->rx_queue_index
    a.op(STXW, R7, R1, at!(RecordHeader, queue), 0);
    a.op(LDXW, R1, R6, 12, 0); // ctx->ingress_ifindex
    a.op(STXW, R7, R1, at!(RecordHeader, ifindex), 0);
    a.map_value(R1, cfg, 0);
    a.op(LDXDW, R2, R1, at!(CfgEntry, version), 0);
    a.op(STXDW, R7, R2, at!(RecordHeader, version), 0);
    a.op(CALL, 0, 0, 0, BPF_FUNC_KTIME_GET_NS);
    a.op(STXDW, R7, R0, at!(RecordHeader, ktime_ns), 0);
    // The bytes held: the frame's length, at most SNAP (and never below
    // an Ethernet header: the steering took nothing shorter).
    a.op(MOV_X, R4, R9, 0, 0);
    a.jump(JLT_K, R4, 0, 14, discard);
    a.jump(JGT_K, R4, 0, SNAP as i32, cap);
    a.jump(JA, 0, 0, 0, load);
    a.place(cap);
    a.op(MOV_K, R4, 0, 0, SNAP as i32);
    a.place(load);
    a.op(MOV_X, R1, R6, 0, 0);
    a.op(MOV_K, R2, 0, 0, 0);
    a.op(MOV_X, R3, R7, 0, 0);
    a.op(ADD_K, R3, 0, 0, RECORD_HEADER as i32);
    a.op(CALL, 0, 0, 0, BPF_FUNC_XDP_LOAD_BYTES);
    a.jump(JEQ_K, R0, 0, 0, submit);
    a.op(STW, R7, 0, at!(RecordHeader, len), 0);
    a.place(submit);
    a.op(MOV_X, R1, R7, 0, 0);
    a.op(MOV_K, R2, 0, 0, BPF_RB_NO_WAKEUP);
    a.op(CALL, 0, 0, 0, BPF_FUNC_RINGBUF_SUBMIT);
    a.jump(JA, 0, 0, 0, done);
    a.place(discard);
    a.op(MOV_X, R1, R7, 0, 0);
    a.op(MOV_K, R2, 0, 0, 0);
    a.op(CALL, 0, 0, 0, BPF_FUNC_RINGBUF_DISCARD);
    a.place(done);
}

#[cfg(test)]
mod test {
    use super::*;

    /// The map entries' layouts: the sizes the maps are created with, and
    /// a field's bytes where `offset_of!` says (what the program loads).
    #[test]
    fn map_layouts() {
        assert_eq!((CFG_SIZE, BUCKET_SIZE), (48, 16));
        let e = BucketEntry {
            tm_mac: [1, 2, 3, 4, 5, 6],
            steerable: 1,
            ifindex: 0x0a0b_0c0d,
            route: 7,
            reserved: 0,
        }
        .bytes();
        assert_eq!(
            e,
            [1, 2, 3, 4, 5, 6, 1, 0, 0x0d, 0x0c, 0x0b, 0x0a, 7, 0, 0, 0]
        );
        let c = CfgEntry {
            group_mac: [9; 6],
            enabled: 1,
            version: 0x0102,
            sip: [1, 2, 3, 4],
        }
        .bytes();
        assert_eq!(&c[..8], &[9, 9, 9, 9, 9, 9, 1, 0]);
        assert_eq!(&c[8..10], &[2, 1]);
        assert_eq!(c[16], 1);
        assert_eq!(c[40], 4);
    }

    /// Every jump lands inside the program, and the program is what the
    /// verifier was shown to accept (its size is pinned so a change is seen).
    #[test]
    fn jumps_land_inside() {
        let p = program(&Maps {
            cfg: 3,
            buckets: 4,
            learn: 5,
            queues: 2,
            stats: 6,
            tm_stats: 8,
            capture: Some((9, 10)),
            xsks: 7,
        });
        for (i, insn) in p.iter().enumerate() {
            let class = insn.code & 0x07;
            if class == 0x05 && insn.code != CALL && insn.code != EXIT {
                let to = i as i64 + 1 + i64::from(insn.off);
                assert!(
                    to > i as i64 && (to as usize) < p.len(),
                    "jump at {i} to {to}"
                );
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
        // Its size, as the docs give it (a change shows here).
        assert!((700..760).contains(&p.len()), "{} instructions", p.len());
    }
}
