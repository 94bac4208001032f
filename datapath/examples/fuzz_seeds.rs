//! Writes the fuzz seed corpus (fuzz/seeds/): real frames in the steer target's record format, and a table file.
//!
//! `cargo run -p distributor --example fuzz_seeds -- fuzz/seeds`

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use allocation::rules::proto;
use allocation::{HashKey, MacAddr, Profile};
use datapath::build::{self, tcp_flags, L2};
use datapath::wire::ethertype;

fn record(out: &mut Vec<u8>, port: u8, frame: &[u8]) {
    out.push(port);
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    let steer = dir.join("steer");
    let table = dir.join("table_file");
    std::fs::create_dir_all(&steer)?;
    std::fs::create_dir_all(&table)?;
    let group = MacAddr([2, 0x57, 0x44, 0, 0, 1]);
    let router = MacAddr([2, 0xee, 0, 0, 0, 1]);
    let l2 = L2::new(group, router);
    let ip = |s: &str| s.parse::<IpAddr>().expect("addr");
    let (client, vip, snat, server) = (
        ip("203.0.113.7"),
        ip("198.51.100.10"),
        ip("10.1.0.1"),
        ip("192.0.2.80"),
    );
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut s = Vec::new();
    record(
        &mut s,
        0,
        &build::tcp_frame(&l2, client, 40000, vip, 443, tcp_flags::SYN, b""),
    );
    record(
        &mut s,
        0,
        &build::tcp_frame(&l2, server, 80, snat, 61000, tcp_flags::ACK, b"data"),
    );
    seeds.push(("tcp_v4", s));
    let mut s = Vec::new();
    let tagged = L2::new(group, router)
        .tagged(ethertype::QINQ, 7)
        .tagged(ethertype::VLAN, 100);
    record(
        &mut s,
        0,
        &build::udp_frame(
            &tagged,
            ip("2001:db8:ff::7"),
            5353,
            ip("2001:db8::10"),
            53,
            b"q",
        ),
    );
    seeds.push(("udp_v6_qinq", s));
    let mut s = Vec::new();
    record(
        &mut s,
        0,
        &build::arp(
            &L2::new(MacAddr([0xff; 6]), router),
            1,
            router,
            Ipv4Addr::new(198, 51, 100, 1),
            MacAddr::default(),
            Ipv4Addr::new(198, 51, 100, 10),
        ),
    );
    record(
        &mut s,
        2,
        &build::arp(
            &L2::new(MacAddr([0xff; 6]), MacAddr([2, 0x53, 0x54, 0, 0, 2])),
            1,
            MacAddr([2, 0x53, 0x54, 0, 0, 2]),
            Ipv4Addr::new(10, 1, 0, 1),
            MacAddr::default(),
            Ipv4Addr::new(192, 0, 2, 80),
        ),
    );
    record(
        &mut s,
        0,
        &build::neighbour_solicitation(
            router,
            "2001:db8::1".parse().expect("addr"),
            "2001:db8::10".parse().expect("addr"),
            Some(router),
        ),
    );
    seeds.push(("neighbours", s));
    let mut s = Vec::new();
    let packet = build::ip(
        client,
        vip,
        proto::UDP,
        9,
        &build::udp(client, 5353, vip, 53, &[1; 3000]),
    );
    let frags = build::fragment_v4(&packet, 1200);
    for i in [2, 0, 1] {
        record(&mut s, 0, &build::frame(&l2, &frags[i]));
    }
    seeds.push(("fragments", s));
    let mut s = Vec::new();
    let off = build::ip(
        snat,
        server,
        proto::TCP,
        1,
        &build::tcp(snat, 61000, server, 80, tcp_flags::ACK, 1, &[0; 100]),
    );
    record(
        &mut s,
        0,
        &build::too_big(&l2, ip("192.0.2.254"), snat, 1280, &off),
    );
    seeds.push(("icmp_error", s));
    for (name, bytes) in seeds {
        std::fs::write(steer.join(name), bytes)?;
    }
    let t = testkit::table(1, HashKey::from_bytes([7; 16]), 4, Profile::Uniform);
    std::fs::write(table.join("uniform4.toml"), allocation::file::render(&t))?;
    Ok(())
}
