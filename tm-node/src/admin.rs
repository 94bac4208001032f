//! tmd's admin endpoint: /metrics (Prometheus text), /healthz, GET and PUT /table, /transition; a bearer token whenever one is configured.
//!
//! A table PUT recomputes the self-source port tables for the new table;
//! ports held by open connections stay reserved until those connections
//! end, so no live connection is touched.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allocation::AllocationTable;
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Deserialize;
use tiny_http::{Method, Request, Response, Server};

use crate::proxy::VirtualServer;
use crate::snat::Snat;

/// Default admin listen address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9190";

/// Admin endpoint settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; anything but loopback requires `token`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token.
    #[serde(default)]
    pub token: Option<String>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_ADMIN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9190)))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_listen(),
            token: None,
        }
    }
}

/// What the admin endpoint reads and changes.
#[derive(Debug)]
pub struct AdminState {
    /// This node's TM id.
    pub tm_id: u32,
    /// The running and the next table (shared with the proxy).
    pub tables: Arc<crate::tables::Tables>,
    /// Self-source ports.
    pub snat: Arc<Snat>,
    /// Virtual servers.
    pub servers: Vec<Arc<VirtualServer>>,
    /// Required bearer token.
    pub token: Option<String>,
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn text(code: u16, body: impl Into<String>) -> Reply {
    let mut b = body.into();
    if !b.ends_with('\n') {
        b.push('\n');
    }
    Response::from_string(b).with_status_code(code)
}

/// Serves admin requests until `stop` is set.
pub fn serve(server: Server, state: Arc<AdminState>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(req)) => handle(req, &state),
            Ok(None) => {}
            Err(e) => log::warn!("admin: {e}"),
        }
    }
}

fn authorised(req: &Request, token: &Option<String>) -> bool {
    let Some(token) = token else { return true };
    req.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && h.value.as_str().strip_prefix("Bearer ").is_some_and(|t| {
                let (a, b) = (t.trim().as_bytes(), token.as_bytes());
                a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            })
    })
}

fn handle(mut req: Request, state: &AdminState) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let reply = if !authorised(&req, &state.token) {
        text(401, "missing or wrong bearer token")
    } else {
        match (req.method(), path.as_str()) {
            (Method::Get, "/metrics") => {
                metrics(state).unwrap_or_else(|e| text(500, format!("metrics: {e}")))
            }
            (Method::Get, "/healthz") => text(
                200,
                format!("ok: table version {}", current(state).version()),
            ),
            (Method::Get, "/table") => text(200, allocation::file::render(&current(state))),
            (Method::Put, "/table") => put_table(&mut req, state),
            (Method::Get, "/transition") => text(200, transition_state(state)),
            (Method::Get, "/transition/ports") => moving_ports(state),
            (Method::Post, "/transition/prepare") => prepare(&mut req, state),
            (Method::Post, "/transition/commit") => finish(state, true),
            (Method::Post, "/transition/abort") => finish(state, false),
            (_, "/metrics" | "/healthz" | "/table") => text(405, "method not allowed"),
            _ => text(404, "not found: /metrics, /healthz, /table, /transition, /transition/{ports,prepare,commit,abort}"),
        }
    };
    if let Err(e) = req.respond(reply) {
        log::warn!("admin: response failed: {e}");
    }
}

fn current(state: &AdminState) -> Arc<AllocationTable> {
    Arc::clone(
        &state
            .tables
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    )
}

/// A request body, bounded.
fn read_body(req: &mut Request) -> Result<String, Reply> {
    let mut body = String::new();
    let limit = allocation::file::MAX_FILE_BYTES * 2;
    if let Err(e) = req.as_reader().take(limit + 1).read_to_string(&mut body) {
        return Err(text(400, format!("table rejected: unreadable body: {e}")));
    }
    if body.len() as u64 > limit {
        return Err(text(413, "table rejected: too large"));
    }
    Ok(body)
}

/// The table in a request body, checked to be a valid table that lists this node.
fn body_table(req: &mut Request, state: &AdminState) -> Result<AllocationTable, Reply> {
    let body = read_body(req)?;
    parse_table(&body, state)
}

fn parse_table(body: &str, state: &AdminState) -> Result<AllocationTable, Reply> {
    let table =
        allocation::file::parse(body).map_err(|e| text(400, format!("table rejected: {e}")))?;
    if table.tm_index_by_id(state.tm_id).is_none() {
        return Err(text(
            400,
            format!(
                "table rejected: it does not list this node (TM id {})",
                state.tm_id
            ),
        ));
    }
    Ok(table)
}

