//! The transition memory (DESIGN §4, step 2): flows seen starting in a moved bucket while a new table is switched in, and where each started.
//!
//! A worker owns one. It is consulted only for frames in buckets whose owner
//! changed between the previous and the new table; everything else never
//! touches it. Memory is bounded and allocated once: when a flow cannot be
//! remembered (its probe window is full) it is counted as an overflow and
//! its SYN goes to the old owner instead, where — unremembered — all its
//! later packets go too, so the connection still works.

use std::net::IpAddr;

use allocation::HashKey;

use crate::steer::FlowKey;
use crate::table::{ExpiringMap, MapKey};

/// Limits of the transition memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitConfig {
    /// Remembered flows (slots) per worker.
    pub capacity: usize,
    /// A remembered flow is forgotten after this long without a packet, in nanoseconds.
    pub idle_ns: u64,
}

impl Default for TransitConfig {
    fn default() -> Self {
        TransitConfig {
            capacity: 65_536,
            idle_ns: 600_000_000_000,
        }
    }
}

impl MapKey for FlowKey {
    fn encode(&self, out: &mut [u8; 48]) -> usize {
        let mut n = 0;
        out[n] = self.proto;
        n += 1;
        for (a, p) in [self.a, self.b] {
            match a {
                IpAddr::V4(v) => {
                    out[n..n + 4].copy_from_slice(&v.octets());
                    n += 4;
                }
                IpAddr::V6(v) => {
                    out[n..n + 16].copy_from_slice(&v.octets());
                    n += 16;
                }
            }
            out[n..n + 2].copy_from_slice(&p.to_be_bytes());
            n += 2;
        }
        n
    }
}

/// Flows started during a transition: flow → (TM id, table version of the
/// transition). An entry of an older transition is ignored.
#[derive(Debug, Clone)]
pub struct Transit {
    map: ExpiringMap<FlowKey, (u32, u64)>,
    idle_ns: u64,
    overflows: u64,
}

impl Transit {
    /// Memory for `cfg.capacity` flows, allocated now.
    pub fn new(cfg: TransitConfig, key: HashKey) -> Self {
        Transit {
            map: ExpiringMap::new(cfg.capacity, key),
            idle_ns: cfg.idle_ns,
            overflows: 0,
        }
    }

    /// The TM id `key` started on in the transition to `version`; refreshes it.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, version: u64, now: u64) -> Option<u32> {
        match self
            .map
            .get_refresh(key, now, now.saturating_add(self.idle_ns))
        {
            Some((id, v)) if v == version => Some(id),
            _ => None,
        }
    }

    /// Remembers that `key` started on TM `id` in the transition to
    /// `version`. False (and counted) when there is no room.
    pub fn remember(&mut self, key: FlowKey, id: u32, version: u64, now: u64) -> bool {
        let ok = self
            .map
            .try_insert(key, (id, version), now.saturating_add(self.idle_ns), now);
        if !ok {
            self.overflows += 1;
        }
        ok
    }

    /// Flows that could not be remembered.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Remembered flows alive at `now` (a scan: metrics only).
    pub fn live(&self, now: u64) -> usize {
        self.map.live(now)
    }
}
