//! The transition rule on real frames (DESIGN §4 step 2): in moved buckets, flows seen starting stay where they started, everything else goes to the old owner; commit drops the previous table.

use std::net::IpAddr;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, GroupSpec, HashKey, MacAddr, Profile, Tm};
use datapath::build::{self, tcp_flags, L2};
use datapath::pins::Pin;
use datapath::transit::TransitConfig;
use datapath::Batch;
use datapath::{Action, Branch, FlowKey, Plan, PlanError, PortKind, Worker, WorkerConfig};
use proptest::prelude::*;

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0xc1, 0, 0, 0, 1]);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

fn tm_mac(i: u32) -> MacAddr {
    MacAddr([0x02, 0x53, 0x54, 0, 0, i as u8 + 1])
}

/// Version 1: four TMs, uniform.
fn v1() -> AllocationTable {
    let tms = (0..4)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: tm_mac(i),
            weight: 1,
            group: 0,
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    AllocationTable::new(
        1,
        key,
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table")
}

/// Version 2: v1 rebalanced to a Gaussian (minimal moves).
fn v2() -> AllocationTable {
    v1().rebalance(
        0,
        &Profile::Gaussian {
            mean: None,
            sigma: None,
        },
    )
    .expect("rebalance")
    .table
}

/// Port 0 outside, ports 1–4 one TM each.
fn plan(table: AllocationTable) -> Plan {
    let ports = vec![
        PortKind::Outside,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Tm,
    ];
    Plan::new(
        table,
        GROUP,
        &[ip("198.51.100.10"), ip("10.1.0.1")],
        ports,
        &[(0, 1), (1, 2), (2, 3), (3, 4)],
    )
    .expect("plan")
}

fn switched() -> Plan {
    plan(v2()).with_previous(v1()).expect("switch").opened()
}

fn worker(capacity: usize) -> Worker {
    Worker::new(
        WorkerConfig {
            transit: TransitConfig {
                capacity,
                idle_ns: 60_000_000_000,
            },
            ..WorkerConfig::default()
        },
        HashKey::from_bytes([5; 16]),
    )
}

fn route_id(p: &Plan, a: Action) -> Option<u32> {
    match a {
        Action::ToTm { tm, .. } => p.tm_id(tm),
        _ => None,
    }
}

fn run(w: &mut Worker, p: &Plan, frame: &[u8], ingress: u16) -> (Action, Option<Branch>) {
    let mut buf = frame.to_vec();
    let a = w.process(&mut buf, frame.len(), ingress, p, 1_000);
    (a, w.last_branch())
}

/// [`run`] from outside at time `now` (ns).
fn run_at(w: &mut Worker, p: &Plan, frame: &[u8], now: u64) -> (Action, Option<Branch>) {
    let mut buf = frame.to_vec();
    let a = w.process(&mut buf, frame.len(), 0, p, now);
    (a, w.last_branch())
}

fn owner_id(t: &AllocationTable, f: &Flow) -> u32 {
    t.tms()[usize::from(t.steer(f).tm)].id
}

/// Client endpoints (address, port) toward the VIP whose owner changed / did not.
fn client_flows(moved: bool, n: usize) -> Vec<(IpAddr, u16)> {
    let (a, b) = (v1(), v2());
    let mut out = Vec::new();
    for port in 20_000u16.. {
        let c = ip(&format!("203.0.113.{}", port % 200 + 1));
        let f = Flow::with_ports(proto::TCP, c, port, ip("198.51.100.10"), 80);
        if (owner_id(&a, &f) != owner_id(&b, &f)) == moved {
            out.push((c, port));
            if out.len() == n {
                return out;
            }
        }
    }
    out
}

fn to_vip(c: (IpAddr, u16), flags: u8) -> Vec<u8> {
    build::tcp_frame(
        &L2::new(GROUP, CLIENT_MAC),
        c.0,
        c.1,
        ip("198.51.100.10"),
        80,
        flags,
        b"x",
    )
}

#[test]
fn switch_rejects_a_previous_that_is_not_older() {
    assert!(matches!(
        plan(v1()).with_previous(v1()),
        Err(PlanError::PreviousNotOlder { .. })
    ));
    let p = switched();
    assert_eq!(p.previous().map(|t| t.version()), Some(1));
    let moved = p.moved().expect("comparable tables").len();
    let min = allocation::rebalance::minimum_moves(&v1().counts(0), &v2().counts(0));
    assert_eq!(moved, min, "the moved set is exactly the rebalance's moves");
    let committed = p.without_previous();
    assert!(committed.previous().is_none() && committed.moved().is_none());
}

#[test]
fn moved_buckets_follow_the_transition_rule() {
    let p = switched();
    let (old, new) = (v1(), v2());
    let mut w = worker(1024);
    let flows = client_flows(true, 20);
    let (started, established) = flows.split_at(10);
    for &c in started {
        let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
        // A SYN from outside starts the flow on the new owner ...
        let (a, b) = run(&mut w, &p, &to_vip(c, tcp_flags::SYN), 0);
        assert_eq!(route_id(&p, a), Some(owner_id(&new, &f)));
        assert_eq!(b, Some(Branch::TransitionNew));
        // ... and every later packet of it follows there.
        for flags in [
            tcp_flags::ACK,
            tcp_flags::ACK | tcp_flags::PSH,
            tcp_flags::FIN | tcp_flags::ACK,
        ] {
            let (a, b) = run(&mut w, &p, &to_vip(c, flags), 0);
            assert_eq!(route_id(&p, a), Some(owner_id(&new, &f)));
            assert_eq!(b, Some(Branch::TransitionRemembered));
        }
    }
    for &c in established {
        // A flow not seen starting is an established one: the old owner keeps it.
        let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
        let (a, b) = run(&mut w, &p, &to_vip(c, tcp_flags::ACK), 0);
        assert_eq!(route_id(&p, a), Some(owner_id(&old, &f)));
        assert_eq!(b, Some(Branch::TransitionOld));
        // A SYN-ACK is no start either.
        let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::SYN | tcp_flags::ACK), 0);
        assert_eq!(route_id(&p, a), Some(owner_id(&old, &f)));
    }
    // Buckets that did not move are steered as always.
    for c in client_flows(false, 10) {
        let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
        for flags in [tcp_flags::SYN, tcp_flags::ACK] {
            let (a, b) = run(&mut w, &p, &to_vip(c, flags), 0);
            assert_eq!(route_id(&p, a), Some(owner_id(&new, &f)));
            assert_eq!(b, Some(Branch::Endpoint));
        }
    }
    assert_eq!(w.transit_overflows(), 0);
    assert_eq!(w.transit_remembered(1_000), 10);
}

