//! The steering decision: (frame bytes, plan) → verdict and rewrite, the distributor's steering rule in one pure function ([`classify`]), and the step that writes it into the frame ([`apply`]).
//!
//! The order is the design's (DESIGN §2): layer 2 first (a frame not for the
//! group MAC is bridged), then the control path (ARP and neighbour discovery
//! for cluster addresses), fragments, ICMP errors by their embedded flow,
//! then the table (`AllocationTable::steer`: group rules, equal ports,
//! greater-port endpoint). Frames from TM-facing ports are forwarded toward
//! their destination without hashing, their cluster-address ARP/ND sender
//! rewritten to the group MAC so neighbours never learn a TM's MAC.
//!
//! [`classify`] reads the frame and writes nothing: it says where the frame
//! goes ([`Verdict`]) and what is to be written into it ([`Rewrite`]:
//! replies to ARP/ND for cluster addresses, sender-MAC rewrites).
//! [`apply`] writes it; [`decide`] is the two in a row. The batch fast path
//! (`worker.rs`) and the in-kernel program (`distributor::xdp_steer`) are
//! projections of `classify`'s endpoint branch. State that outlives a
//! frame (fragments, MAC learning, transition memory) belongs to the
//! worker (`worker.rs`).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use allocation::{AllocationTable, Flow, MacAddr, SteerBy, TmIndex};
use thiserror::Error;

use crate::pins::{Pin, PinHit, PinSet};
use crate::verdict::{Branch, Drop, PortId};
use crate::wire::{self, ethertype, icmp, proto, ArpPacket, EthernetFrame, IpHeader};

/// What a distributor port faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Clients (front), servers (back), or either side (combined): frames to the group are steered.
    Outside,
    /// One or more TMs (a dedicated link, or a shared one with TMs told apart by MAC).
    Tm,
    /// Anything else: a plain bridge port.
    Bridged,
}

/// A plan that cannot be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// The group MAC must be a unicast address.
    #[error("the group MAC {0} is a multicast address")]
    MulticastGroupMac(MacAddr),
    /// A TM-port mapping names a port that is not a TM port.
    #[error("TM id {tm} is mapped to port {port}, which is not a TM-facing port")]
    NotTmPort {
        /// TM id.
        tm: u32,
        /// Port.
        port: PortId,
    },
    /// The previous table of a transition must be older than the new one.
    #[error(
        "the previous table (version {previous}) is not older than the new one (version {current})"
    )]
    PreviousNotOlder {
        /// Previous table version.
        previous: u64,
        /// New table version.
        current: u64,
    },
}

/// The previous table while a transition is switched (DESIGN §4): flows in
/// buckets whose owner changed stay with the old owner unless seen starting.
#[derive(Debug, Clone)]
struct Previous {
    table: AllocationTable,
    /// The route index (see [`Plan::tm_route`]) of each of its TM indexes.
    route: Vec<TmIndex>,
    /// When both tables are one endpoint-hashed group with the same key:
    /// the buckets whose owner changed (one bit each), for the batch fast path.
    moved: Option<Box<MovedSet>>,
    /// New flows in moved buckets start on their new owner (phase "open");
    /// before, they still start on the old one (phase "switched").
    open: bool,
}

/// After a restart in the middle of a transition (DESIGN §4): the table the
/// distributor had committed and the one it was switched to. Where they
/// disagree its memory of who started what is gone, so those flows are
/// dropped ([`Drop::Recovering`], counted) — never guessed — until the
/// coordinator switches it again and hands it the TMs' pins.
#[derive(Debug)]
struct Recovery {
    committed: AllocationTable,
    switched: AllocationTable,
    /// The buckets they disagree on, when comparable bucket by bucket.
    buckets: Option<MovedSet>,
}

impl Recovery {
    /// True if the two tables steer `flow` to different TMs.
    #[inline]
    fn disagrees(&self, flow: &Flow) -> bool {
        let id = |t: &AllocationTable| t.tms().get(usize::from(t.steer(flow).tm)).map(|t| t.id);
        id(&self.committed) != id(&self.switched)
    }
}

/// A failover a distributor derived on its own: the operator's tables the
/// plan's tables are the failover of, and the failed TMs.
#[derive(Debug)]
struct Derived {
    table: AllocationTable,
    previous: Option<AllocationTable>,
    failed: Vec<u32>,
}

/// One bit per bucket: set where the owner changed between two tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedSet([u64; allocation::TABLE_SIZE / 64]);

impl MovedSet {
    /// The set of these bits (bucket `b` is bit `b % 64` of word `b / 64`).
    pub fn from_words(words: [u64; allocation::TABLE_SIZE / 64]) -> Self {
        MovedSet(words)
    }

    /// Adds bucket `b`.
    pub fn insert(&mut self, b: usize) {
        let n = self.0.len();
        self.0[(b / 64) % n] |= 1 << (b % 64);
    }

    /// The buckets of either set.
    pub fn union(&self, other: &MovedSet) -> MovedSet {
        let mut out = self.clone();
        for (w, o) in out.0.iter_mut().zip(other.0.iter()) {
            *w |= o;
        }
        out
    }

    /// True if bucket `b` moved.
    #[inline(always)]
    pub fn contains(&self, b: usize) -> bool {
        self.0[(b / 64) % self.0.len()] & (1 << (b % 64)) != 0
    }

    /// Buckets that moved.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// True if no bucket moved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A flow in a moved bucket, as the steering saw it: the worker's
/// transition memory decides between the new owner and the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// The flow, both directions alike.
    pub key: FlowKey,
    /// Where the previous table steers it (a route index).
    pub old: TmIndex,
    /// The packet starts a flow (a TCP SYN without ACK): it is remembered
    /// where it goes.
    pub start: bool,
    /// The packet is an ICMP error about the flow (it may come through
    /// another distributor than the flow's own packets).
    pub icmp: bool,
    /// A flow with ports but without a handshake (UDP, SCTP, …): any
    /// packet may start it, so the worker remembers where each one went.
    pub session: bool,
    /// The transition is open: new flows start on their new owner.
    pub open: bool,
}

