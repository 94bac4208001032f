//! The simulation engine: clients, front and back distributors, traffic managers and servers exchanging real frames in virtual time.
//!
//! What is real: every frame is built as Ethernet/IP bytes and steered by
//! the `distributor` crate's `Worker` under a `Plan` (the same code `stdd`
//! runs), the transition memory included; every TM picks its self-source
//! ports with `tm_core::snat::Snat` (the same allocator `tmd` uses), and
//! retables it on prepare, commit and failover; tables are built, rebalanced
//! and failed over by the `allocation` crate. What is modelled: the TMs'
//! connection bookkeeping and the endpoints (TCP-like flows: SYN, SYN-ACK,
//! requests and responses, FIN; UDP sessions with optionally fragmented
//! requests), link delays, and the operator driving the transition protocol
//! (DESIGN §4) over all nodes.
//!
//! Which TM a frame reached is read back from the bytes the distributor
//! produced (its destination MAC and port); which flow it belongs to from
//! its addresses, ports, fragment id or embedded header. A flow whose
//! packets reach two TMs is a split flow; the TM that sees a packet of a
//! connection it does not own would reset it, so the flow is broken there.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, GroupSpec, HashKey, MacAddr, Tm, TmIndex};
use control::api::{
    AbortAnswer, CommitAnswer, DistributorPhase, DistributorTransition, HeldPort, StepRequest,
    TableId, TmPhase, TmPins, TmTransition,
};
use control::coordinator::{self, Answer, Call, CallError, NodeId, Outcome, Push, PushSpec};
use datapath::build::{self, tcp_flags, L2};
use datapath::pins::Pin;
use datapath::transit::TransitConfig;
use datapath::wire::{self, EthernetFrame};
use datapath::{Action, Plan, PortKind, Worker, WorkerConfig};
use fnv::FnvHashMap;
use tm_core::snat::{ConnectError, Lease, Snat};
use tm_core::tables::Tables;

use crate::report::{EventReport, PhaseReport, Report, TmShare};
use crate::scenario::{Event, Family, PortPattern, Scenario};
use crate::stats::{self, Rng};

/// The cluster's group MAC.
pub const GROUP: MacAddr = MacAddr([0x02, 0x53, 0x54, 0x44, 0, 1]);
const CLIENT_ROUTER: MacAddr = MacAddr([0x02, 0xc0, 0, 0, 0, 1]);
const SERVER_ROUTER: MacAddr = MacAddr([0x02, 0x5e, 0, 0, 0, 1]);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
const SNAT4: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x100);
const SERVERS: usize = 4;

/// One-way delay between clients and the cluster, ns.
const CLIENT_DELAY: u64 = 500_000;
/// One-way delay between the cluster and the servers, ns.
const SERVER_DELAY: u64 = 100_000;
/// How long one admin call of the coordinator takes (so distributors do
/// not switch, open or commit at once), ns.
const CALL_NS: u64 = 200_000;
/// How often the coordinator asks the TMs whether old owners have drained, ns.
const CHECK_NS: u64 = 10_000_000;
/// A killed coordinator's push is run again this long after, ns.
const RESUME_NS: u64 = 50_000_000;
/// Committed tables a distributor keeps for `stdctl rollback` (stdd's history).
const HISTORY: usize = 8;
/// A distributor's health probe interval: a TM still down when a table
/// gives it buckets again is failed over again this long after, ns.
const PROBE_NS: u64 = 20_000_000;
/// How often the operator pushes again a push that stopped (the dead TM's
/// state unknown before every distributor failed it over).
const PUSH_AGAIN: u32 = 3;
/// Ports 1.. of every distributor face TM ids 0..; room for TMs added later.
const MAX_TM_IDS: u32 = 250;

/// A TM's MAC (the one the distributors write for it).
pub fn tm_mac(id: u32) -> MacAddr {
    MacAddr([0x02, 0x53, 0x54, 0, (id >> 8) as u8, id as u8 + 1])
}

fn vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP4)
    }
}

fn snat_addrs() -> [IpAddr; 2] {
    [IpAddr::V4(SNAT4), IpAddr::V6(SNAT6)]
}

fn server(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, i as u16 + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 2, 0, i as u8 + 1))
    }
}

fn router(v6: bool, server_side: bool) -> IpAddr {
    match (v6, server_side) {
        (false, false) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        (false, true) => IpAddr::V4(Ipv4Addr::new(10, 2, 255, 1)),
        (true, false) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1)),
        (true, true) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0xff, 0, 0, 0, 1)),
    }
}

fn client_addr(v6: bool, i: u64) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xc,
            0,
            0,
            (i >> 32) as u16,
            (i >> 16) as u16,
            i as u16,
        ))
    } else {
        // 100.64.0.0/10 holds 4M clients; beyond, wrap (a client reused).
        let n = 0x6440_0000u32 | (i as u32 & 0x003f_ffff);
        IpAddr::V4(Ipv4Addr::from(n))
    }
}

/// Which side of the cluster a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Front,
    Back,
}

/// What a step of a flow does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Syn,
    Request,
    Fin,
    SynAck,
    Response,
    FinAck,
    UdpRequest,
    UdpResponse,
    TooBig,
}

/// The operator's (and the failure detector's) actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    /// The transition coordinator's next step.
    Coordinate,
    /// A second coordinator runs the push a killed one left.
    Resume,
    /// Detection of TM `id`'s failure (its event's index; whether the
    /// failure waited for the cluster to be idle and holds `busy`).
    Failover(u32, usize, bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive,
    Flow(u64, usize, Step),
    Op(Op),
    /// A finished UDP session's idle timeout at its TM (by serial).
    IdleOut(u64),
}

/// A flow's packets are found again by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// Client side: protocol, client address and port.
    Client(u8, IpAddr, u16),
    /// Server side: protocol, SNAT address and port, server address and
    /// port (TMs of different groups may hold the same SNAT port toward
    /// servers whose replies their groups' rules tell apart).
    Server(u8, IpAddr, u16, IpAddr, u16),
    /// A non-first fragment: source and identification.
    Frag(IpAddr, u32),
}

#[derive(Debug)]
struct FlowSt {
    serial: u64,
    tcp: bool,
    v6: bool,
    client: (IpAddr, u16),
    vip_port: u16,
    server: (IpAddr, u16),
    lease: Option<Lease>,
    /// DNAT-only: the server side runs from the client's own endpoint.
    kept: bool,
    /// The TM that holds the lease.
    lease_tm: u32,
    owner: Option<u32>,
    rounds: u8,
    think_ns: u64,
    frag: bool,
    icmp: bool,
    phase: Option<usize>,
    ip_id: u32,
    /// Its registration in its TM's `Tables`: (TM id, connection id).
    conn: Option<(u32, u64)>,
}

#[derive(Debug)]
struct TmSt {
    id: u32,
    alive: bool,
    snat: Arc<Snat>,
    /// In a source-affinity group: TCP connections keep the client's
    /// endpoint toward the server when its reply comes home (tmd's
    /// `dnat_only`), else fall back to a self-source port.
    dnat_only: bool,
    /// Its open TCP connections and tables: tmd's own bookkeeping
    /// (`tm_core::tables::Tables`), which answers what moves in a transition.
    tables: Tables,
    /// Prepared for the next table (the coordinator's prepare reached it).
    prepared: bool,
    /// Committed the next table (the push is not over yet).
    committed: bool,
}

#[derive(Debug)]
struct Dist {
    worker: Worker,
    plan: Plan,
}

