//! stdctl against a running cluster: the cluster file, every node's admin endpoint through the typed client, status, and pushes driven by the one transition coordinator (`control::coordinator`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use admin_http::client::{Client, Endpoint};
use allocation::{file, AllocationTable, Change, Profile, TmIndex};
use anyhow::{anyhow, bail, Result};
use control::api::{DistributorPhase, DistributorTransition, TableId, TmTransition};
use control::coordinator::{Answer, Call, CallError, NodeId, Outcome, Push, PushSpec, Step};
use serde::{Deserialize, Serialize};

/// A node's admin endpoint.
pub type Node = Endpoint;

/// The query that asks a node for a table with its hash key.
pub const WITH_KEY: &str = "key=include";

/// A TM: its id in the tables, and its admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmNode {
    /// TM id (as in the table).
    pub id: u32,
    /// Admin endpoint.
    #[serde(flatten)]
    pub node: Node,
}

/// The cluster file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Longest wait for old owners to drain before commit, seconds.
    #[serde(default = "default_drain")]
    pub drain_window_s: u64,
    /// How often TMs are asked during the drain, milliseconds.
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
    /// Per-request timeout, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Tries of each rollback and commit request before the node is
    /// reported as not reached.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Every distributor (front, back, combined).
    #[serde(rename = "distributor")]
    pub distributors: Vec<Node>,
    /// Every TM.
    #[serde(rename = "tm")]
    pub tms: Vec<TmNode>,
    /// What stdctl trusts and presents to `https://` endpoints (`[tls]`:
    /// `ca`, and `cert`/`key` for endpoints demanding a client certificate).
    #[serde(default)]
    pub tls: admin_http::tls::ClientTls,
    /// The loaded `[tls]` (filled by [`Cluster::load`]).
    #[serde(skip)]
    tls_config: Option<std::sync::Arc<admin_http::tls::ClientConfig>>,
}

fn default_drain() -> u64 {
    60
}
fn default_poll() -> u64 {
    250
}
fn default_timeout() -> u64 {
    3000
}
fn default_attempts() -> u32 {
    3
}

/// Environment variables that override cluster-file keys: `STDCTL_TIMEOUT_MS=500`,
/// `STDCTL_DRAIN_WINDOW_S=120` (the loader stdd and tmd use: `cli_common::settings`).
pub const ENV_PREFIX: &str = "STDCTL";

impl Cluster {
    /// Reads and checks a cluster file (with `STDCTL_*` overrides).
    pub fn load(path: &Path) -> Result<Self> {
        let mut c: Cluster = cli_common::settings::load(path, ENV_PREFIX)
            .map_err(|e| anyhow!("cluster file {e}"))?;
        if c.distributors.is_empty() {
            bail!("cluster file {}: no [[distributor]]", path.display());
        }
        if c.tms.is_empty() {
            bail!("cluster file {}: no [[tm]]", path.display());
        }
        for (i, d) in c.distributors.iter_mut().enumerate() {
            if d.name.is_empty() {
                d.name = format!("distributor{i}");
            }
        }
        for t in &mut c.tms {
            if t.node.name.is_empty() {
                t.node.name = format!("tm{}", t.id);
            }
        }
        let mut ids: Vec<u32> = c.tms.iter().map(|t| t.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            bail!("cluster file {}: a TM id is listed twice", path.display());
        }
        for n in c.distributors.iter().chain(c.tms.iter().map(|t| &t.node)) {
            if n.url.starts_with("https://") {
                if c.tls.ca.is_none() {
                    bail!(
                        "cluster file {}: node '{}': admin is https:// but [tls] ca is not set (nothing is trusted by default)",
                        path.display(),
                        n.name
                    );
                }
            } else if !n.url.starts_with("http://") {
                bail!(
                    "cluster file {}: node '{}': admin must be an http:// or https:// URL, got '{}'",
                    path.display(),
                    n.name,
                    n.url
                );
            }
        }
        c.tls_config = c
            .tls
            .load("tls")
            .map_err(|e| anyhow!("cluster file {}: {e}", path.display()))?;
        Ok(c)
    }

