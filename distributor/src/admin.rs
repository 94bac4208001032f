//! stdd's admin endpoint: /metrics (Prometheus text), /healthz, GET and PUT /table, the transition (switch, commit, abort); a bearer token whenever one is configured.
//!
//! Runs on its own thread (tiny_http). Counters are summed from the
//! workers' published snapshots at scrape time; a table PUT is parsed,
//! validated, turned into a plan, and swapped in atomically — or refused
//! with the reason, leaving the running table untouched. A transition
//! (DESIGN §4) switches to a new table keeping the running one as
//! "previous" until commit (or abort, which goes back to it).

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allocation::{AllocationTable, SharedTable};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::config::DistributorConfig;
use crate::io::WorkerShared;
use crate::steer::Plan;
use crate::verdict::{Branch, Counters, Drop};

/// Largest table accepted by PUT /table.
pub const MAX_TABLE_BYTES: u64 = allocation::file::MAX_FILE_BYTES;

/// A worker that has not published for this long is reported unhealthy.
pub const STALE_AFTER_MS: u64 = 2000;

/// What the admin endpoint reads and changes.
#[derive(Debug)]
pub struct AdminState {
    /// The running configuration (replaced on SIGHUP).
    pub config: Mutex<DistributorConfig>,
    /// The running plan.
    pub plan: Arc<SharedTable<Plan>>,
    /// The workers' published stats.
    pub workers: Vec<Arc<WorkerShared>>,
    /// Table swaps so far (PUT /table and reloads).
    pub swaps: AtomicU64,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// TM liveness and failover state.
    pub failover: crate::failover::FailoverState,
    /// The in-kernel steering (afxdp with `workers.xdp_steer`), whose maps
    /// follow every plan change.
    pub kernel: Option<Arc<crate::xdp_steer::XdpSteer>>,
}

impl AdminState {
    /// Runs `store`, a change of the running plan. With the in-kernel
    /// steering its maps follow: the kernel steers nothing while the plan
    /// changes, then steers by the new plan.
    pub fn change_plan<R>(&self, store: impl FnOnce() -> R) -> R {
        match &self.kernel {
            None => store(),
            Some(k) => k.install(&self.plan, store),
        }
    }
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

fn text(code: u16, body: impl Into<String>) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::from_string(body).with_status_code(code)
}

fn authorised(req: &Request, token: &Option<String>) -> bool {
    let Some(token) = token else { return true };
    req.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && h.value
                .as_str()
                .strip_prefix("Bearer ")
                .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()))
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn handle(mut req: Request, state: &AdminState) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let response = if !authorised(&req, &state.token) {
        text(401, "missing or wrong bearer token")
    } else {
        match (req.method(), path.as_str()) {
            (Method::Get, "/metrics") => match metrics(state) {
                Ok(body) => {
                    let mut r = text(200, body);
                    if let Ok(h) = Header::from_bytes("Content-Type", "text/plain; version=0.0.4") {
                        r = r.with_header(h);
                    }
                    r
                }
                Err(e) => text(500, format!("metrics: {e}")),
            },
            (Method::Get, "/healthz") => {
                let stale: Vec<usize> = state
                    .workers
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.age_ms() > STALE_AFTER_MS)
                    .map(|(i, _)| i)
                    .collect();
                if stale.is_empty() {
                    text(
                        200,
                        format!("ok: table version {}", state.plan.load().table().version()),
                    )
                } else {
                    text(
                        503,
                        format!("workers {stale:?} have not reported for over {STALE_AFTER_MS} ms"),
                    )
                }
            }
            (Method::Get, "/table") => {
                text(200, allocation::file::render(state.plan.load().table()))
            }
            (Method::Put, "/table") => put_table(&mut req, state),
            (Method::Get, "/transition") => transition_state(state),
            (Method::Post, "/transition/switch") => switch(&mut req, state),
            (Method::Post, "/transition/open") => open(state),
            (Method::Post, "/transition/commit") => commit(state),
            (Method::Post, "/transition/abort") => abort(state),
            (
                _,
                "/metrics" | "/healthz" | "/table" | "/transition" | "/transition/switch"
                | "/transition/open" | "/transition/commit" | "/transition/abort",
            ) => text(405, "method not allowed"),
            _ => text(
                404,
                "not found: /metrics, /healthz, /table, /transition[/switch|/open|/commit|/abort]",
            ),
        }
    };
    if let Err(e) = req.respond(response) {
        log::warn!("admin: response failed: {e}");
    }
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