#[test]
fn before_open_new_flows_start_on_the_old_owner_but_tm_starts_are_remembered() {
    let closed = plan(v2()).with_previous(v1()).expect("switch");
    assert!(!closed.is_open() && closed.opened().is_open());
    let closed = plan(v2()).with_previous(v1()).expect("switch");
    let mut w = worker(64);
    let c = client_flows(true, 1)[0];
    let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
    let (a, b) = run(&mut w, &closed, &to_vip(c, tcp_flags::SYN), 0);
    assert_eq!(route_id(&closed, a), Some(owner_id(&v1(), &f)));
    assert_eq!(b, Some(Branch::TransitionOld));
    assert_eq!(w.transit_remembered(1_000), 0);
    // A TM's own SYN is remembered already.
    let server = ip("10.2.0.5");
    let syn = build::tcp_frame(
        &L2::new(ip_mac(), tm_mac(2)),
        c.0,
        c.1,
        server,
        80,
        tcp_flags::SYN,
        b"",
    );
    run(&mut w, &closed, &syn, 3);
    assert_eq!(w.transit_remembered(1_000), 1);
    // After opening, the same client's next connection starts on the new owner.
    let open = closed.opened();
    let c2 = client_flows(true, 2)[1];
    let f2 = Flow::with_ports(proto::TCP, c2.0, c2.1, ip("198.51.100.10"), 80);
    let (a, b) = run(&mut w, &open, &to_vip(c2, tcp_flags::SYN), 0);
    assert_eq!(route_id(&open, a), Some(owner_id(&v2(), &f2)));
    assert_eq!(b, Some(Branch::TransitionNew));
}

