//! stdctl against a running cluster: the cluster file, the admin endpoints of every distributor and TM, status, and the transition protocol (prepare, switch, open, drain, commit; roll back on failure).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use allocation::{file, AllocationTable, Change, Profile, TmIndex};
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// A node's admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Name for humans (a distributor's; a TM's defaults to `tm<id>`).
    #[serde(default)]
    pub name: String,
    /// Base URL of the admin endpoint, `http://host:port`.
    pub admin: String,
    /// Bearer token, if the endpoint wants one.
    #[serde(default)]
    pub token: Option<String>,
}

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
    /// Every distributor (front, back, combined).
    #[serde(rename = "distributor")]
    pub distributors: Vec<Node>,
    /// Every TM.
    #[serde(rename = "tm")]
    pub tms: Vec<TmNode>,
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

impl Cluster {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading cluster file {}", path.display()))?;
        let mut c: Cluster = toml::from_str(&text)
            .map_err(|e| anyhow!("cluster file {}: {}", path.display(), e.message()))?;
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
            if !n.admin.starts_with("http://") {
                bail!(
                    "cluster file {}: node '{}': admin must be an http:// URL, got '{}'",
                    path.display(),
                    n.name,
                    n.admin
                );
            }
        }
        Ok(c)
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(self.timeout_ms.max(1)))
            .build()
    }
}

/// One admin request: (status, body), or why there was no answer.
fn call(
    agent: &ureq::Agent,
    node: &Node,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let url = format!("{}{}", node.admin.trim_end_matches('/'), path);
    let mut req = agent.request(method, &url);
    if let Some(t) = &node.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match res {
        Ok(r) => {
            let code = r.status();
            Ok((code, r.into_string().unwrap_or_default()))
        }
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
        Err(e) => Err(e.to_string()),
    }
}

