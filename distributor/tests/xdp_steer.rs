//! The in-kernel steering program, run by the kernel (`BPF_PROG_TEST_RUN`) on real frames, must agree with `decide`: whatever it steers goes to the TM `decide` names, with the same bytes; the common case is steered; the rest is left to the workers. Needs root (CAP_BPF); skipped, saying so, otherwise.

use std::net::{IpAddr, Ipv4Addr};

use allocation::rules::{proto, Protocol, Rule};
use allocation::{AllocationTable, GroupSpec, HashKey, HashMode, MacAddr, Profile, Tm};
use distributor::build::{self, tcp_flags, L2};
use distributor::wire::ethertype;
use distributor::xdp_steer::{project, TestVerdict, XdpSteer};
use distributor::{decide, Branch, Plan, PortKind, Verdict};
use proptest::prelude::*;

const GROUP: MacAddr = MacAddr([0x02, 0x57, 0x44, 0, 0, 1]);
const ROUTER: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 1]);
const KINDS: [PortKind; 4] = [
    PortKind::Outside,
    PortKind::Tm,
    PortKind::Tm,
    PortKind::Bridged,
];

fn root() -> bool {
    let uid = std::process::Command::new("id").arg("-u").output();
    let root = uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("SKIPPED xdp_steer: not root, the kernel loads no BPF program for us");
    }
    root
}

fn tms(weights: &[u32]) -> Vec<Tm> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Tm {
            id: i as u32,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: w,
            group: 0,
        })
        .collect()
}

fn key() -> HashKey {
    "000102030405060708090a0b0c0d0e0f".parse().expect("key")
}