#[test]
fn udp_sessions_in_moved_buckets_keep_their_owner_through_the_commit() {
    let (old, new) = (v1(), v2());
    let l2 = L2::new(GROUP, CLIENT_MAC);
    let vip = ip("198.51.100.10");
    let udp = |c: (IpAddr, u16)| build::udp_frame(&l2, c.0, c.1, vip, 53, b"q");
    let flow = |c: (IpAddr, u16)| Flow::with_ports(proto::UDP, c.0, c.1, vip, 53);
    let flows = client_flows(true, 30);
    let (idle, active, late) = (&flows[..10], &flows[10..20], &flows[20..]);
    // The old owners report their sessions (pins) once every distributor
    // switched; `idle` ones send nothing until after the commit.
    let pins: Vec<Pin> = idle
        .iter()
        .chain(active)
        .map(|&c| Pin {
            key: FlowKey::of(&flow(c)),
            tm: owner_id(&old, &flow(c)),
            since: 0,
            idle_ns: 0,
        })
        .collect();
    let pins: std::sync::Arc<[Pin]> = pins.into();
    let closed = plan(v2())
        .with_previous(v1())
        .expect("switch")
        .with_pins(pins.clone(), 1024);
    assert_eq!(closed.pins().map(|p| p.len()), Some(20));
    let mut w = worker(64);
    // Switched: a session not pinned starts on the old owner, remembered.
    for &c in late {
        let (a, b) = run(&mut w, &closed, &udp(c), 0);
        assert_eq!(route_id(&closed, a), Some(owner_id(&old, &flow(c))));
        assert_eq!(b, Some(Branch::TransitionOld));
    }
    let open = closed.opened();
    for &c in active {
        let (a, b) = run(&mut w, &open, &udp(c), 0);
        assert_eq!(route_id(&open, a), Some(owner_id(&old, &flow(c))), "pinned");
        assert_eq!(b, Some(Branch::Pinned));
    }
    for &c in late {
        let (a, b) = run(&mut w, &open, &udp(c), 0);
        assert_eq!(
            route_id(&open, a),
            Some(owner_id(&old, &flow(c))),
            "remembered"
        );
        assert_eq!(b, Some(Branch::TransitionRemembered));
    }
    // Open: a new session in a moved bucket starts on the new owner.
    let fresh = client_flows(true, 40)[30..].to_vec();
    for &c in &fresh {
        let (a, b) = run(&mut w, &open, &udp(c), 0);
        assert_eq!(route_id(&open, a), Some(owner_id(&new, &flow(c))));
        assert_eq!(b, Some(Branch::TransitionNew));
    }
    // Commit: the pins (reported again, now with the late sessions too)
    // keep every old session on its old owner; the rest follows the table.
    let mut again: Vec<Pin> = pins.to_vec();
    again.extend(late.iter().map(|&c| Pin {
        key: FlowKey::of(&flow(c)),
        tm: owner_id(&old, &flow(c)),
        since: 0,
        idle_ns: 0,
    }));
    let committed = open
        .clone()
        .without_previous()
        .with_pins(again.into(), 1024);
    let mut w = worker(64);
    for &c in idle.iter().chain(active).chain(late) {
        let (a, b) = run(&mut w, &committed, &udp(c), 0);
        assert_eq!(route_id(&committed, a), Some(owner_id(&old, &flow(c))));
        assert_eq!(b, Some(Branch::Pinned));
        // The server's answer comes back the same way (either direction, one key).
        let back = build::udp_frame(&l2, vip, 53, c.0, c.1, b"a");
        let (a, _) = run(&mut w, &committed, &back, 0);
        assert_eq!(route_id(&committed, a), Some(owner_id(&old, &flow(c))));
    }
    for &c in &fresh {
        let (a, b) = run(&mut w, &committed, &udp(c), 0);
        assert_eq!(route_id(&committed, a), Some(owner_id(&new, &flow(c))));
        assert_eq!(b, Some(Branch::Endpoint));
    }
    // Without pins the commit would have moved them: the test can fail.
    let bare = open.without_previous().with_pins(Vec::new().into(), 1024);
    let (a, _) = run(&mut w, &bare, &udp(idle[0]), 0);
    assert_eq!(route_id(&bare, a), Some(owner_id(&new, &flow(idle[0]))));
}

