//! Pinned flows (DESIGN §4): flows an old owner still serves in buckets a table change gave to another TM — UDP sessions and long TCP connections — steered to that owner past the commit, until they idle out or a new connection takes their place.
//!
//! A pin set is built off the data path (by the admin thread, from what
//! the TMs report) and travels in the [`crate::Plan`] snapshot. The
//! steering consults it only for flows whose bucket holds a pin (one bit
//! per bucket and group), so a packet elsewhere pays one bit test; a packet
//! in such a bucket one hash lookup. Each pin has one atomic cell, its last
//! packet's time, written at most once a millisecond: a pin idle for its
//! TM's idle timeout is over (the TM ended the session, or is about to),
//! and a TCP SYN on a pinned flow ends the pin (the connection it named is
//! gone: this is a new one, steered by the table). Memory is bounded and
//! allocated once per set: pins beyond the capacity are refused and
//! counted, never evicting another.

use std::sync::atomic::{AtomicU64, Ordering};

use allocation::{AllocationTable, Flow, HashKey, TmIndex, TABLE_SIZE};

use crate::steer::{FlowKey, MovedSet};
use crate::table::ExpiringMap;

/// A flow and the TM (by id) that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin {
    /// The flow, both directions alike.
    pub key: FlowKey,
    /// The TM that owns it.
    pub tm: u32,
    /// Its last known activity, on the workers' clock (ns): the pin lives
    /// until `idle_ns` after its last packet, or after this.
    pub since: u64,
    /// How long the pin outlives its flow's last packet; 0: no limit (only
    /// a SYN or a new set ends it).
    pub idle_ns: u64,
}

impl Pin {
    /// The flow as steered from its lesser endpoint to its greater one.
    pub fn flow(&self) -> Flow {
        Flow::with_ports(
            self.key.proto,
            self.key.a.0,
            self.key.a.1,
            self.key.b.0,
            self.key.b.1,
        )
    }
}

/// The pins of `flows` — each (TM id, flow, idle timeout in ns), as a
/// TM reports them — installed at `now` on the workers' clock: each lives
/// its idle timeout from then, longer as its packets come.
pub fn installed_at(flows: &[(u32, Flow, u64)], now: u64) -> Vec<Pin> {
    flows
        .iter()
        .map(|&(tm, f, idle_ns)| Pin {
            key: FlowKey::of(&f),
            tm,
            since: now,
            idle_ns,
        })
        .collect()
}

/// Pins beyond [`PinSet::build`]'s capacity, or toward a TM the plan cannot reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinRefusals {
    /// No room left in the set.
    pub full: u64,
    /// The TM has no route (not in the table, nor in the previous one).
    pub unroutable: u64,
}

/// A pinned flow found by the steering: where it goes if the pin still
/// lives ([`PinSet::alive`] decides, with the worker's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinHit {
    /// The pin's route index.
    pub tm: TmIndex,
    /// Its cell in the set.
    pub slot: u32,
    /// The packet is a TCP SYN (without ACK): a new connection.
    pub syn: bool,
}

/// A pin's cell value once a SYN ended it.
const ENDED: u64 = u64::MAX;
/// A cell is written at most this often (ns): one store a millisecond per
/// pinned flow, not one a packet.
const TOUCH_NS: u64 = 1_000_000;

/// The pins of one plan: flow → (route index, cell), and the buckets holding them.
#[derive(Debug)]
pub struct PinSet {
    map: ExpiringMap<FlowKey, (TmIndex, u32)>,
    /// The pins kept, in cell order.
    pins: Vec<Pin>,
    /// Per pin: its last packet's time, or [`ENDED`].
    last: Box<[AtomicU64]>,
    /// One set per group of the plan's table.
    buckets: Vec<MovedSet>,
    refused: PinRefusals,
}

/// A pin never expires in the map: its cell says when it is over.
const FOREVER: u64 = u64::MAX;

