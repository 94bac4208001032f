//! Test support shared by the crates' tests (a dev-dependency only): table and TM fixtures ([`tm`], [`uniform`], [`table`]), a minimal HTTP/1.1 client for admin endpoints ([`http`]), a free port, a scratch directory, a bounded wait, a metric read from Prometheus text, and test certificates ([`pki`]).

pub mod pki;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use allocation::{AllocationTable, GroupSpec, HashKey, MacAddr, Profile, Tm};
use cli_common::settings::{ConfigError, Settings};

/// The hash key most tests use.
pub const KEY: &str = "000102030405060708090a0b0c0d0e0f";

/// TM `i`: id `i`, name `tm<i>`, MAC 02:53:54:00:00:<i+1>, weight 1, the default group.
pub fn tm(i: u32) -> Tm {
    Tm {
        id: i,
        name: format!("tm{i}"),
        mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
        weight: 1,
        group: 0,
    }
}

/// A one-group table of TMs `0..n` ([`tm`]) under `key`, at `version`.
pub fn table(version: u64, key: HashKey, n: u32, profile: Profile) -> AllocationTable {
    AllocationTable::new(
        version,
        key,
        (0..n).map(tm).collect(),
        vec![GroupSpec::default_group(profile)],
    )
    .expect("a valid test table")
}

/// Version 1, the key [`KEY`], `n` TMs, uniform.
pub fn uniform(n: u32) -> AllocationTable {
    table(1, KEY.parse().expect("key"), n, Profile::Uniform)
}

/// A TCP rule over `ports` (`"443"`, `"8000-8999"`).
pub fn tcp_rule(ports: &str) -> allocation::Rule {
    allocation::Rule {
        protocol: Some(allocation::rules::Protocol(allocation::rules::proto::TCP)),
        ports: Some(ports.parse().expect("a port range")),
        prefix: None,
    }
}

/// `base` partitioned: the TMs at indexes `second` move to a second group
/// "tls" with `rules` (uniform, endpoint hash); the rest stay in the
/// default group. Version, key and TMs otherwise as in `base`.
pub fn partitioned(
    base: &AllocationTable,
    second: &[usize],
    rules: Vec<allocation::Rule>,
) -> AllocationTable {
    partitioned_hash(base, second, rules, allocation::HashMode::Endpoint)
}

/// [`partitioned`], the second group hashing as `hash`.
pub fn partitioned_hash(
    base: &AllocationTable,
    second: &[usize],
    rules: Vec<allocation::Rule>,
    hash: allocation::HashMode,
) -> AllocationTable {
    let mut tms: Vec<Tm> = base.tms().to_vec();
    for &i in second {
        tms[i].group = 1;
    }
    let tls = GroupSpec {
        name: "tls".into(),
        rules,
        hash,
        profile: Profile::Uniform,
    };
    AllocationTable::new(
        base.version(),
        *base.key(),
        tms,
        vec![GroupSpec::default_group(Profile::Uniform), tls],
    )
    .expect("a valid partitioned test table")
}

/// A port free on loopback now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh scratch directory (`$TMPDIR/NAME-PID`, emptied first), removed
/// with everything in it when dropped.
#[derive(Debug)]
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    /// Makes (or empties) the directory for `name`.
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch directory");
        Scratch(d)
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits up to 20 s for `ok`, every 50 ms; panics naming `what` after.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request (`Connection: close`, an optional bearer token):
/// (status, body); status 0 with the reason when there was no answer.
pub fn http(
    to: impl ToSocketAddrs,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = match to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)))
    {
        Some(Ok(s)) => s,
        Some(Err(e)) => return (0, format!("connect: {e}")),
        None => return (0, "no address".into()),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return (0, format!("send: {e}"));
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The sum of metric `name`'s samples in Prometheus text (lines starting
/// with `name`, comments left out).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}

/// Loads configuration `text` as a file of its own (a fresh directory per
/// call: tests run in parallel) with exactly the environment `env`, never
/// the process's (which is global).
pub fn load_config<T: Settings>(text: &str, env: &[(&str, &str)]) -> Result<T, ConfigError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("testkit-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write");
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = T::load_with_env(&path, env);
    let _ = std::fs::remove_dir_all(&dir);
    r
}
