//! `testbed simulate`: runs a scenario of the whole cluster in one process and prints its report (text, JSON, SVG).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use allocation::{PortRange, Profile};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use testbed::{Event, Family, PortPattern, Scenario, Sim, Timed};

#[derive(Parser)]
#[command(
    name = "testbed",
    version,
    about = "The STD cluster simulated in one process over the real steering and port-allocation code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario: clients, front and back distributors, TMs and servers exchanging real frames in virtual time.
    Simulate(Box<Args>),
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileName {
    Uniform,
    Gaussian,
    Rayleigh,
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    V4,
    V6,
    Mixed,
}

#[derive(Clone, Copy, ValueEnum)]
enum PortsArg {
    Random,
    Sequential,
    Strided,
    Fixed,
}

#[derive(clap::Args)]
struct Args {
    /// Traffic managers (1–64).
    #[arg(long, default_value_t = 8)]
    tms: u32,
    /// Flows to start (TCP connections and UDP sessions).
    #[arg(long, default_value_t = 100_000)]
    flows: u64,
    /// The table's profile at the start.
    #[arg(long, value_enum, default_value = "uniform")]
    profile: ProfileName,
    /// Gaussian mean / Rayleigh has none (TM index; default: the middle).
    #[arg(long)]
    mean: Option<f64>,
    /// Gaussian or Rayleigh sigma (TM index units).
    #[arg(long)]
    sigma: Option<f64>,
    /// Rebalance to this profile (with the transition protocol) at --rebalance-at.
    #[arg(long, value_enum)]
    rebalance_to: Option<ProfileName>,
    /// When to rebalance: a share of the flows, e.g. 50%.
    #[arg(long, default_value = "50%")]
    rebalance_at: String,
    /// Fail this TM id at --fail-at (distributors switch to its failover table after --detect-ms).
    #[arg(long)]
    fail_tm: Option<u32>,
    /// When the TM fails.
    #[arg(long, default_value = "70%")]
    fail_at: String,
    /// Readmit the failed TM at this point (with the transition protocol).
    #[arg(long)]
    return_at: Option<String>,
    /// Add a TM at this point (with the transition protocol).
    #[arg(long)]
    add_tm_at: Option<String>,
    /// Drain this TM id (its share to zero, with the transition protocol) at --drain-at.
    #[arg(long)]
    drain_tm: Option<u32>,
    /// When the TM is drained.
    #[arg(long, default_value = "40%")]
    drain_at: String,
    /// Swap in a new table version with the same owners at this point.
    #[arg(long)]
    swap_at: Option<String>,
    /// Roll back (`stdctl rollback`: the table the last commit replaced, as
    /// a new version) at this point.
    #[arg(long)]
    rollback_at: Option<String>,
    /// Kill the first push's coordinator once it has made this many calls
    /// to nodes; a second run resumes the push.
    #[arg(long)]
    coordinator_dies_after: Option<u32>,
    /// Parallel distributors per side, fed by an ECMP-like spray.
    #[arg(long, default_value_t = 1)]
    distributors: u32,
    /// Client address family.
    #[arg(long, value_enum, default_value = "v4")]
    family: FamilyArg,
    /// Client source ports.
    #[arg(long, value_enum, default_value = "random")]
    ports: PortsArg,
    /// Stride for --ports strided.
    #[arg(long, default_value_t = 4)]
    stride: u16,
    /// Share of flows that are UDP sessions.
    #[arg(long, default_value = "10%")]
    udp: String,
    /// Share of UDP sessions sending fragmented datagrams.
    #[arg(long, default_value = "20%")]
    fragments: String,
    /// Share of TCP flows meeting a packet-too-big from inside the path.
    #[arg(long, default_value = "2%")]
    icmp: String,
    /// Share of flows to port 8443 (above some client ports) instead of 80/53.
    #[arg(long, default_value = "0%")]
    high_port: String,
    /// A second TM group whose rule is this port range (either port, any
    /// protocol: `8443`, `8000-8999`); its TMs are --partition-tms.
    #[arg(long, requires = "partition_tms")]
    partition_ports: Option<allocation::PortRange>,
    /// The second group's TMs, by id (`1,3`).
    #[arg(long, value_delimiter = ',', requires = "partition_ports")]
    partition_tms: Vec<u32>,
    /// Make the second group a source-affinity one (`hash = "address"`)
    /// keeping these prefix lengths, IPv4 then IPv6 (`24,64`): its rule
    /// becomes TCP-only and its TMs DNAT-only.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "partition_ports",
        value_name = "V4,V6"
    )]
    partition_affinity: Vec<u8>,
    /// Self-source port range of the TMs, e.g. 40000-40060 to exhaust it.
    #[arg(long, default_value = "1024-65535")]
    snat_range: String,
    /// Longest wait for old owners to drain before commit, ms (virtual).
    #[arg(long, default_value_t = 5000)]
    drain_ms: u64,
    /// Failure detection time, ms (virtual).
    #[arg(long, default_value_t = 900)]
    detect_ms: u64,
    /// Mean time between flow arrivals, µs (virtual).
    #[arg(long, default_value_t = 20)]
    arrival_us: u64,
    /// Flows each distributor worker remembers during a transition.
    #[arg(long, default_value_t = 65_536)]
    transit_memory: usize,
    /// Flows each distributor can pin past a commit (0: none).
    #[arg(long, default_value_t = 131_072)]
    pins: usize,
    /// Seed of every random choice (same seed, same report).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of target vs measured share per TM and phase.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn fraction(s: &str, what: &str) -> Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .with_context(|| format!("--{what} {s:?}: expected a share such as 50% or 0.5"))?;
    if !(0.0..=1.0).contains(&v) {
        bail!("--{what} {s:?}: must be between 0% and 100%");
    }
    Ok(v)
}

