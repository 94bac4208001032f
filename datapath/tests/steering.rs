//! Every branch of the steering rule on literal frames (IPv4 and IPv6, tagged and untagged), asserting the exact output bytes, plus properties.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, HashKey, MacAddr, PortRange, SelfPorts, TmIndex};
use datapath::build::{self, tcp_flags, L2};
use datapath::steer::REPLY_ND_BYTES;
use datapath::wire::ethertype;
use datapath::{
    apply, classify, decide, Action, Branch, Drop, Plan, PortKind, Rewrite, Verdict, Worker,
    WorkerConfig,
};
use proptest::prelude::*;

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0xc1, 0, 0, 0, 1]);
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 1]);
const OTHER_MAC: MacAddr = MacAddr([0x02, 0xb0, 0, 0, 0, 9]);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

fn vip() -> IpAddr {
    ip("198.51.100.10")
}
fn snat() -> IpAddr {
    ip("10.1.0.1")
}
fn vip6() -> IpAddr {
    ip("2001:db8::10")
}
fn snat6() -> IpAddr {
    ip("2001:db8:1::1")
}

fn table() -> AllocationTable {
    testkit::uniform(4)
}

/// Port 0 outside, ports 1–4 one TM each, port 5 bridged.
fn plan() -> Plan {
    let ports = vec![
        PortKind::Outside,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Bridged,
    ];
    Plan::new(
        table(),
        GROUP,
        &[vip(), snat(), vip6(), snat6()],
        ports,
        &[(0, 1), (1, 2), (2, 3), (3, 4)],
    )
    .expect("plan")
}

fn worker() -> Worker {
    Worker::new(WorkerConfig::default(), HashKey::from_bytes([9; 16]))
}

/// Runs one frame through a worker; returns the action and the output bytes.
fn run(w: &mut Worker, plan: &Plan, frame: &[u8], ingress: u16, now: u64) -> (Action, Vec<u8>) {
    let mut buf = frame.to_vec();
    buf.resize(frame.len() + 128, 0);
    let a = w.process(&mut buf, frame.len(), ingress, plan, now);
    let len = match a {
        Action::Reply { len } => len,
        _ => frame.len(),
    };
    buf.truncate(len);
    (a, buf)
}

fn tm_mac(t: TmIndex) -> MacAddr {
    MacAddr([0x02, 0x53, 0x54, 0, 0, t as u8 + 1])
}

fn expect_tm(plan: &Plan, flow: &Flow) -> TmIndex {
    plan.table().steer(flow).tm
}

/// The input frame with only the destination MAC changed.
fn with_dst(frame: &[u8], mac: MacAddr) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&mac.0);
    f
}

#[test]
fn tcp_to_the_vip_goes_to_the_hashed_tm_with_only_the_dst_mac_rewritten() {
    let p = plan();
    for l2 in [
        L2::new(GROUP, ROUTER_MAC),
        L2::new(GROUP, ROUTER_MAC).tagged(ethertype::VLAN, 100),
        L2::new(GROUP, ROUTER_MAC)
            .tagged(ethertype::QINQ, 7)
            .tagged(ethertype::VLAN, 100),
    ] {
        for (client, server) in [(ip("203.0.113.7"), vip()), (ip("2001:db8:ff::7"), vip6())] {
            let f = build::tcp_frame(&l2, client, 6900, server, 443, tcp_flags::SYN, b"");
            let (a, out) = run(&mut worker(), &p, &f, 0, 0);
            let tm = expect_tm(&p, &Flow::with_ports(proto::TCP, client, 6900, server, 443));
            assert_eq!(
                a,
                Action::ToTm { tm, port: tm + 1 },
                "{client} tags {:?}",
                l2.tags
            );
            assert_eq!(
                out,
                with_dst(&f, tm_mac(tm)),
                "only the destination MAC changes; tags kept"
            );
        }
    }
}