/// A flow named the same in both directions: protocol and the two
/// endpoints, the lesser first. Flows without ports have port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Protocol.
    pub proto: u8,
    /// The lesser endpoint.
    pub a: (IpAddr, u16),
    /// The greater endpoint.
    pub b: (IpAddr, u16),
}

impl FlowKey {
    /// The key of `flow` (either direction gives the same key).
    pub fn of(flow: &Flow) -> Self {
        let (sp, dp) = flow.ports.unwrap_or((0, 0));
        let (x, y) = (
            (allocation::hash::canonical(flow.src), sp),
            (allocation::hash::canonical(flow.dst), dp),
        );
        let (a, b) = if x <= y { (x, y) } else { (y, x) };
        FlowKey {
            proto: flow.protocol,
            a,
            b,
        }
    }
}

/// Everything the steering reads, immutable, swapped as one snapshot: the
/// table, the group MAC, the cluster's addresses, the ports and where each
/// TM is reached.
#[derive(Debug, Clone)]
pub struct Plan {
    table: AllocationTable,
    group_mac: MacAddr,
    cluster: Vec<IpAddr>,
    ports: Vec<PortKind>,
    tm_port: Vec<Option<PortId>>,
    tm_mac: Vec<MacAddr>,
    /// TM id of each route index.
    tm_id: Vec<u32>,
    /// Where each TM id is reached, as configured (to route a previous table's TMs).
    tm_ports: Vec<(u32, PortId)>,
    previous: Option<Previous>,
    /// Flows kept on their old owner past a commit (see [`crate::pins`]),
    /// as reported, and as resolved for this plan's routes.
    pin_list: Arc<[Pin]>,
    pin_capacity: usize,
    pins: Option<Arc<PinSet>>,
    /// Buckets the fast paths leave to the general one (moved, pinned or
    /// recovering), for a single endpoint-hashed group.
    slow: Option<Box<MovedSet>>,
    /// Restarted mid-transition: the flows it cannot place are dropped.
    recovery: Option<Arc<Recovery>>,
    /// A failover plan: what it was derived from.
    derived: Option<Arc<Derived>>,
}

impl Plan {
    /// Builds a plan. `tm_ports` maps TM ids to the port that reaches them;
    /// a TM without a port gets no traffic (its frames are dropped as
    /// `no_tm_port`, counted); ids the table does not have are kept for
    /// the previous table of a transition.
    pub fn new(
        table: AllocationTable,
        group_mac: MacAddr,
        cluster: &[IpAddr],
        ports: Vec<PortKind>,
        tm_ports: &[(u32, PortId)],
    ) -> Result<Self, PlanError> {
        if group_mac.is_multicast() {
            return Err(PlanError::MulticastGroupMac(group_mac));
        }
        let mut tm_port = vec![None; table.tms().len()];
        for &(id, port) in tm_ports {
            if ports.get(usize::from(port)) != Some(&PortKind::Tm) {
                return Err(PlanError::NotTmPort { tm: id, port });
            }
            // A TM this table does not have (removed, or not yet added)
            // keeps its mapping for a transition's previous table.
            if let Some(i) = table.tm_index_by_id(id) {
                tm_port[usize::from(i)] = Some(port);
            }
        }
        let mut cluster: Vec<IpAddr> = cluster
            .iter()
            .map(|&a| allocation::hash::canonical(a))
            .collect();
        cluster.sort_unstable();
        cluster.dedup();
        let tm_mac = table.tms().iter().map(|t| t.mac).collect();
        let tm_id = table.tms().iter().map(|t| t.id).collect();
        Ok(Plan {
            table,
            group_mac,
            cluster,
            ports,
            tm_port,
            tm_mac,
            tm_id,
            tm_ports: tm_ports.to_vec(),
            previous: None,
            pin_list: Arc::from(Vec::new()),
            pin_capacity: 0,
            pins: None,
            slow: None,
            recovery: None,
            derived: None,
        })
    }

    /// This plan switched into a transition from `previous` (DESIGN §4
    /// step 2): buckets whose owner differs between the two tables are
    /// steered by the transition rule. A TM only the previous table has
    /// keeps its route (its established flows still reach it); it gets
    /// route index `tms + j`.
    ///
    /// The switch comes in two phases, each applied to every distributor
    /// before the next begins: *switched* — everything in a moved bucket
    /// still goes to the old owner, but flows a TM starts are remembered;
    /// then *open* ([`Plan::opened`]) — flows starting from outside start
    /// on the new owner. So no new owner gets a flow while some distributor
    /// (on the other side, or in parallel) would not yet remember what that
    /// owner starts toward the servers.
    pub fn with_previous(mut self, previous: AllocationTable) -> Result<Self, PlanError> {
        if previous.version() >= self.table.version() {
            return Err(PlanError::PreviousNotOlder {
                previous: previous.version(),
                current: self.table.version(),
            });
        }
        self.drop_previous_routes();
        let mut route = Vec::with_capacity(previous.tms().len());
        for t in previous.tms() {
            let r = match self.table.tm_index_by_id(t.id) {
                Some(i) => i,
                None => {
                    let port = self
                        .tm_ports
                        .iter()
                        .find(|&&(id, _)| id == t.id)
                        .map(|&(_, p)| p);
                    self.tm_port.push(port);
                    self.tm_mac.push(t.mac);
                    self.tm_id.push(t.id);
                    (self.tm_id.len() - 1) as TmIndex
                }
            };
            route.push(r);
        }
        let moved = match (self.table.groups(), previous.groups()) {
            ([g], [p])
                if g.hash == allocation::HashMode::Endpoint
                    && p.hash == allocation::HashMode::Endpoint
                    && self.table.key() == previous.key() =>
            {
                let mut set = MovedSet([0; allocation::TABLE_SIZE / 64]);
                for b in 0..allocation::TABLE_SIZE {
                    if route[usize::from(p.buckets.get(b))] != g.buckets.get(b) {
                        set.0[b / 64] |= 1 << (b % 64);
                    }
                }
                Some(Box::new(set))
            }
            _ => None,
        };
        self.previous = Some(Previous {
            table: previous,
            route,
            moved,
            open: false,
        });
        self.rebuild_pins();
        Ok(self)
    }

