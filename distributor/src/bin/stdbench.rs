//! stdbench: the forwarding benchmark's traffic — `gen` sends TCP frames of many flows out of an interface as fast as asked (AF_PACKET TX ring), `sink` counts what arrives (and the latency of stamped frames); used by `testbed/bench-forward`.

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
