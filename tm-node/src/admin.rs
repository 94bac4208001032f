//! tmd's admin endpoint: /metrics (Prometheus text), /healthz, GET and PUT /table, /transition (prepare, ports, pins, commit, abort) in the typed messages of `control::api`; served by the bounded server of the `admin-http` crate.
//!
//! A table PUT recomputes the self-source port tables for the new table;
//! ports held by open connections stay reserved until those connections
//! end, so no live connection is touched. Tables are named by version and
//! checksum: a different table with a version this node runs or has
//! prepared is refused, naming both. Every transition step is idempotent
//! for the same table. A table installed by PUT or commit is written to
//! the configured table file, where tmd reads it at start.

use std::path::PathBuf;
use std::sync::Arc;

use admin_http::{Reply, Request};
use allocation::AllocationTable;
use control::api::{
    AbortAnswer, CommitAnswer, HeldPort, PrepareRequest, StepRequest, TableId, TmPhase, TmPins,
    TmTransition,
};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::proxy::VirtualServer;
use crate::snat::Snat;

/// Largest request body: a table file, JSON-framed, with room to spare.
pub const MAX_BODY_BYTES: usize = allocation::file::MAX_FILE_BYTES as usize + 64 * 1024;

/// The admin server's limits for tmd.
pub fn limits() -> admin_http::Limits {
    admin_http::Limits {
        max_body_bytes: MAX_BODY_BYTES,
        ..admin_http::Limits::default()
    }
}

/// Admin endpoint settings (`[admin]`): loopback port 9190 by default;
/// anything but loopback requires `token`.
pub type AdminConfig = admin_http::auth::AdminConfig<9190>;

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
    /// Where an installed table is saved (the table file tmd starts from).
    pub table_file: Option<PathBuf>,
    /// The servers this node connects to from self-source ports: a table
    /// under which one's replies cannot come back is refused.
    pub server_sides: Vec<crate::config::OwnedServerSide>,
    /// Persistence domains (virtual servers with persistence, buddy groups).
    pub domains: Vec<Arc<crate::persist::Domain>>,
}

impl AdminState {
    /// Refuses `table` (with `next`, a transition's) if a server's replies
    /// could never come back to this node under it.
    fn check_replies(
        &self,
        table: &allocation::AllocationTable,
        next: Option<&allocation::AllocationTable>,
    ) -> Result<(), String> {
        let sides: Vec<_> = self.server_sides.iter().map(|s| s.side()).collect();
        tm_core::snat::check_replies(table, next, self.tm_id, &self.snat.addrs(), &sides)
    }
}

/// The handler the admin server runs for tmd.
pub fn handler(state: Arc<AdminState>) -> Arc<dyn admin_http::server::Handler> {
    Arc::new(move |req: Request| handle(&req, &state))
}

/// Answers one request.
pub fn handle(req: &Request, state: &AdminState) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => {
            metrics(state).unwrap_or_else(|e| Reply::text(500, format!("metrics: {e}")))
        }
        ("GET", "/healthz") => Reply::text(
            200,
            format!("ok: table version {}", state.tables.current().version()),
        ),
        ("GET", "/table") => Reply::text(
            200,
            allocation::file::render_for(&state.tables.current(), req.asks("key=include")),
        ),
        ("PUT", "/table") => put_table(req, state),
        ("GET", "/transition") => Reply::json(200, &transition_state(state)),
        ("GET", "/persistence") => Reply::json(200, &persistence(state)),
        ("GET", "/transition/ports") => moving_ports(state),
        ("GET", "/transition/pins") => pins(state),
        ("POST", "/transition/prepare") => prepare(req, state),
        ("POST", "/transition/commit") => finish(req, state, true),
        ("POST", "/transition/abort") => finish(req, state, false),
        ("GET", "/snat") => Reply::json(200, &snat_state(state)),
        (
            _,
"/metrics" | "/healthz" | "/table" | "/transition" | "/transition/ports"
            | "/transition/pins" | "/transition/prepare" | "/transition/commit" | "/transition/abort"
            | "/persistence" | "/snat",
        ) => Reply::text(405, "method not allowed"),
        _ => Reply::text(
            404,
            "not found: /metrics, /healthz, /table, /transition, /transition/{ports,pins,prepare,commit,abort}, /persistence, /snat",
        ),
    }
}