    /// This plan with `pins` (DESIGN §4: flows their old owner still
    /// serves), at most `capacity` of them; they replace any earlier pins.
    /// Outside a transition a pin the table already steers to its TM is
    /// left out.
    pub fn with_pins(mut self, pins: Arc<[Pin]>, capacity: usize) -> Self {
        self.pins = None;
        self.pin_list = pins;
        self.pin_capacity = capacity;
        self.rebuild_pins();
        self
    }

    /// The pins in force as they stand — each one's last packet, those a
    /// SYN ended left out — to carry them into the next plan.
    pub fn pin_list(&self) -> (Arc<[Pin]>, usize) {
        let list = match self.pins.as_deref() {
            Some(set) => Arc::from(set.live()),
            None => Arc::clone(&self.pin_list),
        };
        (list, self.pin_capacity)
    }

    /// The pins in force.
    pub fn pins(&self) -> Option<&PinSet> {
        self.pins.as_deref()
    }

    /// Resolves the pins against this plan's table and routes, and the
    /// fast paths' slow buckets with them.
    fn rebuild_pins(&mut self) {
        if let Some(set) = self.pins.take() {
            // What the packets taught the set so far carries on.
            self.pin_list = Arc::from(set.live());
        }
        self.pins = (!self.pin_list.is_empty()).then(|| {
            Arc::new(PinSet::build(
                &self.pin_list,
                &self.table,
                self.pin_capacity,
                *self.table.key(),
                |id| self.route_of(id),
                self.previous.is_none(),
            ))
        });
        let moved = self.previous.as_ref().and_then(|p| p.moved.as_deref());
        let pinned = self.pins.as_deref().and_then(|p| match p.is_empty() {
            true => None,
            false => p.buckets(0),
        });
        let recovering = self.recovery.as_deref().and_then(|r| r.buckets.as_ref());
        self.slow = [moved, pinned, recovering]
            .into_iter()
            .flatten()
            .fold(None, |acc: Option<MovedSet>, m| {
                Some(acc.map_or_else(|| m.clone(), |a| a.union(m)))
            })
            .map(Box::new);
    }

    /// This plan after a restart in the middle of a transition from
    /// `committed` (the table file) to `switched` (the transition marker):
    /// every flow the two tables steer to different TMs is dropped as
    /// [`Drop::Recovering`] until [`Plan::recovered`]. The state is carried
    /// by [`Plan::carry_recovery`] into every later plan.
    pub fn recovering(mut self, committed: AllocationTable, switched: AllocationTable) -> Self {
        let buckets = match (committed.groups(), switched.groups()) {
            ([a], [b])
                if a.hash == allocation::HashMode::Endpoint
                    && b.hash == allocation::HashMode::Endpoint
                    && committed.key() == switched.key() =>
            {
                let mut set = MovedSet([0; allocation::TABLE_SIZE / 64]);
                let id =
                    |t: &AllocationTable, i: TmIndex| t.tms().get(usize::from(i)).map(|t| t.id);
                for bk in 0..allocation::TABLE_SIZE {
                    if id(&committed, a.buckets.get(bk)) != id(&switched, b.buckets.get(bk)) {
                        set.insert(bk);
                    }
                }
                Some(set)
            }
            _ => None,
        };
        self.recovery = Some(Arc::new(Recovery {
            committed,
            switched,
            buckets,
        }));
        self.rebuild_pins();
        self
    }

    /// This plan with `from`'s recovery state, if any.
    pub fn carry_recovery(mut self, from: &Plan) -> Self {
        if from.recovery.is_some() {
            self.recovery = from.recovery.clone();
            self.rebuild_pins();
        }
        self
    }

    /// This plan no longer recovering: the pins it was given place every
    /// flow of the transition again.
    pub fn recovered(mut self) -> Self {
        if self.recovery.take().is_some() {
            self.rebuild_pins();
        }
        self
    }

    /// While recovering: the committed and the switched table, and how
    /// many buckets they disagree on (when comparable).
    pub fn recovery(&self) -> Option<(&AllocationTable, &AllocationTable, Option<usize>)> {
        self.recovery.as_deref().map(|r| {
            (
                &r.committed,
                &r.switched,
                r.buckets.as_ref().map(MovedSet::len),
            )
        })
    }

    /// The switched plan, opened: flows starting from outside in moved
    /// buckets start on their new owner. No effect outside a transition.
    pub fn opened(mut self) -> Self {
        if let Some(p) = self.previous.as_mut() {
            p.open = true;
        }
        self
    }

    /// True once a transition is open (new flows start on new owners).
    pub fn is_open(&self) -> bool {
        self.previous.as_ref().is_some_and(|p| p.open)
    }

    /// This plan, a failover of the operator's `table` (and `previous`, the
    /// operator's previous table, while switched) for the TMs `failed`:
    /// control-plane bookkeeping, the steering is the plan's own tables.
    pub fn derived_from(
        mut self,
        table: AllocationTable,
        previous: Option<AllocationTable>,
        failed: Vec<u32>,
    ) -> Self {
        self.derived = Some(Arc::new(Derived {
            table,
            previous,
            failed,
        }));
        self
    }

    /// A failover plan's operator table, operator previous table (while
    /// switched) and failed TMs.
    pub fn derivation(&self) -> Option<(&AllocationTable, Option<&AllocationTable>, &[u32])> {
        self.derived
            .as_deref()
            .map(|d| (&d.table, d.previous.as_ref(), d.failed.as_slice()))
    }

    /// The operator's table this plan steers by (itself, or the one its
    /// failover table derives from).
    pub fn operator_table(&self) -> &AllocationTable {
        self.derived.as_deref().map_or(&self.table, |d| &d.table)
    }

