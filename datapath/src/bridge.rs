//! MAC learning for the frames the distributor bridges: a bounded table with ageing, as a switch keeps.

use allocation::{HashKey, MacAddr};

use crate::table::{ExpiringMap, MapKey};
use crate::verdict::PortId;

/// Limits of the learning table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Learned addresses (slots).
    pub capacity: usize,
    /// How long an address stays learned without being seen, in nanoseconds.
    pub ageing_ns: u64,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            capacity: 4096,
            ageing_ns: 300_000_000_000,
        }
    }
}

impl MapKey for MacAddr {
    fn encode(&self, out: &mut [u8; 48]) -> usize {
        out[..6].copy_from_slice(&self.0);
        6
    }
}

/// Where each source MAC was last seen.
#[derive(Debug, Clone)]
pub struct Bridge {
    cfg: BridgeConfig,
    map: ExpiringMap<MacAddr, PortId>,
    /// The last (MAC, port) learned and when: most frames come from the
    /// same neighbour (the router), and re-learning it on every frame would
    /// cost a hash and a probe per packet.
    last: Option<(MacAddr, PortId, u64)>,
}

impl Bridge {
    /// Allocates the table.
    pub fn new(cfg: BridgeConfig, key: HashKey) -> Self {
        Bridge {
            cfg,
            map: ExpiringMap::new(cfg.capacity, key),
            last: None,
        }
    }

    /// Learns that `mac` is behind `port` (unicast addresses only).
    #[inline]
    pub fn learn(&mut self, mac: MacAddr, port: PortId, now: u64) {
        if mac.is_multicast() {
            return;
        }
        // Same neighbour on the same port, refreshed within an eighth of the
        // ageing time: nothing to do.
        if let Some((m, p, at)) = self.last {
            if m == mac && p == port && now.saturating_sub(at) < self.cfg.ageing_ns / 8 {
                return;
            }
        }
        self.map
            .insert(mac, port, now.saturating_add(self.cfg.ageing_ns), now);
        self.last = Some((mac, port, now));
    }

    /// The port `mac` was learned on, if it has not aged out.
    #[inline]
    pub fn port_of(&self, mac: MacAddr, now: u64) -> Option<PortId> {
        if mac.is_multicast() {
            return None;
        }
        self.map.get(&mac, now)
    }

    /// Learned addresses (occupied slots).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if nothing was learned.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
