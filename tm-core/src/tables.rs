//! The running table and, during a transition, the next one: shared by the admin endpoint (which changes them) and the proxy (DNAT-only checks); and the open TCP connections, to tell which live in buckets a transition moves.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use allocation::rules::proto;
use allocation::{AllocationTable, Flow};

/// An open TCP connection: the client's side, and the server side once connected.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Client → virtual server.
    client: Flow,
    /// Server → (SNAT address, port) or the client's own endpoint (DNAT-only): the reply direction.
    server: Option<Flow>,
    /// Its idle timeout, ms (0: none): how long a distributor's pin of it
    /// outlives its last packet.
    idle_ms: u64,
    /// When it was last reported as pinned ([`Tables::pinned_at`]), ms.
    reported_ms: Option<u64>,
}

/// How long after a report a distributor may still install its pins, ms:
/// a session reported is kept at least its idle timeout plus this after
/// the report, so no pin outlives it (see [`Tables::kept_until_ms`]).
pub const PIN_GRACE_MS: u64 = 30_000;

/// What [`Tables::pinned`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    /// Flows some table in force steers elsewhere, each with its idle
    /// timeout in ms (0: none).
    pub flows: Vec<(Flow, u64)>,
    /// Their local endpoints toward the servers.
    pub ports: Vec<(IpAddr, u16)>,
}

/// This node's tables.
#[derive(Debug)]
pub struct Tables {
    /// This node's TM id (stable across tables).
    pub tm_id: u32,
    /// The running table.
    pub current: Mutex<Arc<AllocationTable>>,
    /// The next table while a transition is prepared.
    pub next: Mutex<Option<Arc<AllocationTable>>>,
    open: Mutex<HashMap<u64, Open>>,
    ids: AtomicU64,
    epoch: std::time::Instant,
}

/// Keeps a connection registered while it lives (see [`Tables::open`]).
#[derive(Debug)]
pub struct OpenGuard<'a> {
    tables: &'a Tables,
    id: u64,
}

impl OpenGuard<'_> {
    /// Sets the connection's idle timeout (see [`Tables::set_idle`]).
    pub fn idle(&self, timeout: std::time::Duration) {
        self.tables.set_idle(
            self.id,
            timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        );
    }

    /// Records the server side: `server` is the server, `from` the local
    /// endpoint the connection to it uses.
    pub fn connected(&self, server: SocketAddr, from: SocketAddr) {
        let protocol = self.tables.protocol(self.id).unwrap_or(proto::TCP);
        let reply = Flow::with_ports(protocol, server.ip(), server.port(), from.ip(), from.port());
        self.tables.register_server(self.id, reply);
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.tables.unregister(self.id);
    }
}

impl Tables {
    /// Tables with `table` running and no transition.
    pub fn new(tm_id: u32, table: AllocationTable) -> Self {
        Tables {
            tm_id,
            current: Mutex::new(Arc::new(table)),
            next: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    fn open_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an accepted TCP connection from `peer` to `local` (a
    /// virtual server) until the guard drops. One lock per connection, not
    /// per packet.
    pub fn open(&self, peer: SocketAddr, local: SocketAddr) -> OpenGuard<'_> {
        self.open_proto(proto::TCP, peer, local)
    }

    /// [`Tables::open`] for `protocol` (a UDP session: one lock per session).
    pub fn open_proto(&self, protocol: u8, peer: SocketAddr, local: SocketAddr) -> OpenGuard<'_> {
        let client = Flow::with_ports(protocol, peer.ip(), peer.port(), local.ip(), local.port());
        OpenGuard {
            tables: self,
            id: self.register(client),
        }
    }

    /// Registers an open connection by its client flow (client → virtual
    /// server) and returns its id — for callers that cannot hold an
    /// [`OpenGuard`] (the simulator); [`Tables::unregister`] ends it.
    pub fn register(&self, client: Flow) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.open_map().insert(
            id,
            Open {
                client,
                server: None,
                idle_ms: 0,
                reported_ms: None,
            },
        );
        id
    }

