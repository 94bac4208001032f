//! stdd's configuration: TOML through `config` with `STD_*` environment overrides, validated with errors that name the field.
//!
//! Every key is documented in `docs/configuration.md`; defaults are the
//! named constants below.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use allocation::{AllocationTable, MacAddr};
use serde::Deserialize;

use distributor::bridge::BridgeConfig;
use distributor::frag::FragConfig;
use distributor::steer::{Plan, PortKind};
use distributor::transit::TransitConfig;
use distributor::verdict::PortId;
use distributor::worker::WorkerConfig;

/// Default frames per receive batch.
pub const DEFAULT_BATCH: usize = 64;
/// Default receive poll timeout, in milliseconds.
pub const DEFAULT_POLL_MS: u64 = 10;

use cli_common::settings::invalid;
pub use cli_common::settings::{ConfigError, Settings};

/// What the distributor stands between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Between the clients' router and the TMs: one outside port.
    Front,
    /// Between the TMs and the servers' network: one outside port.
    Back,
    /// Both in one box: two outside ports (clients' side, servers' side).
    Combined,
}

/// The packet I/O backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Live interfaces through libpcap (one worker; one syscall per frame sent).
    Pcap,
    /// Capture files: each port reads `input` (if set) and writes `output` (if set).
    PcapFile,
    /// Live interfaces through AF_PACKET memory-mapped rings (no syscall per
    /// frame; one worker per listed CPU, flows spread by a fan-out hash).
    Afpacket,
    /// Live interfaces through AF_XDP sockets fed by an XDP program on each
    /// port (no syscall per frame; one worker per listed CPU, worker *i* on
    /// receive queue *i* of every port).
    Afxdp,
    /// Live interfaces through netmap (cargo feature `netmap`; needs the
    /// netmap kernel module).
    Netmap,
}

/// One distributor port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// What the port faces: `outside`, `tm` or `bridged`.
    pub kind: PortKindConfig,
    /// Interface (pcap backend).
    #[serde(default)]
    pub interface: Option<String>,
    /// Capture to read frames from (pcap-file backend).
    #[serde(default)]
    pub input: Option<PathBuf>,
    /// Capture to write the frames sent out of this port to (pcap-file backend).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// TM ids reached through this port (TM ports; several for a shared link).
    #[serde(default)]
    pub tms: Vec<u32>,
}

/// Port kinds as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKindConfig {
    /// Faces clients or servers.
    Outside,
    /// Faces TMs.
    Tm,
    /// A plain bridge port.
    Bridged,
}

/// The admin endpoint (`[admin]`): loopback port 9180 by default.
pub type AdminConfig = admin_http::auth::AdminConfig<9180>;

/// Worker threads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// CPUs to pin the workers to, one worker each (empty: one unpinned worker).
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Frames per receive batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Receive poll timeout, in milliseconds.
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
    /// Where the afxdp backend's XDP program runs: `native` (in the driver),
    /// `generic`, or `auto` (native where the driver supports it).
    #[serde(default = "default_xdp_mode")]
    pub xdp_mode: distributor::afxdp::XdpMode,
    /// afxdp: busy-poll budget in microseconds (0: off). The worker then
    /// runs its queues' driver polls itself (`SO_PREFER_BUSY_POLL`).
    #[serde(default)]
    pub busy_poll_us: u32,
    /// afxdp: steer the common case in the kernel (`xdp_steer`): IPv4
    /// TCP/UDP to the group MAC from an outside port, straight to its TM's
    /// port. Every TM port must then take XDP redirects (a NIC driver with
    /// `ndo_xdp_xmit`; a veth whose peer has an XDP program or GRO on).
    #[serde(default = "default_true")]
    pub xdp_steer: bool,
}

fn default_true() -> bool {
    true
}

fn default_xdp_mode() -> distributor::afxdp::XdpMode {
    distributor::afxdp::XdpMode::Auto
}

fn default_batch() -> usize {
    DEFAULT_BATCH
}

fn default_poll() -> u64 {
    DEFAULT_POLL_MS
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            cpus: Vec::new(),
            batch: DEFAULT_BATCH,
            poll_ms: DEFAULT_POLL_MS,
            xdp_mode: default_xdp_mode(),
            busy_poll_us: 0,
            xdp_steer: true,
        }
    }
}

