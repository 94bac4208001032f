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

    /// Checks what types cannot.
    pub fn validated(self) -> Result<Self, ConfigError> {
        if let Some(why) = self.admin.insecure() {
            return Err(invalid("admin.token", why));
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
            if v.protocol == Protocol::Udp && v.persistence.is_some() {
                return Err(invalid(
                    format!("virtual_server[{i}].persistence"),
                    "UDP sessions already keep a client on its server",
                ));
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
