//! The live capture tap: frames copied while a capture is armed — from the workers' batches into per-worker rings, and from the XDP program's steering into the kernel's ring — drained off the steering cores by one collector thread that filters them, annotates each with its decision and writes pcapng.
//!
//! What it costs the steering:
//!
//! * **not armed**: one relaxed load per batch in each worker; one map-value
//!   load and a jump per frame the kernel steers;
//! * **armed**: each worker copies the frames it decided (at most
//!   [`SNAP`] bytes each, with the action and branch) into its own
//!   single-producer ring (`rtrb`; no lock, no allocation, no system call);
//!   the XDP program reserves a ring-buffer record per steered frame and
//!   copies the frame into it (`bpf_xdp_load_bytes`, no wake-up). A full
//!   ring loses the frame, counted (`std_capture_dropped_total{where}`):
//!   the collector never slows the steering, the steering never waits for
//!   the collector.
//!
//! The cheap filters (TM, sample) apply where the frame is copied; the
//! others (bucket, host, port, protocol, a BPF filter expression compiled
//! by libpcap) in the collector. Each frame's pcapng comment gives its
//! decision: `path=kernel|worker`, the branch, action, group, bucket, TM
//! (name and id), the table version and the port it came in on.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allocation::{AllocationTable, Flow, SharedTable, SteerBy};

use crate::batch::Batch;
use crate::steer::Plan;
use crate::verdict::{Action, Branch, PortId};
use crate::xdp_steer::{CaptureEntry, RecordHeader, XdpSteer, ANY_TM};

/// Bytes of a frame a capture holds at most (the headers: Ethernet,
/// IPv6 with room for extension headers, TCP with options).
pub const SNAP: usize = crate::xdp_steer::SNAP;
/// Records each worker's ring holds.
pub const WORKER_RING: usize = 4096;
/// Longest capture.
pub const MAX_SECONDS: f64 = 600.0;
/// Chunk of pcapng handed to the reader at a time.
const CHUNK: usize = 64 * 1024;
/// Records read from each ring per pass.
const PASS: usize = 4096;

/// What a capture takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Only frames steered to this TM (its id).
    pub tm: Option<u32>,
    /// Only frames of flows in this bucket.
    pub bucket: Option<u16>,
    /// Only frames with this source or destination address.
    pub host: Option<IpAddr>,
    /// Only frames with this source or destination port.
    pub port: Option<u16>,
    /// Only frames of this IP protocol.
    pub protocol: Option<u8>,
    /// A BPF filter expression (tcpdump's syntax), over the bytes held.
    pub bpf: Option<String>,
    /// The share of frames taken, in (0, 1] (1: every frame).
    pub sample: f64,
    /// How long, seconds (at most [`MAX_SECONDS`]).
    pub seconds: f64,
    /// Stop after this many frames (0: no limit).
    pub max_frames: u64,
}

/// Why a capture cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// Another capture runs (one at a time).
    #[error("another capture is running on this distributor")]
    Busy,
    /// A parameter is out of range or unreadable.
    #[error("{0}")]
    Invalid(String),
    /// The kernel's side could not be armed.
    #[error("arming the in-kernel capture: {0}")]
    Kernel(String),
}

/// What the tap counted since start (metrics).
#[derive(Debug, Default)]
pub struct TapStats {
    /// Captures started.
    pub sessions: AtomicU64,
    /// Frames written into a capture.
    pub frames: AtomicU64,
    /// Frames lost: a worker's ring was full.
    pub dropped_worker_ring: AtomicU64,
    /// Frames lost: the reader did not keep up.
    pub dropped_reader: AtomicU64,
}

/// A frame a worker copied, with its decision.
#[derive(Debug, Clone, Copy)]
pub struct WorkerRecord {
    ns: u64,
    version: u64,
    len: u32,
    held: u16,
    ingress: PortId,
    action: Action,
    branch: Option<Branch>,
    bytes: [u8; SNAP],
}

/// The tap, shared by the workers, the collector and the admin endpoint.
#[derive(Debug)]
pub struct Tap {
    armed: AtomicBool,
    /// The TM route workers keep ([`ANY_TM`]: every one).
    tm: AtomicU32,
    /// Take a frame when a random u32 is at most this (0: every frame).
    sample: AtomicU32,
    busy: AtomicBool,
    consumers: Mutex<Vec<rtrb::Consumer<WorkerRecord>>>,
    /// Counters.
    pub stats: TapStats,
}

/// A worker's end of the tap: its ring's producer.
#[derive(Debug)]
pub struct WorkerTap {
    tap: Arc<Tap>,
    ring: rtrb::Producer<WorkerRecord>,
    rng: u64,
}

