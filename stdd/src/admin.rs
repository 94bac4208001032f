//! stdd's admin endpoint: /metrics (Prometheus text), /healthz, GET and PUT /table, the transition (switch, open, commit, abort) in the typed messages of `control::api`; served by the bounded server of the `admin` crate.
//!
//! A table PUT is parsed, validated, turned into a plan, and swapped in
//! atomically — or refused with the reason, leaving the running table
//! untouched. A transition (DESIGN §4) switches to a new table keeping the
//! running one as "previous" until commit (or abort, which goes back to
//! it). Tables are named by version and checksum: a different table with
//! a running version is refused, naming both. Every transition step is
//! idempotent for the same table, so a coordinator can retry and resume.
//! A table installed by PUT or commit is written to the configured table
//! file, where stdd reads it at start (docs/operations.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use admin_http::{Reply, Request};
use allocation::{AllocationTable, SharedTable};
use control::api::{
    AbortAnswer, CommitAnswer, DistributorPhase, DistributorTransition, StepRequest, TableId,
};
use distributor::pins::Pin;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::DistributorConfig;
use distributor::io::WorkerShared;
use distributor::steer::Plan;
use distributor::verdict::{Branch, Counters, Drop};

/// Largest request body (a table file, with room for the framing).
pub const MAX_BODY_BYTES: usize = allocation::file::MAX_FILE_BYTES as usize + 64 * 1024;

/// A worker that has not published for this long is reported unhealthy.
pub const STALE_AFTER_MS: u64 = 2000;

/// The admin server's limits for stdd.
pub fn limits() -> admin_http::Limits {
    admin_http::Limits {
        max_body_bytes: MAX_BODY_BYTES,
        ..admin_http::Limits::default()
    }
}

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
    /// Configuration reloads (SIGHUP) taken so far: the failover prober
    /// reads its TLS files again after each.
    pub reloads: AtomicU64,
    /// TM liveness and failover state.
    pub failover: crate::failover::FailoverState,
    /// The in-kernel steering (afxdp with `workers.xdp_steer`), whose maps
    /// follow every plan change.
    pub kernel: Option<Arc<distributor::xdp_steer::XdpSteer>>,
    /// The admin server's counters, when it runs.
    pub server: Option<Arc<admin_http::server::ServerStats>>,
    /// The live capture tap (`GET /capture`), when the workers have one.
    pub capture: Option<distributor::capture::Source>,
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

/// The handler the admin server runs for stdd.
pub fn handler(state: Arc<AdminState>) -> Arc<dyn admin_http::server::Handler> {
    Arc::new(move |req: Request| handle(&req, &state))
}

/// Writes `table` where stdd reads it at start, and into the history with
/// `replaced` (the table it took the place of); the error as text (the
/// history's is logged only).
fn persist(
    config: &DistributorConfig,
    table: &AllocationTable,
    replaced: Option<&AllocationTable>,
) -> Option<String> {
    let kept: Vec<&AllocationTable> = replaced.into_iter().chain([table]).collect();
    if let Err(e) = crate::history::record(&config.table, &kept) {
        log::warn!(
            "table version {}: not kept in the history ({e}): `stdctl rollback` cannot come back to it",
            table.version()
        );
    }
    match allocation::file::save(&config.table, table) {
        Ok(()) => None,
        Err(e) => {
            log::error!(
                "table version {} installed but not saved to {}: {e} (a restart would start from the file's table)",
                table.version(),
                config.table.display()
            );
            Some(format!("{}: {e}", config.table.display()))
        }
    }
}

