//! stdbench: the forwarding benchmark's parts — `gen` sends TCP frames of many flows out of an interface as fast as asked (AF_PACKET TX ring), `sink` counts what arrives (and the latency of stamped frames), `redirect` is the trivial XDP forwarder, `kernel-ab` alternates it with the in-kernel steering under one load; used by `testbed/bench-forward`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stdbench",
    version,
    about = "Traffic generator and sink for the forwarding benchmark (testbed/bench-forward)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send TCP frames of many flows out of an interface as fast as possible
    /// (AF_PACKET TX ring), for the forwarding benchmark (testbed/bench-forward).
    Gen(GenArgs),
    /// Receive frames on an interface for a while (AF_PACKET RX ring): count
    /// them, and with `--stamped` the latency from the generator's stamp to
    /// the kernel's receive timestamp.
    Sink(SinkArgs),
    /// Redirect every frame of one interface out of another with a
    /// 4-instruction XDP program (`bpf_redirect`) until SIGTERM or SIGINT:
    /// the physical limit the in-kernel steering is measured against.
    Redirect(RedirectArgs),
    /// Alternate XDP programs on one interface under a running load, a
    /// short slice each, by swapping the program of one XDP link: the
    /// trivial redirect, the redirect that also sets the destination MAC,
    /// and the in-kernel steering for a table (one TM port). Prints each
    /// one's median Mpps and the medians of the per-round ratios.
    KernelAb(KernelAbArgs),
}

#[derive(clap::Args)]
struct KernelAbArgs {
    /// The outside interface (native XDP; its frames are forwarded).
    #[arg(long)]
    from: String,
    /// The TM port's interface (frames leave by it; its tx_packets count them).
    #[arg(long)]
    to: String,
    /// The allocation table (its TMs all on `--to`).
    #[arg(long)]
    table: std::path::PathBuf,
    /// The group MAC (frames to it are steered).
    #[arg(long, value_parser = parse_mac)]
    group_mac: [u8; 6],
    /// The cluster address the frames are sent to.
    #[arg(long, default_value = "198.51.100.10")]
    cluster: std::net::IpAddr,
    /// Rounds (each runs every program once, in a rotating order).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// How long each program is measured, ms (after `settle_ms`).
    #[arg(long, default_value_t = 400)]
    slice_ms: u64,
    /// How long after a swap before counting, ms (frames in flight drain).
    #[arg(long, default_value_t = 50)]
    settle_ms: u64,
    /// How long the redirect runs before the first round, ms (to start the load).
    #[arg(long, default_value_t = 1500)]
    warmup_ms: u64,
}

#[derive(clap::Args)]
struct RedirectArgs {
    /// Interface whose frames are redirected (native XDP).
    #[arg(long)]
    from: String,
    /// Interface they leave by.
    #[arg(long)]
    to: String,
}

/// A MAC address argument (`aa:bb:cc:dd:ee:ff`).
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    s.parse::<allocation::MacAddr>()
        .map(|m| m.0)
        .map_err(|e| e.to_string())
}

/// Holds the redirect program until a signal ends the process.
fn redirect(a: &RedirectArgs) -> Result<bool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _held = distributor::afxdp::RedirectAll::attach(&a.from, &a.to)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    eprintln!("stdbench: redirecting {} → {} (XDP, native)", a.from, a.to);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(true)
}