impl Tap {
    /// A tap for `workers` workers, and each worker's end.
    pub fn new(workers: usize) -> (Arc<Tap>, Vec<WorkerTap>) {
        let (producers, consumers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| rtrb::RingBuffer::<WorkerRecord>::new(WORKER_RING))
            .unzip();
        let tap = Arc::new(Tap {
            armed: AtomicBool::new(false),
            tm: AtomicU32::new(ANY_TM),
            sample: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            consumers: Mutex::new(consumers),
            stats: TapStats::default(),
        });
        let ends = producers
            .into_iter()
            .enumerate()
            .map(|(i, ring)| WorkerTap {
                tap: Arc::clone(&tap),
                ring,
                rng: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1),
            })
            .collect();
        (tap, ends)
    }

    /// True while a capture is armed.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }
}

/// The sampling threshold for a share in (0, 1]: 0 (every frame) at 1.
fn threshold(sample: f64) -> u32 {
    if sample >= 1.0 {
        0
    } else {
        ((sample * f64::from(u32::MAX)) as u32).max(1)
    }
}

impl WorkerTap {
    /// True while a capture is armed (one relaxed load: per batch).
    #[inline(always)]
    pub fn armed(&self) -> bool {
        self.tap.armed.load(Ordering::Relaxed)
    }

    /// Copies the decided frames of `batch` (after `Worker::process_batch`,
    /// before they are sent) that pass the TM filter and the sample.
    pub fn capture(&mut self, batch: &Batch, plan: &Plan, now: u64) {
        let tm = self.tap.tm.load(Ordering::Relaxed);
        let sample = self.tap.sample.load(Ordering::Relaxed);
        let version = plan.table().version();
        for i in 0..batch.len() {
            let action = batch.action(i);
            if tm != ANY_TM {
                let hit = match action {
                    Action::ToTm { tm: t, .. } => u32::from(t) == tm,
                    Action::ToTmAndCopy { tm: t, also, .. } => {
                        u32::from(t) == tm || u32::from(also) == tm
                    }
                    _ => false,
                };
                if !hit {
                    continue;
                }
            }
            if sample != 0 {
                // xorshift64: the worker's own, no shared state.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if (self.rng >> 32) as u32 > sample {
                    continue;
                }
            }
            let (ingress, slot, len) = batch.get(i);
            let len = match action {
                Action::Reply { len: reply } => reply.min(slot.len()),
                _ => len,
            };
            let held = len.min(SNAP);
            let mut rec = WorkerRecord {
                ns: now,
                version,
                len: len as u32,
                held: held as u16,
                ingress,
                action,
                branch: batch.branch(i),
                bytes: [0; SNAP],
            };
            rec.bytes[..held].copy_from_slice(&slot[..held]);
            if self.ring.push(rec).is_err() {
                self.tap
                    .stats
                    .dropped_worker_ring
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the collector does with a chunk of pcapng.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Taken.
    Taken,
    /// The reader is behind: the chunk is lost (counted).
    Full,
    /// The reader is gone: the capture ends.
    Closed,
}

/// A distributor port as a capture names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortName {
    /// The port's name.
    pub name: String,
    /// Its interface index, if it has an interface.
    pub ifindex: Option<u32>,
}

/// What a capture needs of the distributor.
#[derive(Debug, Clone)]
pub struct Source {
    /// The tap.
    pub tap: Arc<Tap>,
    /// The running plan (annotations: TM names, groups, buckets).
    pub plan: Arc<SharedTable<Plan>>,
    /// The in-kernel steering, if it runs.
    pub kernel: Option<Arc<XdpSteer>>,
    /// The ports, in order.
    pub ports: Vec<PortName>,
    /// A CPU no worker steers on, for the collector thread (`None`: where
    /// the scheduler puts it — the workers are not pinned, or they take
    /// every CPU).
    pub collector_cpu: Option<usize>,
}

impl Source {
    /// Checks `req` and arms the capture; the collector then runs on its
    /// own thread, handing pcapng to `sink` until the time or frame limit,
    /// or until `sink` says the reader is gone.
    pub fn start(
        &self,
        req: Request,
        sink: impl FnMut(Vec<u8>) -> Sent + Send + 'static,
    ) -> Result<(), CaptureError> {
        if !(req.seconds > 0.0 && req.seconds <= MAX_SECONDS) {
            return Err(CaptureError::Invalid(format!(
                "seconds: {} is not in (0, {MAX_SECONDS}]",
                req.seconds
            )));
        }
        if !(req.sample > 0.0 && req.sample <= 1.0) {
            return Err(CaptureError::Invalid(format!(
                "sample: {} is not in (0, 1]",
                req.sample
            )));
        }
        if let Some(expr) = &req.bpf {
            compile(expr).map_err(CaptureError::Invalid)?;
        }
        let route = match req.tm {
            None => ANY_TM,
            Some(id) => match self.plan.load().route_of(id) {
                Some(r) => u32::from(r),
                None => {
                    return Err(CaptureError::Invalid(format!(
                        "tm: no TM with id {id} in the running table"
                    )))
                }
            },
        };
        if self.tap.busy.swap(true, Ordering::AcqRel) {
            return Err(CaptureError::Busy);
        }
        let tap = &self.tap;
        tap.tm.store(route, Ordering::Relaxed);
        tap.sample.store(threshold(req.sample), Ordering::Relaxed);
        if let Some(k) = &self.kernel {
            let entry = CaptureEntry {
                armed: 1,
                tm: route,
                sample: threshold(req.sample),
                reserved: 0,
            };
            if let Err(e) = k.set_capture(Some(entry)) {
                tap.busy.store(false, Ordering::Release);
                return Err(CaptureError::Kernel(e.to_string()));
            }
        }
        tap.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tap.armed.store(true, Ordering::Release);
        let src = self.clone();
        let spawned = std::thread::Builder::new()
            .name("stdd-capture".into())
            .spawn(move || src.collect(req, sink));
        if let Err(e) = spawned {
            self.disarm();
            self.tap.busy.store(false, Ordering::Release);
            return Err(CaptureError::Invalid(format!(
                "cannot start the collector: {e}"
            )));
        }
        Ok(())
    }

