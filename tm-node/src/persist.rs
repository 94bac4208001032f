//! Persistence: source-address affinity — a client (its address masked to a prefix) keeps its server while it has connections open and for a timeout after the last one ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Most affinity entries kept; beyond it, expired entries are swept and,
/// if still full, new clients are balanced without an entry.
pub const MAX_ENTRIES: usize = 1 << 20;

/// A virtual server's persistence settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistConfig {
    /// IPv4 prefix length clients are grouped by.
    #[serde(default = "v4")]
    pub v4_prefix: u8,
    /// IPv6 prefix length clients are grouped by.
    #[serde(default = "v6")]
    pub v6_prefix: u8,
    /// How long the affinity outlives the client's last connection, ms.
    pub timeout_ms: u64,
}

fn v4() -> u8 {
    32
}
fn v6() -> u8 {
    64
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    server: usize,
    open: u32,
    last_end: Instant,
}

/// The affinity table of one virtual server.
#[derive(Debug)]
pub struct Affinity {
    cfg: PersistConfig,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

impl Affinity {
    /// An empty table.
    pub fn new(cfg: PersistConfig) -> Self {
        Affinity {
            cfg,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, client: IpAddr) -> IpAddr {
        allocation::hash::mask_addr(client, self.cfg.v4_prefix, self.cfg.v6_prefix)
    }

    /// The server `client` is bound to, if the binding is alive and
    /// `usable(server)` agrees; counts the new connection on it.
    pub fn lookup(
        &self,
        client: IpAddr,
        now: Instant,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = self.key(client);
        let e = map.get_mut(&key)?;
        let alive = e.open > 0 || now.duration_since(e.last_end) < timeout;
        if alive && usable(e.server) {
            e.open += 1;
            Some(e.server)
        } else {
            if e.open == 0 {
                map.remove(&key);
            }
            None
        }
    }

    /// Binds `client` to `server` for a connection that starts now.
    pub fn bind(&self, client: IpAddr, server: usize, now: Instant) {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| e.open > 0 || now.duration_since(e.last_end) < timeout);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        let e = map.entry(self.key(client)).or_insert(Entry {
            server,
            open: 0,
            last_end: now,
        });
        if e.server != server {
            // The old server is gone (down): the client moves, its open connections stay where they are.
            e.server = server;
        }
        e.open += 1;
    }

    /// A connection of `client` ended: the timeout starts when its last one does.
    pub fn end(&self, client: IpAddr, now: Instant) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&self.key(client)) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 {
                e.last_end = now;
            }
        }
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True if no client is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn affinity_lives_while_open_and_for_the_timeout_after() {
        let a = Affinity::new(PersistConfig {
            v4_prefix: 24,
            v6_prefix: 64,
            timeout_ms: 1000,
        });
        let c1: IpAddr = "192.0.2.10".parse().expect("addr");
        let c2: IpAddr = "192.0.2.99".parse().expect("addr");
        let t0 = Instant::now();
        assert_eq!(a.lookup(c1, t0, |_| true), None);
        a.bind(c1, 3, t0);
        assert_eq!(a.lookup(c2, t0, |_| true), Some(3), "same /24");
        a.end(c1, t0 + Duration::from_secs(5));
        assert_eq!(
            a.lookup(c1, t0 + Duration::from_secs(10), |_| true),
            Some(3),
            "one connection still open"
        );
        a.end(c1, t0 + Duration::from_secs(10));
        a.end(c2, t0 + Duration::from_secs(10));
        assert_eq!(
            a.lookup(c1, t0 + Duration::from_millis(10_900), |_| true),
            Some(3),
            "within the timeout of the last end"
        );
        a.end(c1, t0 + Duration::from_millis(10_900));
        assert_eq!(
            a.lookup(c1, t0 + Duration::from_millis(12_000), |_| true),
            None,
            "expired"
        );
        assert!(a.is_empty());
        a.bind(c1, 1, t0);
        assert_eq!(
            a.lookup(c1, t0, |s| s != 1),
            None,
            "a down server breaks the affinity"
        );
    }
}