/// The table in a request's body, parsed and validated.
fn read_table(req: &mut Request) -> Result<AllocationTable, Reply> {
    let mut body = String::new();
    if let Err(e) = req
        .as_reader()
        .take(MAX_TABLE_BYTES + 1)
        .read_to_string(&mut body)
    {
        return Err(text(400, format!("table rejected: unreadable body: {e}")));
    }
    if body.len() as u64 > MAX_TABLE_BYTES {
        return Err(text(
            413,
            format!("table rejected: larger than {MAX_TABLE_BYTES} bytes"),
        ));
    }
    allocation::file::parse(&body).map_err(|e| text(400, format!("table rejected: {e}")))
}

fn put_table(req: &mut Request, state: &AdminState) -> Reply {
    let table = match read_table(req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let version = table.version();
    let Ok(config) = state.config.lock() else {
        return text(500, "configuration lock poisoned");
    };
    if let Some(prev) = state.plan.load().previous() {
        return text(
            409,
            format!(
                "table rejected: a transition from version {} is switched: commit or abort it first",
                prev.version()
            ),
        );
    }
    let plan = match config.plan(table) {
        Ok(p) => p,
        Err(e) => return text(400, format!("table rejected: {e}")),
    };
    let installed = plan.table().clone();
    match state.change_plan(|| state.plan.swap(plan)) {
        Ok(old) => {
            state.swaps.fetch_add(1, Ordering::Relaxed);
            state.failover.installed(&installed);
            log::info!(
                "table version {} replaced by version {version} (PUT /table)",
                old.table().version()
            );
            text(200, format!("installed table version {version}"))
        }
        Err(e) => text(409, format!("table rejected: {e}")),
    }
}

/// GET /transition: the state as JSON.
fn transition_state(state: &AdminState) -> Reply {
    let plan = state.plan.load();
    let (remembered, overflows) = transit_totals(state);
    let body = serde_json::json!({
        "state": match (plan.previous().is_some(), plan.is_open()) {
            (false, _) => "idle",
            (true, false) => "switched",
            (true, true) => "open",
        },
        "version": plan.table().version(),
        "previous_version": plan.previous().map(|p| p.version()),
        "moved_buckets": plan.moved().map(|m| m.len()),
        "remembered_flows": remembered,
        "overflows": overflows,
    });
    text(200, body.to_string())
}

fn transit_totals(state: &AdminState) -> (u64, u64) {
    let (mut remembered, mut overflows) = (0u64, 0u64);
    for w in &state.workers {
        if let Ok(s) = w.stats.lock() {
            remembered += s.transit_remembered as u64;
            overflows += s.transit_overflows;
        }
    }
    (remembered, overflows)
}

/// POST /transition/switch: the body's table becomes the running one, the
/// running one its previous (DESIGN §4 step 2).
fn switch(req: &mut Request, state: &AdminState) -> Reply {
    let table = match read_table(req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Ok(config) = state.config.lock() else {
        return text(500, "configuration lock poisoned");
    };
    let current = state.plan.snapshot();
    if let Some(prev) = current.previous() {
        return text(
            409,
            format!(
                "switch refused: already switched from version {} to {}",
                prev.version(),
                current.table().version()
            ),
        );
    }
    let version = table.version();
    let plan = match config.plan(table).map_err(|e| e.to_string()).and_then(|p| {
        p.with_previous(current.table().clone())
            .map_err(|e| e.to_string())
    }) {
        Ok(p) => p,
        Err(e) => return text(400, format!("switch refused: {e}")),
    };
    let moved = plan.moved().map(|m| m.len());
    let installed = plan.table().clone();
    match state.change_plan(|| state.plan.swap(plan)) {
        Ok(old) => {
            state.swaps.fetch_add(1, Ordering::Relaxed);
            state.failover.installed(&installed);
            log::info!(
                "transition: switched from table version {} to {version}{}",
                old.table().version(),
                moved
                    .map(|m| format!(", {m} buckets moved"))
                    .unwrap_or_default()
            );
            text(200, format!("switched to table version {version}"))
        }
        Err(e) => text(409, format!("switch refused: {e}")),
    }
}

/// For the steps of a switched transition (open, commit, abort): the
/// configuration lock, which serialises every table change, and the
/// running plan — or the answer refusing `what`.
fn switched<'a>(
    state: &'a AdminState,
    what: &str,
) -> Result<(std::sync::MutexGuard<'a, DistributorConfig>, Arc<Plan>), Reply> {
    let config = state
        .config
        .lock()
        .map_err(|_| text(500, "configuration lock poisoned"))?;
    let current = state.plan.snapshot();
    if current.previous().is_none() {
        return Err(text(
            409,
            format!("{what} refused: no transition is switched"),
        ));
    }
    Ok((config, current))
}

/// POST /transition/open: new flows in moved buckets start on their new
/// owner (once every distributor has switched).
fn open(state: &AdminState) -> Reply {
    let (_config, current) = match switched(state, "open") {
        Ok(s) => s,
        Err(r) => return r,
    };
    if current.is_open() {
        return text(200, "already open");
    }
    let v = current.table().version();
    state.change_plan(|| state.plan.replace((*current).clone().opened()));
    log::info!("transition: table version {v} open to new flows");
    text(200, format!("table version {v} open to new flows"))
}

/// POST /transition/commit: the previous table is dropped (DESIGN §4 step 3).
fn commit(state: &AdminState) -> Reply {
    let (_config, current) = match switched(state, "commit") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let prev = current.previous().map_or(0, |p| p.version());
    let v = current.table().version();
    state.change_plan(|| state.plan.replace((*current).clone().without_previous()));
    log::info!("transition: committed table version {v} (version {prev} dropped)");
    text(200, format!("committed table version {v}"))
}

/// POST /transition/abort: back to the previous table. Flows that started
/// on a new owner during the window follow the previous table again.
fn abort(state: &AdminState) -> Reply {
    let (config, current) = match switched(state, "abort") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(prev) = current.previous() else {
        return text(409, "abort refused: no transition is switched");
    };
    let v = prev.version();
    match config.plan(prev.clone()) {
        Ok(p) => {
            state.failover.installed(prev);
            state.change_plan(|| state.plan.replace(p));
            state.swaps.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "transition: aborted, back to table version {v} from {}",
                current.table().version()
            );
            text(200, format!("aborted: back to table version {v}"))
        }
        Err(e) => text(500, format!("abort failed: {e}")),
    }
}

