//! In-memory steering throughput on a realistic frame mix: ns per packet per core, beside baselines from the same run.
//!
//! `cargo bench -p distributor` — results in docs/benchmarks.md.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, GroupSpec, HashKey, MacAddr, Profile, Tm};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datapath::build::{self, tcp_flags, L2};
use datapath::wire::EthernetFrame;
use datapath::Batch;
use datapath::{Plan, PortKind, Worker, WorkerConfig};

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const ROUTER: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 1]);

fn plan() -> Plan {
    let tms = (0..8)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1,
            group: 0,
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    let table = AllocationTable::new(
        1,
        key,
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table");
    let mut ports = vec![PortKind::Outside];
    ports.extend([PortKind::Tm; 8]);
    let map: Vec<(u32, u16)> = (0..8).map(|i| (i, i as u16 + 1)).collect();
    let cluster: Vec<IpAddr> = vec![
        "198.51.100.10".parse().expect("addr"),
        "2001:db8::10".parse().expect("addr"),
    ];
    Plan::new(table, GROUP, &cluster, ports, &map).expect("plan")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` frames of one kind, many flows.
fn frames(kind: &str, n: usize) -> Vec<Vec<u8>> {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let l2 = L2::new(GROUP, ROUTER);
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let vip6: IpAddr = "2001:db8::10".parse().expect("addr");
    (0..n)
        .map(|i| {
            let x = r.next();
            let c4 = IpAddr::V4(((x >> 32) as u32).into());
            let c6 = IpAddr::V6((u128::from(x) << 64 | u128::from(r.next())).into());
            let port = 1024 + (x as u16 % 60000);
            match kind {
                "tcp64" => build::tcp_frame(&l2, c4, port, vip, 443, tcp_flags::ACK, &[0; 6]),
                "tcp1500" => build::tcp_frame(&l2, c4, port, vip, 443, tcp_flags::ACK, &[0; 1446]),
                "udp" => build::udp_frame(&l2, c4, port, vip, 53, &[0; 40]),
                "tcp6" => build::tcp_frame(&l2, c6, port, vip6, 443, tcp_flags::ACK, &[0; 100]),
                "icmp_error" => {
                    let off = build::ip(
                        vip,
                        c4,
                        proto::TCP,
                        1,
                        &build::tcp(vip, 443, c4, port, tcp_flags::ACK, 1, &[0; 64]),
                    );
                    build::too_big(
                        &l2,
                        "198.51.100.254".parse().expect("addr"),
                        vip,
                        1280,
                        &off,
                    )
                }
                _ => {
                    // fragments: frames 2k and 2k+1 are the first and second
                    // fragment of datagram k (its client derived from k)
                    let k = (i / 2) as u32;
                    let c = IpAddr::V4((0xcb00_7100 ^ k.wrapping_mul(2_654_435_761)).into());
                    let port = 1024 + (k % 60000) as u16;
                    let packet = build::ip(
                        c,
                        vip,
                        proto::UDP,
                        k as u16,
                        &build::udp(c, port, vip, 53, &[0; 1600]),
                    );
                    let parts = build::fragment_v4(&packet, 1200);
                    build::frame(&l2, &parts[i % 2])
                }
            }
        })
        .collect()
}

fn steering(c: &mut Criterion) {
    let p = plan();
    let n: usize = std::env::var("STEER_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let mut g = c.benchmark_group("steer");
    g.throughput(Throughput::Elements(n as u64));
    for kind in ["tcp64", "tcp1500", "udp", "tcp6", "icmp_error", "fragments"] {
        let mut bufs = frames(kind, n);
        let lens: Vec<usize> = bufs.iter().map(Vec::len).collect();
        // Fragments come in (first, second) pairs, so every second fragment follows its first.
        let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([3; 16]));
        let mut now = 0u64;
        g.bench_function(kind, |b| {
            b.iter(|| {
                now += 1;
                let mut acc = 0usize;
                for (buf, &len) in bufs.iter_mut().zip(&lens) {
                    buf[..6].copy_from_slice(&GROUP.0); // undo the previous round's rewrite
                    let a = w.process(black_box(buf), len, 0, &p, now);
                    acc = acc.wrapping_add(matches!(a, datapath::Action::ToTm { .. }) as usize);
                }
                acc
            })
        });
    }
    // The same frames through Worker::process_batch (batches of 64, as a backend delivers them).
    for kind in ["tcp64", "udp", "tcp6", "fragments"] {
        let frames = frames(kind, n);
        let mut batches: Vec<Batch> = frames
            .chunks(64)
            .map(|chunk| {
                let mut b = Batch::new(chunk.len());
                for f in chunk {
                    b.push(0, 0, f);
                }
                b
            })
            .collect();
        let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([3; 16]));
        let mut now = 0u64;
        g.bench_function(format!("batch_{kind}"), |b| {
            b.iter(|| {
                now += 1;
                let mut acc = 0usize;
                for batch in batches.iter_mut() {
                    for i in 0..batch.len() {
                        let (_, _, buf, _) = batch.get_mut(i);
                        buf[..6].copy_from_slice(&GROUP.0); // undo the previous round's rewrite
                    }
                    w.process_batch(black_box(batch), &p, now);
                    acc = acc.wrapping_add(
                        matches!(batch.action(0), datapath::Action::ToTm { .. }) as usize,
                    );
                }
                acc
            })
        });
    }
    // The same TCP frames while a transition (uniform → Gaussian, ~10 % of
    // buckets moved) is open: moved buckets take the per-frame path and the
    // transition memory.
    {
        let current = p.table().clone();
        let next = current
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: None,
                    sigma: None,
                },
            )
            .expect("rebalance")
            .table;
        let mut ports = vec![PortKind::Outside];
        ports.extend([PortKind::Tm; 8]);
        let map: Vec<(u32, u16)> = (0..8).map(|i| (i, i as u16 + 1)).collect();
        let tp = Plan::new(next, GROUP, &[], ports, &map)
            .expect("plan")
            .with_previous(current)
            .expect("switch")
            .opened();
        let mut batches: Vec<Batch> = frames("tcp64", n)
            .chunks(64)
            .map(|chunk| {
                let mut b = Batch::new(chunk.len());
                for f in chunk {
                    b.push(0, 0, f);
                }
                b
            })
            .collect();
        let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([3; 16]));
        let mut now = 0u64;
        g.bench_function("batch_tcp64_in_transition", |b| {
            b.iter(|| {
                now += 1;
                let mut acc = 0usize;
                for batch in batches.iter_mut() {
                    for i in 0..batch.len() {
                        let (_, _, buf, _) = batch.get_mut(i);
                        buf[..6].copy_from_slice(&GROUP.0);
                    }
                    w.process_batch(black_box(batch), &tp, now);
                    acc = acc.wrapping_add(
                        matches!(batch.action(0), datapath::Action::ToTm { .. }) as usize,
                    );
                }
                acc
            })
        });
        // Committed, with the flows of every moved bucket pinned to their
        // old owner (what the TMs report when none has ended): pinned
        // buckets take the per-frame path and one pin lookup; the rest
        // keep the fast path.
        let pins: Vec<datapath::pins::Pin> = frames("tcp64", n)
            .iter()
            .filter_map(|f| {
                let src = IpAddr::V4([f[26], f[27], f[28], f[29]].into());
                let sport = u16::from_be_bytes([f[34], f[35]]);
                let vip: IpAddr = "198.51.100.10".parse().ok()?;
                let flow = Flow::with_ports(proto::TCP, src, sport, vip, 443);
                let old = tp.previous()?;
                let owner = old.tms()[usize::from(old.steer(&flow).tm)].id;
                let now = tp.table().tms()[usize::from(tp.table().steer(&flow).tm)].id;
                (owner != now).then_some(datapath::pins::Pin {
                    key: datapath::steer::FlowKey::of(&flow),
                    tm: owner,
                    since: 0,
                    idle_ns: 0,
                })
            })
            .collect();
        let pinned_share = pins.len() as f64 / n as f64;
        let pp = tp
            .clone()
            .without_previous()
            .with_pins(pins.into(), 1 << 17);
        eprintln!(
            "batch_tcp64_pinned: {} pins ({:.0} % of the frames' flows)",
            pp.pins().map_or(0, |p| p.len()),
            pinned_share * 100.0
        );
        let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([3; 16]));
        g.bench_function("batch_tcp64_pinned", |b| {
            b.iter(|| {
                now += 1;
                let mut acc = 0usize;
                for batch in batches.iter_mut() {
                    for i in 0..batch.len() {
                        let (_, _, buf, _) = batch.get_mut(i);
                        buf[..6].copy_from_slice(&GROUP.0);
                    }
                    w.process_batch(black_box(batch), &pp, now);
                    acc = acc.wrapping_add(
                        matches!(batch.action(0), datapath::Action::ToTm { .. }) as usize,
                    );
                }
                acc
            })
        });
    }
    // Baselines: the table lookup alone on pre-parsed flows, and the L2 work alone.
    let flows: Vec<Flow> = frames("tcp64", n)
        .iter()
        .map(|f| {
            let src = IpAddr::V4([f[26], f[27], f[28], f[29]].into());
            let sport = u16::from_be_bytes([f[34], f[35]]);
            Flow::with_ports(
                proto::TCP,
                src,
                sport,
                "198.51.100.10".parse().expect("addr"),
                443,
            )
        })
        .collect();
    g.bench_function("baseline_table_steer_only", |b| {
        b.iter(|| {
            flows.iter().fold(0u32, |acc, f| {
                acc.wrapping_add(u32::from(p.table().steer(black_box(f)).tm))
            })
        })
    });
    let mut bufs = frames("tcp64", n);
    g.bench_function("baseline_l2_only", |b| {
        b.iter(|| {
            let mut acc = 0u16;
            for buf in bufs.iter_mut() {
                buf[..6].copy_from_slice(&GROUP.0);
                if let Ok(e) = EthernetFrame::new_checked(black_box(&buf[..])) {
                    acc = acc.wrapping_add(e.ethertype());
                }
            }
            acc
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = steering
}
criterion_main!(benches);