    /// While switched: the operator's previous table.
    pub fn operator_previous(&self) -> Option<&AllocationTable> {
        let previous = self.previous()?;
        Some(
            self.derived
                .as_deref()
                .and_then(|d| d.previous.as_ref())
                .unwrap_or(previous),
        )
    }

    /// This plan without its transition (DESIGN §4 step 3, commit).
    pub fn without_previous(mut self) -> Self {
        if let Some(d) = self.derived.take() {
            self.derived = Some(Arc::new(Derived {
                table: d.table.clone(),
                previous: None,
                failed: d.failed.clone(),
            }));
        }
        self.drop_previous_routes();
        self.previous = None;
        self.rebuild_pins();
        self
    }

    fn drop_previous_routes(&mut self) {
        let n = self.table.tms().len();
        self.tm_port.truncate(n);
        self.tm_mac.truncate(n);
        self.tm_id.truncate(n);
    }

    /// The previous table while a transition is switched.
    pub fn previous(&self) -> Option<&AllocationTable> {
        self.previous.as_ref().map(|p| &p.table)
    }

    /// Buckets whose owner changed, when both tables are one
    /// endpoint-hashed group with the same key.
    pub fn moved(&self) -> Option<&MovedSet> {
        self.previous.as_ref().and_then(|p| p.moved.as_deref())
    }

    /// Route indexes: the table's TMs, then TMs only the previous table has.
    pub fn routes(&self) -> usize {
        self.tm_id.len()
    }

    /// The TM id of a route index.
    pub fn tm_id(&self, route: TmIndex) -> Option<u32> {
        self.tm_id.get(usize::from(route)).copied()
    }

    /// The route index of a TM id (a scan: transition path only).
    pub fn route_of(&self, id: u32) -> Option<TmIndex> {
        self.tm_id
            .iter()
            .position(|&i| i == id)
            .map(|i| i as TmIndex)
    }

    /// The TM behind `port` that sent a frame from `mac`: the one with that
    /// MAC on the port, or the port's only TM.
    pub fn tm_at(&self, port: PortId, mac: MacAddr) -> Option<TmIndex> {
        let mut only = None;
        let mut count = 0;
        for (i, p) in self.tm_port.iter().enumerate() {
            if *p == Some(port) {
                if self.tm_mac[i] == mac {
                    return Some(i as TmIndex);
                }
                only = Some(i as TmIndex);
                count += 1;
            }
        }
        (count == 1).then_some(only).flatten()
    }

    /// In a transition: how `flow` (steered to route `new` by the table)
    /// is affected. `None` when no transition runs or the owner did not change.
    #[inline]
    fn moved_flow(&self, flow: &Flow, new: TmIndex, start: bool) -> Option<Moved> {
        let prev = self.previous.as_ref()?;
        let old = *prev.route.get(usize::from(prev.table.steer(flow).tm))?;
        (old != new).then(|| Moved {
            key: FlowKey::of(flow),
            old,
            start: start && prev.open,
            icmp: false,
            session: flow.protocol != wire::proto::TCP && flow.ports.is_some(),
            open: prev.open,
        })
    }

    /// `flow`'s pin, `s` its steering by the table (the worker checks it
    /// still lives).
    #[inline(always)]
    fn pinned(&self, flow: &Flow, s: &allocation::Steering, syn: bool) -> Option<PinHit> {
        let pins = self.pins.as_deref()?;
        pins.lookup(s.group, s.by.bucket()?, flow, syn)
    }

    /// The allocation table.
    pub fn table(&self) -> &AllocationTable {
        &self.table
    }

    /// The group MAC.
    pub fn group_mac(&self) -> MacAddr {
        self.group_mac
    }

    /// The ports.
    pub fn ports(&self) -> &[PortKind] {
        &self.ports
    }

    /// True if `addr` is a cluster address (a VIP or a SNAT address).
    #[inline]
    pub fn owns(&self, addr: IpAddr) -> bool {
        self.cluster
            .binary_search(&allocation::hash::canonical(addr))
            .is_ok()
    }

    /// The port and MAC of TM `tm`.
    #[inline]
    pub fn tm_route(&self, tm: TmIndex) -> Option<(PortId, MacAddr)> {
        let i = usize::from(tm);
        Some((
            self.tm_port.get(i).copied().flatten()?,
            *self.tm_mac.get(i)?,
        ))
    }

    /// The hash key and buckets when the table has a single group that
    /// hashes endpoints (the common case): what the batch fast path needs.
    /// Also the buckets the fast path leaves to the general one: moved by
    /// a transition, or holding pinned flows; `None` when a transition runs
    /// between tables that cannot be compared bucket by bucket.
    #[inline]
    #[allow(clippy::type_complexity)]
    pub fn single_endpoint_group(
        &self,
    ) -> Option<(
        &allocation::HashKey,
        &allocation::Buckets,
        Option<&MovedSet>,
    )> {
        if self.previous.as_ref().is_some_and(|p| p.moved.is_none())
            || self.recovery.as_ref().is_some_and(|r| r.buckets.is_none())
        {
            return None;
        }
        match self.table.groups() {
            [g] if g.hash == allocation::HashMode::Endpoint => {
                Some((self.table.key(), &g.buckets, self.slow.as_deref()))
            }
            _ => None,
        }
    }

    /// Every TM that has a port: (index, port, MAC).
    pub fn tm_routes(&self) -> impl Iterator<Item = (TmIndex, PortId, MacAddr)> + '_ {
        (0..self.tm_port.len()).filter_map(|i| {
            let (p, m) = self.tm_route(i as TmIndex)?;
            Some((i as TmIndex, p, m))
        })
    }
}

impl allocation::Versioned for Plan {
    fn version(&self) -> u64 {
        self.table.version()
    }
}

/// Identifies the fragments of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The protocol named by the fragment header.
    pub proto: u8,
    /// Identification.
    pub id: u32,
}