#[test]
fn a_servers_reply_to_a_self_source_port_reaches_the_tm_that_chose_it() {
    let p = plan();
    for tm in 0..4u16 {
        for snat_addr in [snat(), snat6()] {
            let ports = SelfPorts::build(
                p.table(),
                snat_addr,
                tm,
                PortRange {
                    lo: 1024,
                    hi: 65535,
                },
            )
            .expect("ports");
            let server = if snat_addr.is_ipv4() {
                ip("192.0.2.80")
            } else {
                ip("2001:db8:2::80")
            };
            for port in ports.iter().step_by(997).take(5) {
                let f = build::tcp_frame(
                    &L2::new(GROUP, ROUTER_MAC),
                    server,
                    80,
                    snat_addr,
                    port,
                    tcp_flags::ACK,
                    b"reply",
                );
                let (a, out) = run(&mut worker(), &p, &f, 0, 0);
                assert_eq!(a, Action::ToTm { tm, port: tm + 1 });
                assert_eq!(out, with_dst(&f, tm_mac(tm)));
            }
        }
    }
}

#[test]
fn equal_ports_and_portless_protocols() {
    let p = plan();
    let mut w = worker();
    let f = build::udp_frame(
        &L2::new(GROUP, ROUTER_MAC),
        ip("203.0.113.7"),
        500,
        vip(),
        500,
        b"ike",
    );
    let ep = p.table().groups()[0].equal_ports_tm;
    assert_eq!(
        run(&mut w, &p, &f, 0, 0).0,
        Action::ToTm {
            tm: ep,
            port: ep + 1
        }
    );
    assert_eq!(w.counters.of_branch(Branch::EqualPorts), 1);
    let echo = build::icmpv4(8, 0, [0, 1, 0, 1], b"ping");
    let f = build::frame(
        &L2::new(GROUP, ROUTER_MAC),
        &build::ip(ip("203.0.113.7"), vip(), proto::ICMP, 3, &echo),
    );
    let tm = expect_tm(
        &p,
        &Flow::without_ports(proto::ICMP, ip("203.0.113.7"), vip()),
    );
    assert_eq!(
        run(&mut w, &p, &f, 0, 0).0,
        Action::ToTm { tm, port: tm + 1 }
    );
    assert_eq!(w.counters.of_branch(Branch::NoPorts), 1);
}

#[test]
fn icmp_errors_follow_the_flow_they_are_about() {
    let p = plan();
    for (snat_addr, server, router) in [
        (snat(), ip("192.0.2.80"), ip("192.0.2.254")),
        (snat6(), ip("2001:db8:2::80"), ip("2001:db8:2::fe")),
    ] {
        for tm in 0..4u16 {
            let ports = SelfPorts::build(
                p.table(),
                snat_addr,
                tm,
                PortRange {
                    lo: 1024,
                    hi: 65535,
                },
            )
            .expect("ports");
            let sport = ports.iter().nth(100).expect("port");
            // The TM sent a big segment to the server; a router says it is too big.
            let offending = build::ip(
                snat_addr,
                server,
                proto::TCP,
                77,
                &build::tcp(
                    snat_addr,
                    sport,
                    server,
                    80,
                    tcp_flags::ACK,
                    9,
                    &[0u8; 1400],
                ),
            );
            let f = build::too_big(
                &L2::new(GROUP, ROUTER_MAC),
                router,
                snat_addr,
                1280,
                &offending,
            );
            let mut w = worker();
            let (a, out) = run(&mut w, &p, &f, 0, 0);
            assert_eq!(a, Action::ToTm { tm, port: tm + 1 }, "{snat_addr}");
            assert_eq!(out, with_dst(&f, tm_mac(tm)));
            assert_eq!(w.counters.of_branch(Branch::IcmpError), 1);
        }
    }
    // An error whose embedded datagram is cut before the ports cannot be steered safely.
    let offending = build::ip(
        snat(),
        ip("192.0.2.80"),
        proto::TCP,
        77,
        &build::tcp(snat(), 40000, ip("192.0.2.80"), 80, 0, 0, b""),
    );
    let m = build::icmpv4(3, 4, [0, 0, 5, 0], &offending[..22]);
    let f = build::frame(
        &L2::new(GROUP, ROUTER_MAC),
        &build::ip(ip("192.0.2.254"), snat(), proto::ICMP, 1, &m),
    );
    let mut w = worker();
    assert_eq!(
        run(&mut w, &p, &f, 0, 0).0,
        Action::Drop(Drop::IcmpInnerTruncated)
    );
    assert_eq!(w.counters.of_drop(Drop::IcmpInnerTruncated), 1);
}

