//! Persistence, cluster-wide: a client (its address masked to a prefix) is sent to the server a rendezvous hash keyed by the cluster's secret picks — the same on every TM — and keeps it while it has connections open and for a timeout after; buddy groups share one choice of host across virtual servers.
//!
//! Every TM computes the same winner for the same client from the same
//! usable servers (no coordination, no shared store): the score of a
//! server is `H(key, masked client ‖ server identity ‖ domain name)`, the
//! key derived from the table's hash key. A virtual server alone is a
//! domain whose servers are told apart by address and port; a buddy group
//! is one domain over several virtual servers whose servers are told apart
//! by host address alone, so a client's connections to any member reach
//! one host. The per-TM memory of bindings only matters when the winner
//! changes under a client (a server came back, weights changed): a client
//! bound within its timeout stays where it is.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use allocation::hash::{canonical, hash_bytes, mask_addr, write_addr, HashKey};
use serde::Deserialize;

/// Most bindings kept per domain; beyond it, expired ones are swept and,
/// if still full, new clients are sent to their rendezvous winner without
/// a binding (counted as misses).
pub const MAX_ENTRIES: usize = 1 << 20;

/// Most bindings `GET /persistence` lists per domain (the total is given).
pub const MAX_LISTED: usize = 10_000;

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
    /// How long a binding outlives the client's last connection, ms.
    pub timeout_ms: u64,
}

fn v4() -> u8 {
    32
}
fn v6() -> u8 {
    64
}

impl PersistConfig {
    /// The settings of a buddy group of members with these: the most
    /// granular netmask (longest prefixes) and the shortest timeout.
    pub fn merged(members: &[PersistConfig]) -> Option<PersistConfig> {
        Some(PersistConfig {
            v4_prefix: members.iter().map(|m| m.v4_prefix).max()?,
            v6_prefix: members.iter().map(|m| m.v6_prefix).max()?,
            timeout_ms: members.iter().map(|m| m.timeout_ms).min()?,
        })
    }
}

/// The persistence key of a cluster: derived from its table's hash key
/// (the cluster-wide secret), so every TM of the cluster scores alike and
/// outsiders cannot aim clients at a server.
pub fn cluster_key(table_key: &HashKey) -> HashKey {
    let k = table_key.to_bytes();
    let mut msg = [0u8; 32];
    msg[..16].copy_from_slice(&k);
    msg[16..].copy_from_slice(b"tmd-persistence\0");
    let a = hash_bytes(table_key, &msg);
    msg[31] = 1;
    let b = hash_bytes(table_key, &msg);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    HashKey::from_bytes(out)
}

/// The rendezvous score of server identity `server` for client key
/// `client` in domain `domain`: `H(key, client ‖ server address ‖ server
/// port ‖ domain)`, the port 0 for a buddy group (hosts by address).
pub fn score(key: &HashKey, domain: &[u8], client: IpAddr, server: SocketAddr) -> u64 {
    let mut msg = [0u8; 34 + 64];
    let mut n = write_addr(&mut msg, client);
    n += write_addr(&mut msg[n..], server.ip());
    msg[n..n + 2].copy_from_slice(&server.port().to_be_bytes());
    n += 2;
    let d = &domain[..domain.len().min(64)];
    msg[n..n + d.len()].copy_from_slice(d);
    hash_bytes(key, &msg[..n + d.len()])
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The server identity (address and port; port 0 in a buddy group).
    server: SocketAddr,
    open: u32,
    last_end: Instant,
}

/// Counters of a domain.
#[derive(Debug, Default)]
pub struct PersistStats {
    /// New connections that found their client's binding and kept it.
    pub hits: AtomicU64,
    /// New connections of a client without a live binding.
    pub misses: AtomicU64,
    /// New connections whose client's bound server was not usable: bound anew.
    pub rebinds: AtomicU64,
}

/// One binding, for the admin view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The client key (address masked to the domain's prefix).
    pub client: IpAddr,
    /// The server identity (port 0: a buddy group's host).
    pub server: SocketAddr,
    /// Connections open now.
    pub open: u32,
    /// Time since its last connection ended (0 while one is open).
    pub idle: Duration,
}

/// A persistence domain: one virtual server, or a buddy group of several.
#[derive(Debug)]
pub struct Domain {
    /// The virtual server's or the buddy group's name.
    pub name: String,
    /// Its virtual servers.
    pub members: Vec<String>,
    /// Settings (a buddy group's merged).
    pub cfg: PersistConfig,
    /// Servers told apart by host address alone (a buddy group).
    pub by_host: bool,
    key: HashKey,
    entries: Mutex<HashMap<IpAddr, Entry>>,
    /// Counters.
    pub stats: PersistStats,
}

impl Domain {
    /// A domain with no bindings; `key` from [`cluster_key`].
    pub fn new(
        name: &str,
        members: Vec<String>,
        cfg: PersistConfig,
        by_host: bool,
        key: HashKey,
    ) -> Self {
        Domain {
            name: name.to_string(),
            members,
            cfg,
            by_host,
            key,
            entries: Mutex::new(HashMap::new()),
            stats: PersistStats::default(),
        }
    }

