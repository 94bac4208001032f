//! A simulation's report: per-TM share against target per phase, moved buckets against the optimum, flows broken by cause, split flows, checks on every frame; as text, JSON or an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::scenario::{Event, Scenario};

/// One TM's flows in a phase.
#[derive(Debug, Clone, Serialize)]
pub struct TmShare {
    /// TM id.
    pub id: u32,
    /// TM name.
    pub name: String,
    /// Its group (index in the table).
    pub group: usize,
    /// Flows whose first packet reached it.
    pub flows: u64,
    /// Its share of the phase's flows in its group.
    pub share: f64,
    /// Its share of its group's buckets (the profile's target).
    pub target: f64,
}

/// Flows started while one table was running (flows that started during a
/// transition window or a failure's detection time are left out).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// What started the phase.
    pub after: String,
    /// Table version.
    pub version: u64,
    /// Flows started in the phase.
    pub flows: u64,
    /// Per TM.
    pub tms: Vec<TmShare>,
    /// Largest |share − target| over TMs.
    pub max_abs_diff: f64,
    /// Chi-square statistic of the flow counts against the targets.
    pub chi_square: f64,
    /// Its degrees of freedom.
    pub dof: usize,
    /// P(χ² ≥ statistic): small values mean the shares do not follow the table.
    pub p_value: f64,
}

/// An operator event or failure, and what it moved.
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    /// The event.
    pub what: String,
    /// Flows started before it.
    pub at_flow: u64,
    /// Buckets whose owner changed.
    pub moved_buckets: usize,
    /// The fewest buckets any table with the new counts could have moved.
    pub optimum: usize,
    /// Switch to commit (transitions) or failure to failover (failures), ms of virtual time.
    pub window_ms: f64,
    /// The drain window ran out with connections still in moved buckets.
    pub forced_commit: bool,
    /// Connections the TMs still reported in moved buckets at commit.
    pub moving_at_commit: usize,
    /// Why the transition coordinator rolled the change back (a TM that
    /// would get buckets did not answer, …); the table stayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
    /// The push's coordinator was killed (after which call) and resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_killed: Option<String>,
    /// TMs that failed while this push was under way (its drain then
    /// waits out the window: a dead TM never reports drained).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tms_failed_during: Vec<u32>,
    /// Each time the push stopped (and the operator pushed it again): why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<String>,
}

impl EventReport {
    pub(crate) fn new(what: &Event, at_flow: u64, moved: usize, optimum: usize) -> Self {
        EventReport {
            what: what.to_string(),
            at_flow,
            moved_buckets: moved,
            optimum,
            window_ms: 0.0,
            forced_commit: false,
            moving_at_commit: 0,
            rolled_back: None,
            coordinator_killed: None,
            tms_failed_during: Vec::new(),
            stopped: Vec::new(),
        }
    }
}

/// How the flows ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowTotals {
    /// Flows started.
    pub started: u64,
    /// Flows that finished normally.
    pub completed: u64,
    /// Flows the cluster refused, by cause (`port_exhausted`).
    pub refused: BTreeMap<String, u64>,
    /// Flows broken, by cause: `tm_failed` (their TM died), `dead_tm`
    /// (steered to a TM that had died before the distributors knew),
    /// `misrouted` (a packet reached a TM that does not own the flow),
    /// `fragment_lost`.
    pub broken: BTreeMap<String, u64>,
    /// Flows broken by a TM failure (`tm_failed`, `dead_tm`), per TM id.
    pub broken_by_failed_tm: BTreeMap<u32, u64>,
    /// Flows whose packets reached two TMs.
    pub split: u64,
    /// The first few split flows, described.
    pub split_examples: Vec<String>,
    /// Flows not started because the client's endpoint was still in use.
    pub endpoint_busy: u64,
}

