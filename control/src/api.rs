//! The admin API's messages: what stdd, tmd and stdctl send each other, as serde types; a table is named by its version and its content checksum together.
//!
//! Answers are parsed strictly: a field an answer must carry is an error
//! when it is missing, never a default; [`TmTransition::check`] and
//! [`DistributorTransition::check`] refuse answers whose fields contradict
//! their phase. Unknown fields are accepted (a newer node may add some).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use allocation::{file, AllocationTable};
use serde::{Deserialize, Serialize};

/// A table's identity: version and content checksum. Two tables with one
/// version and different contents are different tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableId {
    /// The table's version.
    pub version: u64,
    /// The checksum of its contents (`fnv1a64:…`, as in the table file).
    pub checksum: String,
}

impl TableId {
    /// The identity of `table`.
    pub fn of(table: &AllocationTable) -> Self {
        TableId {
            version: table.version(),
            checksum: file::checksum(table),
        }
    }
}

impl TableId {
    /// The refusal of `self` where a node has `other` (`what`: "running",
    /// "prepared"): the same version with other contents. `None` when they
    /// are the same table or different versions.
    pub fn conflict(&self, what: &str, other: &TableId) -> Option<String> {
        (self.version == other.version && self != other).then(|| {
            format!(
                "table rejected: it is version {} with checksum {}, but the {what} version {} has checksum {}: a different table with the same version",
                self.version, self.checksum, other.version, other.checksum
            )
        })
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {} ({})", self.version, self.checksum)
    }
}

/// Where a distributor is in a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistributorPhase {
    /// One table, no transition.
    Idle,
    /// Steering by a new table, keeping the previous one for moved buckets.
    Switched,
    /// Switched, and new flows in moved buckets start on their new owner.
    Open,
}

/// A distributor's `GET /transition` (and its answer to switch and open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistributorTransition {
    /// The phase.
    pub state: DistributorPhase,
    /// The running table's version.
    pub version: u64,
    /// The running table's checksum.
    pub checksum: String,
    /// The previous table's version while switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<u64>,
    /// The previous table's checksum while switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_checksum: Option<String>,
    /// Buckets whose owner the transition changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_buckets: Option<usize>,
    /// Flows remembered in moved buckets, all workers.
    pub remembered_flows: u64,
    /// Flows the transition memory had no room for.
    pub overflows: u64,
    /// Flows pinned to their old owner (see [`TmPins`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_flows: Option<u64>,
    /// Pins refused: no room, or toward a TM no table in force has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins_refused: Option<u64>,
    /// Restarted while switched to this table: the flows it and the
    /// running table steer to different TMs are dropped until a switch
    /// and an open with pins, a commit or an abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovering: Option<TableId>,
    /// Steering by a failover table it derived on its own from the
    /// operator's: which, and for which failed TMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_over: Option<FailedOver>,
}

/// The failover a distributor applies on its own (its TM probes) over the
/// tables an operator installed: `version`/`checksum` of its state are the
/// derived table's; these name what it was derived from. A transition
/// under way carries on over the failover tables of both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedOver {
    /// The operator's table the running one is the failover of.
    pub table: TableId,
    /// While switched: the operator's previous table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<TableId>,
    /// The failed TMs' ids.
    pub tms: Vec<u32>,
}

impl DistributorTransition {
    /// The state of a distributor running `table` (and `previous` while switched).
    pub fn new(
        state: DistributorPhase,
        table: &AllocationTable,
        previous: Option<&AllocationTable>,
        moved_buckets: Option<usize>,
        remembered_flows: u64,
        overflows: u64,
    ) -> Self {
        let previous = previous.map(TableId::of);
        DistributorTransition {
            state,
            version: table.version(),
            checksum: file::checksum(table),
            previous_version: previous.as_ref().map(|p| p.version),
            previous_checksum: previous.map(|p| p.checksum),
            moved_buckets,
            remembered_flows,
            overflows,
            pinned_flows: None,
            pins_refused: None,
            recovering: None,
            failed_over: None,
        }
    }

    /// This state failed over from the operator's `table` (and `previous`
    /// while switched) for the TMs `tms`.
    pub fn failed_over(
        mut self,
        derived: Option<(&AllocationTable, Option<&AllocationTable>, &[u32])>,
    ) -> Self {
        self.failed_over = derived.map(|(t, p, tms)| FailedOver {
            table: TableId::of(t),
            previous: p.map(TableId::of),
            tms: tms.to_vec(),
        });
        self
    }

    /// True if it steers by `id`, or by a failover table derived from it.
    pub fn runs(&self, id: &TableId) -> bool {
        self.table() == *id || self.failed_over.as_ref().is_some_and(|f| f.table == *id)
    }