/// Answers one request.
pub fn handle(req: &Request, state: &AdminState) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => match metrics(state) {
            Ok(body) => Reply::metrics(body),
            Err(e) => Reply::text(500, format!("metrics: {e}")),
        },
        ("GET", "/healthz") => {
            let stale: Vec<usize> = state
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.age_ms() > STALE_AFTER_MS)
                .map(|(i, _)| i)
                .collect();
            if stale.is_empty() {
                Reply::text(
                    200,
                    format!("ok: table version {}", state.plan.load().table().version()),
                )
            } else {
                Reply::text(
                    503,
                    format!("workers {stale:?} have not reported for over {STALE_AFTER_MS} ms"),
                )
            }
        }
        ("GET", "/table") => table_reply(req, state.plan.load().table()),
        ("GET", "/table/previous") => match state.plan.load().previous() {
            Some(p) => table_reply(req, p),
            None => Reply::text(404, "no transition is switched: no previous table"),
        },
        ("GET", "/table/operator") => match state.plan.load().derivation() {
            Some((t, _, _)) => table_reply(req, t),
            None => Reply::text(404, "not failed over: GET /table is the operator's table"),
        },
        ("GET", "/table/operator/previous") => match state.plan.load().derivation() {
            Some((_, Some(p), _)) => table_reply(req, p),
            _ => Reply::text(
                404,
                "not failed over while switched: GET /table/previous is the operator's previous table",
            ),
        },
        ("GET", "/table/recovering") => match state.plan.load().recovery() {
            Some((_, switched, _)) => table_reply(req, switched),
            None => Reply::text(404, "not recovering: no table a restart interrupted"),
        },
        ("PUT", "/table") => put_table(req, state),
        ("GET", "/table/history") => match state.config.lock() {
            Ok(c) => Reply::json(200, &crate::history::list(&c.table)),
            Err(_) => Reply::text(500, "configuration lock poisoned"),
        },
        ("GET", p) if p.starts_with("/table/history/") => table_from_history(req, state, p),
        ("GET", "/transition") => Reply::json(200, &transition_state(state)),
        ("POST", "/transition/switch") => switch(req, state),
        ("POST", "/transition/open") => open(req, state),
        ("POST", "/transition/commit") => commit(req, state),
        ("POST", "/transition/abort") => abort(req, state),
        ("GET", "/capture") => capture(req, state),
        (
            _,
            "/metrics" | "/healthz" | "/table" | "/table/previous" | "/table/recovering"
            | "/table/operator"
            | "/table/operator/previous"
            | "/table/history"
            | "/transition"
            | "/transition/switch" | "/transition/open" | "/transition/commit"
            | "/transition/abort"
            | "/capture",
        ) => Reply::text(405, "method not allowed"),
        _ => Reply::text(
            404,
            "not found: /metrics, /healthz, /table[/previous|/recovering|/operator[/previous]|/history[/VERSION]], /transition[/switch|/open|/commit|/abort], /capture",
        ),
    }
}