fn fragments(v6: bool) -> (Vec<Vec<u8>>, TmIndex) {
    let (c, s) = if v6 {
        (ip("2001:db8:ff::7"), vip6())
    } else {
        (ip("203.0.113.7"), vip())
    };
    let dgram = build::udp(c, 5353, s, 53, &[7u8; 3000]);
    let packet = build::ip(c, s, proto::UDP, 0x4242, &dgram);
    let parts = if v6 {
        build::fragment_v6(&packet, 0x4242, 1200)
    } else {
        build::fragment_v4(&packet, 1200)
    };
    let l2 = L2::new(GROUP, ROUTER_MAC);
    let tm = plan()
        .table()
        .steer(&Flow::with_ports(proto::UDP, c, 5353, s, 53))
        .tm;
    (parts.iter().map(|p| build::frame(&l2, p)).collect(), tm)
}

#[test]
fn fragments_follow_the_first_in_order_and_out_of_order() {
    let p = plan();
    for v6 in [false, true] {
        let (frags, tm) = fragments(v6);
        assert_eq!(frags.len(), 3);
        // In order: every fragment to the first's TM.
        let mut w = worker();
        for f in &frags {
            let (a, out) = run(&mut w, &p, f, 0, 10);
            assert_eq!(a, Action::ToTm { tm, port: tm + 1 });
            assert_eq!(out, with_dst(f, tm_mac(tm)));
        }
        // Last fragments first: held, then released in arrival order with the first.
        let mut w = worker();
        assert_eq!(run(&mut w, &p, &frags[2], 0, 10).0, Action::Held);
        assert_eq!(run(&mut w, &p, &frags[1], 0, 11).0, Action::Held);
        assert_eq!(w.fragments_held(), 2);
        assert_eq!(
            run(&mut w, &p, &frags[0], 0, 12).0,
            Action::ToTm { tm, port: tm + 1 }
        );
        let mut released = Vec::new();
        w.drain_released(&p, |frame, a| released.push((a, frame.to_vec())));
        assert_eq!(
            released,
            vec![
                (
                    Action::ToTm { tm, port: tm + 1 },
                    with_dst(&frags[2], tm_mac(tm))
                ),
                (
                    Action::ToTm { tm, port: tm + 1 },
                    with_dst(&frags[1], tm_mac(tm))
                ),
            ]
        );
        assert_eq!(w.fragments_held(), 0);
        // A fragment whose first never comes is dropped when its time is up, and counted.
        let mut w = worker();
        assert_eq!(run(&mut w, &p, &frags[1], 0, 0).0, Action::Held);
        w.tick(WorkerConfig::default().frag.hold_ttl_ns + 1);
        assert_eq!(w.counters.of_drop(Drop::FragmentTimeout), 1);
        assert_eq!(w.fragments_held(), 0);
    }
}