    fn disarm(&self) {
        self.tap.armed.store(false, Ordering::Release);
        if let Some(k) = &self.kernel {
            if let Err(e) = k.set_capture(None) {
                log::error!("capture: disarming the in-kernel capture failed: {e}");
            }
        }
    }

    /// The collector: drains the rings until the capture ends.
    fn collect(self, req: Request, mut sink: impl FnMut(Vec<u8>) -> Sent) {
        if let Some(cpu) = self.collector_cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                log::warn!("capture: could not pin the collector to CPU {cpu}");
            }
        }
        let kernel_dropped0 = self.kernel_dropped();
        let worker_dropped0 = self.tap.stats.dropped_worker_ring.load(Ordering::Relaxed);
        let reader_dropped0 = self.tap.stats.dropped_reader.load(Ordering::Relaxed);
        let filter = compile_filter(&req);
        let clock = Clock::now();
        let mut out = Writer::new(
            &self.ports,
            self.kernel.as_ref().is_some_and(|k| k.can_capture()),
        );
        let deadline = Instant::now() + Duration::from_secs_f64(req.seconds);
        let mut frames = 0u64;
        let mut counts = PathCounts::default();
        let mut closed = false;
        let mut last_flush = Instant::now();
        let mut consumers = self.tap.consumers.lock().unwrap_or_else(|p| p.into_inner());
        let mut pass = |out: &mut Writer, frames: &mut u64, counts: &mut PathCounts| {
            let plan = self.plan.load();
            let mut n = 0;
            if let Some(k) = &self.kernel {
                n += k.drain_capture(PASS, |h, bytes| {
                    if h.len == 0 || (req.max_frames > 0 && *frames >= req.max_frames) {
                        return;
                    }
                    let frame = Captured::kernel(&h, bytes, &self.ports);
                    if out.frame(&frame, &plan, &filter, clock.kernel(h.ktime_ns)) {
                        *frames += 1;
                        counts.kernel += 1;
                    }
                });
            }
            for c in consumers.iter_mut() {
                for _ in 0..PASS {
                    let Ok(r) = c.pop() else { break };
                    n += 1;
                    if req.max_frames > 0 && *frames >= req.max_frames {
                        continue;
                    }
                    let frame = Captured::worker(&r);
                    if out.frame(&frame, &plan, &filter, clock.worker(r.ns)) {
                        *frames += 1;
                        counts.worker += 1;
                    }
                }
            }
            n
        };
        while Instant::now() < deadline && !(req.max_frames > 0 && frames >= req.max_frames) {
            let n = pass(&mut out, &mut frames, &mut counts);
            if out.len() >= CHUNK || last_flush.elapsed() >= Duration::from_millis(200) {
                last_flush = Instant::now();
                match out.take().map(&mut sink) {
                    Some(Sent::Closed) => {
                        closed = true;
                        break;
                    }
                    Some(Sent::Full) => {
                        self.tap
                            .stats
                            .dropped_reader
                            .fetch_add(out.last_frames, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.disarm();
        // What was copied before the disarm, then the rings left empty.
        std::thread::sleep(Duration::from_millis(5));
        while pass(&mut out, &mut frames, &mut counts) > 0 {}
        drop(consumers);
        let dropped = Drops {
            kernel: self.kernel_dropped().saturating_sub(kernel_dropped0),
            worker: self
                .tap
                .stats
                .dropped_worker_ring
                .load(Ordering::Relaxed)
                .saturating_sub(worker_dropped0),
            reader: self
                .tap
                .stats
                .dropped_reader
                .load(Ordering::Relaxed)
                .saturating_sub(reader_dropped0),
        };
        self.tap.stats.frames.fetch_add(frames, Ordering::Relaxed);
        if !closed {
            out.statistics(clock.now_ns(), frames, counts, dropped);
            if let Some(chunk) = out.take() {
                // The last chunk waits for the reader a little (it holds
                // the drop counts).
                for _ in 0..100 {
                    if sink(chunk.clone()) != Sent::Full {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        log::info!(
            "capture: {frames} frames ({} kernel, {} worker); lost: {} kernel ring, {} worker rings, {} reader",
            counts.kernel, counts.worker, dropped.kernel, dropped.worker, dropped.reader
        );
        self.tap.busy.store(false, Ordering::Release);
    }

    fn kernel_dropped(&self) -> u64 {
        self.kernel
            .as_ref()
            .and_then(|k| k.capture_dropped().ok())
            .unwrap_or(0)
    }
}

/// Frames a capture wrote, by path.
#[derive(Debug, Clone, Copy, Default)]
struct PathCounts {
    kernel: u64,
    worker: u64,
}

/// Frames a capture lost, by where.
#[derive(Debug, Clone, Copy, Default)]
struct Drops {
    kernel: u64,
    worker: u64,
    reader: u64,
}

/// The two clocks' records on the wall clock, in ns since 1970.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Wall time at the kernel clock's zero.
    kernel_zero: i128,
    /// Wall time at the workers' epoch.
    worker_zero: i128,
}

impl Clock {
    fn now() -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Clock {
            kernel_zero: wall - i128::from(crate::sys::bpf::ktime_ns()),
            worker_zero: wall - i128::from(crate::io::clock_ns()),
        }
    }
    fn kernel(&self, ns: u64) -> u64 {
        (self.kernel_zero + i128::from(ns)).max(0) as u64
    }
    fn worker(&self, ns: u64) -> u64 {
        (self.worker_zero + i128::from(ns)).max(0) as u64
    }
    fn now_ns(&self) -> u64 {
        self.worker(crate::io::clock_ns())
    }
}

/// One captured frame, from either path, before annotation.
#[derive(Debug)]
struct Captured<'a> {
    kernel: bool,
    bytes: &'a [u8],
    len: u32,
    version: u64,
    /// The port it came in on.
    ingress: Option<PortId>,
    action: Action,
    branch: Option<Branch>,
    /// The bucket the kernel looked up.
    bucket: Option<u16>,
    queue: Option<u32>,
}

impl<'a> Captured<'a> {
    fn kernel(h: &RecordHeader, bytes: &'a [u8], ports: &[PortName]) -> Captured<'a> {
        let ingress = ports
            .iter()
            .position(|p| p.ifindex == Some(h.ifindex))
            .map(|i| i as PortId);
        Captured {
            kernel: true,
            bytes,
            len: h.len,
            version: h.version,
            ingress,
            // The port is the TM's (the plan knows it); 0 is not read.
            action: Action::ToTm {
                tm: h.route,
                port: 0,
            },
            branch: Some(Branch::Endpoint),
            bucket: Some(h.bucket),
            queue: Some(h.queue),
        }
    }

    fn worker(r: &'a WorkerRecord) -> Captured<'a> {
        Captured {
            kernel: false,
            bytes: &r.bytes[..usize::from(r.held)],
            len: r.len,
            version: r.version,
            ingress: Some(r.ingress),
            action: r.action,
            branch: r.branch,
            bucket: None,
            queue: None,
        }
    }
}

/// The filters the collector applies.
struct Filter {
    tm: Option<u32>,
    bucket: Option<u16>,
    host: Option<IpAddr>,
    port: Option<u16>,
    protocol: Option<u8>,
    bpf: Option<pcap::BpfProgram>,
}

fn compile(expr: &str) -> Result<pcap::BpfProgram, String> {
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET)
        .map_err(|e| format!("filter: libpcap: {e}"))?;
    dead.compile(expr, true)
        .map_err(|e| format!("filter: {expr:?}: {e}"))
}

fn compile_filter(req: &Request) -> Filter {
    Filter {
        tm: req.tm,
        bucket: req.bucket,
        host: req.host,
        port: req.port,
        protocol: req.protocol,
        // Checked by `start`; compiled again here, on the collector's thread.
        bpf: req.bpf.as_deref().and_then(|e| compile(e).ok()),
    }
}

/// The flow of a frame's held bytes (lenient: the bytes may be cut at
/// [`SNAP`]), and its IP protocol.
pub fn flow_of(frame: &[u8]) -> Option<Flow> {
    let mut at = 12;
    let mut ty = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    for _ in 0..2 {
        if ty == 0x8100 || ty == 0x88a8 {
            at += 4;
            ty = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        }
    }
    let l3 = frame.get(at + 2..)?;
    let (proto, src, dst, l4, first) = match ty {
        0x0800 => {
            let ihl = usize::from(*l3.first()? & 0x0f) * 4;
            let a: [u8; 4] = l3.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = l3.get(16..20)?.try_into().ok()?;
            let frag = u16::from_be_bytes([*l3.get(6)?, *l3.get(7)?]);
            (
                *l3.get(9)?,
                IpAddr::from(a),
                IpAddr::from(b),
                ihl,
                frag & 0x1fff == 0,
            )
        }
        0x86dd => {
            let a: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = l3.get(24..40)?.try_into().ok()?;
            (*l3.get(6)?, IpAddr::from(a), IpAddr::from(b), 40, true)
        }
        _ => return None,
    };
    if crate::wire::has_ports(proto) && first {
        let p = l3.get(l4..l4 + 4)?;
        Some(Flow::with_ports(
            proto,
            src,
            u16::from_be_bytes([p[0], p[1]]),
            dst,
            u16::from_be_bytes([p[2], p[3]]),
        ))
    } else {
        Some(Flow::without_ports(proto, src, dst))
    }
}

/// The table a record's version names: the running one, or the previous
/// one of a transition; else the running one (named so in the comment).
fn table_of(plan: &Plan, version: u64) -> (&AllocationTable, bool) {
    if plan.table().version() == version {
        return (plan.table(), true);
    }
    match plan.previous() {
        Some(p) if p.version() == version => (p, true),
        _ => (plan.table(), false),
    }
}

/// A TM route's name and id under `plan`.
fn tm_label(plan: &Plan, route: u16) -> String {
    match (
        plan.tm_id(route),
        plan.table().tms().get(usize::from(route)),
    ) {
        (Some(id), Some(tm)) => format!("tm={} tm_id={id}", tm.name),
        (Some(id), None) => format!("tm_id={id}"),
        _ => format!("tm_route={route}"),
    }
}

/// The pcapng stream of one capture.
struct Writer {
    buf: Vec<u8>,
    /// Frames in `buf`.
    frames: u64,
    /// Frames in the chunk last taken.
    last_frames: u64,
    ports: usize,
}

/// pcapng block types and options.
mod block {
    pub const SHB: u32 = 0x0a0d_0d0a;
    pub const IDB: u32 = 1;
    pub const ISB: u32 = 5;
    pub const EPB: u32 = 6;
    pub const OPT_END: u16 = 0;
    pub const OPT_COMMENT: u16 = 1;
    pub const SHB_USERAPPL: u16 = 4;
    pub const IF_NAME: u16 = 2;
    pub const IF_TSRESOL: u16 = 9;
    pub const ISB_IFDROP: u16 = 5;
    pub const LINKTYPE_ETHERNET: u16 = 1;
}

fn option(b: &mut Vec<u8>, code: u16, value: &[u8]) {
    b.extend_from_slice(&code.to_le_bytes());
    b.extend_from_slice(&(value.len() as u16).to_le_bytes());
    b.extend_from_slice(value);
    b.resize(b.len().next_multiple_of(4), 0);
}

fn block(out: &mut Vec<u8>, ty: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

impl Writer {
    /// The section header and an interface per port (its name; times in ns).
    fn new(ports: &[PortName], kernel_ring: bool) -> Writer {
        let mut buf = Vec::with_capacity(2 * CHUNK);
        let mut body = Vec::new();
        body.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&u64::MAX.to_le_bytes()); // section length unknown
        option(&mut body, block::SHB_USERAPPL, b"stdd capture");
        if !kernel_ring {
            option(
                &mut body,
                block::OPT_COMMENT,
                b"no in-kernel capture ring: frames the XDP program steers are not in this capture",
            );
        }
        option(&mut body, block::OPT_END, &[]);
        block(&mut buf, block::SHB, &body);
        for p in ports {
            let mut body = Vec::new();
            body.extend_from_slice(&block::LINKTYPE_ETHERNET.to_le_bytes());
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&(SNAP as u32).to_le_bytes());
            option(&mut body, block::IF_NAME, p.name.as_bytes());
            option(&mut body, block::IF_TSRESOL, &[9]);
            option(&mut body, block::OPT_END, &[]);
            block(&mut buf, block::IDB, &body);
        }
        Writer {
            buf,
            frames: 0,
            last_frames: 0,
            ports: ports.len(),
        }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self) -> Option<Vec<u8>> {
        if self.buf.is_empty() {
            return None;
        }
        self.last_frames = self.frames;
        self.frames = 0;
        Some(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(2 * CHUNK),
        ))
    }

    /// Annotates `f`, applies the filter and writes it; true if written.
    fn frame(&mut self, f: &Captured<'_>, plan: &Plan, filter: &Filter, wall_ns: u64) -> bool {
        let flow = flow_of(f.bytes);
        let (table, known) = table_of(plan, f.version);
        let steering = flow.map(|fl| table.steer(&fl));
        let bucket = f.bucket.or_else(|| {
            steering
                .as_ref()
                .filter(|_| {
                    matches!(
                        f.branch,
                        Some(
                            Branch::Endpoint
                                | Branch::Address
                                | Branch::NoPorts
                                | Branch::TransitionNew
                                | Branch::TransitionRemembered
                                | Branch::TransitionOld
                                | Branch::TransitionIcmpBoth
                                | Branch::Pinned
                        )
                    )
                })
                .and_then(|s| match s.by {
                    SteerBy::Endpoint { bucket }
                    | SteerBy::Address { bucket }
                    | SteerBy::NoPorts { bucket } => Some(bucket),
                    SteerBy::EqualPorts => None,
                })
        });
        let tms: (Option<u16>, Option<u16>) = match f.action {
            Action::ToTm { tm, .. } => (Some(tm), None),
            Action::ToTmAndCopy { tm, also, .. } => (Some(tm), Some(also)),
            _ => (None, None),
        };
        if let Some(id) = filter.tm {
            let ids = [tms.0, tms.1].map(|r| r.and_then(|r| plan.tm_id(r)));
            if !ids.contains(&Some(id)) {
                return false;
            }
        }
        if filter.bucket.is_some() && filter.bucket != bucket {
            return false;
        }
        if let Some(h) = filter.host {
            if !flow.is_some_and(|fl| fl.src == h || fl.dst == h) {
                return false;
            }
        }
        if let Some(p) = filter.port {
            if !flow
                .and_then(|fl| fl.ports)
                .is_some_and(|(s, d)| s == p || d == p)
            {
                return false;
            }
        }
        if let Some(pr) = filter.protocol {
            if flow.map(|fl| fl.protocol) != Some(pr) {
                return false;
            }
        }
        if let Some(bpf) = &filter.bpf {
            if !bpf.filter(f.bytes) {
                return false;
            }
        }
        let mut note = format!(
            "path={} branch={}",
            if f.kernel { "kernel" } else { "worker" },
            f.branch.map_or("none", Branch::name)
        );
        use std::fmt::Write as _;
        let _ = match f.action {
            Action::ToTm { tm, .. } => write!(note, " action=to_tm {}", tm_label(plan, tm)),
            Action::ToTmAndCopy { tm, also, .. } => write!(
                note,
                " action=to_tm_and_copy {} also_{}",
                tm_label(plan, tm),
                tm_label(plan, also)
            ),
            Action::Forward(p) => write!(note, " action=forward out={p}"),
            Action::Flood => write!(note, " action=flood"),
            Action::Reply { .. } => write!(note, " action=reply"),
            Action::ToAllTms => write!(note, " action=to_all_tms"),
            Action::Held => write!(note, " action=held"),
            Action::Drop(d) => write!(note, " action=drop reason={}", d.name()),
        };
        if let Some(s) = steering.filter(|_| tms.0.is_some()) {
            let group = table.groups().get(s.group).map_or("?", |g| g.name.as_str());
            let _ = write!(note, " group={group}");
        }
        if let Some(b) = bucket {
            let _ = write!(note, " bucket={b}");
        }
        let _ = write!(note, " table={}", f.version);
        if !known {
            let _ = write!(note, " (not the running table {})", plan.table().version());
        }
        if let Some(q) = f.queue {
            let _ = write!(note, " queue={q}");
        }
        let iface = f
            .ingress
            .map(usize::from)
            .filter(|&i| i < self.ports)
            .unwrap_or(0) as u32;
        let mut body = Vec::with_capacity(f.bytes.len() + note.len() + 32);
        body.extend_from_slice(&iface.to_le_bytes());
        body.extend_from_slice(&((wall_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(wall_ns as u32).to_le_bytes());
        body.extend_from_slice(&(f.bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(&f.len.max(f.bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(f.bytes);
        body.resize(body.len().next_multiple_of(4), 0);
        option(&mut body, block::OPT_COMMENT, note.as_bytes());
        option(&mut body, block::OPT_END, &[]);
        block(&mut self.buf, block::EPB, &body);
        self.frames += 1;
        true
    }

    /// The closing statistics: an interface statistics block on the first
    /// interface whose drop count is every frame lost, and a comment with
    /// the breakdown (what `stdctl capture` prints).
    fn statistics(&mut self, wall_ns: u64, frames: u64, c: PathCounts, d: Drops) {
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&((wall_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(wall_ns as u32).to_le_bytes());
        option(
            &mut body,
            block::ISB_IFDROP,
            &(d.kernel + d.worker + d.reader).to_le_bytes(),
        );
        let note = format!(
            "std capture: frames={frames} kernel={} worker={} dropped_kernel_ring={} dropped_worker_ring={} dropped_reader={}",
            c.kernel, c.worker, d.kernel, d.worker, d.reader
        );
        option(&mut body, block::OPT_COMMENT, note.as_bytes());
        option(&mut body, block::OPT_END, &[]);
        block(&mut self.buf, block::ISB, &body);
    }
}

/// Parses `tcp`, `udp`, `icmp`, `icmp6` or a protocol number.
pub fn protocol(s: &str) -> io::Result<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmp6" | "icmpv6" => Ok(58),
        n => n.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("protocol {s:?}: tcp, udp, icmp, icmp6 or a number"),
            )
        }),
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::build::{self, L2};
    use crate::steer::PortKind;
    use allocation::{GroupSpec, HashKey, MacAddr, Profile, Tm};

    const GROUP: MacAddr = MacAddr([2, 0x57, 0x44, 0, 0, 1]);

    fn plan() -> Plan {
        // TM ids 10 and 11: ids are not indices.
        let tms = (0..2)
            .map(|i| Tm {
                id: 10 + i,
                ..testkit::tm(i)
            })
            .collect();
        let t = AllocationTable::new(
            3,
            HashKey::from_bytes([1; 16]),
            tms,
            vec![GroupSpec::default_group(Profile::Uniform)],
        )
        .expect("table");
        Plan::new(
            t,
            GROUP,
            &["198.51.100.10".parse().expect("addr")],
            vec![PortKind::Outside, PortKind::Tm],
            &[(10, 1), (11, 1)],
        )
        .expect("plan")
    }

    fn tcp(port: u16) -> Vec<u8> {
        build::tcp_frame(
            &L2::new(GROUP, MacAddr([2, 0xee, 0, 0, 0, 1])),
            "203.0.113.7".parse().expect("addr"),
            port,
            "198.51.100.10".parse().expect("addr"),
            443,
            2,
            &[0x55; 400],
        )
    }

    /// The blocks of a pcapng stream: (type, body).
    fn blocks(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 12 {
            let ty = u32::from_le_bytes(b[..4].try_into().expect("4"));
            let len = u32::from_le_bytes(b[4..8].try_into().expect("4")) as usize;
            assert!(
                len >= 12 && len % 4 == 0 && len <= b.len(),
                "block length {len}"
            );
            assert_eq!(&b[len - 4..len], &b[4..8], "trailing length");
            out.push((ty, b[8..len - 4].to_vec()));
            b = &b[len..];
        }
        assert!(b.is_empty(), "trailing bytes");
        out
    }

    fn comment(epb: &[u8]) -> String {
        let held = u32::from_le_bytes(epb[12..16].try_into().expect("4")) as usize;
        let opts = &epb[20 + held.next_multiple_of(4)..];
        assert_eq!(u16::from_le_bytes([opts[0], opts[1]]), block::OPT_COMMENT);
        let n = usize::from(u16::from_le_bytes([opts[2], opts[3]]));
        String::from_utf8(opts[4..4 + n].to_vec()).expect("utf-8")
    }

    /// A worker's frames go through its ring into pcapng, cut at SNAP,
    /// annotated with the decision the worker took; the filters keep what
    /// they name; a full ring counts what it lost.
    #[test]
    fn worker_frames_become_annotated_pcapng() {
        let p = plan();
        let (tap, mut ends) = Tap::new(1);
        let mut batch = Batch::new(8);
        let mut w = crate::Worker::new(Default::default(), HashKey::from_bytes([2; 16]));
        for port in [40000, 40001, 40002] {
            assert!(batch.push(0, 0, &tcp(port)));
        }
        w.process_batch(&mut batch, &p, 0);
        tap.armed.store(true, Ordering::Relaxed);
        ends[0].capture(&batch, &p, 5);
        let records: Vec<WorkerRecord> = {
            let mut c = tap.consumers.lock().expect("lock");
            std::iter::from_fn(|| c[0].pop().ok()).collect()
        };
        assert_eq!(records.len(), 3);
        let ports = vec![
            PortName {
                name: "outside".into(),
                ifindex: None,
            },
            PortName {
                name: "tms".into(),
                ifindex: None,
            },
        ];
        let req = Request {
            sample: 1.0,
            seconds: 1.0,
            ..Request::default()
        };
        let mut out = Writer::new(&ports, true);
        let all = compile_filter(&req);
        for r in &records {
            assert!(out.frame(&Captured::worker(r), &p, &all, 1));
        }
        let b = blocks(&out.take().expect("bytes"));
        assert_eq!(
            b.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![block::SHB, block::IDB, block::IDB, 6, 6, 6]
        );
        let epb = &b[3].1;
        let held = u32::from_le_bytes(epb[12..16].try_into().expect("4"));
        let orig = u32::from_le_bytes(epb[16..20].try_into().expect("4"));
        assert_eq!((held, orig as usize), (SNAP as u32, tcp(40000).len()));
        let flow = flow_of(&tcp(40000)).expect("flow");
        let s = p.table().steer(&flow);
        let name = &p.table().tms()[usize::from(s.tm)].name;
        let SteerBy::Endpoint { bucket } = s.by else {
            panic!("endpoint")
        };
        assert_eq!(
            comment(epb),
            format!(
                "path=worker branch=endpoint action=to_tm tm={name} tm_id={} group=default bucket={bucket} table=3",
                10 + u32::from(s.tm)
            )
        );
        // The frame as it leaves: the TM's MAC.
        assert_eq!(&epb[20..26], &p.table().tms()[usize::from(s.tm)].mac.0);
        // Filters: a port, a BPF expression, a TM.
        let keep = |req: Request| {
            let f = compile_filter(&req);
            let mut out = Writer::new(&ports, true);
            records
                .iter()
                .filter(|r| out.frame(&Captured::worker(r), &p, &f, 1))
                .count()
        };
        assert_eq!(
            keep(Request {
                port: Some(40001),
                ..req.clone()
            }),
            1
        );
        assert_eq!(
            keep(Request {
                bpf: Some("tcp src port 40002 or tcp src port 40000".into()),
                ..req.clone()
            }),
            2
        );
        assert_eq!(
            keep(Request {
                protocol: Some(17),
                ..req.clone()
            }),
            0
        );
        let on_tm = keep(Request {
            tm: Some(10),
            ..req.clone()
        }) + keep(Request {
            tm: Some(11),
            ..req.clone()
        });
        assert_eq!(on_tm, 3);
        // Disarmed: the worker copies nothing; a full ring counts.
        tap.armed.store(false, Ordering::Relaxed);
        assert!(!ends[0].armed());
        tap.armed.store(true, Ordering::Relaxed);
        for _ in 0..(WORKER_RING / 3 + 2) {
            ends[0].capture(&batch, &p, 5);
        }
        assert!(tap.stats.dropped_worker_ring.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn requests_out_of_range_are_refused() {
        let (tap, _ends) = Tap::new(1);
        let src = Source {
            tap,
            plan: Arc::new(SharedTable::new(plan())),
            kernel: None,
            ports: vec![],
            collector_cpu: None,
        };
        let ok = Request {
            sample: 1.0,
            seconds: 0.05,
            ..Request::default()
        };
        let bad = |r: Request| src.start(r, |_| Sent::Taken).map_err(|e| e.to_string());
        assert!(bad(Request {
            seconds: 0.0,
            ..ok.clone()
        })
        .is_err_and(|e| e.contains("seconds")));
        assert!(bad(Request {
            sample: 1.5,
            ..ok.clone()
        })
        .is_err_and(|e| e.contains("sample")));
        assert!(bad(Request {
            tm: Some(99),
            ..ok.clone()
        })
        .is_err_and(|e| e.contains("no TM with id 99")));
        assert!(bad(Request {
            bpf: Some("tcp port banana".into()),
            ..ok.clone()
        })
        .is_err_and(|e| e.contains("filter")));
        // One at a time; a finished one frees the tap.
        let (tx, rx) = std::sync::mpsc::channel();
        src.start(ok.clone(), move |c| {
            let _ = tx.send(c);
            Sent::Taken
        })
        .expect("start");
        assert_eq!(
            bad(ok.clone()),
            Err("another capture is running on this distributor".into())
        );
        let mut bytes = Vec::new();
        while let Ok(c) = rx.recv_timeout(Duration::from_secs(5)) {
            bytes.extend(c);
        }
        let b = blocks(&bytes);
        assert_eq!(b.first().map(|x| x.0), Some(block::SHB));
        assert_eq!(b.last().map(|x| x.0), Some(block::ISB));
        for _ in 0..100 {
            if !src.tap.busy.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(src.start(ok, |_| Sent::Closed).is_ok());
    }
}
