//! Our allocation table against Maglev (NSDI 2016, table size 65537), 4 to 64 TMs: balance, and what moves when a TM is removed or a weight changes.
//!
//! `cargo run --release -p allocation --example maglev_compare` — the
//! lookup times are in `cargo bench -p allocation -- maglev`; both go to
//! docs/benchmarks.md.

mod maglev;

use allocation::hash::{bucket, hash_v4_endpoint, HashKey};
use allocation::rebalance::minimum_moves;
use allocation::{AllocationTable, GroupSpec, MacAddr, Profile, Tm};
use maglev::{Maglev, M};

/// Flows for the flow figures (`MAGLEV_FLOWS` to change: the test suite runs a small smoke).
fn flows() -> u64 {
    std::env::var("MAGLEV_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
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
        HashKey::from_bytes([0x5a; 16]),
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table")
}

/// The flow hashes every comparison uses: random client endpoints.
fn hashes(key: &HashKey) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..flows())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let addr = (x >> 16) as u32;
            hash_v4_endpoint(key, addr.to_be_bytes(), (x as u16) | 1024)
        })
        .collect()
}

fn ratio(counts: &[u64]) -> f64 {
    let live: Vec<u64> = counts.iter().copied().filter(|&c| c > 0).collect();
    let mean = live.iter().sum::<u64>() as f64 / live.len().max(1) as f64;
    live.iter().copied().max().unwrap_or(0) as f64 / mean
}

fn main() -> std::process::ExitCode {
    let mut ours_minimal = true;
    let key = HashKey::from_bytes([0x5a; 16]);
    let hs = hashes(&key);
    println!("| TMs | entries max/mean (ours / Maglev) | flows max/mean (ours / Maglev) | remove a TM: entries moved beyond the minimum (ours / Maglev) | flows moved beyond the minimum | weight ×2 on one TM: entries beyond the minimum (ours / Maglev) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for n in [4usize, 8, 16, 32, 64] {
        let t = table(n);
        let names: Vec<(String, u32)> = (0..n).map(|i| (format!("tm{i}"), 1)).collect();
        let mg = Maglev::new(&names);
        let ours_entries: Vec<u64> = t.counts(0).iter().map(|&c| u64::from(c)).collect();
        let mg_entries: Vec<u64> = mg.counts(n).iter().map(|&c| u64::from(c)).collect();
        let buckets = &t.groups()[0].buckets;
        let mut ours_flows = vec![0u64; n];
        let mut mg_flows = vec![0u64; n];
        for &h in &hs {
            ours_flows[usize::from(buckets.get(bucket(h)))] += 1;
            mg_flows[usize::from(mg.lookup(h))] += 1;
        }

        // Remove TM k: the minimum is k's own entries (and flows).
        let k = n / 2;
        let removed = t.remove_tm(k as u16).expect("remove");
        let ours_excess = removed.moves.len() - t.counts(0)[k] as usize;
        let mut rest = names.clone();
        rest.remove(k);
        let mg2 = Maglev::new(&rest);
        // Old index → new index (indexes above k shift down).
        let renum = |i: u16| if usize::from(i) > k { i - 1 } else { i };
        let mg_excess = (0..M)
            .filter(|&s| usize::from(mg.entry[s]) != k && renum(mg.entry[s]) != mg2.entry[s])
            .count();
        let mg_flow_excess = hs
            .iter()
            .filter(|&&h| {
                let old = mg.lookup(h);
                usize::from(old) != k && renum(old) != mg2.lookup(h)
            })
            .count();
        let new_buckets = &removed.table.groups()[0].buckets;
        let ours_flow_excess = hs
            .iter()
            .filter(|&&h| {
                let old = buckets.get(bucket(h));
                usize::from(old) != k && renum(old) != new_buckets.get(bucket(h))
            })
            .count();

        // TM 0's weight doubles.
        let mut weights = vec![1u32; n];
        weights[0] = 2;
        let tms: Vec<Tm> = t
            .tms()
            .iter()
            .zip(&weights)
            .map(|(tm, &w)| Tm {
                weight: w,
                ..tm.clone()
            })
            .collect();
        let heavier =
            AllocationTable::from_parts(1, *t.key(), tms, t.groups().to_vec()).expect("table");
        let targets = heavier.targets(0, &Profile::Weighted).expect("targets");
        let change = heavier
            .rebalance_to_targets(0, &targets, None)
            .expect("rebalance");
        let ours_w_excess = change.moves.len() - minimum_moves(&t.counts(0), &targets);
        ours_minimal &= ours_excess == 0 && ours_flow_excess == 0 && ours_w_excess == 0;
        let wnames: Vec<(String, u32)> = names
            .iter()
            .zip(&weights)
            .map(|((s, _), &w)| (s.clone(), w))
            .collect();
        let mg3 = Maglev::new(&wnames);
        let mg_w_moved = (0..M).filter(|&s| mg.entry[s] != mg3.entry[s]).count();
        let mg_w_min = minimum_moves(&mg.counts(n), &mg3.counts(n));
        println!(
            "| {n} | {:.4} / {:.4} | {:.4} / {:.4} | {} of {} ({:.2} %) / {} of {} ({:.2} %) | {:.2} % / {:.2} % | {} / {} of {} ({:.2} %) |",
            ratio(&ours_entries),
            ratio(&mg_entries),
            ratio(&ours_flows),
            ratio(&mg_flows),
            ours_excess,
            allocation::TABLE_SIZE,
            100.0 * ours_excess as f64 / allocation::TABLE_SIZE as f64,
            mg_excess,
            M,
            100.0 * mg_excess as f64 / M as f64,
            100.0 * ours_flow_excess as f64 / hs.len() as f64,
            100.0 * mg_flow_excess as f64 / hs.len() as f64,
            ours_w_excess,
            mg_w_moved - mg_w_min,
            M,
            100.0 * (mg_w_moved - mg_w_min) as f64 / M as f64,
        );
    }
    if ours_minimal {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("our table moved more than the minimum");
        std::process::ExitCode::FAILURE
    }
}
