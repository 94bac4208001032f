//! Health checks: TCP-connect and HTTP-GET probes, and the rise/fall hysteresis that turns results into up/down (a pure state machine).
//!
//! Probes connect from a self-source port like any server-side connection:
//! a probe from the SNAT address on a port the kernel picked could hash to
//! another TM's bucket, and its reply would never come back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::Pool;
use crate::snat::{self, Snat};

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// The server accepts a TCP connection.
    Tcp,
    /// `GET path` answers with `expect_status`.
    Http {
        /// Request path.
        path: String,
        /// Expected status code.
        expect_status: u16,
    },
}

/// Probe types as written in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeType {
    /// TCP connect.
    Tcp,
    /// HTTP GET.
    Http,
}

/// A pool's health-check settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `tcp` or `http`.
    pub kind: ProbeType,
    /// HTTP: request path (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// HTTP: expected status (default 200).
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// Time between probes, ms.
    #[serde(default = "interval")]
    pub interval_ms: u64,
    /// Probe timeout, ms.
    #[serde(default = "timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down server up.
    #[serde(default = "rise")]
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    #[serde(default = "fall")]
    pub fall: u32,
}

impl HealthConfig {
    /// The probe these settings describe.
    pub fn probe(&self) -> ProbeKind {
        match self.kind {
            ProbeType::Tcp => ProbeKind::Tcp,
            ProbeType::Http => ProbeKind::Http {
                path: self.path.clone().unwrap_or_else(|| "/".into()),
                expect_status: self.expect_status.unwrap_or(200),
            },
        }
    }
}

fn interval() -> u64 {
    2000
}
fn timeout() -> u64 {
    1000
}
fn rise() -> u32 {
    2
}
fn fall() -> u32 {
    3
}

/// Rise/fall hysteresis of one server. Starts up: a server takes traffic
/// until `fall` consecutive probes fail; then it needs `rise` consecutive
/// successes to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    up: bool,
    streak: u32,
}

impl Hysteresis {
    /// A server that is up, with these thresholds (at least 1 each).
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            streak: 0,
        }
    }

    /// Up now.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records a probe result; returns the new state when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = !self.up;
            self.streak = 0;
            Some(self.up)
        } else {
            None
        }
    }
}

/// Why a probe did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// The server failed it: counts toward taking it down.
    Failed(String),
    /// This node had no self-source port to probe from (no bucket: a
    /// drained or joining TM; or every port in use): says nothing about
    /// the server, so it changes nothing — a TM readmitted after a drain
    /// finds its servers as they were, not marked down by its own drain.
    NoPort(String),
}

