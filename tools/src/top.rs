//! stdctl's live views of a running cluster: `top` (each TM's share of its group against its target, frames/s, connections; each distributor's table, transition, drops and failovers; refreshed) and `plot` (an SVG of every TM's share against its target over time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use admin_http::client::{Client, Endpoint};
use anyhow::{bail, Context, Result};
use control::api::DistributorTransition;
use serde::Serialize;
use serde_json::json;

use crate::cli::{PlotArgs, TopArgs};
use crate::cluster::{label, phase_text, samples, Cluster};
use crate::report::Out;

/// Buckets of a group (every group's table has them all).
const BUCKETS: f64 = allocation::TABLE_SIZE as f64;

/// One distributor's counters at one moment.
#[derive(Debug, Clone, Default)]
struct DistSample {
    /// `None` when it answered; else why not.
    error: Option<String>,
    version: Option<u64>,
    transition: String,
    /// Frames steered per TM id.
    tm_packets: BTreeMap<u32, u64>,
    /// Buckets per TM id, with the TM's name and group (the running table).
    tm_buckets: BTreeMap<u32, (String, String, u64)>,
    /// TM health as this distributor probes it (probed TMs only).
    tm_up: BTreeMap<u32, bool>,
    drops: BTreeMap<String, u64>,
    backend_drops: u64,
    failovers: u64,
    failed_tms: u64,
    capture_armed: bool,
}

/// One TM's counters at one moment.
#[derive(Debug, Clone, Default)]
struct TmSample {
    error: Option<String>,
    connections: u64,
    refused: u64,
}

/// The cluster's counters at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    dists: Vec<(String, DistSample)>,
    tms: BTreeMap<u32, TmSample>,
}

fn sum(m: &str, name: &str) -> u64 {
    samples(m, name).iter().map(|(_, v)| *v as u64).sum()
}

fn by_label(m: &str, name: &str, key: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in samples(m, name) {
        if let Some(k) = label(&labels, key) {
            *out.entry(k.to_string()).or_default() += v as u64;
        }
    }
    out
}

fn distributor(client: &Client, d: &Endpoint) -> DistSample {
    let m = match client.ok_text(d, "GET", "/metrics", None) {
        Ok(m) => m,
        Err(e) => {
            return DistSample {
                error: Some(e.to_string()),
                transition: "?".into(),
                ..Default::default()
            }
        }
    };
    let mut s = DistSample {
        version: samples(&m, "std_table_version")
            .first()
            .map(|(_, v)| *v as u64),
        drops: by_label(&m, "std_drops_total", "reason"),
        backend_drops: sum(&m, "std_backend_drops_total"),
        failovers: sum(&m, "std_failovers_total"),
        failed_tms: sum(&m, "std_failed_tms"),
        capture_armed: sum(&m, "std_capture_armed") > 0,
        ..Default::default()
    };
    for (labels, v) in samples(&m, "std_tm_packets_total") {
        if let Some(id) = label(&labels, "tm_id").and_then(|s| s.parse().ok()) {
            *s.tm_packets.entry(id).or_default() += v as u64;
        }
    }
    for (labels, v) in samples(&m, "std_tm_buckets") {
        if let Some(id) = label(&labels, "tm_id").and_then(|s| s.parse().ok()) {
            let name = label(&labels, "tm").unwrap_or("?").to_string();
            let group = label(&labels, "group").unwrap_or("?").to_string();
            s.tm_buckets.insert(id, (name, group, v as u64));
        }
    }
    for (labels, v) in samples(&m, "std_tm_up") {
        if let Some(id) = label(&labels, "tm_id").and_then(|s| s.parse().ok()) {
            s.tm_up.insert(id, v > 0.0);
        }
    }
    s.transition = match client.ok_json::<DistributorTransition>(d, "GET", "/transition", None) {
        Ok(t) => match t.recovering {
            Some(_) => format!("{}, recovering", phase_text(t.state)),
            None => phase_text(t.state),
        },
        Err(e) => format!("? ({e})"),
    };
    s
}

