//! Self-source port leases: a (SNAT address, port) whose replies the table steers back to this TM, from the `allocation` allocator, released on drop (the connecting is `tm_node::snat::connect`'s).
//!
//! The port comes from the `allocation` allocator for this node's TM index
//! and is greater than the server's port, so the server's reply hashes on
//! (SNAT address, port) — a bucket this TM owns. A port that is still in
//! use toward the same server (TIME_WAIT) makes `bind` or `connect` fail
//! with address-in-use: the next port is tried. When no port is left on
//! any SNAT address the connection is refused: never a port that would
//! steer the reply elsewhere.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use allocation::rules::proto;
use allocation::{AllocationTable, PortError, PortRange, ReplyFit, SnatAllocator, TmIndex};
use thiserror::Error;

/// Address-in-use answers tolerated for one connection before giving up.
pub const MAX_PORT_RETRIES: usize = 32;

/// Why a server-side connection could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// No self-source port is free above the server port on any SNAT address of the family.
    #[error("no self-source port left: {0}")]
    Exhausted(PortError),
    /// No self-source port can carry the server's replies: they land in
    /// another group than this TM's whatever the port (a configuration
    /// tmd refuses; reached only if the table changed under it).
    #[error("no self-source port can carry the replies: replies from {server} to SNAT address {addr} land in group '{lands_in}', not this TM's group '{group}'")]
    ReplyElsewhere {
        /// The server.
        server: SocketAddr,
        /// The (last) SNAT address tried.
        addr: IpAddr,
        /// The group the replies land in.
        lands_in: String,
        /// This TM's group.
        group: String,
    },
    /// No SNAT address of the server's address family.
    #[error("no SNAT address for {0}")]
    NoAddress(&'static str),
    /// The server did not answer in time.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// The connection failed.
    #[error("connect to {server}: {error}")]
    Failed {
        /// The server.
        server: SocketAddr,
        /// The error.
        error: io::Error,
    },
    /// Too many ports were in use (TIME_WAIT) one after the other.
    #[error("{0} self-source ports in a row were in use toward {1}")]
    Busy(usize, SocketAddr),
}

/// The self-source port allocators of one node: per address family, one
/// per server endpoint — a port is exclusive toward one server, not toward
/// all (the kernel only needs the 4-tuple unique), so the same self-source
/// port serves different servers at once.
#[derive(Debug)]
pub struct Snat {
    tm_id: u32,
    range: PortRange,
    v4: Option<Mutex<Family>>,
    v6: Option<Mutex<Family>>,
    /// The table the ports are for, and during a transition the next one:
    /// what classifies a connection's replies into a group (its rules).
    tables: Mutex<Arc<Tables>>,
    /// Ports other TMs' pinned flows hold (DESIGN §4): never handed out,
    /// until a commit gives another list.
    held: Mutex<Vec<(IpAddr, u16)>>,
    /// The held list of the last joining prepare (see [`Snat::rejoin`]).
    joining_held: Mutex<Vec<(IpAddr, u16)>>,
}

/// One address family's allocators: the valid ports (a template none are
/// leased from) and, per server endpoint, the ports leased toward it.
/// Memory: 2 × 8 KiB (valid and used bitmaps) and 128 bytes of summary per
/// SNAT address per server endpoint connected to; nothing per connection.
#[derive(Debug)]
struct Family {
    template: SnatAllocator,
    per: HashMap<SocketAddr, SnatAllocator>,
}

impl Family {
    fn new(template: SnatAllocator) -> Self {
        Family {
            template,
            per: HashMap::new(),
        }
    }

    /// The allocator toward `server` (made on first use).
    fn toward(&mut self, server: SocketAddr) -> &mut SnatAllocator {
        let Family { template, per } = self;
        per.entry(server).or_insert_with(|| template.fresh())
    }

    /// After the template's valid sets changed: every destination's too.
    fn spread(&mut self) {
        for a in self.per.values_mut() {
            a.set_valid_from(&self.template);
        }
    }

