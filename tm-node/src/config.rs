//! tmd's configuration: TOML through `config` with `TMD_*` environment overrides, validated with errors that name the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use allocation::PortRange;
use serde::Deserialize;

use crate::balance::Method;

/// Default most connections per virtual server.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 100_000;
/// Default server connect timeout, ms.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3000;
/// Default idle timeout, ms.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 300_000;
/// Default drain deadline on SIGTERM, ms.
pub const DEFAULT_DRAIN_MS: u64 = 30_000;

use cli_common::settings::invalid;
pub use cli_common::settings::{ConfigError, Settings};

/// A real server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port.
    pub address: SocketAddr,
    /// Weight (0: no new connections).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A pool of real servers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name.
    pub name: String,
    /// Balancing method.
    #[serde(default)]
    pub method: Method,
    /// Its servers.
    pub servers: Vec<ServerConfig>,
    /// Health checks (none: every server is always up).
    #[serde(default)]
    pub health: Option<crate::health::HealthConfig>,
}

/// The transport a virtual server relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP connections.
    #[default]
    Tcp,
    /// UDP datagrams, in per-client sessions ended by the idle timeout.
    Udp,
}

/// A server a virtual server connects to from self-source ports, owned
/// ([`tm_core::snat::ServerSide`] borrows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedServerSide {
    /// The virtual server.
    pub vs: String,
    /// Its pool.
    pub pool: String,
    /// IP protocol number.
    pub protocol: u8,
    /// The server.
    pub server: SocketAddr,
}

impl OwnedServerSide {
    /// The borrowed form [`tm_core::snat::check_replies`] takes.
    pub fn side(&self) -> tm_core::snat::ServerSide<'_> {
        tm_core::snat::ServerSide {
            vs: &self.vs,
            pool: &self.pool,
            protocol: self.protocol,
            server: self.server,
        }
    }
}

/// A virtual server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualServerConfig {
    /// Name.
    pub name: String,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// VIP and port to listen on.
    pub listen: SocketAddr,
    /// The pool it forwards to.
    pub pool: String,
    /// Most connections open at once.
    #[serde(default = "max_conn")]
    pub max_connections: u64,
    /// Server connect timeout, ms.
    #[serde(default = "connect_ms")]
    pub connect_timeout_ms: u64,
    /// Idle timeout, ms.
    #[serde(default = "idle_ms")]
    pub idle_timeout_ms: u64,
    /// Source-address affinity.
    #[serde(default)]
    pub persistence: Option<crate::persist::PersistConfig>,
    /// Keep the client's address toward the server (IP_TRANSPARENT) when the
    /// server's reply steers back to this node; a self-source port otherwise.
    #[serde(default)]
    pub dnat_only: bool,
    /// Splice (zero-copy, splice(2) through a pipe) each direction once it
    /// moves full buffers; false: always copy through user space.
    #[serde(default = "yes")]
    pub splice: bool,
}

/// A buddy group (seed 003): virtual servers whose pools share physical
/// hosts (`web` on :80 and `shop` on :443), so that a client's connections
/// to any of them reach one host — servers are matched by address. Every
/// member needs `persistence`; the group takes the most granular netmask
/// and the shortest timeout of its members.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuddyGroupConfig {
    /// Name (metrics, `GET /persistence`).
    pub name: String,
    /// Its virtual servers, by name (two or more).
    pub virtual_servers: Vec<String>,
}

/// A buddy link (seed 003's asymmetric, many-to-one links: web tier → app
/// tier): a new connection to `to` goes to the host `from`'s persistence
/// would send the client to — or the host `hosts` maps it to — when `to`'s
/// pool has a usable server there; else `to` picks as it would alone.
/// `from` never follows `to`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuddyLinkConfig {
    /// The leading virtual server (it needs `persistence`).
    pub from: String,
    /// The following virtual server.
    pub to: String,
    /// Leader host → follower host (several may map to one); a host not
    /// listed maps to itself.
    #[serde(default)]
    pub hosts: Vec<HostMap>,
}