/// The steering's verdict on one frame, before the worker's state (fragment
/// memory, MAC learning) is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Steer to a TM. `remember`: the first fragment of a datagram whose
    /// later fragments must follow.
    ToTm {
        /// TM index.
        tm: TmIndex,
        /// Deciding branch.
        branch: Branch,
        /// Key to remember for later fragments.
        remember: Option<FragKey>,
        /// A flow in a bucket a transition moved: the worker decides.
        moved: Option<Moved>,
        /// A pinned flow: if the pin still lives ([`PinSet::alive`]), it
        /// goes there instead, whatever `tm` and `moved` say.
        pin: Option<PinHit>,
    },
    /// Bridge (MAC learning decides the port).
    Bridge(Branch),
    /// Bridge, and remember that the flow `key` (in a moved bucket) was
    /// started by route `tm`: a TM's SYN toward a server during a transition.
    BridgeStarted {
        /// Deciding branch.
        branch: Branch,
        /// The flow.
        key: FlowKey,
        /// The TM that sent it.
        tm: TmIndex,
    },
    /// The frame was rewritten into a reply of `len` bytes.
    Reply {
        /// New length.
        len: usize,
        /// Deciding branch.
        branch: Branch,
    },
    /// Deliver to every TM (an ARP/ND answer to a TM's question).
    ToAllTms,
    /// A non-first fragment: follow its datagram's first fragment.
    Follow(FragKey),
    /// Drop.
    Drop(Drop),
}

/// What the steering writes into the frame before it goes: the one side
/// effect of the rule, said by [`classify`] and done by [`apply`]. Offsets
/// are the frame's (`l3`: where the layer-3 header starts); addresses the
/// rewrite needs are read from the frame itself, so a decision stays a few
/// words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Nothing: the frame goes as it came (the worker still sets a TM's
    /// destination MAC when it sends the frame to a TM).
    None,
    /// The source MAC becomes the group MAC (a TM's frame from a cluster address).
    SrcMac,
    /// A TM's ARP about a cluster address: the sender hardware address and
    /// the source MAC become the group MAC.
    ArpSender {
        /// The ARP header.
        l3: u32,
    },
    /// An ARP request for a cluster address becomes the group MAC's reply,
    /// in place (same length).
    ArpReply {
        /// The ARP header.
        l3: u32,
    },
    /// A neighbour solicitation (IPv6 header at `l3`, no extension headers)
    /// for a cluster address becomes the group MAC's solicited
    /// advertisement of its target to its source, [`REPLY_ND_BYTES`] after
    /// `l3` (the buffer must hold it).
    NdAdvert {
        /// The IPv6 header.
        l3: u32,
        /// The solicitor's link-layer address (its option, or the frame's source MAC).
        to: MacAddr,
    },
    /// A TM's NS/NA from a cluster address (IPv6 header at `l3`): the source
    /// MAC and the link-layer address option become the group MAC, the
    /// ICMPv6 checksum is recomputed.
    NdOption {
        /// The IPv6 header (the checksum's addresses).
        l3: u32,
        /// The ICMPv6 message: `msg.0..msg.1` of the frame.
        msg: (u32, u32),
        /// The option's MAC, at this offset of the message.
        mac_at: u32,
    },
}

/// Bytes of an ND reply after the IPv6 header's start: the header and a
/// neighbour advertisement with its target link-layer address option.
pub const REPLY_ND_BYTES: usize = wire::ipv6::HEADER + 32;

/// The steering rule's answer for one frame, computed from its bytes and
/// the plan alone: the verdict, and what to write into the frame for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Where the frame goes (before the worker's state is consulted).
    pub verdict: Verdict,
    /// What [`apply`] writes.
    pub rewrite: Rewrite,
}

/// Decides what to do with the frame in `buf[..len]` that came in on
/// `ingress`, and does it: [`classify`], then [`apply`]. `buf` may be
/// longer than the frame: an ND reply grows into it (with no room for it,
/// the frame is dropped, [`Drop::NoRoomForReply`]).
#[inline]
pub fn decide(buf: &mut [u8], len: usize, ingress: PortId, plan: &Plan) -> Verdict {
    let Some(frame) = buf.get(..len) else {
        return Verdict::Drop(Drop::Truncated);
    };
    let mut rw = Rewrite::None;
    let verdict = steer_frame(frame, ingress, plan, &mut rw);
    match rewrite(buf, len, rw, plan.group_mac) {
        Ok(()) => verdict,
        Err(drop) => Verdict::Drop(drop),
    }
}

/// The steering rule (DESIGN §2) as a pure function: what to do with
/// `frame`, which came in on `ingress`, under `plan`. Nothing is written;
/// the batch fast path (`worker.rs`) and the XDP program (`distributor`'s
/// `xdp_steer`) are projections of this function's endpoint branch, held
/// equal to it by property tests.
#[inline]
pub fn classify(frame: &[u8], ingress: PortId, plan: &Plan) -> Decision {
    let mut rewrite = Rewrite::None;
    let verdict = steer_frame(frame, ingress, plan, &mut rewrite);
    Decision { verdict, rewrite }
}

/// [`classify`]'s work, its rewrite written to `rw` (left as it is when
/// there is none): the verdict of the common case goes straight back to the
/// caller, with nothing around it to copy.
#[inline]
fn steer_frame(frame: &[u8], ingress: PortId, plan: &Plan, rw: &mut Rewrite) -> Verdict {
    let eth = match EthernetFrame::new_checked(frame) {
        Ok(e) => e,
        Err(d) => return Verdict::Drop(d),
    };
    let (l3, ty, dst_mac) = (eth.payload_offset(), eth.ethertype(), eth.dst());
    match plan.ports.get(usize::from(ingress)) {
        Some(PortKind::Outside) => from_outside(frame, l3, ty, dst_mac, plan, rw),
        Some(PortKind::Tm) => from_tm(frame, ingress, l3, ty, plan, rw),
        _ => Verdict::Bridge(Branch::Bridge),
    }
}

