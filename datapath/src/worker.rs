//! A worker's per-frame processing: the steering verdict applied to the worker's own state (fragments, MAC learning) and counters.
//!
//! One `Worker` per core, owned by its thread: no locks, no atomics, no
//! allocation per frame. Time comes in as an argument (nanoseconds on any
//! monotonic clock) so tests and simulations drive it.

use allocation::{HashKey, TmIndex};

use allocation::hash::{bucket, hash_v4_endpoint, hash_v6_endpoint};
use allocation::MacAddr;

use crate::batch::Batch;
use crate::bridge::{Bridge, BridgeConfig};
use crate::frag::{FragConfig, FragTable};
use crate::steer::PortKind;
use crate::steer::{decide, Moved, Plan, Verdict};
use crate::transit::{Transit, TransitConfig};
use crate::verdict::{Action, Branch, Counters, Drop, PortId};
use crate::wire::{self, EthernetFrame};

/// A worker's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Fragment handler limits.
    pub frag: FragConfig,
    /// MAC learning limits.
    pub bridge: BridgeConfig,
    /// Transition memory limits.
    pub transit: TransitConfig,
}

/// Per-core steering state.
#[derive(Debug, Clone)]
pub struct Worker {
    frag: FragTable,
    bridge: Bridge,
    transit: Transit,
    /// This worker's counters.
    pub counters: Counters,
    /// The branch that decided the last frame (`None`: dropped or held).
    last: Option<Branch>,
}

impl Worker {
    /// A worker with all its memory allocated; `key` seeds its internal
    /// hash maps (any secret value).
    pub fn new(cfg: WorkerConfig, key: HashKey) -> Self {
        Worker {
            frag: FragTable::new(cfg.frag, key),
            bridge: Bridge::new(cfg.bridge, key),
            transit: Transit::new(cfg.transit, key),
            counters: Counters::default(),
            last: None,
        }
    }

    /// Processes the frame `buf[..len]` from `ingress`; rewrites it in place
    /// and says where it goes. `buf` may be longer than the frame (room for
    /// a reply).
    pub fn process(
        &mut self,
        buf: &mut [u8],
        len: usize,
        ingress: PortId,
        plan: &Plan,
        now: u64,
    ) -> Action {
        self.last = None;
        let src = buf
            .get(..len)
            .and_then(|f| EthernetFrame::new_checked(f).ok())
            .map(|e| (e.src(), e.dst()));
        if let Some((src, _)) = src {
            if src != plan.group_mac() {
                self.bridge.learn(src, ingress, now);
            }
        }
        match decide(buf, len, ingress, plan) {
            Verdict::ToTm {
                tm,
                branch,
                remember,
                moved,
                pin,
            } => {
                let pinned = pin.filter(|&h| plan.pins().is_some_and(|p| p.alive(h, now)));
                let (tm, branch) = match (pinned, moved) {
                    // An ICMP error may come through another distributor
                    // than its flow's packets, where a pin can outlive its
                    // flow (the flow ended, or a SYN reopened its endpoint,
                    // where its packets pass). Its flow is on the pin's TM
                    // or where the tables steer: a copy to each, the TM
                    // without the flow ignores its own.
                    (Some(h), m) if branch == Branch::IcmpError => {
                        let other = match m {
                            None => tm,
                            Some(m) => match self.transition(tm, m, plan, now) {
                                Some((t, _)) => t,
                                None if h.tm == m.old => tm,
                                None => m.old,
                            },
                        };
                        if other != h.tm {
                            return self.send_to_both(buf, len, other, h.tm, plan);
                        }
                        (h.tm, Branch::Pinned)
                    }
                    (Some(h), _) => (h.tm, Branch::Pinned),
                    (None, None) => (tm, branch),
                    (None, Some(m)) => match self.transition(tm, m, plan, now) {
                        Some(d) => d,
                        None => return self.send_to_both(buf, len, tm, m.old, plan),
                    },
                };
                let action = self.send_to_tm(buf, len, tm, branch, plan);
                if let (Some(key), Action::ToTm { .. }) = (remember, action) {
                    self.frag.remember(key, tm, now);
                }
                action
            }
            Verdict::Follow(key) => match self.frag.lookup(&key, now) {
                Some(tm) => self.send_to_tm(buf, len, tm, Branch::Fragment, plan),
                None => {
                    let mut held = self.frag.hold(&buf[..len], key, now);
                    if held == Err(Drop::FragmentHoldFull) {
                        // Free (and count) timed-out fragments, then try once more.
                        self.tick(now);
                        held = self.frag.hold(&buf[..len], key, now);
                    }
                    match held {
                        Ok(()) => Action::Held,
                        Err(d) => self.dropped(d),
                    }
                }
            },
            Verdict::Bridge(branch) => self.bridged(branch, src.map(|(_, d)| d), ingress, now),
            Verdict::BridgeStarted { branch, key, tm } => {
                if let Some(id) = plan.tm_id(tm) {
                    self.transit.remember(key, id, plan.table().version(), now);
                }
                self.bridged(branch, src.map(|(_, d)| d), ingress, now)
            }
            Verdict::Reply { len, branch } => {
                self.count(branch);
                Action::Reply { len }
            }
            Verdict::ToAllTms => {
                self.count(Branch::NeighbourToTms);
                Action::ToAllTms
            }
            Verdict::Drop(d) => self.dropped(d),
        }
    }

