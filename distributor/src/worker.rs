//! A worker's per-frame processing: the steering verdict applied to the worker's own state (fragments, MAC learning) and counters.
//!
//! One `Worker` per core, owned by its thread: no locks, no atomics, no
//! allocation per frame. Time comes in as an argument (nanoseconds on any
//! monotonic clock) so tests and simulations drive it.

use allocation::{HashKey, TmIndex};

use crate::bridge::{Bridge, BridgeConfig};
use crate::frag::{FragConfig, FragTable};
use crate::steer::{decide, Plan, Verdict};
use crate::verdict::{Action, Branch, Counters, Drop, PortId};
use crate::wire::{self, EthernetFrame};

/// A worker's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Fragment handler limits.
    pub frag: FragConfig,
    /// MAC learning limits.
    pub bridge: BridgeConfig,
}

/// Per-core steering state.
#[derive(Debug, Clone)]
pub struct Worker {
    frag: FragTable,
    bridge: Bridge,
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
            } => {
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
            Verdict::Bridge(branch) => {
                self.count(branch);
                let dst = src.map(|(_, d)| d).unwrap_or_default();
                match self.bridge.port_of(dst, now) {
                    Some(p) if p == ingress => self.dropped(Drop::Hairpin),
                    Some(p) => Action::Forward(p),
                    None => Action::Flood,
                }
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

    /// Learned MAC addresses (a metric).
    pub fn bridge_size(&self) -> usize {
        self.bridge.len()
    }
}