    /// The TMs it fails over (none when it runs an operator's table).
    pub fn failed_tms(&self) -> &[u32] {
        self.failed_over.as_ref().map_or(&[], |f| &f.tms)
    }

    /// This state recovering from a restart while switched to `switched`.
    pub fn recovering(mut self, switched: Option<&AllocationTable>) -> Self {
        self.recovering = switched.map(TableId::of);
        self
    }

    /// This state with the pins in force: kept, and refused.
    pub fn with_pins(mut self, kept: u64, refused: u64) -> Self {
        self.pinned_flows = Some(kept);
        self.pins_refused = Some(refused);
        self
    }

    /// The running table.
    pub fn table(&self) -> TableId {
        TableId {
            version: self.version,
            checksum: self.checksum.clone(),
        }
    }

    /// The previous table while switched.
    pub fn previous(&self) -> Option<TableId> {
        Some(TableId {
            version: self.previous_version?,
            checksum: self.previous_checksum.clone()?,
        })
    }

    /// Refuses an answer whose fields contradict its phase.
    pub fn check(&self) -> Result<(), String> {
        let switched = self.state != DistributorPhase::Idle;
        match (switched, self.previous_version, &self.previous_checksum) {
            (true, Some(_), Some(_)) | (false, None, None) => Ok(()),
            (true, _, _) => Err(format!(
                "state {:?} without previous_version and previous_checksum",
                self.state
            )),
            (false, _, _) => Err("state idle with a previous table".into()),
        }
    }
}

/// Where a TM is in a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TmPhase {
    /// One table, no transition.
    Idle,
    /// A next table is prepared: only ports valid under both are handed out.
    Prepared,
}

/// A TM's `GET /transition` (and its answer to prepare).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmTransition {
    /// The phase.
    pub phase: TmPhase,
    /// The running table's version.
    pub current: u64,
    /// The running table's checksum.
    pub current_checksum: String,
    /// The prepared table's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
    /// The prepared table's checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_checksum: Option<String>,
    /// Open connections in buckets the prepared table moves away (prepared only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_in_moved_buckets: Option<u64>,
    /// Self-source ports in use in buckets the prepared table moves away (prepared only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports_in_moved_buckets: Option<u64>,
}

impl TmTransition {
    /// The running table.
    pub fn current(&self) -> TableId {
        TableId {
            version: self.current,
            checksum: self.current_checksum.clone(),
        }
    }

    /// The prepared table.
    pub fn next(&self) -> Option<TableId> {
        Some(TableId {
            version: self.next?,
            checksum: self.next_checksum.clone()?,
        })
    }

    /// What a prepared TM still has in buckets moving away: its open
    /// connections there, or the self-source ports it holds there (UDP
    /// sessions among them: a port the new owner could hand out again
    /// toward the same server), whichever is more. Drained at zero.
    pub fn still_moving(&self) -> u64 {
        self.connections_in_moved_buckets
            .unwrap_or(0)
            .max(self.ports_in_moved_buckets.unwrap_or(0))
    }

    /// Refuses an answer whose fields contradict its phase.
    pub fn check(&self) -> Result<(), String> {
        match self.phase {
            TmPhase::Prepared => {
                for (name, present) in [
                    ("next", self.next.is_some()),
                    ("next_checksum", self.next_checksum.is_some()),
                    (
                        "connections_in_moved_buckets",
                        self.connections_in_moved_buckets.is_some(),
                    ),
                ] {
                    if !present {
                        return Err(format!("phase prepared without {name}"));
                    }
                }
                Ok(())
            }
            TmPhase::Idle if self.next.is_some() || self.next_checksum.is_some() => {
                Err("phase idle with a next table".into())
            }
            TmPhase::Idle => Ok(()),
        }
    }
}

/// A self-source port another TM holds: `["addr", port]` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeldPort(pub IpAddr, pub u16);

/// `POST /transition/prepare` to a TM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// The next table, as its file text.
    pub table: String,
    /// For a TM joining (no bucket now, some in the next table): the ports
    /// the members hold in moving buckets, which it must not take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<HeldPort>>,
}

/// A flow a TM serves, both directions alike, and its idle timeout in ms
/// (0: none): `[protocol, "addr:port", "addr:port", idle_ms]` on the wire
/// (the endpoints in either order). A distributor's pin of it ends once it
/// has been idle that long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PinnedFlow(pub u8, pub SocketAddr, pub SocketAddr, pub u64);

impl PinnedFlow {
    /// The pin of `flow` with idle timeout `idle_ms` (a flow without ports
    /// gets port 0 both sides).
    pub fn of(flow: &allocation::Flow, idle_ms: u64) -> Self {
        let (sp, dp) = flow.ports.unwrap_or((0, 0));
        PinnedFlow(
            flow.protocol,
            SocketAddr::new(flow.src, sp),
            SocketAddr::new(flow.dst, dp),
            idle_ms,
        )
    }