/// One entry of a buddy link's host map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMap {
    /// A host of the leader's pool.
    pub from: IpAddr,
    /// The follower's host for its clients.
    pub to: IpAddr,
}

/// A persistence domain as configured: a virtual server alone, or a buddy group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// The virtual server's or buddy group's name.
    pub name: String,
    /// Its virtual servers.
    pub members: Vec<String>,
    /// Settings (merged for a buddy group).
    pub persistence: crate::persist::PersistConfig,
    /// Servers matched by host address (a buddy group).
    pub by_host: bool,
}

fn max_conn() -> u64 {
    DEFAULT_MAX_CONNECTIONS
}
fn connect_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn idle_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}
fn yes() -> bool {
    true
}
fn drain_ms() -> u64 {
    DEFAULT_DRAIN_MS
}
fn all_ports() -> PortRange {
    PortRange {
        lo: 1024,
        hi: 65535,
    }
}

/// The whole configuration of one `tmd`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's TM id in the table.
    pub tm_id: u32,
    /// The table file.
    pub table: PathBuf,
    /// Cluster SNAT addresses, tried in order.
    pub snat_addresses: Vec<IpAddr>,
    /// Ports the self-source ports are chosen from.
    #[serde(default = "all_ports")]
    pub snat_ports: PortRange,
    /// Drain deadline on SIGTERM, ms.
    #[serde(default = "drain_ms")]
    pub drain_timeout_ms: u64,
    /// Worker threads, each with its own runtime and SO_REUSEPORT listeners
    /// (default: one per CPU).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Pools.
    #[serde(rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Virtual servers.
    #[serde(rename = "virtual_server")]
    pub virtual_servers: Vec<VirtualServerConfig>,
    /// Buddy groups: virtual servers whose clients share one host.
    #[serde(default, rename = "buddy_group")]
    pub buddy_groups: Vec<BuddyGroupConfig>,
    /// Buddy links: a virtual server that follows another's choice of host.
    #[serde(default, rename = "buddy_link")]
    pub buddy_links: Vec<BuddyLinkConfig>,
    /// Admin endpoint.
    #[serde(default)]
    pub admin: crate::admin::AdminConfig,
}

/// Environment variables that override configuration keys: the prefix, one
/// `_`, then the key, nested keys joined with `__` (`TMD_TABLE` is
/// `table`, `TMD_ADMIN__LISTEN` is `admin.listen`). Key
/// names are case-insensitive; unknown keys are errors, as in the file.
pub const ENV_PREFIX: &str = "TMD";

impl Settings for NodeConfig {
    const PREFIX: &'static str = ENV_PREFIX;

    /// The table path resolved, then [`NodeConfig::validated`].
    fn finish(mut self, base: &Path) -> Result<Self, ConfigError> {
        if self.table.is_relative() {
            self.table = base.join(&self.table);
        }
        self.validated()
    }
}

impl NodeConfig {
    /// Every (virtual server, pool, protocol, server) this node connects
    /// to from self-source ports (DNAT-only virtual servers keep the
    /// client's address: none of theirs).
    pub fn server_sides(&self) -> Vec<OwnedServerSide> {
        let mut out = Vec::new();
        for v in self.virtual_servers.iter().filter(|v| !v.dnat_only) {
            let protocol = match v.protocol {
                Protocol::Tcp => allocation::rules::proto::TCP,
                Protocol::Udp => allocation::rules::proto::UDP,
            };
            for p in self.pools.iter().filter(|p| p.name == v.pool) {
                for s in &p.servers {
                    out.push(OwnedServerSide {
                        vs: v.name.clone(),
                        pool: p.name.clone(),
                        protocol,
                        server: s.address,
                    });
                }
            }
        }
        // Health checks connect from self-source ports too, over TCP.
        for p in self.pools.iter().filter(|p| p.health.is_some()) {
            for s in &p.servers {
                out.push(OwnedServerSide {
                    vs: "(health checks)".into(),
                    pool: p.name.clone(),
                    protocol: allocation::rules::proto::TCP,
                    server: s.address,
                });
            }
        }
        out.sort_by(|a, b| (a.protocol, a.server, &a.vs).cmp(&(b.protocol, b.server, &b.vs)));
        out.dedup_by(|a, b| a.protocol == b.protocol && a.server == b.server);
        out
    }