#[test]
fn pins_end_when_their_flow_idles_out_or_a_syn_opens_a_new_connection() {
    let (old, new) = (v1(), v2());
    let l2 = L2::new(GROUP, CLIENT_MAC);
    let vip = ip("198.51.100.10");
    let moved: Vec<(IpAddr, u16)> = client_flows(true, 2);
    let (u, t) = (moved[0], moved[1]);
    let uflow = Flow::with_ports(proto::UDP, u.0, u.1, vip, 53);
    let tflow = Flow::with_ports(proto::TCP, t.0, t.1, vip, 80);
    const S: u64 = 1_000_000_000;
    let pins: Vec<Pin> = vec![
        Pin {
            key: FlowKey::of(&uflow),
            tm: owner_id(&old, &uflow),
            since: 10 * S,
            idle_ns: 30 * S,
        },
        Pin {
            key: FlowKey::of(&tflow),
            tm: owner_id(&old, &tflow),
            since: 10 * S,
            idle_ns: 0,
        },
    ];
    let p = plan(v2()).with_pins(pins.into(), 16);
    let mut w = worker(64);
    let query = build::udp_frame(&l2, u.0, u.1, vip, 53, b"q");
    // Each packet within the idle time keeps the pin (and moves its end).
    for at in [20, 45, 70] {
        let (a, b) = run_at(&mut w, &p, &query, at * S);
        assert_eq!(route_id(&p, a), Some(owner_id(&old, &uflow)), "at {at} s");
        assert_eq!(b, Some(Branch::Pinned));
    }
    // The carried list remembers the last packet, so a new plan keeps it.
    let (carried, cap) = p.pin_list();
    assert_eq!(carried.iter().map(|p| p.since).min(), Some(10 * S));
    assert_eq!(carried.iter().map(|p| p.since).max(), Some(70 * S));
    let p2 = plan(v2()).with_pins(carried, cap);
    let (a, _) = run_at(&mut w, &p2, &query, 95 * S);
    assert_eq!(route_id(&p2, a), Some(owner_id(&old, &uflow)));
    // Idle past its TM's timeout: the session is over there, the table decides.
    let (a, b) = run_at(&mut w, &p2, &query, 126 * S);
    assert_eq!(route_id(&p2, a), Some(owner_id(&new, &uflow)));
    assert_eq!(b, Some(Branch::Endpoint));
    // The TCP pin has no idle limit: an ACK hours later is still pinned.
    let ack = build::tcp_frame(&l2, t.0, t.1, vip, 80, tcp_flags::ACK, b"");
    let (a, b) = run_at(&mut w, &p2, &ack, 10_000 * S);
    assert_eq!(route_id(&p2, a), Some(owner_id(&old, &tflow)));
    assert_eq!(b, Some(Branch::Pinned));
    // A SYN on the same four-tuple is a new connection: the table's, and
    // the pin is over for the packets after it too.
    let syn = build::tcp_frame(&l2, t.0, t.1, vip, 80, tcp_flags::SYN, b"");
    let (a, b) = run_at(&mut w, &p2, &syn, 10_001 * S);
    assert_eq!(route_id(&p2, a), Some(owner_id(&new, &tflow)));
    assert_eq!(b, Some(Branch::Endpoint));
    let (a, _) = run_at(&mut w, &p2, &ack, 10_002 * S);
    assert_eq!(route_id(&p2, a), Some(owner_id(&new, &tflow)));
    assert!(p2.pin_list().0.iter().all(|p| p.key != FlowKey::of(&tflow)));
}