/// `%XX` and `+` of a query value decoded; `None` if not UTF-8 or a bad escape.
fn unescape(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The request a `GET /capture` query names: `tm` (name or id), `bucket`,
/// `host`, `port`, `proto`, `filter` (a BPF expression), `sample` (0..1],
/// `seconds` (default 10), `max_frames`. Unknown or unreadable parameters
/// are refused, named.
fn capture_request(query: &str, plan: &Plan) -> Result<distributor::capture::Request, String> {
    let mut r = distributor::capture::Request {
        sample: 1.0,
        seconds: 10.0,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = unescape(v).ok_or_else(|| format!("{k}: not a readable value"))?;
        let bad = |what: &str| format!("{k}={v:?}: {what}");
        match k {
            "tm" => {
                let id = match plan.table().tms().iter().find(|t| t.name == v) {
                    Some(t) => t.id,
                    None => v.parse().map_err(|_| bad("no TM of that name or id"))?,
                };
                r.tm = Some(id);
            }
            "bucket" => {
                let b: u16 = v.parse().map_err(|_| bad("a bucket is 0..4095"))?;
                if usize::from(b) >= allocation::TABLE_SIZE {
                    return Err(bad("a bucket is 0..4095"));
                }
                r.bucket = Some(b);
            }
            "host" => r.host = Some(v.parse().map_err(|_| bad("not an IP address"))?),
            "port" => r.port = Some(v.parse().map_err(|_| bad("not a port"))?),
            "proto" => {
                r.protocol = Some(distributor::capture::protocol(&v).map_err(|e| e.to_string())?)
            }
            "filter" => r.bpf = Some(v),
            "sample" => r.sample = v.parse().map_err(|_| bad("a share in (0, 1]"))?,
            "seconds" => r.seconds = v.parse().map_err(|_| bad("seconds, a number"))?,
            "max_frames" => r.max_frames = v.parse().map_err(|_| bad("a count"))?,
            _ => {
                return Err(format!(
                    "unknown parameter {k:?} (tm, bucket, host, port, proto, filter, sample, seconds, max_frames)"
                ))
            }
        }
    }
    Ok(r)
}

/// GET /capture?…: a live capture, streamed as pcapng while it lasts.
fn capture(req: &Request, state: &AdminState) -> Reply {
    let Some(src) = &state.capture else {
        return Reply::text(404, "this stdd has no capture tap");
    };
    let creq = match capture_request(&req.query, &state.plan.load()) {
        Ok(r) => r,
        Err(e) => return Reply::text(400, e),
    };
    let lasts = std::time::Duration::from_secs_f64(creq.seconds.clamp(0.0, 600.0));
    let (tx, stream) = admin_http::server::stream(64, lasts);
    let started = src.start(creq, move |chunk| match tx.try_send(chunk) {
        admin_http::server::Sent::Taken => distributor::capture::Sent::Taken,
        admin_http::server::Sent::Full => distributor::capture::Sent::Full,
        admin_http::server::Sent::Closed => distributor::capture::Sent::Closed,
    });
    match started {
        Ok(()) => Reply::streamed("application/x-pcapng", stream),
        Err(e @ distributor::capture::CaptureError::Busy) => Reply::text(409, e.to_string()),
        Err(e @ distributor::capture::CaptureError::Invalid(_)) => Reply::text(400, e.to_string()),
        Err(e) => Reply::text(500, e.to_string()),
    }
}

/// A table as its file, the hash key redacted unless the request asks
/// `?key=include` (it carried the token: every request on an endpoint
/// with one does).
fn table_reply(req: &Request, table: &AllocationTable) -> Reply {
    Reply::text(
        200,
        allocation::file::render_for(table, req.asks("key=include")),
    )
}

/// GET /table/history/VERSION: that committed table, as its file.
fn table_from_history(req: &Request, state: &AdminState, path: &str) -> Reply {
    let Some(v) = path
        .strip_prefix("/table/history/")
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return Reply::text(400, "/table/history/VERSION: VERSION is a number");
    };
    let Ok(c) = state.config.lock() else {
        return Reply::text(500, "configuration lock poisoned");
    };
    match crate::history::load(&c.table, v) {
        Some(t) => table_reply(req, &t),
        None => Reply::text(
            404,
            format!(
                "version {v} is not in the history (the last {} committed tables)",
                crate::history::KEPT
            ),
        ),
    }
}

/// The table in a request's body, parsed and validated.
fn read_table(req: &Request, what: &str) -> Result<AllocationTable, Reply> {
    let text = req.text()?;
    allocation::file::parse(text).map_err(|e| Reply::text(400, format!("{what}: {e}")))
}

/// The table identity a step names in its body; none for an empty body
/// (the step applies to the running transition, whatever it is).
fn named_table(req: &Request) -> Result<Option<TableId>, Reply> {
    step_request(req).map(|(t, _)| t)
}

/// The body of open and commit: the table named, and the pins it carries
/// (`None`: the pins in force stay).
/// What an open or commit body names: the table, and the pins.
type Step = (Option<TableId>, Option<Arc<[Pin]>>);