    /// Every destination's allocators.
    fn all(&self) -> impl Iterator<Item = &SnatAllocator> {
        self.per.values()
    }
}

/// The tables a node's ports must be valid under, with this node's index
/// in each (resolved once, not per connection).
#[derive(Debug)]
struct Tables {
    running: (AllocationTable, Option<TmIndex>),
    next: Option<(AllocationTable, Option<TmIndex>)>,
}

impl Tables {
    fn new(tm_id: u32, running: &AllocationTable, next: Option<&AllocationTable>) -> Tables {
        let with_index = |t: &AllocationTable| (t.clone(), t.tm_index_by_id(tm_id));
        Tables {
            running: with_index(running),
            next: next.map(with_index),
        }
    }

    /// The fit of this node's connections from `addr` to `server`, under
    /// both tables (each where this node is in it).
    fn fit(&self, server: SocketAddr, protocol: u8, addr: IpAddr) -> ReplyFit {
        let one = |(t, tm): &(AllocationTable, Option<TmIndex>)| {
            tm.map(|tm| ReplyFit::of(t, tm, server.ip(), server.port(), protocol, addr))
        };
        let now = one(&self.running).unwrap_or(ReplyFit::Never { lands_in: 0 });
        match self.next.as_ref().and_then(one) {
            Some(after) => now.and(after),
            None => now,
        }
    }

    /// The table whose group names an error gives (the next one, if any).
    fn naming(&self) -> &AllocationTable {
        self.next.as_ref().map_or(&self.running.0, |n| &n.0)
    }
}

/// One server a virtual server connects to, for [`check_replies`].
#[derive(Debug, Clone, Copy)]
pub struct ServerSide<'a> {
    /// The virtual server.
    pub vs: &'a str,
    /// Its pool.
    pub pool: &'a str,
    /// `allocation::rules::proto::TCP` or `UDP`.
    pub protocol: u8,
    /// The server.
    pub server: SocketAddr,
}

/// The names of group `g` of `table` and of TM id `tm_id`'s own group.
fn group_names(table: &AllocationTable, tm_id: u32, g: usize) -> (String, String) {
    let name = |g: usize| {
        table
            .groups()
            .get(g)
            .map_or_else(|| format!("#{g}"), |x| x.name.clone())
    };
    let own = table
        .tm_index_by_id(tm_id)
        .and_then(|i| table.tm(i))
        .map_or(0, |t| t.group);
    (name(g), name(own))
}

/// Refuses a configuration that can never work: a server whose replies to
/// one of the SNAT addresses `addrs` land in another group than TM id
/// `tm_id`'s whatever the port, under `table` (and `next`). One line names
/// the virtual server, the pool, the server, the SNAT address and both
/// groups.
pub fn check_replies(
    table: &AllocationTable,
    next: Option<&AllocationTable>,
    tm_id: u32,
    addrs: &[IpAddr],
    servers: &[ServerSide<'_>],
) -> Result<(), String> {
    // A source-affinity group hashes an endpoint's address alone: every
    // port of a SNAT address lands in one bucket, so self-source ports
    // cannot spread a TM's replies (they steer home only by the accident
    // of the address's bucket, and a rebalance takes them all away).
    for t in [Some(table), next].into_iter().flatten() {
        let group = t
            .tm_index_by_id(tm_id)
            .and_then(|i| t.tm(i))
            .and_then(|tm| t.groups().get(tm.group));
        if let (Some(g), Some(s)) = (group, servers.first()) {
            if matches!(g.hash, allocation::HashMode::Address { .. }) {
                return Err(format!(
                    "virtual server '{}' (pool '{}'): this TM is in group '{}', whose hash = \"address\" steers every port of a SNAT address to one TM: self-source ports cannot bring the replies home; set dnat_only = true on its virtual servers (and no health checks), or move the TM to an endpoint-hash group",
                    s.vs, s.pool, g.name
                ));
            }
        }
    }
    let tables = Tables::new(tm_id, table, next);
    for s in servers {
        for &a in addrs.iter().filter(|a| a.is_ipv4() == s.server.is_ipv4()) {
            if let ReplyFit::Never { lands_in } = tables.fit(s.server, s.protocol, a) {
                let (lands, own) = group_names(tables.naming(), tm_id, lands_in);
                let p = proto::name(s.protocol);
                return Err(format!(
                    "virtual server '{}' (pool '{}'): {p} replies from server {} to SNAT address {a} land in group '{lands}' whatever the port, not in this TM's group '{own}': give group '{own}' a rule that matches them (e.g. {p} port {}, or a prefix holding {a}), or put the TM in group '{lands}'",
                    s.vs,
                    s.pool,
                    s.server,
                    s.server.port(),
                ));
            }
        }
    }
    Ok(())
}

/// A leased (address, port) toward one server: released when dropped.
#[derive(Debug)]
pub struct Lease {
    snat: Arc<Snat>,
    /// The SNAT address.
    pub addr: IpAddr,
    /// The self-source port.
    pub port: u16,
    /// The server endpoint it is leased toward.
    pub server: SocketAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.snat.release(self.addr, self.port, self.server);
    }
}