    /// The client every command calls nodes with (the `[tls]` settings,
    /// `timeout_ms` per request).
    pub fn client(&self) -> Client {
        Client::with_tls(
            Duration::from_millis(self.timeout_ms.max(1)),
            self.tls_config.clone(),
        )
    }

    fn endpoints(&self) -> (Vec<Endpoint>, Vec<Endpoint>) {
        (
            self.distributors.clone(),
            self.tms.iter().map(|t| t.node.clone()).collect(),
        )
    }
}

/// An error naming the node and the request.
fn node_error(node: &Endpoint, what: &str, e: CallError) -> anyhow::Error {
    anyhow!("{}: {what}: {e}", node.name)
}

/// A node's table (`GET /table`, or `/table/previous`).
/// A table from `path` (`/table`, `/table/previous`, …), its hash key
/// included (endpoints show it only when asked).
fn fetch_table(client: &Client, node: &Endpoint, path: &str) -> Result<AllocationTable> {
    let text = client
        .ok_text(node, "GET", &format!("{path}?{WITH_KEY}"), None)
        .map_err(|e| node_error(node, &format!("GET {path}"), e))?;
    file::parse(&text).map_err(|e| anyhow!("{}: GET {path}: {e}", node.name))
}

/// The table the cluster runs: the first distributor's (a failover table
/// while a TM is failed). Warns when distributors disagree.
pub fn running_table(c: &Cluster) -> Result<AllocationTable> {
    let client = c.client();
    let (dists, _) = c.endpoints();
    let mut first: Option<(String, AllocationTable)> = None;
    for d in &dists {
        let t = match fetch_table(&client, d, "/table") {
            Ok(t) => t,
            Err(e) if first.is_some() => {
                eprintln!("stdctl: warning: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        match &first {
            None => first = Some((d.name.clone(), t)),
            Some((name, f)) => {
                let (a, b) = (TableId::of(f), TableId::of(&t));
                if a != b {
                    eprintln!(
                        "stdctl: warning: {} runs another table than {} ({b} vs {a}): a failover one side has not detected yet?",
                        d.name, name
                    );
                }
            }
        }
    }
    first
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow!("no distributor answered"))
}

/// TMs with no bucket in group `g` of `t`: failed (a failover table) or drained.
pub fn out_of_service(t: &AllocationTable, g: usize) -> Vec<TmIndex> {
    let counts = t.counts(g);
    t.members(g)
        .into_iter()
        .filter(|&m| counts[usize::from(m)] == 0)
        .collect()
}

/// The next table for group `g` at a target profile: its TMs in
/// `excluded` get no bucket, every other member its share; the other
/// groups unchanged; version + 1.
pub fn plan_change(
    t: &AllocationTable,
    g: usize,
    profile: &Profile,
    excluded: &[TmIndex],
) -> Result<Change> {
    let targets = t.targets_excluding(g, profile, excluded)?;
    Ok(t.rebalance_to_targets(g, &targets, Some(profile.clone()))?)
}

fn progress(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        crate::report::say(line);
    }
}

/// What `stdctl push` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    /// The version the cluster ran.
    pub from_version: u64,
    /// Its checksum.
    pub from_checksum: String,
    /// The version it runs now.
    pub to_version: u64,
    /// Its checksum.
    pub to_checksum: String,
    /// Buckets whose owner changed.
    pub moved_buckets: usize,
    /// TMs skipped (out of service in both tables, not answering).
    pub skipped: Vec<String>,
    /// Seconds from the open to the commit.
    pub drain_s: f64,
    /// Connections still in moved buckets at the commit (the window ended).
    pub moving_at_commit: u64,
    /// Flows (each side of a connection or UDP session) the distributors
    /// were given to keep on their old owners past the commit.
    pub pinned_at_commit: u64,
    /// TMs of unknown state at a forced commit.
    pub unknown_at_commit: Vec<String>,
    /// Warnings (a node that could not save the table, …).
    pub warnings: Vec<String>,
    /// Seconds in all.
    pub total_s: f64,
    /// True when this push finished a transition an earlier one left.
    pub resumed: bool,
}