    /// The client key of `client`: its address masked to the prefix.
    pub fn client_key(&self, client: IpAddr) -> IpAddr {
        mask_addr(canonical(client), self.cfg.v4_prefix, self.cfg.v6_prefix)
    }

    /// The identity of server `s` in this domain.
    pub fn identity(&self, s: SocketAddr) -> SocketAddr {
        if self.by_host {
            SocketAddr::new(s.ip(), 0)
        } else {
            s
        }
    }

    /// The rendezvous winner for `client` among `servers` whose `usable`
    /// flag is set (an index), with no binding consulted or made.
    pub fn winner(&self, client: IpAddr, servers: &[SocketAddr], usable: &[bool]) -> Option<usize> {
        let c = self.client_key(client);
        servers
            .iter()
            .enumerate()
            .filter(|(i, _)| usable.get(*i).copied().unwrap_or(false))
            .max_by_key(|(_, s)| score(&self.key, self.name.as_bytes(), c, self.identity(**s)))
            .map(|(i, _)| i)
    }

    /// True while a binding lives: a connection open, or its timeout not over.
    fn live(&self, e: &Entry, now: Instant) -> bool {
        e.open > 0 || now.duration_since(e.last_end) < Duration::from_millis(self.cfg.timeout_ms)
    }

    /// The index of the usable server of `servers` whose identity is `id`.
    fn usable_index(
        &self,
        id: SocketAddr,
        servers: &[SocketAddr],
        usable: &[bool],
    ) -> Option<usize> {
        servers
            .iter()
            .enumerate()
            .find(|(i, s)| usable.get(*i).copied().unwrap_or(false) && self.identity(**s) == id)
            .map(|(i, _)| i)
    }