    /// Records connection `id`'s server side: `reply` is the server's
    /// direction (server → SNAT endpoint, or the client's own in DNAT-only mode).
    pub fn register_server(&self, id: u64, reply: Flow) {
        if let Some(o) = self.open_map().get_mut(&id) {
            o.server = Some(reply);
        }
    }

    /// Sets connection `id`'s idle timeout (ms; 0: none), which its pins
    /// carry.
    pub fn set_idle(&self, id: u64, idle_ms: u64) {
        if let Some(o) = self.open_map().get_mut(&id) {
            o.idle_ms = idle_ms;
        }
    }

    /// This node's clock for [`Tables::pinned_at`] and
    /// [`Tables::kept_until_ms`], ms.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Until when (ms, [`Tables::now_ms`]'s clock) connection `id` must
    /// stay open whatever its idle time: a distributor may hold a pin of
    /// it until then. `None` if it was never reported.
    pub fn kept_until_ms(&self, id: u64) -> Option<u64> {
        let map = self.open_map();
        let o = map.get(&id)?;
        o.reported_ms
            .map(|r| r.saturating_add(o.idle_ms).saturating_add(PIN_GRACE_MS))
    }

    fn protocol(&self, id: u64) -> Option<u8> {
        self.open_map().get(&id).map(|o| o.client.protocol)
    }

    /// Forgets connection `id` (it ended).
    pub fn unregister(&self, id: u64) {
        self.open_map().remove(&id);
    }

    /// Open TCP connections.
    pub fn open_connections(&self) -> usize {
        self.open_map().len()
    }

    /// Open TCP connections that live, on either side, in a bucket `next`
    /// does not steer to this node: the ones a transition's drain waits
    /// for (DESIGN §4) — those still open at the commit are pinned. UDP
    /// sessions are not waited for: they are pinned (see [`Tables::pinned`]).
    pub fn moving(&self, next: &AllocationTable) -> usize {
        let me = next.tm_index_by_id(self.tm_id);
        let away = |f: &Flow| me.is_none_or(|me| next.steer(f).tm != me);
        self.open_map()
            .values()
            .filter(|o| o.client.protocol == proto::TCP)
            .filter(|o| away(&o.client) || o.server.as_ref().is_some_and(away))
            .count()
    }

    /// How many of `ports` (self-source ports in moved buckets, from
    /// `Snat::moving_ports`) are not held by a registered UDP session: what
    /// a drain waits for — TCP connections, registered or still
    /// connecting. UDP sessions are pinned at the commit instead.
    pub fn moving_ports_to_drain(&self, ports: &[(IpAddr, u16)]) -> usize {
        let udp: std::collections::HashSet<(IpAddr, u16)> = self
            .open_map()
            .values()
            .filter(|o| o.client.protocol == proto::UDP)
            .filter_map(|o| o.server.and_then(|s| s.ports.map(|(_, p)| (s.dst, p))))
            .collect();
        ports.iter().filter(|p| !udp.contains(p)).count()
    }

    /// The flows of this node's open connections and sessions (TCP and
    /// UDP, each by its client side and its server side) that some table
    /// in force — the running one, and the next during a transition —
    /// does not steer to this node, and the local endpoints of those
    /// server sides (its self-source ports there). The distributors pin
    /// these flows to this node past a commit (DESIGN §4); the other nodes
    /// keep those ports free while they live.
    pub fn pinned(&self) -> Pinned {
        self.pinned_at(self.now_ms())
    }

    /// [`Tables::pinned`] at `now_ms`: each flow reported is kept open at
    /// least until [`Tables::kept_until_ms`].
    pub fn pinned_at(&self, now_ms: u64) -> Pinned {
        let (current, next) = (self.current(), self.next());
        let tables: Vec<(&AllocationTable, Option<allocation::TmIndex>)> =
            std::iter::once(&*current)
                .chain(next.as_deref())
                .map(|t| (t, t.tm_index_by_id(self.tm_id)))
                .collect();
        let away = |f: &Flow| {
            tables
                .iter()
                .any(|(t, me)| me.is_none_or(|me| t.steer(f).tm != me))
        };
        let mut out = Pinned::default();
        for o in self.open_map().values_mut() {
            let mut reported = false;
            if away(&o.client) {
                out.flows.push((o.client, o.idle_ms));
                reported = true;
            }
            if let Some(s) = o.server.filter(|s| away(s)) {
                out.flows.push((s, o.idle_ms));
                reported = true;
                if let Some((_, port)) = s.ports {
                    out.ports.push((s.dst, port));
                }
            }
            if reported {
                o.reported_ms = Some(now_ms);
            }
        }
        out
    }

