//! Replay of a generated capture: both directions of many flows, fragments, ICMP errors, ARP — 0 split flows and the expected per-TM counts.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, GroupSpec, HashKey, MacAddr, Profile, Tm, TmIndex};
use distributor::build::{self, tcp_flags, L2};
use distributor::pcap::{Reader, Writer};

fn table() -> AllocationTable {
    let tms = (0..5)
        .map(|i| Tm {
            id: 10 + i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1 + i,
            group: 0,
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    AllocationTable::new(
        3,
        key,
        tms,
        vec![GroupSpec::default_group(Profile::Weighted)],
    )
    .expect("table")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A capture and, for each frame, the TM it must reach (`None`: not steered).
fn capture(t: &AllocationTable) -> (Vec<u8>, Vec<Option<TmIndex>>, usize) {
    // Frames as seen on the wire: the MACs are whatever they were; replay addresses them to the cluster.
    let l2 = L2::new(
        MacAddr([2, 0xaa, 0, 0, 0, 1]),
        MacAddr([2, 0xbb, 0, 0, 0, 1]),
    );
    let mut frames: Vec<(Vec<u8>, Option<TmIndex>)> = Vec::new();
    let mut flows = 0;
    for i in 0..300u16 {
        let (c, s) = if i % 3 == 0 {
            (ip(&format!("2001:db8:ff::{:x}", i + 1)), ip("2001:db8::10"))
        } else {
            (
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i % 250) as u8 + 1)),
                ip("198.51.100.10"),
            )
        };
        let (cp, sp) = (20000 + i * 7, if i % 2 == 0 { 443 } else { 8443 + i });
        let tm = t.steer(&Flow::with_ports(proto::TCP, c, cp, s, sp)).tm;
        frames.push((
            build::tcp_frame(&l2, c, cp, s, sp, tcp_flags::SYN, b""),
            Some(tm),
        ));
        frames.push((
            build::tcp_frame(&l2, s, sp, c, cp, tcp_flags::SYN | tcp_flags::ACK, b""),
            Some(tm),
        ));
        frames.push((
            build::tcp_frame(&l2, c, cp, s, sp, tcp_flags::ACK, b"GET / HTTP/1.1\r\n\r\n"),
            Some(tm),
        ));
        let utm = t.steer(&Flow::with_ports(proto::UDP, c, cp, s, 53)).tm;
        frames.push((build::udp_frame(&l2, c, cp, s, 53, b"query"), Some(utm)));
        frames.push((build::udp_frame(&l2, s, 53, c, cp, b"answer"), Some(utm)));
        flows += 2;
    }
    // A fragmented datagram, later fragments first, and an ICMP error about a TCP flow.
    let (c, s) = (ip("203.0.113.200"), ip("198.51.100.10"));
    let ftm = t.steer(&Flow::with_ports(proto::UDP, c, 5353, s, 53)).tm;
    let packet = build::ip(
        c,
        s,
        proto::UDP,
        77,
        &build::udp(c, 5353, s, 53, &[3; 3000]),
    );
    let parts = build::fragment_v4(&packet, 1200);
    frames.push((build::frame(&l2, &parts[2]), Some(ftm)));
    frames.push((build::frame(&l2, &parts[1]), Some(ftm)));
    frames.push((build::frame(&l2, &parts[0]), Some(ftm)));
    flows += 1;
    let etm = t.steer(&Flow::with_ports(proto::TCP, s, 443, c, 40000)).tm;
    let off = build::ip(
        s,
        c,
        proto::TCP,
        1,
        &build::tcp(s, 443, c, 40000, tcp_flags::ACK, 1, &[0; 1400]),
    );
    frames.push((
        build::too_big(&l2, ip("198.51.100.254"), s, 1280, &off),
        Some(etm),
    ));
    // ARP is not steered.
    frames.push((
        build::arp(
            &L2::new(MacAddr([0xff; 6]), MacAddr([2, 0xbb, 0, 0, 0, 1])),
            1,
            MacAddr([2, 0xbb, 0, 0, 0, 1]),
            Ipv4Addr::new(198, 51, 100, 1),
            MacAddr::default(),
            Ipv4Addr::new(198, 51, 100, 10),
        ),
        None,
    ));
    let mut w = Writer::new(Vec::new()).expect("writer");
    for (n, (f, _)) in frames.iter().enumerate() {
        w.write(
            1_700_000_000_000_000_000 + n as u64 * 1000,
            f.len() as u32,
            f,
        )
        .expect("write");
    }
    (
        w.into_inner().expect("flush"),
        frames.into_iter().map(|(_, t)| t).collect(),
        flows,
    )
}

