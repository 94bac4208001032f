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
    /// Send TCP frames of many flows out of an interface as fast as possible
    /// (AF_PACKET TX ring), for the forwarding benchmark (testbed/bench-forward).
    Gen(GenArgs),
    /// Receive frames on an interface for a while (AF_PACKET RX ring): count
    /// them, and with `--stamped` the latency from the generator's stamp to
    /// the kernel's receive timestamp.
    Sink(SinkArgs),
}

#[derive(clap::Args)]
struct SinkArgs {
    /// Interface to receive on.
    #[arg(long)]
    iface: String,
    /// How long to receive, seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Frames carry the generator's send time in their last 8 bytes.
    #[arg(long)]
    stamped: bool,
}

#[derive(clap::Args)]
struct GenArgs {
    /// Interface to send on.
    #[arg(long)]
    iface: String,
    /// Destination MAC of every frame.
    #[arg(long)]
    dst_mac: String,
    /// Frame size in bytes (60 to 1514).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Distinct flows (source ports and addresses).
    #[arg(long, default_value_t = 4096)]
    flows: usize,
    /// How long to send, seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Frames per second to aim at (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stamp each frame with its send time (for latency measurement by `sink`).
    #[arg(long)]
    stamp: bool,
    /// Send through the (no-queue) qdisc layer, so that the flow hash picks
    /// the transmit queue and a multi-queue link carries the flows on all
    /// its queues, as RSS would spread them (slower: by default frames go
    /// straight to the driver, on the queue of the sending CPU).
    #[arg(long)]
    queue_by_flow: bool,
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
        snat_range: PortRange { lo, hi },
        events,
        drain_window_ns: a.drain_ms.saturating_mul(1_000_000),
        arrival_ns: a.arrival_us.max(1).saturating_mul(1_000),
        transit_memory: a.transit_memory.max(1),
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

/// Frames of `flows` TCP flows toward a VIP, padded to `size` bytes.
fn gen_frames(a: &GenArgs) -> Result<Vec<Vec<u8>>> {
    use distributor::build::{self, tcp_flags, L2};
    let dst: allocation::MacAddr = a
        .dst_mac
        .parse()
        .map_err(|e| anyhow::anyhow!("--dst-mac {}: {e}", a.dst_mac))?;
    if !(60..=1514).contains(&a.size) {
        bail!("--size {}: must be 60 to 1514", a.size);
    }
    let l2 = L2::new(dst, allocation::MacAddr([0x02, 0x9e, 0, 0, 0, 1]));
    let vip: std::net::IpAddr = "198.51.100.10".parse()?;
    Ok((0..a.flows.max(1))
        .map(|i| {
            let src =
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(100, 64, (i >> 8) as u8, i as u8));
            let base = build::tcp_frame(
                &l2,
                src,
                1024 + (i % 60000) as u16,
                vip,
                80,
                tcp_flags::ACK,
                b"",
            );
            let pad = a.size.saturating_sub(base.len());
            let mut f = build::tcp_frame(
                &l2,
                src,
                1024 + (i % 60000) as u16,
                vip,
                80,
                tcp_flags::ACK,
                &vec![0u8; pad],
            );
            f.truncate(a.size.max(60));
            f
        })
        .collect())
}

fn gen(a: &GenArgs) -> Result<bool> {
    use distributor::io::Backend;
    let frames = gen_frames(a)?;
    let mut tx = distributor::afpacket::AfPacketBackend::open(
        &[a.iface.as_str()],
        distributor::afpacket::RingConfig {
            rx_blocks: 1,
            tx_blocks: 16,
            tx: distributor::afpacket::TxMode::Ring,
            qdisc_bypass: !a.queue_by_flow,
        },
        1,
        None,
    )?;
    let start = std::time::Instant::now();
    let end = start + std::time::Duration::from_secs_f64(a.seconds);
    let (mut sent, mut full) = (0u64, 0u64);
    let mut i = 0usize;
    let mut stamped = if a.stamp { frames.clone() } else { Vec::new() };
    'run: loop {
        let burst = if a.rate > 0 { 32 } else { 256 };
        for _ in 0..burst {
            let f = if a.stamp {
                let s = &mut stamped[i % frames.len()];
                let ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let at = s.len() - 8;
                s[at..].copy_from_slice(&ns.to_be_bytes());
                &stamped[i % frames.len()]
            } else {
                &frames[i % frames.len()]
            };
            match tx.send(0, f) {
                Ok(()) => {
                    sent += 1;
                    i += 1;
                }
                Err(_) => {
                    full += 1;
                    break;
                }
            }
        }
        let _ = tx.flush();
        let now = std::time::Instant::now();
        if now >= end {
            break 'run;
        }
        // Paced: wait until the schedule catches up with what was sent.
        while a.rate > 0 && std::time::Instant::now() < end {
            let due = start.elapsed().as_secs_f64() * a.rate as f64;
            if (sent as f64) < due {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{sent} {secs:.3} {full}");
    Ok(true)
}

fn sink(a: &SinkArgs) -> Result<bool> {
    use distributor::io::{Backend, Batch};
    let mut rx = distributor::afpacket::AfPacketBackend::open(
        &[a.iface.as_str()],
        distributor::afpacket::RingConfig {
            rx_blocks: 16,
            tx_blocks: 1,
            tx: distributor::afpacket::TxMode::Sendmmsg,
            qdisc_bypass: true,
        },
        10,
        None,
    )?;
    let mut batch = Batch::new(256);
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(a.seconds);
    let mut frames = 0u64;
    let mut lat = Vec::new();
    while std::time::Instant::now() < end {
        let n = rx.recv(&mut batch)?;
        frames += n as u64;
        if a.stamped {
            for i in 0..n {
                let (_, ts, buf, len) = batch.get_mut(i);
                if len >= 8 {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[len - 8..len]);
                    let sent = u64::from_be_bytes(b);
                    if sent > 0 && ts >= sent && lat.len() < 5_000_000 {
                        lat.push(ts - sent);
                    }
                }
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{frames} {:.1} {:.1} {}",
        pct(0.5) as f64 / 1e3,
        pct(0.99) as f64 / 1e3,
        lat.len()
    );
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Simulate(a) => simulate(a),
        Command::Gen(a) => gen(a),
        Command::Sink(a) => sink(a),
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
