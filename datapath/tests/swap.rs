//! Plan swaps under concurrent steering: every frame is steered entirely by one table version, none is lost.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocation::{AllocationTable, GroupSpec, HashKey, MacAddr, Profile, SharedTable, Tm};
use datapath::build::{self, tcp_flags, L2};
use datapath::{Action, Plan, PortKind, Worker, WorkerConfig};

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const TMS: usize = 4;

fn tm_mac(i: usize) -> MacAddr {
    MacAddr([0x02, 0x53, 0x54, 0, 0, i as u8 + 1])
}

/// Table `k` gives every bucket (and the equal-ports role) to TM `k`.
fn tables() -> Vec<AllocationTable> {
    let tms: Vec<Tm> = (0..TMS)
        .map(|i| Tm {
            id: i as u32,
            name: format!("tm{i}"),
            mac: tm_mac(i),
            weight: 1,
            group: 0,
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    (0..TMS)
        .map(|k| {
            let mut w = vec![0.0; TMS];
            w[k] = 1.0;
            AllocationTable::new(
                1,
                key,
                tms.clone(),
                vec![GroupSpec::default_group(Profile::Custom { weights: w })],
            )
            .expect("table")
        })
        .collect()
}

fn plan(table: AllocationTable) -> Plan {
    let mut ports = vec![PortKind::Outside];
    ports.extend([PortKind::Tm; TMS]);
    let map: Vec<(u32, u16)> = (0..TMS).map(|i| (i as u32, i as u16 + 1)).collect();
    Plan::new(
        table,
        GROUP,
        &["198.51.100.10".parse::<IpAddr>().expect("addr")],
        ports,
        &map,
    )
    .expect("plan")
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn every_frame_is_steered_by_exactly_one_table_version() {
    let tables = tables();
    let shared = Arc::new(SharedTable::new(plan(tables[1].clone().with_version(1))));
    let stop = Arc::new(AtomicBool::new(false));
    let steered = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let frames: Vec<Vec<u8>> = (0..16u16)
        .map(|i| {
            build::tcp_frame(
                &L2::new(GROUP, MacAddr([2, 0xee, 0, 0, 0, 1])),
                "203.0.113.7".parse().expect("addr"),
                40000 + i,
                vip,
                443,
                tcp_flags::ACK,
                b"x",
            )
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (shared, stop, steered, started) = (
                Arc::clone(&shared),
                Arc::clone(&stop),
                Arc::clone(&steered),
                Arc::clone(&started),
            );
            let frames = frames.clone();
            std::thread::spawn(move || {
                let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([r; 16]));
                let mut buf = vec![0u8; 256];
                started.fetch_add(1, Ordering::SeqCst);
                let mut last = 0;
                while !stop.load(Ordering::Relaxed) {
                    // One snapshot per batch, as a worker does.
                    let plan = shared.load();
                    let v = allocation::Versioned::version(&**plan);
                    assert!(v >= last, "version went backwards");
                    last = v;
                    let want = (v % TMS as u64) as usize;
                    for f in &frames {
                        buf[..f.len()].copy_from_slice(f);
                        let a = w.process(&mut buf, f.len(), 0, &plan, 0);
                        assert_eq!(
                            a,
                            Action::ToTm {
                                tm: want as u16,
                                port: want as u16 + 1
                            },
                            "version {v}"
                        );
                        assert_eq!(&buf[..6], &tm_mac(want).0, "MAC of the same version's TM");
                    }
                    steered.fetch_add(frames.len() as u64, Ordering::Relaxed);
                }
                w.counters
            })
        })
        .collect();
    wait_until("the readers to start", || {
        started.load(Ordering::SeqCst) == 2
    });
    for v in 2..=5000u64 {
        shared
            .swap(plan(
                tables[(v % TMS as u64) as usize].clone().with_version(v),
            ))
            .expect("swap");
        if v % 100 == 0 {
            let seen = steered.load(Ordering::Relaxed);
            wait_until("reader progress", || steered.load(Ordering::Relaxed) > seen);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = datapath::Counters::default();
    for r in readers {
        total.add(&r.join().expect("reader panicked"));
    }
    let sent: u64 = total.tm_packets.iter().sum();
    assert_eq!(
        sent,
        steered.load(Ordering::Relaxed),
        "every frame steered, none lost"
    );
    assert!(total.drops.iter().all(|&d| d == 0));
    assert!(sent >= 50 * 16);
}