/// Writes `d`'s rewrite into the frame `buf[..len]` (a reply may grow into
/// the rest of `buf`) and returns its verdict; `d` must be [`classify`]'s
/// answer for this frame. The offsets were checked against the frame by
/// `classify`; checked again here, so a mismatched frame is dropped as
/// truncated, never written out of bounds.
#[inline]
pub fn apply(buf: &mut [u8], len: usize, d: &Decision, group: MacAddr) -> Verdict {
    match rewrite(buf, len, d.rewrite, group) {
        Ok(()) => d.verdict,
        Err(drop) => Verdict::Drop(drop),
    }
}

/// Writes `r` into the frame `buf[..len]`; the drop reason if it cannot be.
#[inline]
fn rewrite(buf: &mut [u8], len: usize, r: Rewrite, group: MacAddr) -> Result<(), Drop> {
    let done = match r {
        Rewrite::None => return Ok(()),
        Rewrite::SrcMac => set_src(buf, len, group),
        Rewrite::ArpSender { l3 } => put(buf, len, l3 as usize + wire::arp::SHA.start, &group.0)
            .and_then(|()| set_src(buf, len, group)),
        Rewrite::ArpReply { l3 } => arp_reply(buf, len, l3 as usize, group),
        Rewrite::NdAdvert { l3, to } => {
            if buf.len() < l3 as usize + REPLY_ND_BYTES {
                return Err(Drop::NoRoomForReply);
            }
            nd_advert(buf, len, l3 as usize, to, group)
        }
        Rewrite::NdOption { l3, msg, mac_at } => set_src(buf, len, group)
            .and_then(|()| write_nd_option(buf, len, l3 as usize, msg, mac_at as usize, group)),
    };
    done.ok_or(Drop::Truncated)
}

/// The IPv6 address at `at` of the frame.
#[inline(always)]
fn ipv6_at(frame: &[u8], at: usize) -> Option<Ipv6Addr> {
    let b: [u8; 16] = frame.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(b))
}

/// `frame[at..at + bytes.len()] = bytes`, within the frame's `len`.
#[inline(always)]
fn put(buf: &mut [u8], len: usize, at: usize, bytes: &[u8]) -> Option<()> {
    let end = at.checked_add(bytes.len()).filter(|&e| e <= len)?;
    buf.get_mut(at..end)?.copy_from_slice(bytes);
    Some(())
}

#[inline(always)]
fn set_src(buf: &mut [u8], len: usize, group: MacAddr) -> Option<()> {
    put(buf, len, wire::eth::SRC.start, &group.0)
}

#[inline(always)]
fn parse_ip(frame: &[u8], ty: u16) -> Option<Result<IpHeader, Drop>> {
    match ty {
        ethertype::IPV4 => Some(wire::parse_ipv4(frame)),
        ethertype::IPV6 => Some(wire::parse_ipv6(frame)),
        _ => None,
    }
}

#[inline]
fn from_outside(
    frame: &[u8],
    l3: usize,
    ty: u16,
    dst_mac: MacAddr,
    plan: &Plan,
    rw: &mut Rewrite,
) -> Verdict {
    if ty == ethertype::ARP {
        let arp = match ArpPacket::new_checked(&frame[l3..]) {
            Ok(a) => a,
            Err(d) => return Verdict::Drop(d),
        };
        let (oper, tpa) = (arp.oper(), IpAddr::V4(arp.tpa()));
        if oper == wire::arp::REQUEST && plan.owns(tpa) {
            *rw = Rewrite::ArpReply { l3: l3 as u32 };
            return Verdict::Reply {
                len: frame.len(),
                branch: Branch::ArpReply,
            };
        }
        if oper == wire::arp::REPLY && plan.owns(tpa) {
            return Verdict::ToAllTms;
        }
        return Verdict::Bridge(Branch::Bridge);
    }
    let ip = match parse_ip(&frame[l3..], ty) {
        None => return Verdict::Bridge(Branch::Bridge),
        Some(Err(d)) => return Verdict::Drop(d),
        Some(Ok(ip)) => ip,
    };
    let first_or_whole = ip.frag.is_none_or(|f| f.is_first());
    if ip.proto == proto::ICMPV6 && first_or_whole {
        if let Some(v) = neighbour_from_outside(frame, l3, &ip, plan, rw) {
            return v;
        }
    }
    if dst_mac != plan.group_mac {
        return Verdict::Bridge(Branch::Bridge);
    }
    if let Some(f) = ip.frag {
        let key = FragKey {
            src: ip.src,
            dst: ip.dst,
            proto: f.next,
            id: f.id,
        };
        if !f.is_first() {
            return Verdict::Follow(key);
        }
        return match steer_ip(&frame[l3..], &ip, plan) {
            Verdict::ToTm {
                tm,
                branch,
                moved,
                pin,
                ..
            } => Verdict::ToTm {
                tm,
                branch,
                remember: Some(key),
                moved,
                pin,
            },
            other => other,
        };
    }
    steer_ip(&frame[l3..], &ip, plan)
}

