//! Packet I/O behind one trait, and the worker loop that joins a backend to the steering: batches in, actions out.
//!
//! Backends only move bytes: they fill a [`Batch`] of preallocated slots
//! and send frames out of ports. Everything else — the decision, the
//! rewrite, the counters — is the [`Worker`]'s. The loop loads the plan
//! once per batch and publishes its counters at most every 100 ms, so the
//! per-frame path takes no lock and makes no allocation.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use allocation::{HashKey, SharedTable};

use crate::steer::Plan;
use crate::verdict::{Action, Counters, PortId};
use crate::wire;
use crate::worker::{Worker, WorkerConfig};

pub use datapath::batch::{Batch, SLOT_BYTES};

/// A packet I/O backend.
pub trait Backend {
    /// Number of ports.
    fn ports(&self) -> usize;
    /// Fills `batch` (cleared first) with up to its capacity frames, waiting
    /// at most the backend's poll time; returns how many.
    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize>;
    /// Sends (or queues) `frame` out of `port`.
    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()>;
    /// Sends what is queued.
    fn flush(&mut self) -> io::Result<()>;
    /// Frames the backend dropped before steering, in all (larger than its
    /// buffers; lost by the kernel for want of ring room). Read at most
    /// every publish period: it may cost a system call.
    fn dropped(&mut self) -> u64 {
        0
    }
    /// True when no frame will ever come again (a capture file read to its end).
    fn finished(&self) -> bool {
        false
    }
}

/// Frames in memory: for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    ports: usize,
    inbox: VecDeque<(PortId, Vec<u8>)>,
    /// Frames sent, in order: (port, bytes).
    pub sent: Vec<(PortId, Vec<u8>)>,
}

impl MemoryBackend {
    /// A backend with `ports` ports and these frames to receive.
    pub fn new(ports: usize, inbox: impl IntoIterator<Item = (PortId, Vec<u8>)>) -> Self {
        MemoryBackend {
            ports,
            inbox: inbox.into_iter().collect(),
            sent: Vec::new(),
        }
    }
}

