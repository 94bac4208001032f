//! Criterion benchmarks of the allocation crate, each beside a baseline measured in the same run.
//!
//! `cargo bench -p allocation` — results and their ratios go to docs/benchmarks.md.

use std::hash::Hasher;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use allocation::hash::{bucket, hash_v4_endpoint, hash_v6_endpoint, HashKey};
use allocation::rules::proto;
use allocation::{
    AllocationTable, Flow, GroupSpec, MacAddr, PortAllocator, PortRange, Profile, SelfPorts, Tm,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[allow(dead_code)] // the bench uses the lookup only
#[path = "../examples/maglev/mod.rs"]
mod maglev;

const BATCH: usize = 4096;

fn key() -> HashKey {
    "000102030405060708090a0b0c0d0e0f".parse().expect("key")
}

fn table(n: usize) -> AllocationTable {
    let tms = (0..n)
        .map(|i| Tm {
            id: i as u32,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            weight: 1,
            group: 0,
        })
        .collect();
    AllocationTable::new(
        1,
        key(),
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table")
}

/// Client endpoints with pseudo-random addresses and ports.
fn endpoints() -> Vec<([u8; 4], u16)> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..BATCH)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (((x >> 16) as u32).to_be_bytes(), 1024 + (x as u16 % 64000))
        })
        .collect()
}

fn steering(c: &mut Criterion) {
    let t = table(8);
    let buckets = &t.groups()[0].buckets;
    let k = key();
    let eps = endpoints();
    let mut g = c.benchmark_group("hash_lookup");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("siphash13_v4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(a, p) in black_box(&eps) {
                acc = acc.wrapping_add(u32::from(buckets.get(bucket(hash_v4_endpoint(&k, a, p)))));
            }
            acc
        })
    });
    let eps6: Vec<([u8; 16], u16)> = eps
        .iter()
        .map(|&(a, p)| {
            let mut v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            v6[12..].copy_from_slice(&a);
            (v6, p)
        })
        .collect();
    g.bench_function("siphash13_v6", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(a, p) in black_box(&eps6) {
                acc = acc.wrapping_add(u32::from(buckets.get(bucket(hash_v6_endpoint(&k, a, p)))));
            }
            acc
        })
    });
    let flows: Vec<Flow> = eps
        .iter()
        .map(|&(a, p)| {
            Flow::with_ports(
                proto::TCP,
                IpAddr::V4(Ipv4Addr::from(a)),
                p,
                "198.51.100.1".parse().expect("addr"),
                443,
            )
        })
        .collect();
    g.bench_function("steer_flow_v4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for f in black_box(&flows) {
                acc = acc.wrapping_add(u32::from(t.steer(f).tm));
            }
            acc
        })
    });
    // Baselines: the stronger SipHash-2-4 (std), and unkeyed FNV-1a (no protection at all).
    #[allow(deprecated)]
    // std's SipHasher (2-4) is deprecated in favour of DefaultHasher, but is the reference here
    g.bench_function("baseline_siphash24_v4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(a, p) in black_box(&eps) {
                let mut h = std::hash::SipHasher::new_with_keys(1, 2);
                h.write(&a);
                h.write(&p.to_be_bytes());
                acc = acc.wrapping_add(u32::from(buckets.get(bucket(h.finish()))));
            }
            acc
        })
    });
    g.bench_function("baseline_fnv1a_v4", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(a, p) in black_box(&eps) {
                let mut h = fnv::FnvHasher::default();
                h.write(&a);
                h.write(&p.to_be_bytes());
                acc = acc.wrapping_add(u32::from(buckets.get(bucket(h.finish()))));
            }
            acc
        })
    });
    g.finish();
}

fn selfports(c: &mut Criterion) {
    let addr: IpAddr = "10.1.0.1".parse().expect("addr");
    let mut g = c.benchmark_group("selfports_build");
    for n in [8usize, 64] {
        let t = table(n);
        g.bench_function(format!("all_tms_{n}"), |b| {
            b.iter(|| SelfPorts::build_all(black_box(&t), addr, PortRange::ALL))
        });
    }
    // Baseline: hashing the 65,536 ports alone, the floor of any build.
    let k = key();
    g.bench_function("baseline_hash_65536_ports", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in 0..=65535u16 {
                acc = acc.wrapping_add(hash_v4_endpoint(&k, [10, 1, 0, 1], black_box(p)));
            }
            acc
        })
    });
    g.finish();
}