fn put_table(req: &mut Request, state: &AdminState) -> Reply {
    let table = match body_table(req, state) {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    if state
        .tables
        .next
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
    {
        return text(
            409,
            "table rejected: a transition is prepared (commit or abort it first)",
        );
    }
    let mut running = state
        .tables
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if table.version() <= running.version() {
        return text(
            409,
            format!(
                "table rejected: version {} is not newer than the running version {}",
                table.version(),
                running.version()
            ),
        );
    }
    if let Err(e) = state.snat.retable(&table, None) {
        return text(400, format!("table rejected: {e}"));
    }
    log::info!(
        "table version {} replaced by version {} (PUT /table)",
        running.version(),
        table.version()
    );
    let v = table.version();
    *running = Arc::new(table);
    text(200, format!("installed table version {v}"))
}

/// The transition state as JSON.
fn transition_state(state: &AdminState) -> String {
    let current = current(state);
    match state.tables.next.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        None => format!("{{\"phase\":\"idle\",\"current\":{}}}", current.version()),
        Some(next) => format!(
            "{{\"phase\":\"prepared\",\"current\":{},\"next\":{},\"connections_in_moved_buckets\":{},\"ports_in_moved_buckets\":{}}}",
            current.version(),
            next.version(),
            state.tables.moving(next),
            state.snat.in_use_moving(next)
        ),
    }
}

/// GET /transition/ports: the self-source ports this node holds in buckets
/// the prepared transition moves away, as `[["addr", port], …]` — what a
/// joining node must not take (see `Snat::prepare_joining`).
fn moving_ports(state: &AdminState) -> Reply {
    let next = state.tables.next();
    let Some(next) = next else {
        return text(409, "no transition is prepared");
    };
    let list: Vec<serde_json::Value> = state
        .snat
        .moving_ports(&next)
        .into_iter()
        .map(|(a, p)| serde_json::json!([a.to_string(), p]))
        .collect();
    text(200, serde_json::Value::Array(list).to_string())
}

/// A joining node's prepare body: `{"table": "<table file>", "held": [["addr", port], …]}`.
fn joining_body(
    body: &str,
    state: &AdminState,
) -> Result<(AllocationTable, Vec<(IpAddr, u16)>), Reply> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| text(400, format!("prepare rejected: {e}")))?;
    let table = parse_table(v["table"].as_str().unwrap_or(""), state)?;
    let mut held = Vec::new();
    for h in v["held"].as_array().into_iter().flatten() {
        let addr = h[0].as_str().and_then(|a| a.parse::<IpAddr>().ok());
        let port = h[1].as_u64().and_then(|p| u16::try_from(p).ok());
        match (addr, port) {
            (Some(a), Some(p)) => held.push((a, p)),
            _ => return Err(text(400, format!("prepare rejected: bad held port {h}"))),
        }
    }
    Ok((table, held))
}

/// Prepare: from now on only ports valid under both tables are handed out;
/// the answer counts the open connections in buckets that move away. A
/// joining node (the body is `{"table": …, "held": […]}`) takes the next
/// table's ports except the held ones.
fn prepare(req: &mut Request, state: &AdminState) -> Reply {
    let body = match read_body(req) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let (table, held) = if body.trim_start().starts_with('{') {
        match joining_body(&body, state) {
            Ok((t, h)) => (t, Some(h)),
            Err(reply) => return reply,
        }
    } else {
        match parse_table(&body, state) {
            Ok(t) => (t, None),
            Err(reply) => return reply,
        }
    };
    let running = current(state);
    let mut next = state.tables.next.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = next.as_ref() {
        if n.version() == table.version() {
            drop(next);
            return text(200, transition_state(state));
        }
        return text(
            409,
            format!(
                "a transition to version {} is already prepared",
                n.version()
            ),
        );
    }
    if table.version() <= running.version() {
        return text(
            409,
            format!(
                "table rejected: version {} is not newer than the running version {}",
                table.version(),
                running.version()
            ),
        );
    }
    let prepared = match &held {
        None => state.snat.retable(&running, Some(&table)),
        Some(h) => state.snat.prepare_joining(&table, h),
    };
    if let Err(e) = prepared {
        return text(400, format!("table rejected: {e}"));
    }
    log::info!(
        "transition prepared: version {} → {}{}",
        running.version(),
        table.version(),
        held.map(|h| format!(" (joining; {} ports held by others)", h.len()))
            .unwrap_or_default()
    );
    *next = Some(Arc::new(table));
    drop(next);
    text(200, transition_state(state))
}

/// Commit (the next table becomes the table) or abort (back to the running one).
fn finish(state: &AdminState, commit: bool) -> Reply {
    let mut next = state.tables.next.lock().unwrap_or_else(|p| p.into_inner());
    let Some(n) = next.take() else {
        return text(409, "no transition is prepared");
    };
    let mut running = state
        .tables
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let target = if commit {
        Arc::clone(&n)
    } else {
        Arc::clone(&running)
    };
    if let Err(e) = state.snat.retable(&target, None) {
        *next = Some(n);
        return text(500, format!("transition: {e}"));
    }
    log::info!(
        "transition {}: version {} prepared, running version now {}",
        if commit { "committed" } else { "aborted" },
        n.version(),
        target.version()
    );
    *running = target;
    let v = running.version();
    drop(running);
    drop(next);
    text(200, format!("{{\"phase\":\"idle\",\"current\":{v}}}"))
}