/// Checks on every frame and every port.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Self-source ports handed out.
    pub ports_leased: u64,
    /// TCP connections of a source-affinity group's (DNAT-only) TMs that
    /// kept the client's own endpoint toward the server.
    pub addresses_kept: u64,
    /// Ports handed out while another TM's open connection held the same SNAT address and port (must be 0).
    pub port_collision: u64,
    /// Ports whose server reply would not steer back to their TM (must be 0).
    pub wrong_port: u64,
    /// Frames steered to a TM without its MAC and port (must be 0).
    pub bad_rewrite: u64,
    /// Frames from a TM that were not bridged toward their destination (must be 0).
    pub bad_bridge: u64,
    /// Frames to the cluster that were neither steered nor held (must be 0).
    pub not_steered: u64,
    /// Frames to the cluster the distributors dropped.
    pub dropped: u64,
    /// Distributor drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Flows started in moved buckets that the distributors' transition memory had no room for.
    pub transit_overflows: u64,
    /// Packet-too-big errors from inside the path delivered to the flow's TM.
    pub icmp_errors_delivered: u64,
    /// Fragmented datagrams whose fragments all reached the flow's TM.
    pub fragmented_datagrams: u64,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// Phases (one per table that ran).
    pub phases: Vec<PhaseReport>,
    /// Events.
    pub events: Vec<EventReport>,
    /// Flows.
    pub flows: FlowTotals,
    /// Checks.
    pub checks: Checks,
    /// Frames through the distributors.
    pub packets: u64,
    /// Virtual time simulated, s.
    pub virtual_s: f64,
    /// Wall time, s.
    pub wall_s: f64,
    /// Frames simulated per second of wall time.
    pub packets_per_s: f64,
}

impl Report {
    pub(crate) fn new(scenario: Scenario) -> Self {
        Report {
            scenario,
            phases: Vec::new(),
            events: Vec::new(),
            flows: FlowTotals::default(),
            checks: Checks::default(),
            packets: 0,
            virtual_s: 0.0,
            wall_s: 0.0,
            packets_per_s: 0.0,
        }
    }

    /// Broken flows of any cause.
    pub fn broken(&self) -> u64 {
        self.flows.broken.values().sum()
    }

    /// The must-be-zero checks that failed, by name (empty: all held).
    pub fn violations(&self) -> Vec<String> {
        let c = &self.checks;
        let mut v = Vec::new();
        for (name, n) in [
            ("wrong_port", c.wrong_port),
            ("port_collision", c.port_collision),
            ("bad_rewrite", c.bad_rewrite),
            ("bad_bridge", c.bad_bridge),
            ("not_steered", c.not_steered),
            (
                "misrouted",
                self.flows.broken.get("misrouted").copied().unwrap_or(0),
            ),
        ] {
            if n > 0 {
                v.push(format!("{name}: {n}"));
            }
        }
        for e in &self.events {
            if e.moved_buckets != e.optimum {
                v.push(format!(
                    "{}: moved {} buckets, optimum {}",
                    e.what, e.moved_buckets, e.optimum
                ));
            }
        }
        v
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let sc = &self.scenario;
        let _ = writeln!(
            s,
            "simulated {} flows over {} TMs ({}), {} distributor(s) per side, seed {}",
            sc.flows,
            sc.tms,
            sc.profile.describe(),
            sc.distributors,
            sc.seed
        );
        for p in &self.phases {
            if p.flows == 0 {
                let _ = writeln!(
                    s,
                    "\nphase after {} (table version {}): no flow started while it ran",
                    p.after, p.version
                );
                continue;
            }
            let _ = writeln!(
                s,
                "\nphase after {} (table version {}): {} flows; max |share - target| {:.3} pp; chi-square {:.1} (dof {}), p = {:.3}",
                p.after,
                p.version,
                p.flows,
                p.max_abs_diff * 100.0,
                p.chi_square,
                p.dof,
                p.p_value
            );
            let _ = writeln!(
                s,
                "  {:<8} {:>10} {:>8} {:>8} {:>8}",
                "tm", "flows", "share", "target", "diff"
            );
            for t in &p.tms {
                let _ = writeln!(
                    s,
                    "  {:<8} {:>10} {:>7.2}% {:>7.2}% {:>+7.2}",
                    t.name,
                    t.flows,
                    t.share * 100.0,
                    t.target * 100.0,
                    (t.share - t.target) * 100.0
                );
            }
        }
        if !self.events.is_empty() {
            let _ = writeln!(s, "\nevents:");
            for e in &self.events {
                let _ = writeln!(
                    s,
                    "  at flow {:>9}: {:<28} moved {:>5} buckets (optimum {:>5}){}",
                    e.at_flow,
                    e.what,
                    e.moved_buckets,
                    e.optimum,
                    if e.window_ms > 0.0 {
                        format!(
                            ", window {:.0} ms{}",
                            e.window_ms,
                            if e.forced_commit {
                                format!(
                                    ", FORCED commit with {} connections moving",
                                    e.moving_at_commit
                                )
                            } else {
                                String::new()
                            }
                        )
                    } else {
                        String::new()
                    }
                );
                if let Some(k) = &e.coordinator_killed {
                    let _ = writeln!(s, "{:>22}its coordinator killed after {k}, resumed", "");
                }
                for why in &e.stopped {
                    let _ = writeln!(s, "{:>22}stopped, pushed again: {why}", "");
                }
                if let Some(why) = &e.rolled_back {
                    let _ = writeln!(s, "{:>22}rolled back: {why}", "");
                }
            }
        }
        let f = &self.flows;
        let _ = writeln!(
            s,
            "\nflows: {} started, {} completed, {} refused {:?}, {} broken {:?}, split flows: {}",
            f.started,
            f.completed,
            f.refused.values().sum::<u64>(),
            f.refused,
            self.broken(),
            f.broken,
            f.split
        );
        for e in &f.split_examples {
            let _ = writeln!(s, "  split: {e}");
        }
        let c = &self.checks;
        let _ = writeln!(
            s,
            "checks: {} ports leased, {} wrong, {} colliding; {} client endpoints kept (DNAT-only); {} frames rewritten wrong; {} not bridged; {} not steered; {} dropped {:?}; {} transition-memory overflows; {} ICMP errors and {} fragmented datagrams reached their flow's TM",
            c.ports_leased,
            c.wrong_port,
            c.port_collision,
            c.addresses_kept,
            c.bad_rewrite,
            c.bad_bridge,
            c.not_steered,
            c.dropped,
            c.drops,
            c.transit_overflows,
            c.icmp_errors_delivered,
            c.fragmented_datagrams
        );
        let _ = writeln!(
            s,
            "simulated {} frames in {:.2} s ({:.2} s virtual): {:.0} frames/s",
            self.packets, self.wall_s, self.virtual_s, self.packets_per_s
        );
        let v = self.violations();
        if v.is_empty() {
            let _ = writeln!(s, "result: every check held");
        } else {
            let _ = writeln!(s, "result: FAILED: {}", v.join("; "));
        }
        s
    }