#[test]
fn pins_are_bounded_and_the_fast_path_leaves_their_buckets_alone() {
    let (old, new) = (v1(), v2());
    let vip = ip("198.51.100.10");
    let flow = |c: (IpAddr, u16)| Flow::with_ports(proto::UDP, c.0, c.1, vip, 53);
    let flows = client_flows(true, 50);
    let pins: Vec<Pin> = flows
        .iter()
        .map(|&c| Pin {
            key: FlowKey::of(&flow(c)),
            tm: owner_id(&old, &flow(c)),
            since: 0,
            idle_ns: 0,
        })
        .collect();
    let p = plan(v2()).with_pins(pins.into(), 20);
    let set = p.pins().expect("pins");
    assert_eq!(set.len(), 20);
    assert_eq!(
        set.refused().full,
        30,
        "the overflow is counted, nothing evicted"
    );
    // Pins the table already steers right are not kept.
    let home: Vec<Pin> = client_flows(false, 5)
        .iter()
        .map(|&c| Pin {
            key: FlowKey::of(&flow(c)),
            tm: owner_id(&new, &flow(c)),
            since: 0,
            idle_ns: 0,
        })
        .collect();
    assert!(plan(v2())
        .with_pins(home.into(), 20)
        .pins()
        .is_some_and(|s| s.is_empty()));
    // The batch fast path sends pinned buckets to the general path, which pins them.
    let (_, _, slow) = p.single_endpoint_group().expect("one group");
    let slow = slow.expect("pinned buckets are slow");
    let l2 = L2::new(GROUP, CLIENT_MAC);
    let mut w = worker(64);
    let mut batch = Batch::new(64);
    let kept: Vec<(IpAddr, u16)> = flows
        .iter()
        .copied()
        .filter(|&c| {
            set.lookup(
                0,
                new.steer(&flow(c)).by.bucket().expect("bucket"),
                &flow(c),
                false,
            )
            .is_some()
        })
        .collect();
    assert_eq!(kept.len(), 20);
    for &c in &kept {
        let b = new.steer(&flow(c)).by.bucket().expect("bucket");
        assert!(slow.contains(usize::from(b)));
        batch.push(0, 1_000, &build::udp_frame(&l2, c.0, c.1, vip, 53, b"q"));
    }
    w.process_batch(&mut batch, &p, 1_000);
    for (i, &c) in kept.iter().enumerate() {
        assert_eq!(
            route_id(&p, batch.action(i)),
            Some(owner_id(&old, &flow(c))),
            "{c:?}"
        );
    }
}