/// Fragment handler limits (see `FragConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FragmentsConfig {
    /// Remembered first fragments.
    pub memory: usize,
    /// How long a first fragment's TM is remembered, ms.
    pub memory_ttl_ms: u64,
    /// Hold slots for early fragments.
    pub hold_slots: usize,
    /// Largest frame a hold slot takes.
    pub hold_slot_bytes: usize,
    /// How long an early fragment is held, ms.
    pub hold_ttl_ms: u64,
}

impl Default for FragmentsConfig {
    fn default() -> Self {
        let f = FragConfig::default();
        FragmentsConfig {
            memory: f.memory,
            memory_ttl_ms: f.memory_ttl_ns / 1_000_000,
            hold_slots: f.hold_slots,
            hold_slot_bytes: f.hold_slot_bytes,
            hold_ttl_ms: f.hold_ttl_ns / 1_000_000,
        }
    }
}

/// MAC learning limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeSection {
    /// Learned addresses.
    pub capacity: usize,
    /// Ageing, seconds.
    pub ageing_s: u64,
}

impl Default for BridgeSection {
    fn default() -> Self {
        let b = BridgeConfig::default();
        BridgeSection {
            capacity: b.capacity,
            ageing_s: b.ageing_ns / 1_000_000_000,
        }
    }
}

/// Transition memory limits (see `TransitConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransitionSection {
    /// Flows started in moved buckets that each worker remembers.
    pub memory: usize,
    /// A remembered flow is forgotten after this long without a packet, seconds.
    pub idle_s: u64,
    /// Flows pinned to their old owner past a commit (UDP sessions and
    /// connections the TMs report; DESIGN §4) this distributor keeps.
    pub pins: usize,
}

/// The default of `transition.pins`.
pub const DEFAULT_PINS: usize = 131_072;

impl Default for TransitionSection {
    fn default() -> Self {
        let t = TransitConfig::default();
        TransitionSection {
            memory: t.capacity,
            idle_s: t.idle_ns / 1_000_000_000,
            pins: DEFAULT_PINS,
        }
    }
}

/// The whole configuration of one `stdd`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributorConfig {
    /// Front, back or combined.
    pub role: Role,
    /// The cluster's group MAC (unicast, locally administered is usual).
    pub group_mac: String,
    /// The cluster's addresses: VIPs and SNAT addresses.
    #[serde(default)]
    pub cluster_addresses: Vec<IpAddr>,
    /// The table file.
    pub table: PathBuf,
    /// Packet I/O backend.
    pub backend: BackendKind,
    /// Ports, in order (a port's index is its number in metrics).
    #[serde(rename = "port")]
    pub ports: Vec<PortConfig>,
    /// Admin endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Worker threads.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// Fragment handler.
    #[serde(default)]
    pub fragments: FragmentsConfig,
    /// MAC learning.
    #[serde(default)]
    pub bridge: BridgeSection,
    /// Transition memory.
    #[serde(default)]
    pub transition: TransitionSection,
    /// TM liveness probes and automatic failover.
    #[serde(default)]
    pub failover: crate::failover::FailoverConfig,
}

/// Environment variables that override configuration keys: the prefix, one
/// `_`, then the key, nested keys joined with `__` (`STD_TABLE` is
/// `table`, `STD_ADMIN__LISTEN` is `admin.listen`). Key
/// names are case-insensitive; unknown keys are errors, as in the file.
pub const ENV_PREFIX: &str = "STD";

impl Settings for DistributorConfig {
    const PREFIX: &'static str = ENV_PREFIX;

    /// Relative paths resolved, then [`DistributorConfig::validated`].
    fn finish(self, base: &Path) -> Result<Self, ConfigError> {
        self.resolved(base).validated()
    }
}