/// Distributor `d`'s transition state, checked.
fn distributor_state(client: &Client, d: &Endpoint) -> Result<DistributorTransition> {
    let state: DistributorTransition = client
        .ok_json(d, "GET", "/transition", None)
        .map_err(|e| node_error(d, "GET /transition", e))?;
    state
        .check()
        .map_err(|e| anyhow!("{}: GET /transition: {e}", d.name))?;
    Ok(state)
}

/// The table a push starts from: the running one, or — when the first
/// distributor is switched to `next` already (an earlier push stopped) —
/// the previous one, to resume.
fn starting_point(
    client: &Client,
    dists: &[Endpoint],
    tms: &[Endpoint],
    next: &AllocationTable,
) -> Result<(AllocationTable, bool)> {
    let d = &dists[0];
    let state = distributor_state(client, d)?;
    let wanted = TableId::of(next);
    if state.state == DistributorPhase::Idle && state.runs(&wanted) {
        // Committed on the distributors already: an earlier push stopped
        // during the commit. A TM still prepared for it runs the table to
        // resume from.
        for t in tms {
            let Ok(s) = client.ok_json::<TmTransition>(t, "GET", "/transition", None) else {
                continue;
            };
            if s.check().is_ok() && s.next().as_ref() == Some(&wanted) {
                return Ok((fetch_table(client, t, "/table")?, true));
            }
        }
        // No TM is prepared for it: nothing to resume (refused below: not newer).
    }
    if state.state != DistributorPhase::Idle {
        if state.runs(&wanted) {
            // The operator's previous table, not a failover derived from it.
            let path = match state.failed_over {
                Some(_) => "/table/operator/previous",
                None => "/table/previous",
            };
            return Ok((fetch_table(client, d, path)?, true));
        }
        bail!(
            "{}: a transition to {} is under way (from {}): push that table again to finish it, or `stdctl abort`",
            d.name,
            state.table(),
            state.previous().map_or_else(|| "?".into(), |p| p.to_string())
        );
    }
    Ok((fetch_table(client, d, "/table")?, false))
}

/// The table of the transition the cluster is in: the one the first
/// distributor is switched to, or — its commit done — the one a TM is still
/// prepared for. An error when no node is in a transition.
pub fn unfinished(c: &Cluster) -> Result<AllocationTable> {
    let client = c.client();
    let (dists, tms) = c.endpoints();
    // A distributor switched, or restarted while switched (recovering):
    // the table it was switched to.
    for d in &dists {
        let Ok(state) = distributor_state(&client, d) else {
            continue;
        };
        if state.state != DistributorPhase::Idle {
            // The operator's table, not a failover derived from it.
            let path = match state.failed_over {
                Some(_) => "/table/operator",
                None => "/table",
            };
            return fetch_table(&client, d, path);
        }
        if state.recovering.is_some() {
            return fetch_table(&client, d, "/table/recovering");
        }
    }
    let d = &dists[0];
    let state = distributor_state(&client, d)?;
    let (running, path) = match &state.failed_over {
        Some(f) => (f.table.clone(), "/table/operator"),
        None => (state.table(), "/table"),
    };
    for t in &tms {
        let Ok(s) = client.ok_json::<TmTransition>(t, "GET", "/transition", None) else {
            continue;
        };
        if s.check().is_ok() && s.next().as_ref() == Some(&running) {
            return fetch_table(&client, d, path);
        }
    }
    bail!(
        "no transition to resume: {} runs {} alone and no TM is prepared for it",
        d.name,
        running
    )
}