/// Frames sent out of `iface` so far (for a veth: those its peer took).
fn tx_packets(iface: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{iface}/statistics/tx_packets");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// The median of `v` (0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn kernel_ab(a: &KernelAbArgs) -> Result<bool> {
    use distributor::sys::bpf::{Link, XDP_FLAGS_DRV_MODE};
    use distributor::xdp_steer::XdpSteer;
    use distributor::{Plan, PortKind};
    let table = allocation::file::load(&a.table)?;
    let tm_mac = match table.tms().first() {
        Some(t) => t.mac.0,
        None => bail!("{}: the table has no TM", a.table.display()),
    };
    let routes: Vec<(u32, u16)> = table.tms().iter().map(|t| (t.id, 1)).collect();
    let kinds = vec![PortKind::Outside, PortKind::Tm];
    let plan = Plan::new(
        table,
        allocation::MacAddr(a.group_mac),
        &[a.cluster],
        kinds.clone(),
        &routes,
    )?;
    let steer = XdpSteer::new(&kinds, &[Some(&a.from), Some(&a.to)], 1)?;
    steer.set_learning(0, false)?;
    if !steer.sync(&plan)? {
        bail!(
            "the table cannot be steered in the kernel (or {} takes no XDP redirects)",
            a.to
        );
    }
    let steering = steer.test_program()?;
    use distributor::afxdp::{redirect_program, Touch};
    let redirect = redirect_program(&a.to, Touch::Nothing)?;
    let set_mac = redirect_program(&a.to, Touch::SetMac(tm_mac))?;
    let check_mac = redirect_program(&a.to, Touch::CheckMac(a.group_mac))?;
    // The limit first: the ratios are to it.
    let progs = [&redirect, &set_mac, &check_mac, steering.program()];
    let names = [
        "redirect",
        "redirect+set MAC",
        "redirect+check MAC",
        "steering",
    ];
    let n = progs.len();
    let link = Link::xdp(
        &redirect,
        distributor::afpacket::ifindex(&a.from)?,
        XDP_FLAGS_DRV_MODE,
    )
    .map_err(|e| anyhow::anyhow!("attaching to {} (native XDP): {e}", a.from))?;
    eprintln!("stdbench: {} rounds on {} → {}", a.rounds, a.from, a.to);
    std::thread::sleep(std::time::Duration::from_millis(a.warmup_ms));
    let settle = std::time::Duration::from_millis(a.settle_ms);
    let slice = std::time::Duration::from_millis(a.slice_ms.max(1));
    let mut mpps = vec![Vec::new(); n];
    let mut ratios = vec![Vec::new(); n];
    for round in 0..a.rounds {
        let mut r = vec![0.0; n];
        for k in 0..n {
            let which = (round as usize + k) % n;
            link.update(progs[which])?;
            std::thread::sleep(settle);
            let (c0, t0) = (tx_packets(&a.to)?, std::time::Instant::now());
            std::thread::sleep(slice);
            let (c1, t1) = (tx_packets(&a.to)?, std::time::Instant::now());
            r[which] = c1.saturating_sub(c0) as f64 / (t1 - t0).as_secs_f64() / 1e6;
        }
        let line: Vec<String> = names
            .iter()
            .zip(&r)
            .map(|(name, v)| format!("{name} {v:.3}"))
            .collect();
        eprintln!("round {round} (Mpps): {}", line.join(", "));
        for k in 0..n {
            mpps[k].push(r[k]);
            if r[0] > 0.0 {
                ratios[k].push(r[k] / r[0]);
            }
        }
    }
    // The programs' own time per frame, by the kernel's run-time
    // statistics (each run then also pays two clock reads: the same for
    // every program, so their differences are what the programs cost).
    let mut ns = vec![0.0; n];
    {
        let _stats = distributor::sys::bpf::RunStats::enable()?;
        for (k, prog) in progs.iter().enumerate() {
            link.update(prog)?;
            std::thread::sleep(settle);
            let (t0, n0) = prog.run_stats()?;
            std::thread::sleep(slice * 2);
            let (t1, n1) = prog.run_stats()?;
            ns[k] = t1.saturating_sub(t0) as f64 / (n1.saturating_sub(n0).max(1)) as f64;
        }
    }
    let line: Vec<String> = names
        .iter()
        .zip(&ns)
        .map(|(name, v)| format!("{name} {v:.1}"))
        .collect();
    eprintln!(
        "ns per frame in the program (with the statistics' two clock reads): {}",
        line.join(", ")
    );
    drop(link);
    if steer.counters()?.steered == 0 {
        bail!("the steering program steered nothing");
    }
    // One line: each program's median Mpps, then its median ratio to the
    // redirect, then its ns per frame beyond the redirect's.
    let mut out: Vec<String> = mpps
        .into_iter()
        .map(|m| format!("{:.3}", median(m)))
        .collect();
    out.extend(ratios.into_iter().map(|q| format!("{:.3}", median(q))));
    out.extend(ns.iter().map(|v| format!("{:.1}", v - ns[0])));
    println!("{}", out.join(" "));
    Ok(true)
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
    let run = match &cli.command {
        Command::Gen(a) => gen(a),
        Command::Sink(a) => sink(a),
        Command::Redirect(a) => redirect(a),
        Command::KernelAb(a) => kernel_ab(a),
    };
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stdbench: {e:#}");
            ExitCode::from(2)
        }
    }
}