#[test]
fn a_generated_capture_replays_with_no_split_flow_and_exact_counts() {
    let t = table();
    let (pcap, expected, flows) = capture(&t);
    let dir = Dir(std::env::temp_dir().join(format!("std-replay-{}", std::process::id())));
    let s = distributor::replay::replay(t.clone(), &pcap[..], &dir.0).expect("replay");
    assert_eq!(s.frames, expected.len() as u64);
    assert_eq!(s.flows.split, 0, "{:?}", s.flows.split_examples);
    assert_eq!(s.flows.seen, flows as u64);
    assert_eq!(
        s.flows.both_directions, 600,
        "every TCP and UDP flow went both ways"
    );
    assert_eq!(s.not_steered, 1, "the ARP request");
    assert_eq!(s.held_at_end, 0);
    assert_eq!(s.branches["fragment"], 2);
    assert_eq!(s.branches["icmp_error"], 1);
    assert!(s.drops.values().all(|&d| d == 0), "{:?}", s.drops);
    for (i, tm) in s.tms.iter().enumerate() {
        let want = expected
            .iter()
            .filter(|&&e| e == Some(i as TmIndex))
            .count() as u64;
        assert_eq!(tm.packets, want, "TM {i}");
        // Its capture holds exactly those frames, each addressed to the TM's MAC.
        let bytes = std::fs::read(dir.0.join(&tm.file)).expect("tm capture");
        let mut r = Reader::new(&bytes[..]).expect("pcap");
        let mut n = 0;
        while let Some(rec) = r.next_record().expect("record") {
            assert_eq!(&rec.data[..6], &t.tms()[i].mac.0);
            n += 1;
        }
        assert_eq!(n, want);
    }
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("summary.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(json["flows"]["split"], 0);
    assert_eq!(json["table_version"], 3);
}

#[test]
fn stdd_replay_command() {
    let t = table();
    let (pcap, expected, _) = capture(&t);
    let dir = Dir(std::env::temp_dir().join(format!("std-replay-cli-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let (tf, cf, out) = (
        dir.0.join("t.toml"),
        dir.0.join("c.pcap"),
        dir.0.join("out"),
    );
    allocation::file::save(&tf, &t).expect("table");
    std::fs::write(&cf, &pcap).expect("capture");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stdd"))
        .args([
            "replay",
            "--table",
            tf.to_str().expect("path"),
            cf.to_str().expect("path"),
            "--out",
            out.to_str().expect("path"),
            "--json",
        ])
        .output()
        .expect("run stdd");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["frames"].as_u64(), Some(expected.len() as u64));
    assert_eq!(s["flows"]["split"], 0);
    // Bad input: one line, non-zero exit.
    std::fs::write(&cf, b"not a capture at all, not even close").expect("write");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stdd"))
        .args([
            "replay",
            "--table",
            tf.to_str().expect("path"),
            cf.to_str().expect("path"),
            "--out",
            out.to_str().expect("path"),
        ])
        .output()
        .expect("run stdd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("not a pcap file"), "{err}");
}

#[test]
fn replay_with_a_configuration_keeps_macs_and_answers_for_cluster_addresses() {
    let t = table();
    let dir = Dir(std::env::temp_dir().join(format!("std-replay-cfg-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    allocation::file::save(dir.0.join("table.toml"), &t).expect("table");
    let group: MacAddr = "02:53:54:44:00:01".parse().expect("mac");
    let mut cfg = format!(
        "role = \"front\"\ngroup_mac = \"{group}\"\ncluster_addresses = [\"198.51.100.10\"]\ntable = \"table.toml\"\nbackend = \"pcap-file\"\n\n[[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"x.pcap\"\n"
    );
    cfg += "\n[[port]]\nname = \"tms\"\nkind = \"tm\"\noutput = \"tms.pcap\"\ntms = [10, 11, 12, 13, 14]\n";
    std::fs::write(dir.0.join("stdd.toml"), cfg).expect("config");
    let vip = ip("198.51.100.10");
    let router = MacAddr([2, 0xee, 0, 0, 0, 1]);
    let mut w = Writer::new(Vec::new()).expect("writer");
    for i in 0..10u16 {
        let f = build::tcp_frame(
            &L2::new(group, router),
            ip("203.0.113.7"),
            40000 + i,
            vip,
            443,
            tcp_flags::SYN,
            b"",
        );
        w.write(u64::from(i), f.len() as u32, &f).expect("write");
    }
    for i in 0..5u16 {
        let f = build::tcp_frame(
            &L2::new(MacAddr([2, 0, 0, 0, 0, 7]), router),
            ip("203.0.113.8"),
            40000 + i,
            ip("192.0.2.1"),
            80,
            0,
            b"",
        );
        w.write(100 + u64::from(i), f.len() as u32, &f)
            .expect("write");
    }
    let arp = build::arp(
        &L2::new(MacAddr([0xff; 6]), router),
        1,
        router,
        Ipv4Addr::new(198, 51, 100, 1),
        MacAddr::default(),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    w.write(200, arp.len() as u32, &arp).expect("write");
    let capture = dir.0.join("c.pcap");
    std::fs::write(&capture, w.into_inner().expect("flush")).expect("capture");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "replay".to_string(),
            capture.display().to_string(),
            "--out".into(),
            dir.0.join("out").display().to_string(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_stdd"))
            .args(&args)
            .output()
            .expect("run stdd");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let with_cfg = run(&["--config", dir.0.join("stdd.toml").to_str().expect("path")]);
    let steered: u64 = with_cfg["tms"]
        .as_array()
        .expect("tms")
        .iter()
        .map(|t| t["packets"].as_u64().expect("n"))
        .sum();
    assert_eq!(steered, 10, "only the frames to the group MAC are steered");
    assert_eq!(with_cfg["branches"]["bridge"], 5);
    assert_eq!(
        with_cfg["branches"]["arp_reply"], 1,
        "the VIP is answered for"
    );
    // Without the configuration, every frame is taken as addressed to the cluster.
    let without = run(&["--table", dir.0.join("table.toml").to_str().expect("path")]);
    let steered: u64 = without["tms"]
        .as_array()
        .expect("tms")
        .iter()
        .map(|t| t["packets"].as_u64().expect("n"))
        .sum();
    assert_eq!(steered, 15);
}