/// Puts the contents of an earlier committed table back as a new version
/// (the running version + 1) through [`push`]: `to`, or the newest version
/// in the first distributor's history older than the running table. The
/// table gone back to, and the push's summary.
pub fn rollback(
    c: &Cluster,
    to: Option<u64>,
    json: bool,
    force: bool,
) -> Result<(TableId, Pushed)> {
    let client = c.client();
    let (dists, _) = c.endpoints();
    let d = &dists[0];
    let state = distributor_state(&client, d)?;
    if state.state != DistributorPhase::Idle {
        bail!(
            "{}: a transition to {} is under way: finish it (push that table again) or `stdctl abort` before rolling back",
            d.name,
            state.table()
        );
    }
    let running = fetch_table(&client, d, "/table")?;
    let history: Vec<TableId> = client
        .ok_json(d, "GET", "/table/history", None)
        .map_err(|e| node_error(d, "GET /table/history", e))?;
    let listed = || {
        history
            .iter()
            .map(|t| t.version.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let target = match to {
        Some(v) if v >= running.version() => bail!(
            "--to {v}: the cluster runs version {}; roll back to an older one",
            running.version()
        ),
        Some(v) => history.iter().find(|t| t.version == v).cloned().ok_or_else(|| {
            anyhow!(
                "{}: version {v} is not in its history (it keeps: {})",
                d.name,
                listed()
            )
        })?,
        None => history
            .iter()
            .find(|t| t.version < running.version())
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "{}: no committed table older than the running version {} in its history (it keeps: {})",
                    d.name,
                    running.version(),
                    if history.is_empty() { "none".into() } else { listed() }
                )
            })?,
    };
    let old = fetch_table(&client, d, &format!("/table/history/{}", target.version))?;
    if TableId::of(&old) != target {
        bail!(
            "{}: GET /table/history/{} answered {}, not the {} it listed",
            d.name,
            target.version,
            TableId::of(&old),
            target
        );
    }
    let next = old.with_version(running.version() + 1);
    progress(
        json,
        &format!(
            "rolling back: the contents of {} as version {}",
            target,
            next.version()
        ),
    );
    Ok((target, push(c, &next, json, force)?))
}

/// Runs the transition protocol (DESIGN §4) to `next` on every node with
/// the shared coordinator; rolls every node that may have changed back if
/// one fails before the commit.
pub fn push(c: &Cluster, next: &AllocationTable, json: bool, force: bool) -> Result<Pushed> {
    let client = c.client();
    let started = Instant::now();
    let (dists, tms) = c.endpoints();
    let (from, resumed) = starting_point(&client, &dists, &tms, next)?;
    if resumed {
        progress(
            json,
            &format!(
                "resuming the transition from {} to {}",
                TableId::of(&from),
                TableId::of(next)
            ),
        );
    }
    let spec = PushSpec {
        distributors: dists.iter().map(|d| d.name.clone()).collect(),
        tms: c.tms.iter().map(|t| (t.id, t.node.name.clone())).collect(),
        drain_window: Duration::from_secs(c.drain_window_s),
        poll: Duration::from_millis(c.poll_ms.max(10)),
        attempts: c.attempts.max(1),
        force,
    };
    let mut coordinator = Push::new(spec, &from, next).map_err(|e| anyhow!(e))?;
    let outcome = loop {
        match coordinator.step(started.elapsed()) {
            Step::Say(line) => progress(json, &line),
            Step::Call(node, call) => {
                let endpoint = match node {
                    NodeId::Distributor(i) => &dists[i],
                    NodeId::Tm(i) => &tms[i],
                };
                let answer: Result<Answer, CallError> = client.call(endpoint, &call);
                coordinator.answer(answer, started.elapsed());
            }
            Step::WaitUntil(t) => std::thread::sleep(t.saturating_sub(started.elapsed())),
            Step::Done(o) => break o,
        }
    };
    match outcome {
        Outcome::Committed(s) => {
            for w in &s.warnings {
                progress(json, &format!("warning: {w}"));
            }
            Ok(Pushed {
                from_version: s.from.version,
                from_checksum: s.from.checksum,
                to_version: s.to.version,
                to_checksum: s.to.checksum,
                moved_buckets: s.moved_buckets,
                skipped: s.skipped,
                drain_s: s.drain.as_secs_f64(),
                moving_at_commit: s.moving_at_commit,
                pinned_at_commit: s.pinned_at_commit,
                unknown_at_commit: s.unknown_at_commit,
                warnings: s.warnings,
                total_s: started.elapsed().as_secs_f64(),
                resumed,
            })
        }
        Outcome::RolledBack {
            cause,
            not_rolled_back,
        } if not_rolled_back.is_empty() => {
            bail!("{cause}; every node that may have changed was rolled back")
        }
        Outcome::RolledBack {
            cause,
            not_rolled_back,
        } => bail!(
            "{cause}; rolled back, except {} node(s) that could not be: {}",
            not_rolled_back.len(),
            not_rolled_back.join("; ")
        ),
        Outcome::Stopped { cause } => bail!("{cause}"),
    }
}