#[test]
fn server_replies_in_moved_buckets_stay_with_the_old_owner() {
    let p = switched();
    let old = v1();
    let mut w = worker(64);
    let l2 = L2::new(GROUP, CLIENT_MAC);
    // A server's reply to a SNAT port in a moved bucket (back distributor):
    // the port was handed out by the old owner before the transition.
    let snat = ip("10.1.0.1");
    let mut checked = 0;
    for port in 30_000u16..40_000 {
        let f = Flow::with_ports(proto::TCP, ip("10.2.0.5"), 80, snat, port);
        if owner_id(&v1(), &f) == owner_id(&v2(), &f) {
            continue;
        }
        let frame = build::tcp_frame(
            &l2,
            ip("10.2.0.5"),
            80,
            snat,
            port,
            tcp_flags::SYN | tcp_flags::ACK,
            b"",
        );
        let (a, _) = run(&mut w, &p, &frame, 0);
        assert_eq!(route_id(&p, a), Some(owner_id(&old, &f)));
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn a_syn_sent_by_a_tm_keeps_the_servers_answers_on_that_tm() {
    let p = switched();
    let mut w = worker(64);
    // A DNAT-only connection: TM 2 opens client:port → server:80 itself.
    let server = ip("10.2.0.5");
    let c = client_flows(true, 1)[0];
    let f = Flow::with_ports(proto::TCP, c.0, c.1, server, 80);
    let sender = 2u32;
    assert_ne!(owner_id(&v1(), &f), sender, "the test wants a third TM");
    let syn = build::tcp_frame(
        &L2::new(ip_mac(), tm_mac(sender)),
        c.0,
        c.1,
        server,
        80,
        tcp_flags::SYN,
        b"",
    );
    let (a, b) = run(&mut w, &p, &syn, 3);
    assert!(matches!(a, Action::Flood | Action::Forward(_)), "{a:?}");
    assert_eq!(b, Some(Branch::FromTm));
    // The server's SYN-ACK and data come back to TM 2, not to either owner.
    for flags in [tcp_flags::SYN | tcp_flags::ACK, tcp_flags::ACK] {
        let back = build::tcp_frame(&L2::new(GROUP, ip_mac()), server, 80, c.0, c.1, flags, b"");
        let (a, b) = run(&mut w, &p, &back, 0);
        assert_eq!(route_id(&p, a), Some(sender));
        assert_eq!(b, Some(Branch::TransitionRemembered));
    }
    // An ICMP error about that flow reaches TM 2 as well.
    let offending = build::ip(
        c.0,
        server,
        proto::TCP,
        9,
        &build::tcp(c.0, c.1, server, 80, tcp_flags::ACK, 5, &[0; 40]),
    );
    let err = build::too_big(
        &L2::new(GROUP, ip_mac()),
        ip("10.9.9.9"),
        c.0,
        1280,
        &offending,
    );
    let (a, b) = run(&mut w, &p, &err, 0);
    assert_eq!(route_id(&p, a), Some(sender));
    assert_eq!(b, Some(Branch::TransitionRemembered));
}

fn ip_mac() -> MacAddr {
    MacAddr([0x02, 0x5e, 0, 0, 0, 5])
}

#[test]
fn commit_and_a_later_transition_forget_the_window() {
    let p = switched();
    let mut w = worker(64);
    let c = client_flows(true, 1)[0];
    let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
    run(&mut w, &p, &to_vip(c, tcp_flags::SYN), 0);
    let committed = p.without_previous();
    let (a, b) = run(&mut w, &committed, &to_vip(c, tcp_flags::ACK), 0);
    assert_eq!(route_id(&committed, a), Some(owner_id(&v2(), &f)));
    assert_eq!(b, Some(Branch::Endpoint));
    // Back to v1 as version 3: the flow's bucket moves again; what was
    // remembered for version 2 does not apply to version 3.
    let v3 = v1().with_version(3);
    let again = plan(v3.clone())
        .with_previous(v2())
        .expect("switch")
        .opened();
    let (a, b) = run(&mut w, &again, &to_vip(c, tcp_flags::ACK), 0);
    assert_eq!(
        route_id(&again, a),
        Some(owner_id(&v2(), &f)),
        "old owner of this window"
    );
    assert_eq!(b, Some(Branch::TransitionOld));
}

#[test]
fn a_removed_tm_keeps_its_established_flows_until_commit() {
    let t1 = v1();
    let removed = t1.remove_tm(3).expect("remove").table;
    let p = plan(removed.clone())
        .with_previous(t1.clone())
        .expect("switch")
        .opened();
    assert_eq!(p.routes(), 4, "the removed TM keeps a route");
    let mut w = worker(4096);
    let mut seen = 0;
    for port in 20_000u16..22_000 {
        let c = (ip("203.0.113.7"), port);
        let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
        if owner_id(&t1, &f) != 3 {
            continue;
        }
        seen += 1;
        let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::ACK), 0);
        assert_eq!(route_id(&p, a), Some(3), "established: still TM 3");
        assert!(matches!(a, Action::ToTm { port: 4, .. }));
        let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::SYN), 0);
        assert_eq!(
            route_id(&p, a),
            Some(owner_id(&removed, &f)),
            "new: a survivor"
        );
    }
    assert!(seen > 100);
    let committed = p.without_previous();
    assert_eq!(committed.routes(), 3);
}