    /// Its idle timeout in nanoseconds (0: none).
    pub fn idle_ns(&self) -> u64 {
        self.3.saturating_mul(1_000_000)
    }

    /// The flow it names; only TCP and UDP flows are pinned.
    pub fn flow(&self) -> Result<allocation::Flow, String> {
        use allocation::rules::proto;
        if self.0 != proto::TCP && self.0 != proto::UDP {
            return Err(format!("protocol {} is not TCP or UDP", self.0));
        }
        Ok(allocation::Flow::with_ports(
            self.0,
            self.1.ip(),
            self.1.port(),
            self.2.ip(),
            self.2.port(),
        ))
    }
}

/// A TM's `GET /transition/pins`: the flows it serves that some table in
/// force (the running one, and the prepared one during a transition) does
/// not steer to it — UDP sessions and connections, each by both its sides —
/// and the self-source ports those flows hold in buckets it does not own
/// under that table. The distributors pin the flows to it past the commit
/// (DESIGN §4); the other TMs keep the ports free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmPins {
    /// The TM's id in the tables.
    pub tm: u32,
    /// The table the answer is against (the prepared one, or the running one).
    pub table: TableId,
    /// The flows.
    pub flows: Vec<PinnedFlow>,
    /// Its self-source ports among them.
    pub ports: Vec<HeldPort>,
}

impl TmPins {
    /// TM `tm`'s answer against `table`: its flows (each with its idle
    /// timeout in ms) and the self-source ports they hold.
    pub fn new(
        tm: u32,
        table: TableId,
        flows: &[(allocation::Flow, u64)],
        ports: &[(std::net::IpAddr, u16)],
    ) -> Self {
        TmPins {
            tm,
            table,
            flows: flows
                .iter()
                .map(|(f, idle)| PinnedFlow::of(f, *idle))
                .collect(),
            ports: ports.iter().map(|&(a, port)| HeldPort(a, port)).collect(),
        }
    }
}

/// The body of a distributor's `POST /transition/open` and
/// `/transition/commit`, and of a TM's `/transition/commit`: the table the
/// step is for, and what it carries. Every field may be left out (an empty
/// body): the step applies to the running transition, and leaves the pins
/// and held ports as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    /// The table's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The table's checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Distributor: the flows to pin, every TM's (they replace the pins in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins: Option<Vec<TmPins>>,
    /// TM: self-source ports the other TMs' pinned flows hold, which it
    /// must not hand out (they replace the ones held before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<HeldPort>>,
}

impl StepRequest {
    /// A step for `table`.
    pub fn for_table(table: &TableId) -> Self {
        StepRequest {
            version: Some(table.version),
            checksum: Some(table.checksum.clone()),
            ..StepRequest::default()
        }
    }

    /// Every pinned flow carried, with its TM id and idle timeout (ns); a flow that is not TCP or
    /// UDP is an error naming it. Empty when the step carries no pins.
    pub fn pinned_flows(&self) -> Result<Vec<(u32, allocation::Flow, u64)>, String> {
        let list = self.pins.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(list.iter().map(|t| t.flows.len()).sum());
        for t in list {
            for (i, f) in t.flows.iter().enumerate() {
                let flow = f
                    .flow()
                    .map_err(|e| format!("pins of TM {}: flow {i}: {e}", t.tm))?;
                out.push((t.tm, flow, f.idle_ns()));
            }
        }
        Ok(out)
    }

    /// The table named, if any; a version without checksum (or the
    /// reverse) is an error.
    pub fn table(&self) -> Result<Option<TableId>, String> {
        match (&self.version, &self.checksum) {
            (Some(v), Some(c)) => Ok(Some(TableId {
                version: *v,
                checksum: c.clone(),
            })),
            (None, None) => Ok(None),
            _ => Err("a table is named by both its version and its checksum".into()),
        }
    }
}

/// The answer to `POST /transition/commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitAnswer {
    /// The table now running alone.
    pub table: TableId,
    /// Why the committed table could not be written where the daemon reads
    /// it at start (a restart would then come back on an older table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_error: Option<String>,
    /// A distributor: pins it refused (no room, no route to their TM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins_refused: Option<u64>,
}