impl DistributorConfig {
    /// Relative paths resolved against the configuration file's directory.
    fn resolved(mut self, base: &Path) -> Self {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.table);
        for port in &mut self.ports {
            if let Some(p) = port.input.as_mut() {
                fix(p);
            }
            if let Some(p) = port.output.as_mut() {
                fix(p);
            }
        }
        self
    }

    /// Checks every rule that types cannot; the error names the key.
    pub fn validated(self) -> Result<Self, ConfigError> {
        let mac: MacAddr = self
            .group_mac
            .parse()
            .map_err(|e| invalid("group_mac", format!("{e}")))?;
        if mac.is_multicast() {
            return Err(invalid("group_mac", "must be a unicast MAC"));
        }
        if self.ports.is_empty() {
            return Err(invalid("port", "at least one [[port]] is needed"));
        }
        let outside = self
            .ports
            .iter()
            .filter(|p| p.kind == PortKindConfig::Outside)
            .count();
        let want = match self.role {
            Role::Front | Role::Back => 1,
            Role::Combined => 2,
        };
        if outside != want {
            return Err(invalid(
                "port",
                format!(
                    "role {:?} needs {want} outside port(s), found {outside}",
                    self.role
                )
                .to_lowercase(),
            ));
        }
        if self.ports.len() > usize::from(PortId::MAX) {
            return Err(invalid("port", "too many ports"));
        }
        let mut seen_tms = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            if self.ports[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid(
                    format!("port[{i}].name"),
                    format!("'{}' is used twice", p.name),
                ));
            }
            match (p.kind, p.tms.is_empty()) {
                (PortKindConfig::Tm, true) => {
                    return Err(invalid(
                        format!("port[{i}].tms"),
                        "a TM port must list the TM ids it reaches",
                    ))
                }
                (PortKindConfig::Outside | PortKindConfig::Bridged, false) => {
                    return Err(invalid(format!("port[{i}].tms"), "only TM ports reach TMs"))
                }
                _ => {}
            }
            for &id in &p.tms {
                if seen_tms.contains(&id) {
                    return Err(invalid(
                        format!("port[{i}].tms"),
                        format!("TM id {id} is reached through two ports"),
                    ));
                }
                seen_tms.push(id);
            }
            match self.backend {
                BackendKind::Pcap
                | BackendKind::Afpacket
                | BackendKind::Afxdp
                | BackendKind::Netmap
                    if p.interface.is_none() =>
                {
                    return Err(invalid(
                        format!("port[{i}].interface"),
                        "the pcap, afpacket, afxdp and netmap backends need an interface per port",
                    ))
                }
                BackendKind::PcapFile if p.input.is_none() && p.output.is_none() => {
                    return Err(invalid(
                        format!("port[{i}]"),
                        "the pcap-file backend needs an input or an output capture",
                    ))
                }
                _ => {}
            }
        }
        if self.backend == BackendKind::Netmap && !cfg!(feature = "netmap") {
            return Err(invalid(
                "backend",
                "this stdd was built without the netmap backend (cargo feature `netmap`)",
            ));
        }
        if self.backend == BackendKind::Pcap && self.workers.cpus.len() > 1 {
            return Err(invalid(
                "workers.cpus",
                "the pcap backend runs one worker: list at most one CPU",
            ));
        }
        for (i, t) in self.failover.tms.iter().enumerate() {
            if !self.ports.iter().any(|p| p.tms.contains(&t.id)) {
                return Err(invalid(
                    format!("failover.tm[{i}].id"),
                    format!("TM id {} is on no port", t.id),
                ));
            }
            if t.health.starts_with("https://") {
                if self.failover.tls.ca.is_none() {
                    return Err(invalid(
                        format!("failover.tm[{i}].health"),
                        "is https:// but failover.tls.ca is not set (nothing is trusted by default)",
                    ));
                }
            } else if !t.health.starts_with("http://") {
                return Err(invalid(
                    format!("failover.tm[{i}].health"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if let Err(e) = self.failover.tls.load("failover.tls") {
            return Err(invalid("failover.tls", e.to_string()));
        }
        if self.failover.misses == 0 || self.failover.interval_ms == 0 {
            return Err(invalid(
                "failover",
                "misses and interval_ms must be at least 1",
            ));
        }
        if self.transition.memory == 0 || self.transition.memory > 1 << 24 {
            return Err(invalid("transition.memory", "must be 1 to 16777216"));
        }
        if self.transition.pins > 1 << 22 {
            return Err(invalid("transition.pins", "must be at most 4194304"));
        }
        if self.transition.idle_s == 0 {
            return Err(invalid("transition.idle_s", "must be at least 1"));
        }
        if self.workers.batch == 0 || self.workers.batch > 4096 {
            return Err(invalid("workers.batch", "must be 1 to 4096"));
        }
        if let Some((key, why)) = self.admin.insecure() {
            return Err(invalid(key, why));
        }
        if self.fragments.hold_slot_bytes < 64 || self.fragments.hold_slot_bytes > 65_535 {
            return Err(invalid("fragments.hold_slot_bytes", "must be 64 to 65535"));
        }
        Ok(self)
    }

    /// The group MAC (validated).
    pub fn group_mac(&self) -> MacAddr {
        self.group_mac.parse().unwrap_or_default()
    }

    /// The worker limits.
    pub fn worker_config(&self) -> WorkerConfig {
        let f = &self.fragments;
        WorkerConfig {
            frag: FragConfig {
                memory: f.memory,
                memory_ttl_ns: f.memory_ttl_ms * 1_000_000,
                hold_slots: f.hold_slots,
                hold_slot_bytes: f.hold_slot_bytes,
                hold_ttl_ns: f.hold_ttl_ms * 1_000_000,
            },
            bridge: BridgeConfig {
                capacity: self.bridge.capacity,
                ageing_ns: self.bridge.ageing_s * 1_000_000_000,
            },
            transit: TransitConfig {
                capacity: self.transition.memory,
                idle_ns: self.transition.idle_s.saturating_mul(1_000_000_000),
            },
        }
    }

    /// `plan` with the live state of `from` (the plan it replaces): its
    /// pinned flows, except those of the TMs in `dropped` (failed: their
    /// flows are gone), and its recovery from a restart mid-transition.
    pub fn carry_state(&self, plan: Plan, from: &Plan, dropped: &[u32]) -> Plan {
        let plan = plan.carry_recovery(from);
        let (list, _) = from.pin_list();
        if list.is_empty() {
            return plan;
        }
        let list: std::sync::Arc<[distributor::pins::Pin]> = if dropped.is_empty() {
            list
        } else {
            list.iter()
                .filter(|p| !dropped.contains(&p.tm))
                .copied()
                .collect()
        };
        plan.with_pins(list, self.transition.pins)
    }

    /// The steering plan for `table` under this configuration. Every TM of
    /// the table must be reachable through a port, and every TM id a port
    /// names must be in the table.
    pub fn plan(&self, table: AllocationTable) -> Result<Plan, ConfigError> {
        for t in table.tms() {
            if !self.ports.iter().any(|p| p.tms.contains(&t.id)) {
                return Err(invalid(
                    "port",
                    format!(
                        "TM id {} ('{}') of table version {} has no port",
                        t.id,
                        t.name,
                        table.version()
                    ),
                ));
            }
        }
        let kinds = self
            .ports
            .iter()
            .map(|p| match p.kind {
                PortKindConfig::Outside => PortKind::Outside,
                PortKindConfig::Tm => PortKind::Tm,
                PortKindConfig::Bridged => PortKind::Bridged,
            })
            .collect();
        let map: Vec<(u32, PortId)> = self
            .ports
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.tms.iter().map(move |&id| (id, i as PortId)))
            .collect();
        Plan::new(
            table,
            self.group_mac(),
            &self.cluster_addresses,
            kinds,
            &map,
        )
        .map_err(|e| invalid("port", e.to_string()))
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const GOOD: &str = r#"
role = "front"
group_mac = "02:53:54:44:00:01"
cluster_addresses = ["198.51.100.10", "10.1.0.1"]
table = "table.toml"
backend = "pcap"

[[port]]
name = "outside"
kind = "outside"
interface = "eth0"

[[port]]
name = "tms"
kind = "tm"
interface = "eth1"
tms = [0, 1, 2, 3]

[admin]
listen = "127.0.0.1:9180"
"#;

    fn load(text: &str) -> Result<DistributorConfig, ConfigError> {
        load_env(text, &[])
    }

    /// Loads `text` with exactly the environment `env` (never the process's).
    fn load_env(text: &str, env: &[(&str, &str)]) -> Result<DistributorConfig, ConfigError> {
        testkit::load_config(text, env)
    }

    #[test]
    fn environment_overrides_are_std_and_the_key_nested_with_double_underscores() {
        let cfg = load_env(
            GOOD,
            &[
                ("STD_ADMIN__LISTEN", "0.0.0.0:9181"),
                ("STD_ADMIN__TOKEN", "s3cret"),
                ("STD_ADMIN__INSECURE_PLAINTEXT", "true"),
                ("STD_WORKERS__BATCH", "128"),
                ("STD_TABLE", "/srv/std/other.toml"),
                ("std_role", "back"),
                ("STDX_ROLE", "ignored: another prefix"),
                ("TMD_WORKERS", "ignored: tmd's"),
            ],
        )
        .expect("overrides");
        assert_eq!(cfg.admin.listen, "0.0.0.0:9181".parse().expect("addr"));
        assert_eq!(cfg.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.workers.batch, 128);
        assert_eq!(cfg.table, PathBuf::from("/srv/std/other.toml"));
        assert_eq!(cfg.role, Role::Back);
        // The file alone, for comparison.
        let plain = load(GOOD).expect("file");
        assert_eq!(plain.admin.listen, "127.0.0.1:9180".parse().expect("addr"));
        assert_eq!(plain.role, Role::Front);
        // A single underscore inside a nested key, or the old double one after
        // the prefix, is an unknown key: an error naming the variable.
        for var in ["STD_ADMIN_LISTEN", "STD__ADMIN__LISTEN", "STD_ADMIN__LISTN"] {
            match load_env(GOOD, &[(var, "0.0.0.0:9181")]) {
                Err(ConfigError::Load(e)) => assert!(e.contains(var), "{var}: {e}"),
                other => panic!("{var}: {other:?}"),
            }
        }
    }

    fn field_of(r: Result<DistributorConfig, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { field, .. }) => field,
            Err(e) => format!("load: {e}"),
            Ok(_) => "accepted".into(),
        }
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = load(GOOD).expect("config");
        assert_eq!(c.role, Role::Front);
        assert_eq!(c.workers.batch, DEFAULT_BATCH);
        assert!(c.table.is_absolute(), "relative to the file");
        assert_eq!(c.ports[1].tms, vec![0, 1, 2, 3]);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(load(
                &GOOD.replace("02:53:54:44:00:01", "01:00:5e:00:00:01")
            )),
            "group_mac"
        );
        assert_eq!(
            field_of(load(&GOOD.replace("tms = [0, 1, 2, 3]", ""))),
            "port[1].tms"
        );
        assert_eq!(
            field_of(load(&GOOD.replace("interface = \"eth1\"", ""))),
            "port[1].interface"
        );
        assert_eq!(
            field_of(load(
                &GOOD.replace("role = \"front\"", "role = \"combined\"")
            )),
            "port"
        );
        assert_eq!(
            field_of(load(&GOOD.replace("127.0.0.1:9180", "0.0.0.0:9180"))),
            "admin.token"
        );
        // The netmap backend: only in a build with the feature; a worker
        // per CPU listed (one per ring pair).
        let netmap = GOOD.replace("backend = \"pcap\"", "backend = \"netmap\"");
        if cfg!(feature = "netmap") {
            assert!(load(&netmap).is_ok());
            assert!(load(&format!("{netmap}\n[workers]\ncpus = [0, 1]\n")).is_ok());
        } else {
            assert_eq!(field_of(load(&netmap)), "backend");
        }
        // The afpacket backend takes one worker per CPU listed.
        let af = GOOD.replace("backend = \"pcap\"", "backend = \"afpacket\"");
        assert!(load(&format!("{af}\n[workers]\ncpus = [0, 1]\n")).is_ok());
        // Off loopback: a token, and TLS or plain HTTP said out loud.
        let off = GOOD
            .replace("0.0.0.0", "x")
            .replace("127.0.0.1:9180", "0.0.0.0:9180")
            .replace("[admin]", "[admin]\ntoken = \"s3cret\"");
        assert_eq!(field_of(load(&off)), "admin.tls");
        assert!(load(&off.replace("[admin]", "[admin]\ninsecure_plaintext = true")).is_ok());
        let tls =
            "\n[admin.tls]\ncert = \"/etc/std/tls/fd.pem\"\nkey = \"/etc/std/tls/fd-key.pem\"\n";
        assert!(load(&format!("{off}{tls}")).is_ok());
        let unknown = field_of(load(
            &GOOD.replace("backend = \"pcap\"", "backend = \"pcap\"\ncolour = 1"),
        ));
        assert!(unknown.contains("colour"), "{unknown}");
        let missing = field_of(load(&GOOD.replace("group_mac = \"02:53:54:44:00:01\"", "")));
        assert!(missing.contains("group_mac"), "{missing}");
        // The afxdp backend: one worker per CPU, an XDP mode, busy polling.
        let xdp = GOOD.replace("backend = \"pcap\"", "backend = \"afxdp\"");
        let cfg = load(&format!(
            "{xdp}\n[workers]\ncpus = [0, 1]\nxdp_mode = \"native\"\nbusy_poll_us = 50\n"
        ))
        .expect("afxdp config");
        assert_eq!(cfg.backend, BackendKind::Afxdp);
        assert_eq!(cfg.workers.xdp_mode, distributor::afxdp::XdpMode::Native);
        assert_eq!(cfg.workers.busy_poll_us, 50);
        assert_eq!(
            load(&xdp).expect("defaults").workers.xdp_mode,
            distributor::afxdp::XdpMode::Auto
        );
        let bad = field_of(load(&format!("{xdp}\n[workers]\nxdp_mode = \"offload\"\n")));
        assert!(bad.contains("xdp_mode"), "{bad}");
    }
}