/// One probe of `server`.
pub async fn probe(
    kind: &ProbeKind,
    snat: &Arc<Snat>,
    server: std::net::SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    use snat::ConnectError;
    let work = async {
        let (mut stream, _lease) =
            snat::connect(snat, server, timeout)
                .await
                .map_err(|e| match e {
                    ConnectError::Exhausted(_)
                    | ConnectError::ReplyElsewhere { .. }
                    | ConnectError::NoAddress(_)
                    | ConnectError::Busy(..) => ProbeError::NoPort(e.to_string()),
                    e => ProbeError::Failed(e.to_string()),
                })?;
        let failed = |e: std::io::Error| ProbeError::Failed(e.to_string());
        match kind {
            ProbeKind::Tcp => Ok(()),
            ProbeKind::Http {
                path,
                expect_status,
            } => {
                let req = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nUser-Agent: tmd-health\r\nConnection: close\r\n\r\n");
                stream.write_all(req.as_bytes()).await.map_err(failed)?;
                let mut head = [0u8; 64];
                let mut got = 0;
                while got < 12 {
                    let n = stream.read(&mut head[got..]).await.map_err(failed)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                let line = String::from_utf8_lossy(&head[..got]);
                let status: Option<u16> = line
                    .strip_prefix("HTTP/1.")
                    .and_then(|r| r.get(2..5))
                    .and_then(|c| c.parse().ok());
                match status {
                    Some(s) if s == *expect_status => Ok(()),
                    Some(s) => Err(ProbeError::Failed(format!(
                        "status {s}, expected {expect_status}"
                    ))),
                    None => Err(ProbeError::Failed("not an HTTP response".into())),
                }
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Failed("timed out".to_string()))?
}

/// Probes every server of `pool` until `stop`, marking them up and down.
pub async fn run(pool: Arc<Pool>, cfg: HealthConfig, snat: Arc<Snat>, stop: Arc<AtomicBool>) {
    let mut states = vec![Hysteresis::new(cfg.rise, cfg.fall); pool.servers.len()];
    let (every, timeout) = (
        Duration::from_millis(cfg.interval_ms),
        Duration::from_millis(cfg.timeout_ms),
    );
    while !stop.load(Ordering::Relaxed) {
        let results = futures_join(pool.servers.iter().map(|&s| {
            let (kind, snat) = (cfg.probe(), Arc::clone(&snat));
            tokio::spawn(async move { probe(&kind, &snat, s, timeout).await })
        }))
        .await;
        for (i, r) in results.into_iter().enumerate() {
            if let Ok(Err(ProbeError::NoPort(why))) = &r {
                log::debug!(
                    "pool {}: server {} not probed: {why}",
                    pool.name,
                    pool.servers[i]
                );
                continue;
            }
            let ok = matches!(r, Ok(Ok(())));
            if let Some(up) = states[i].observe(ok) {
                pool.set_up(i, up);
                match (&r, up) {
                    (_, true) => log::info!("pool {}: server {} is up", pool.name, pool.servers[i]),
                    (Ok(Err(ProbeError::Failed(why))), false) => log::warn!(
                        "pool {}: server {} is down: {why}",
                        pool.name,
                        pool.servers[i]
                    ),
                    _ => log::warn!("pool {}: server {} is down", pool.name, pool.servers[i]),
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Awaits every task, in order.
async fn futures_join<T>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await);
    }
    out
}

#[cfg(test)]
mod test {
    use super::*;

    /// A one-shot HTTP-ish server on loopback answering `reply` to every connection.
    fn answering(reply: &'static str) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for c in l.incoming().flatten() {
                let mut c = c;
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let _ = c.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn http_probes_read_the_status() {
        use allocation::{HashKey, PortRange, Profile};
        let table = testkit::table(1, HashKey::from_bytes([3; 16]), 2, Profile::Uniform);
        let snat = Arc::new(
            Snat::new(
                &table,
                0,
                &["127.0.0.1".parse().expect("addr")],
                PortRange {
                    lo: 1024,
                    hi: 65535,
                },
            )
            .expect("snat"),
        );
        let ok = answering("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let bad = answering("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        let junk = answering("SSH-2.0-nope\r\n");
        let http = ProbeKind::Http {
            path: "/healthz".into(),
            expect_status: 200,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let t = Duration::from_secs(2);
            assert_eq!(probe(&http, &snat, ok, t).await, Ok(()));
            assert_eq!(
                probe(&http, &snat, bad, t).await,
                Err(ProbeError::Failed("status 503, expected 200".into()))
            );
            assert_eq!(
                probe(&http, &snat, junk, t).await,
                Err(ProbeError::Failed("not an HTTP response".into()))
            );
            assert_eq!(probe(&ProbeKind::Tcp, &snat, junk, t).await, Ok(()));
            // Nothing listening: the probe fails.
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("addr");
            assert!(matches!(
                probe(&ProbeKind::Tcp, &snat, closed, t).await,
                Err(ProbeError::Failed(_))
            ));
            // A node with no bucket has no port: no verdict on the server.
            let drained = table.failover(&[0]).expect("failover").table;
            snat.retable(&drained, None).expect("retable");
            assert!(matches!(
                probe(&http, &snat, ok, t).await,
                Err(ProbeError::NoPort(_))
            ));
        });
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = Hysteresis::new(2, 3);
        assert!(h.is_up());
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a success resets the failure streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert!(!h.is_up());
        assert_eq!(h.observe(true), None);
        assert_eq!(
            h.observe(false),
            None,
            "a failure resets the success streak"
        );
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(
            Hysteresis::new(0, 0).observe(false),
            Some(false),
            "thresholds are at least 1"
        );
    }
}