fn profile(p: ProfileName, mean: Option<f64>, sigma: Option<f64>) -> Profile {
    match p {
        ProfileName::Uniform => Profile::Uniform,
        ProfileName::Gaussian => Profile::Gaussian { mean, sigma },
        ProfileName::Rayleigh => Profile::Rayleigh { sigma },
    }
}

/// `id` names one of `tms` TMs, or an error naming the flag.
fn tm_in_range(id: u32, tms: u32, flag: &str) -> Result<()> {
    if id >= tms {
        bail!("--{flag} {id}: TM ids are 0 to {}", tms.saturating_sub(1));
    }
    Ok(())
}

fn scenario(a: &Args) -> Result<Scenario> {
    let (lo, hi) = a
        .snat_range
        .split_once('-')
        .and_then(|(l, h)| Some((l.trim().parse::<u16>().ok()?, h.trim().parse::<u16>().ok()?)))
        .filter(|(l, h)| l <= h)
        .with_context(|| {
            format!(
                "--snat-range {:?}: expected LOW-HIGH, e.g. 1024-65535",
                a.snat_range
            )
        })?;
    let mut events = Vec::new();
    if let Some(p) = a.rebalance_to {
        events.push(Timed {
            at: fraction(&a.rebalance_at, "rebalance-at")?,
            what: Event::Rebalance(profile(p, a.mean, a.sigma)),
        });
    }
    if let Some(id) = a.fail_tm {
        tm_in_range(id, a.tms, "fail-tm")?;
        events.push(Timed {
            at: fraction(&a.fail_at, "fail-at")?,
            what: Event::FailTm(id),
        });
        if let Some(r) = &a.return_at {
            events.push(Timed {
                at: fraction(r, "return-at")?,
                what: Event::ReturnTm(id),
            });
        }
    } else if a.return_at.is_some() {
        bail!("--return-at needs --fail-tm");
    }
    if let Some(at) = &a.add_tm_at {
        events.push(Timed {
            at: fraction(at, "add-tm-at")?,
            what: Event::AddTm,
        });
    }
    if let Some(id) = a.drain_tm {
        tm_in_range(id, a.tms, "drain-tm")?;
        events.push(Timed {
            at: fraction(&a.drain_at, "drain-at")?,
            what: Event::DrainTm(id),
        });
    }
    if let Some(at) = &a.swap_at {
        events.push(Timed {
            at: fraction(at, "swap-at")?,
            what: Event::Swap,
        });
    }
    if let Some(at) = &a.rollback_at {
        events.push(Timed {
            at: fraction(at, "rollback-at")?,
            what: Event::Rollback,
        });
    }
    if let Some(n) = a.coordinator_dies_after {
        events.push(Timed {
            at: 0.0,
            what: Event::CoordinatorDies(n),
        });
    }
    Ok(Scenario {
        seed: a.seed,
        tms: a.tms,
        flows: a.flows,
        profile: profile(a.profile, a.mean, a.sigma),
        distributors: a.distributors,
        family: match a.family {
            FamilyArg::V4 => Family::V4,
            FamilyArg::V6 => Family::V6,
            FamilyArg::Mixed => Family::Mixed,
        },
        ports: match a.ports {
            PortsArg::Random => PortPattern::Random,
            PortsArg::Sequential => PortPattern::Sequential,
            PortsArg::Strided => PortPattern::Strided(a.stride.max(1)),
            PortsArg::Fixed => PortPattern::Fixed,
        },
        udp_share: fraction(&a.udp, "udp")?,
        fragment_share: fraction(&a.fragments, "fragments")?,
        icmp_share: fraction(&a.icmp, "icmp")?,
        high_port_share: fraction(&a.high_port, "high-port")?,
        partition: match a.partition_ports {
            None => None,
            Some(ports) => {
                for &id in &a.partition_tms {
                    tm_in_range(id, a.tms, "partition-tms")?;
                }
                if a.partition_tms.len() >= a.tms as usize {
                    bail!("--partition-tms: the default group must keep a TM");
                }
                let source_affinity = match a.partition_affinity[..] {
                    [] => None,
                    [v4, v6] if v4 <= 32 && v6 <= 128 => Some([v4, v6]),
                    _ => bail!("--partition-affinity: IPv4 prefix 0-32, then IPv6 prefix 0-128"),
                };
                Some(testbed::scenario::Partition {
                    rules: vec![allocation::Rule {
                        protocol: source_affinity
                            .map(|_| allocation::rules::Protocol(allocation::rules::proto::TCP)),
                        ports: Some(ports),
                        prefix: None,
                    }],
                    tms: a.partition_tms.clone(),
                    source_affinity,
                })
            }
        },
        snat_range: PortRange { lo, hi },
        events,
        drain_window_ns: a.drain_ms.saturating_mul(1_000_000),
        arrival_ns: a.arrival_us.max(1).saturating_mul(1_000),
        transit_memory: a.transit_memory.max(1),
        pins: a.pins,
        detect_ns: a.detect_ms.saturating_mul(1_000_000),
    })
}

fn simulate(a: &Args) -> Result<bool> {
    let sc = scenario(a)?;
    let mut sim = Sim::new(sc)?;
    if std::io::stderr().is_terminal() {
        let start = Instant::now();
        sim.on_progress(move |done, total| {
            if start.elapsed().as_secs_f64() > 1.0 && total > 0 {
                let pct = done * 100 / total;
                let bar = "#".repeat((pct / 4) as usize);
                eprint!("\r[{bar:<25}] {pct:>3}% {done}/{total} flows");
            }
        });
    }
    let report = sim.run()?;
    if std::io::stderr().is_terminal() && report.wall_s > 1.0 {
        eprintln!("\r{:<60}", "");
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, report.svg())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.violations().is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Simulate(a) => simulate(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("testbed: {e:#}");
            ExitCode::from(2)
        }
    }
}
