//! What a simulation runs: the cluster, the traffic mix, and the operator events at given points of the run.

use std::fmt;

use allocation::{PortRange, Profile, Rule};
use serde::Serialize;

/// Address families of the clients (and of the servers they reach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
    /// Half and half, flow by flow.
    Mixed,
}

/// How clients pick their source ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortPattern {
    /// Uniformly random in 1024–65535 (per client, never two open flows on one port).
    Random,
    /// Each client counts up from 32768.
    Sequential,
    /// Each client steps by this stride from 1024 (carrier NAT, some stacks).
    Strided(u16),
    /// Every flow from its own client address, all from port 40000.
    Fixed,
}

/// An operator's (or a failure's) event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A new table version with the same owners, swapped in directly.
    Swap,
    /// Rebalance to a profile with the transition protocol (DESIGN §4).
    Rebalance(#[serde(serialize_with = "profile_name")] Profile),
    /// TM `id` fails: distributors detect it and switch to its failover table.
    FailTm(u32),
    /// TM `id` (failed earlier) is readmitted with the transition protocol.
    ReturnTm(u32),
    /// A new TM joins with the transition protocol.
    AddTm,
    /// TM `id` is drained (its share to zero) with the transition protocol:
    /// its open connections finish where they are.
    DrainTm(u32),
    /// `stdctl rollback`: the table the last commit (or swap) replaced,
    /// back as a new version with the transition protocol.
    Rollback,
    /// The coordinator of the push in progress (or of the next one) is
    /// killed once it has made this many calls to nodes — after the last
    /// one acted, before its answer is read — and a second run of the same
    /// push resumes it.
    CoordinatorDies(u32),
}

fn profile_name<S: serde::Serializer>(p: &Profile, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.describe())
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Swap => write!(f, "table swap"),
            Event::Rebalance(p) => write!(f, "rebalance to {}", p.describe()),
            Event::FailTm(id) => write!(f, "TM {id} fails"),
            Event::ReturnTm(id) => write!(f, "TM {id} readmitted"),
            Event::AddTm => write!(f, "a TM is added"),
            Event::DrainTm(id) => write!(f, "TM {id} drained"),
            Event::Rollback => write!(f, "rollback"),
            Event::CoordinatorDies(n) => write!(f, "the coordinator dies after {n} calls"),
        }
    }
}

/// An event at a point of the run: `at` is the fraction of flows started before it (0–1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timed {
    /// Fraction of the flows started before the event.
    pub at: f64,
    /// The event.
    pub what: Event,
}

/// A second TM group ("part", the scenario's profile): the flows its rules
/// select — in either direction, as the distributors classify them — go to
/// its TMs; every other TM stays in the default group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Partition {
    /// Its rules (at least one).
    pub rules: Vec<Rule>,
    /// Its TMs, by id (at least one; the default group keeps at least one).
    pub tms: Vec<u32>,
    /// Source affinity (`hash = "address"`, masked to these IPv4 and IPv6
    /// prefix lengths) instead of the endpoint hash. Its TMs are DNAT-only,
    /// as tmd requires: they keep the client's endpoint toward the server.
    /// Its rules must all be TCP-only (UDP sessions are not DNAT-only).
    pub source_affinity: Option<[u8; 2]>,
}

impl Partition {
    /// The group's hash mode.
    pub fn hash(&self) -> allocation::HashMode {
        match self.source_affinity {
            None => allocation::HashMode::Endpoint,
            Some([v4_prefix, v6_prefix]) => allocation::HashMode::Address {
                v4_prefix,
                v6_prefix,
            },
        }
    }
}

/// Everything a run depends on: the same scenario gives the same report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// Seed of every random choice.
    pub seed: u64,
    /// Traffic managers at the start.
    pub tms: u32,
    /// Flows (TCP connections and UDP sessions) to start.
    pub flows: u64,
    /// The table's profile at the start.
    #[serde(serialize_with = "profile_name")]
    pub profile: Profile,
    /// Parallel distributors on each side (front and back), fed by an ECMP-like spray.
    pub distributors: u32,
    /// Client address family.
    pub family: Family,
    /// Client source ports.
    pub ports: PortPattern,
    /// Share of flows that are UDP sessions (0–1).
    pub udp_share: f64,
    /// Share of UDP sessions whose request is a fragmented datagram (0–1).
    pub fragment_share: f64,
    /// Share of TCP flows that meet a packet-too-big error from a router inside the path (0–1).
    pub icmp_share: f64,
    /// Share of flows to the virtual server on port 8443 instead of 80 (0–1):
    /// server ports above some client ports.
    pub high_port_share: f64,
    /// Self-source port range of every TM (small: port exhaustion).
    #[serde(serialize_with = "range_text")]
    pub snat_range: PortRange,
    /// Operator events, in order.
    pub events: Vec<Timed>,
    /// Longest a transition waits for old owners to drain before committing, ns.
    pub drain_window_ns: u64,
    /// Mean time between flow arrivals, ns (virtual time).
    pub arrival_ns: u64,
    /// Flows each distributor worker can remember during a transition.
    pub transit_memory: usize,
    /// Flows each distributor can pin past a commit (stdd's `transition.pins`; 0: none).
    pub pins: usize,
    /// Time from a TM's failure until the distributors switch to its failover table, ns.
    pub detect_ns: u64,
    /// A second TM group, if any.
    pub partition: Option<Partition>,
}

fn range_text<S: serde::Serializer>(r: &PortRange, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}-{}", r.lo, r.hi))
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 1,
            tms: 8,
            flows: 100_000,
            profile: Profile::Uniform,
            distributors: 1,
            family: Family::V4,
            ports: PortPattern::Random,
            udp_share: 0.1,
            fragment_share: 0.2,
            icmp_share: 0.02,
            high_port_share: 0.0,
            snat_range: PortRange {
                lo: 1024,
                hi: 65535,
            },
            events: Vec::new(),
            drain_window_ns: 5_000_000_000,
            arrival_ns: 20_000,
            transit_memory: 65_536,
            pins: 131_072,
            detect_ns: 900_000_000,
            partition: None,
        }
    }
}
