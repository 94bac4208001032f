//! Fuzz target: sequences of arbitrary frames on arbitrary ports through one steering worker (state carried between frames).
#![no_main]

use std::net::IpAddr;

use allocation::{AllocationTable, GroupSpec, HashKey, MacAddr, Profile, Tm};
use datapath::{Plan, PortKind, Worker, WorkerConfig};
use libfuzzer_sys::fuzz_target;

fn plan() -> Plan {
    let tms = (0..4)
        .map(|i| Tm { id: i, name: format!("tm{i}"), mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]), weight: 1, group: 0 })
        .collect();
    let key = HashKey::from_bytes([7; 16]);
    let table = AllocationTable::new(1, key, tms, vec![GroupSpec::default_group(Profile::Uniform)]).expect("table");
    let ports = vec![PortKind::Outside, PortKind::Tm, PortKind::Tm, PortKind::Tm, PortKind::Tm, PortKind::Bridged];
    let cluster: Vec<IpAddr> = ["198.51.100.10", "10.1.0.1", "2001:db8::10", "2001:db8:1::1"]
        .iter()
        .map(|s| s.parse().expect("addr"))
        .collect();
    Plan::new(table, MacAddr([2, 0x57, 0x44, 0, 0, 1]), &cluster, ports, &[(0, 1), (1, 2), (2, 3), (3, 4)]).expect("plan")
}

// Input: records of [port: u8][len: u16 BE][frame bytes]; the last record takes what is left.
fuzz_target!(|data: &[u8]| {
    let plan = plan();
    let mut w = Worker::new(WorkerConfig::default(), HashKey::from_bytes([1; 16]));
    let mut rest = data;
    let mut now = 0u64;
    let mut buf = vec![0u8; 10_000];
    while rest.len() >= 3 {
        let port = u16::from(rest[0] % 8);
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3).min(9000);
        buf[..len].copy_from_slice(&rest[3..3 + len]);
        let _ = w.process(&mut buf, len, port, &plan, now);
        w.drain_released(&plan, |_, _| {});
        now += 100_000_000;
        w.tick(now);
        rest = &rest[3 + len..];
    }
});