/// Steers an IP packet (whole, or a first fragment) for the cluster.
#[inline]
fn steer_ip(packet: &[u8], ip: &IpHeader, plan: &Plan) -> Verdict {
    let l4 = &packet[ip.l4.min(ip.end)..ip.end];
    let v6 = ip.src.is_ipv6();
    let is_icmp = (ip.proto == proto::ICMP && !v6) || (ip.proto == proto::ICMPV6 && v6);
    if is_icmp && l4.first().is_some_and(|&t| icmp::is_error(v6, t)) {
        let inner = l4.get(icmp::ERROR_PAYLOAD..).unwrap_or(&[]);
        let parsed = if v6 {
            wire::parse_ipv6_embedded(inner)
        } else {
            wire::parse_ipv4_embedded(inner)
        };
        let Ok(inner_ip) = parsed else {
            return Verdict::Drop(Drop::IcmpInnerTruncated);
        };
        let flow = if wire::has_ports(inner_ip.proto) {
            match wire::ports(&inner[inner_ip.l4.min(inner_ip.end)..inner_ip.end]) {
                Some((s, d)) => Flow::with_ports(inner_ip.proto, inner_ip.src, s, inner_ip.dst, d),
                None => return Verdict::Drop(Drop::IcmpInnerTruncated),
            }
        } else {
            Flow::without_ports(inner_ip.proto, inner_ip.src, inner_ip.dst)
        };
        if plan.recovery.as_ref().is_some_and(|r| r.disagrees(&flow)) {
            return Verdict::Drop(Drop::Recovering);
        }
        let s = plan.table.steer(&flow);
        return Verdict::ToTm {
            tm: s.tm,
            branch: Branch::IcmpError,
            remember: None,
            moved: plan
                .moved_flow(&flow, s.tm, false)
                .map(|m| Moved { icmp: true, ..m }),
            pin: plan.pinned(&flow, &s, false),
        };
    }
    let flow = if wire::has_ports(ip.proto) {
        match wire::ports(l4) {
            Some((s, d)) => Flow::with_ports(ip.proto, ip.src, s, ip.dst, d),
            None => return Verdict::Drop(Drop::Truncated),
        }
    } else {
        Flow::without_ports(ip.proto, ip.src, ip.dst)
    };
    if plan.recovery.as_ref().is_some_and(|r| r.disagrees(&flow)) {
        return Verdict::Drop(Drop::Recovering);
    }
    let s = plan.table.steer(&flow);
    let syn = ip.frag.is_none() && is_tcp_syn(ip.proto, l4);
    let branch = match s.by {
        SteerBy::EqualPorts => Branch::EqualPorts,
        SteerBy::Endpoint { .. } => Branch::Endpoint,
        SteerBy::Address { .. } => Branch::Address,
        SteerBy::NoPorts { .. } => Branch::NoPorts,
    };
    let moved = match plan.previous {
        None => None,
        Some(_) => plan.moved_flow(&flow, s.tm, syn),
    };
    Verdict::ToTm {
        tm: s.tm,
        branch,
        remember: None,
        moved,
        pin: plan.pinned(&flow, &s, syn),
    }
}

/// A TCP segment that opens a connection: SYN without ACK.
#[inline]
fn is_tcp_syn(protocol: u8, l4: &[u8]) -> bool {
    protocol == proto::TCP && l4.get(13).is_some_and(|&f| f & 0x12 == 0x02)
}

/// ARP request → reply in place: the group MAC answers for the cluster address.
fn arp_reply(buf: &mut [u8], len: usize, l3: usize, group: MacAddr) -> Option<()> {
    let a = buf.get_mut(l3..len)?.get_mut(..wire::arp::TPA.end)?;
    let mut requester = [0u8; 6];
    requester.copy_from_slice(&a[wire::arp::SHA]);
    let mut asked = [0u8; 4];
    asked.copy_from_slice(&a[wire::arp::TPA]);
    a[wire::arp::OPER..wire::arp::OPER + 2].copy_from_slice(&wire::arp::REPLY.to_be_bytes());
    let (spa_start, spa_end) = (wire::arp::SPA.start, wire::arp::SPA.end);
    a.copy_within(wire::arp::SHA.start..spa_end, wire::arp::THA.start);
    a[wire::arp::SHA].copy_from_slice(&group.0);
    a[spa_start..spa_end].copy_from_slice(&asked);
    put(buf, len, wire::eth::DST.start, &requester)?;
    set_src(buf, len, group)
}

/// Neighbour discovery from outside: a solicitation for a cluster address
/// is answered with the group MAC; an advertisement of someone else's
/// address sent to the group (the answer to a TM's solicitation) goes to
/// every TM. `None`: not ND, or nothing special to do.
fn neighbour_from_outside(
    frame: &[u8],
    l3: usize,
    ip: &IpHeader,
    plan: &Plan,
    rw: &mut Rewrite,
) -> Option<Verdict> {
    let msg = frame.get(l3 + ip.l4..l3 + ip.end)?;
    let ty = *msg.first()?;
    if ty != icmp::NS && ty != icmp::NA {
        return None;
    }
    if msg.len() < icmp::ND_OPTIONS {
        return Some(Verdict::Drop(Drop::Truncated));
    }
    let mut t = [0u8; 16];
    t.copy_from_slice(&msg[icmp::ND_TARGET..icmp::ND_TARGET + 16]);
    let target = Ipv6Addr::from(t);
    if ty == icmp::NA {
        return (plan.owns(ip.dst) && !plan.owns(IpAddr::V6(target))).then_some(Verdict::ToAllTms);
    }
    let IpAddr::V6(solicitor) = ip.src else {
        return None;
    };
    // Only plain solicitations (no extension headers) from an assigned address.
    if !plan.owns(IpAddr::V6(target)) || solicitor.is_unspecified() || ip.l4 != wire::ipv6::HEADER {
        return None;
    }
    let to = wire::nd_lla_option(&msg[icmp::ND_OPTIONS..], icmp::OPT_SLLA)
        .map(|(_, m)| m)
        .unwrap_or_else(|| {
            EthernetFrame::new_checked(frame)
                .map(|e| e.src())
                .unwrap_or_default()
        });
    *rw = Rewrite::NdAdvert { l3: l3 as u32, to };
    Some(Verdict::Reply {
        len: l3 + REPLY_ND_BYTES,
        branch: Branch::NdReply,
    })
}