/// `GET /snat`: this TM's server side as it runs — its SNAT addresses
/// (ports in use and free), the port range self-source ports come from,
/// and the servers it connects to (what `stdctl explain` checks replies
/// against).
fn snat_state(state: &AdminState) -> control::api::TmSnat {
    control::api::TmSnat {
        tm_id: state.tm_id,
        table_version: state.tables.current().version(),
        range: state.snat.range().to_string(),
        addresses: state
            .snat
            .usage()
            .into_iter()
            .map(|(address, in_use, free)| control::api::SnatAddress {
                address,
                in_use,
                free,
            })
            .collect(),
        servers: state
            .server_sides
            .iter()
            .map(|s| control::api::ServerSide {
                vs: s.vs.clone(),
                pool: s.pool.clone(),
                protocol: s.protocol,
                server: s.server,
            })
            .collect(),
    }
}

/// `GET /persistence`: every domain's settings, counters and live bindings.
fn persistence(state: &AdminState) -> control::api::PersistenceView {
    use std::sync::atomic::Ordering::Relaxed;
    let now = std::time::Instant::now();
    let domains = state
        .domains
        .iter()
        .map(|d| {
            let (list, total) = d.bindings(now);
            control::api::PersistenceDomain {
                name: d.name.clone(),
                virtual_servers: d.members.clone(),
                buddy_group: d.by_host,
                v4_prefix: d.cfg.v4_prefix,
                v6_prefix: d.cfg.v6_prefix,
                timeout_ms: d.cfg.timeout_ms,
                hits: d.stats.hits.load(Relaxed),
                misses: d.stats.misses.load(Relaxed),
                rebinds: d.stats.rebinds.load(Relaxed),
                bindings_total: total as u64,
                bindings: list
                    .into_iter()
                    .map(|b| control::api::PersistenceBinding {
                        client: b.client,
                        server: if d.by_host {
                            b.server.ip().to_string()
                        } else {
                            b.server.to_string()
                        },
                        open: b.open,
                        idle_ms: u64::try_from(b.idle.as_millis()).unwrap_or(u64::MAX),
                    })
                    .collect(),
            }
        })
        .collect();
    control::api::PersistenceView {
        tm_id: state.tm_id,
        domains,
    }
}

fn parse_table(body: &str, state: &AdminState) -> Result<AllocationTable, Reply> {
    let table = allocation::file::parse(body)
        .map_err(|e| Reply::text(400, format!("table rejected: {e}")))?;
    if table.tm_index_by_id(state.tm_id).is_none() {
        return Err(Reply::text(
            400,
            format!(
                "table rejected: it does not list this node (TM id {})",
                state.tm_id
            ),
        ));
    }
    Ok(table)
}

/// Refuses `table` when it has `other`'s version and other contents.
fn same_version_other_table(what: &str, other: &TableId, table: &TableId) -> Result<(), Reply> {
    match table.conflict(what, other) {
        Some(why) => Err(Reply::text(409, why)),
        None => Ok(()),
    }
}

/// Writes `table` where tmd reads it at start; the error as text.
fn persist(state: &AdminState, table: &AllocationTable) -> Option<String> {
    let path = state.table_file.as_ref()?;
    match allocation::file::save(path, table) {
        Ok(()) => None,
        Err(e) => {
            log::error!(
                "table version {} installed but not saved to {}: {e} (a restart would start from the file's table)",
                table.version(),
                path.display()
            );
            Some(format!("{}: {e}", path.display()))
        }
    }
}

fn put_table(req: &Request, state: &AdminState) -> Reply {
    let table = match req.text().and_then(|b| parse_table(b, state)) {
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
        return Reply::text(
            409,
            "table rejected: a transition is prepared (commit or abort it first)",
        );
    }
    let mut running = state
        .tables
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Err(r) =
        same_version_other_table("running", &TableId::of(&running), &TableId::of(&table))
    {
        return r;
    }
    if table.version() <= running.version() {
        return Reply::text(
            409,
            format!(
                "table rejected: version {} is not newer than the running version {}",
                table.version(),
                running.version()
            ),
        );
    }
    if let Err(e) = state.check_replies(&table, None) {
        return Reply::text(400, format!("table rejected: {e}"));
    }
    if let Err(e) = state.snat.retable(&table, None) {
        return Reply::text(400, format!("table rejected: {e}"));
    }
    log::info!(
        "table version {} replaced by version {} (PUT /table)",
        running.version(),
        table.version()
    );
    let v = table.version();
    *running = Arc::new(table);
    let saved = persist(state, &running);
    drop(running);
    match saved {
        None => Reply::text(200, format!("installed table version {v}")),
        Some(e) => Reply::text(
            200,
            format!("installed table version {v}; warning: not saved ({e})"),
        ),
    }
}