    /// The persistence domains: each buddy group, and each virtual server
    /// with `persistence` outside one.
    pub fn persistence_domains(&self) -> Vec<DomainConfig> {
        let mut out: Vec<DomainConfig> = self
            .buddy_groups
            .iter()
            .filter_map(|g| {
                let members: Vec<crate::persist::PersistConfig> = g
                    .virtual_servers
                    .iter()
                    .filter_map(|m| self.virtual_servers.iter().find(|v| &v.name == m))
                    .filter_map(|v| v.persistence)
                    .collect();
                Some(DomainConfig {
                    name: g.name.clone(),
                    members: g.virtual_servers.clone(),
                    persistence: crate::persist::PersistConfig::merged(&members)?,
                    by_host: true,
                })
            })
            .collect();
        for v in &self.virtual_servers {
            let grouped = self
                .buddy_groups
                .iter()
                .any(|g| g.virtual_servers.contains(&v.name));
            if let (Some(p), false) = (v.persistence, grouped) {
                out.push(DomainConfig {
                    name: v.name.clone(),
                    members: vec![v.name.clone()],
                    persistence: p,
                    by_host: false,
                });
            }
        }
        out
    }

    fn check_buddy_groups(&self) -> Result<(), ConfigError> {
        for (i, g) in self.buddy_groups.iter().enumerate() {
            let at = format!("buddy_group[{i}]");
            if self.buddy_groups[..i].iter().any(|h| h.name == g.name)
                || self.virtual_servers.iter().any(|v| v.name == g.name)
            {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("'{}' is used twice (buddy groups and virtual servers share names: metrics label them alike)", g.name),
                ));
            }
            if g.virtual_servers.len() < 2 {
                return Err(invalid(
                    format!("{at}.virtual_servers"),
                    "a buddy group links two virtual servers or more",
                ));
            }
            for (j, m) in g.virtual_servers.iter().enumerate() {
                let Some(v) = self.virtual_servers.iter().find(|v| &v.name == m) else {
                    return Err(invalid(
                        format!("{at}.virtual_servers"),
                        format!("no [[virtual_server]] is named '{m}'"),
                    ));
                };
                if v.protocol != Protocol::Tcp || v.persistence.is_none() {
                    return Err(invalid(
                        format!("{at}.virtual_servers"),
                        format!("virtual server '{m}' has no persistence (a buddy group's members need it; UDP sessions have none)"),
                    ));
                }
                let elsewhere = g.virtual_servers[..j].contains(m)
                    || self.buddy_groups[..i]
                        .iter()
                        .any(|h| h.virtual_servers.contains(m));
                if elsewhere {
                    return Err(invalid(
                        format!("{at}.virtual_servers"),
                        format!(
                            "virtual server '{m}' is in two buddy groups (merge them into one)"
                        ),
                    ));
                }
            }
        }
        for (i, l) in self.buddy_links.iter().enumerate() {
            let at = format!("buddy_link[{i}]");
            let find = |n: &str| self.virtual_servers.iter().find(|v| v.name == n);
            let Some(from) = find(&l.from) else {
                return Err(invalid(
                    format!("{at}.from"),
                    format!("no [[virtual_server]] is named '{}'", l.from),
                ));
            };
            let Some(to) = find(&l.to) else {
                return Err(invalid(
                    format!("{at}.to"),
                    format!("no [[virtual_server]] is named '{}'", l.to),
                ));
            };
            if from.persistence.is_none() || from.protocol != Protocol::Tcp {
                return Err(invalid(
                    format!("{at}.from"),
                    format!(
                        "virtual server '{}' has no persistence: there is no choice to follow",
                        l.from
                    ),
                ));
            }
            if to.protocol != Protocol::Tcp || l.from == l.to {
                return Err(invalid(
                    format!("{at}.to"),
                    "a TCP virtual server other than the leader",
                ));
            }
            let same_group = self
                .buddy_groups
                .iter()
                .any(|g| g.virtual_servers.contains(&l.from) && g.virtual_servers.contains(&l.to));
            if same_group {
                return Err(invalid(
                    at.clone(),
                    format!(
                        "'{}' and '{}' are buddies already (one buddy group)",
                        l.from, l.to
                    ),
                ));
            }
            if self.buddy_links[..i].iter().any(|k| k.to == l.to) {
                return Err(invalid(
                    format!("{at}.to"),
                    format!("virtual server '{}' follows two leaders", l.to),
                ));
            }
            if self.buddy_links.iter().any(|k| k.to == l.from) {
                return Err(invalid(
                    format!("{at}.from"),
                    format!(
                        "virtual server '{}' follows another: links do not chain",
                        l.from
                    ),
                ));
            }
            for (j, h) in l.hosts.iter().enumerate() {
                if l.hosts[..j].iter().any(|g| g.from == h.from) {
                    return Err(invalid(
                        format!("{at}.hosts"),
                        format!("host {} is mapped twice", h.from),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks what types cannot.
    pub fn validated(self) -> Result<Self, ConfigError> {
        if let Some((key, why)) = self.admin.insecure() {
            return Err(invalid(key, why));
        }
        if self.workers.is_some_and(|w| w == 0 || w > 1024) {
            return Err(invalid("workers", "must be 1 to 1024"));
        }
        if self.snat_addresses.is_empty() {
            return Err(invalid(
                "snat_addresses",
                "at least one SNAT address is needed",
            ));
        }
        for (i, p) in self.pools.iter().enumerate() {
            if self.pools[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid(
                    format!("pool[{i}].name"),
                    format!("'{}' is used twice", p.name),
                ));
            }
            if p.servers.is_empty() {
                return Err(invalid(
                    format!("pool[{i}].servers"),
                    "a pool needs at least one server",
                ));
            }
            // A connection to a server leaves from a SNAT address of the
            // server's family (DNAT-only falls back to one too).
            if let Some(s) = p.servers.iter().find(|s| {
                !self
                    .snat_addresses
                    .iter()
                    .any(|a| a.is_ipv4() == s.address.is_ipv4())
            }) {
                return Err(invalid(
                    format!("pool[{i}].servers"),
                    format!(
                        "server {} is {}, and snat_addresses has no address of that family: every connection to it would be refused",
                        s.address,
                        if s.address.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                ));
            }
            if let Some(h) = &p.health {
                if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
                    return Err(invalid(
                        format!("pool[{i}].health"),
                        "interval, timeout, rise and fall must be above 0",
                    ));
                }
                if h.kind == crate::health::ProbeType::Tcp
                    && (h.path.is_some() || h.expect_status.is_some())
                {
                    return Err(invalid(
                        format!("pool[{i}].health"),
                        "path and expect_status apply to kind = \"http\" only",
                    ));
                }
            }
        }
        for (i, v) in self.virtual_servers.iter().enumerate() {
            if self.virtual_servers[..i]
                .iter()
                .any(|w| w.name == v.name || (w.listen == v.listen && w.protocol == v.protocol))
            {
                return Err(invalid(
                    format!("virtual_server[{i}]"),
                    "names must be unique, and listen addresses per protocol",
                ));
            }
            if v.protocol == Protocol::Udp && v.listen.ip().is_unspecified() {
                // A wildcard socket cannot tell which VIP a datagram came
                // to, so the session could not be reported (pinned) by it.
                return Err(invalid(
                    format!("virtual_server[{i}].listen"),
                    "a UDP virtual server listens on its VIP, not a wildcard address",
                ));
            }
            if v.protocol == Protocol::Udp && v.persistence.is_some() {
                return Err(invalid(
                    format!("virtual_server[{i}].persistence"),
                    "UDP sessions already keep a client on its server",
                ));
            }
            if let Some(p) = v.persistence {
                if p.v4_prefix > 32 || p.v6_prefix > 128 {
                    return Err(invalid(
                        format!("virtual_server[{i}].persistence"),
                        "v4_prefix is 0 to 32, v6_prefix 0 to 128",
                    ));
                }
            }
            if v.protocol == Protocol::Udp && v.dnat_only {
                return Err(invalid(
                    format!("virtual_server[{i}].dnat_only"),
                    "DNAT-only is TCP: UDP sessions always use self-source ports",
                ));
            }
            if !self.pools.iter().any(|p| p.name == v.pool) {
                return Err(invalid(
                    format!("virtual_server[{i}].pool"),
                    format!("no [[pool]] is named '{}'", v.pool),
                ));
            }
            if v.max_connections == 0 || v.connect_timeout_ms == 0 || v.idle_timeout_ms == 0 {
                return Err(invalid(
                    format!("virtual_server[{i}]"),
                    "limits and timeouts must be above 0",
                ));
            }
        }
        self.check_buddy_groups()?;
        Ok(self)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const GOOD: &str = "tm_id = 1\ntable = \"table.toml\"\nsnat_addresses = [\"10.1.0.1\"]\n\n\
        [[pool]]\nname = \"web\"\nmethod = \"round-robin\"\nservers = [{ address = \"192.0.2.10:80\" }]\n\n\
        [[virtual_server]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\npool = \"web\"\n";

    /// Loads `text` with exactly the environment `env` (never the process's).
    fn load_env(text: &str, env: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        testkit::load_config(text, env)
    }

    #[test]
    fn buddy_groups_are_checked_and_merged() {
        let two = GOOD.to_string()
            + "persistence = { v4_prefix = 24, timeout_ms = 60000 }\n\n\
               [[pool]]\nname = \"shop\"\nservers = [{ address = \"192.0.2.10:443\" }]\n\n\
               [[virtual_server]]\nname = \"shop\"\nlisten = \"198.51.100.10:443\"\npool = \"shop\"\n";
        let sticky_shop = two.clone() + "persistence = { v4_prefix = 32, timeout_ms = 5000 }\n";
        let group = "\n[[buddy_group]]\nname = \"site\"\nvirtual_servers = [\"web\", \"shop\"]\n";
        let cfg = load_env(&(sticky_shop.clone() + group), &[]).expect("a buddy group");
        assert_eq!(
            cfg.persistence_domains(),
            vec![DomainConfig {
                name: "site".into(),
                members: vec!["web".into(), "shop".into()],
                persistence: crate::persist::PersistConfig {
                    v4_prefix: 32,
                    v6_prefix: 64,
                    timeout_ms: 5000
                },
                by_host: true,
            }]
        );
        // Each alone without the group.
        assert_eq!(
            load_env(&sticky_shop, &[])
                .expect("two")
                .persistence_domains()
                .len(),
            2
        );
        // A link: shop follows web (web has persistence, shop need not).
        let link = two.clone()
            + "\n[[buddy_link]]\nfrom = \"web\"\nto = \"shop\"\nhosts = [{ from = \"192.0.2.10\", to = \"192.0.2.20\" }]\n";
        let cfg = load_env(&link, &[]).expect("a link");
        assert_eq!(
            cfg.buddy_links[0].hosts[0].to,
            "192.0.2.20".parse::<IpAddr>().expect("addr")
        );
        for (text, why) in [
            (two.clone() + group, "has no persistence"),
            (
                sticky_shop.clone() + &group.replace("\"shop\"]", "\"cart\"]"),
                "no [[virtual_server]] is named 'cart'",
            ),
            (
                sticky_shop.clone() + &group.replace(", \"shop\"]", "]"),
                "two virtual servers or more",
            ),
            (
                sticky_shop.clone() + group + &group.replace("\"site\"", "\"site2\""),
                "in two buddy groups",
            ),
            (sticky_shop.clone() + &group.replace("\"site\"", "\"web\""), "used twice"),
            (
                sticky_shop.replace("v4_prefix = 32", "v4_prefix = 33"),
                "v4_prefix is 0 to 32",
            ),
            (
                two.clone() + "\n[[buddy_link]]\nfrom = \"shop\"\nto = \"web\"\n",
                "has no persistence: there is no choice to follow",
            ),
            (
                two.clone() + "\n[[buddy_link]]\nfrom = \"web\"\nto = \"cart\"\n",
                "no [[virtual_server]] is named 'cart'",
            ),
            (
                sticky_shop.clone() + group + "\n[[buddy_link]]\nfrom = \"web\"\nto = \"shop\"\n",
                "buddies already",
            ),
            (
                two.clone()
                    + "\n[[buddy_link]]\nfrom = \"web\"\nto = \"shop\"\nhosts = [{ from = \"192.0.2.10\", to = \"192.0.2.20\" }, { from = \"192.0.2.10\", to = \"192.0.2.21\" }]\n",
                "mapped twice",
            ),
        ] {
            match load_env(&text, &[]) {
                Err(e) => assert!(e.to_string().contains(why), "{why}: {e}"),
                Ok(_) => panic!("accepted: {why}"),
            }
        }
    }

    #[test]
    fn a_pool_server_needs_a_snat_address_of_its_family() {
        let v6 = GOOD.replace("192.0.2.10:80", "[2001:db8::10]:80");
        match load_env(&v6, &[]) {
            Err(e) => assert!(
                e.to_string().contains("pool[0].servers")
                    && e.to_string().contains("[2001:db8::10]:80 is IPv6"),
                "{e}"
            ),
            Ok(_) => panic!("an IPv6 server without an IPv6 SNAT address was accepted"),
        }
        let dual = v6.replace("[\"10.1.0.1\"]", "[\"10.1.0.1\", \"2001:db8::1\"]");
        assert!(load_env(&dual, &[]).is_ok());
    }

    #[test]
    fn a_udp_virtual_server_cannot_be_dnat_only() {
        let udp = GOOD.replace("pool = \"web\"\n", "pool = \"web\"\nprotocol = \"udp\"\n");
        assert!(load_env(&udp, &[]).is_ok());
        let dnat = udp.replace(
            "protocol = \"udp\"\n",
            "protocol = \"udp\"\ndnat_only = true\n",
        );
        match load_env(&dnat, &[]) {
            Err(e) => assert!(e.to_string().contains("dnat_only"), "{e}"),
            Ok(_) => panic!("a DNAT-only UDP virtual server was accepted"),
        }
    }

    #[test]
    fn environment_overrides_are_tmd_and_the_key_nested_with_double_underscores() {
        let plain = load_env(GOOD, &[]).expect("file");
        assert_eq!(plain.workers, None);
        assert!(plain.admin.listen.ip().is_loopback());
        let cfg = load_env(
            GOOD,
            &[
                ("TMD_WORKERS", "4"),
                ("TMD_ADMIN__LISTEN", "0.0.0.0:9191"),
                ("TMD_ADMIN__TOKEN", "s3cret"),
                ("TMD_ADMIN__INSECURE_PLAINTEXT", "true"),
                ("TMD_DRAIN_TIMEOUT_MS", "500"),
                ("STD_WORKERS", "ignored: stdd's"),
            ],
        )
        .expect("overrides");
        assert_eq!(cfg.workers, Some(4));
        assert_eq!(cfg.admin.listen, "0.0.0.0:9191".parse().expect("addr"));
        assert_eq!(cfg.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.drain_timeout_ms, 500);
        for var in ["TMD_ADMIN_LISTEN", "TMD__WORKERS"] {
            match load_env(GOOD, &[(var, "1")]) {
                Err(ConfigError::Load(e)) => assert!(e.contains(var), "{var}: {e}"),
                other => panic!("{var}: {other:?}"),
            }
        }
    }
}
