//! Statistical tests of the hash and tables: per-TM fidelity over a million flows and chi-square uniformity of buckets.
//!
//! Every input is generated from a fixed seed, so a run is reproducible; a
//! hash or table regression makes these fail every time, not by chance.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use allocation::hash::{bucket, hash_endpoint, hash_v4_endpoint, HashKey};
use allocation::rules::proto;
use allocation::{AllocationTable, Flow, GroupSpec, MacAddr, Profile, Tm, TABLE_SIZE};

/// SplitMix64: a small, well-known generator for reproducible inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn keys() -> [HashKey; 2] {
    [
        "000102030405060708090a0b0c0d0e0f".parse().expect("key"),
        "9b1f0c7d3a5e42f18c6d0e2b4a7f9513".parse().expect("key"),
    ]
}

fn table(key: HashKey, weights: &[u32], profile: Profile) -> AllocationTable {
    let tms = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Tm {
            id: i as u32,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0, 0, 0, 1, i as u8]),
            weight: w,
            group: 0,
        })
        .collect();
    AllocationTable::new(1, key, tms, vec![GroupSpec::default_group(profile)]).expect("table")
}

/// Steers `n` random TCP flows (random IPv4 and IPv6 clients, random
/// ephemeral ports, a fixed VIP on 443) and returns the flows per TM.
fn steer_random(t: &AllocationTable, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    let mut per_tm = vec![0u64; t.tms().len()];
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    for i in 0..n {
        let r = rng.next();
        let client = if i % 4 == 0 {
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(rng.next()) << 64) | u128::from(r),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from((r >> 32) as u32))
        };
        let port = 1024 + (r as u16 % (65535 - 1024));
        let flow = Flow::with_ports(proto::TCP, client, port, vip, 443);
        per_tm[usize::from(t.steer(&flow).tm)] += 1;
    }
    per_tm
}

/// Per-TM fidelity over a million flows: within 1% (relative) of the
/// target share, or within 4.5 binomial standard deviations where a share is
/// so small that 1% is inside the sampling noise itself (at a million flows,
/// shares under ~17%: a 10% share has σ ≈ 0.95% relative).
#[test]
fn a_million_flows_land_within_one_percent_of_target() {
    for key in keys() {
        for (weights, profile) in [
            (vec![1; 8], Profile::Uniform),
            (vec![1, 2, 3, 4], Profile::Weighted),
            (
                vec![1; 5],
                Profile::Custom {
                    weights: vec![3.0, 1.0, 2.0, 2.0, 1.0],
                },
            ),
            (
                vec![1; 8],
                Profile::Gaussian {
                    mean: None,
                    sigma: None,
                },
            ),
            (vec![1; 8], Profile::Rayleigh { sigma: None }),
        ] {
            let t = table(key, &weights, profile.clone());
            let n = 1_000_000;
            let got = steer_random(&t, n, 42);
            for (i, (&flows, &entries)) in got.iter().zip(&t.counts(0)).enumerate() {
                let p = f64::from(entries) / TABLE_SIZE as f64;
                let want = n as f64 * p;
                let rel = (flows as f64 - want).abs() / want;
                let sd_rel = ((1.0 - p) / (n as f64 * p)).sqrt();
                assert!(
                    rel <= (4.5 * sd_rel).max(0.01),
                    "{profile}: TM {i} got {flows} flows, target {want:.0} ({:.2}% off, σ = {:.2}%)",
                    rel * 100.0,
                    sd_rel * 100.0
                );
            }
        }
    }
}

/// Bias detector: over many independent samples the per-TM z-scores of an
/// unbiased hash are standard normal. A hash (or table) that favours some
/// buckets inflates their variance; 400 z-samples put the variance within
/// 0.75–1.3 with overwhelming probability for an unbiased one.
#[test]
fn per_tm_deviations_are_pure_sampling_noise() {
    for key in keys() {
        let t = table(key, &[1, 2, 3, 4], Profile::Weighted);
        let n = 50_000;
        let (mut sum_sq, mut sum, mut count) = (0.0, 0.0, 0.0);
        for seed in 0..100u64 {
            let got = steer_random(&t, n, seed * 7919 + 13);
            for (&f, &e) in got.iter().zip(&t.counts(0)) {
                let p = f64::from(e) / TABLE_SIZE as f64;
                let z = (f as f64 - n as f64 * p) / (n as f64 * p * (1.0 - p)).sqrt();
                sum_sq += z * z;
                sum += z;
                count += 1.0;
            }
        }
        let (var, mean) = (sum_sq / count, sum / count);
        assert!(
            (0.75..=1.3).contains(&var),
            "z variance {var:.3}: deviations are not sampling noise"
        );
        assert!(mean.abs() < 0.2, "z mean {mean:.3}");
    }
}