/// `stdctl abort`: every node out of whatever transition it is in, with
/// retries; the nodes that could not be reached, named.
pub fn abort(c: &Cluster, json: bool) -> Result<()> {
    let client = c.client();
    let (dists, tms) = c.endpoints();
    // A table some distributor committed already cannot be aborted on the
    // TMs still prepared for it: that would split the cluster.
    let committed: Vec<(String, TableId)> = dists
        .iter()
        .filter_map(|d| {
            let s = client
                .ok_json::<DistributorTransition>(d, "GET", "/transition", None)
                .ok()?;
            (s.state == DistributorPhase::Idle).then(|| (d.name.clone(), s.table()))
        })
        .collect();
    for t in &tms {
        let Ok(s) = client.ok_json::<TmTransition>(t, "GET", "/transition", None) else {
            continue;
        };
        if let Some(n) = s.next() {
            if let Some((d, _)) = committed.iter().find(|(_, id)| *id == n) {
                bail!(
                    "{d} has committed {n} already and {} is prepared for it: aborting would split the cluster; push that table again to finish the transition",
                    t.name
                );
            }
        }
    }
    let mut failed = Vec::new();
    for node in dists.iter().chain(&tms) {
        let mut last = None;
        for attempt in 0..c.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(c.poll_ms.max(10)));
            }
            match client.call(node, &Call::Abort(None)) {
                Ok(Answer::Aborted(a)) => {
                    progress(
                        json,
                        &format!(
                            "abort    {:<12} {} {}",
                            node.name,
                            if a.aborted { "back on" } else { "idle on" },
                            a.table
                        ),
                    );
                    last = None;
                    break;
                }
                Ok(other) => last = Some(format!("unexpected answer {other:?}")),
                Err(e) => last = Some(e.to_string()),
            }
        }
        if let Some(why) = last {
            progress(json, &format!("abort    {:<12} FAILED: {why}", node.name));
            failed.push(format!("{}: {why}", node.name));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} node(s) could not be aborted: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// One node in `stdctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// `distributor` or `tm`.
    pub kind: &'static str,
    /// Its TM id (TMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tm_id: Option<u32>,
    /// `ok`, or the health answer, or why there was none.
    pub health: String,
    /// The table it runs, when it said.
    pub table: Option<TableId>,
    /// Its transition phase (`idle`, `switched`, `open`, `prepared`), or `?` with why.
    pub transition: String,
    /// Connections in moved buckets (prepared TMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving: Option<u64>,
    /// Open connections (TMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_connections: Option<u64>,
    /// Why this node needs attention (another table than the cluster's, an
    /// unreadable answer); empty when it is in order.
    pub problems: Vec<String>,
}

/// One TM's share in `stdctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct TmShare {
    /// TM id.
    pub tm_id: u32,
    /// Name.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Buckets in its group's table.
    pub buckets: u32,
    /// Their share of the group's table.
    pub target: f64,
    /// Share of the frames the distributors steered to its group's TMs.
    pub packet_share: f64,
    /// Open connections.
    pub open_connections: u64,
    /// Share of its group's open connections.
    pub connection_share: f64,
}

/// `stdctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The cluster's table (the first distributor's).
    pub table: Option<TableId>,
    /// Every node.
    pub nodes: Vec<NodeStatus>,
    /// Every TM of the table.
    pub tms: Vec<TmShare>,
    /// Nodes that need attention: the status is green only when this is empty.
    pub problems: usize,
}