fn table(version: u64, weights: &[u32], two_groups: bool) -> AllocationTable {
    let mut groups = vec![GroupSpec::default_group(Profile::Uniform)];
    let mut t = tms(weights);
    if two_groups {
        t[3].group = 1;
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
    AllocationTable::new(version, key(), t, groups).expect("table")
}

/// TMs 0, 1 on port 1, TM 2 on port 2; TM 3 has no port unless `all`.
fn plan(t: AllocationTable, all: bool) -> Plan {
    let cluster: Vec<IpAddr> = vec!["198.51.100.10".parse().expect("addr")];
    let mut routes = vec![(0, 1), (1, 1), (2, 2)];
    if all {
        routes.push((3, 2));
    }
    Plan::new(t, GROUP, &cluster, KINDS.to_vec(), &routes).expect("plan")
}

/// Every port on the loopback interface (a real ifindex; nothing is sent).
fn steer_for(p: &Plan) -> XdpSteer {
    let s = XdpSteer::new(&KINDS, &[Some("lo"); 4], 1)
        .expect("maps")
        .assume_redirect_targets();
    s.set_learning(0, false).expect("learn slot");
    s.sync(p).expect("sync");
    s
}

/// A frame of kind `k` with parameters `x`, from outside.
fn frame(k: u8, x: u32) -> Vec<u8> {
    let l2 = L2::new(GROUP, ROUTER);
    let c4 = IpAddr::V4(Ipv4Addr::from(0xcb00_7100 | (x & 0xffff)));
    let p = (x >> 16) as u16;
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let c6 = IpAddr::V6(std::net::Ipv6Addr::new(
        0x2001,
        0xdb8,
        (x >> 16) as u16,
        0,
        0,
        0,
        0,
        x as u16,
    ));
    let vip6: IpAddr = "2001:db8::10".parse().expect("addr");
    match k % 12 {
        0 => build::tcp_frame(&l2, c4, p, vip, 443, tcp_flags::SYN, b""),
        1 => build::udp_frame(&l2, c4, p, vip, 53, b"q"),
        2 => build::tcp_frame(&l2, vip, 443, c4, p, tcp_flags::ACK, b"reply"),
        3 => build::tcp_frame(
            &l2.clone().tagged(ethertype::VLAN, 7),
            c4,
            p,
            vip,
            80,
            0,
            b"",
        ),
        4 => build::udp_frame(&l2, c4, 500, vip, 500, b"equal"),
        5 => {
            let pkt = build::ip(
                c4,
                vip,
                proto::UDP,
                7,
                &build::udp(c4, p, vip, 53, &[1; 2000]),
            );
            let parts = build::fragment_v4(&pkt, 1000);
            build::frame(&l2, &parts[(x as usize) % parts.len()])
        }
        6 => build::tcp_frame(
            &L2::new(MacAddr([2, 0, 0, 0, 0, 9]), ROUTER),
            c4,
            p,
            vip,
            443,
            0,
            b"not for the group",
        ),
        7 => {
            // IPv4 with a 4-byte option (IHL 6): the workers' case.
            let mut f = build::tcp_frame(&l2, c4, p, vip, 443, 0, b"opt");
            f.splice(34..34, [1u8, 1, 1, 1]);
            f[14] = 0x46;
            let total = u16::from_be_bytes([f[16], f[17]]) + 4;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            f
        }
        8 => build::tcp_frame(
            &l2,
            "2001:db8::1".parse().expect("addr"),
            p,
            "2001:db8::10".parse().expect("addr"),
            443,
            0,
            b"v6",
        ),
        10 => build::udp_frame(&l2, c6, p, vip6, 53, b"v6 query"),
        11 => {
            // An IPv4-mapped source: hashed as its IPv4 endpoint.
            let mapped = IpAddr::V6(Ipv4Addr::from(0xcb00_7100 | (x & 0xff)).to_ipv6_mapped());
            build::tcp_frame(&l2, mapped, p | 0x8000, vip6, 443, tcp_flags::SYN, b"")
        }
        _ => {
            let f = build::udp_frame(&l2, c4, p, vip, 4789, b"udp");
            f[..14 + (x as usize % (f.len() - 14))].to_vec()
        }
    }
}

fn v4_mapped(a: &[u8]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// Runs `f` through the program and `decide`; checks they agree. Returns
/// whether the kernel steered it.
fn check(prog: &distributor::xdp_steer::TestProgram, p: &Plan, f: &[u8]) -> Result<bool, String> {
    if f.len() < 14 {
        return Ok(false); // the kernel's test run refuses these
    }
    let got = prog.run(f).map_err(|e| format!("test run: {e}"))?;
    let mut buf = f.to_vec();
    let verdict = decide(&mut buf, f.len(), 0, p);
    let common = matches!(
        verdict,
        Verdict::ToTm {
            branch: Branch::Endpoint,
            remember: None,
            moved: None,
            ..
        }
    ) && f.len() <= distributor::xdp_steer::MAX_STEERED as usize
        && ((f[12..14] == [0x08, 0x00] && f[14] == 0x45 && matches!(f[23], 6 | 17))
            || (f[12..14] == [0x86, 0xdd]
                && f.len() >= 54
                && matches!(f[20], 6 | 17)
                && !v4_mapped(&f[22..38])
                && !v4_mapped(&f[38..54])));
    match got {
        TestVerdict::Steered(out) => {
            let Verdict::ToTm {
                tm, moved: None, ..
            } = verdict
            else {
                return Err(format!("kernel steered, decide said {verdict:?}"));
            };
            let Some((_, mac)) = p.tm_route(tm) else {
                return Err(format!("kernel steered to TM {tm}, which has no port"));
            };
            let mut want = f.to_vec();
            want[..6].copy_from_slice(&mac.0);
            if out != want {
                return Err(format!(
                    "kernel steered to {:02x?}, decide to {mac}",
                    &out[..6]
                ));
            }
            Ok(true)
        }
        TestVerdict::ToWorkers => {
            let steerable = match verdict {
                Verdict::ToTm { tm, .. } => p.tm_route(tm).is_some(),
                _ => false,
            };
            if common && steerable {
                return Err(format!("the common case went to the workers ({verdict:?})"));
            }
            Ok(false)
        }
        TestVerdict::Other(r) => Err(format!("XDP action {r}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kernel_and_decide_agree(frames in prop::collection::vec((any::<u8>(), any::<u32>(), any::<Option<(u16, u8)>>()), 1..64), all in any::<bool>()) {
        if !root() {
            return Ok(());
        }
        let p = plan(table(1, &[1, 1, 1, 1], false), all);
        let s = steer_for(&p);
        let prog = s.test_program().map_err(|e| TestCaseError::fail(format!("load: {e}")))?;
        for (k, x, flip) in frames {
            let mut f = frame(k, x);
            if let Some((at, v)) = flip {
                let i = usize::from(at) % f.len();
                f[i] ^= v | 1;
            }
            check(&prog, &p, &f).map_err(|e| TestCaseError::fail(format!("kind {}: {e}", k % 12)))?;
        }
    }
}

/// Many plain flows, IPv4 and IPv6: all steered, to every TM, each where
/// `decide` says, and counted per TM (packets and bytes).
#[test]
fn the_common_case_is_steered() {
    if !root() {
        return;
    }
    let p = plan(table(1, &[1, 1, 1, 1], false), true);
    let s = steer_for(&p);
    let prog = s.test_program().expect("load");
    let mut seen = [0u32; 4];
    let mut seen_bytes = [0u64; 4];
    for x in 0..2000u32 {
        let kind = [0, 1, 2, 8, 10][x as usize % 5];
        let f = frame(kind, x.wrapping_mul(2_654_435_761));
        assert_eq!(check(&prog, &p, &f), Ok(true), "frame {x} (kind {kind})");
        let out = match prog.run(&f).expect("run") {
            TestVerdict::Steered(o) => o,
            other => panic!("{other:?}"),
        };
        seen[usize::from(out[5]) - 1] += 1;
        seen_bytes[usize::from(out[5]) - 1] += 2 * f.len() as u64;
    }
    assert!(seen.iter().all(|&n| n > 300), "{seen:?}");
    let counted = s.counters().expect("counters");
    let (steered, to_workers) = (counted.steered, counted.to_workers);
    assert_eq!((steered, to_workers), (4000, 0));
    // Per TM: twice the frames seen (each frame ran twice), and their bytes.
    let per_tm = &counted.per_tm[..4];
    for (tm, &(packets, bytes)) in per_tm.iter().enumerate() {
        assert_eq!(packets, 2 * u64::from(seen[tm]), "TM {tm}");
        assert_eq!(bytes, seen_bytes[tm], "TM {tm}");
    }
}

/// A frame longer than the XDP sockets take is not steered: it goes their
/// way, to be dropped and counted like every such frame.
#[test]
fn frames_longer_than_the_sockets_take_are_not_steered() {
    if !root() {
        return;
    }
    let p = plan(table(1, &[1, 1, 1, 1], false), true);
    let s = steer_for(&p);
    let prog = s.test_program().expect("load");
    let l2 = L2::new(GROUP, ROUTER);
    let (c, vip): (IpAddr, IpAddr) = (
        "203.0.113.5".parse().expect("addr"),
        "198.51.100.10".parse().expect("addr"),
    );
    let max = distributor::xdp_steer::MAX_STEERED as usize;
    let fits = build::tcp_frame(&l2, c, 40000, vip, 443, tcp_flags::ACK, &vec![7; max - 54]);
    assert_eq!(fits.len(), max);
    assert!(matches!(
        prog.run(&fits).expect("run"),
        TestVerdict::Steered(_)
    ));
    let long = build::tcp_frame(&l2, c, 40000, vip, 443, tcp_flags::ACK, &vec![7; max - 53]);
    assert_eq!(prog.run(&long).expect("run"), TestVerdict::ToWorkers);
}

/// During a transition the moved buckets are the workers'; the others are
/// still steered, to the new owner (the same as the old).
#[test]
fn moved_buckets_go_to_the_workers() {
    if !root() {
        return;
    }
    let old = table(1, &[1, 1, 1], false);
    let p = plan(table(2, &[1, 1, 1, 1], false), true)
        .with_previous(old)
        .expect("transition");
    let moved = p.moved().map(|m| m.len()).expect("comparable");
    assert!(moved > 500, "{moved} buckets moved");
    let s = steer_for(&p);
    let prog = s.test_program().expect("load");
    let (mut steered, mut workers) = (0, 0);
    for x in 0..3000u32 {
        let f = frame(0, x.wrapping_mul(2_654_435_761));
        let mut buf = f.clone();
        let v = decide(&mut buf, f.len(), 0, &p);
        let got = check(&prog, &p, &f).expect("agree");
        match v {
            Verdict::ToTm { moved: Some(_), .. } => assert!(!got, "a moved bucket was steered"),
            Verdict::ToTm {
                branch: Branch::Endpoint,
                ..
            } => assert!(got, "frame {x}: {v:?}, kernel left it to the workers"),
            _ => assert!(!got),
        }
        if got {
            steered += 1
        } else {
            workers += 1
        }
    }
    assert!(steered > 500 && workers > 500, "{steered} / {workers}");
    // Committed: everything steered again.
    let done = p.without_previous();
    s.sync(&done).expect("sync");
    let mut again = 0;
    for x in 0..500u32 {
        let f = frame(0, x.wrapping_mul(2_654_435_761));
        again += u32::from(check(&prog, &done, &f).expect("agree"));
    }
    assert!(again > 490, "{again} of 500 steered after the commit");
}

/// A table the kernel cannot steer (two groups) leaves every frame to the
/// workers; so does a projection-less plan after a steerable one.
#[test]
fn several_groups_are_left_to_the_workers() {
    if !root() {
        return;
    }
    let p = plan(table(1, &[1, 1, 1, 1], true), true);
    assert!(project(&p, &[Some(1); 4]).is_none());
    let one = plan(table(1, &[1, 1, 1, 1], false), true);
    let s = steer_for(&one);
    let prog = s.test_program().expect("load");
    let f = frame(0, 77);
    assert_eq!(check(&prog, &one, &f), Ok(true));
    assert!(!s.sync(&p).expect("sync"));
    for x in 0..200u32 {
        let f = frame((x % 3) as u8, x.wrapping_mul(2_654_435_761));
        assert_eq!(prog.run(&f).expect("run"), TestVerdict::ToWorkers);
    }
}

/// Once a second (armed by the control path) per queue a steerable TCP SYN
/// or UDP datagram goes to the workers, for MAC learning; the next is
/// steered again.
#[test]
fn one_frame_a_second_goes_to_the_workers_for_learning() {
    if !root() {
        return;
    }
    let p = plan(table(1, &[1, 1, 1, 1], false), true);
    let s = steer_for(&p);
    s.set_learning(0, true).expect("armed");
    let prog = s.test_program().expect("load");
    let steered = |f: &[u8]| matches!(prog.run(f).expect("run"), TestVerdict::Steered(_));
    // A TCP segment other than a SYN is never the sample (the detour could
    // reorder it within its connection).
    let ack = frame(2, 1234);
    for _ in 0..5 {
        assert!(steered(&ack));
    }
    let syn = frame(0, 1234);
    assert_eq!(prog.run(&syn).expect("run"), TestVerdict::ToWorkers);
    for _ in 0..10 {
        assert!(steered(&syn));
    }
    // UDP may be the sample too.
    s.set_learning(0, true).expect("armed");
    let udp = frame(1, 1234);
    assert_eq!(prog.run(&udp).expect("run"), TestVerdict::ToWorkers);
    assert!(steered(&udp));
    let counted = s.counters().expect("counters");
    assert_eq!((counted.steered, counted.to_workers), (16, 2));
}

/// The benchmark's trivial forwarders (`stdbench kernel-ab`): each
/// redirects, setting or checking the destination MAC as it says; and the
/// kernel's run-time statistics count their runs only while switched on.
#[test]
fn the_trivial_forwarders_do_what_they_say() {
    use distributor::afxdp::{redirect_program, Touch};
    use distributor::sys::bpf::RunStats;
    if !root() {
        return;
    }
    const XDP_PASS: u32 = 2;
    const XDP_REDIRECT: u32 = 4;
    let tm = [2, 0x53, 0x54, 0, 0, 9];
    let f = build::udp_frame(
        &L2::new(GROUP, ROUTER),
        "203.0.113.7".parse().expect("addr"),
        40000,
        "198.51.100.10".parse().expect("addr"),
        53,
        b"q",
    );
    let plain = redirect_program("lo", Touch::Nothing).expect("load");
    let r = plain.test_run(&f).expect("run");
    assert_eq!((r.retval, &r.out[..]), (XDP_REDIRECT, &f[..]));

    let set = redirect_program("lo", Touch::SetMac(tm)).expect("load");
    let r = set.test_run(&f).expect("run");
    assert_eq!(r.retval, XDP_REDIRECT);
    assert_eq!(&r.out[..6], &tm);
    assert_eq!(&r.out[6..], &f[6..]);

    let check = redirect_program("lo", Touch::CheckMac(GROUP.0)).expect("load");
    let r = check.test_run(&f).expect("run");
    assert_eq!((r.retval, &r.out[..]), (XDP_REDIRECT, &f[..]));
    for at in [0, 3, 5] {
        let mut other = f.clone();
        other[at] ^= 0x40;
        assert_eq!(
            check.test_run(&other).expect("run").retval,
            XDP_PASS,
            "byte {at} differs"
        );
    }

    let (_, before) = plain.run_stats().expect("stats");
    {
        let _on = RunStats::enable().expect("enable stats");
        for _ in 0..5 {
            plain.test_run(&f).expect("run");
        }
    }
    let (_, on) = plain.run_stats().expect("stats");
    plain.test_run(&f).expect("run");
    let (_, after) = plain.run_stats().expect("stats");
    assert!(on >= before + 5, "runs counted while on: {before} → {on}");
    assert_eq!(
        after, on,
        "a run while off is not counted (unless another holder switched them on)"
    );
}

/// The capture tap in the kernel: disarmed, a steered frame leaves no
/// record; armed, each steered frame leaves one — its length, TM route,
/// bucket and table version as `decide` and the plan say, and its bytes as
/// steered (the TM's MAC), cut at SNAP; the TM filter keeps only its TM's;
/// frames for the workers are never the kernel's to capture.
#[test]
fn the_kernel_captures_what_it_steers_when_armed() {
    use distributor::xdp_steer::{CaptureEntry, ANY_TM, SNAP};
    if !root() {
        return;
    }
    let p = plan(table(7, &[1, 1, 1, 1], false), true);
    let s = steer_for(&p);
    assert!(s.can_capture());
    let prog = s.test_program().expect("load");
    let frames: Vec<Vec<u8>> = (0..64u32)
        .map(|x| {
            let mut f = frame(0, x.wrapping_mul(2_654_435_761));
            if x % 2 == 1 {
                // A long one: held cut at SNAP.
                f = build::tcp_frame(
                    &L2::new(GROUP, ROUTER),
                    IpAddr::V4(Ipv4Addr::new(203, 0, 113, x as u8)),
                    40000 + x as u16,
                    "198.51.100.10".parse().expect("addr"),
                    443,
                    tcp_flags::ACK,
                    &[0xab; 900],
                );
            }
            f
        })
        .collect();
    let drain = || {
        let mut got = Vec::new();
        s.drain_capture(10_000, |h, b| got.push((h, b.to_vec())));
        got
    };
    for f in &frames {
        assert!(matches!(prog.run(f).expect("run"), TestVerdict::Steered(_)));
    }
    assert!(drain().is_empty(), "disarmed: nothing captured");
    s.set_capture(Some(CaptureEntry {
        armed: 1,
        tm: ANY_TM,
        sample: 0,
        reserved: 0,
    }))
    .expect("arm");
    let mut expect = Vec::new();
    for f in &frames {
        let TestVerdict::Steered(out) = prog.run(f).expect("run") else {
            panic!("not steered")
        };
        let mut buf = f.clone();
        let Verdict::ToTm { tm, .. } = decide(&mut buf, f.len(), 0, &p) else {
            panic!("decide")
        };
        let flow = distributor::capture::flow_of(f).expect("flow");
        let allocation::SteerBy::Endpoint { bucket } = p.table().steer(&flow).by else {
            panic!("endpoint")
        };
        expect.push((tm, bucket, out));
    }
    // A frame for the workers (equal ports) is theirs to capture.
    assert_eq!(prog.run(&frame(4, 9)).expect("run"), TestVerdict::ToWorkers);
    let got = drain();
    assert_eq!(got.len(), frames.len());
    for ((h, bytes), (tm, bucket, out)) in got.iter().zip(&expect) {
        assert_eq!(h.len as usize, out.len());
        assert_eq!((h.route, h.bucket, h.version), (*tm, *bucket, 7));
        assert_eq!(bytes.as_slice(), &out[..out.len().min(SNAP)]);
        assert!(h.ktime_ns > 0);
    }
    // Only TM 2's.
    s.set_capture(Some(CaptureEntry {
        armed: 1,
        tm: 2,
        sample: 0,
        reserved: 0,
    }))
    .expect("arm");
    for f in &frames {
        prog.run(f).expect("run");
    }
    let got = drain();
    let want = expect.iter().filter(|e| e.0 == 2).count();
    assert!(want > 0);
    assert_eq!(got.len(), want);
    assert!(got.iter().all(|(h, _)| h.route == 2));
    s.set_capture(None).expect("disarm");
    for f in &frames {
        prog.run(f).expect("run");
    }
    assert!(drain().is_empty());
    assert_eq!(s.capture_dropped().expect("counter"), 0);
}