    fn bridged(
        &mut self,
        branch: Branch,
        dst: Option<MacAddr>,
        ingress: PortId,
        now: u64,
    ) -> Action {
        self.count(branch);
        match self.bridge.port_of(dst.unwrap_or_default(), now) {
            Some(p) if p == ingress => self.dropped(Drop::Hairpin),
            Some(p) => Action::Forward(p),
            None => Action::Flood,
        }
    }

    /// The transition rule for a flow in a moved bucket (DESIGN §4 step 2):
    /// remembered flows go where they started; a TCP connection starting
    /// now starts on the new owner `new` and is remembered (or, with no
    /// room left, starts on the old owner: counted, and it still works
    /// there); a session without handshake (UDP) not pinned to its old
    /// owner starts where the phase says and is remembered; everything
    /// else goes to the old owner.
    ///
    /// An ICMP error about a flow not remembered here may concern a flow
    /// that started through another distributor (routers spray the error
    /// by its own addresses): `None` — it goes to both owners.
    fn transition(
        &mut self,
        new: TmIndex,
        m: Moved,
        plan: &Plan,
        now: u64,
    ) -> Option<(TmIndex, Branch)> {
        let version = plan.table().version();
        if let Some(id) = self.transit.lookup(&m.key, version, now) {
            if let Some(tm) = plan.route_of(id) {
                return Some((tm, Branch::TransitionRemembered));
            }
        }
        if m.icmp {
            return None;
        }
        if m.start {
            if let Some(id) = plan.tm_id(new) {
                if self.transit.remember(m.key, id, version, now) {
                    return Some((new, Branch::TransitionNew));
                }
            }
        }
        if m.session {
            // No handshake tells a new session from an old one: the TMs'
            // pins (in the plan, consulted before) name the old ones; any
            // other starts here — on the old owner until the window opens,
            // then on the new one — and is remembered, so it stays there
            // until the commit, when its owner's pin takes over. With no
            // room left it still goes there (counted), unremembered.
            let (to, branch) = match m.open {
                true => (new, Branch::TransitionNew),
                false => (m.old, Branch::TransitionOld),
            };
            if let Some(id) = plan.tm_id(to) {
                self.transit.remember(m.key, id, version, now);
            }
            return Some((to, branch));
        }
        Some((m.old, Branch::TransitionOld))
    }

    /// The frame for TM `tm`, and a copy for TM `also` (see [`Action::ToTmAndCopy`]).
    fn send_to_both(
        &mut self,
        buf: &mut [u8],
        len: usize,
        tm: TmIndex,
        also: TmIndex,
        plan: &Plan,
    ) -> Action {
        let (Some((port, mac)), Some((also_port, _))) = (plan.tm_route(tm), plan.tm_route(also))
        else {
            return self.dropped(Drop::NoTmPort);
        };
        wire::set_dst_mac(buf, mac);
        self.count(Branch::TransitionIcmpBoth);
        self.counters.to_tm(tm, len);
        self.counters.to_tm(also, len);
        Action::ToTmAndCopy {
            tm,
            port,
            also,
            also_port,
        }
    }