/// Every node's state: health, table (version and checksum), transition, load.
pub fn status(c: &Cluster) -> Status {
    let client = c.client();
    let (dists, tms) = c.endpoints();
    let table = running_table(c).ok();
    let cluster_id = table.as_ref().map(TableId::of);
    let mut nodes = Vec::new();
    let mut packets: BTreeMap<u32, u64> = BTreeMap::new();
    let mut active: BTreeMap<u32, u64> = BTreeMap::new();
    let health = |node: &Endpoint| match client.request(node, "GET", "/healthz", None) {
        Ok((200, _)) => "ok".to_string(),
        Ok((code, b)) => format!("{code} {}", b.trim()),
        Err(e) => format!("down ({e})"),
    };
    for d in &dists {
        let mut problems = Vec::new();
        let health = health(d);
        if health != "ok" {
            problems.push(format!("health: {health}"));
        }
        let state = client
            .ok_json::<DistributorTransition>(d, "GET", "/transition", None)
            .and_then(|s| s.check().map(|()| s).map_err(CallError::Garbage));
        if let Ok(m) = client.ok_text(d, "GET", "/metrics", None) {
            for (labels, v) in samples(&m, "std_tm_packets_total") {
                if let Some(id) = label(&labels, "tm_id").and_then(|s| s.parse().ok()) {
                    *packets.entry(id).or_default() += v as u64;
                }
            }
        }
        let (table, transition) = match &state {
            Ok(s) => {
                if let Some(r) = &s.recovering {
                    problems.push(format!(
                        "restarted while switched to {r}: drops the flows it cannot place until `stdctl transition resume` (or abort)"
                    ));
                }
                let phase = phase_text(s.state);
                let phase = match s.recovering {
                    Some(_) => format!("{phase}, recovering"),
                    None => phase,
                };
                (Some(s.table()), phase)
            }
            Err(e) => {
                problems.push(format!("GET /transition: {e}"));
                (None, "?".to_string())
            }
        };
        if let (Some(t), Some(c)) = (&table, &cluster_id) {
            if t != c
                && state
                    .as_ref()
                    .is_ok_and(|s| s.previous().as_ref() != Some(c))
            {
                problems.push(format!("runs {t}, not the cluster's {c}"));
            }
        }
        nodes.push(NodeStatus {
            name: d.name.clone(),
            kind: "distributor",
            tm_id: None,
            health,
            table,
            transition,
            moving: None,
            open_connections: None,
            problems,
        });
    }
    for (t, e) in c.tms.iter().zip(&tms) {
        let mut problems = Vec::new();
        let health = health(e);
        let state = client
            .ok_json::<TmTransition>(e, "GET", "/transition", None)
            .and_then(|s| s.check().map(|()| s).map_err(CallError::Garbage));
        let mut open = None;
        if let Ok(m) = client.ok_text(e, "GET", "/metrics", None) {
            let n: f64 = samples(&m, "tmd_connections_active")
                .iter()
                .map(|(_, v)| v)
                .sum();
            active.insert(t.id, n as u64);
            open = Some(n as u64);
        }
        let in_service = table.as_ref().is_some_and(|tab| {
            tab.tm_index_by_id(t.id)
                .is_some_and(|i| tab.buckets_of(i) > 0)
        });
        if health != "ok" && in_service {
            problems.push(format!("health: {health}"));
        }
        let (current, transition, moving) = match &state {
            Ok(s) => (
                Some(s.current()),
                match s.phase {
                    control::TmPhase::Idle => "idle".to_string(),
                    control::TmPhase::Prepared => "prepared".to_string(),
                },
                s.connections_in_moved_buckets,
            ),
            Err(err) => {
                if in_service {
                    problems.push(format!("GET /transition: {err}"));
                }
                (None, "?".to_string(), None)
            }
        };
        // A TM's table must be the distributors' (by version and
        // checksum): another one gives it buckets the distributors do not.
        if let (Some(cur), Some(cl), Ok(s)) = (&current, &cluster_id, &state) {
            let prepared_for_cluster = s.next().as_ref() == Some(cl);
            if cur != cl && !prepared_for_cluster {
                problems.push(format!("runs {cur}, not the cluster's {cl}"));
            }
        }
        nodes.push(NodeStatus {
            name: t.node.name.clone(),
            kind: "tm",
            tm_id: Some(t.id),
            health,
            table: current,
            transition,
            moving,
            open_connections: open,
            problems,
        });
    }
    let shares = table
        .as_ref()
        .map(|t| {
            // Per group: a TM's shares are of its group's traffic.
            let mut total_packets = vec![0u64; t.groups().len()];
            let mut total_active = vec![0u64; t.groups().len()];
            for tm in t.tms() {
                if let (Some(p), Some(a)) = (
                    total_packets.get_mut(tm.group),
                    total_active.get_mut(tm.group),
                ) {
                    *p += packets.get(&tm.id).copied().unwrap_or(0);
                    *a += active.get(&tm.id).copied().unwrap_or(0);
                }
            }
            t.tms()
                .iter()
                .enumerate()
                .map(|(i, tm)| {
                    let n = t.buckets_of(i as TmIndex);
                    let p = packets.get(&tm.id).copied().unwrap_or(0);
                    let a = active.get(&tm.id).copied().unwrap_or(0);
                    let share = |x: u64, total: u64| {
                        if total > 0 {
                            x as f64 / total as f64
                        } else {
                            0.0
                        }
                    };
                    let g = tm.group;
                    TmShare {
                        tm_id: tm.id,
                        name: tm.name.clone(),
                        group: t
                            .groups()
                            .get(g)
                            .map_or_else(String::new, |x| x.name.clone()),
                        buckets: n,
                        target: f64::from(n) / allocation::TABLE_SIZE as f64,
                        packet_share: share(p, total_packets.get(g).copied().unwrap_or(0)),
                        open_connections: a,
                        connection_share: share(a, total_active.get(g).copied().unwrap_or(0)),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let problems = nodes.iter().filter(|n| !n.problems.is_empty()).count();
    Status {
        table: cluster_id,
        nodes,
        tms: shares,
        problems,
    }
}

pub(crate) fn phase_text(p: DistributorPhase) -> String {
    match p {
        DistributorPhase::Idle => "idle",
        DistributorPhase::Switched => "switched",
        DistributorPhase::Open => "open",
    }
    .to_string()
}

/// Samples of metric `name` in Prometheus text: (labels, value).
pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let end = r.find('}')?;
                    (r[..end].to_string(), r[end + 1..].trim())
                }
                None if rest.starts_with(' ') => (String::new(), rest.trim()),
                None => return None,
            };
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

pub(crate) fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The status as a table for people.
pub fn status_text(v: &Status) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "cluster table {}

{:<14} {:<12} {:<8} {:<10} {:<10} {}
",
        v.table
            .as_ref()
            .map_or_else(|| "? (no distributor answered)".into(), |t| t.to_string()),
        "node",
        "kind",
        "version",
        "transition",
        "health",
        "detail"
    ));
    for n in &v.nodes {
        let mut detail = match (n.open_connections, n.moving) {
            (Some(o), Some(m)) => format!("{o} open, {m} in moved buckets"),
            (Some(o), None) => format!("{o} open"),
            _ => String::new(),
        };
        for p in &n.problems {
            if !detail.is_empty() {
                detail.push_str("; ");
            }
            detail.push_str("PROBLEM: ");
            detail.push_str(p);
        }
        s.push_str(&format!(
            "{:<14} {:<12} {:<8} {:<10} {:<10} {}
",
            n.name,
            n.kind,
            n.table
                .as_ref()
                .map_or("?".into(), |t| format!("v{}", t.version)),
            n.transition,
            n.health,
            detail
        ));
    }
    s.push_str(&format!(
        "
{:<10} {:<10} {:>8} {:>8} {:>14} {:>12} {:>11}
",
        "tm", "group", "buckets", "target", "packet share", "open conns", "conn share"
    ));
    for t in &v.tms {
        s.push_str(&format!(
            "{:<10} {:<10} {:>8} {:>7.2}% {:>13.2}% {:>12} {:>10.2}%
",
            t.name,
            t.group,
            t.buckets,
            t.target * 100.0,
            t.packet_share * 100.0,
            t.open_connections,
            t.connection_share * 100.0
        ));
    }
    s.push_str(
        "(shares are of the TM's group; packet share: since each distributor started; open connections: now)
",
    );
    if v.problems > 0 {
        s.push_str(&format!(
            "{} node(s) need attention (PROBLEM above)
",
            v.problems
        ));
    }
    s
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn metric_samples_and_labels() {
        let text = "# HELP x\nstd_tm_packets_total{tm_id=\"0\",tm=\"tm0\"} 12\nstd_tm_packets_total{tm_id=\"1\",tm=\"tm1\"} 30\nstd_tm_packets_totalx 5\nstd_workers 1\n";
        let s = samples(text, "std_tm_packets_total");
        assert_eq!(s.len(), 2);
        assert_eq!(label(&s[1].0, "tm_id"), Some("1"));
        assert_eq!(s[1].1, 30.0);
        assert_eq!(samples(text, "std_workers"), vec![(String::new(), 1.0)]);
    }
}

