//! stdctl output: human-readable tables and histograms, or JSON for scripts (`--json`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use allocation::rebalance::minimum_moves;
use allocation::rules::proto;
use allocation::{file, AllocationTable, Change, Flow, SelfPorts, SteerBy, TmIndex, TABLE_SIZE};
use serde_json::{json, Value};

/// Where and how results are printed.
pub struct Out {
    pub json: bool,
}

const BAR: usize = 40;

/// Writes a line to standard output. A closed pipe (`stdctl … | head`) is
/// not an error worth dying for — least of all in the middle of a push.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

fn pct(n: u32) -> f64 {
    f64::from(n) * 100.0 / TABLE_SIZE as f64
}

fn bar(n: u32, max: u32) -> String {
    let w = if max == 0 {
        0
    } else {
        (n as usize * BAR).div_ceil(max as usize)
    };
    "#".repeat(w)
}

impl Out {
    /// Prints `value` as JSON, or the text `human` builds.
    pub fn emit(&self, value: Value, human: impl FnOnce() -> String) {
        if self.json {
            say(&serde_json::to_string_pretty(&value).unwrap_or_default());
        } else {
            say(&human());
        }
    }

    /// Per-TM rows of group `g`: entries now, the profile's target, and (if
    /// given) the entries before a change.
    fn tm_rows(
        &self,
        t: &AllocationTable,
        g: usize,
        before: Option<&[u32]>,
    ) -> (Vec<Value>, String) {
        let counts = t.counts(g);
        let targets = t
            .targets(g, &t.groups()[g].profile)
            .unwrap_or_else(|_| counts.clone());
        let max = counts
            .iter()
            .copied()
            .chain(before.unwrap_or(&[]).iter().copied())
            .max()
            .unwrap_or(0);
        let mut rows = Vec::new();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  {:>4} {:>6}  {:<12} {:<17} {:>6} {}{:>7} {:>7} {:>7} {:>6}  histogram",
            "tm",
            "id",
            "name",
            "mac",
            "weight",
            if before.is_some() { " before " } else { "" },
            "entries",
            "share",
            "target",
            "diff"
        );
        for m in t.members(g) {
            let i = usize::from(m);
            let tm = &t.tms()[i];
            let (c, target) = (counts[i], targets[i]);
            let b = before.map(|b| b.get(i).copied().unwrap_or(0));
            rows.push(json!({
                "index": i, "id": tm.id, "name": tm.name, "mac": tm.mac.to_string(), "weight": tm.weight,
                "before": b, "entries": c, "share": pct(c) / 100.0, "target": target,
            }));
            let _ = writeln!(
                s,
                "  {:>4} {:>6}  {:<12} {:<17} {:>6} {}{:>7} {:>6.2}% {:>7} {:>+6}  {}",
                i,
                tm.id,
                tm.name,
                tm.mac.to_string(),
                tm.weight,
                b.map(|b| format!("{b:>7} ")).unwrap_or_default(),
                c,
                pct(c),
                target,
                i64::from(c) - i64::from(target),
                bar(c, max)
            );
        }
        (rows, s)
    }

    pub fn show(&self, t: &AllocationTable, name: &str) {
        let mut groups = Vec::new();
        let mut s = format!(
            "table {name}: version {}, {} TMs, {} group(s), {}\n",
            t.version(),
            t.tms().len(),
            t.groups().len(),
            file::checksum(t)
        );
        for (g, grp) in t.groups().iter().enumerate() {
            let (run_tm, run) = grp.buckets.longest_run();
            let ep = t
                .tm(grp.equal_ports_tm)
                .map(|x| x.name.clone())
                .unwrap_or_default();
            let rules: Vec<String> = grp.rules.iter().map(ToString::to_string).collect();
            let (rows, text) = self.tm_rows(t, g, None);
            let _ = writeln!(
                s,
                "\ngroup '{}'{}: profile {}, hash {}, equal-ports TM {ep}, longest run {run} ({})",
                grp.name,
                if rules.is_empty() {
                    " (default)".to_string()
                } else {
                    format!(" [{}]", rules.join("; "))
                },
                grp.profile,
                match grp.hash {
                    allocation::HashMode::Endpoint => "endpoint".to_string(),
                    allocation::HashMode::Address {
                        v4_prefix,
                        v6_prefix,
                    } => format!("address /{v4_prefix} /{v6_prefix}"),
                },
                t.tm(run_tm).map(|x| x.name.as_str()).unwrap_or("?"),
            );
            s.push_str(&text);
            groups.push(json!({
                "name": grp.name, "rules": rules, "profile": grp.profile.describe(), "equal_ports_tm": ep,
                "longest_run": run, "tms": rows,
            }));
        }
        self.emit(
            json!({"file": name, "version": t.version(), "checksum": file::checksum(t), "groups": groups}),
            || s.trim_end().to_string(),
        );
    }

    pub fn diff(&self, a: &AllocationTable, b: &AllocationTable) {
        let mut s = format!("version {} -> {}\n", a.version(), b.version());
        let same_key = a.key() == b.key();
        if !same_key {
            s.push_str(
                "WARNING: the hash keys differ: every flow may move, whatever the entries say\n",
            );
        }
        let ids_b: HashMap<u32, TmIndex> = b
            .tms()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id, i as TmIndex))
            .collect();
        let mut groups = Vec::new();
        for (ga, grp) in a.groups().iter().enumerate() {
            let Some(gb) = b.group_index(&grp.name) else {
                let _ = writeln!(s, "group '{}': only in the old table", grp.name);
                continue;
            };
            let id_of = |t: &AllocationTable, i: TmIndex| t.tm(i).map_or(u32::MAX, |x| x.id);
            let bb = &b.groups()[gb].buckets;
            let moved = (0..TABLE_SIZE)
                .filter(|&k| id_of(a, grp.buckets.get(k)) != id_of(b, bb.get(k)))
                .count();
            // Per TM id: entries before and after.
            let mut ids: Vec<u32> = Vec::new();
            for &m in &a.members(ga) {
                ids.push(a.tms()[usize::from(m)].id);
            }
            for &m in &b.members(gb) {
                let id = b.tms()[usize::from(m)].id;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let (ca, cb) = (a.counts(ga), b.counts(gb));
            let before: Vec<u32> = ids
                .iter()
                .map(|id| a.tm_index_by_id(*id).map_or(0, |i| ca[usize::from(i)]))
                .collect();
            let after: Vec<u32> = ids
                .iter()
                .map(|id| ids_b.get(id).map_or(0, |&i| cb[usize::from(i)]))
                .collect();
            let optimum = minimum_moves(&before, &after);
            let _ = writeln!(
                s,
                "group '{}': {moved} buckets moved ({:.2}% of the table); the minimum for these counts is {optimum}",
                grp.name,
                moved as f64 * 100.0 / TABLE_SIZE as f64
            );
            let _ = writeln!(
                s,
                "  {:>6}  {:<12} {:>7} {:>7} {:>6}",
                "id", "name", "before", "after", "delta"
            );
            let mut rows = Vec::new();
            for (k, id) in ids.iter().enumerate() {
                let name = a
                    .tm_index_by_id(*id)
                    .and_then(|i| a.tm(i))
                    .or_else(|| b.tm_index_by_id(*id).and_then(|i| b.tm(i)))
                    .map(|x| x.name.clone())
                    .unwrap_or_default();
                let delta = i64::from(after[k]) - i64::from(before[k]);
                let _ = writeln!(
                    s,
                    "  {:>6}  {:<12} {:>7} {:>7} {:>+6}",
                    id, name, before[k], after[k], delta
                );
                rows.push(json!({"id": id, "name": name, "before": before[k], "after": after[k], "delta": delta}));
            }
            groups.push(json!({"name": grp.name, "moved": moved, "optimum": optimum, "tms": rows}));
        }
        self.emit(
            json!({"old_version": a.version(), "new_version": b.version(), "same_key": same_key, "groups": groups}),
            || s.trim_end().to_string(),
        );
    }

    pub fn lookup(&self, t: &AllocationTable, flow: &Flow) {
        let st = t.steer(flow);
        let tm = &t.tms()[usize::from(st.tm)];
        let group = &t.groups()[st.group].name;
        let show = |addr: std::net::IpAddr, port: Option<u16>| match (addr, port) {
            (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
            (a, Some(p)) => format!("{a}:{p}"),
            (a, None) => a.to_string(),
        };
        let (sp, dp) = flow.ports.map_or((None, None), |(s, d)| (Some(s), Some(d)));
        let endpoint = flow.greater_port_endpoint();
        let (branch, hashed) = match (st.by, endpoint) {
            (SteerBy::Endpoint { .. }, Some((addr, port))) => {
                let side = if Some(port) == sp && flow.src == addr {
                    "source"
                } else {
                    "destination"
                };
                (
                    format!("greater-port endpoint {} ({side})", show(addr, Some(port))),
                    json!(show(addr, Some(port))),
                )
            }
            (SteerBy::Address { .. }, Some((addr, _))) => {
                let masked = match t.groups()[st.group].hash {
                    allocation::HashMode::Address {
                        v4_prefix,
                        v6_prefix,
                    } => allocation::hash::mask_addr(addr, v4_prefix, v6_prefix),
                    allocation::HashMode::Endpoint => addr,
                };
                (
                    format!("source-affinity address {masked}"),
                    json!(masked.to_string()),
                )
            }
            (SteerBy::NoPorts { .. }, _) => (
                format!(
                    "no ports: ({}, {}, {})",
                    flow.src,
                    flow.dst,
                    proto::name(flow.protocol)
                ),
                Value::Null,
            ),
            _ => (
                "equal ports: the group's predetermined TM".to_string(),
                Value::Null,
            ),
        };
        let bucket = st.by.bucket();
        self.emit(
            json!({
                "protocol": proto::name(flow.protocol), "src": show(flow.src, sp), "dst": show(flow.dst, dp),
                "group": group, "hashed": hashed, "bucket": bucket,
                "tm": {"index": st.tm, "id": tm.id, "name": tm.name, "mac": tm.mac.to_string()},
            }),
            || {
                format!(
                    "flow     {} {} -> {}\ngroup    {group}\nsteered  {branch}\nbucket   {}\ntm       {} (index {}, id {}, mac {})",
                    proto::name(flow.protocol),
                    show(flow.src, sp),
                    show(flow.dst, dp),
                    bucket.map_or("-".to_string(), |b| b.to_string()),
                    tm.name,
                    st.tm,
                    tm.id,
                    tm.mac
                )
            },
        );
    }

    pub fn selfports(&self, t: &AllocationTable, set: &SelfPorts, above: u16, count_only: bool) {
        let tm = &t.tms()[usize::from(set.tm())];
        let ports: Vec<u16> = set.iter().filter(|&p| p > above).collect();
        if count_only {
            self.emit(json!({"addr": set.addr().to_string(), "tm": tm.name, "above": above, "count": ports.len()}), || {
                ports.len().to_string()
            });
            return;
        }
        self.emit(
            json!({"addr": set.addr().to_string(), "tm": tm.name, "above": above, "count": ports.len(), "ports": ports}),
            || {
                let mut s = format!("{} self-source ports of {} on {} above {above}:\n", ports.len(), tm.name, set.addr());
                for chunk in ports.chunks(12) {
                    let line: Vec<String> = chunk.iter().map(|p| format!("{p:>5}")).collect();
                    let _ = writeln!(s, "  {}", line.join(" "));
                }
                s.trim_end().to_string()
            },
        );
    }

    fn change_report(
        &self,
        title: String,
        old: &AllocationTable,
        c: &Change,
        g: usize,
        path: Option<&Path>,
    ) {
        let before = old.counts(g);
        let new = &c.table;
        // Rows are by the new table's indexes; map the old counts by TM id.
        let before_new: Vec<u32> = new
            .tms()
            .iter()
            .map(|tm| {
                old.tm_index_by_id(tm.id)
                    .map_or(0, |i| before[usize::from(i)])
            })
            .collect();
        let gname = &old.groups()[g].name;
        let g_new = new.group_index(gname).unwrap_or(0);
        let (rows, text) = self.tm_rows(new, g_new, Some(&before_new));
        let moved = c.moves.len();
        let written = path.map(|p| p.display().to_string());
        self.emit(
            json!({
                "group": gname, "old_version": old.version(), "new_version": new.version(),
                "moved": moved, "optimum": c.optimum, "profile": new.groups()[g_new].profile.describe(),
                "written": written, "tms": rows,
            }),
            || {
                let mut s = format!("{title}\nversion {} -> {}\n", old.version(), new.version());
                let _ = writeln!(
                    s,
                    "moved {moved} of {TABLE_SIZE} buckets ({:.2}%); the optimum is {}",
                    moved as f64 * 100.0 / TABLE_SIZE as f64,
                    c.optimum
                );
                s.push_str(&text);
                match &written {
                    Some(p) => {
                        let _ = write!(s, "wrote {p}");
                    }
                    None => s.push_str("(plan only: give -o FILE to write the new table)"),
                }
                s
            },
        );
    }

    pub fn rebalance(&self, old: &AllocationTable, c: &Change, g: usize, path: Option<&Path>) {
        let title = format!(
            "rebalance group '{}' to {}",
            old.groups()[g].name,
            c.table.groups()[g].profile
        );
        self.change_report(title, old, c, g, path);
    }

    pub fn change(&self, what: &str, old: &AllocationTable, c: &Change, g: usize, path: &Path) {
        self.change_report(
            format!("{what} in group '{}'", old.groups()[g].name),
            old,
            c,
            g,
            Some(path),
        );
    }

    pub fn failover(
        &self,
        old: &AllocationTable,
        c: &Change,
        g: usize,
        failed: &[TmIndex],
        path: Option<&Path>,
    ) {
        let names: Vec<String> = failed
            .iter()
            .filter_map(|&k| old.tm(k))
            .map(|x| x.name.clone())
            .collect();
        self.change_report(
            format!("failover table without {}", names.join(", ")),
            old,
            c,
            g,
            path,
        );
    }
}
