//! `Worker::process_batch` must equal `Worker::process` frame by frame: same actions, same bytes, same counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use allocation::rules::{proto, Protocol, Rule};
use allocation::{AllocationTable, GroupSpec, HashKey, HashMode, MacAddr, Profile, Tm};
use datapath::build::{self, tcp_flags, L2};
use datapath::wire::ethertype;
use datapath::Batch;
use datapath::{Plan, PortKind, Worker, WorkerConfig};
use proptest::prelude::*;

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const ROUTER: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 1]);

fn plan(two_groups: bool) -> Plan {
    let tms: Vec<Tm> = (0..4)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1,
            group: usize::from(two_groups && i == 3),
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    let mut groups = vec![GroupSpec::default_group(Profile::Uniform)];
    if two_groups {
        groups.push(GroupSpec {
            name: "dns".into(),
            rules: vec![Rule {
                protocol: Some(Protocol(proto::UDP)),
                ports: Some("53".parse().expect("range")),
                prefix: None,
            }],
            hash: HashMode::Endpoint,
            profile: Profile::Uniform,
        });
    }
    let t = AllocationTable::new(1, key, tms, groups).expect("table");
    let ports = vec![
        PortKind::Outside,
        PortKind::Tm,
        PortKind::Tm,
        PortKind::Bridged,
    ];
    let cluster: Vec<IpAddr> = vec![
        "198.51.100.10".parse().expect("addr"),
        "2001:db8::10".parse().expect("addr"),
    ];
    Plan::new(t, GROUP, &cluster, ports, &[(0, 1), (1, 1), (2, 2), (3, 2)]).expect("plan")
}

/// A frame of kind `k` with parameters `x`.
fn frame(k: u8, x: u32) -> (u16, Vec<u8>) {
    let l2 = L2::new(GROUP, ROUTER);
    let c4 = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 | (x & 0xff)));
    let c6 = IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0xff,
        0,
        0,
        0,
        0,
        (x & 0xffff) as u16,
    ));
    let p = (x >> 8) as u16;
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let vip6: IpAddr = "2001:db8::10".parse().expect("addr");
    match k % 12 {
        0 => (
            0,
            build::tcp_frame(&l2, c4, p, vip, 443, tcp_flags::SYN, b""),
        ),
        1 => (0, build::udp_frame(&l2, c4, p, vip, 53, b"q")),
        2 => (
            0,
            build::tcp_frame(&l2, c6, p, vip6, 443, tcp_flags::ACK, b"data"),
        ),
        3 => (
            0,
            build::tcp_frame(
                &l2.clone().tagged(ethertype::VLAN, 7),
                c4,
                p,
                vip,
                8080,
                0,
                b"",
            ),
        ),
        4 => (0, build::udp_frame(&l2, c4, 500, vip, 500, b"equal")),
        5 => {
            let pkt = build::ip(
                c4,
                vip,
                proto::UDP,
                (x & 0xffff) as u16,
                &build::udp(c4, p, vip, 53, &[1; 2000]),
            );
            let parts = build::fragment_v4(&pkt, 1000);
            (0, build::frame(&l2, &parts[(x as usize) % parts.len()]))
        }
        6 => (
            0,
            build::arp(
                &L2::new(MacAddr([0xff; 6]), ROUTER),
                1,
                ROUTER,
                [198, 51, 100, 1].into(),
                MacAddr::default(),
                [198, 51, 100, 10].into(),
            ),
        ),
        7 => (
            0,
            build::tcp_frame(
                &L2::new(MacAddr([2, 0, 0, 0, 0, 9]), ROUTER),
                c4,
                p,
                vip,
                443,
                0,
                b"not for the group",
            ),
        ),
        8 => (
            1,
            build::tcp_frame(
                &L2::new(ROUTER, MacAddr([2, 0x53, 0x54, 0, 0, 1])),
                vip,
                443,
                c4,
                p,
                tcp_flags::ACK,
                b"from a TM",
            ),
        ),
        9 => (
            3,
            build::udp_frame(
                &L2::new(ROUTER, MacAddr([2, 0xb0, 0, 0, 0, 1])),
                c4,
                p,
                c4,
                9,
                b"bridged",
            ),
        ),
        10 => {
            let off = build::ip(
                vip,
                c4,
                proto::TCP,
                1,
                &build::tcp(vip, 443, c4, p, tcp_flags::ACK, 1, &[0; 64]),
            );
            (
                0,
                build::too_big(
                    &l2,
                    "198.51.100.254".parse().expect("addr"),
                    vip,
                    1280,
                    &off,
                ),
            )
        }
        _ => {
            let f = build::tcp_frame(&l2, c4, p, vip, 443, 0, b"");
            (0, f[..(x as usize % f.len())].to_vec())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn batch_and_sequential_processing_agree(kinds in prop::collection::vec((any::<u8>(), any::<u32>()), 1..100), two_groups in any::<bool>()) {
        let p = plan(two_groups);
        let frames: Vec<(u16, Vec<u8>)> = kinds.iter().map(|&(k, x)| frame(k, x)).collect();
        let key = HashKey::from_bytes([4; 16]);
        let mut seq = Worker::new(WorkerConfig::default(), key);
        let mut bat = Worker::new(WorkerConfig::default(), key);
        let mut batch = Batch::new(frames.len());
        for (port, f) in &frames {
            prop_assert!(batch.push(*port, 0, f));
        }
        bat.process_batch(&mut batch, &p, 5);
        for (i, (port, f)) in frames.iter().enumerate() {
            let mut buf = f.clone();
            buf.resize(datapath::batch::SLOT_BYTES, 0);
            let a = seq.process(&mut buf, f.len(), *port, &p, 5);
            prop_assert_eq!(batch.action(i), a, "frame {} (kind {})", i, kinds[i].0 % 12);
            let (_, _, slot, len) = batch.get_mut(i);
            let out_len = match a { datapath::Action::Reply { len } => len, _ => len };
            prop_assert_eq!(&slot[..out_len], &buf[..out_len]);
        }
        prop_assert_eq!(&bat.counters, &seq.counters);
        prop_assert_eq!(bat.bridge_size(), seq.bridge_size());
        prop_assert_eq!(bat.fragments_held(), seq.fragments_held());
    }
}