/// Writes the group MAC's solicited advertisement over the solicitation
/// in `buf[..len]` (IPv6 header at `l3`, the message right after it), to
/// `to`; `buf` holds `l3 + REPLY_ND_BYTES`.
fn nd_advert(buf: &mut [u8], len: usize, l3: usize, to: MacAddr, group: MacAddr) -> Option<()> {
    let frame = buf.get(..len)?;
    let solicitor = ipv6_at(frame, l3 + wire::ipv6::SRC.start)?;
    let target = ipv6_at(frame, l3 + wire::ipv6::HEADER + icmp::ND_TARGET)?;
    let new_len = l3 + REPLY_ND_BYTES;
    // IPv6 header: src = the target, dst = the solicitor, hop limit 255, payload 32.
    let ip6 = buf.get_mut(l3..new_len)?;
    ip6[wire::ipv6::LEN..wire::ipv6::LEN + 2].copy_from_slice(&32u16.to_be_bytes());
    ip6[wire::ipv6::NEXT] = proto::ICMPV6;
    ip6[wire::ipv6::HOP] = 255;
    ip6[wire::ipv6::SRC].copy_from_slice(&target.octets());
    ip6[wire::ipv6::DST].copy_from_slice(&solicitor.octets());
    let na = &mut ip6[wire::ipv6::HEADER..];
    na[..8].copy_from_slice(&[icmp::NA, 0, 0, 0, 0x60, 0, 0, 0]); // solicited, override
    na[8..24].copy_from_slice(&target.octets());
    na[24..26].copy_from_slice(&[icmp::OPT_TLLA, 1]);
    na[26..32].copy_from_slice(&group.0);
    let sum = wire::icmpv6_checksum(&target, &solicitor, na);
    na[2..4].copy_from_slice(&sum.to_be_bytes());
    put(buf, new_len, wire::eth::DST.start, &to.0)?;
    set_src(buf, new_len, group)
}

/// Frames from a TM go toward their destination unhashed; what they say
/// about cluster addresses is said with the group MAC.
fn from_tm(
    frame: &[u8],
    ingress: PortId,
    l3: usize,
    ty: u16,
    plan: &Plan,
    rw: &mut Rewrite,
) -> Verdict {
    if ty == ethertype::ARP {
        let arp = match ArpPacket::new_checked(&frame[l3..]) {
            Ok(a) => a,
            Err(d) => return Verdict::Drop(d),
        };
        if !plan.owns(IpAddr::V4(arp.spa())) {
            return Verdict::Bridge(Branch::FromTm);
        }
        *rw = Rewrite::ArpSender { l3: l3 as u32 };
        return Verdict::Bridge(Branch::FromTmRewritten);
    }
    let ip = match parse_ip(&frame[l3..], ty) {
        None => return Verdict::Bridge(Branch::FromTm),
        Some(Err(d)) => return Verdict::Drop(d),
        Some(Ok(ip)) => ip,
    };
    let started = match plan.previous {
        Some(_) if ip.frag.is_none() => started_by_tm(frame, l3, &ip, ingress, plan),
        _ => None,
    };
    let (branch, rewrite) = if plan.owns(ip.src) {
        let nd = match ip.proto == proto::ICMPV6 && ip.frag.is_none() {
            true => nd_option(frame, l3, &ip),
            false => None,
        };
        (Branch::FromTmRewritten, nd.unwrap_or(Rewrite::SrcMac))
    } else {
        (Branch::FromTm, Rewrite::None)
    };
    *rw = rewrite;
    match started {
        Some((key, tm)) => Verdict::BridgeStarted { branch, key, tm },
        None => Verdict::Bridge(branch),
    }
}

/// During a transition, a TCP SYN a TM sends (e.g. a DNAT-only connection
/// toward a server), or any datagram of a UDP-like session, in a moved
/// bucket: the flow and the TM that sent it, to be remembered so that the
/// server's answers reach that TM.
fn started_by_tm(
    frame: &[u8],
    l3: usize,
    ip: &IpHeader,
    ingress: PortId,
    plan: &Plan,
) -> Option<(FlowKey, TmIndex)> {
    let l4 = frame.get(l3 + ip.l4..l3 + ip.end)?;
    // A TCP connection starts with its SYN; a UDP (or other handshake-free)
    // session with any datagram the TM sends: a new owner's first query to
    // a server must be remembered on a distributor still switched, or the
    // answer would go to the old owner.
    let session = ip.proto != proto::TCP && wire::has_ports(ip.proto);
    if !session && !is_tcp_syn(ip.proto, l4) {
        return None;
    }
    let (s, d) = wire::ports(l4)?;
    let flow = Flow::with_ports(ip.proto, ip.src, s, ip.dst, d);
    let src_mac = EthernetFrame::new_checked(frame).ok()?.src();
    let tm = plan.tm_at(ingress, src_mac)?;
    // Remembered in both phases of the switch, whatever `moved_flow` says
    // of starts from outside.
    let m = plan.moved_flow(&flow, plan.table.steer(&flow).tm, false)?;
    Some((m.key, tm))
}

/// In a TM's NS/NA from a cluster address, where its link-layer address
/// option is (to become the group MAC, the ICMPv6 checksum recomputed).
/// `None`: not NS/NA, or no such option.
fn nd_option(frame: &[u8], l3: usize, ip: &IpHeader) -> Option<Rewrite> {
    if !ip.src.is_ipv6() {
        return None;
    }
    let msg = frame.get(l3 + ip.l4..l3 + ip.end)?;
    let opt = match msg.first() {
        Some(&icmp::NS) => icmp::OPT_SLLA,
        Some(&icmp::NA) => icmp::OPT_TLLA,
        _ => return None,
    };
    let (at, _) = wire::nd_lla_option(msg.get(icmp::ND_OPTIONS..)?, opt)?;
    let offset = |o: usize| u32::try_from(o).ok();
    Some(Rewrite::NdOption {
        l3: offset(l3)?,
        msg: (offset(l3 + ip.l4)?, offset(l3 + ip.end)?),
        mac_at: offset(icmp::ND_OPTIONS + at + 2)?,
    })
}

/// The group MAC into a TM's NS/NA link-layer option (see [`Rewrite::NdOption`]).
fn write_nd_option(
    buf: &mut [u8],
    len: usize,
    l3: usize,
    (start, end): (u32, u32),
    mac_at: usize,
    group: MacAddr,
) -> Option<()> {
    let frame = buf.get(..len)?;
    let src = ipv6_at(frame, l3 + wire::ipv6::SRC.start)?;
    let dst = ipv6_at(frame, l3 + wire::ipv6::DST.start)?;
    let msg = buf.get_mut(start as usize..(end as usize).min(len))?;
    msg.get_mut(mac_at..mac_at + 6)?.copy_from_slice(&group.0);
    msg.get_mut(2..4)?.copy_from_slice(&[0, 0]);
    let sum = wire::icmpv6_checksum(&src, &dst, msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(())
}