/// The answer to `POST /transition/abort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortAnswer {
    /// The table now running alone.
    pub table: TableId,
    /// False when there was nothing to abort (the node was idle already).
    pub aborted: bool,
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_tm_answer_missing_a_field_is_an_error_not_a_default() {
        // A restarted tmd answering `{}`.
        assert!(serde_json::from_str::<TmTransition>("{}").is_err());
        let no_count: TmTransition = serde_json::from_str(
            r#"{"phase":"prepared","current":4,"current_checksum":"a","next":5,"next_checksum":"b"}"#,
        )
        .expect("parses");
        assert_eq!(
            no_count.check(),
            Err("phase prepared without connections_in_moved_buckets".into())
        );
        // A count that is not an integer.
        assert!(serde_json::from_str::<TmTransition>(
            r#"{"phase":"prepared","current":4,"current_checksum":"a","next":5,"next_checksum":"b","connections_in_moved_buckets":"3"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<TmTransition>(
            r#"{"phase":"prepared","current":4,"current_checksum":"a","next":5,"next_checksum":"b","connections_in_moved_buckets":-1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<TmTransition>(
            r#"{"phase":"sleeping","current":4,"current_checksum":"a"}"#
        )
        .is_err());
    }

    #[test]
    fn a_different_table_with_the_same_version_conflicts() {
        let id = |v, c: &str| TableId {
            version: v,
            checksum: c.into(),
        };
        let why = id(3, "b")
            .conflict("running", &id(3, "a"))
            .expect("conflict");
        assert!(
            why.contains("checksum b") && why.contains("running version 3 has checksum a"),
            "{why}"
        );
        assert_eq!(id(3, "a").conflict("running", &id(3, "a")), None);
        assert_eq!(id(4, "b").conflict("running", &id(3, "a")), None);
    }

    #[test]
    fn held_ports_are_pairs_on_the_wire() {
        let r = PrepareRequest {
            table: "t".into(),
            held: Some(vec![HeldPort("10.20.0.100".parse().expect("ip"), 4242)]),
        };
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(text, r#"{"table":"t","held":[["10.20.0.100",4242]]}"#);
        assert_eq!(
            serde_json::from_str::<PrepareRequest>(&text).expect("back"),
            r
        );
        assert!(
            serde_json::from_str::<PrepareRequest>(r#"{"table":"t","held":"10.0.0.1"}"#).is_err()
        );
        assert!(serde_json::from_str::<PrepareRequest>(
            r#"{"table":"t","held":[["10.0.0.1",70000]]}"#
        )
        .is_err());
    }
}

/// `GET /persistence` on a TM: its persistence domains and the bindings it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceView {
    /// The TM's id.
    pub tm_id: u32,
    /// One per virtual server with persistence or buddy group.
    pub domains: Vec<PersistenceDomain>,
}

/// One persistence domain of a TM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceDomain {
    /// The virtual server's or buddy group's name.
    pub name: String,
    /// Its virtual servers.
    pub virtual_servers: Vec<String>,
    /// A buddy group (servers matched by host address).
    pub buddy_group: bool,
    /// IPv4 prefix length clients are grouped by.
    pub v4_prefix: u8,
    /// IPv6 prefix length clients are grouped by.
    pub v6_prefix: u8,
    /// How long a binding outlives its client's last connection, ms.
    pub timeout_ms: u64,
    /// New connections that kept their client's binding.
    pub hits: u64,
    /// New connections of a client without a live binding.
    pub misses: u64,
    /// New connections whose client's server was not usable: bound anew.
    pub rebinds: u64,
    /// Live bindings in all.
    pub bindings_total: u64,
    /// Live bindings (at most 10,000).
    pub bindings: Vec<PersistenceBinding>,
}

/// A client's binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceBinding {
    /// The client key: its address masked to the domain's prefix.
    pub client: IpAddr,
    /// The server: `addr:port`, or the host address alone in a buddy group.
    pub server: String,
    /// Connections open now.
    pub open: u32,
    /// Since its last connection ended, ms (0 while one is open).
    pub idle_ms: u64,
}

/// `GET /snat` on a TM: its server side as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmSnat {
    /// The TM's id.
    pub tm_id: u32,
    /// The version of the table it runs.
    pub table_version: u64,
    /// The port range self-source ports come from (`lo-hi`).
    pub range: String,
    /// Its SNAT addresses.
    pub addresses: Vec<SnatAddress>,
    /// The servers it connects to from self-source ports.
    pub servers: Vec<ServerSide>,
}

/// A SNAT address of a TM, and its self-source ports in use and free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatAddress {
    /// The address.
    pub address: std::net::IpAddr,
    /// Ports in use.
    pub in_use: usize,
    /// Ports free.
    pub free: usize,
}

/// A server a TM connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSide {
    /// The virtual server.
    pub vs: String,
    /// Its pool.
    pub pool: String,
    /// IP protocol number.
    pub protocol: u8,
    /// The server.
    pub server: std::net::SocketAddr,
}
