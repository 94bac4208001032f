//! Pinned flows (DESIGN §4): flows an old owner still serves in buckets a table change gave to another TM — UDP sessions and long TCP connections — steered to that owner past the commit, until it reports them ended.
//!
//! A pin set is built off the data path (by the admin thread, from what
//! the TMs report) and is immutable: it travels in the [`crate::Plan`]
//! snapshot. The steering consults it only for flows whose bucket holds a
//! pin (one bit per bucket and group), so a packet elsewhere pays one bit
//! test; a packet in such a bucket one hash lookup. Memory is bounded and
//! allocated once per set: pins beyond the capacity are refused and
//! counted, never evicting another.

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

/// Pins beyond [`PinSet::build`]'s capacity, or toward a TM the plan cannot reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinRefusals {
    /// No room left in the set.
    pub full: u64,
    /// The TM has no route (not in the table, nor in the previous one).
    pub unroutable: u64,
}

/// The pins of one plan: flow → route index, and the buckets holding them.
#[derive(Debug, Clone)]
pub struct PinSet {
    map: ExpiringMap<FlowKey, TmIndex>,
    /// One set per group of the plan's table.
    buckets: Vec<MovedSet>,
    len: usize,
    refused: PinRefusals,
}

/// A pin never expires by time: only a new set replaces it.
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
            buckets: vec![MovedSet::empty(); table.groups().len()],
            len: 0,
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
            if set.len >= capacity || !set.map.try_insert(p.key, r, FOREVER, 0) {
                set.refused.full += 1;
                continue;
            }
            set.len += 1;
            if let Some(m) = set.buckets.get_mut(s.group) {
                m.insert(usize::from(b));
            }
        }
        set
    }

    /// The route of `flow`'s pin, if `bucket` of `group` holds pins and the flow is pinned.
    #[inline]
    pub fn lookup(&self, group: usize, bucket: u16, flow: &Flow) -> Option<TmIndex> {
        if !self.buckets.get(group)?.contains(usize::from(bucket)) {
            return None;
        }
        self.map.get(&FlowKey::of(flow), 0)
    }

    /// Buckets of `group` holding pins.
    pub fn buckets(&self, group: usize) -> Option<&MovedSet> {
        self.buckets.get(group)
    }

    /// Pins kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no pin was kept.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