fn allocator(c: &mut Criterion) {
    let t = table(8);
    let ports = SelfPorts::build(
        &t,
        "10.1.0.1".parse().expect("addr"),
        3,
        "1024-65535".parse().expect("range"),
    )
    .expect("ports");
    let mut a = PortAllocator::new(&ports);
    // Half the ports held by long-lived connections.
    let half = ports.count() / 2;
    for _ in 0..half {
        a.allocate(1023).expect("port");
    }
    let mut g = c.benchmark_group("port_alloc");
    g.bench_function("allocate_release_half_full", |b| {
        b.iter(|| {
            let p = a.allocate(black_box(80)).expect("port");
            a.release(p).expect("release");
        })
    });
    // Baseline: a straightforward allocator scanning a bool array from a cursor.
    let valid: Vec<bool> = (0..=65535u16).map(|p| ports.contains(p)).collect();
    let mut used = vec![false; 65536];
    let mut held = 0;
    for p in 1024..=65535usize {
        if valid[p] && held < half {
            used[p] = true;
            held += 1;
        }
    }
    let mut cursor = 1024usize;
    g.bench_function("baseline_linear_scan", |b| {
        b.iter(|| {
            let above = usize::from(black_box(80u16));
            let mut p = cursor.max(above + 1);
            for _ in 0..65536 {
                if p > 65535 {
                    p = above + 1;
                }
                if valid[p] && !used[p] {
                    break;
                }
                p += 1;
            }
            used[p] = true;
            cursor = p + 1;
            used[p] = false;
            p
        })
    });
    g.finish();
}

fn rebalance(c: &mut Criterion) {
    let mut g = c.benchmark_group("rebalance");
    let gauss = Profile::Gaussian {
        mean: None,
        sigma: None,
    };
    for n in [8usize, 64] {
        let t = table(n);
        g.bench_function(format!("uniform_to_gaussian_{n}"), |b| {
            b.iter(|| t.rebalance(0, black_box(&gauss)).expect("rebalance"))
        });
    }
    // Baseline: building a fresh table for the same profile (moves everything).
    let t = table(64);
    g.bench_function("baseline_fresh_build_64", |b| {
        b.iter(|| {
            AllocationTable::new(
                2,
                key(),
                t.tms().to_vec(),
                vec![GroupSpec::default_group(black_box(gauss.clone()))],
            )
            .expect("table")
        })
    });
    let t8 = table(8);
    g.bench_function("failover_one_of_8", |b| {
        b.iter(|| t8.failover(black_box(&[3])).expect("failover"))
    });
    g.finish();
}

/// Our 4096-entry table against Maglev's 65537-entry one: hash + lookup per
/// flow, the same hash, 8 and 64 TMs (balance and disruption:
/// `cargo run --release -p allocation --example maglev_compare`).
fn maglev(c: &mut Criterion) {
    let k = key();
    let eps = endpoints();
    let mut g = c.benchmark_group("maglev");
    g.throughput(Throughput::Elements(BATCH as u64));
    for n in [8usize, 64] {
        let t = table(n);
        let buckets = &t.groups()[0].buckets;
        let names: Vec<(String, u32)> = (0..n).map(|i| (format!("tm{i}"), 1)).collect();
        let mg = maglev::Maglev::new(&names);
        g.bench_function(format!("table_{n}"), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for &(a, p) in black_box(&eps) {
                    acc = acc
                        .wrapping_add(u32::from(buckets.get(bucket(hash_v4_endpoint(&k, a, p)))));
                }
                acc
            })
        });
        g.bench_function(format!("maglev_{n}"), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for &(a, p) in black_box(&eps) {
                    acc = acc.wrapping_add(u32::from(mg.lookup(hash_v4_endpoint(&k, a, p))));
                }
                acc
            })
        });
    }
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
    targets = steering, selfports, allocator, rebalance, maglev
}
criterion_main!(benches);