#[test]
fn a_full_hold_pool_reclaims_timed_out_fragments_and_counts_them() {
    let p = plan();
    let mut cfg = WorkerConfig::default();
    cfg.frag.hold_slots = 1;
    let ttl = cfg.frag.hold_ttl_ns;
    let mut w = Worker::new(cfg, HashKey::from_bytes([1; 16]));
    let late = |id: u16| {
        let pkt = build::ipv4(
            Ipv4Addr::new(203, 0, 113, 7),
            Ipv4Addr::new(198, 51, 100, 10),
            proto::UDP,
            id,
            (100, false),
            &[],
            &[0; 64],
        );
        build::frame(&L2::new(GROUP, ROUTER_MAC), &pkt)
    };
    assert_eq!(run(&mut w, &p, &late(1), 0, 0).0, Action::Held);
    // No tick in between: the expired fragment's slot is reclaimed, and its drop counted.
    assert_eq!(run(&mut w, &p, &late(2), 0, ttl + 1).0, Action::Held);
    assert_eq!(w.counters.of_drop(Drop::FragmentTimeout), 1);
    assert_eq!(w.fragments_held(), 1);
}

#[test]
fn the_hold_pool_is_bounded() {
    let p = plan();
    let mut cfg = WorkerConfig::default();
    cfg.frag.hold_slots = 2;
    let mut w = Worker::new(cfg, HashKey::from_bytes([1; 16]));
    for id in 0..3u16 {
        let pkt = build::ipv4(
            Ipv4Addr::new(203, 0, 113, 7),
            Ipv4Addr::new(198, 51, 100, 10),
            proto::UDP,
            id,
            (100, false),
            &[],
            &[0; 64],
        );
        let (a, _) = run(
            &mut w,
            &p,
            &build::frame(&L2::new(GROUP, ROUTER_MAC), &pkt),
            0,
            0,
        );
        assert_eq!(
            a,
            if id < 2 {
                Action::Held
            } else {
                Action::Drop(Drop::FragmentHoldFull)
            }
        );
    }
}