/// The chi-square critical value at upper-tail probability 0.001 for `k`
/// degrees of freedom (Wilson–Hilferty; exact to a few parts in 10⁴ here).
fn chi2_critical_0001(k: f64) -> f64 {
    let z = 3.090_232_306; // Φ⁻¹(0.999)
    let c = 2.0 / (9.0 * k);
    k * (1.0 - c + z * c.sqrt()).powi(3)
}

/// Chi-square statistic of the bucket counts of `endpoints` against uniform.
fn chi2(key: &HashKey, endpoints: impl Iterator<Item = (IpAddr, u16)>) -> (f64, usize) {
    let mut counts = vec![0u64; TABLE_SIZE];
    let mut n = 0usize;
    for (addr, port) in endpoints {
        counts[bucket(hash_endpoint(key, addr, port))] += 1;
        n += 1;
    }
    let e = n as f64 / TABLE_SIZE as f64;
    (counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum(), n)
}

fn assert_uniform(what: &str, key: &HashKey, endpoints: impl Iterator<Item = (IpAddr, u16)>) {
    let (x, n) = chi2(key, endpoints);
    let crit = chi2_critical_0001((TABLE_SIZE - 1) as f64);
    assert!(
        n >= 20 * TABLE_SIZE || what.contains("fixed"),
        "{what}: only {n} samples"
    );
    assert!(x < crit, "{what}: chi-square {x:.0} over {n} samples rejects uniformity (critical {crit:.0} at p = 0.001)");
}

/// Client addresses counting up from 203.0.113.0, each with ports from
/// 1024 in steps of `stride`, until `n` endpoints.
fn strided(stride: u16, n: usize) -> impl Iterator<Item = (IpAddr, u16)> {
    let per_addr = (65535 - 1024) / usize::from(stride);
    (0..n).map(move |i| {
        let addr = u32::from(Ipv4Addr::new(203, 0, 113, 0)) + (i / per_addr) as u32;
        let port = 1024 + (i % per_addr) as u16 * stride;
        (IpAddr::V4(Ipv4Addr::from(addr)), port)
    })
}

#[test]
fn buckets_are_uniform_for_sequential_and_strided_ports() {
    for key in keys() {
        for stride in [1u16, 2, 4, 64] {
            assert_uniform(&format!("stride {stride}"), &key, strided(stride, 400_000));
        }
    }
}

#[test]
fn buckets_are_uniform_for_one_fixed_client() {
    for key in keys() {
        let client: IpAddr = "203.0.113.7".parse().expect("addr");
        assert_uniform(
            "one fixed client, every port",
            &key,
            (1..=65535u16).map(|p| (client, p)),
        );
        let v6: IpAddr = "2001:db8::7".parse().expect("addr");
        assert_uniform(
            "one fixed IPv6 client, every port",
            &key,
            (1..=65535u16).map(|p| (v6, p)),
        );
    }
}

#[test]
fn buckets_are_uniform_for_sequential_addresses_on_one_port() {
    // Carrier NAT pools: many addresses, the same port.
    let key = keys()[0];
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    assert_uniform(
        "sequential addresses, port 40000",
        &key,
        (0..400_000u32).map(|i| (IpAddr::V4(Ipv4Addr::from(base + i)), 40000)),
    );
}

/// The test above must be able to fail: a hash that ignores the port's
/// low bits is rejected by the same check.
#[test]
fn the_uniformity_check_rejects_a_bad_hash() {
    let key = keys()[0];
    let mut counts = vec![0u64; TABLE_SIZE];
    for (addr, port) in strided(4, 400_000) {
        let IpAddr::V4(a) = addr else { continue };
        counts[bucket(hash_v4_endpoint(&key, a.octets(), port & !0x7))] += 1;
    }
    let e = 400_000.0 / TABLE_SIZE as f64;
    let x: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
    assert!(
        x > chi2_critical_0001((TABLE_SIZE - 1) as f64),
        "a degraded hash passed: {x}"
    );
}