impl Backend for MemoryBackend {
    fn ports(&self) -> usize {
        self.ports
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        while let Some((port, frame)) = self.inbox.front() {
            if !batch.push(*port, 0, frame) {
                break;
            }
            self.inbox.pop_front();
        }
        Ok(batch.len())
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        self.sent.push((port, frame.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn finished(&self) -> bool {
        self.inbox.is_empty()
    }
}

/// The bytes an action sends: the frame, or the reply it was turned into.
#[inline]
pub fn outgoing(action: Action, slot: &mut [u8], len: usize) -> &mut [u8] {
    match action {
        Action::Reply { len: reply } => {
            let end = reply.min(slot.len());
            &mut slot[..end]
        }
        _ => &mut slot[..len],
    }
}

/// Carries out one action on `frame` (see [`outgoing`]). `scratch` (a slot)
/// holds the per-TM copies of a frame for every TM. Send errors are counted
/// (`tx_errors`), not fatal.
pub fn dispatch<B: Backend>(
    backend: &mut B,
    plan: &Plan,
    action: Action,
    ingress: PortId,
    frame: &[u8],
    scratch: &mut [u8],
    counters: &mut Counters,
) {
    let mut send = |b: &mut B, port: PortId, bytes: &[u8]| {
        if b.send(port, bytes).is_err() {
            counters.tx_errors += 1;
        }
    };
    match action {
        Action::ToTm { port, .. } | Action::Forward(port) => send(backend, port, frame),
        Action::Reply { .. } => send(backend, ingress, frame),
        Action::Flood => {
            for p in 0..backend.ports() as PortId {
                if p != ingress {
                    send(backend, p, frame);
                }
            }
        }
        Action::ToTmAndCopy {
            port,
            also,
            also_port,
            ..
        } => {
            send(backend, port, frame);
            if let Some((_, mac)) = plan.tm_route(also) {
                let copy = &mut scratch[..frame.len()];
                copy.copy_from_slice(frame);
                wire::set_dst_mac(copy, mac);
                send(backend, also_port, copy);
            }
        }
        Action::ToAllTms => {
            let copy = &mut scratch[..frame.len()];
            copy.copy_from_slice(frame);
            for (_, port, mac) in plan.tm_routes() {
                wire::set_dst_mac(copy, mac);
                send(backend, port, copy);
            }
        }
        Action::Held | Action::Drop(_) => {}
    }
}

/// What a worker publishes for the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// Its counters.
    pub counters: Counters,
    /// Fragments held now.
    pub fragments_held: usize,
    /// First fragments remembered.
    pub fragments_remembered: usize,
    /// Learned MAC addresses.
    pub bridge_entries: usize,
    /// Flows in the transition memory (while a transition is switched).
    pub transit_remembered: usize,
    /// Flows the transition memory had no room for.
    pub transit_overflows: u64,
}

/// Shared between a worker thread and the admin endpoint.
#[derive(Debug)]
pub struct WorkerShared {
    /// The last published stats.
    pub stats: Mutex<WorkerStats>,
    /// When the worker last published, ms since `epoch` (liveness).
    pub heartbeat_ms: AtomicU64,
    epoch: Instant,
}

impl Default for WorkerShared {
    fn default() -> Self {
        WorkerShared {
            stats: Mutex::default(),
            heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl WorkerShared {
    /// Milliseconds since the worker last published.
    pub fn age_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64)
            .saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
    }
}

/// The workers' clock: one epoch for the whole process, so that times a
/// plan carries (a pin's last packet) mean the same on every worker.
pub fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Now on the workers' clock, in nanoseconds.
pub fn clock_ns() -> u64 {
    Instant::now().saturating_duration_since(epoch()).as_nanos() as u64
}

/// How often a worker publishes its counters.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Runs a worker over `backend` until `stop` is set: receive a batch, steer
/// every frame with one plan snapshot, copy it to the capture tap if one is
/// armed, send, publish. Returns the final
/// counters.
pub fn run_worker<B: Backend>(
    backend: &mut B,
    plan: &SharedTable<Plan>,
    cfg: WorkerConfig,
    batch_size: usize,
    stop: &AtomicBool,
    shared: &WorkerShared,
    mut tap: Option<crate::capture::WorkerTap>,
) -> Counters {
    let mut worker = Worker::new(
        cfg,
        HashKey::random().unwrap_or(HashKey::from_bytes([0x3c; 16])),
    );
    let mut batch = Batch::new(batch_size);
    let mut scratch = vec![0u8; SLOT_BYTES];
    let start = epoch();
    let mut last_publish = start;
    let publish = |worker: &Worker, at: Instant| {
        let in_transition = plan.load().previous().is_some();
        let now = at.saturating_duration_since(start).as_nanos() as u64;
        if let Ok(mut s) = shared.stats.lock() {
            s.counters.clone_from(&worker.counters);
            s.fragments_held = worker.fragments_held();
            s.fragments_remembered = worker.fragments_remembered();
            s.bridge_entries = worker.bridge_size();
            s.transit_overflows = worker.transit_overflows();
            s.transit_remembered = if in_transition {
                worker.transit_remembered(now)
            } else {
                0
            };
        }
        shared.heartbeat_ms.store(
            at.saturating_duration_since(shared.epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
    };
    publish(&worker, start);
    while !stop.load(Ordering::Relaxed) {
        let n = match backend.recv(&mut batch) {
            Ok(n) => n,
            Err(e) => {
                log::error!("receive failed: {e}");
                worker.counters.rx_errors += 1;
                std::thread::sleep(Duration::from_millis(100));
                0
            }
        };
        let now_i = Instant::now();
        let now = now_i.duration_since(start).as_nanos() as u64;
        if n > 0 {
            let snapshot = plan.load();
            worker.process_batch(&mut batch, &snapshot, now);
            if let Some(t) = tap.as_mut().filter(|t| t.armed()) {
                t.capture(&batch, &snapshot, now);
            }
            for i in 0..n {
                let action = batch.action(i);
                let (port, _, buf, len) = batch.get_mut(i);
                let frame = outgoing(action, buf, len);
                dispatch(
                    backend,
                    &snapshot,
                    action,
                    port,
                    frame,
                    &mut scratch,
                    &mut worker.counters,
                );
            }
            if worker.has_released() {
                let mut tx_errors = 0;
                worker.drain_released(&snapshot, |frame, a| {
                    if let Action::ToTm { port, .. } = a {
                        if backend.send(port, frame).is_err() {
                            tx_errors += 1;
                        }
                    }
                });
                worker.counters.tx_errors += tx_errors;
            }
            if backend.flush().is_err() {
                worker.counters.tx_errors += 1;
            }
        } else if backend.finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        worker.tick(now);
        if now_i.duration_since(last_publish) >= PUBLISH_EVERY {
            worker.counters.backend_drops = backend.dropped();
            publish(&worker, now_i);
            last_publish = now_i;
        }
    }
    let _ = backend.flush();
    worker.counters.backend_drops = backend.dropped();
    publish(&worker, Instant::now());
    worker.counters
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::build::{self, L2};
    use crate::steer::PortKind;
    use allocation::{MacAddr, Profile};
    use std::net::Ipv4Addr;

    const GROUP: MacAddr = MacAddr([2, 0x57, 0x44, 0, 0, 1]);

    fn plan() -> Plan {
        let t = testkit::table(1, HashKey::from_bytes([1; 16]), 2, Profile::Uniform);
        // Port 0 outside, port 1 shared by both TMs, port 2 bridged.
        Plan::new(
            t,
            GROUP,
            &[
                "198.51.100.10".parse().expect("addr"),
                "10.1.0.1".parse().expect("addr"),
            ],
            vec![PortKind::Outside, PortKind::Tm, PortKind::Bridged],
            &[(0, 1), (1, 1)],
        )
        .expect("plan")
    }

    #[test]
    fn the_loop_dispatches_every_action() {
        let router = MacAddr([2, 0xee, 0, 0, 0, 1]);
        let bcast = MacAddr([0xff; 6]);
        let arp_req = build::arp(
            &L2::new(bcast, router),
            1,
            router,
            Ipv4Addr::new(198, 51, 100, 1),
            MacAddr::default(),
            Ipv4Addr::new(198, 51, 100, 10),
        );
        let other = build::arp(
            &L2::new(bcast, router),
            1,
            router,
            Ipv4Addr::new(198, 51, 100, 1),
            MacAddr::default(),
            Ipv4Addr::new(198, 51, 100, 99),
        );
        let answer = build::arp(
            &L2::new(GROUP, router),
            2,
            router,
            Ipv4Addr::new(192, 0, 2, 80),
            GROUP,
            Ipv4Addr::new(10, 1, 0, 1),
        );
        let tcp = build::tcp_frame(
            &L2::new(GROUP, router),
            "203.0.113.7".parse().expect("addr"),
            40000,
            "198.51.100.10".parse().expect("addr"),
            443,
            2,
            b"",
        );
        let mut b =
            MemoryBackend::new(3, [(0, arp_req), (0, other.clone()), (0, answer), (0, tcp)]);
        let shared = SharedTable::new(plan());
        let stop = AtomicBool::new(false);
        let ws = WorkerShared::default();
        // Run until the inbox is empty, then stop.
        let mut batch = Batch::new(8);
        let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([2; 16]));
        let mut scratch = vec![0u8; SLOT_BYTES];
        let n = b.recv(&mut batch).expect("recv");
        let snapshot = shared.load();
        for i in 0..n {
            let (port, _, buf, len) = batch.get_mut(i);
            let a = w.process(buf, len, port, &snapshot, 0);
            let frame = outgoing(a, buf, len);
            dispatch(
                &mut b,
                &snapshot,
                a,
                port,
                frame,
                &mut scratch,
                &mut w.counters,
            );
        }
        let ports: Vec<PortId> = b.sent.iter().map(|(p, _)| *p).collect();
        // Reply out of port 0; flood to ports 1 and 2; the answer to both TMs on port 1; the SYN to its TM on port 1.
        assert_eq!(ports, vec![0, 1, 2, 1, 1, 1]);
        assert_eq!(
            &b.sent[0].1[..6],
            &router.0,
            "the reply goes back to the asker"
        );
        assert_eq!(b.sent[1].1, other);
        assert_eq!(
            &b.sent[3].1[..6],
            &[2, 0x53, 0x54, 0, 0, 1],
            "one copy per TM, each with its MAC"
        );
        assert_eq!(&b.sent[4].1[..6], &[2, 0x53, 0x54, 0, 0, 2]);
        // The loop itself stops when asked, and publishes.
        stop.store(true, Ordering::Relaxed);
        let c = run_worker(
            &mut b,
            &shared,
            WorkerConfig::default(),
            8,
            &stop,
            &ws,
            None,
        );
        assert_eq!(c.tx_errors, 0);
        assert!(ws.age_ms() < 5_000);
    }
}