    /// Where `client` would go now among `servers` (an index): its live
    /// binding's server if usable there, else the rendezvous winner — with
    /// nothing counted or bound (a buddy link asks its leader this).
    pub fn peek(
        &self,
        client: IpAddr,
        servers: &[SocketAddr],
        usable: &[bool],
        now: Instant,
    ) -> Option<usize> {
        let bound = {
            let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&self.client_key(client))
                .and_then(|e| self.live(e, now).then_some(e.server))
        };
        bound
            .and_then(|id| self.usable_index(id, servers, usable))
            .or_else(|| self.winner(client, servers, usable))
    }

    /// The server (an index into `servers`) for a new connection of
    /// `client`: its binding's if alive and that server usable here, else
    /// the rendezvous winner, which becomes the binding. Counts the
    /// connection open on the binding (end it with [`Domain::end`]).
    pub fn choose(
        &self,
        client: IpAddr,
        servers: &[SocketAddr],
        usable: &[bool],
        now: Instant,
    ) -> Option<usize> {
        let key = self.client_key(client);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let bound = map
            .get(&key)
            .and_then(|e| self.live(e, now).then_some(e.server));
        if let Some(i) = bound.and_then(|id| self.usable_index(id, servers, usable)) {
            if let Some(e) = map.get_mut(&key) {
                e.open += 1;
            }
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Some(i);
        }
        let i = self.winner(client, servers, usable)?;
        let id = self.identity(servers[i]);
        let counter = if bound.is_some() {
            &self.stats.rebinds
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !map.contains_key(&key) && map.len() >= MAX_ENTRIES {
            map.retain(|_, e| self.live(e, now));
            if map.len() >= MAX_ENTRIES {
                return Some(i);
            }
        }
        let e = map.entry(key).or_insert(Entry {
            server: id,
            open: 0,
            last_end: now,
        });
        // A stale or unusable binding moves; its open connections stay
        // where they are (they end on this entry's count).
        e.server = id;
        e.open += 1;
        Some(i)
    }

    /// A connection of `client` ended: the timeout starts when its last one does.
    pub fn end(&self, client: IpAddr, now: Instant) {
        let key = self.client_key(client);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&key) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 {
                e.last_end = now;
            }
        }
    }

    /// Live bindings (at most [`MAX_LISTED`]) and how many there are in all.
    pub fn bindings(&self, now: Instant) -> (Vec<Binding>, usize) {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let live = map.iter().filter(|(_, e)| self.live(e, now));
        let total = live.clone().count();
        let list = live
            .take(MAX_LISTED)
            .map(|(&client, e)| Binding {
                client,
                server: e.server,
                open: e.open,
                idle: if e.open > 0 {
                    Duration::ZERO
                } else {
                    now.duration_since(e.last_end)
                },
            })
            .collect();
        (list, total)
    }

    /// Bindings kept (live or not yet swept).
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

    fn domain(by_host: bool, timeout_ms: u64) -> Domain {
        Domain::new(
            "web",
            vec!["web".into()],
            PersistConfig {
                v4_prefix: 24,
                v6_prefix: 64,
                timeout_ms,
            },
            by_host,
            cluster_key(&HashKey::from_bytes([7; 16])),
        )
    }

    fn servers(port: u16) -> Vec<SocketAddr> {
        (1..=3)
            .map(|i| SocketAddr::new(IpAddr::from([10, 0, 0, i]), port))
            .collect()
    }

    #[test]
    fn a_binding_lives_while_open_and_for_the_timeout_after() {
        let d = domain(false, 1000);
        let s = servers(80);
        let up = [true; 3];
        let c1: IpAddr = "192.0.2.10".parse().expect("addr");
        let c2: IpAddr = "192.0.2.99".parse().expect("addr");
        let t0 = Instant::now();
        let first = d.choose(c1, &s, &up, t0).expect("server");
        assert_eq!(d.choose(c2, &s, &up, t0), Some(first), "same /24");
        assert_eq!(d.stats.misses.load(Ordering::Relaxed), 1);
        assert_eq!(d.stats.hits.load(Ordering::Relaxed), 1);
        // The winner changes (another server is the only usable one) while
        // the binding lives: the client stays on its server if usable.
        d.end(c1, t0 + Duration::from_secs(5));
        d.end(c2, t0 + Duration::from_secs(10));
        let other = (first + 1) % 3;
        let mut only = [false; 3];
        only[other] = true;
        only[first] = true;
        assert_eq!(
            d.choose(c1, &s, &only, t0 + Duration::from_millis(10_900)),
            Some(first),
            "within the timeout of the last end"
        );
        d.end(c1, t0 + Duration::from_millis(10_900));
        let (list, total) = d.bindings(t0 + Duration::from_millis(11_000));
        assert_eq!(total, 1);
        assert_eq!(list[0].client, "192.0.2.0".parse::<IpAddr>().expect("addr"));
        assert_eq!(list[0].server, s[first]);
        assert_eq!(list[0].idle, Duration::from_millis(100));
        // Its server down: bound anew, counted as a rebind.
        let mut down = [true; 3];
        down[first] = false;
        let moved = d
            .choose(c1, &s, &down, t0 + Duration::from_secs(11))
            .expect("server");
        assert_ne!(moved, first);
        assert_eq!(d.stats.rebinds.load(Ordering::Relaxed), 1);
        d.end(c1, t0 + Duration::from_secs(11));
        // Expired: the rendezvous winner again, a miss.
        let back = d
            .choose(c1, &s, &up, t0 + Duration::from_secs(20))
            .expect("server");
        assert_eq!(back, first, "the winner once the binding expired");
        assert_eq!(d.stats.misses.load(Ordering::Relaxed), 2);
        assert!(d.choose(c1, &s, &[false; 3], t0).is_none());
    }

    /// Two TMs' domains (no shared state) send every client to the same
    /// server; a server going down moves only its clients; a buddy group
    /// picks the same host in two pools of different ports.
    #[test]
    fn every_tm_picks_alike_and_a_lost_server_moves_only_its_clients() {
        let (a, b) = (domain(false, 0), domain(false, 0));
        let s = servers(80);
        let up = [true; 3];
        let clients: Vec<IpAddr> = (0..300u32)
            .map(|i| IpAddr::V4((0xc633_6400 + (i << 8)).into()))
            .collect();
        let t = Instant::now();
        let before: Vec<usize> = clients
            .iter()
            .map(|&c| a.winner(c, &s, &up).expect("server"))
            .collect();
        for (i, &c) in clients.iter().enumerate() {
            assert_eq!(b.choose(c, &s, &up, t), Some(before[i]), "TMs agree");
        }
        for k in 0..3 {
            let n = before.iter().filter(|&&p| p == k).count();
            assert!((70..=130).contains(&n), "server {k}: {n} of 300");
        }
        let down = [true, false, true];
        for (i, &c) in clients.iter().enumerate() {
            let now = a.winner(c, &s, &down).expect("server");
            if before[i] == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, before[i], "a client of a healthy server stays");
            }
        }
        let (web, shop) = (domain(true, 0), domain(true, 0));
        for &c in &clients {
            let w = web.winner(c, &servers(80), &up).expect("server");
            let h = shop.winner(c, &servers(443), &up).expect("server");
            assert_eq!(w, h, "one host for both ports");
        }
        // Another cluster key: other winners.
        let other = Domain::new(
            "web",
            vec![],
            a.cfg,
            false,
            cluster_key(&HashKey::from_bytes([8; 16])),
        );
        let differ = clients
            .iter()
            .filter(|&&c| other.winner(c, &s, &up) != a.winner(c, &s, &up))
            .count();
        assert!(differ > 100, "{differ}");
    }

    #[test]
    fn a_buddy_group_takes_the_most_granular_mask_and_the_shortest_timeout() {
        let m = PersistConfig::merged(&[
            PersistConfig {
                v4_prefix: 24,
                v6_prefix: 64,
                timeout_ms: 60_000,
            },
            PersistConfig {
                v4_prefix: 32,
                v6_prefix: 48,
                timeout_ms: 5_000,
            },
        ])
        .expect("merged");
        assert_eq!(
            m,
            PersistConfig {
                v4_prefix: 32,
                v6_prefix: 64,
                timeout_ms: 5_000
            }
        );
        assert!(PersistConfig::merged(&[]).is_none());
    }
}