/// How a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Done,
    Refused(&'static str),
    Broken(&'static str),
}

/// A lease as the port checks see it: (protocol, SNAT address, port, TM id, server endpoint).
type HeldLease = (u8, IpAddr, u16, u32, (IpAddr, u16));

/// A scenario in progress.
#[derive(Debug)]
pub struct Sim {
    sc: Scenario,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    table: AllocationTable,
    next: Option<AllocationTable>,
    front: Vec<Dist>,
    back: Vec<Dist>,
    tms: Vec<TmSt>,
    flows: Vec<Option<FlowSt>>,
    free: Vec<usize>,
    keys: FnvHashMap<Key, usize>,
    /// (protocol, SNAT address, port, TM id, server) of every lease held:
    /// a TM handed one twice toward the same server is a collision (ports
    /// are leased per server endpoint: toward two servers they may be
    /// shared — the 4-tuples differ).
    held: fnv::FnvHashSet<HeldLease>,
    arrived: u64,
    next_event: usize,
    pending: Vec<Event>,
    busy: bool,
    commits: u64,
    /// The push in progress: the shared coordinator, and when it started.
    push: Option<(Push, u64)>,
    /// A distributor of the push in progress has committed.
    committing: bool,
    /// The tables commits and swaps replaced, oldest first (at most [`HISTORY`]).
    history: Vec<AllocationTable>,
    /// The coordinator dies after this many more calls.
    kill_after: Option<u32>,
    /// The push in progress: its event's index in the report.
    push_event: Option<usize>,
    /// Times the push in progress stopped and was pushed again.
    pushed_again: u32,
    /// Failed TMs the distributors have detected (until they return).
    detected: Vec<u32>,
    phase: Option<usize>,
    released: Vec<(u32, Vec<u8>)>,
    /// Finished UDP sessions their TMs still hold, by serial.
    lingering: FnvHashMap<u64, FlowSt>,
    /// Results so far.
    report: Report,
    progress: Option<Progress>,
}

/// A progress callback: (flows started, flows in the scenario).
struct Progress(Box<dyn FnMut(u64, u64)>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Why a scenario cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The table could not be built or changed.
    #[error("table: {0}")]
    Table(#[from] allocation::TableError),
    /// Self-source ports could not be set up.
    #[error("self-source ports: {0}")]
    Ports(#[from] allocation::PortError),
    /// A distributor plan could not be built.
    #[error("plan: {0}")]
    Plan(#[from] datapath::PlanError),
    /// The scenario itself is inconsistent.
    #[error("scenario: {0}")]
    Scenario(String),
}

fn bad(msg: impl Into<String>) -> SimError {
    SimError::Scenario(msg.into())
}

/// The distributor plan for `table` (port 0 outside, port 1 + id for TM id).
fn plan(table: AllocationTable) -> Result<Plan, SimError> {
    let mut ports = vec![PortKind::Outside];
    ports.extend((0..MAX_TM_IDS).map(|_| PortKind::Tm));
    let map: Vec<(u32, u16)> = (0..MAX_TM_IDS).map(|id| (id, id as u16 + 1)).collect();
    let mut cluster = vec![vip(false), vip(true)];
    cluster.extend(snat_addrs());
    Ok(Plan::new(table, GROUP, &cluster, ports, &map)?)
}

fn tm_entry(id: u32) -> Tm {
    Tm {
        id,
        name: format!("tm{id}"),
        mac: tm_mac(id),
        weight: 1,
        group: 0,
    }
}

fn index_of(table: &AllocationTable, id: u32) -> Result<TmIndex, SimError> {
    table.tm_index_by_id(id).ok_or_else(|| {
        bad(format!(
            "TM {id} is not in table version {}",
            table.version()
        ))
    })
}

/// Sets a TM's `Tables` as tmd's admin endpoint does: the running table,
/// and the next one while prepared.
fn set_tables(t: &Tables, current: &AllocationTable, next: Option<&AllocationTable>) {
    *t.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(current.clone());
    *t.next.lock().unwrap_or_else(|p| p.into_inner()) = next.map(|n| Arc::new(n.clone()));
}

/// True if a coordinator's open or commit is for the table `id` (a step
/// that names none is for the running transition, as on stdd).
fn step_is_for(req: &StepRequest, id: &TableId) -> Result<bool, SimError> {
    Ok(req.table().map_err(bad)?.is_none_or(|t| t == *id))
}

/// `plan` with the pins `req` carries, as stdd installs them (the pins in
/// force stay when it carries none).
fn with_pins(plan: Plan, req: &StepRequest, now: u64, capacity: usize) -> Result<Plan, SimError> {
    if req.pins.is_none() {
        return Ok(plan);
    }
    let pins = datapath::pins::installed_at(&req.pinned_flows().map_err(bad)?, now);
    Ok(plan.with_pins(pins.into(), capacity))
}

/// The TMs' UDP idle timeout (tmd's `idle_timeout_ms` for the DNS-like service).
const UDP_IDLE_NS: u64 = 1_000_000_000;

/// The TM id that owns the bucket of `flow` under `table`.
fn owner(table: &AllocationTable, flow: &Flow) -> u32 {
    table.tms()[usize::from(table.steer(flow).tm)].id
}

impl Sim {
    /// Sets up the cluster of `sc`: the table, distributors and TMs.
    pub fn new(sc: Scenario) -> Result<Self, SimError> {
        if sc.tms == 0 || sc.tms > 64 {
            return Err(bad("tms must be 1 to 64"));
        }
        if sc.distributors == 0 || sc.distributors > 16 {
            return Err(bad("distributors must be 1 to 16"));
        }
        if sc.arrival_ns == 0 {
            return Err(bad("arrival_ns must be positive"));
        }
        for e in &sc.events {
            if !(0.0..=1.0).contains(&e.at) {
                return Err(bad(format!(
                    "event '{}' at {}: must be 0 to 1",
                    e.what, e.at
                )));
            }
        }
        let mut rng = Rng::new(sc.seed);
        let mut key = [0u8; 16];
        for c in key.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_be_bytes());
        }
        let mut tms: Vec<Tm> = (0..sc.tms).map(tm_entry).collect();
        let mut groups = vec![GroupSpec::default_group(sc.profile.clone())];
        if let Some(p) = &sc.partition {
            if p.source_affinity.is_some()
                && !p
                    .rules
                    .iter()
                    .all(|r| r.protocol.map(|x| x.0) == Some(proto::TCP))
            {
                return Err(bad(
                    "a source-affinity partition needs TCP-only rules: its TMs are DNAT-only, which UDP sessions are not",
                ));
            }
            for t in tms.iter_mut().filter(|t| p.tms.contains(&t.id)) {
                t.group = 1;
            }
            groups.push(GroupSpec {
                name: "part".into(),
                rules: p.rules.clone(),
                hash: p.hash(),
                profile: sc.profile.clone(),
            });
        }
        let dnat_only = |id: u32| {
            sc.partition
                .as_ref()
                .is_some_and(|p| p.source_affinity.is_some() && p.tms.contains(&id))
        };
        let table = AllocationTable::new(1, HashKey::from_bytes(key), tms, groups)?;
        let mk = |i: u64| -> Result<Dist, SimError> {
            Ok(Dist {
                worker: Worker::new(
                    WorkerConfig {
                        transit: TransitConfig {
                            capacity: sc.transit_memory,
                            ..TransitConfig::default()
                        },
                        ..WorkerConfig::default()
                    },
                    HashKey::from_bytes([i as u8 + 1; 16]),
                ),
                plan: plan(table.clone())?,
            })
        };
        let front = (0..u64::from(sc.distributors))
            .map(mk)
            .collect::<Result<_, _>>()?;
        let back = (0..u64::from(sc.distributors))
            .map(|i| mk(i + 100))
            .collect::<Result<_, _>>()?;
        let tms = (0..sc.tms)
            .map(|id| {
                Ok(TmSt {
                    id,
                    alive: true,
                    snat: Arc::new(Snat::new(
                        &table,
                        index_of(&table, id)?,
                        &snat_addrs(),
                        sc.snat_range,
                    )?),
                    dnat_only: dnat_only(id),
                    tables: Tables::new(id, table.clone()),
                    prepared: false,
                    committed: false,
                })
            })
            .collect::<Result<_, SimError>>()?;
        let mut events = sc.events.clone();
        events.sort_by(|a, b| a.at.total_cmp(&b.at));
        let report = Report::new(sc.clone());
        let mut sim = Sim {
            sc: Scenario { events, ..sc },
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            table,
            next: None,
            front,
            back,
            tms,
            flows: Vec::new(),
            free: Vec::new(),
            keys: FnvHashMap::default(),
            held: fnv::FnvHashSet::default(),
            arrived: 0,
            next_event: 0,
            pending: Vec::new(),
            busy: false,
            commits: 0,
            push: None,
            committing: false,
            history: Vec::new(),
            kill_after: None,
            push_event: None,
            pushed_again: 0,
            detected: Vec::new(),
            lingering: FnvHashMap::default(),
            phase: Some(0),
            released: Vec::new(),
            report,
            progress: None,
        };
        sim.open_phase("start");
        Ok(sim)
    }

    /// Calls `f(flows started, flows total)` now and then.
    pub fn on_progress(&mut self, f: impl FnMut(u64, u64) + 'static) {
        self.progress = Some(Progress(Box::new(f)));
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, ev)));
    }

    /// Runs the scenario to its end and returns the report.
    pub fn run(mut self) -> Result<Report, SimError> {
        let wall = Instant::now();
        if self.sc.flows > 0 {
            self.at(0, Ev::Arrive);
        }
        while let Some(Reverse((t, _, ev))) = self.queue.pop() {
            self.now = t;
            match ev {
                Ev::Arrive => self.arrive()?,
                Ev::Flow(serial, slot, step) => self.step(serial, slot, step)?,
                Ev::Op(op) => self.op(op)?,
                Ev::IdleOut(serial) => self.idle_out(serial),
            }
        }
        // Events after the last flow (at = 1.0) still happen, with no traffic.
        while self.next_event < self.sc.events.len() || !self.pending.is_empty() {
            self.release_events(u64::MAX)?;
            while let Some(Reverse((t, _, ev))) = self.queue.pop() {
                self.now = t;
                if let Ev::Op(op) = ev {
                    self.op(op)?;
                }
            }
        }
        let mut r = self.report;
        r.virtual_s = self.now as f64 / 1e9;
        r.wall_s = wall.elapsed().as_secs_f64();
        r.packets_per_s = r.packets as f64 / r.wall_s.max(1e-9);
        for d in self.front.iter().chain(&self.back) {
            r.checks.transit_overflows += d.worker.transit_overflows();
            for reason in datapath::Drop::ALL {
                let n = d.worker.counters.of_drop(reason);
                if n > 0 {
                    *r.checks.drops.entry(reason.name().to_string()).or_default() += n;
                }
            }
        }
        r.finish();
        Ok(r)
    }

    // ---- flows ---------------------------------------------------------

    fn arrive(&mut self) -> Result<(), SimError> {
        let i = self.arrived;
        self.release_events(i)?;
        self.arrived += 1;
        if let Some(p) = self.progress.as_mut() {
            if i % 10_000 == 0 {
                (p.0)(i, self.sc.flows);
            }
        }
        if self.arrived < self.sc.flows {
            let gap = self
                .rng
                .range(self.sc.arrival_ns / 2, self.sc.arrival_ns * 3 / 2);
            self.at(self.now + gap, Ev::Arrive);
        }
        let sc = &self.sc;
        let v6 = match sc.family {
            Family::V4 => false,
            Family::V6 => true,
            Family::Mixed => i % 2 == 1,
        };
        let tcp = !self.rng.chance(sc.udp_share);
        let high = self.rng.chance(sc.high_port_share);
        let vip_port = match (tcp, high) {
            (_, true) => 8443,
            (true, false) => 80,
            (false, false) => 53,
        };
        let clients = (sc.flows / 1000).clamp(1, 1 << 20);
        let (cidx, j) = (i % clients, i / clients);
        let (caddr, cport) = match sc.ports {
            PortPattern::Random => (i % clients, self.rng.range(1024, 65535) as u16),
            PortPattern::Sequential => (cidx, 32768 + (j % 32000) as u16),
            PortPattern::Strided(s) => (cidx, 1024 + ((j * u64::from(s)) % 64000) as u16),
            PortPattern::Fixed => (i, 40000),
        };
        let client = (client_addr(v6, caddr), cport);
        let p = if tcp { proto::TCP } else { proto::UDP };
        if self.keys.contains_key(&Key::Client(p, client.0, client.1)) {
            // The endpoint is still in use by an open flow: a real client
            // would pick another port. Counted, not started.
            self.report.flows.endpoint_busy += 1;
            return Ok(());
        }
        let long = self.rng.chance(0.01);
        let think_ns = if long {
            self.rng.range(100_000_000, 400_000_000)
        } else {
            self.rng.range(1_000_000, 50_000_000)
        };
        let f = FlowSt {
            serial: i,
            tcp,
            v6,
            client,
            vip_port,
            server: (server(v6, (i % SERVERS as u64) as usize), vip_port),
            lease: None,
            kept: false,
            lease_tm: 0,
            owner: None,
            rounds: self.rng.range(1, 3) as u8,
            think_ns,
            frag: !tcp && self.rng.chance(sc.fragment_share),
            icmp: tcp && self.rng.chance(sc.icmp_share),
            phase: if self.busy { None } else { self.phase },
            ip_id: 0,
            conn: None,
        };
        self.report.flows.started += 1;
        let slot = match self.free.pop() {
            Some(s) => {
                self.flows[s] = Some(f);
                s
            }
            None => {
                self.flows.push(Some(f));
                self.flows.len() - 1
            }
        };
        self.keys.insert(Key::Client(p, client.0, client.1), slot);
        let step = if tcp { Step::Syn } else { Step::UdpRequest };
        self.step(i, slot, step)
    }

    fn flow(&self, slot: usize) -> Option<&FlowSt> {
        self.flows.get(slot).and_then(Option::as_ref)
    }

    fn step(&mut self, serial: u64, slot: usize, step: Step) -> Result<(), SimError> {
        let Some(f) = self.flow(slot) else {
            return Ok(());
        };
        if f.serial != serial {
            return Ok(()); // the flow ended and its slot was reused
        }
        let (v6, tcp, client, vip_port, server) = (f.v6, f.tcp, f.client, f.vip_port, f.server);
        let snat = if f.kept {
            Some(f.client)
        } else {
            f.lease.as_ref().map(|l| (l.addr, l.port))
        };
        let vip = vip(v6);
        let front = L2::new(GROUP, CLIENT_ROUTER);
        let back = L2::new(GROUP, SERVER_ROUTER);
        match step {
            Step::Syn | Step::Request | Step::Fin => {
                let (flags, payload): (u8, &[u8]) = match step {
                    Step::Syn => (tcp_flags::SYN, b""),
                    Step::Request => (tcp_flags::ACK | tcp_flags::PSH, b"GET / HTTP/1.1\r\n\r\n"),
                    _ => (tcp_flags::FIN | tcp_flags::ACK, b""),
                };
                let frame =
                    build::tcp_frame(&front, client.0, client.1, vip, vip_port, flags, payload);
                let Some(tm) = self.send_in(Side::Front, slot, frame)? else {
                    return Ok(());
                };
                self.at_tm_from_client(slot, tm, step)?;
            }
            Step::SynAck | Step::Response | Step::FinAck => {
                let Some((sa, sp)) = snat else {
                    return Ok(());
                };
                let flags = match step {
                    Step::SynAck => tcp_flags::SYN | tcp_flags::ACK,
                    Step::Response => tcp_flags::ACK | tcp_flags::PSH,
                    _ => tcp_flags::FIN | tcp_flags::ACK,
                };
                let frame = build::tcp_frame(&back, server.0, server.1, sa, sp, flags, b"ok");
                let Some(tm) = self.send_in(Side::Back, slot, frame)? else {
                    return Ok(());
                };
                self.at_tm_from_server(slot, tm, step)?;
            }
            Step::UdpRequest => self.udp_request(slot)?,
            Step::UdpResponse => {
                let Some((sa, sp)) = snat else {
                    return Ok(());
                };
                let frame = build::udp_frame(&back, server.0, server.1, sa, sp, b"answer");
                let Some(tm) = self.send_in(Side::Back, slot, frame)? else {
                    return Ok(());
                };
                // The TM relays the answer to the client.
                let out = build::udp_frame(
                    &L2::new(CLIENT_ROUTER, tm_mac(tm)),
                    vip,
                    vip_port,
                    client.0,
                    client.1,
                    b"answer",
                );
                self.tm_sends(Side::Front, tm, out);
                self.next_round(slot, Step::UdpRequest);
            }
            Step::TooBig => {
                let Some((sa, sp)) = snat else {
                    return Ok(());
                };
                // A router inside the path cannot forward a packet of this
                // flow (smaller MTU): on the server side one the TM sent to
                // the server, on the client side one the TM sent to the client.
                let server_side = serial % 2 == 0;
                let p = if tcp { proto::TCP } else { proto::UDP };
                let (src, dst, l2, side) = if server_side {
                    ((sa, sp), server, back, Side::Back)
                } else {
                    ((vip, vip_port), client, front, Side::Front)
                };
                let seg = build::tcp(src.0, src.1, dst.0, dst.1, tcp_flags::ACK, 1, &[0; 1400]);
                let offending = build::ip(src.0, dst.0, p, 77, &seg);
                let err = build::too_big(&l2, router(v6, server_side), src.0, 1280, &offending);
                if let Some(tm) = self.send_in(side, slot, err)? {
                    self.report.checks.icmp_errors_delivered += 1;
                    let _ = tm;
                }
            }
        }
        Ok(())
    }

    /// A client's segment reached TM `tm` (its owner).
    fn at_tm_from_client(&mut self, slot: usize, tm: u32, step: Step) -> Result<(), SimError> {
        let Some(f) = self.flow(slot) else {
            return Ok(());
        };
        let (v6, server, client, vip_port, icmp) = (f.v6, f.server, f.client, f.vip_port, f.icmp);
        let refused = match step {
            Step::Syn => self.connect(slot, tm).err(),
            _ => None,
        };
        if let Some(why) = refused {
            // No self-source port: the TM resets the client's connection.
            let rst = build::tcp_frame(
                &L2::new(CLIENT_ROUTER, tm_mac(tm)),
                vip(v6),
                vip_port,
                client.0,
                client.1,
                tcp_flags::RST | tcp_flags::ACK,
                b"",
            );
            self.tm_sends(Side::Front, tm, rst);
            self.end(slot, End::Refused(why));
            return Ok(());
        }
        let Some((sa, sp)) = self.snat_of(slot) else {
            return Ok(());
        };
        if step == Step::Syn {
            self.register(slot, tm, proto::TCP, (sa, sp));
        }
        let (flags, next) = match step {
            Step::Syn => (tcp_flags::SYN, Step::SynAck),
            Step::Request => (tcp_flags::ACK | tcp_flags::PSH, Step::Response),
            _ => (tcp_flags::FIN | tcp_flags::ACK, Step::FinAck),
        };
        let out = build::tcp_frame(
            &L2::new(SERVER_ROUTER, tm_mac(tm)),
            sa,
            sp,
            server.0,
            server.1,
            flags,
            b"",
        );
        self.tm_sends(Side::Back, tm, out);
        let serial = self.flow(slot).map_or(0, |f| f.serial);
        self.at(self.now + 2 * SERVER_DELAY, Ev::Flow(serial, slot, next));
        if icmp && step == Step::Request {
            self.at(
                self.now + SERVER_DELAY / 2,
                Ev::Flow(serial, slot, Step::TooBig),
            );
        }
        Ok(())
    }

    /// A server's segment reached TM `tm` (its owner): relayed to the client.
    fn at_tm_from_server(&mut self, slot: usize, tm: u32, step: Step) -> Result<(), SimError> {
        let Some(f) = self.flow(slot) else {
            return Ok(());
        };
        let (v6, client, vip_port, serial) = (f.v6, f.client, f.vip_port, f.serial);
        let flags = match step {
            Step::SynAck => tcp_flags::SYN | tcp_flags::ACK,
            Step::Response => tcp_flags::ACK | tcp_flags::PSH,
            _ => tcp_flags::FIN | tcp_flags::ACK,
        };
        let out = build::tcp_frame(
            &L2::new(CLIENT_ROUTER, tm_mac(tm)),
            vip(v6),
            vip_port,
            client.0,
            client.1,
            flags,
            b"ok",
        );
        self.tm_sends(Side::Front, tm, out);
        match step {
            Step::SynAck => {
                self.at(
                    self.now + 2 * CLIENT_DELAY,
                    Ev::Flow(serial, slot, Step::Request),
                );
            }
            Step::Response => self.next_round(slot, Step::Request),
            _ => self.end(slot, End::Done),
        }
        Ok(())
    }

    /// After a response: another request after the think time, or the end.
    fn next_round(&mut self, slot: usize, again: Step) {
        let Some(Some(f)) = self.flows.get_mut(slot) else {
            return;
        };
        f.rounds = f.rounds.saturating_sub(1);
        let (serial, think, tcp) = (f.serial, f.think_ns, f.tcp);
        if f.rounds > 0 {
            self.at(
                self.now + CLIENT_DELAY + think,
                Ev::Flow(serial, slot, again),
            );
        } else if tcp {
            self.at(
                self.now + CLIENT_DELAY + think,
                Ev::Flow(serial, slot, Step::Fin),
            );
        } else {
            self.end(slot, End::Done);
        }
    }

    /// A UDP request from the client: one datagram, or its fragments (in
    /// reverse order every other time: non-first fragments then wait in the
    /// distributor's hold pool for their first).
    fn udp_request(&mut self, slot: usize) -> Result<(), SimError> {
        let Some(f) = self.flow(slot) else {
            return Ok(());
        };
        let (v6, client, vip_port, frag, serial, server) =
            (f.v6, f.client, f.vip_port, f.frag, f.serial, f.server);
        let vip = vip(v6);
        let l2 = L2::new(GROUP, CLIENT_ROUTER);
        let tm = if frag {
            let mut id = (serial as u32).wrapping_mul(2_654_435_761) | 1;
            if !v6 {
                id &= 0xffff;
            }
            while self.keys.contains_key(&Key::Frag(client.0, id)) {
                id = id.wrapping_add(1) & if v6 { u32::MAX } else { 0xffff };
            }
            self.keys.insert(Key::Frag(client.0, id), slot);
            if let Some(Some(f)) = self.flows.get_mut(slot) {
                f.ip_id = id;
            }
            let payload = vec![0x5au8; 2400];
            let dgram = build::udp(client.0, client.1, vip, vip_port, &payload);
            let packets = match (client.0, vip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => build::fragment_v4(
                    &build::ipv4(s, d, proto::UDP, id as u16, (0, false), &[], &dgram),
                    1480,
                ),
                _ => build::fragment_v6(&build::ip(client.0, vip, proto::UDP, 0, &dgram), id, 1400),
            };
            let mut frames: Vec<Vec<u8>> = packets.iter().map(|p| build::frame(&l2, p)).collect();
            if serial % 2 == 1 {
                frames.reverse();
            }
            let n = frames.len();
            let mut reached = Vec::with_capacity(n);
            for fr in frames {
                if self.flow(slot).is_none_or(|f| f.serial != serial) {
                    break;
                }
                if let Some(tm) = self.send_in(Side::Front, slot, fr)? {
                    reached.push(tm);
                }
                let released = std::mem::take(&mut self.released);
                for (tm, _) in released {
                    if self.reach(slot, tm)? {
                        reached.push(tm);
                    }
                }
            }
            self.keys.remove(&Key::Frag(client.0, id));
            if reached.len() != n {
                // A fragment never reached a TM (the flow already broke, or
                // the hold pool gave up): the datagram is lost.
                if self.flow(slot).is_some_and(|f| f.serial == serial) {
                    self.end(slot, End::Broken("fragment_lost"));
                }
                return Ok(());
            }
            self.report.checks.fragmented_datagrams += 1;
            reached[0]
        } else {
            let frame = build::udp_frame(&l2, client.0, client.1, vip, vip_port, b"query");
            match self.send_in(Side::Front, slot, frame)? {
                Some(tm) => tm,
                None => return Ok(()),
            }
        };
        // The TM relays the request from its session's self-source port.
        let first = self.flow(slot).is_some_and(|f| f.lease.is_none());
        if first {
            if let Err(why) = self.lease(slot, tm, proto::UDP) {
                self.end(slot, End::Refused(why));
                return Ok(());
            }
        }
        let Some((sa, sp)) = self.snat_of(slot) else {
            return Ok(());
        };
        if first {
            self.register(slot, tm, proto::UDP, (sa, sp));
        }
        let out = build::udp_frame(
            &L2::new(SERVER_ROUTER, tm_mac(tm)),
            sa,
            sp,
            server.0,
            server.1,
            b"query",
        );
        self.tm_sends(Side::Back, tm, out);
        self.at(
            self.now + 2 * SERVER_DELAY,
            Ev::Flow(serial, slot, Step::UdpResponse),
        );
        Ok(())
    }

    /// TM `tm` registers flow `slot` in its tables as tmd does: the client
    /// side and the server side from `snat` (what a transition's drain
    /// counts for TCP, and what the TM reports as pins).
    fn register(&mut self, slot: usize, tm: u32, protocol: u8, snat: (IpAddr, u16)) {
        let Some(f) = self.flow(slot) else {
            return;
        };
        let (client, server, vip_addr, vip_port) = (f.client, f.server, vip(f.v6), f.vip_port);
        let Some(node) = self.tms.iter().find(|t| t.id == tm) else {
            return;
        };
        let id = node.tables.register(Flow::with_ports(
            protocol, client.0, client.1, vip_addr, vip_port,
        ));
        node.tables.register_server(
            id,
            Flow::with_ports(protocol, server.0, server.1, snat.0, snat.1),
        );
        if protocol == proto::UDP {
            node.tables.set_idle(id, UDP_IDLE_NS / 1_000_000);
        }
        if let Some(Some(f)) = self.flows.get_mut(slot) {
            f.conn = Some((tm, id));
        }
    }

    /// TM `tm` opens TCP flow `slot`'s server side: a DNAT-only TM keeps
    /// the client's endpoint when the reply comes home (tmd's check, on
    /// the TM's own tables), otherwise a self-source port. The refusal's
    /// reason when there is none.
    fn connect(&mut self, slot: usize, tm: u32) -> Result<(), &'static str> {
        let Some(f) = self.flow(slot) else {
            return Err("gone");
        };
        let (client, server, vip_addr, vip_port) = (f.client, f.server, vip(f.v6), f.vip_port);
        let request = Flow::with_ports(proto::TCP, client.0, client.1, vip_addr, vip_port);
        let reply = Flow::with_ports(proto::TCP, server.0, server.1, client.0, client.1);
        let keep = self
            .tms
            .iter()
            .find(|t| t.id == tm)
            .is_some_and(|t| t.dnat_only && t.tables.dnat_reply_home(&request, &reply));
        if !keep {
            return self.lease(slot, tm, proto::TCP);
        }
        self.report.checks.addresses_kept += 1;
        self.keys.insert(
            Key::Server(proto::TCP, client.0, client.1, server.0, server.1),
            slot,
        );
        if let Some(Some(f)) = self.flows.get_mut(slot) {
            f.kept = true;
            f.lease_tm = tm;
        }
        Ok(())
    }

    /// TM `tm` leases a self-source port for flow `slot` toward its server
    /// (the real allocator), checked and recorded. The refusal's reason
    /// when none fits: none left (`port_exhausted`), or none whose reply
    /// the rules put in the TM's group (`reply_elsewhere`).
    fn lease(&mut self, slot: usize, tm: u32, protocol: u8) -> Result<(), &'static str> {
        let Some(server) = self.flow(slot).map(|f| f.server) else {
            return Err("gone");
        };
        let Some(node) = self.tms.iter().find(|t| t.id == tm) else {
            return Err("gone");
        };
        let lease = match node
            .snat
            .lease(std::net::SocketAddr::new(server.0, server.1), protocol)
        {
            Ok(l) => l,
            Err(ConnectError::ReplyElsewhere { .. }) => return Err("reply_elsewhere"),
            Err(_) => return Err("port_exhausted"),
        };
        self.check_port(tm, protocol, lease.addr, lease.port, server);
        self.keys.insert(
            Key::Server(protocol, lease.addr, lease.port, server.0, server.1),
            slot,
        );
        self.held
            .insert((protocol, lease.addr, lease.port, tm, server));
        if let Some(Some(f)) = self.flows.get_mut(slot) {
            f.lease = Some(lease);
            f.lease_tm = tm;
        }
        Ok(())
    }

    /// The endpoint flow `slot`'s server side runs from: its SNAT lease,
    /// or the client's own (DNAT-only).
    fn snat_of(&self, slot: usize) -> Option<(IpAddr, u16)> {
        let f = self.flow(slot)?;
        if f.kept {
            return Some(f.client);
        }
        f.lease.as_ref().map(|l| (l.addr, l.port))
    }

    /// Property 5: the port the TM was given steers the server's reply to
    /// it, under the running table and, while prepared, the next one too.
    fn check_port(
        &mut self,
        tm: u32,
        protocol: u8,
        addr: IpAddr,
        port: u16,
        server: (IpAddr, u16),
    ) {
        self.report.checks.ports_leased += 1;
        // Another open connection of the protocol on the same SNAT address
        // and port toward the same server (all TMs share the address):
        // their replies could not be told apart. (One TM's TCP and UDP
        // ports come from one allocator; TMs of different groups may hold
        // the same port for different protocols or servers, which their
        // groups' rules tell apart.)
        if self
            .keys
            .contains_key(&Key::Server(protocol, addr, port, server.0, server.1))
            || self.held.contains(&(protocol, addr, port, tm, server))
        {
            self.report.checks.port_collision += 1;
        }
        let reply = Flow::with_ports(protocol, server.0, server.1, addr, port);
        // The TM's own tables: the running one (the next one once it
        // committed), and the next one while it is prepared.
        let st = self.tms.iter().find(|t| t.id == tm);
        let (prepared, committed) = st.map_or((false, false), |t| (t.prepared, t.committed));
        let current = match (&self.next, committed) {
            (Some(n), true) => n,
            _ => &self.table,
        };
        let joining = self.next.is_some()
            && !committed
            && current
                .tm_index_by_id(tm)
                .is_none_or(|i| current.buckets_of(i) == 0);
        let ok_now = joining || owner(current, &reply) == tm;
        // A TM the next table drains to zero keeps its current ports until
        // the switch (they stay its as the old owner until commit).
        let ok_next = !prepared
            || self.next.as_ref().is_none_or(|n| {
                owner(n, &reply) == tm || n.tm_index_by_id(tm).is_none_or(|i| n.buckets_of(i) == 0)
            });
        if !(ok_now && ok_next) || port <= server.1 || !self.sc.snat_range.contains(port) {
            self.report.checks.wrong_port += 1;
        }
    }

    /// Sends `frame` of flow `slot` into the cluster on `side` (through
    /// the distributor the spray picks): the TM it reached, if the flow
    /// goes on. Dropped and held frames give `None`; held fragments come
    /// out in `self.released` when their first is steered.
    fn send_in(
        &mut self,
        side: Side,
        slot: usize,
        mut frame: Vec<u8>,
    ) -> Result<Option<u32>, SimError> {
        let d = self.spray(&frame);
        self.report.packets += 1;
        let now = self.now;
        let dist = match side {
            Side::Front => &mut self.front[d],
            Side::Back => &mut self.back[d],
        };
        let len = frame.len();
        let action = dist.worker.process(&mut frame, len, 0, &dist.plan, now);
        let mut released = Vec::new();
        if dist.worker.has_released() {
            dist.worker.drain_released(&dist.plan, |fr, a| {
                if let Action::ToTm { tm, port } = a {
                    released.push((tm, port, fr.to_vec()));
                }
            });
        }
        let plan_ids: Vec<(u32, u16, Vec<u8>)> = released
            .into_iter()
            .filter_map(|(tm, port, fr)| dist.plan.tm_id(tm).map(|id| (id, port, fr)))
            .collect();
        let mut copy = None;
        let reached = match action {
            Action::ToTm { tm, port } => {
                let id = dist.plan.tm_id(tm);
                id.map(|id| (id, port))
            }
            Action::ToTmAndCopy {
                tm,
                port,
                also,
                also_port,
            } => {
                copy = dist.plan.tm_id(also).map(|id| (id, also_port));
                dist.plan.tm_id(tm).map(|id| (id, port))
            }
            Action::Held => None,
            Action::Drop(_) => {
                self.report.checks.dropped += 1;
                None
            }
            _ => {
                self.report.checks.not_steered += 1;
                None
            }
        };
        for (id, port, fr) in plan_ids {
            self.report.packets += 1;
            if port != id as u16 + 1 || fr.get(..6) != Some(&tm_mac(id).0[..]) {
                self.report.checks.bad_rewrite += 1;
            }
            self.released.push((id, fr));
        }
        let Some((mut id, port)) = reached else {
            return Ok(None);
        };
        if port != id as u16 + 1 || frame.get(..6) != Some(&tm_mac(id).0[..]) {
            self.report.checks.bad_rewrite += 1;
        }
        if let Some((also, also_port)) = copy {
            // Two copies (an ICMP error in a moved bucket): the TM that
            // does not have the flow ignores its copy.
            self.report.packets += 1;
            if also_port != also as u16 + 1 {
                self.report.checks.bad_rewrite += 1;
            }
            if self.flow(slot).and_then(|f| f.owner) == Some(also) {
                id = also;
            }
        }
        Ok(self.reach(slot, id)?.then_some(id))
    }

    /// A packet of flow `slot` reached TM `tm`: the first packet makes it
    /// the owner; a packet at another TM splits the flow (broken there); a
    /// dead TM breaks it. True if the flow goes on.
    fn reach(&mut self, slot: usize, tm: u32) -> Result<bool, SimError> {
        let alive = self.tms.iter().any(|t| t.id == tm && t.alive);
        let Some(Some(f)) = self.flows.get_mut(slot) else {
            return Ok(false);
        };
        match f.owner {
            None => {
                f.owner = Some(tm);
                if let Some(p) = f.phase {
                    self.report.count_owner(p, tm);
                }
                if !alive {
                    self.end(slot, End::Broken("dead_tm"));
                    return Ok(false);
                }
                Ok(true)
            }
            Some(o) if o == tm => {
                if !alive {
                    self.end(slot, End::Broken("dead_tm"));
                    return Ok(false);
                }
                Ok(true)
            }
            Some(_) => {
                let cause = "misrouted";
                self.report.flows.split += 1;
                if self.report.flows.split_examples.len() < 10 {
                    self.report.flows.split_examples.push(format!(
                        "t={:.6}s {} {} -> VIP port {} (SNAT port {:?}) owned by TM {:?}, a packet reached TM {tm}{}",
                        self.now as f64 / 1e9,
                        if f.tcp { "TCP" } else { "UDP" },
                        std::net::SocketAddr::from(f.client),
                        f.vip_port,
                        f.lease.as_ref().map(|l| l.port),
                        f.owner,
                        if self.busy { " during a transition" } else { "" }
                    ));
                }
                self.end(slot, End::Broken(cause));
                Ok(false)
            }
        }
    }

    /// A frame a TM sends (toward a client on the front side, a server on
    /// the back side): bridged by the distributor from the TM's port.
    fn tm_sends(&mut self, side: Side, tm: u32, mut frame: Vec<u8>) {
        let d = self.spray(&frame);
        self.report.packets += 1;
        let now = self.now;
        let dist = match side {
            Side::Front => &mut self.front[d],
            Side::Back => &mut self.back[d],
        };
        let len = frame.len();
        match dist
            .worker
            .process(&mut frame, len, tm as u16 + 1, &dist.plan, now)
        {
            Action::Forward(0) | Action::Flood => {}
            _ => self.report.checks.bad_bridge += 1,
        }
    }

    /// The ECMP-like spray: a symmetric hash of the frame's two addresses
    /// picks the distributor (fragments of one datagram and both directions
    /// of a flow take the same one, as with L3 hashing on routers).
    fn spray(&self, frame: &[u8]) -> usize {
        let n = self.front.len();
        if n == 1 {
            return 0;
        }
        let addrs = EthernetFrame::new_checked(frame).ok().and_then(|e| {
            let l3 = frame.get(e.payload_offset()..)?;
            let ip = match e.ethertype() {
                wire::ethertype::IPV4 => wire::parse_ipv4(l3).ok()?,
                wire::ethertype::IPV6 => wire::parse_ipv6(l3).ok()?,
                _ => return None,
            };
            Some((ip.src, ip.dst))
        });
        let Some((a, b)) = addrs else { return 0 };
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        let mut h = fnv::FnvHasher::default();
        std::hash::Hash::hash(&(a, b), &mut h);
        (std::hash::Hasher::finish(&h) % n as u64) as usize
    }

    fn end(&mut self, slot: usize, how: End) {
        let Some(f) = self.flows.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        let (serial, owner) = (f.serial, f.owner);
        let lingers = !f.tcp && how == End::Done && f.conn.is_some();
        if lingers {
            // tmd ends a UDP session only when it idles out (and not
            // before a distributor's pin of it can be over): until then
            // its endpoint, port and registration stay.
            self.lingering.insert(serial, f);
            self.at(self.now + UDP_IDLE_NS, Ev::IdleOut(serial));
        } else {
            self.release(f);
        }
        let t = &mut self.report.flows;
        match how {
            End::Done => t.completed += 1,
            End::Refused(why) => *t.refused.entry(why.to_string()).or_default() += 1,
            End::Broken(why) => {
                *t.broken.entry(why.to_string()).or_default() += 1;
                if let (Some(o), "tm_failed" | "dead_tm") = (owner, why) {
                    *t.broken_by_failed_tm.entry(o).or_default() += 1;
                }
            }
        }
    }

    /// A lingering UDP session idles out at its TM, unless a pin of it may
    /// still live (`Tables::kept_until_ms`): then at that time.
    fn idle_out(&mut self, serial: u64) {
        let Some(f) = self.lingering.remove(&serial) else {
            return;
        };
        let kept = f.conn.and_then(|(tm, id)| {
            let node = self.tms.iter().find(|t| t.id == tm)?;
            node.tables.kept_until_ms(id)
        });
        if let Some(k) = kept.map(|ms| ms.saturating_mul(1_000_000)) {
            if k > self.now {
                self.lingering.insert(serial, f);
                self.at(k, Ev::IdleOut(serial));
                return;
            }
        }
        self.release(f);
    }

    /// Frees what flow `f` held: its keys, its lease, its registration.
    fn release(&mut self, f: FlowSt) {
        let p = if f.tcp { proto::TCP } else { proto::UDP };
        self.keys.remove(&Key::Client(p, f.client.0, f.client.1));
        if let Some(l) = &f.lease {
            self.keys
                .remove(&Key::Server(p, l.addr, l.port, f.server.0, f.server.1));
            self.held.remove(&(p, l.addr, l.port, f.lease_tm, f.server));
        }
        if f.kept {
            self.keys.remove(&Key::Server(
                p, f.client.0, f.client.1, f.server.0, f.server.1,
            ));
        }
        if f.frag {
            self.keys.remove(&Key::Frag(f.client.0, f.ip_id));
        }
        if let Some((tm, id)) = f.conn {
            if let Some(node) = self.tms.iter().find(|t| t.id == tm) {
                node.tables.unregister(id);
            }
        }
    }

    // ---- operator events -----------------------------------------------

    /// Starts the events due before flow `i` (or queues them behind a
    /// transition in progress).
    fn release_events(&mut self, i: u64) -> Result<(), SimError> {
        while let Some(e) = self.sc.events.get(self.next_event) {
            let due = (e.at * self.sc.flows as f64).floor() as u64;
            if due > i {
                break;
            }
            let what = e.what.clone();
            self.next_event += 1;
            match what {
                // Not a change of its own: it arms the kill of a push.
                Event::CoordinatorDies(n) => self.kill_after = Some(n),
                // A TM dies when it dies, a push in progress or not.
                Event::FailTm(id) if self.next.is_some() => self.kill_tm(&what, id, false)?,
                _ => self.pending.push(what),
            }
        }
        self.start_pending()
    }

    fn start_pending(&mut self) -> Result<(), SimError> {
        if self.busy || self.pending.is_empty() {
            return Ok(());
        }
        let what = self.pending.remove(0);
        self.busy = true;
        self.phase = None;
        let at_flow = self.arrived;
        match what.clone() {
            Event::Swap => {
                let next = self.table.clone().with_version(self.table.version() + 1);
                self.report
                    .events
                    .push(EventReport::new(&what, at_flow, 0, 0));
                self.remember(self.table.clone());
                self.install(next)?;
                self.busy = false;
                self.open_phase(&what.to_string());
            }
            Event::Rollback => {
                // stdctl rollback: the newest table older than the running
                // one, its contents as the next version.
                let version = self.table.version();
                match self.history.iter().rev().find(|t| t.version() < version) {
                    Some(old) => {
                        let next = old.clone().with_version(version + 1);
                        // The operator's own table: what differs is the minimum.
                        let moved = self.table.moved_buckets(&next);
                        match Push::new(self.push_spec(), &self.table, &next) {
                            Ok(_) => self.begin_transition(&what, next, moved)?,
                            // Refused before anything changes (stdctl's
                            // error: e.g. it would drain a TM added since
                            // and readmit a failed one at once).
                            Err(why) => {
                                let mut e = EventReport::new(&what, at_flow, 0, 0);
                                e.rolled_back = Some(why);
                                self.report.events.push(e);
                                self.busy = false;
                                return self.start_pending();
                            }
                        }
                    }
                    None => {
                        let mut e = EventReport::new(&what, at_flow, 0, 0);
                        e.rolled_back =
                            Some("no committed table older than the running one".into());
                        self.report.events.push(e);
                        self.busy = false;
                        return self.start_pending();
                    }
                }
            }
            Event::CoordinatorDies(_) => {
                self.busy = false;
                return self.start_pending();
            }
            Event::Rebalance(p) => {
                // Every group to the profile, in one new table; failed TMs
                // stay out: the profile spreads over the others.
                let (mut next, mut optimum) = (self.table.clone(), 0);
                for g in 0..next.groups().len() {
                    let targets = next.targets_excluding(g, &p, &self.out_of_service(g, None))?;
                    let change = next.rebalance_to_targets(g, &targets, Some(p.clone()))?;
                    optimum += change.optimum;
                    next = change.table;
                }
                let next = next.with_version(self.table.version() + 1);
                self.begin_transition(&what, next, optimum)?;
            }
            Event::DrainTm(id) => {
                let Some(k) = self.table.tm_index_by_id(id) else {
                    return Err(bad(format!("TM {id} cannot be drained: not in the table")));
                };
                let g = self.table.tms()[usize::from(k)].group;
                let mut out = self.out_of_service(g, None);
                if !out.contains(&k) {
                    out.push(k);
                }
                // Within its own group.
                let profile = self.table.groups()[g].profile.clone();
                let targets = self.table.targets_excluding(g, &profile, &out)?;
                let change = self.table.rebalance_to_targets(g, &targets, None)?;
                self.begin_transition(&what, change.table, change.optimum)?;
            }
            Event::AddTm => {
                let id = self.tms.iter().map(|t| t.id).max().map_or(0, |m| m + 1);
                if id >= MAX_TM_IDS {
                    return Err(bad("too many TMs added"));
                }
                let change = self.table.add_tm(tm_entry(id))?;
                let idx = index_of(&change.table, id)?;
                self.tms.push(TmSt {
                    id,
                    alive: true,
                    snat: Arc::new(Snat::new(
                        &change.table,
                        idx,
                        &snat_addrs(),
                        self.sc.snat_range,
                    )?),
                    // tm_entry: the default group.
                    dnat_only: false,
                    tables: Tables::new(id, change.table.clone()),
                    prepared: false,
                    committed: false,
                });
                self.begin_transition(&what, change.table, change.optimum)?;
            }
            Event::FailTm(id) => self.kill_tm(&what, id, true)?,
            Event::ReturnTm(id) => {
                if self.tms.iter().any(|t| t.id == id && t.alive) {
                    return Err(bad(format!("TM {id} cannot return: it did not fail")));
                }
                // Its share of its group's profile comes back; other failed TMs stay out.
                let g = self
                    .table
                    .tm_index_by_id(id)
                    .map_or(0, |k| self.table.tms()[usize::from(k)].group);
                let profile = self.table.groups()[g].profile.clone();
                let targets =
                    self.table
                        .targets_excluding(g, &profile, &self.out_of_service(g, Some(id)))?;
                let change = self.table.rebalance_to_targets(g, &targets, None)?;
                let idx = index_of(&change.table, id)?;
                let snat = Arc::new(Snat::new(
                    &change.table,
                    idx,
                    &snat_addrs(),
                    self.sc.snat_range,
                )?);
                if let Some(t) = self.tms.iter_mut().find(|t| t.id == id) {
                    t.alive = true;
                    self.detected.retain(|&d| d != id);
                    t.snat = snat;
                    // A restarted tmd: no connections, the table it is given.
                    t.tables = Tables::new(id, change.table.clone());
                }
                self.begin_transition(&what, change.table, change.optimum)?;
            }
        }
        Ok(())
    }

    /// TM `id` dies: its connections and sessions are lost; the
    /// distributors detect it `detect_ns` later. `queued`: it waited for
    /// the cluster to be idle, which stays busy until the failover.
    fn kill_tm(&mut self, what: &Event, id: u32, queued: bool) -> Result<(), SimError> {
        let Some(t) = self.tms.iter_mut().find(|t| t.id == id && t.alive) else {
            return Err(bad(format!("TM {id} cannot fail: it is not running")));
        };
        t.alive = false;
        // Every open connection of the dead TM is lost with it.
        let owned: Vec<usize> = (0..self.flows.len())
            .filter(|&s| self.flow(s).is_some_and(|f| f.owner == Some(id)))
            .collect();
        for s in owned {
            self.end(s, End::Broken("tm_failed"));
        }
        // And the finished sessions it still held.
        let held: Vec<u64> = self
            .lingering
            .iter()
            .filter(|(_, f)| f.lease_tm == id)
            .map(|(&k, _)| k)
            .collect();
        for k in held {
            if let Some(f) = self.lingering.remove(&k) {
                self.release(f);
            }
        }
        let mut e = EventReport::new(what, self.arrived, 0, 0);
        if !queued {
            e.what = format!("{what} during a transition");
            if let Some(p) = self.push_event.and_then(|i| self.report.events.get_mut(i)) {
                p.tms_failed_during.push(id);
            }
        }
        self.report.events.push(e);
        let ev = self.report.events.len() - 1;
        self.at(
            self.now + self.sc.detect_ns,
            Ev::Op(Op::Failover(id, ev, queued)),
        );
        Ok(())
    }

    /// Dead TMs the distributors fail over, as indexes of `t`.
    fn detected_in(&self, t: &AllocationTable) -> Vec<TmIndex> {
        self.detected
            .iter()
            .filter(|&&id| self.tms.iter().any(|m| m.id == id && !m.alive))
            .filter_map(|&id| t.tm_index_by_id(id))
            .collect()
    }

    /// `t` failed over for every detected dead TM (itself when none has buckets in it).
    fn failed_over(&self, t: &AllocationTable) -> Result<AllocationTable, SimError> {
        let dead = self.detected_in(t);
        if dead.iter().all(|&k| t.buckets_of(k) == 0) {
            return Ok(t.clone());
        }
        Ok(t.failover(&dead)?.table)
    }

    /// What stdd's failover does while a push is under way, on every
    /// distributor: the failover of its operator table — and, switched, of
    /// the previous one too, open if it was — its pins minus the dead TMs'.
    fn fail_over_in_push(&mut self) -> Result<(), SimError> {
        let dead: Vec<u32> = self
            .detected
            .iter()
            .copied()
            .filter(|&id| self.tms.iter().any(|m| m.id == id && !m.alive))
            .collect();
        let mut plans = Vec::new();
        for d in self.front.iter().chain(self.back.iter()) {
            let op = d.plan.operator_table().clone();
            let op_prev = d.plan.operator_previous().cloned();
            let mut p = plan(self.failed_over(&op)?)?;
            if let Some(pp) = &op_prev {
                p = p.with_previous(self.failed_over(pp)?)?;
                if d.plan.is_open() {
                    p = p.opened();
                }
            }
            let (list, cap) = pins_but(&d.plan, &dead);
            plans.push(
                p.with_pins(list, cap)
                    .derived_from(op, op_prev, dead.clone()),
            );
        }
        for (d, p) in self.front.iter_mut().chain(self.back.iter_mut()).zip(plans) {
            d.plan = p;
        }
        Ok(())
    }

    /// Table indexes of the failed TMs (but `except`).
    fn failed_indexes(&self, except: Option<u32>) -> Vec<TmIndex> {
        self.tms
            .iter()
            .filter(|t| !t.alive && Some(t.id) != except)
            .filter_map(|t| self.table.tm_index_by_id(t.id))
            .collect()
    }

    /// The members of group `g` a change leaves out, as stdctl's drain,
    /// readmit and rebalance do (`tools::cluster::out_of_service`): the
    /// failed TMs and those with no bucket (failed over, drained), but
    /// `except` (the TM being readmitted).
    fn out_of_service(&self, g: usize, except: Option<u32>) -> Vec<TmIndex> {
        let counts = self.table.counts(g);
        let mut out = self.failed_indexes(except);
        for m in self.table.members(g) {
            let id = self.table.tms()[usize::from(m)].id;
            if counts[usize::from(m)] == 0 && Some(id) != except && !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// Installs `next` everywhere at once (a plain swap, or a failover).
    fn install(&mut self, next: AllocationTable) -> Result<(), SimError> {
        // As stdd's PUT /table and failover do: the pins in force carry
        // on, but those of a TM that died (its flows are gone).
        let dead: Vec<u32> = self.tms.iter().filter(|t| !t.alive).map(|t| t.id).collect();
        for d in self.front.iter_mut().chain(self.back.iter_mut()) {
            let (list, cap) = pins_but(&d.plan, &dead);
            d.plan = plan(next.clone())?.with_pins(list, cap);
        }
        // A TM the table does not list (one a push is adding, when another
        // fails meanwhile: the failover table comes from the operator's)
        // refuses it and keeps its own, as tmd's PUT /table does.
        for t in self
            .tms
            .iter()
            .filter(|t| t.alive && next.tm_index_by_id(t.id).is_some())
        {
            t.snat.retable(&next, None)?;
            set_tables(&t.tables, &next, None);
        }
        self.table = next;
        Ok(())
    }

    /// A push of `next` by the shared transition coordinator (DESIGN §4,
    /// `control::coordinator`, the code `stdctl push` runs), against the
    /// in-process nodes: every front and back distributor, every TM.
    fn begin_transition(
        &mut self,
        what: &Event,
        next: AllocationTable,
        optimum: usize,
    ) -> Result<(), SimError> {
        let moved = self.table.moved_buckets(&next);
        self.report
            .events
            .push(EventReport::new(what, self.arrived, moved, optimum));
        self.push_event = Some(self.report.events.len() - 1);
        let push = Push::new(self.push_spec(), &self.table, &next).map_err(bad)?;
        self.next = Some(next);
        self.push = Some((push, self.now));
        self.at(self.now, Ev::Op(Op::Coordinate));
        Ok(())
    }

    /// The cluster as `stdctl push` is told it: every distributor, every TM.
    fn push_spec(&self) -> PushSpec {
        PushSpec {
            distributors: (0..self.front.len())
                .flat_map(|i| [format!("front{i}"), format!("back{i}")])
                .collect(),
            tms: self
                .tms
                .iter()
                .map(|t| (t.id, format!("tm{}", t.id)))
                .collect(),
            drain_window: Duration::from_nanos(self.sc.drain_window_ns),
            poll: Duration::from_nanos(CHECK_NS),
            attempts: 3,
            force: false,
        }
    }

    /// A killed coordinator's push, run again (`stdctl push` of the same
    /// table: every step is idempotent for it, so it carries on from where
    /// the nodes are).
    fn resume(&mut self) -> Result<(), SimError> {
        let Some(next) = self.next.clone() else {
            return Err(bad("a resume with no push to resume"));
        };
        let push = Push::new(self.push_spec(), &self.table, &next).map_err(bad)?;
        self.push = Some((push, self.now));
        self.coordinate()
    }

    /// A table a commit or swap replaced, for rollback.
    fn remember(&mut self, replaced: AllocationTable) {
        if self.history.len() == HISTORY {
            self.history.remove(0);
        }
        self.history.push(replaced);
    }

    /// Runs the coordinator until it calls a node (answered at once; the
    /// next step one call's time later), waits, or ends.
    fn coordinate(&mut self) -> Result<(), SimError> {
        loop {
            let Some((push, epoch)) = self.push.as_mut() else {
                return Ok(());
            };
            let epoch = *epoch;
            let elapsed = Duration::from_nanos(self.now - epoch);
            match push.step(elapsed) {
                coordinator::Step::Say(_) => {}
                coordinator::Step::Call(node, call) => {
                    let target = push.target().clone();
                    let name = push.name(node).to_string();
                    let answer = self.carry(node, &call, &target)?;
                    if self.kill_after == Some(0) {
                        // Killed: the node acted, the answer is lost.
                        self.kill_after = None;
                        self.push = None;
                        if let Some(e) = self.push_event.and_then(|i| self.report.events.get_mut(i))
                        {
                            e.coordinator_killed = Some(format!("{} {name}", call_name(&call)));
                        }
                        self.at(self.now + RESUME_NS, Ev::Op(Op::Resume));
                        return Ok(());
                    }
                    if let Some(k) = self.kill_after.as_mut() {
                        *k -= 1;
                    }
                    if let Some((push, _)) = self.push.as_mut() {
                        push.answer(answer, elapsed + Duration::from_nanos(CALL_NS));
                    }
                    self.at(self.now + CALL_NS, Ev::Op(Op::Coordinate));
                    return Ok(());
                }
                coordinator::Step::WaitUntil(t) => {
                    let at = epoch + u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
                    self.at(at.max(self.now + 1), Ev::Op(Op::Coordinate));
                    return Ok(());
                }
                coordinator::Step::Done(outcome) => {
                    self.push = None;
                    return self.pushed(outcome);
                }
            }
        }
    }

    /// The coordinator's push ended.
    fn pushed(&mut self, outcome: Outcome) -> Result<(), SimError> {
        let summary = match outcome {
            Outcome::Committed(s) => s,
            Outcome::RolledBack {
                cause,
                not_rolled_back,
            } if not_rolled_back.iter().all(|n| {
                // Only dead TMs can stay out of reach.
                self.tms
                    .iter()
                    .any(|t| !t.alive && n.starts_with(&format!("tm{}: ", t.id)))
            }) =>
            {
                // Refused by the cluster (e.g. a TM the change gives buckets
                // is dead): the table stays, and so do the flows.
                self.next = None;
                self.committing = false;
                self.pushed_again = 0;
                // The distributors run the failover of the table they went
                // back to when a TM died meanwhile.
                self.table = self.failed_over(&self.table)?;
                let table = self.table.clone();
                self.tms.retain(|t| table.tm_index_by_id(t.id).is_some());
                for t in &mut self.tms {
                    t.prepared = false;
                    t.committed = false;
                }
                if let Some(e) = self.push_event.and_then(|i| self.report.events.get_mut(i)) {
                    e.rolled_back = Some(cause.clone());
                }
                self.busy = false;
                self.open_phase(&format!("rolled back: {cause}"));
                return self.start_pending();
            }
            Outcome::RolledBack { cause, .. } => {
                return Err(bad(format!(
                    "the push was rolled back incompletely: {cause}"
                )))
            }
            // A TM died during the push and some distributor had not failed
            // it over when the drain window ended: the operator pushes the
            // same table again, as the message says.
            Outcome::Stopped { cause } if self.pushed_again < PUSH_AGAIN => {
                self.pushed_again += 1;
                if let Some(e) = self.push_event.and_then(|i| self.report.events.get_mut(i)) {
                    e.stopped.push(cause);
                }
                self.at(self.now + RESUME_NS, Ev::Op(Op::Resume));
                return Ok(());
            }
            Outcome::Stopped { cause } => return Err(bad(format!("the push stopped: {cause}"))),
        };
        let Some(next) = self.next.take() else {
            return Err(bad("a push ended with no next table"));
        };
        self.pushed_again = 0;
        // Failed over meanwhile: the distributors run its failover table.
        let next = self.failed_over(&next)?;
        if let Some(e) = self.push_event.and_then(|i| self.report.events.get_mut(i)) {
            e.window_ms = summary.drain.as_secs_f64() * 1e3;
            e.forced_commit = summary.moving_at_commit > 0;
            e.moving_at_commit = summary.moving_at_commit as usize;
        }
        let replaced = std::mem::replace(&mut self.table, next);
        self.remember(replaced);
        for t in &mut self.tms {
            t.prepared = false;
            t.committed = false;
        }
        // The commit window closes: sessions that started inside it were
        // moved by it too.
        self.committing = false;
        self.commits += 1;
        self.busy = false;
        let label = self
            .push_event
            .and_then(|i| self.report.events.get(i))
            .map(|e| e.what.clone())
            .unwrap_or_default();
        self.open_phase(&label);
        self.start_pending()
    }

    /// A coordinator call carried to an in-process node: what stdd's and
    /// tmd's admin endpoints do with it, on the simulation's distributors
    /// (their real plans) and TMs (their real port allocators).
    fn carry(
        &mut self,
        node: NodeId,
        call: &Call,
        to: &TableId,
    ) -> Result<Result<Answer, CallError>, SimError> {
        let Some(next) = self.next.clone() else {
            return Err(bad("a coordinator call with no next table"));
        };
        if TableId::of(&next) != *to {
            return Err(bad(
                "the coordinator pushes another table than the simulation's",
            ));
        }
        let refused = |why: &str| Ok(Err(CallError::Status(409, why.to_string())));
        let (now, pin_capacity) = (self.now, self.sc.pins);
        match node {
            NodeId::Distributor(j) => {
                let (i, front) = (j / 2, j % 2 == 0);
                let running = self.table.clone();
                let mut reprobe = Vec::new();
                let d = if front {
                    &mut self.front[i]
                } else {
                    &mut self.back[i]
                };
                let id = TableId::of(d.plan.table());
                // Failed over: the operator's table it derives from.
                let op = TableId::of(d.plan.operator_table());
                let named = |req: &StepRequest| -> Result<bool, SimError> {
                    Ok(step_is_for(req, &id)? || step_is_for(req, &op)?)
                };
                match call {
                    Call::Switch(_) => {
                        if id != *to && op != *to {
                            // The pins of the last commit stay in force
                            // until the open replaces them (stdd's carry);
                            // the previous table is the running one (a
                            // failover's, when failed over).
                            let (list, cap) = d.plan.pin_list();
                            let previous = d.plan.table().clone();
                            let failed: Vec<u32> = d
                                .plan
                                .derivation()
                                .map(|(_, _, f)| f.to_vec())
                                .unwrap_or_default();
                            // (pins after the previous table, as stdd's
                            // switch does: a pin the new table alone makes
                            // redundant still counts while the previous
                            // one steers)
                            d.plan = plan(next.clone())?
                                .with_previous(previous)?
                                .with_pins(list, cap);
                            // stdd counts a TM the new table gives buckets
                            // in service again; one still down is failed
                            // over again at its next probe.
                            for id in failed {
                                if next
                                    .tm_index_by_id(id)
                                    .is_some_and(|k| next.buckets_of(k) > 0)
                                {
                                    reprobe.push(id);
                                }
                            }
                        }
                    }
                    Call::Open(req) if named(req)? => {
                        if d.plan.previous().is_some() {
                            let opened = std::mem::replace(&mut d.plan, plan(running)?).opened();
                            d.plan = with_pins(opened, req, now, pin_capacity)?;
                        }
                    }
                    Call::Commit(req) if named(req)? => {
                        if d.plan.previous().is_some() {
                            // The derivation stays (a failover table of the
                            // committed one), the previous table goes.
                            let committed =
                                std::mem::replace(&mut d.plan, plan(running)?).without_previous();
                            d.plan = with_pins(committed, req, now, pin_capacity)?;
                            // The first distributor to drop the previous
                            // table ends the window for the flows.
                            if !self.committing {
                                self.committing = true;
                                self.commits += 1;
                            }
                        }
                        let refused = d.plan.pins().map_or(0, |p| {
                            let r = p.refused();
                            r.full + r.unroutable
                        });
                        return Ok(Ok(Answer::Committed(CommitAnswer {
                            table: op,
                            persist_error: None,
                            pins_refused: Some(refused),
                        })));
                    }
                    Call::Abort(_) => {
                        let Some(prev) = d.plan.previous().cloned() else {
                            return Ok(Ok(Answer::Aborted(AbortAnswer {
                                table: op,
                                aborted: false,
                            })));
                        };
                        let (list, cap) = d.plan.pin_list();
                        let back = plan(prev.clone())?.with_pins(list, cap);
                        // Failed over meanwhile: back on the failover of the
                        // operator's previous table, the failures kept.
                        let (back, op_prev) = match d.plan.derivation() {
                            Some((_, Some(op_prev), failed)) => (
                                back.derived_from(op_prev.clone(), None, failed.to_vec()),
                                TableId::of(op_prev),
                            ),
                            _ => (back, TableId::of(&prev)),
                        };
                        d.plan = back;
                        return Ok(Ok(Answer::Aborted(AbortAnswer {
                            table: op_prev,
                            aborted: true,
                        })));
                    }
                    Call::DistributorState => {}
                    _ => return refused("not a distributor call, or another table"),
                }
                let p = &d.plan;
                let phase = match (p.previous().is_some(), p.is_open()) {
                    (false, _) => DistributorPhase::Idle,
                    (true, false) => DistributorPhase::Switched,
                    (true, true) => DistributorPhase::Open,
                };
                let (kept, refused) = p.pins().map_or((0, 0), |s| {
                    let r = s.refused();
                    (s.len() as u64, r.full + r.unroutable)
                });
                let answer = Answer::Distributor(
                    DistributorTransition::new(
                        phase,
                        p.table(),
                        p.previous(),
                        p.moved().map(|m| m.len()),
                        0,
                        0,
                    )
                    .with_pins(kept, refused)
                    .failed_over(p.derivation()),
                );
                for id in reprobe {
                    self.detected.retain(|&d| d != id);
                    // (no event of its own in the report)
                    self.at(now + PROBE_NS, Ev::Op(Op::Failover(id, usize::MAX, false)));
                }
                Ok(Ok(answer))
            }
            NodeId::Tm(k) => {
                let Some(t) = self.tms.get(k) else {
                    return refused("no such TM");
                };
                if !t.alive {
                    return Ok(Err(CallError::NoAnswer("connection refused".into())));
                }
                let (snat, id) = (Arc::clone(&t.snat), t.id);
                if next.tm_index_by_id(id).is_none() {
                    // tmd refuses a table that does not list it.
                    return Ok(Err(CallError::Status(
                        400,
                        format!("table rejected: it does not list this node (TM id {id})"),
                    )));
                }
                match call {
                    Call::Prepare(req) => {
                        // Committed already (a resumed push): idle on it.
                        if !t.prepared && !t.committed {
                            match &req.held {
                                None => snat.retable(&self.table, Some(&next))?,
                                Some(h) => {
                                    let held: Vec<(IpAddr, u16)> =
                                        h.iter().map(|p| (p.0, p.1)).collect();
                                    snat.prepare_joining(&next, &held)?;
                                }
                            }
                            self.tms[k].prepared = true;
                            set_tables(&self.tms[k].tables, &self.table, Some(&next));
                        } else if let (true, Some(h)) = (t.prepared, &req.held) {
                            // A joiner prepared again, as tmd takes it.
                            let held: Vec<(IpAddr, u16)> = h.iter().map(|p| (p.0, p.1)).collect();
                            snat.rejoin(&next, &held)?;
                        }
                    }
                    Call::HeldPorts => {
                        return Ok(Ok(Answer::Held(
                            snat.moving_ports(&next)
                                .into_iter()
                                .map(|(a, p)| HeldPort(a, p))
                                .collect(),
                        )))
                    }
                    Call::TmState => {}
                    Call::Pins => {
                        let p = t.tables.pinned_at(now / 1_000_000);
                        let against = if t.prepared || t.committed {
                            to.clone()
                        } else {
                            TableId::of(&self.table)
                        };
                        return Ok(Ok(Answer::Pins(TmPins::new(
                            id, against, &p.flows, &p.ports,
                        ))));
                    }
                    Call::Commit(req) => {
                        if let Some(h) = &req.held {
                            // What tmd does: the other TMs' pinned ports
                            // stay out of its hands past the commit.
                            snat.set_held(h.iter().map(|p| (p.0, p.1)).collect());
                        }
                        if t.prepared {
                            snat.retable(&next, None)?;
                            self.tms[k].prepared = false;
                            self.tms[k].committed = true;
                            set_tables(&self.tms[k].tables, &next, None);
                        }
                        return Ok(Ok(Answer::Committed(CommitAnswer {
                            table: to.clone(),
                            persist_error: None,
                            pins_refused: None,
                        })));
                    }
                    Call::Abort(_) => {
                        let aborted = t.prepared;
                        if aborted {
                            // A joining TM the running table does not list
                            // (a failover replaced it mid-push) keeps what
                            // it has: no bucket steers to it.
                            if self.table.tm_index_by_id(id).is_some() {
                                snat.retable(&self.table, None)?;
                                set_tables(&self.tms[k].tables, &self.table, None);
                            }
                            self.tms[k].prepared = false;
                        }
                        return Ok(Ok(Answer::Aborted(AbortAnswer {
                            table: TableId::of(if self.tms[k].committed {
                                &next
                            } else {
                                &self.table
                            }),
                            aborted,
                        })));
                    }
                    _ => return refused("not a TM call"),
                }
                let prepared = self.tms[k].prepared;
                let current = if self.tms[k].committed {
                    &next
                } else {
                    &self.table
                };
                let moving = prepared.then(|| self.tms[k].tables.moving(&next) as u64);
                Ok(Ok(Answer::Tm(TmTransition {
                    phase: if prepared {
                        TmPhase::Prepared
                    } else {
                        TmPhase::Idle
                    },
                    current: current.version(),
                    current_checksum: allocation::file::checksum(current),
                    next: prepared.then(|| next.version()),
                    next_checksum: prepared.then(|| to.checksum.clone()),
                    connections_in_moved_buckets: moving,
                    ports_in_moved_buckets: prepared.then(|| {
                        let ports = snat.moving_ports(&next);
                        self.tms[k].tables.moving_ports_to_drain(&ports) as u64
                    }),
                })))
            }
        }
    }

    fn op(&mut self, op: Op) -> Result<(), SimError> {
        match op {
            Op::Coordinate => self.coordinate()?,
            Op::Resume => self.resume()?,
            Op::Failover(id, ev, queued) => {
                let dead = self.tms.iter().any(|t| t.id == id && !t.alive);
                if dead && !self.detected.contains(&id) {
                    self.detected.push(id);
                }
                if !dead {
                    // Back (readmitted) before it was detected: nothing to do.
                } else if let Some(next) = self.next.clone() {
                    // A push under way: both tables fail over; the push
                    // carries on (the coordinator leaves the TM out once
                    // every distributor failed it over).
                    let failed = self.detected_in(&next);
                    let change = next.failover(&failed)?;
                    let optimum = failed.iter().map(|&k| next.buckets_of(k) as usize).sum();
                    if let Some(e) = self.report.events.get_mut(ev) {
                        e.moved_buckets = change.moves.len();
                        e.optimum = optimum;
                        e.window_ms = self.sc.detect_ns as f64 / 1e6;
                    }
                    self.fail_over_in_push()?;
                } else {
                    let idx = index_of(&self.table, id)?;
                    // Every failed TM, in any order: the same table everywhere.
                    let change = self.table.failover(&self.failed_indexes(None))?;
                    if let Some(e) = self.report.events.get_mut(ev) {
                        e.moved_buckets = change.moves.len();
                        e.optimum = self.table.buckets_of(idx) as usize;
                        e.window_ms = self.sc.detect_ns as f64 / 1e6;
                    }
                    self.install(change.table)?;
                    if !queued {
                        self.open_phase(&format!("failover without TM {id}"));
                    }
                }
                if queued {
                    self.busy = false;
                    self.open_phase(&format!("failover without TM {id}"));
                    self.start_pending()?;
                }
            }
        }
        Ok(())
    }

    fn open_phase(&mut self, label: &str) {
        let tms = self
            .table
            .tms()
            .iter()
            .enumerate()
            .map(|(i, t)| TmShare {
                id: t.id,
                name: t.name.clone(),
                group: t.group,
                flows: 0,
                share: 0.0,
                target: f64::from(self.table.buckets_of(i as TmIndex))
                    / allocation::TABLE_SIZE as f64,
            })
            .collect();
        self.report.phases.push(PhaseReport {
            after: label.to_string(),
            version: self.table.version(),
            flows: 0,
            tms,
            max_abs_diff: 0.0,
            chi_square: 0.0,
            dof: 0,
            p_value: 1.0,
        });
        self.phase = Some(self.report.phases.len() - 1);
    }
}

/// The pins in force on `plan` but the dead TMs' (their flows are gone),
/// and its capacity: what stdd's `carry_state` carries.
fn pins_but(plan: &Plan, dead: &[u32]) -> (Arc<[Pin]>, usize) {
    let (list, cap) = plan.pin_list();
    let list = list
        .iter()
        .filter(|p| !dead.contains(&p.tm))
        .copied()
        .collect();
    (list, cap)
}

/// A call's name, for reports.
fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Prepare(_) => "prepare",
        Call::HeldPorts => "held-ports",
        Call::TmState => "tm-state",
        Call::Pins => "pins",
        Call::Switch(_) => "switch",
        Call::Open(_) => "open",
        Call::DistributorState => "distributor-state",
        Call::Commit(_) => "commit",
        Call::Abort(_) => "abort",
    }
}