#[test]
fn overflow_sends_new_flows_to_the_old_owner_where_they_stay() {
    let p = switched();
    // A tiny memory: most SYNs in moved buckets cannot be remembered.
    let mut w = worker(8);
    let flows = client_flows(true, 200);
    let mut first = Vec::new();
    for &c in &flows {
        let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::SYN), 0);
        first.push(route_id(&p, a));
    }
    assert!(w.transit_overflows() > 0);
    assert_eq!(
        w.transit_overflows() as usize + w.transit_remembered(1_000),
        flows.len()
    );
    // Whatever each SYN got, the rest of its flow gets the same.
    for (&c, tm) in flows.iter().zip(&first) {
        for flags in [tcp_flags::ACK, tcp_flags::ACK | tcp_flags::FIN] {
            let (a, _) = run(&mut w, &p, &to_vip(c, flags), 0);
            assert_eq!(route_id(&p, a), *tm, "{c:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The batch fast path steers exactly as frame-by-frame processing
    /// during a transition (moved buckets leave the fast path).
    #[test]
    fn batch_equals_per_frame_in_a_transition(
        frames in prop::collection::vec((20_000u16..60_000, 1u8..250, prop::bool::ANY), 1..96)
    ) {
        let p = switched();
        let raw: Vec<Vec<u8>> = frames
            .iter()
            .map(|&(port, host, syn)| {
                let c = (ip(&format!("203.0.113.{host}")), port);
                to_vip(c, if syn { tcp_flags::SYN } else { tcp_flags::ACK })
            })
            .collect();
        let mut one = worker(256);
        let want: Vec<(Action, Vec<u8>)> = raw
            .iter()
            .map(|f| {
                let mut b = f.clone();
                let a = one.process(&mut b, f.len(), 0, &p, 7);
                (a, b)
            })
            .collect();
        let mut many = worker(256);
        let mut batch = Batch::new(raw.len());
        for f in &raw {
            prop_assert!(batch.push(0, 0, f));
        }
        many.process_batch(&mut batch, &p, 7);
        for (i, (a, bytes)) in want.iter().enumerate() {
            prop_assert_eq!(batch.action(i), *a);
            let (_, _, buf, len) = batch.get_mut(i);
            prop_assert_eq!(&buf[..len], &bytes[..]);
        }
        prop_assert_eq!(&one.counters, &many.counters);
    }
}

#[test]
fn a_recovering_plan_drops_exactly_the_flows_its_two_tables_disagree_on() {
    let (old, new) = (v1(), v2());
    let moved = client_flows(true, 20);
    let kept = client_flows(false, 20);
    // Restarted on v1 while switched to v2; then switched again (v2 with
    // previous v1): the same flows are dropped, whichever table runs.
    for p in [
        plan(v1()).recovering(old.clone(), new.clone()),
        plan(v2())
            .with_previous(v1())
            .expect("switch")
            .carry_recovery(&plan(v1()).recovering(old.clone(), new.clone())),
    ] {
        let (_, _, n) = p.recovery().expect("recovering");
        let mut w = worker(64);
        for &c in &moved {
            let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::SYN), 0);
            assert_eq!(a, Action::Drop(datapath::Drop::Recovering), "{c:?}");
            let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::ACK), 0);
            assert_eq!(a, Action::Drop(datapath::Drop::Recovering), "{c:?}");
        }
        for &c in &kept {
            let f = Flow::with_ports(proto::TCP, c.0, c.1, ip("198.51.100.10"), 80);
            let (a, _) = run(&mut w, &p, &to_vip(c, tcp_flags::ACK), 0);
            assert_eq!(route_id(&p, a), Some(owner_id(&old, &f)), "{c:?}");
        }
        assert_eq!(w.counters.of_drop(datapath::Drop::Recovering), 40);
        // The batch fast path leaves those buckets to the general path.
        let (_, _, slow) = p.single_endpoint_group().expect("one group");
        let slow = slow.expect("recovering buckets are slow");
        assert!(slow.len() >= n.expect("comparable"));
        let l2 = L2::new(GROUP, CLIENT_MAC);
        let mut batch = Batch::new(64);
        for &c in moved.iter().chain(&kept) {
            batch.push(
                0,
                1_000,
                &build::tcp_frame(&l2, c.0, c.1, ip("198.51.100.10"), 80, tcp_flags::ACK, b"x"),
            );
        }
        w.process_batch(&mut batch, &p, 1_000);
        for i in 0..moved.len() {
            assert_eq!(batch.action(i), Action::Drop(datapath::Drop::Recovering));
        }
        for i in moved.len()..moved.len() + kept.len() {
            assert!(matches!(batch.action(i), Action::ToTm { .. }), "{i}");
        }
        // Recovered: steered again.
        let p = p.recovered();
        assert!(p.recovery().is_none());
        let (a, _) = run(&mut w, &p, &to_vip(moved[0], tcp_flags::SYN), 0);
        assert!(matches!(a, Action::ToTm { .. }), "{a:?}");
    }
}