impl Snat {
    /// Builds the self-port tables of TM `tm` for `addrs` under `table`.
    pub fn new(
        table: &AllocationTable,
        tm: TmIndex,
        addrs: &[IpAddr],
        range: PortRange,
    ) -> Result<Self, PortError> {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv4());
        let build = |list: &[IpAddr]| -> Result<Option<Mutex<Family>>, PortError> {
            if list.is_empty() {
                Ok(None)
            } else {
                Ok(Some(Mutex::new(Family::new(SnatAllocator::new(
                    table, tm, list, range,
                )?))))
            }
        };
        let tm_id = table.tm(tm).map_or(u32::MAX, |t| t.id);
        Ok(Snat {
            tm_id,
            range,
            v4: build(&v4)?,
            v6: build(&v6)?,
            tables: Mutex::new(Arc::new(Tables::new(tm_id, table, None))),
            held: Mutex::new(Vec::new()),
            joining_held: Mutex::new(Vec::new()),
        })
    }

    /// The ports self-source ports are chosen from.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The SNAT addresses, in order (IPv4 first).
    pub fn addrs(&self) -> Vec<IpAddr> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .flat_map(|m| {
                let f = m.lock().unwrap_or_else(|p| p.into_inner());
                f.template
                    .pools()
                    .iter()
                    .map(|p| p.addr())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn set_tables(&self, running: &AllocationTable, next: Option<&AllocationTable>) {
        *self.tables.lock().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Tables::new(self.tm_id, running, next));
    }

    /// This node's TM id (stable across tables).
    pub fn tm_id(&self) -> u32 {
        self.tm_id
    }

    fn family(&self, v4: bool) -> Result<&Mutex<Family>, ConnectError> {
        if v4 {
            self.v4.as_ref().ok_or(ConnectError::NoAddress("IPv4"))
        } else {
            self.v6.as_ref().ok_or(ConnectError::NoAddress("IPv6"))
        }
    }

    /// Leases a self-source port for a connection to `server` carrying
    /// `protocol` (`allocation::rules::proto`): above the server's port,
    /// free toward this server (other servers' connections may use it at
    /// the same time), and one whose reply the distributors classify into
    /// this TM's group (and steer to it) under the running table — and,
    /// during a transition, the next one too.
    pub fn lease(
        self: &Arc<Self>,
        server: SocketAddr,
        protocol: u8,
    ) -> Result<Lease, ConnectError> {
        let alloc = self.family(server.is_ipv4())?;
        let tables = Arc::clone(&self.tables.lock().unwrap_or_else(|p| p.into_inner()));
        let mut f = alloc.lock().unwrap_or_else(|p| p.into_inner());
        let (addr, port) = f
            .toward(server)
            .allocate_fit(server, |addr| tables.fit(server, protocol, addr))
            .map_err(|e| match e {
                PortError::ReplyElsewhere {
                    server,
                    addr,
                    lands_in,
                } => {
                    let (lands_in, group) = group_names(tables.naming(), self.tm_id, lands_in);
                    ConnectError::ReplyElsewhere {
                        server,
                        addr,
                        lands_in,
                        group,
                    }
                }
                e => ConnectError::Exhausted(e),
            })?;
        Ok(Lease {
            snat: Arc::clone(self),
            addr,
            port,
            server,
        })
    }

    fn release(&self, addr: IpAddr, port: u16, server: SocketAddr) {
        if let Ok(alloc) = self.family(addr.is_ipv4()) {
            let mut f = alloc.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.toward(server).release(addr, port) {
                log::error!("releasing {addr}:{port} toward {server}: {e}");
            }
        }
    }

    /// Recomputes the self-port tables for a new table (and, during a
    /// transition, only ports valid under both); leased ports stay
    /// reserved. This node is found in each table by its TM id — never by
    /// index, which shifts when a TM is removed. A node that owns no
    /// bucket of `table` has no port valid under both: see
    /// [`Snat::prepare_joining`].
    pub fn retable(
        &self,
        table: &AllocationTable,
        next: Option<&AllocationTable>,
    ) -> Result<(), PortError> {
        let tm = table
            .tm_index_by_id(self.tm_id)
            .ok_or(PortError::NotInTable(self.tm_id))?;
        let next = match next {
            Some(n) => Some((
                n,
                n.tm_index_by_id(self.tm_id)
                    .ok_or(PortError::NotInTable(self.tm_id))?,
            )),
            None => None,
        };
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for alloc in [&self.v4, &self.v6].into_iter().flatten() {
            let mut f = alloc.lock().unwrap_or_else(|p| p.into_inner());
            f.template
                .retable_holding(table, tm, next, self.range, &held)?;
            f.spread();
        }
        self.set_tables(table, next.map(|(n, _)| n));
        Ok(())
    }

    /// The ports other TMs' pinned flows hold, which this node must not
    /// hand out from the next [`Snat::retable`] on (a commit's `held`).
    pub fn set_held(&self, held: Vec<(IpAddr, u16)>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    /// The ports held for other TMs' pinned flows.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A transition's prepare for a node *joining* it: one that owns no
    /// bucket of the running table (added, or readmitted after a
    /// failover). It takes the ports `next` gives it except `held`, the
    /// (address, port) pairs the old owners still hold in buckets moving to
    /// it ([`Snat::moving_ports`] of every other node, taken after they
    /// prepared: from then on that set only shrinks). The distributors
    /// remember the connections it opens during the window (DESIGN §4), so
    /// the servers' answers reach it.
    pub fn prepare_joining(
        &self,
        next: &AllocationTable,
        held: &[(IpAddr, u16)],
    ) -> Result<(), PortError> {
        let tm = next
            .tm_index_by_id(self.tm_id)
            .ok_or(PortError::NotInTable(self.tm_id))?;
        *self.joining_held.lock().unwrap_or_else(|p| p.into_inner()) = held.to_vec();
        let mut all = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        all.extend_from_slice(held);
        for alloc in [&self.v4, &self.v6].into_iter().flatten() {
            let mut f = alloc.lock().unwrap_or_else(|p| p.into_inner());
            f.template.prepare_joining(next, tm, &all, self.range)?;
            f.spread();
        }
        // It owns nothing of the running table: its replies are the next one's.
        self.set_tables(next, None);
        Ok(())
    }

    /// A joining node prepared again for the same `next` (a push resumed,
    /// or another joiner's open ports learnt after this one's prepare):
    /// it keeps out `held` AND everything its last joining prepare kept
    /// out — never fewer. A list collected later is shorter when the old
    /// owners' connections ended, but the distributors' pins of those
    /// flows may outlive them; taking those ports would meet the pins.
    pub fn rejoin(&self, next: &AllocationTable, held: &[(IpAddr, u16)]) -> Result<(), PortError> {
        let mut all = self
            .joining_held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.extend_from_slice(held);
        all.sort_unstable();
        all.dedup();
        self.prepare_joining(next, &all)
    }

    /// True if this node owns no bucket of `table` (it would join a transition from it).
    pub fn joins_from(&self, table: &AllocationTable) -> bool {
        match table.tm_index_by_id(self.tm_id) {
            None => true,
            Some(i) => table
                .groups()
                .iter()
                .all(|g| g.buckets.as_slice().iter().all(|&o| o != i)),
        }
    }

    /// Every (address, port) in use toward some server whose replies would
    /// not steer to this TM under `next`, once each however many servers
    /// it is in use toward, and how many connections hold them.
    fn moving(&self, next: &AllocationTable) -> (Vec<(IpAddr, u16)>, usize) {
        let tm = next.tm_index_by_id(self.tm_id);
        let (mut out, mut connections) = (Vec::new(), 0);
        for m in [&self.v4, &self.v6].into_iter().flatten() {
            let f = m.lock().unwrap_or_else(|p| p.into_inner());
            for (i, p) in f.template.pools().iter().enumerate() {
                let valid = tm.and_then(|tm| {
                    allocation::SelfPorts::build(next, p.addr(), tm, self.range).ok()
                });
                for a in f.all() {
                    let Some(dest) = a.pools().get(i) else {
                        continue;
                    };
                    for port in dest.used_ports() {
                        if valid.as_ref().is_none_or(|v| !v.contains(port)) {
                            out.push((p.addr(), port));
                            connections += 1;
                        }
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        (out, connections)
    }

    /// Ports in use whose replies would not steer to this TM under `next`:
    /// the open connections living in buckets a transition moves away (an
    /// (address, port) once, whatever number of servers it is in use toward).
    pub fn moving_ports(&self, next: &AllocationTable) -> Vec<(IpAddr, u16)> {
        self.moving(next).0
    }

    /// How many connections hold [`Snat::moving_ports`].
    pub fn in_use_moving(&self, next: &AllocationTable) -> usize {
        self.moving(next).1
    }

    /// (address, ports in use, ports free) per SNAT address: in use counts
    /// every connection (toward every server); free is what is left toward
    /// the busiest server (the most new connections any one server can
    /// still get from this address).
    pub fn usage(&self) -> Vec<(IpAddr, usize, usize)> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .flat_map(|m| {
                let f = m.lock().unwrap_or_else(|p| p.into_inner());
                f.template
                    .pools()
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let dests = f.all().filter_map(|a| a.pools().get(i));
                        let (used, free) = dests.fold((0, p.free()), |(u, fr), d| {
                            (u + d.in_use(), fr.min(d.free()))
                        });
                        (p.addr(), used, free)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use allocation::rules::proto;
    use allocation::{Flow, HashKey, Profile};

    fn server80() -> SocketAddr {
        "198.51.100.1:80".parse().expect("addr")
    }

    fn table() -> AllocationTable {
        testkit::table(1, HashKey::from_bytes([1; 16]), 4, Profile::Uniform)
    }

    fn snat_in(t: &AllocationTable, tm: TmIndex, lo: u16, hi: u16) -> Arc<Snat> {
        Arc::new(
            Snat::new(
                t,
                tm,
                &["10.1.0.1".parse().expect("addr")],
                PortRange { lo, hi },
            )
            .expect("snat"),
        )
    }

    fn steers_home(t: &AllocationTable, tm: TmIndex, server: SocketAddr, l: &Lease) -> bool {
        let reply = Flow::with_ports(proto::TCP, server.ip(), server.port(), l.addr, l.port);
        t.steer(&reply).tm == tm
    }

    /// Ports are per server endpoint: every self-source port of the range
    /// is leased toward one server and, at the same time, toward another.
    /// Exhaustion is per server: the first one's are all gone while the
    /// third still gets all of its own.
    #[test]
    fn two_servers_share_self_source_ports_and_exhaust_on_their_own() {
        let t = table();
        let snat = snat_in(&t, 1, 20000, 20999);
        let a: SocketAddr = "198.51.100.1:80".parse().expect("addr");
        let b: SocketAddr = "198.51.100.2:80".parse().expect("addr");
        let c: SocketAddr = "198.51.100.1:8080".parse().expect("addr");
        let all = |server| {
            let mut got = Vec::new();
            while let Ok(l) = snat.lease(server, proto::TCP) {
                assert!(steers_home(&t, 1, server, &l), "{}:{}", l.addr, l.port);
                got.push(l);
                assert!(got.len() <= 1000, "more leases than ports");
            }
            got
        };
        let to_a = all(a);
        assert!(to_a.len() > 100, "{} self-source ports", to_a.len());
        assert!(matches!(
            snat.lease(a, proto::TCP),
            Err(ConnectError::Exhausted(_))
        ));
        // The same ports again toward b, while a holds them all.
        let to_b = all(b);
        let ports = |v: &[Lease]| v.iter().map(|l| (l.addr, l.port)).collect::<Vec<_>>();
        assert_eq!(ports(&to_a), ports(&to_b), "b gets the very ports a holds");
        assert_eq!(
            snat.usage(),
            vec![("10.1.0.1".parse().expect("addr"), 2 * to_a.len(), 0)]
        );
        // Another port of the same address is another endpoint.
        assert_eq!(all(c).len(), to_a.len());
        // One released toward a: a gets that one back, b stays full.
        let freed = (to_a[7].addr, to_a[7].port);
        let mut to_a = to_a;
        drop(to_a.remove(7));
        let again = snat.lease(a, proto::TCP).expect("the freed port");
        assert_eq!((again.addr, again.port), freed);
        assert!(matches!(
            snat.lease(b, proto::TCP),
            Err(ConnectError::Exhausted(_))
        ));
    }

    /// A transition with per-destination allocators: after a prepare every
    /// destination hands out only ports valid under both tables, keeps its
    /// leased ones reserved, and the moving ports are listed once however
    /// many servers hold them, counted per connection.
    #[test]
    fn a_transition_retables_every_destination() {
        let t = table();
        let snat = snat_in(&t, 0, 20000, 29999);
        let a: SocketAddr = "198.51.100.1:80".parse().expect("addr");
        let b: SocketAddr = "198.51.100.2:80".parse().expect("addr");
        let held_a: Vec<Lease> = (0..200)
            .map(|_| snat.lease(a, proto::TCP).expect("a"))
            .collect();
        let held_b: Vec<Lease> = (0..200)
            .map(|_| snat.lease(b, proto::TCP).expect("b"))
            .collect();
        let next = t
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: Some(1.5),
                    sigma: Some(0.8),
                },
            )
            .expect("rebalance")
            .table
            .with_version(2);
        let me = next.tm_index_by_id(t.tms()[0].id).expect("in next");
        let moving = snat.moving_ports(&next);
        let moving_connections = snat.in_use_moving(&next);
        assert!(
            !moving.is_empty(),
            "the rebalance moves some of tm0's ports"
        );
        assert_eq!(
            moving_connections,
            2 * moving.len(),
            "each moving port is held toward a and b"
        );
        snat.retable(&t, Some(&next)).expect("prepare");
        for server in [a, b] {
            for _ in 0..300 {
                let l = snat.lease(server, proto::TCP).expect("lease");
                assert!(steers_home(&t, 0, server, &l) && steers_home(&next, me, server, &l));
                let dup = |v: &[Lease]| v.iter().any(|h| (h.addr, h.port) == (l.addr, l.port));
                assert!(
                    !dup(if server == a { &held_a } else { &held_b }),
                    "a leased port handed out again"
                );
            }
        }
        drop((held_a, held_b));
    }

    #[test]
    fn a_node_is_found_by_id_in_every_table() {
        let t = table();
        let snat = Arc::new(
            Snat::new(
                &t,
                3,
                &["10.1.0.1".parse().expect("addr")],
                PortRange {
                    lo: 1024,
                    hi: 65535,
                },
            )
            .expect("snat"),
        );
        let next = t.remove_tm(0).expect("remove").table.with_version(2);
        snat.retable(&next, None).expect("retable");
        let me = next.tm_index_by_id(3).expect("id 3");
        for _ in 0..300 {
            let lease = snat.lease(server80(), proto::TCP).expect("lease");
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                lease.addr,
                lease.port,
            );
            assert_eq!(next.steer(&reply).tm, me);
        }
        // A table without this node is refused.
        let without = next.remove_tm(me).expect("remove").table;
        assert!(matches!(
            snat.retable(&without, None),
            Err(PortError::NotInTable(3))
        ));
    }

    #[test]
    fn a_joining_node_prepares_with_the_next_table() {
        let t = table();
        let range = PortRange {
            lo: 1024,
            hi: 65535,
        };
        let addr: IpAddr = "10.1.0.1".parse().expect("addr");
        // TM 2 failed: the failover table keeps it, with no bucket.
        let failover = t.failover(&[2]).expect("failover").table;
        let back = failover
            .rebalance_to_targets(0, &t.counts(0), None)
            .expect("readmit")
            .table;
        let snat = Arc::new(Snat::new(&failover, 2, &[addr], range).expect("snat"));
        assert!(
            snat.lease(server80(), proto::TCP).is_err(),
            "no bucket, no port"
        );
        assert!(snat.joins_from(&failover));
        // A member holds ports in buckets moving to TM 2 ...
        let member = Arc::new(Snat::new(&failover, 1, &[addr], range).expect("snat"));
        let mut leases: Vec<Lease> = (0..400)
            .map(|_| member.lease(server80(), proto::TCP).expect("lease"))
            .collect();
        member.retable(&failover, Some(&back)).expect("prepare");
        let held = member.moving_ports(&back);
        assert!(!held.is_empty());
        let held_to_2: Vec<u16> = held
            .iter()
            .filter(|&&(_, p)| {
                back.steer(&Flow::with_ports(
                    proto::TCP,
                    "198.51.100.1".parse().expect("addr"),
                    80,
                    addr,
                    p,
                ))
                .tm == 2
            })
            .map(|&(_, p)| p)
            .collect();
        assert!(!held_to_2.is_empty(), "some held ports move to TM 2");
        // ... which the joining TM never takes.
        snat.prepare_joining(&back, &held).expect("prepare");
        let mut got = Vec::new();
        while let Ok(lease) = snat.lease(server80(), proto::TCP) {
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                addr,
                lease.port,
            );
            assert_eq!(back.steer(&reply).tm, 2, "a port of the next table");
            assert!(
                !held_to_2.contains(&lease.port),
                "port {} is held by TM 1",
                lease.port
            );
            got.push(lease);
            if got.len() > 20_000 {
                break;
            }
        }
        assert!(got.len() > 1000);
        // Prepared again with a shorter list (a resumed push, after the
        // member's connections ended): it still keeps out the first list.
        drop(got);
        snat.rejoin(&back, &[]).expect("prepare again");
        let mut again = Vec::new();
        while let Ok(lease) = snat.lease(server80(), proto::TCP) {
            assert!(
                !held_to_2.contains(&lease.port),
                "port {} is held by TM 1 (a pin may outlive it)",
                lease.port
            );
            again.push(lease);
            if again.len() > 20_000 {
                break;
            }
        }
        assert!(again.len() > 1000);
        drop(again);
        // The member, prepared, only takes ports valid under both tables.
        leases.clear();
        for _ in 0..100 {
            let lease = member.lease(server80(), proto::TCP).expect("lease");
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                addr,
                lease.port,
            );
            assert_eq!(failover.steer(&reply).tm, 1);
            assert_eq!(back.steer(&reply).tm, 1);
        }
    }

    /// A TLS-group TM (rule: TCP 443) whose servers listen on 8080: every
    /// reply is classified into the default group, so the configuration is
    /// refused with one line naming both groups and a lease is refused too;
    /// with a rule for 8080 in the TLS group every lease steers home.
    #[test]
    fn replies_that_land_in_another_group_are_refused() {
        let with_rules = |rules| testkit::partitioned(&table(), &[2, 3], rules);
        let rule = testkit::tcp_rule;
        let addr: IpAddr = "10.1.0.1".parse().expect("addr");
        let server: SocketAddr = "198.51.100.7:8080".parse().expect("addr");
        let sides = [ServerSide {
            vs: "web-tls",
            pool: "app",
            protocol: proto::TCP,
            server,
        }];
        let t = with_rules(vec![rule("443")]);
        let id = t.tm(2).expect("tm").id;
        let e = check_replies(&t, None, id, &[addr], &sides).expect_err("refused");
        assert!(
            e.contains("'web-tls'")
                && e.contains("'app'")
                && e.contains("10.1.0.1")
                && e.contains("group 'default'")
                && e.contains("group 'tls'"),
            "{e}"
        );
        let snat = Arc::new(Snat::new(&t, 2, &[addr], PortRange::ALL).expect("snat"));
        assert!(matches!(
            snat.lease(server, proto::TCP),
            Err(ConnectError::ReplyElsewhere { .. })
        ));
        // The default group's TMs are fine there.
        let id0 = t.tm(0).expect("tm").id;
        assert!(check_replies(&t, None, id0, &[addr], &sides).is_ok());

        let fixed = with_rules(vec![rule("443"), rule("8080")]);
        assert!(check_replies(&fixed, None, id, &[addr], &sides).is_ok());
        // A transition to the fixed table is still refused: the running one
        // must take the replies too.
        assert!(check_replies(&t, Some(&fixed), id, &[addr], &sides).is_err());
        snat.retable(&fixed, None).expect("retable");
        for _ in 0..500 {
            let lease = snat.lease(server, proto::TCP).expect("lease");
            let reply = Flow::with_ports(proto::TCP, server.ip(), 8080, lease.addr, lease.port);
            let s = fixed.steer(&reply);
            assert_eq!((s.group, s.tm), (1, 2));
        }
        // Now default-group TMs cannot reach that server (its replies are TLS's).
        assert!(check_replies(&fixed, None, id0, &[addr], &sides).is_err());
    }

    /// A source-affinity group's TM connecting from self-source ports is
    /// refused (DNAT-only is the mode such a group supports).
    #[test]
    fn an_address_hash_group_refuses_self_source_ports() {
        let t = testkit::partitioned_hash(
            &table(),
            &[2, 3],
            vec![testkit::tcp_rule("443")],
            allocation::HashMode::Address {
                v4_prefix: 32,
                v6_prefix: 128,
            },
        );
        let sides = [ServerSide {
            vs: "web-tls",
            pool: "app",
            protocol: proto::TCP,
            server: "198.51.100.7:443".parse().expect("addr"),
        }];
        let addr: IpAddr = "10.1.0.1".parse().expect("addr");
        let e = check_replies(&t, None, 2, &[addr], &sides).expect_err("refused");
        assert!(
            e.contains("hash = \"address\"") && e.contains("dnat_only"),
            "{e}"
        );
        // Nothing from self-source ports (DNAT-only virtual servers only): fine.
        assert!(check_replies(&t, None, 2, &[addr], &[]).is_ok());
        // The default group's TMs are unaffected (servers off 443: the
        // replies of 443 are the tls group's).
        let other = [ServerSide {
            server: "198.51.100.7:8080".parse().expect("addr"),
            ..sides[0]
        }];
        assert!(check_replies(&t, None, 0, &[addr], &other).is_ok());
    }
}