fn step_request(req: &Request) -> Result<Step, Reply> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, None));
    }
    let step = req.json::<StepRequest>()?;
    if step.held.is_some() {
        return Err(Reply::text(
            400,
            "held ports are a TM's: a distributor's step takes pins",
        ));
    }
    let named = step.table().map_err(|e| Reply::text(400, e))?;
    let pins = match step.pins {
        None => None,
        Some(_) => {
            let flows = step.pinned_flows().map_err(|e| Reply::text(400, e))?;
            let pins = distributor::pins::installed_at(&flows, distributor::io::clock_ns());
            Some(Arc::from(pins))
        }
    };
    Ok((named, pins))
}

/// `plan` with `pins` when given, logging what was refused.
fn pinned(plan: Plan, pins: Option<Arc<[Pin]>>, capacity: usize) -> Plan {
    let Some(pins) = pins else {
        return plan;
    };
    let n = pins.len();
    let plan = plan.with_pins(pins, capacity);
    if let Some(set) = plan.pins() {
        let r = set.refused();
        if r.full > 0 || r.unroutable > 0 {
            log::warn!(
                "transition: {} of {n} pinned flows refused ({} over transition.pins = {capacity}, {} toward a TM no table has or without a bucket): they follow the table",
                r.full + r.unroutable,
                r.full,
                r.unroutable
            );
        }
    }
    plan
}

/// Refuses a table with the running version and other contents.
fn same_version_other_table(running: &AllocationTable, table: &AllocationTable) -> Option<Reply> {
    TableId::of(table)
        .conflict("running", &TableId::of(running))
        .map(|why| Reply::text(409, why))
}

fn put_table(req: &Request, state: &AdminState) -> Reply {
    let table = match read_table(req, "table rejected") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let version = table.version();
    let Ok(config) = state.config.lock() else {
        return Reply::text(500, "configuration lock poisoned");
    };
    let current = state.plan.snapshot();
    if let Some(prev) = current.previous() {
        return Reply::text(
            409,
            format!(
                "table rejected: a transition from version {} is switched: commit or abort it first",
                prev.version()
            ),
        );
    }
    if let Some(r) = same_version_other_table(current.table(), &table) {
        return r;
    }
    let plan = match config.plan(table) {
        // Installed outright, the table alone steers: no recovery left.
        Ok(p) => config.carry_state(p, &current, &[]).recovered(),
        Err(e) => return Reply::text(400, format!("table rejected: {e}")),
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
            let saved = persist(&config, &installed, Some(old.table()));
            crate::recovery::clear_logged(&config.table, "PUT /table");
            match saved {
                None => Reply::text(200, format!("installed table version {version}")),
                Some(e) => Reply::text(
                    200,
                    format!("installed table version {version}; warning: not saved ({e})"),
                ),
            }
        }
        Err(e) => Reply::text(409, format!("table rejected: {e}")),
    }
}

/// GET /transition: the state.
pub fn transition_state(state: &AdminState) -> DistributorTransition {
    let plan = state.plan.load();
    let (remembered, overflows) = transit_totals(state);
    let phase = match (plan.previous().is_some(), plan.is_open()) {
        (false, _) => DistributorPhase::Idle,
        (true, false) => DistributorPhase::Switched,
        (true, true) => DistributorPhase::Open,
    };
    let (kept, refused) = plan.pins().map_or((0, 0), |p| {
        (p.len() as u64, p.refused().full + p.refused().unroutable)
    });
    DistributorTransition::new(
        phase,
        plan.table(),
        plan.previous(),
        plan.moved().map(|m| m.len()),
        remembered,
        overflows,
    )
    .with_pins(kept, refused)
    .recovering(plan.recovery().map(|(_, switched, _)| switched))
    .failed_over(plan.derivation())
}