/// The transition state.
pub fn transition_state(state: &AdminState) -> TmTransition {
    let current = state.tables.current();
    let next = state.tables.next();
    TmTransition {
        phase: if next.is_some() {
            TmPhase::Prepared
        } else {
            TmPhase::Idle
        },
        current: current.version(),
        current_checksum: allocation::file::checksum(&current),
        next: next.as_ref().map(|n| n.version()),
        next_checksum: next.as_ref().map(|n| allocation::file::checksum(n)),
        connections_in_moved_buckets: next.as_ref().map(|n| state.tables.moving(n) as u64),
        ports_in_moved_buckets: next.as_ref().map(|n| {
            let ports = state.snat.moving_ports(n);
            state.tables.moving_ports_to_drain(&ports) as u64
        }),
    }
}

/// GET /transition/ports: the self-source ports this node holds in buckets
/// the prepared transition moves away, as `[["addr", port], …]` — what a
/// joining node must not take (see `Snat::prepare_joining`).
/// GET /transition/pins: the flows this TM serves that a table in force
/// does not steer to it (DESIGN §4), for the distributors to pin.
fn pins(state: &AdminState) -> Reply {
    let table = state
        .tables
        .next()
        .unwrap_or_else(|| state.tables.current());
    let p = state.tables.pinned();
    Reply::json(
        200,
        &TmPins::new(state.tables.tm_id, TableId::of(&table), &p.flows, &p.ports),
    )
}

fn moving_ports(state: &AdminState) -> Reply {
    let Some(next) = state.tables.next() else {
        return Reply::text(409, "no transition is prepared");
    };
    let list: Vec<HeldPort> = state
        .snat
        .moving_ports(&next)
        .into_iter()
        .map(|(a, p)| HeldPort(a, p))
        .collect();
    Reply::json(200, &list)
}