    #[inline]
    fn send_to_tm(
        &mut self,
        buf: &mut [u8],
        len: usize,
        tm: TmIndex,
        branch: Branch,
        plan: &Plan,
    ) -> Action {
        let Some((port, mac)) = plan.tm_route(tm) else {
            return self.dropped(Drop::NoTmPort);
        };
        wire::set_dst_mac(buf, mac);
        self.count(branch);
        self.counters.to_tm(tm, len);
        Action::ToTm { tm, port }
    }

    #[inline]
    fn count(&mut self, b: Branch) {
        self.counters.branch(b);
        self.last = Some(b);
    }

    /// The branch that decided the last frame given to [`Worker::process`]
    /// (`None` if it was dropped or held).
    pub fn last_branch(&self) -> Option<Branch> {
        self.last
    }

    #[inline]
    fn dropped(&mut self, d: Drop) -> Action {
        self.counters.drop(d);
        Action::Drop(d)
    }

    /// Processes every frame of `batch`, recording each action in it: the
    /// same actions, rewrites and counters as [`Worker::process`] frame by
    /// frame, faster. TCP/UDP frames to the group from an outside port
    /// (unfragmented, unequal ports) under a single endpoint-hashed group
    /// are handled in stages of [`STAGE`] frames — classify all, hash all,
    /// then look up and rewrite — so that the hashes of different frames
    /// overlap in the CPU instead of each frame waiting for its own; every
    /// other frame takes [`Worker::process`].
    pub fn process_batch(&mut self, batch: &mut Batch, plan: &Plan, now: u64) {
        let n = batch.len();
        let Some((key, buckets, moved)) = plan.single_endpoint_group() else {
            for i in 0..n {
                let (port, _, buf, len) = batch.get_mut(i);
                let a = self.process(buf, len, port, plan, now);
                batch.set_action(i, a);
                batch.set_branch(i, self.last);
            }
            return;
        };
        let mut start = 0;
        while start < n {
            let end = (start + STAGE).min(n);
            let mut keys = [None::<FastKey>; STAGE];
            for (i, k) in (start..end).zip(keys.iter_mut()) {
                let (port, _, buf, len) = batch.get_mut(i);
                *k = fast_key(&buf[..len], port, plan);
            }
            let mut hashes = [0u64; STAGE];
            for (k, h) in keys.iter().zip(hashes.iter_mut()) {
                if let Some(k) = k {
                    *h = k.hash(key);
                }
            }
            for i in start..end {
                let (port, _, buf, len) = batch.get_mut(i);
                let b = bucket(hashes[i - start]);
                let fast = keys[i - start].filter(|_| moved.is_none_or(|m| !m.contains(b)));
                let a = match fast {
                    Some(k) => {
                        self.last = None;
                        if k.src_mac != plan.group_mac() {
                            self.bridge.learn(k.src_mac, port, now);
                        }
                        let tm = buckets.get(b);
                        self.send_to_tm(buf, len, tm, Branch::Endpoint, plan)
                    }
                    None => self.process(buf, len, port, plan, now),
                };
                batch.set_action(i, a);
                batch.set_branch(i, self.last);
            }
            start = end;
        }
    }

    /// Held fragments whose first fragment has now been steered: each is
    /// rewritten for its TM and handed to `emit` with its action.
    pub fn drain_released(&mut self, plan: &Plan, mut emit: impl FnMut(&mut [u8], Action)) {
        let counters = &mut self.counters;
        self.frag
            .drain_released(|frame, tm| match plan.tm_route(tm) {
                Some((port, mac)) => {
                    wire::set_dst_mac(frame, mac);
                    counters.branch(Branch::Fragment);
                    counters.to_tm(tm, frame.len());
                    emit(frame, Action::ToTm { tm, port });
                }
                None => {
                    counters.drop(Drop::NoTmPort);
                    emit(frame, Action::Drop(Drop::NoTmPort));
                }
            });
    }

    /// True if released fragments wait for [`Worker::drain_released`].
    pub fn has_released(&self) -> bool {
        self.frag.has_released()
    }

    /// Housekeeping (call every batch or so): held fragments past their time are dropped and counted.
    pub fn tick(&mut self, now: u64) {
        for _ in 0..self.frag.expire(now) {
            self.counters.drop(Drop::FragmentTimeout);
        }
    }