/// Pins of the running plan refused, for any reason.
fn pins_refused(state: &AdminState) -> u64 {
    state
        .plan
        .load()
        .pins()
        .map_or(0, |p| p.refused().full + p.refused().unroutable)
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
/// running one its previous (DESIGN §4 step 2). Already switched to (or
/// committed) the same table: the state, unchanged.
fn switch(req: &Request, state: &AdminState) -> Reply {
    let table = match read_table(req, "switch refused") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Ok(config) = state.config.lock() else {
        return Reply::text(500, "configuration lock poisoned");
    };
    let current = state.plan.snapshot();
    let wanted = TableId::of(&table);
    if TableId::of(current.table()) == wanted || TableId::of(current.operator_table()) == wanted {
        return Reply::json(200, &transition_state(state));
    }
    if let Some(prev) = current.operator_previous() {
        return Reply::text(
            409,
            format!(
                "switch refused: already switched from {} to {}",
                TableId::of(prev),
                TableId::of(current.operator_table())
            ),
        );
    }
    if let Some(r) = same_version_other_table(current.operator_table(), &table) {
        return r;
    }
    let version = table.version();
    let plan = match config.plan(table).map_err(|e| e.to_string()).and_then(|p| {
        p.with_previous(current.table().clone())
            .map_err(|e| e.to_string())
    }) {
        Ok(p) => config.carry_state(p, &current, &[]),
        Err(e) => return Reply::text(400, format!("switch refused: {e}")),
    };
    let moved = plan.moved().map(|m| m.len());
    let installed = plan.table().clone();
    // Before anything steers by it: a restart must know it was switched.
    if let Err(e) = crate::recovery::write(&config.table, &installed) {
        return Reply::text(
            500,
            format!("switch refused: the transition marker cannot be written ({e}): a restart would not know which buckets were moving"),
        );
    }
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
            Reply::json(200, &transition_state(state))
        }
        Err(e) => {
            crate::recovery::clear_logged(&config.table, "switch refused");
            Reply::text(409, format!("switch refused: {e}"))
        }
    }
}

/// For the steps of a switched transition (open, commit, abort): the
/// configuration lock, which serialises every table change, and the
/// running plan.
fn locked(
    state: &AdminState,
) -> Result<(std::sync::MutexGuard<'_, DistributorConfig>, Arc<Plan>), Reply> {
    let config = state
        .config
        .lock()
        .map_err(|_| Reply::text(500, "configuration lock poisoned"))?;
    Ok((config, state.plan.snapshot()))
}

/// Refuses a step naming another table than the running one — or than
/// the operator's table its failover table derives from (a failover during
/// a transition carries the transition on). The table to answer with.
fn check_named(what: &str, named: Option<&TableId>, plan: &Plan) -> Result<TableId, Reply> {
    let running = TableId::of(plan.table());
    let operator = TableId::of(plan.operator_table());
    match named {
        Some(n) if *n == running || *n == operator => Ok(n.clone()),
        Some(n) => Err(Reply::text(
            409,
            format!("{what} refused: it names {n}, but this node runs {running}"),
        )),
        None => Ok(running),
    }
}