#[test]
fn arp_for_cluster_addresses_is_answered_with_the_group_mac() {
    let p = plan();
    let mut w = worker();
    let client = Ipv4Addr::new(198, 51, 100, 1);
    let req = build::arp(
        &L2::new(MacAddr([0xff; 6]), ROUTER_MAC),
        1,
        ROUTER_MAC,
        client,
        MacAddr::default(),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    let (a, out) = run(&mut w, &p, &req, 0, 0);
    assert_eq!(a, Action::Reply { len: req.len() });
    let want = build::arp(
        &L2::new(ROUTER_MAC, GROUP),
        2,
        GROUP,
        Ipv4Addr::new(198, 51, 100, 10),
        ROUTER_MAC,
        client,
    );
    assert_eq!(out, want);
    // Not a cluster address: bridged like a switch (flooded, nothing learned for the target).
    let other = build::arp(
        &L2::new(MacAddr([0xff; 6]), ROUTER_MAC),
        1,
        ROUTER_MAC,
        client,
        MacAddr::default(),
        Ipv4Addr::new(198, 51, 100, 99),
    );
    assert_eq!(run(&mut w, &p, &other, 0, 0).0, Action::Flood);
    // A server's answer to a TM's question about it: every TM gets it.
    let reply = build::arp(
        &L2::new(GROUP, OTHER_MAC),
        2,
        OTHER_MAC,
        Ipv4Addr::new(192, 0, 2, 80),
        GROUP,
        Ipv4Addr::new(10, 1, 0, 1),
    );
    assert_eq!(run(&mut w, &p, &reply, 0, 0).0, Action::ToAllTms);
}

#[test]
fn a_tms_arp_for_a_cluster_address_leaves_with_the_group_mac() {
    let p = plan();
    let mut w = worker();
    let tm2 = tm_mac(2);
    let req = build::arp(
        &L2::new(MacAddr([0xff; 6]), tm2),
        1,
        tm2,
        Ipv4Addr::new(10, 1, 0, 1),
        MacAddr::default(),
        Ipv4Addr::new(192, 0, 2, 80),
    );
    let (a, out) = run(&mut w, &p, &req, 3, 0);
    assert_eq!(a, Action::Flood);
    let want = build::arp(
        &L2::new(MacAddr([0xff; 6]), GROUP),
        1,
        GROUP,
        Ipv4Addr::new(10, 1, 0, 1),
        MacAddr::default(),
        Ipv4Addr::new(192, 0, 2, 80),
    );
    assert_eq!(out, want);
    assert_eq!(w.counters.of_branch(Branch::FromTmRewritten), 1);
    // ARP about the TM's own (non-cluster) address is left alone.
    let own = build::arp(
        &L2::new(MacAddr([0xff; 6]), tm2),
        1,
        tm2,
        Ipv4Addr::new(172, 16, 0, 3),
        MacAddr::default(),
        Ipv4Addr::new(192, 0, 2, 80),
    );
    assert_eq!(run(&mut w, &p, &own, 3, 0).1, own);
}

#[test]
fn neighbour_discovery_for_cluster_addresses() {
    let p = plan();
    let mut w = worker();
    let solicitor: Ipv6Addr = "2001:db8::1".parse().expect("addr");
    let IpAddr::V6(target) = vip6() else {
        unreachable!()
    };
    let ns = build::neighbour_solicitation(ROUTER_MAC, solicitor, target, Some(ROUTER_MAC));
    let (a, out) = run(&mut w, &p, &ns, 0, 0);
    let want = build::neighbour_advertisement(
        &L2::new(ROUTER_MAC, GROUP),
        target,
        solicitor,
        target,
        GROUP,
    );
    assert_eq!(a, Action::Reply { len: want.len() });
    assert_eq!(out, want);
    // Without a source link-layer option, the answer goes to the frame's source MAC.
    let ns = build::neighbour_solicitation(ROUTER_MAC, solicitor, target, None);
    let (_, out) = run(&mut w, &p, &ns, 0, 0);
    assert_eq!(out, want);
    // A TM's solicitation from the SNAT address carries the group MAC out.
    let IpAddr::V6(snat_v6) = snat6() else {
        unreachable!()
    };
    let server: Ipv6Addr = "2001:db8:2::80".parse().expect("addr");
    let from_tm = build::neighbour_solicitation(tm_mac(1), snat_v6, server, Some(tm_mac(1)));
    let (a, out) = run(&mut w, &p, &from_tm, 2, 0);
    assert_eq!(a, Action::Flood);
    let mut want = build::neighbour_solicitation(GROUP, snat_v6, server, Some(GROUP));
    want[..6].copy_from_slice(&from_tm[..6]);
    assert_eq!(
        out, want,
        "option and Ethernet source rewritten, checksum valid"
    );
    // The server's advertisement in answer goes to every TM.
    let na = build::neighbour_advertisement(
        &L2::new(GROUP, OTHER_MAC),
        server,
        snat_v6,
        server,
        OTHER_MAC,
    );
    assert_eq!(run(&mut w, &p, &na, 0, 0).0, Action::ToAllTms);
}

/// The rule is a pure classification (what to do and what to write,
/// nothing written) and a separate step that writes it: classifying leaves
/// the frame as it was, applying makes exactly the bytes `decide` makes, a
/// reply with no room in the buffer is a counted drop, and a decision
/// applied to a frame it was not made for is refused, never written out
/// of bounds.
#[test]
fn classification_writes_nothing_and_apply_does_what_it_says() {
    let p = plan();
    let solicitor: Ipv6Addr = "2001:db8::1".parse().expect("addr");
    let IpAddr::V6(target) = vip6() else {
        unreachable!()
    };
    let ns = build::neighbour_solicitation(ROUTER_MAC, solicitor, target, None);
    let d = classify(&ns, 0, &p);
    assert_eq!(
        d.rewrite,
        Rewrite::NdAdvert {
            l3: 14,
            to: ROUTER_MAC
        }
    );
    let Verdict::Reply { len, branch } = d.verdict else {
        panic!("not a reply: {d:?}")
    };
    assert_eq!((len, branch), (14 + REPLY_ND_BYTES, Branch::NdReply));
    assert!(
        len > ns.len(),
        "the advertisement is longer than the solicitation"
    );
    // Room for it: the same bytes as decide's.
    let mut applied = ns.clone();
    applied.resize(len, 0);
    assert_eq!(apply(&mut applied, ns.len(), &d, GROUP), d.verdict);
    let mut decided = ns.clone();
    decided.resize(len, 0);
    assert_eq!(decide(&mut decided, ns.len(), 0, &p), d.verdict);
    assert_eq!(applied, decided);
    // No room: dropped, the frame untouched; the worker counts it.
    let mut exact = ns.clone();
    assert_eq!(
        decide(&mut exact, ns.len(), 0, &p),
        Verdict::Drop(Drop::NoRoomForReply)
    );
    assert_eq!(exact, ns);
    let mut w = worker();
    let mut exact = ns.clone();
    assert_eq!(
        w.process(&mut exact, ns.len(), 0, &p, 0),
        Action::Drop(Drop::NoRoomForReply)
    );
    assert_eq!(w.counters.of_drop(Drop::NoRoomForReply), 1);
    // An ARP reply for a cluster address, applied to a 20-byte frame it was
    // not classified from: refused as truncated.
    let req = build::arp(
        &L2::new(MacAddr([0xff; 6]), ROUTER_MAC),
        1,
        ROUTER_MAC,
        Ipv4Addr::new(198, 51, 100, 1),
        MacAddr::default(),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    let d = classify(&req, 0, &p);
    assert_eq!(d.rewrite, Rewrite::ArpReply { l3: 14 });
    let mut short = req[..20].to_vec();
    assert_eq!(
        apply(&mut short, 20, &d, GROUP),
        Verdict::Drop(Drop::Truncated)
    );
    assert_eq!(short, req[..20]);
}

#[test]
fn frames_not_for_the_group_are_bridged_with_learning() {
    let p = plan();
    let mut w = worker();
    // A host behind the bridged port speaks first: it is learned there.
    let hello = build::udp_frame(
        &L2::new(CLIENT_MAC, OTHER_MAC),
        ip("192.0.2.9"),
        9,
        ip("192.0.2.8"),
        9,
        b"x",
    );
    assert_eq!(run(&mut w, &p, &hello, 5, 0).0, Action::Flood);
    let to_other = build::udp_frame(
        &L2::new(OTHER_MAC, CLIENT_MAC),
        ip("192.0.2.8"),
        9,
        ip("192.0.2.9"),
        9,
        b"y",
    );
    let (a, out) = run(&mut w, &p, &to_other, 0, 1);
    assert_eq!(a, Action::Forward(5));
    assert_eq!(out, to_other, "bridged frames are not changed");
    // A frame for a host on the port it came in on is filtered, as a switch does.
    let neighbour = MacAddr([0x02, 0xb0, 0, 0, 0, 10]);
    let local = build::udp_frame(
        &L2::new(OTHER_MAC, neighbour),
        ip("192.0.2.10"),
        9,
        ip("192.0.2.9"),
        9,
        b"z",
    );
    assert_eq!(run(&mut w, &p, &local, 5, 2).0, Action::Drop(Drop::Hairpin));
    // A TM's frame toward a client is forwarded unhashed, its source MAC the group's.
    let from_tm = build::tcp_frame(
        &L2::new(CLIENT_MAC, tm_mac(0)),
        vip(),
        443,
        ip("203.0.113.7"),
        6900,
        tcp_flags::ACK,
        b"data",
    );
    let (a, out) = run(&mut w, &p, &from_tm, 1, 3);
    assert_eq!(a, Action::Forward(0));
    let mut want = from_tm.clone();
    want[6..12].copy_from_slice(&GROUP.0);
    assert_eq!(out, want);
    assert_eq!(w.bridge_size(), 4, "other, client, neighbour, TM 0");
}

#[test]
fn bad_frames_are_counted_drops() {
    let p = plan();
    let mut w = worker();
    let good = build::tcp_frame(
        &L2::new(GROUP, ROUTER_MAC),
        ip("203.0.113.7"),
        6900,
        vip(),
        443,
        tcp_flags::SYN,
        b"",
    );
    assert_eq!(
        run(&mut w, &p, &good[..10], 0, 0).0,
        Action::Drop(Drop::Truncated)
    );
    assert_eq!(
        run(&mut w, &p, &good[..40], 0, 0).0,
        Action::Drop(Drop::Truncated)
    );
    let mut bad = good.clone();
    bad[14] = 0x43; // IHL 3
    assert_eq!(run(&mut w, &p, &bad, 0, 0).0, Action::Drop(Drop::Malformed));
    let tags3 = build::tcp_frame(
        &L2::new(GROUP, ROUTER_MAC)
            .tagged(ethertype::QINQ, 1)
            .tagged(ethertype::VLAN, 2)
            .tagged(ethertype::VLAN, 3),
        ip("203.0.113.7"),
        6900,
        vip(),
        443,
        tcp_flags::SYN,
        b"",
    );
    assert_eq!(
        run(&mut w, &p, &tags3, 0, 0).0,
        Action::Drop(Drop::TooManyTags)
    );
    assert_eq!(w.counters.of_drop(Drop::Truncated), 2);
    // A TM without a port: its traffic is dropped and counted, never sent elsewhere.
    let ports = vec![PortKind::Outside, PortKind::Tm];
    let partial = Plan::new(table(), GROUP, &[vip()], ports, &[(0, 1)]).expect("plan");
    let mut sent = 0;
    for sport in 1024..1224u16 {
        let f = build::tcp_frame(
            &L2::new(GROUP, ROUTER_MAC),
            ip("203.0.113.7"),
            sport,
            vip(),
            443,
            tcp_flags::SYN,
            b"",
        );
        match run(&mut w, &partial, &f, 0, 0).0 {
            Action::ToTm { tm: 0, port: 1 } => sent += 1,
            Action::Drop(Drop::NoTmPort) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(sent > 20 && w.counters.of_drop(Drop::NoTmPort) > 100);
}

fn any_endpoint() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|a| IpAddr::V4(a.into())),
        any::<[u8; 16]>().prop_map(|a| IpAddr::V6(a.into()))
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A packet and its reply (endpoints swapped), both addressed to the
    /// group, steer to the same TM — any addresses, any ports, TCP or UDP.
    #[test]
    fn a_packet_and_its_reply_meet_one_tm(a in any_endpoint(), pa in any::<u16>(), pb in any::<u16>(), udp in any::<bool>(), v6 in any::<bool>()) {
        let p = plan();
        let b = if v6 { vip6() } else { vip() };
        let a = match (a, v6) {
            (IpAddr::V4(x), true) => IpAddr::V6(x.to_ipv6_mapped()),
            (IpAddr::V6(x), false) => IpAddr::V4(Ipv4Addr::from(u128::from(x) as u32)),
            (x, _) => x,
        };
        let l2 = L2::new(GROUP, ROUTER_MAC);
        let (there, back) = if udp {
            (build::udp_frame(&l2, a, pa, b, pb, b"q"), build::udp_frame(&l2, b, pb, a, pa, b"r"))
        } else {
            (build::tcp_frame(&l2, a, pa, b, pb, tcp_flags::SYN, b""), build::tcp_frame(&l2, b, pb, a, pa, tcp_flags::SYN | tcp_flags::ACK, b""))
        };
        let mut w = worker();
        let (x, _) = run(&mut w, &p, &there, 0, 0);
        let (y, _) = run(&mut w, &p, &back, 0, 0);
        prop_assert!(matches!(x, Action::ToTm { .. }), "{:?}", x);
        prop_assert_eq!(x, y);
    }

    /// An ICMP error about a flow (from either end) reaches that flow's TM.
    #[test]
    fn icmp_errors_reach_the_flows_tm(client in any::<[u8; 4]>(), cport in 1024u16.., sport in 1u16..1024, from_client in any::<bool>()) {
        let p = plan();
        let c = IpAddr::V4(client.into());
        let flow_tm = p.table().steer(&Flow::with_ports(proto::TCP, c, cport, vip(), sport)).tm;
        // The TM's own packet toward the client, bounced by a router on the way.
        let offending = if from_client {
            build::ip(c, vip(), proto::TCP, 1, &build::tcp(c, cport, vip(), sport, tcp_flags::ACK, 1, &[0; 100]))
        } else {
            build::ip(vip(), c, proto::TCP, 1, &build::tcp(vip(), sport, c, cport, tcp_flags::ACK, 1, &[0; 100]))
        };
        let f = build::too_big(&L2::new(GROUP, ROUTER_MAC), ip("198.51.100.254"), vip(), 576, &offending);
        let (a, _) = run(&mut worker(), &p, &f, 0, 0);
        prop_assert_eq!(a, Action::ToTm { tm: flow_tm, port: flow_tm + 1 });
    }

    /// The fragments of one datagram, in any order, all reach one TM — the
    /// whole datagram's — and none is lost.
    #[test]
    fn fragments_in_any_order_stay_together(order in Just(vec![0usize, 1, 2]).prop_shuffle(), v6 in any::<bool>()) {
        let p = plan();
        let (frags, tm) = fragments(v6);
        let mut w = worker();
        let mut delivered = Vec::new();
        for (t, &i) in order.iter().enumerate() {
            let (a, out) = run(&mut w, &p, &frags[i], 0, t as u64);
            match a {
                Action::ToTm { tm: got, .. } => delivered.push((got, out)),
                Action::Held => {}
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            w.drain_released(&p, |frame, a| {
                if let Action::ToTm { tm: got, .. } = a {
                    delivered.push((got, frame.to_vec()));
                }
            });
        }
        prop_assert_eq!(delivered.len(), 3);
        for (got, out) in &delivered {
            prop_assert_eq!(*got, tm);
            prop_assert!(frags.iter().any(|f| with_dst(f, tm_mac(tm)) == *out));
        }
    }

    /// Arbitrary bytes, on any port, never panic and always yield an action.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), port in 0u16..8, group_dst in any::<bool>()) {
        let p = plan();
        let mut frame = bytes;
        if group_dst && frame.len() >= 6 {
            frame[..6].copy_from_slice(&GROUP.0);
        }
        let mut w = worker();
        let _ = run(&mut w, &p, &frame, port, 0);
        w.drain_released(&p, |_, _| {});
        w.tick(u64::MAX);
    }

    /// Valid headers around garbage: truncations of real frames never panic.
    #[test]
    fn truncated_real_frames_never_panic(cut in 0usize..200, kind in 0u8..6) {
        let p = plan();
        let l2 = L2::new(GROUP, ROUTER_MAC).tagged(ethertype::VLAN, 5);
        let f = match kind {
            0 => build::tcp_frame(&l2, ip("203.0.113.7"), 5, vip(), 6, 0, b"abc"),
            1 => build::udp_frame(&l2, ip("2001:db8:ff::7"), 5, vip6(), 6, b"abc"),
            2 => fragments(true).0[1].clone(),
            3 => build::too_big(&l2, ip("192.0.2.254"), snat(), 1280, &build::ip(snat(), ip("192.0.2.80"), proto::TCP, 1, &build::tcp(snat(), 40000, ip("192.0.2.80"), 80, 0, 0, b""))),
            4 => build::neighbour_solicitation(ROUTER_MAC, "2001:db8::1".parse().expect("addr"), "2001:db8::10".parse().expect("addr"), Some(ROUTER_MAC)),
            _ => build::arp(&l2, 1, ROUTER_MAC, Ipv4Addr::new(1, 2, 3, 4), MacAddr::default(), Ipv4Addr::new(198, 51, 100, 10)),
        };
        let cut = cut.min(f.len());
        for port in [0, 1, 5] {
            let _ = run(&mut worker(), &p, &f[..cut], port, 0);
        }
    }
}