    /// The SNAT endpoints of open connections (for a joining node's prepare: see `Snat::prepare_joining`).
    pub fn server_endpoints(&self) -> Vec<(IpAddr, u16)> {
        self.open_map()
            .values()
            .filter_map(|o| o.server.map(|f| (f.dst, f.ports.map_or(0, |p| p.1))))
            .collect()
    }

    /// The running table.
    pub fn current(&self) -> Arc<AllocationTable> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The next table, during a transition.
    pub fn next(&self) -> Option<Arc<AllocationTable>> {
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True if `reply` (a server's packet toward a client or SNAT endpoint)
    /// steers to this node under the running table — and, during a
    /// transition, under the next table too.
    pub fn steers_home(&self, reply: &Flow) -> bool {
        let home = |t: &AllocationTable| {
            t.tm_index_by_id(self.tm_id)
                .is_some_and(|me| t.steer(reply).tm == me)
        };
        home(&self.current()) && self.next().is_none_or(|n| home(&n))
    }

    /// True if a DNAT-only connection's server side comes home: its
    /// `reply` (server → the client's own endpoint) steers to this node
    /// under every table in force ([`Tables::steers_home`]), or it takes
    /// the very steering decision of the client's `request` (same group,
    /// same bucket) under each of them while the request steers here under
    /// one. Then the distributors send the reply wherever they send the
    /// client's packets — here — also during a transition, when a moved
    /// bucket's flows follow where they started (the back distributor
    /// remembers the SYN a TM sends) and the commit waits for them to end.
    /// That is what lets a source-affinity group (`hash = "address"`)
    /// accept new connections in moved buckets.
    pub fn dnat_reply_home(&self, request: &Flow, reply: &Flow) -> bool {
        let (current, next) = (self.current(), self.next());
        let tables = || std::iter::once(&*current).chain(next.as_deref());
        let me = |t: &AllocationTable| t.tm_index_by_id(self.tm_id);
        if tables().all(|t| me(t).is_some_and(|m| t.steer(reply).tm == m)) {
            return true; // steers_home
        }
        let mut here = false;
        for t in tables() {
            let (a, b) = (t.steer(request), t.steer(reply));
            if a.group != b.group || a.by != b.by {
                return false;
            }
            here |= me(t).is_some_and(|m| a.tm == m);
        }
        here
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use allocation::{HashKey, Profile};

    fn table() -> AllocationTable {
        testkit::table(1, HashKey::from_bytes([4; 16]), 4, Profile::Uniform)
    }

    #[test]
    fn open_connections_count_as_moving_by_either_side() {
        let t = table();
        let next = t
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: None,
                    sigma: None,
                },
            )
            .expect("rebalance")
            .table;
        // TM 0 gives buckets away in a Gaussian rebalance of four TMs.
        let tables = Tables::new(0, t.clone());
        let vip: SocketAddr = "198.51.100.10:80".parse().expect("vip");
        let server: SocketAddr = "10.2.0.5:80".parse().expect("server");
        let me_now = t.tm_index_by_id(0).expect("tm");
        let me_next = next.tm_index_by_id(0).expect("tm");
        let mine = |tab: &AllocationTable, me, f: &Flow| tab.steer(f).tm == me;
        // Client endpoints this TM owns now; SNAT ports it owns under both tables.
        let clients: Vec<SocketAddr> = (20_000u16..)
            .map(|p| SocketAddr::new("203.0.113.9".parse().expect("addr"), p))
            .filter(|c| {
                mine(
                    &t,
                    me_now,
                    &Flow::with_ports(proto::TCP, c.ip(), c.port(), vip.ip(), vip.port()),
                )
            })
            .take(200)
            .collect();
        let snat: IpAddr = "10.20.0.100".parse().expect("addr");
        let ports: Vec<u16> = (1024u16..)
            .filter(|&p| {
                let f = Flow::with_ports(proto::TCP, server.ip(), server.port(), snat, p);
                mine(&t, me_now, &f) && mine(&next, me_next, &f)
            })
            .take(200)
            .collect();
        let guards: Vec<OpenGuard<'_>> = clients
            .iter()
            .zip(&ports)
            .map(|(&c, &p)| {
                let g = tables.open(c, vip);
                g.connected(server, SocketAddr::new(snat, p));
                g
            })
            .collect();
        // Server sides never move here: every moving connection moves by its client side.
        let want = clients
            .iter()
            .filter(|c| {
                !mine(
                    &next,
                    me_next,
                    &Flow::with_ports(proto::TCP, c.ip(), c.port(), vip.ip(), vip.port()),
                )
            })
            .count();
        assert!(want > 0 && want < 200, "{want}");
        assert_eq!(tables.moving(&next), want);
        assert_eq!(tables.open_connections(), 200);
        assert_eq!(tables.server_endpoints().len(), 200);
        drop(guards);
        assert_eq!(
            tables.open_connections(),
            0,
            "closed connections are forgotten"
        );
        assert_eq!(tables.moving(&next), 0);
    }

    #[test]
    fn sessions_a_table_steers_elsewhere_are_pinned_and_kept_past_the_report() {
        let t = table();
        let next = t
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: None,
                    sigma: None,
                },
            )
            .expect("rebalance")
            .table;
        let tables = Tables::new(0, t.clone());
        *tables.next.lock().expect("lock") = Some(Arc::new(next.clone()));
        let vip: SocketAddr = "198.51.100.10:53".parse().expect("vip");
        let server: SocketAddr = "10.2.0.5:53".parse().expect("server");
        let snat: IpAddr = "10.20.0.100".parse().expect("addr");
        let me_now = t.tm_index_by_id(0).expect("tm");
        let me_next = next.tm_index_by_id(0).expect("tm");
        let udp =
            |c: SocketAddr| Flow::with_ports(proto::UDP, c.ip(), c.port(), vip.ip(), vip.port());
        // Clients this TM owns now: some stay, some move under `next`.
        let clients: Vec<SocketAddr> = (20_000u16..)
            .map(|p| SocketAddr::new("203.0.113.9".parse().expect("addr"), p))
            .filter(|&c| t.steer(&udp(c)).tm == me_now)
            .take(100)
            .collect();
        // Server-side ports it owns under both tables: they never pin.
        let ports: Vec<u16> = (1024u16..)
            .filter(|&p| {
                let f = Flow::with_ports(proto::UDP, server.ip(), server.port(), snat, p);
                t.steer(&f).tm == me_now && next.steer(&f).tm == me_next
            })
            .take(100)
            .collect();
        let ids: Vec<u64> = clients
            .iter()
            .zip(&ports)
            .map(|(&c, &p)| {
                let id = tables.register(udp(c));
                tables.register_server(
                    id,
                    Flow::with_ports(proto::UDP, server.ip(), server.port(), snat, p),
                );
                tables.set_idle(id, 60_000);
                id
            })
            .collect();
        let moving: Vec<(SocketAddr, u64)> = clients
            .iter()
            .zip(&ids)
            .filter(|(&c, _)| next.steer(&udp(c)).tm != me_next)
            .map(|(&c, &id)| (c, id))
            .collect();
        assert!(!moving.is_empty() && moving.len() < 100);
        let p = tables.pinned_at(1_000);
        let mut want: Vec<(Flow, u64)> = moving.iter().map(|&(c, _)| (udp(c), 60_000)).collect();
        let mut got = p.flows.clone();
        want.sort_by_key(|(f, _)| f.ports);
        got.sort_by_key(|(f, _)| f.ports);
        assert_eq!(
            got, want,
            "exactly the client sides that move, with their idle"
        );
        assert!(p.ports.is_empty(), "no server side moves");
        // What was reported stays open its idle timeout plus the grace
        // after the report; what was not has no such floor.
        for &(_, id) in &moving {
            assert_eq!(
                tables.kept_until_ms(id),
                Some(1_000 + 60_000 + PIN_GRACE_MS)
            );
        }
        let still = ids.iter().find(|id| !moving.iter().any(|m| m.1 == **id));
        assert_eq!(still.and_then(|&id| tables.kept_until_ms(id)), None);
        // UDP sessions' ports are not what a drain waits for; others are.
        let held: Vec<(IpAddr, u16)> = ports.iter().map(|&p| (snat, p)).collect();
        assert_eq!(tables.moving_ports_to_drain(&held), 0);
        assert_eq!(tables.moving_ports_to_drain(&[(snat, 1)]), 1);
        // Nor does a drain count them as connections.
        assert_eq!(tables.moving(&next), 0);
    }

    /// DNAT-only in a source-affinity group during a rebalance: a client
    /// whose bucket moves keeps its address (its reply takes the request's
    /// steering decision under both tables, and the request is this
    /// node's); a reply in another bucket than its request (the port
    /// relation flipped) must steer here under both tables.
    #[test]
    fn a_dnat_reply_in_the_requests_bucket_comes_home_during_a_transition() {
        let t = testkit::partitioned_hash(
            &table(),
            &[2, 3],
            vec![testkit::tcp_rule("9000")],
            allocation::HashMode::Address {
                v4_prefix: 32,
                v6_prefix: 128,
            },
        );
        let next = t
            .rebalance(
                1,
                &Profile::Custom {
                    weights: vec![3.0, 1.0],
                },
            )
            .expect("rebalance")
            .table;
        let vip: SocketAddr = "198.51.100.10:9000".parse().expect("vip");
        let server: SocketAddr = "10.2.0.5:9000".parse().expect("server");
        let req =
            |c: SocketAddr| Flow::with_ports(proto::TCP, c.ip(), c.port(), vip.ip(), vip.port());
        let rep = |c: SocketAddr| {
            Flow::with_ports(proto::TCP, server.ip(), server.port(), c.ip(), c.port())
        };
        let owner = |tab: &AllocationTable, f: &Flow| tab.tms()[usize::from(tab.steer(f).tm)].id;
        // A client TM 3 owns now whose bucket goes to TM 2 next.
        let moving = (1..=250u8)
            .map(|i| SocketAddr::new(IpAddr::from([203, 0, 113, i]), 40000))
            .find(|c| owner(&t, &req(*c)) == 3 && owner(&next, &req(*c)) == 2)
            .expect("a client in a moved bucket");
        let tables = Tables::new(3, t.clone());
        assert!(tables.steers_home(&rep(moving)));
        *tables.next.lock().expect("lock") = Some(Arc::new(next.clone()));
        assert!(
            !tables.steers_home(&rep(moving)),
            "moves under the next table"
        );
        assert!(
            tables.dnat_reply_home(&req(moving), &rep(moving)),
            "the reply follows the request"
        );
        // The new owner, for the same client (the open phase sends it there).
        let new_owner = Tables::new(2, t.clone());
        *new_owner.next.lock().expect("lock") = Some(Arc::new(next.clone()));
        assert!(new_owner.dnat_reply_home(&req(moving), &rep(moving)));
        // A TM the request never steers to does not keep the address.
        let bystander = Tables::new(0, t.clone());
        *bystander.next.lock().expect("lock") = Some(Arc::new(next.clone()));
        assert!(!bystander.dnat_reply_home(&req(moving), &rep(moving)));
        // Relation flipped: client port 5000 < the server's 9000, so the
        // reply hashes the server's address, not the client's.
        let low = SocketAddr::new(moving.ip(), 5000);
        let flip_home = tables.steers_home(&rep(low));
        assert_eq!(
            tables.dnat_reply_home(&req(low), &rep(low)),
            flip_home,
            "another bucket than the request's: only steers_home decides"
        );
        assert_ne!(t.steer(&req(low)).by, t.steer(&rep(low)).by);
    }
}