/// POST /transition/open: new flows in moved buckets start on their new
/// owner (once every distributor has switched).
fn open(req: &Request, state: &AdminState) -> Reply {
    let (named, pins) = match step_request(req) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let (config, current) = match locked(state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let running = match check_named("open", named.as_ref(), &current) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if current.previous().is_none() {
        if named.is_some() {
            // Committed already: nothing left to open.
            return Reply::json(200, &transition_state(state));
        }
        return Reply::text(409, "open refused: no transition is switched");
    }
    if !current.is_open() || pins.is_some() {
        let was_open = current.is_open();
        let recovered = pins.is_some() && current.recovery().is_some();
        let mut plan = pinned((*current).clone().opened(), pins, config.transition.pins);
        if recovered {
            // The pins were read after this switch: every flow of the
            // transition is placed again.
            plan = plan.recovered();
        }
        state.change_plan(|| state.plan.replace(plan));
        if recovered {
            log::info!(
                "transition: recovered (switched again and given the TMs' pins): moved buckets steered again"
            );
        }
        if !was_open {
            log::info!(
                "transition: table version {} open to new flows",
                running.version
            );
        }
    }
    Reply::json(200, &transition_state(state))
}

/// POST /transition/commit: the previous table is dropped (DESIGN §4 step
/// 3) and the table saved where stdd starts from.
fn commit(req: &Request, state: &AdminState) -> Reply {
    let (named, pins) = match step_request(req) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let (config, current) = match locked(state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let running = match check_named("commit", named.as_ref(), &current) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some(prev) = current.previous() else {
        if named.is_some() {
            // Committed already (a resumed push): the pins still apply.
            if pins.is_some() {
                let plan = pinned((*current).clone(), pins, config.transition.pins);
                state.change_plan(|| state.plan.replace(plan));
            }
            return Reply::json(
                200,
                &CommitAnswer {
                    table: running,
                    persist_error: None,
                    pins_refused: Some(pins_refused(state)),
                },
            );
        }
        return Reply::text(409, "commit refused: no transition is switched");
    };
    let prev = prev.version();
    let plan = pinned(
        (*current).clone().without_previous().recovered(),
        pins,
        config.transition.pins,
    );
    state.change_plan(|| state.plan.replace(plan));
    log::info!(
        "transition: committed table version {} (version {prev} dropped)",
        running.version
    );
    // The operator's tables, never a failover derived from them.
    let persist_error = persist(
        &config,
        current.operator_table(),
        current.operator_previous(),
    );
    if persist_error.is_none() {
        // Only once the table file names the committed table.
        crate::recovery::clear_logged(&config.table, "commit");
    }
    Reply::json(
        200,
        &CommitAnswer {
            table: running,
            persist_error,
            pins_refused: Some(pins_refused(state)),
        },
    )
}

/// POST /transition/abort: back to the previous table. Flows that started
/// on a new owner during the window follow the previous table again.
/// Nothing switched: nothing to do (200, `aborted: false`).
fn abort(req: &Request, state: &AdminState) -> Reply {
    let named = match named_table(req) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let (config, current) = match locked(state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let running = TableId::of(current.table());
    let operator = TableId::of(current.operator_table());
    let Some(prev) = current.previous() else {
        if let Some((_, switched, _)) = current.recovery() {
            // Restarted while switched, never switched again: the running
            // table alone steers from now on.
            let switched = TableId::of(switched);
            let plan = (*current).clone().recovered();
            state.change_plan(|| state.plan.replace(plan));
            crate::recovery::clear_logged(&config.table, "abort");
            log::warn!(
                "transition: aborted while recovering (restarted while switched to {switched}): table version {} alone steers again",
                running.version
            );
            return Reply::json(
                200,
                &AbortAnswer {
                    table: running,
                    aborted: true,
                },
            );
        }
        if named.as_ref() == Some(&running) || named.as_ref() == Some(&operator) {
            return Reply::text(
                409,
                format!("abort refused: {running} is committed here; roll back with a new version"),
            );
        }
        return Reply::json(
            200,
            &AbortAnswer {
                table: running,
                aborted: false,
            },
        );
    };
    if let Err(r) = check_named("abort", named.as_ref(), &current) {
        return r;
    }
    let v = prev.version();
    match config.plan(prev.clone()) {
        Ok(p) => {
            let p = config.carry_state(p, &current, &[]).recovered();
            // Failed over meanwhile: back on the failover of the previous
            // operator table, the failures kept.
            let p = match current.derivation() {
                Some((_, Some(op_prev), failed)) => {
                    state.failover.rebase(op_prev);
                    p.derived_from(op_prev.clone(), None, failed.to_vec())
                }
                _ => {
                    state.failover.installed(prev);
                    p
                }
            };
            state.change_plan(|| state.plan.replace(p));
            crate::recovery::clear_logged(&config.table, "abort");
            state.swaps.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "transition: aborted, back to table version {v} from {}",
                running.version
            );
            Reply::json(
                200,
                &AbortAnswer {
                    table: TableId::of(current.operator_previous().unwrap_or(prev)),
                    aborted: true,
                },
            )
        }
        Err(e) => Reply::text(500, format!("abort failed: {e}")),
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
    // The share the running table gives each TM, in its group: what
    // dashboards and alerts compare `std_tm_packets_total` with.
    let tm_buckets = IntGaugeVec::new(
        Opts::new(
            "std_tm_buckets",
            "Buckets the running table gives each TM, in its group",
        ),
        &["tm_id", "tm", "group"],
    )?;
    let groups = plan.table().groups();
    for (i, tm) in plan.table().tms().iter().enumerate() {
        let group = groups.get(tm.group).map_or("?", |g| g.name.as_str());
        tm_buckets
            .with_label_values(&[&tm.id.to_string(), &tm.name, group])
            .set(i64::from(plan.table().buckets_of(i as allocation::TmIndex)));
    }
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
    let pinned = IntGauge::new(
        "std_pinned_flows",
        "Flows pinned to their old owner past a table change (UDP sessions, long connections)",
    )?;
    let pins_refused = IntGaugeVec::new(
        Opts::new(
            "std_pins_refused",
            "Pinned flows the running pin set refused, by reason (they follow the table)",
        ),
        &["reason"],
    )?;
    if let Some(p) = plan.pins() {
        pinned.set(p.len() as i64);
        pins_refused
            .with_label_values(&["full"])
            .set(p.refused().full as i64);
        pins_refused
            .with_label_values(&["unroutable"])
            .set(p.refused().unroutable as i64);
    }
    r.register(Box::new(pinned))?;
    r.register(Box::new(pins_refused))?;
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
    r.register(Box::new(tm_buckets))?;
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
    if let Some(src) = &state.capture {
        let st = &src.tap.stats;
        let dropped = IntCounterVec::new(
            Opts::new(
                "std_capture_dropped_total",
                "Frames a capture wanted and lost: a full ring in the kernel or a worker, or a reader that did not keep up (never steering slowed)",
            ),
            &["where"],
        )?;
        let kernel_dropped = state
            .kernel
            .as_ref()
            .and_then(|k| k.capture_dropped().ok())
            .unwrap_or(0);
        dropped
            .with_label_values(&["kernel_ring"])
            .inc_by(kernel_dropped);
        dropped
            .with_label_values(&["worker_ring"])
            .inc_by(st.dropped_worker_ring.load(Ordering::Relaxed));
        dropped
            .with_label_values(&["reader"])
            .inc_by(st.dropped_reader.load(Ordering::Relaxed));
        let frames = IntCounter::new("std_capture_frames_total", "Frames written into captures")?;
        frames.inc_by(st.frames.load(Ordering::Relaxed));
        let sessions = IntCounter::new("std_capture_sessions_total", "Captures started")?;
        sessions.inc_by(st.sessions.load(Ordering::Relaxed));
        let armed = IntGauge::new("std_capture_armed", "1 while a capture is armed")?;
        armed.set(i64::from(src.tap.armed()));
        r.register(Box::new(dropped))?;
        r.register(Box::new(frames))?;
        r.register(Box::new(sessions))?;
        r.register(Box::new(armed))?;
    }
    if let Some(st) = &state.server {
        let conns = IntCounterVec::new(
            Opts::new(
                "std_admin_connections_total",
                "Admin endpoint connections by outcome",
            ),
            &["outcome"],
        )?;
        for (outcome, n) in [
            ("accepted", &st.accepted),
            ("shed_idle", &st.shed_idle),
            ("refused", &st.refused),
            ("accept_error", &st.accept_errors),
        ] {
            conns
                .with_label_values(&[outcome])
                .inc_by(n.load(Ordering::Relaxed));
        }
        let tls = IntCounter::new(
            "std_admin_tls_failures_total",
            "Admin TLS handshakes that failed (no or a wrong client certificate, plain HTTP, too slow)",
        )?;
        tls.inc_by(st.tls_failures.load(Ordering::Relaxed));
        r.register(Box::new(conns))?;
        r.register(Box::new(tls))?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