/// Counters summed over workers, plus gauges.
fn metrics(state: &AdminState) -> Result<String, prometheus::Error> {
    let mut total = Counters::default();
    let (mut held, mut remembered, mut bridge) = (0i64, 0i64, 0i64);
    for w in &state.workers {
        if let Ok(s) = w.stats.lock() {
            total.add(&s.counters);
            held += s.fragments_held as i64;
            remembered += s.fragments_remembered as i64;
            bridge += s.bridge_entries as i64;
        }
    }
    let plan = state.plan.load();
    let r = Registry::new();
    let tm_packets = IntCounterVec::new(
        Opts::new("std_tm_packets_total", "Frames steered to each TM"),
        &["tm_id", "tm"],
    )?;
    let tm_bytes = IntCounterVec::new(
        Opts::new("std_tm_bytes_total", "Bytes steered to each TM"),
        &["tm_id", "tm"],
    )?;
    // What the in-kernel steering counted; per TM by the same route index.
    let kernel = state.kernel.as_ref().and_then(|k| {
        k.counters()
            .map_err(|e| log::warn!("in-kernel steering statistics unreadable: {e}"))
            .ok()
    });
    let kernel_tms = kernel.as_ref().map_or(&[][..], |c| &c.per_tm[..]);
    for (i, tm) in plan.table().tms().iter().enumerate() {
        let id = tm.id.to_string();
        let (kp, kb) = kernel_tms.get(i).copied().unwrap_or((0, 0));
        tm_packets
            .with_label_values(&[&id, &tm.name])
            .inc_by(total.tm_packets.get(i).copied().unwrap_or(0) + kp);
        tm_bytes
            .with_label_values(&[&id, &tm.name])
            .inc_by(total.tm_bytes.get(i).copied().unwrap_or(0) + kb);
    }
    let branches = IntCounterVec::new(
        Opts::new("std_branch_packets_total", "Frames per steering branch"),
        &["branch"],
    )?;
    for b in Branch::ALL {
        branches
            .with_label_values(&[b.name()])
            .inc_by(total.of_branch(b));
    }
    let drops = IntCounterVec::new(
        Opts::new("std_drops_total", "Frames dropped, per reason"),
        &["reason"],
    )?;
    for d in Drop::ALL {
        drops
            .with_label_values(&[d.name()])
            .inc_by(total.of_drop(d));
    }
    let io_errors = IntCounterVec::new(
        Opts::new("std_io_errors_total", "Backend receive and send errors"),
        &["direction"],
    )?;
    io_errors.with_label_values(&["rx"]).inc_by(total.rx_errors);
    io_errors.with_label_values(&["tx"]).inc_by(total.tx_errors);
    let backend_drops = IntCounter::new(
        "std_backend_drops_total",
        "Frames the packet I/O backend dropped before steering",
    )?;
    backend_drops.inc_by(total.backend_drops);
    let gauges = IntGaugeVec::new(Opts::new("std_state", "Worker state sizes"), &["what"])?;
    gauges.with_label_values(&["fragments_held"]).set(held);
    gauges
        .with_label_values(&["fragments_remembered"])
        .set(remembered);
    gauges.with_label_values(&["bridge_entries"]).set(bridge);
    let version = IntGauge::new("std_table_version", "Version of the running table")?;
    version.set(plan.table().version() as i64);
    let swaps = IntCounterVec::new(
        Opts::new("std_table_swaps_total", "Tables swapped in since start"),
        &[],
    )?;
    swaps
        .with_label_values(&[])
        .inc_by(state.swaps.load(Ordering::Relaxed));
    let (transit_remembered, transit_overflows) = transit_totals(state);
    gauges
        .with_label_values(&["transition_remembered"])
        .set(transit_remembered as i64);
    let switched = IntGauge::new(
        "std_transition_switched",
        "1 while a transition keeps a previous table",
    )?;
    switched.set(i64::from(plan.previous().is_some()));
    let moved = IntGauge::new(
        "std_transition_moved_buckets",
        "Buckets whose owner changed in the running transition",
    )?;
    moved.set(plan.moved().map_or(0, |m| m.len()) as i64);
    let overflows = IntCounterVec::new(
        Opts::new(
            "std_transition_overflows_total",
            "Flows started in a moved bucket that the transition memory had no room for (sent to the old owner)",
        ),
        &[],
    )?;
    overflows.with_label_values(&[]).inc_by(transit_overflows);
    r.register(Box::new(switched))?;
    r.register(Box::new(moved))?;
    r.register(Box::new(overflows))?;
    let up = IntGaugeVec::new(
        Opts::new(
            "std_tm_up",
            "1 if the TM's last health probe answered (probed TMs only)",
        ),
        &["tm_id"],
    )?;
    for (id, alive) in state.failover.up() {
        up.with_label_values(&[&id.to_string()])
            .set(i64::from(alive));
    }
    let failed = IntGauge::new(
        "std_failed_tms",
        "TMs declared failed (their buckets failed over) since the last table install",
    )?;
    failed.set(state.failover.failed().len() as i64);
    let failovers = IntCounterVec::new(
        Opts::new("std_failovers_total", "Automatic failovers performed"),
        &[],
    )?;
    failovers
        .with_label_values(&[])
        .inc_by(state.failover.failovers.load(Ordering::Relaxed));
    r.register(Box::new(up))?;
    r.register(Box::new(failed))?;
    r.register(Box::new(failovers))?;
    let workers = IntGauge::new("std_workers", "Worker threads")?;
    workers.set(state.workers.len() as i64);
    r.register(Box::new(tm_packets))?;
    r.register(Box::new(tm_bytes))?;
    r.register(Box::new(branches))?;
    r.register(Box::new(drops))?;
    r.register(Box::new(io_errors))?;
    r.register(Box::new(backend_drops))?;
    r.register(Box::new(gauges))?;
    r.register(Box::new(version))?;
    r.register(Box::new(swaps))?;
    r.register(Box::new(workers))?;
    if state.kernel.is_some() {
        let xdp = IntCounterVec::new(
            Opts::new(
                "std_xdp_frames_total",
                "Frames the in-kernel steering program took from outside ports: steered to a TM by the kernel, or handed to the workers",
            ),
            &["path"],
        )?;
        if let Some(c) = &kernel {
            xdp.with_label_values(&["steered"]).inc_by(c.steered);
            xdp.with_label_values(&["to_workers"]).inc_by(c.to_workers);
        }
        r.register(Box::new(xdp))?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