#[test]
fn an_icmp_error_about_a_pinned_flow_goes_to_the_pins_tm_and_the_tables() {
    // A pin can outlive its flow on a distributor its packets do not pass
    // (a SYN reopened the endpoint elsewhere): an ICMP error, which routers
    // send through any distributor, goes to both TMs that may have the flow.
    let (old, new) = (v1(), v2());
    let l2 = L2::new(GROUP, CLIENT_MAC);
    let vip = ip("198.51.100.10");
    let c = client_flows(true, 1)[0];
    let flow = Flow::with_ports(proto::TCP, c.0, c.1, vip, 80);
    let pins: Vec<Pin> = vec![Pin {
        key: FlowKey::of(&flow),
        tm: owner_id(&old, &flow),
        since: 0,
        idle_ns: 0,
    }];
    let pinned = plan(v2()).with_pins(pins.into(), 16);
    let bare = plan(v2());
    // The server's answer (VIP → client) a router could not forward.
    let answer = build::tcp_frame(&l2, vip, 80, c.0, c.1, tcp_flags::ACK, &[0; 64]);
    let error = build::too_big(&l2, ip("203.0.113.254"), vip, 1280, &answer[14..]);
    let mut w = worker(64);
    let (a, b) = run(&mut w, &pinned, &error, 0);
    let Action::ToTmAndCopy { tm, also, .. } = a else {
        panic!("{a:?} ({b:?})")
    };
    assert_eq!(
        (pinned.tm_id(tm), pinned.tm_id(also)),
        (Some(owner_id(&new, &flow)), Some(owner_id(&old, &flow)))
    );
    // The flow's own packets still follow the pin alone; with no pin, the
    // error follows the table alone.
    let (a, b) = run(&mut w, &pinned, &to_vip(c, tcp_flags::ACK), 0);
    assert_eq!(
        (route_id(&pinned, a), b),
        (Some(owner_id(&old, &flow)), Some(Branch::Pinned))
    );
    let (a, _) = run(&mut w, &bare, &error, 0);
    assert_eq!(route_id(&bare, a), Some(owner_id(&new, &flow)));
}