fn tm(client: &Client, e: &Endpoint) -> TmSample {
    match client.ok_text(e, "GET", "/metrics", None) {
        Ok(m) => TmSample {
            error: None,
            connections: sum(&m, "tmd_connections_active"),
            refused: sum(&m, "tmd_refused_total"),
        },
        Err(e) => TmSample {
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

fn sample(c: &Cluster, client: &Client) -> Sample {
    Sample {
        at: Instant::now(),
        dists: c
            .distributors
            .iter()
            .map(|d| (d.name.clone(), distributor(client, d)))
            .collect(),
        tms: c.tms.iter().map(|t| (t.id, tm(client, &t.node))).collect(),
    }
}

/// A distributor's line of a view.
#[derive(Debug, Clone, Serialize)]
pub struct DistRow {
    pub name: String,
    pub state: String,
    pub table_version: Option<u64>,
    pub transition: String,
    pub frames_per_s: f64,
    pub drops_per_s: f64,
    /// The reasons frames were dropped for in the interval, most first.
    pub drop_reasons: Vec<(String, f64)>,
    pub backend_drops_per_s: f64,
    pub failovers: u64,
    pub failed_tms: u64,
    pub capture_armed: bool,
}

/// A TM's line of a view.
#[derive(Debug, Clone, Serialize)]
pub struct TmRow {
    pub id: u32,
    pub name: String,
    pub group: String,
    pub buckets: u64,
    /// Its buckets' share of its group, %.
    pub target: f64,
    /// Its share of its group's frames in the interval, % (`None`: the
    /// group carried none).
    pub share: Option<f64>,
    pub frames_per_s: f64,
    pub connections: Option<u64>,
    pub refused_per_s: Option<f64>,
    /// `up`, `down` (a distributor's probe or its admin endpoint), or
    /// `out` (no bucket: drained or failed over).
    pub state: String,
}

/// What the cluster did between two samples.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub seconds: f64,
    pub distributors: Vec<DistRow>,
    pub tms: Vec<TmRow>,
    /// Distributors whose tables give a TM other buckets than the first's.
    pub disagreements: Vec<String>,
}

fn delta(a: u64, b: u64) -> u64 {
    b.saturating_sub(a)
}

fn view(prev: &Sample, cur: &Sample) -> View {
    let secs = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let mut tm_frames: BTreeMap<u32, u64> = BTreeMap::new();
    let mut distributors = Vec::new();
    for ((name, a), (_, b)) in prev.dists.iter().zip(&cur.dists) {
        let mut frames = 0;
        for (id, n) in &b.tm_packets {
            let d = delta(a.tm_packets.get(id).copied().unwrap_or(0), *n);
            *tm_frames.entry(*id).or_default() += d;
            frames += d;
        }
        let mut reasons: Vec<(String, f64)> = b
            .drops
            .iter()
            .map(|(r, n)| {
                let d = delta(a.drops.get(r).copied().unwrap_or(0), *n);
                (r.clone(), d as f64 / secs)
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        reasons.sort_by(|x, y| y.1.total_cmp(&x.1));
        distributors.push(DistRow {
            name: name.clone(),
            state: b
                .error
                .as_ref()
                .map_or("ok".to_string(), |e| format!("down ({e})")),
            table_version: b.version,
            transition: b.transition.clone(),
            frames_per_s: frames as f64 / secs,
            drops_per_s: reasons.iter().fold(0.0, |a, (_, d)| a + d),
            drop_reasons: reasons,
            backend_drops_per_s: delta(a.backend_drops, b.backend_drops) as f64 / secs,
            failovers: b.failovers,
            failed_tms: b.failed_tms,
            capture_armed: b.capture_armed,
        });
    }
    // The TMs of the running table, as the first distributor that answers
    // has it; another distributor giving a TM other buckets is named.
    let answering: Vec<&(String, DistSample)> = cur
        .dists
        .iter()
        .filter(|(_, d)| d.error.is_none())
        .collect();
    let buckets = answering
        .first()
        .map(|(_, d)| d.tm_buckets.clone())
        .unwrap_or_default();
    let mut disagreements = Vec::new();
    for (name, d) in answering.iter().skip(1) {
        let counts = |m: &BTreeMap<u32, (String, String, u64)>| -> BTreeMap<u32, u64> {
            m.iter().map(|(k, v)| (*k, v.2)).collect()
        };
        if counts(&d.tm_buckets) != counts(&buckets) {
            disagreements.push(format!(
                "{name} gives the TMs other buckets than {} (another table, or a failover the other has not made)",
                answering[0].0
            ));
        }
    }
    let mut group_frames: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, (_, group, _)) in &buckets {
        *group_frames.entry(group.as_str()).or_default() += tm_frames.get(id).copied().unwrap_or(0);
    }
    let mut tms = Vec::new();
    for (id, (name, group, n)) in &buckets {
        let frames = tm_frames.get(id).copied().unwrap_or(0);
        let total = group_frames.get(group.as_str()).copied().unwrap_or(0);
        let now = cur.tms.get(id);
        let before = prev.tms.get(id);
        let probed_down = answering
            .iter()
            .any(|(_, d)| d.tm_up.get(id) == Some(&false));
        let endpoint_down = now.is_some_and(|t| t.error.is_some());
        let state = if probed_down || endpoint_down {
            "down"
        } else if *n == 0 {
            "out"
        } else {
            "up"
        };
        let answered = now.filter(|t| t.error.is_none());
        tms.push(TmRow {
            id: *id,
            name: name.clone(),
            group: group.clone(),
            buckets: *n,
            target: 100.0 * *n as f64 / BUCKETS,
            share: (total > 0).then(|| 100.0 * frames as f64 / total as f64),
            frames_per_s: frames as f64 / secs,
            connections: answered.map(|t| t.connections),
            refused_per_s: answered
                .zip(before.filter(|t| t.error.is_none()))
                .map(|(n, b)| delta(b.refused, n.refused) as f64 / secs),
            state: state.to_string(),
        });
    }
    tms.sort_by(|a, b| (a.group.as_str(), a.id).cmp(&(b.group.as_str(), b.id)));
    View {
        seconds: secs,
        distributors,
        tms,
        disagreements,
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A view for people.
pub fn view_text(v: &View, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{title} — over the last {:.1} s", v.seconds);
    let _ = writeln!(
        s,
        "\n{:<14} {:<8} {:>7} {:<18} {:>10} {:>9} {:>9} {:>9} {:>6}  top drop reasons",
        "distributor",
        "state",
        "table",
        "transition",
        "frames/s",
        "drops/s",
        "ring/s",
        "failovers",
        "failed"
    );
    for d in &v.distributors {
        let state = if d.state == "ok" { "ok" } else { "DOWN" };
        let reasons: Vec<String> = d
            .drop_reasons
            .iter()
            .take(3)
            .map(|(r, n)| format!("{r} {}/s", rate(*n)))
            .collect();
        let _ = writeln!(
            s,
            "{:<14} {:<8} {:>7} {:<18} {:>10} {:>9} {:>9} {:>9} {:>6}  {}{}",
            d.name,
            state,
            d.table_version.map_or("?".into(), |v| v.to_string()),
            d.transition,
            rate(d.frames_per_s),
            rate(d.drops_per_s),
            rate(d.backend_drops_per_s),
            d.failovers,
            d.failed_tms,
            reasons.join(", "),
            if d.capture_armed { " [capturing]" } else { "" }
        );
        if d.state != "ok" {
            let _ = writeln!(s, "  {}", d.state);
        }
    }
    let mut group = None;
    for t in &v.tms {
        if group != Some(&t.group) {
            group = Some(&t.group);
            let _ = writeln!(
                s,
                "\ngroup {:<8} {:>4} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10}  state",
                t.group, "id", "buckets", "target", "share", "frames/s", "connections", "refused/s"
            );
        }
        let share = t.share.map_or("—".to_string(), |x| format!("{x:.1} %"));
        let off = match t.share {
            Some(x) if (x - t.target).abs() >= 5.0 => " (off target)",
            _ => "",
        };
        let _ = writeln!(
            s,
            "{:<14} {:>4} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10}  {}{off}",
            t.name,
            t.id,
            t.buckets,
            format!("{:.1} %", t.target),
            share,
            rate(t.frames_per_s),
            t.connections.map_or("?".into(), |c| c.to_string()),
            t.refused_per_s.map_or("?".into(), rate),
            t.state
        );
    }
    if v.tms.is_empty() {
        let _ = writeln!(s, "\nno distributor answered: no TM to show");
    }
    for d in &v.disagreements {
        let _ = writeln!(s, "\nwarning: {d}");
    }
    s
}

fn interval(secs: f64, flag: &str) -> Result<Duration> {
    if !(secs.is_finite() && (0.1..=3600.0).contains(&secs)) {
        bail!("{flag} {secs}: not in [0.1, 3600] seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `stdctl top`.
pub fn top(a: &TopArgs, out: &Out) -> Result<()> {
    let c = Cluster::load(&a.cluster.cluster)?;
    let every = interval(a.interval, "--interval")?;
    let client = c.client();
    let tty = std::io::stdout().is_terminal() && !out.json;
    let title = format!("stdctl top — {}", a.cluster.cluster.display());
    let mut prev = sample(&c, &client);
    let mut shown = 0u64;
    loop {
        std::thread::sleep(every.saturating_sub(prev.at.elapsed()));
        let cur = sample(&c, &client);
        let v = view(&prev, &cur);
        if out.json {
            println!("{}", serde_json::to_string(&v).unwrap_or_default());
        } else {
            if tty {
                print!("\x1b[H\x1b[2J");
            } else if shown > 0 {
                println!();
            }
            print!("{}", view_text(&v, &title));
        }
        shown += 1;
        if a.count > 0 && shown >= a.count {
            return Ok(());
        }
        prev = cur;
    }
}

/// One point of a plot: a TM's share and target at a time.
#[derive(Debug, Clone, Copy, Serialize)]
struct Point {
    t: f64,
    share: Option<f64>,
    target: f64,
}

const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The SVG: one panel per group, every TM's measured share (solid) and
/// target (dashed) against time.
fn svg(
    series: &BTreeMap<(String, u32), (String, Vec<Point>)>,
    seconds: f64,
    title: &str,
) -> String {
    let groups: Vec<&String> = {
        let mut g: Vec<&String> = series.keys().map(|(g, _)| g).collect();
        g.dedup();
        g
    };
    let (w, ph, left, right, top, gap) = (900.0, 260.0, 60.0, 170.0, 62.0, 56.0);
    let height = top + groups.len() as f64 * (ph + gap) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    let pw = w - left - right;
    let span = seconds.max(1e-3);
    for (gi, g) in groups.iter().enumerate() {
        let y0 = top + gi as f64 * (ph + gap);
        let in_group: Vec<(&u32, &(String, Vec<Point>))> = series
            .iter()
            .filter(|((gg, _), _)| gg == *g)
            .map(|((_, id), v)| (id, v))
            .collect();
        let max = in_group
            .iter()
            .flat_map(|(_, (_, p))| p.iter().map(|p| p.share.unwrap_or(0.0).max(p.target)))
            .fold(0.0f64, f64::max);
        let ymax = ((max * 1.15) / 5.0).ceil().max(1.0) * 5.0;
        let x = |t: f64| left + pw * (t / span).clamp(0.0, 1.0);
        let y = |v: f64| y0 + ph - ph * (v / ymax).clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" font-weight="bold">group {}: share of the group's frames, % (solid: measured; dashed: target, its buckets / 4096)</text>"#,
            y0 - 8.0,
            escape(g)
        );
        let step = if ymax > 50.0 { 10.0 } else { 5.0 };
        let mut v = 0.0;
        while v <= ymax + 1e-9 {
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
                left + pw,
                left - 6.0,
                y(v) + 4.0,
                yy = y(v)
            );
            v += step;
        }
        let ticks = 6;
        let prec = if span < 12.0 { 1 } else { 0 };
        for i in 0..=ticks {
            let t = span * f64::from(i) / f64::from(ticks);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.prec$} s</text>"#,
                x(t),
                y0 + ph + 16.0
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
        );
        for (k, (id, (name, points))) in in_group.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let target: Vec<String> = points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.t), y(p.target)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="target" data-tm="{id}" points="{}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4"/>"#,
                target.join(" ")
            );
            let share: Vec<String> = points
                .iter()
                .filter_map(|p| p.share.map(|v| format!("{:.1},{:.1}", x(p.t), y(v))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="share" data-tm="{id}" points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                share.join(" ")
            );
            let ly = y0 + 14.0 + 18.0 * k as f64;
            let last = points.iter().rev().find_map(|p| p.share);
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{} ({})</text>"#,
                left + pw + 12.0,
                left + pw + 32.0,
                left + pw + 38.0,
                ly + 4.0,
                escape(name),
                last.map_or("—".into(), |v| format!("{v:.1} %"))
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// `stdctl plot`.
pub fn plot(a: &PlotArgs, out: &Out) -> Result<()> {
    let c = Cluster::load(&a.cluster.cluster)?;
    let every = interval(a.interval, "--interval")?;
    if !(a.seconds.is_finite() && a.seconds >= a.interval && a.seconds <= 86_400.0) {
        bail!(
            "--seconds {}: not in [--interval, 86400] ({} s)",
            a.seconds,
            a.interval
        );
    }
    let client = c.client();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds);
    let mut prev = sample(&c, &client);
    let mut series: BTreeMap<(String, u32), (String, Vec<Point>)> = BTreeMap::new();
    let (mut taken, mut blind) = (0u64, 0u64);
    while Instant::now() < end {
        std::thread::sleep(every.saturating_sub(prev.at.elapsed()));
        let cur = sample(&c, &client);
        let v = view(&prev, &cur);
        let t = cur.at.duration_since(start).as_secs_f64();
        if v.tms.is_empty() {
            blind += 1;
        } else {
            taken += 1;
        }
        for row in &v.tms {
            series
                .entry((row.group.clone(), row.id))
                .or_insert_with(|| (row.name.clone(), Vec::new()))
                .1
                .push(Point {
                    t,
                    share: row.share,
                    target: row.target,
                });
        }
        prev = cur;
    }
    if taken == 0 {
        bail!(
            "no distributor answered in {} s: nothing to plot",
            a.seconds
        );
    }
    // TMs out of service the whole time (no bucket, no frame) stay out.
    series.retain(|_, (_, points)| {
        points
            .iter()
            .any(|p| p.target > 0.0 || p.share.is_some_and(|v| v > 0.0))
    });
    let title = format!(
        "TM shares against targets, {} ({} samples every {} s)",
        a.cluster.cluster.display(),
        taken,
        a.interval
    );
    let doc = svg(&series, start.elapsed().as_secs_f64(), &title);
    std::fs::write(&a.output, doc).with_context(|| format!("writing {}", a.output.display()))?;
    // The largest gap between a TM's mean share and its target.
    let mut worst: Option<(String, f64)> = None;
    let mut tms = Vec::new();
    for ((group, id), (name, points)) in &series {
        let shares: Vec<f64> = points.iter().filter_map(|p| p.share).collect();
        let mean = (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64);
        let target = points.last().map_or(0.0, |p| p.target);
        if let Some(m) = mean {
            let gap = (m - target).abs();
            if worst.as_ref().is_none_or(|(_, g)| gap > *g) {
                worst = Some((name.clone(), gap));
            }
        }
        tms.push(json!({"group": group, "id": id, "name": name, "mean_share": mean, "target": target, "points": points}));
    }
    out.emit(
        json!({"file": a.output.display().to_string(), "samples": taken, "unanswered": blind, "tms": tms}),
        || {
            let mut s = format!(
                "wrote {}: {} TMs, {taken} samples over {:.0} s",
                a.output.display(),
                series.len(),
                a.seconds
            );
            if blind > 0 {
                let _ = write!(s, " ({blind} intervals no distributor answered)");
            }
            if let Some((name, gap)) = worst {
                let _ = write!(s, "; largest mean gap from target: {gap:.1} points ({name})");
            }
            s
        },
    );
    Ok(())
}
