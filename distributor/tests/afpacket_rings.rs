//! The AF_PACKET backend's two send modes (TX ring, sendmmsg) and its RX ring on a real veth pair: every frame sent out of one end arrives, unchanged, at the other. Needs root and `ip`; skipped, saying so, otherwise.

use std::process::Command;

use distributor::afpacket::{AfPacketBackend, RingConfig, TxMode};
use distributor::io::{Backend, Batch};

fn ip(args: &str) -> bool {
    Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .is_ok_and(|s| s.success())
}

/// A veth pair, deleted when dropped.
struct Veth(String, String);

impl Veth {
    fn new(tag: &str) -> Option<Veth> {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("stda{tag}{id}"), format!("stdb{tag}{id}"));
        if !ip(&format!("link add {a} type veth peer name {b}")) {
            return None;
        }
        let v = Veth(a, b);
        for end in [&v.0, &v.1] {
            // No IPv6 chatter: only our frames on the link.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{end}/disable_ipv6"), "1");
            if !ip(&format!("link set {end} up")) {
                return None;
            }
        }
        Some(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = ip(&format!("link del {}", self.0));
    }
}

/// Frame `i` of the test marked `mark` (the source MAC's last byte: a
/// socket receives from every interface until it is bound, so another
/// test's frames may reach it).
fn frame(i: u16, mark: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, mark, 0x88, 0xb5];
    f.extend_from_slice(&i.to_be_bytes());
    f.resize(64 + usize::from(i % 200), i as u8);
    f
}

/// The frames of a batch: (port, timestamp, bytes).
fn take(batch: &mut Batch, into: &mut Vec<(u16, u64, Vec<u8>)>) {
    for k in 0..batch.len() {
        let (port, ts, slot, len) = batch.get_mut(k);
        into.push((port, ts, slot[..len].to_vec()));
    }
}

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

fn round_trip(tx: TxMode, tag: &str, mark: u8) {
    if !root() {
        eprintln!("SKIPPED the AF_PACKET ring test: it needs root (a veth pair)");
        return;
    }
    let Some(v) = Veth::new(tag) else {
        eprintln!("SKIPPED the AF_PACKET ring test: no veth pair (ip link add failed)");
        return;
    };
    let rings = RingConfig {
        rx_blocks: 1,
        tx_blocks: 1,
        tx,
        qdisc_bypass: true,
    };
    let mut b = AfPacketBackend::open(&[&v.0, &v.1], rings, 10, None).expect("open");
    assert_eq!(b.ports(), 2);
    let n = 700u16; // more than a ring (512 frames) or a staging area (256)
    let mut got = Vec::new();
    let mut batch = Batch::new(256);
    for i in 0..n {
        b.send(0, &frame(i, mark)).expect("send");
        if i % 100 == 99 {
            b.flush().expect("flush");
            while b.recv(&mut batch).expect("recv") > 0 {
                take(&mut batch, &mut got);
            }
        }
    }
    b.flush().expect("flush");
    for _ in 0..20 {
        b.recv(&mut batch).expect("recv");
        take(&mut batch, &mut got);
    }
    let ours: Vec<_> = got
        .iter()
        .filter(|(_, _, f)| f.len() >= 14 && f[11] == mark && f[12..14] == [0x88, 0xb5])
        .collect();
    assert!(
        ours.iter().all(|(port, _, _)| *port == 1),
        "frames only on the peer"
    );
    assert_eq!(ours.len(), usize::from(n), "every frame arrived once");
    for (i, (_, ts, f)) in ours.iter().enumerate() {
        assert_eq!(f, &frame(i as u16, mark), "frame {i} unchanged, in order");
        assert!(*ts > 0, "a kernel timestamp");
    }
}

#[test]
fn frames_sent_through_the_tx_ring_arrive_through_the_rx_ring() {
    round_trip(TxMode::Ring, "r", 0xa1);
}

#[test]
fn frames_sent_with_sendmmsg_arrive_through_the_rx_ring() {
    round_trip(TxMode::Sendmmsg, "m", 0xa2);
}

#[test]
fn oversized_frames_are_refused() {
    if !root() {
        eprintln!("SKIPPED the AF_PACKET size test: it needs root (a veth pair)");
        return;
    }
    let Some(v) = Veth::new("o") else {
        eprintln!("SKIPPED the AF_PACKET size test: no veth pair (ip link add failed)");
        return;
    };
    let mut b = AfPacketBackend::open(&[&v.0], RingConfig::default(), 10, None).expect("open");
    let big = vec![0u8; distributor::afpacket::MAX_FRAME + 1];
    assert_eq!(
        b.send(0, &big).expect_err("too big").kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(b.send(1, &frame(1, 0xa3)).is_err(), "no such port");
}