/// A 200 answer's body, or an error naming the node.
fn ok(
    agent: &ureq::Agent,
    node: &Node,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String> {
    match call(agent, node, method, path, body) {
        Ok((200, b)) => Ok(b),
        Ok((code, b)) => Err(anyhow!(
            "{}: {method} {path}: {code} {}",
            node.name,
            b.trim()
        )),
        Err(e) => Err(anyhow!("{}: {method} {path}: {e}", node.name)),
    }
}

/// The table the cluster runs: the first distributor's (a failover table
/// while a TM is failed). Warns when distributors disagree.
pub fn running_table(c: &Cluster) -> Result<AllocationTable> {
    let agent = c.agent();
    let mut first: Option<(String, AllocationTable)> = None;
    for d in &c.distributors {
        let text = match ok(&agent, d, "GET", "/table", None) {
            Ok(t) => t,
            Err(e) if first.is_some() => {
                eprintln!("stdctl: warning: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let t = file::parse(&text).map_err(|e| anyhow!("{}: GET /table: {e}", d.name))?;
        match &first {
            None => first = Some((d.name.clone(), t)),
            Some((name, f)) => {
                if file::render(f) != file::render(&t) {
                    eprintln!(
                        "stdctl: warning: {} runs another table than {} (version {} vs {}): a failover one side has not detected yet?",
                        d.name,
                        name,
                        t.version(),
                        f.version()
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

/// The next table for a target profile: TMs in `excluded` get no bucket,
/// every other member its share; version + 1.
pub fn plan_change(t: &AllocationTable, profile: &Profile, excluded: &[TmIndex]) -> Result<Change> {
    let targets = t.targets_excluding(0, profile, excluded)?;
    Ok(t.rebalance_to_targets(0, &targets, Some(profile.clone()))?)
}

fn progress(json: bool, line: String) {
    if json {
        eprintln!("{line}");
    } else {
        crate::report::say(&line);
    }
}

/// Runs the transition protocol (DESIGN §4) to `next` on every node;
/// rolls every node back if one fails before the commit. Returns a JSON
/// summary of what happened.
pub fn push(c: &Cluster, next: &AllocationTable, json: bool) -> Result<Value> {
    let agent = c.agent();
    let started = Instant::now();
    let running = running_table(c)?;
    if next.version() <= running.version() {
        bail!(
            "table version {} is not newer than the running version {}",
            next.version(),
            running.version()
        );
    }
    if next.key() != running.key() {
        progress(
            json,
            "warning: the new table has another hash key: every bucket moves".into(),
        );
    }
    let body = file::render(next);
    let has_buckets = |t: &AllocationTable, id: u32| {
        t.tm_index_by_id(id)
            .is_some_and(|i| t.counts(0)[usize::from(i)] > 0)
    };
    // 1. Prepare every TM. A TM with no bucket in either table (failed or
    // drained, and staying out) may be unreachable: skipped.
    let mut prepared: Vec<&TmNode> = Vec::new();
    let mut skipped = Vec::new();
    let rollback = |prepared: &[&TmNode], switched: &[&Node]| {
        for d in switched {
            if let Err(e) = ok(&agent, d, "POST", "/transition/abort", None) {
                eprintln!("stdctl: rollback: {e}");
            }
        }
        for t in prepared {
            if let Err(e) = ok(&agent, &t.node, "POST", "/transition/abort", None) {
                eprintln!("stdctl: rollback: {e}");
            }
        }
    };
    // Members first; then TMs joining (no bucket now, some in the next
    // table: added, or readmitted) with the ports the members still hold in
    // moving buckets, which they must not take.
    let joining = |t: &TmNode| !has_buckets(&running, t.id) && has_buckets(next, t.id);
    // A TM drained to zero keeps its current ports during the window
    // (docs/tmd.md); a joining TM must not meet them: one at a time.
    let draining = c
        .tms
        .iter()
        .any(|t| has_buckets(&running, t.id) && !has_buckets(next, t.id));
    if draining && c.tms.iter().any(joining) {
        bail!("this table drains a TM to zero and admits a joining TM at once: push one change, then the other");
    }
    let mut held: Vec<Value> = Vec::new();
    let members: Vec<&TmNode> = c.tms.iter().filter(|t| !joining(t)).collect();
    let joiners: Vec<&TmNode> = c.tms.iter().filter(|t| joining(t)).collect();
    let mut asked = false;
    for t in members.into_iter().chain(joiners) {
        let joins = joining(t);
        if joins && !asked {
            asked = true;
            for m in &prepared {
                match ok(&agent, &m.node, "GET", "/transition/ports", None)
                    .ok()
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                {
                    Some(Value::Array(list)) => held.extend(list),
                    _ => {
                        rollback(&prepared, &[]);
                        bail!(
                            "{}: GET /transition/ports gave no list; every prepared TM was rolled back",
                            m.node.name
                        );
                    }
                }
            }
        }
        let joining_body;
        let request = if joins {
            joining_body = json!({ "table": body, "held": held }).to_string();
            &joining_body
        } else {
            &body
        };
        match ok(
            &agent,
            &t.node,
            "POST",
            "/transition/prepare",
            Some(request),
        ) {
            Ok(b) => {
                let moving = serde_json::from_str::<Value>(&b)
                    .ok()
                    .and_then(|v| v["connections_in_moved_buckets"].as_u64())
                    .unwrap_or(0);
                let detail = if joins {
                    format!("joining; {} ports held by the others", held.len())
                } else {
                    format!("{moving} connections in moved buckets")
                };
                progress(json, format!("prepare  {:<12} ok ({detail})", t.node.name));
                prepared.push(t);
            }
            Err(e) if !has_buckets(&running, t.id) && !has_buckets(next, t.id) => {
                progress(
                    json,
                    format!(
                        "prepare  {:<12} skipped: out of service in both tables ({e})",
                        t.node.name
                    ),
                );
                skipped.push(t.node.name.clone());
            }
            Err(e) => {
                rollback(&prepared, &[]);
                bail!("{e}; every prepared TM was rolled back");
            }
        }
    }
    // 2. Switch every distributor, then 3. open them.
    let mut switched: Vec<&Node> = Vec::new();
    for d in &c.distributors {
        if let Err(e) = ok(&agent, d, "POST", "/transition/switch", Some(&body)) {
            rollback(&prepared, &switched);
            bail!("{e}; every switched distributor and prepared TM was rolled back");
        }
        progress(json, format!("switch   {:<12} ok", d.name));
        switched.push(d);
    }
    for d in &c.distributors {
        if let Err(e) = ok(&agent, d, "POST", "/transition/open", None) {
            rollback(&prepared, &switched);
            bail!("{e}; every node was rolled back");
        }
        progress(json, format!("open     {:<12} ok", d.name));
    }
    let switched_at = Instant::now();
    // 4. Drain: until no TM reports connections in moved buckets, or the window ends.
    let window = Duration::from_secs(c.drain_window_s);
    let mut last = u64::MAX;
    let moving = loop {
        let mut total = 0u64;
        for t in &prepared {
            match ok(&agent, &t.node, "GET", "/transition", None) {
                Ok(b) => {
                    total += serde_json::from_str::<Value>(&b)
                        .ok()
                        .and_then(|v| v["connections_in_moved_buckets"].as_u64())
                        .unwrap_or(0);
                }
                Err(e) => progress(
                    json,
                    format!("drain    {:<12} no answer ({e})", t.node.name),
                ),
            }
        }
        if total != last {
            progress(
                json,
                format!("drain    {total} connections left in moved buckets"),
            );
            last = total;
        }
        if total == 0 || switched_at.elapsed() >= window {
            break total;
        }
        std::thread::sleep(Duration::from_millis(c.poll_ms.max(10)));
    };
    if moving > 0 {
        progress(
            json,
            format!("drain    window of {} s over with {moving} connections still in moved buckets: committing", c.drain_window_s),
        );
    }
    let drained_s = switched_at.elapsed().as_secs_f64();
    // 5. Commit: distributors first, then TMs. No rollback past this point.
    let mut failed = Vec::new();
    for d in &c.distributors {
        match ok(&agent, d, "POST", "/transition/commit", None) {
            Ok(_) => progress(json, format!("commit   {:<12} ok", d.name)),
            Err(e) => failed.push(e.to_string()),
        }
    }
    for t in &prepared {
        match ok(&agent, &t.node, "POST", "/transition/commit", None) {
            Ok(_) => progress(json, format!("commit   {:<12} ok", t.node.name)),
            Err(e) => failed.push(e.to_string()),
        }
    }
    if !failed.is_empty() {
        bail!("commit failed on: {}", failed.join("; "));
    }
    let moved = (0..allocation::TABLE_SIZE)
        .filter(|&b| {
            let id = |t: &AllocationTable| t.tms()[usize::from(t.groups()[0].buckets.get(b))].id;
            id(&running) != id(next)
        })
        .count();
    Ok(json!({
        "from_version": running.version(),
        "to_version": next.version(),
        "moved_buckets": moved,
        "skipped": skipped,
        "drain_s": drained_s,
        "moving_at_commit": moving,
        "total_s": started.elapsed().as_secs_f64(),
    }))
}

/// Every node's state: health, table version, transition, load.
pub fn status(c: &Cluster) -> Value {
    let agent = c.agent();
    let table = running_table(c).ok();
    let mut nodes = Vec::new();
    let mut packets: BTreeMap<u32, u64> = BTreeMap::new();
    let mut active: BTreeMap<u32, u64> = BTreeMap::new();
    for d in &c.distributors {
        let health = call(&agent, d, "GET", "/healthz", None);
        let transition = ok(&agent, d, "GET", "/transition", None)
            .ok()
            .and_then(|b| serde_json::from_str::<Value>(&b).ok());
        if let Ok(m) = ok(&agent, d, "GET", "/metrics", None) {
            for (labels, v) in samples(&m, "std_tm_packets_total") {
                if let Some(id) = label(&labels, "tm_id").and_then(|s| s.parse().ok()) {
                    *packets.entry(id).or_default() += v as u64;
                }
            }
        }
        nodes.push(json!({
            "name": d.name,
            "kind": "distributor",
            "health": health_text(&health),
            "version": transition.as_ref().and_then(|t| t["version"].as_u64()),
            "transition": transition.as_ref().and_then(|t| t["state"].as_str()).unwrap_or("?"),
        }));
    }
    for t in &c.tms {
        let health = call(&agent, &t.node, "GET", "/healthz", None);
        let transition = ok(&agent, &t.node, "GET", "/transition", None)
            .ok()
            .and_then(|b| serde_json::from_str::<Value>(&b).ok());
        let mut open = None;
        if let Ok(m) = ok(&agent, &t.node, "GET", "/metrics", None) {
            let n: f64 = samples(&m, "tmd_connections_active")
                .iter()
                .map(|(_, v)| v)
                .sum();
            active.insert(t.id, n as u64);
            open = Some(n as u64);
        }
        nodes.push(json!({
            "name": t.node.name,
            "kind": "tm",
            "tm_id": t.id,
            "health": health_text(&health),
            "version": transition.as_ref().and_then(|v| v["current"].as_u64()),
            "transition": transition.as_ref().and_then(|v| v["phase"].as_str()).unwrap_or("?"),
            "moving": transition.as_ref().and_then(|v| v["connections_in_moved_buckets"].as_u64()),
            "open_connections": open,
        }));
    }
    let total_packets: u64 = packets.values().sum();
    let total_active: u64 = active.values().sum();
    let shares: Vec<Value> = table
        .as_ref()
        .map(|t| {
            let counts = t.counts(0);
            t.tms()
                .iter()
                .zip(&counts)
                .map(|(tm, &n)| {
                    let p = packets.get(&tm.id).copied().unwrap_or(0);
                    let a = active.get(&tm.id).copied().unwrap_or(0);
                    json!({
                        "tm_id": tm.id,
                        "name": tm.name,
                        "buckets": n,
                        "target": f64::from(n) / allocation::TABLE_SIZE as f64,
                        "packet_share": if total_packets > 0 { p as f64 / total_packets as f64 } else { 0.0 },
                        "open_connections": a,
                        "connection_share": if total_active > 0 { a as f64 / total_active as f64 } else { 0.0 },
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "table_version": table.as_ref().map(|t| t.version()),
        "nodes": nodes,
        "tms": shares,
    })
}

fn health_text(h: &Result<(u16, String), String>) -> String {
    match h {
        Ok((200, _)) => "ok".into(),
        Ok((code, b)) => format!("{code} {}", b.trim()),
        Err(e) => format!("down ({e})"),
    }
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

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The status as a table for people.
pub fn status_text(v: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "cluster table version {}\n\n{:<14} {:<12} {:<8} {:<10} {:<10} {}\n",
        v["table_version"]
            .as_u64()
            .map_or("?".into(), |x| x.to_string()),
        "node",
        "kind",
        "version",
        "transition",
        "health",
        "detail"
    ));
    for n in v["nodes"].as_array().into_iter().flatten() {
        let detail = match (n["open_connections"].as_u64(), n["moving"].as_u64()) {
            (Some(o), Some(m)) => format!("{o} open, {m} in moved buckets"),
            (Some(o), None) => format!("{o} open"),
            _ => String::new(),
        };
        s.push_str(&format!(
            "{:<14} {:<12} {:<8} {:<10} {:<10} {}\n",
            n["name"].as_str().unwrap_or("?"),
            n["kind"].as_str().unwrap_or("?"),
            n["version"]
                .as_u64()
                .map_or("?".into(), |x| format!("v{x}")),
            n["transition"].as_str().unwrap_or("?"),
            n["health"].as_str().unwrap_or("?"),
            detail
        ));
    }
    s.push_str(&format!(
        "\n{:<10} {:>8} {:>8} {:>14} {:>12} {:>11}\n",
        "tm", "buckets", "target", "packet share", "open conns", "conn share"
    ));
    for t in v["tms"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:<10} {:>8} {:>7.2}% {:>13.2}% {:>12} {:>10.2}%\n",
            t["name"].as_str().unwrap_or("?"),
            t["buckets"].as_u64().unwrap_or(0),
            t["target"].as_f64().unwrap_or(0.0) * 100.0,
            t["packet_share"].as_f64().unwrap_or(0.0) * 100.0,
            t["open_connections"].as_u64().unwrap_or(0),
            t["connection_share"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
    s.push_str("(packet share: since each distributor started; open connections: now)\n");
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