fn metrics(state: &AdminState) -> Result<Reply, prometheus::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let r = Registry::new();
    let conns = IntCounterVec::new(
        Opts::new(
            "tmd_connections_total",
            "Connections relayed, per virtual server",
        ),
        &["vs"],
    )?;
    let active = IntGaugeVec::new(
        Opts::new(
            "tmd_connections_active",
            "Connections open, per virtual server",
        ),
        &["vs"],
    )?;
    let refused = IntCounterVec::new(
        Opts::new(
            "tmd_refused_total",
            "Connections refused, per virtual server and reason",
        ),
        &["vs", "reason"],
    )?;
    let bytes = IntCounterVec::new(
        Opts::new(
            "tmd_bytes_total",
            "Bytes relayed, per virtual server and direction",
        ),
        &["vs", "direction"],
    )?;
    let server_active = IntGaugeVec::new(
        Opts::new(
            "tmd_server_connections_active",
            "Connections open, per server",
        ),
        &["pool", "server"],
    )?;
    let server_up = IntGaugeVec::new(
        Opts::new(
            "tmd_server_up",
            "1 when the server is up by its health checks",
        ),
        &["pool", "server"],
    )?;
    let dnat = IntCounterVec::new(
        Opts::new(
            "tmd_dnat_only_total",
            "DNAT-only connections: client address kept, or a self-source port",
        ),
        &["vs", "outcome"],
    )?;
    for vs in &state.servers {
        let s = &vs.stats;
        conns
            .with_label_values(&[&vs.name])
            .inc_by(s.total.load(Relaxed));
        active
            .with_label_values(&[&vs.name])
            .set(s.active.load(Relaxed) as i64);
        for (reason, v) in [
            ("limit", &s.refused_limit),
            ("no_server", &s.refused_no_server),
            ("no_port", &s.refused_ports),
            ("connect_failed", &s.connect_failed),
        ] {
            refused
                .with_label_values(&[&vs.name, reason])
                .inc_by(v.load(Relaxed));
        }
        dnat.with_label_values(&[&vs.name, "kept"])
            .inc_by(s.dnat_kept.load(Relaxed));
        dnat.with_label_values(&[&vs.name, "fallback"])
            .inc_by(s.dnat_fallback.load(Relaxed));
        bytes
            .with_label_values(&[&vs.name, "up"])
            .inc_by(s.bytes_up.load(Relaxed));
        bytes
            .with_label_values(&[&vs.name, "down"])
            .inc_by(s.bytes_down.load(Relaxed));
        for ((addr, n), up) in vs
            .pool
            .servers
            .iter()
            .zip(vs.pool.active())
            .zip(vs.pool.up())
        {
            let a = addr.to_string();
            server_active
                .with_label_values(&[&vs.pool.name, &a])
                .set(i64::from(n));
            server_up
                .with_label_values(&[&vs.pool.name, &a])
                .set(i64::from(up));
        }
    }
    let ports = IntGaugeVec::new(
        Opts::new(
            "tmd_snat_ports",
            "Self-source ports per SNAT address, in use and free",
        ),
        &["address", "state"],
    )?;
    for (addr, used, free) in state.snat.usage() {
        let a = addr.to_string();
        ports.with_label_values(&[&a, "in_use"]).set(used as i64);
        ports.with_label_values(&[&a, "free"]).set(free as i64);
    }
    let version = IntGauge::new("tmd_table_version", "Version of the running table")?;
    version.set(current(state).version() as i64);
    let prepared = IntGauge::new(
        "tmd_transition_prepared",
        "1 while a transition is prepared",
    )?;
    let moving = IntGauge::new(
        "tmd_connections_in_moved_buckets",
        "Open connections in buckets the prepared transition moves away",
    )?;
    if let Some(n) = state
        .tables
        .next
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        prepared.set(1);
        moving.set(state.tables.moving(n) as i64);
    }
    for c in [
        Box::new(conns) as Box<dyn prometheus::core::Collector>,
        Box::new(active),
        Box::new(refused),
        Box::new(bytes),
        Box::new(server_active),
        Box::new(server_up),
        Box::new(ports),
        Box::new(version),
        Box::new(prepared),
        Box::new(moving),
        Box::new(dnat),
    ] {
        r.register(c)?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(text(200, String::from_utf8_lossy(&out).into_owned()))
}