    /// Fragments held now (a metric).
    pub fn fragments_held(&self) -> usize {
        self.frag.held()
    }

    /// First fragments remembered (a metric).
    pub fn fragments_remembered(&self) -> usize {
        self.frag.remembered()
    }

    /// Flows remembered by the transition memory (a scan: metrics only).
    pub fn transit_remembered(&self, now: u64) -> usize {
        self.transit.live(now)
    }

    /// Flows the transition memory had no room for.
    pub fn transit_overflows(&self) -> u64 {
        self.transit.overflows()
    }

    /// Learned MAC addresses (a metric).
    pub fn bridge_size(&self) -> usize {
        self.bridge.len()
    }
}

/// Frames classified, hashed and steered together by [`Worker::process_batch`].
pub const STAGE: usize = 32;

/// The endpoint a fast-path frame hashes, and its source MAC (for learning).
#[derive(Debug, Clone, Copy)]
struct FastKey {
    v6: bool,
    addr: [u8; 16],
    port: u16,
    src_mac: MacAddr,
}

impl FastKey {
    #[inline(always)]
    fn hash(&self, key: &HashKey) -> u64 {
        if self.v6 {
            hash_v6_endpoint(key, self.addr, self.port)
        } else {
            hash_v4_endpoint(
                key,
                [self.addr[0], self.addr[1], self.addr[2], self.addr[3]],
                self.port,
            )
        }
    }
}

/// IPv4 read straight from the bytes, accepting exactly what `parse_ipv4`
/// and the port read of [`decide`] accept for an unfragmented TCP/UDP
/// datagram (the batch property test holds the two paths equal).
#[inline(always)]
fn fast_key_v4(b: &[u8], src_mac: MacAddr) -> Option<FastKey> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if ihl < 20 || total > b.len() || total < ihl + 4 {
        return None;
    }
    if u16::from_be_bytes([b[6], b[7]]) & 0x3fff != 0 {
        return None;
    }
    if b[9] != wire::proto::TCP && b[9] != wire::proto::UDP {
        return None;
    }
    let sp = u16::from_be_bytes([b[ihl], b[ihl + 1]]);
    let dp = u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]);
    let (at, port) = match sp.cmp(&dp) {
        std::cmp::Ordering::Greater => (12, sp),
        std::cmp::Ordering::Less => (16, dp),
        std::cmp::Ordering::Equal => return None,
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&b[at..at + 4]);
    Some(FastKey {
        v6: false,
        addr,
        port,
        src_mac,
    })
}

/// The greater-port endpoint of a frame the fast path may steer, with the
/// same parsers as [`decide`]; `None` sends the frame down the general path.
#[inline(always)]
fn fast_key(frame: &[u8], ingress: PortId, plan: &Plan) -> Option<FastKey> {
    if plan.ports().get(usize::from(ingress)) != Some(&PortKind::Outside) {
        return None;
    }
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.dst() != plan.group_mac() {
        return None;
    }
    let l3 = &frame[eth.payload_offset()..];
    if eth.ethertype() == wire::ethertype::IPV4 {
        return fast_key_v4(l3, eth.src());
    }
    let ip = match eth.ethertype() {
        wire::ethertype::IPV4 => wire::parse_ipv4(l3).ok()?,
        wire::ethertype::IPV6 => wire::parse_ipv6(l3).ok()?,
        _ => return None,
    };
    if ip.frag.is_some() || !(ip.proto == wire::proto::TCP || ip.proto == wire::proto::UDP) {
        return None;
    }
    let (sp, dp) = wire::ports(l3.get(ip.l4..ip.end)?)?;
    let (addr, port) = match sp.cmp(&dp) {
        std::cmp::Ordering::Greater => (ip.src, sp),
        std::cmp::Ordering::Less => (ip.dst, dp),
        std::cmp::Ordering::Equal => return None,
    };
    let mut bytes = [0u8; 16];
    let v6 = match addr {
        std::net::IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            false
        }
        std::net::IpAddr::V6(a) => {
            bytes = a.octets();
            true
        }
    };
    Some(FastKey {
        v6,
        addr: bytes,
        port,
        src_mac: eth.src(),
    })
}