    /// An SVG bar chart: per TM, the target and the measured share of each phase.
    pub fn svg(&self) -> String {
        let phases: Vec<&PhaseReport> = self.phases.iter().filter(|p| p.flows > 0).collect();
        let tms: Vec<(u32, String)> = {
            let mut v: Vec<(u32, String)> = phases
                .iter()
                .flat_map(|p| p.tms.iter().map(|t| (t.id, t.name.clone())))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let max = phases
            .iter()
            .flat_map(|p| p.tms.iter().map(|t| t.share.max(t.target)))
            .fold(0.01, f64::max);
        let (w, h, left, bottom, top) = (900.0, 420.0, 60.0, 60.0, 40.0);
        let plot_h = h - bottom - top;
        let group_w = (w - left - 20.0) / tms.len().max(1) as f64;
        let bars = (phases.len() * 2).max(1) as f64;
        let bar_w = (group_w * 0.8) / bars;
        let colours = [
            "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
        ];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14">Share of flows per TM: target (light) and measured (dark), per table phase</text>"#
        );
        for i in 0..=4 {
            let v = max * f64::from(i) / 4.0;
            let y = top + plot_h - plot_h * f64::from(i) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{:.1}%</text>"##,
                w - 20.0,
                left - 4.0,
                y + 4.0,
                v * 100.0
            );
        }
        for (ti, (id, name)) in tms.iter().enumerate() {
            let x0 = left + group_w * ti as f64 + group_w * 0.1;
            for (pi, p) in phases.iter().enumerate() {
                let Some(t) = p.tms.iter().find(|t| t.id == *id) else {
                    continue;
                };
                let c = colours[pi % colours.len()];
                for (k, (v, opacity)) in [(t.target, 0.35), (t.share, 1.0)].into_iter().enumerate()
                {
                    let bh = plot_h * v / max;
                    let x = x0 + bar_w * (pi * 2 + k) as f64;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{c}" fill-opacity="{opacity}"><title>{name}, after {}: {} {:.2}%</title></rect>"#,
                        top + plot_h - bh,
                        bar_w * 0.95,
                        xml(&p.after),
                        if k == 0 { "target" } else { "measured" },
                        v * 100.0
                    );
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x0 + group_w * 0.4,
                top + plot_h + 16.0,
                xml(name)
            );
        }
        for (pi, p) in phases.iter().enumerate() {
            let c = colours[pi % colours.len()];
            let y = h - 24.0 + 0.0 * pi as f64;
            let x = left + 200.0 * pi as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="10" height="10" fill="{c}"/><text x="{}" y="{}">after {} (v{})</text>"#,
                y - 9.0,
                x + 14.0,
                y,
                xml(&p.after),
                p.version
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