/// One TM's `GET /persistence`, or why it could not be read.
#[derive(Debug, Serialize)]
pub struct TmPersistence {
    /// The TM's name in the cluster file.
    pub tm: String,
    /// Its view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view: Option<control::api::PersistenceView>,
    /// Why it is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every TM's persistence view, or only `tm`'s (id or name).
pub fn persistence(c: &Cluster, tm: Option<&str>) -> Result<Vec<TmPersistence>> {
    let client = c.client();
    let picked: Vec<&TmNode> = c
        .tms
        .iter()
        .filter(|t| tm.is_none_or(|w| w == t.node.name || w.parse::<u32>() == Ok(t.id)))
        .collect();
    if picked.is_empty() {
        bail!("no TM {} in the cluster file", tm.unwrap_or("at all"));
    }
    Ok(picked
        .into_iter()
        .map(|t| {
            let e = t.node.clone();
            match client.ok_json::<control::api::PersistenceView>(&e, "GET", "/persistence", None) {
                Ok(v) if v.tm_id == t.id => TmPersistence {
                    tm: e.name.clone(),
                    view: Some(v),
                    error: None,
                },
                Ok(v) => TmPersistence {
                    tm: e.name.clone(),
                    view: None,
                    error: Some(format!(
                        "answers as TM {}, the cluster file says {}",
                        v.tm_id, t.id
                    )),
                },
                Err(err) => TmPersistence {
                    tm: e.name.clone(),
                    view: None,
                    error: Some(format!("GET /persistence: {err}")),
                },
            }
        })
        .collect())
}

/// `stdctl persistence` for people.
pub fn persistence_text(all: &[TmPersistence]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for t in all {
        let Some(v) = &t.view else {
            let _ = writeln!(s, "{}: {}", t.tm, t.error.as_deref().unwrap_or("no answer"));
            continue;
        };
        if v.domains.is_empty() {
            let _ = writeln!(s, "{}: no persistence configured", t.tm);
        }
        for d in &v.domains {
            let _ = writeln!(
                s,
                "{} {} {} ({}): clients by /{} (IPv6 /{}), {} ms after the last connection; {} hits, {} misses, {} rebinds; {} bindings",
                t.tm,
                if d.buddy_group { "buddy group" } else { "virtual server" },
                d.name,
                d.virtual_servers.join(", "),
                d.v4_prefix,
                d.v6_prefix,
                d.timeout_ms,
                d.hits,
                d.misses,
                d.rebinds,
                d.bindings_total
            );
            for b in &d.bindings {
                let _ = writeln!(
                    s,
                    "  {:<40} -> {:<24} {} open, idle {} ms",
                    b.client, b.server, b.open, b.idle_ms
                );
            }
        }
    }
    s
}