/// Prepare: from now on only ports valid under both tables are handed out;
/// the answer counts the open connections in buckets that move away. The
/// body is a `PrepareRequest` (JSON), or the bare table file; a joining
/// node (`held` given) takes the next table's ports except the held ones.
fn prepare(req: &Request, state: &AdminState) -> Reply {
    let body = match req.text() {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let request = if body.trim_start().starts_with('{') {
        match serde_json::from_str::<PrepareRequest>(body) {
            Ok(r) => r,
            Err(e) => return Reply::text(400, format!("prepare rejected: {e}")),
        }
    } else {
        PrepareRequest {
            table: body.to_string(),
            held: None,
        }
    };
    let table = match parse_table(&request.table, state) {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    let wanted = TableId::of(&table);
    let running = state.tables.current();
    let running_id = TableId::of(&running);
    let mut next = state.tables.next.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = next.as_ref() {
        let prepared = TableId::of(n);
        drop(next);
        if prepared == wanted {
            // A joiner prepared again (another joiner's open ports
            // learnt, or a push resumed): it adds the list to what it
            // keeps out (`Snat::rejoin`); ports it leased stay its own.
            if let Some(h) = request
                .held
                .as_ref()
                .filter(|_| state.snat.joins_from(&running))
            {
                let h: Vec<(std::net::IpAddr, u16)> =
                    h.iter().map(|&HeldPort(a, p)| (a, p)).collect();
                if let Err(e) = state.snat.rejoin(&table, &h) {
                    return Reply::text(400, format!("table rejected: {e}"));
                }
                log::info!(
                    "transition prepared again: version {} → {} (joining; {} ports held by others)",
                    running.version(),
                    table.version(),
                    h.len()
                );
            }
            return Reply::json(200, &transition_state(state));
        }
        if let Err(r) = same_version_other_table("prepared", &prepared, &wanted) {
            return r;
        }
        return Reply::text(
            409,
            format!(
                "prepare refused: a transition to {prepared} is already prepared; this is {wanted}"
            ),
        );
    }
    if running_id == wanted {
        // Committed already (a coordinator resuming).
        drop(next);
        return Reply::json(200, &transition_state(state));
    }
    if let Err(r) = same_version_other_table("running", &running_id, &wanted) {
        return r;
    }
    if table.version() <= running.version() {
        return Reply::text(
            409,
            format!(
                "table rejected: version {} is not newer than the running version {}",
                table.version(),
                running.version()
            ),
        );
    }
    let held: Option<Vec<(std::net::IpAddr, u16)>> = request
        .held
        .map(|h| h.into_iter().map(|HeldPort(a, p)| (a, p)).collect());
    let fits = match &held {
        None => state.check_replies(&running, Some(&table)),
        Some(_) => state.check_replies(&table, None),
    };
    if let Err(e) = fits {
        return Reply::text(400, format!("table rejected: {e}"));
    }
    let prepared = match &held {
        None => state.snat.retable(&running, Some(&table)),
        Some(h) => state.snat.prepare_joining(&table, h),
    };
    if let Err(e) = prepared {
        return Reply::text(400, format!("table rejected: {e}"));
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
    Reply::json(200, &transition_state(state))
}

/// Commit (the next table becomes the table, saved where tmd starts from)
/// or abort (back to the running one). The body may name the transition's
/// table (a `TableId`); a step naming another table is refused. Idempotent:
/// committing the running table, or aborting with nothing prepared, is 200.
fn finish(req: &Request, state: &AdminState, commit: bool) -> Reply {
    let step: StepRequest = if req.body.iter().all(u8::is_ascii_whitespace) {
        StepRequest::default()
    } else {
        match req.json() {
            Ok(t) => t,
            Err(r) => return r,
        }
    };
    let named = match step.table() {
        Ok(t) => t,
        Err(e) => return Reply::text(400, e),
    };
    if step.pins.is_some() {
        return Reply::text(
            400,
            "pins are a distributor's: a TM's commit takes held ports",
        );
    }
    let what = if commit { "commit" } else { "abort" };
    let mut next = state.tables.next.lock().unwrap_or_else(|p| p.into_inner());
    let mut running = state
        .tables
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let running_id = TableId::of(&running);
    let Some(n) = next.take() else {
        return match (commit, named) {
            (true, Some(t)) if t == running_id => {
                // Committed already (a resumed push): the held ports still apply.
                if let Some(held) = &step.held {
                    state
                        .snat
                        .set_held(held.iter().map(|h| (h.0, h.1)).collect());
                    if let Err(e) = state.snat.retable(&running, None) {
                        return Reply::text(500, format!("transition: {e}"));
                    }
                }
                Reply::json(
                    200,
                    &CommitAnswer {
                        table: running_id,
                        persist_error: None,
                        pins_refused: None,
                    },
                )
            }
            (true, _) => Reply::text(409, "commit refused: no transition is prepared"),
            (false, Some(t)) if t == running_id => Reply::text(
                409,
                format!(
                    "abort refused: {running_id} is committed here; roll back with a new version"
                ),
            ),
            (false, _) => Reply::json(
                200,
                &AbortAnswer {
                    table: running_id,
                    aborted: false,
                },
            ),
        };
    };
    let prepared_id = TableId::of(&n);
    if let Some(t) = &named {
        if *t != prepared_id {
            let reply = Reply::text(
                409,
                format!("{what} refused: it names {t}, but the prepared table is {prepared_id}"),
            );
            *next = Some(n);
            return reply;
        }
    }
    let target = if commit {
        Arc::clone(&n)
    } else {
        Arc::clone(&running)
    };
    if let (true, Some(held)) = (commit, &step.held) {
        state
            .snat
            .set_held(held.iter().map(|h| (h.0, h.1)).collect());
    }
    if let Err(e) = state.snat.retable(&target, None) {
        *next = Some(n);
        return Reply::text(500, format!("transition: {e}"));
    }
    log::info!(
        "transition {}: version {} prepared, running version now {}",
        if commit { "committed" } else { "aborted" },
        n.version(),
        target.version()
    );
    *running = target;
    let table = TableId::of(&running);
    let saved = commit.then(|| persist(state, &running)).flatten();
    drop(running);
    drop(next);
    if commit {
        Reply::json(
            200,
            &CommitAnswer {
                table,
                persist_error: saved,
                pins_refused: None,
            },
        )
    } else {
        Reply::json(
            200,
            &AbortAnswer {
                table,
                aborted: true,
            },
        )
    }
}

fn metrics(state: &AdminState) -> Result<Reply, prometheus::Error> {
    let current = |state: &AdminState| state.tables.current();
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
    let follow = IntCounterVec::new(
        Opts::new(
            "tmd_buddy_link_total",
            "New connections of a virtual server that follows another (buddy link): to the leader's host, or its own choice (no usable server there)",
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
            ("descriptors", &s.refused_fds),
        ] {
            refused
                .with_label_values(&[&vs.name, reason])
                .inc_by(v.load(Relaxed));
        }
        if vs.follows.is_some() {
            follow
                .with_label_values(&[&vs.name, "leader_host"])
                .inc_by(s.followed.load(Relaxed));
            follow
                .with_label_values(&[&vs.name, "own_choice"])
                .inc_by(s.follow_missed.load(Relaxed));
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
    let sticky = IntCounterVec::new(
        Opts::new(
            "tmd_persistence_total",
            "New connections of a persistence domain (virtual server or buddy group): binding kept (hit), none (miss), its server unusable (rebind)",
        ),
        &["domain", "outcome"],
    )?;
    let bindings = IntGaugeVec::new(
        Opts::new(
            "tmd_persistence_bindings",
            "Client bindings kept, per persistence domain",
        ),
        &["domain"],
    )?;
    for d in &state.domains {
        for (outcome, v) in [
            ("hit", &d.stats.hits),
            ("miss", &d.stats.misses),
            ("rebind", &d.stats.rebinds),
        ] {
            sticky
                .with_label_values(&[&d.name, outcome])
                .inc_by(v.load(Relaxed));
        }
        bindings.with_label_values(&[&d.name]).set(d.len() as i64);
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
        Box::new(sticky),
        Box::new(follow),
        Box::new(bindings),
    ] {
        r.register(c)?;
    }
    // The descriptor budget (one per process: every virtual server shares it).
    if let Some(fds) = state.servers.first().map(|v| &v.fds) {
        let d = IntGaugeVec::new(
            Opts::new(
                "tmd_descriptors",
                "File descriptors connections may hold (budget) and hold (used)",
            ),
            &["state"],
        )?;
        d.with_label_values(&["budget"]).set(fds.max() as i64);
        d.with_label_values(&["used"]).set(fds.used() as i64);
        r.register(Box::new(d))?;
    }
    let accept_errors = IntCounterVec::new(
        Opts::new(
            "tmd_accept_errors_total",
            "Accepts that failed, per virtual server",
        ),
        &["vs"],
    )?;
    for vs in &state.servers {
        accept_errors
            .with_label_values(&[&vs.name])
            .inc_by(vs.stats.accept_errors.load(Relaxed));
    }
    r.register(Box::new(accept_errors))?;
    // The zero-copy relay: bytes spliced, the pipes it holds, pipes not had.
    let spliced = IntCounterVec::new(
        Opts::new(
            "tmd_spliced_bytes_total",
            "Bytes relayed by splice(2) (never copied to user space), per virtual server; part of tmd_bytes_total",
        ),
        &["vs"],
    )?;
    for vs in &state.servers {
        spliced
            .with_label_values(&[&vs.name])
            .inc_by(vs.stats.bytes_spliced.load(Relaxed));
    }
    r.register(Box::new(spliced))?;
    let pipes = IntGauge::new(
        "tmd_relay_pipes",
        "Pipes the splicing relay holds (in use and pooled, two descriptors each, from the budget)",
    )?;
    pipes.set(crate::relay::PIPES_OPEN.load(Relaxed) as i64);
    r.register(Box::new(pipes))?;
    let no_pipe = IntCounterVec::new(
        Opts::new(
            "tmd_relay_pipes_refused_total",
            "Splices done by copy instead: the descriptor budget was spent (budget) or pipe2 failed (error)",
        ),
        &["reason"],
    )?;
    no_pipe
        .with_label_values(&["budget"])
        .inc_by(crate::relay::PIPES_REFUSED.load(Relaxed));
    no_pipe
        .with_label_values(&["error"])
        .inc_by(crate::relay::PIPE_ERRORS.load(Relaxed));
    r.register(Box::new(no_pipe))?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(Reply::metrics(String::from_utf8_lossy(&out).into_owned()))
}