impl PinSet {
    /// The set for `pins` under `table`, each pin's TM resolved to a route
    /// index by `route` (`None`: unroutable, refused). At most `capacity`
    /// pins are kept; a pin the table already steers to its TM is left out
    /// when `redundant_dropped` (no transition runs: the table alone is
    /// right for it).
    pub fn build(
        pins: &[Pin],
        table: &AllocationTable,
        capacity: usize,
        key: HashKey,
        route: impl Fn(u32) -> Option<TmIndex>,
        redundant_dropped: bool,
    ) -> PinSet {
        let mut set = PinSet {
            map: ExpiringMap::new(capacity.max(1) * 2, key),
            pins: Vec::with_capacity(pins.len().min(capacity)),
            last: Box::new([]),
            buckets: vec![MovedSet::empty(); table.groups().len()],
            refused: PinRefusals::default(),
        };
        for p in pins {
            let Some(r) = route(p.tm) else {
                set.refused.unroutable += 1;
                continue;
            };
            let flow = p.flow();
            let s = table.steer(&flow);
            if redundant_dropped && table.tms().get(usize::from(s.tm)).map(|t| t.id) == Some(p.tm) {
                continue;
            }
            let Some(b) = s.by.bucket() else {
                // Equal ports: one TM per group whatever the bucket; a
                // flow without a bucket cannot be told from its group's.
                set.refused.unroutable += 1;
                continue;
            };
            let slot = set.pins.len() as u32;
            if set.pins.len() >= capacity || !set.map.try_insert(p.key, (r, slot), FOREVER, 0) {
                set.refused.full += 1;
                continue;
            }
            set.pins.push(*p);
            if let Some(m) = set.buckets.get_mut(s.group) {
                m.insert(usize::from(b));
            }
        }
        set.last = set.pins.iter().map(|p| AtomicU64::new(p.since)).collect();
        set
    }

    /// The pin of `flow`, if `bucket` of `group` holds pins and the flow is
    /// pinned; `syn`: the packet is a TCP SYN without ACK.
    #[inline]
    pub fn lookup(&self, group: usize, bucket: u16, flow: &Flow, syn: bool) -> Option<PinHit> {
        if !self.buckets.get(group)?.contains(usize::from(bucket)) {
            return None;
        }
        let (tm, slot) = self.map.get(&FlowKey::of(flow), 0)?;
        Some(PinHit { tm, slot, syn })
    }

    /// True if the pin `hit` found still lives at `now` (and it is
    /// refreshed); a SYN ends it. Relaxed atomics: a race between two
    /// workers moves a time by a millisecond at most.
    #[inline]
    pub fn alive(&self, hit: PinHit, now: u64) -> bool {
        let (Some(cell), Some(pin)) = (
            self.last.get(hit.slot as usize),
            self.pins.get(hit.slot as usize),
        ) else {
            return false;
        };
        let last = cell.load(Ordering::Relaxed);
        if last == ENDED {
            return false;
        }
        if pin.idle_ns != 0 && now.saturating_sub(last) > pin.idle_ns {
            return false;
        }
        if hit.syn {
            cell.store(ENDED, Ordering::Relaxed);
            return false;
        }
        if now > last.saturating_add(TOUCH_NS) {
            cell.store(now, Ordering::Relaxed);
        }
        true
    }

    /// The pins a SYN has not ended, their `since` moved to their last
    /// packet: what a new set for another plan carries on (a pin idle too
    /// long stays over there too).
    pub fn live(&self) -> Vec<Pin> {
        self.pins
            .iter()
            .zip(self.last.iter())
            .filter_map(|(p, c)| {
                let last = c.load(Ordering::Relaxed);
                (last != ENDED).then_some(Pin { since: last, ..*p })
            })
            .collect()
    }

    /// Buckets of `group` holding pins.
    pub fn buckets(&self, group: usize) -> Option<&MovedSet> {
        self.buckets.get(group)
    }

    /// Pins kept.
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    /// True if no pin was kept.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// Pins refused, by reason.
    pub fn refused(&self) -> PinRefusals {
        self.refused
    }
}

impl MovedSet {
    /// No bucket.
    pub fn empty() -> Self {
        MovedSet::from_words([0; TABLE_SIZE / 64])
    }
}