/// Runs `sc` and returns its report.
pub fn simulate(sc: Scenario) -> Result<Report, SimError> {
    Sim::new(sc)?.run()
}

impl Report {
    fn count_owner(&mut self, phase: usize, tm: u32) {
        if let Some(p) = self.phases.get_mut(phase) {
            p.flows += 1;
            if let Some(t) = p.tms.iter_mut().find(|t| t.id == tm) {
                t.flows += 1;
            }
        }
    }

    /// Shares, their largest distance from target, and the chi-square test
    /// per phase: each TM against its own group's flows (the groups' flow
    /// counts are what the traffic mix made them; within a group the table
    /// says how they split), the groups' statistics summed.
    fn finish(&mut self) {
        for p in &mut self.phases {
            let groups = p.tms.iter().map(|t| t.group + 1).max().unwrap_or(0);
            let mut n = vec![0u64; groups];
            for t in &p.tms {
                n[t.group] += t.flows;
            }
            for t in &mut p.tms {
                t.share = t.flows as f64 / n[t.group].max(1) as f64;
            }
            p.max_abs_diff = p
                .tms
                .iter()
                .map(|t| (t.share - t.target).abs())
                .fold(0.0, f64::max);
            let (mut x, mut dof) = (0.0, 0);
            for (g, &ng) in n.iter().enumerate() {
                let cells: Vec<&TmShare> = p.tms.iter().filter(|t| t.group == g).collect();
                let observed: Vec<u64> = cells.iter().map(|t| t.flows).collect();
                let expected: Vec<f64> = cells.iter().map(|t| t.target * ng as f64).collect();
                let (xg, dg) = stats::chi_square(&observed, &expected);
                x += xg;
                dof += dg;
            }
            p.chi_square = x;
            p.dof = dof;
            p.p_value = stats::chi_square_p(x, dof);
        }
    }
}
