//! The live backends (pcap; afpacket with two workers; afxdp with one worker and with two workers on two queues) on real kernel interfaces: veth pairs in a private network namespace (root only; skipped loudly otherwise).
//!
//! Topology, all inside one namespace made for the test and deleted after:
//! `o0 ─veth─ o1 [stdd outside port]`, `t0 ─veth─ t1 [stdd TM port]`.
//! A Python AF_PACKET helper injects frames on o0 and t0 and captures what
//! stdd sends out of o1 and t1. No addresses are configured: only frames.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, MacAddr};
use distributor::build::{self, tcp_flags, L2};

const GROUP: MacAddr = MacAddr([0x02, 0x53, 0x54, 0x44, 0x00, 0x01]);
const SENDER: MacAddr = MacAddr([0x02, 0xee, 0, 0, 0, 1]);

/// Sends hex frames from a file on one interface, or captures frames on one
/// interface for a while and prints those not sent by the host itself.
const HELPER: &str = r#"
import socket, sys, time
mode, iface = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
if mode == "send":
    for line in open(sys.argv[3]):
        s.send(bytes.fromhex(line.strip()))
        time.sleep(0.002)
else:
    deadline = time.time() + float(sys.argv[3])
    s.settimeout(0.1)
    with open(sys.argv[4], "w") as out:
        while time.time() < deadline:
            try:
                data, addr = s.recvfrom(65535)
            except socket.timeout:
                continue
            if addr[2] != socket.PACKET_OUTGOING:
                out.write(data.hex() + "\n")
                out.flush()
"#;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Netns {
    name: String,
    dir: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        sh(&["ip", "netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn root_with_tools() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for tool in ["ip", "python3", "ethtool"] {
        if !sh(&["sh", "-c", &format!("command -v {tool}")]) {
            return Err(format!("{tool} is missing"));
        }
    }
    Ok(())
}

fn table() -> AllocationTable {
    testkit::uniform(4)
}

fn captured(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(l.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .collect()
}

#[test]
fn the_live_pcap_backend_steers_real_frames_between_veth_links() {
    live("pcap", "", 1);
}

#[test]
fn the_afpacket_backend_with_two_workers_steers_real_frames_between_veth_links() {
    live("afpacket", "\n[workers]\ncpus = [0, 1]\n", 1);
}

#[test]
fn the_afxdp_backend_in_native_mode_steers_real_frames_between_veth_links() {
    live(
        "afxdp",
        "\n[workers]\ncpus = [1]\nxdp_mode = \"native\"\n",
        1,
    );
}

/// The same, with GRO on the TM link's far end: it then takes XDP
/// redirects, and the in-kernel steering carries every SYN itself.
#[test]
fn the_afxdp_backend_steers_real_frames_in_the_kernel() {
    live(
        "afxdp",
        "\n[workers]\ncpus = [1]\nxdp_mode = \"native\"\n# kernel\n",
        1,
    );
}

#[test]
fn the_afxdp_backend_with_two_workers_on_two_queues_steers_real_frames() {
    live(
        "afxdp",
        "\n[workers]\ncpus = [0, 1]\nxdp_mode = \"native\"\n",
        2,
    );
}

/// Runs stdd with `backend` between two veth pairs of `queues` queues each.
fn live(backend: &str, workers: &str, queues: usize) {
    if let Err(why) = root_with_tools() {
        eprintln!("SKIPPED the live {backend} backend test: {why} (it needs root, ip and python3 to build a private network namespace)");
        return;
    }
    // The in-kernel steering is on by default; the TM port takes its
    // redirects only with GRO (a NAPI instance) on its peer.
    let kernel = workers.contains("# kernel");
    let name = format!(
        "stdt{}{}{queues}{}",
        std::process::id(),
        &backend[..3],
        if kernel { "k" } else { "" }
    );
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut ns = Netns {
        name: name.clone(),
        dir: dir.clone(),
        daemon: None,
    };
    let ip = |args: &str| {
        let mut v = vec!["ip", "-n", &name];
        v.extend(args.split_whitespace());
        assert!(sh(&v), "ip -n {name} {args}");
    };
    assert!(sh(&["ip", "netns", "add", &name]), "ip netns add");
    let q = format!("numtxqueues {queues} numrxqueues {queues}");
    ip(&format!("link add o0 {q} type veth peer name o1 {q}"));
    ip(&format!("link add t0 {q} type veth peer name t1 {q}"));
    // No IPv6 on these links: no router solicitations or DAD frames in the captures.
    assert!(sh(&[
        "ip",
        "netns",
        "exec",
        &name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1"
    ]));
    assert!(sh(&[
        "ip",
        "netns",
        "exec",
        &name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.disable_ipv6=1"
    ]));
    // Room for one frame larger than the ring backends take (below).
    let ring_backend = backend != "pcap";
    if ring_backend {
        ip("link set o0 mtu 3000");
        ip("link set o1 mtu 3000");
    }
    for l in ["lo", "o0", "o1", "t0", "t1"] {
        ip(&format!("link set {l} up"));
    }
    if kernel {
        assert!(sh(&[
            "ip", "netns", "exec", &name, "ethtool", "-K", "t0", "gro", "on"
        ]));
    }

    let t = table();
    allocation::file::save(dir.join("table.toml"), &t).expect("table");
    std::fs::write(
        dir.join("stdd.toml"),
        format!(
            "role = \"front\"\ngroup_mac = \"{GROUP}\"\ncluster_addresses = [\"198.51.100.10\"]\ntable = \"table.toml\"\nbackend = \"{backend}\"\n\n\
             [[port]]\nname = \"outside\"\nkind = \"outside\"\ninterface = \"o1\"\n\n\
             [[port]]\nname = \"tms\"\nkind = \"tm\"\ninterface = \"t1\"\ntms = [0, 1, 2, 3]\n\n[admin]\nlisten = \"127.0.0.1:9180\"\n{workers}"
        ),
    )
    .expect("config");
    std::fs::write(dir.join("helper.py"), HELPER).expect("helper");
    ns.daemon = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                env!("CARGO_BIN_EXE_stdd"),
                "run",
                "--config",
            ])
            .arg(dir.join("stdd.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start stdd"),
    );
    std::thread::sleep(Duration::from_millis(800));

    // Frames to send: 60 TCP SYNs to the VIP from many client ports, and an ARP request for the VIP.
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let client: IpAddr = "203.0.113.7".parse().expect("addr");
    let mut frames = Vec::new();
    for p in 0..60u16 {
        frames.push(build::tcp_frame(
            &L2::new(GROUP, SENDER),
            client,
            40000 + p,
            vip,
            443,
            tcp_flags::SYN,
            b"",
        ));
    }
    let arp = build::arp(
        &L2::new(MacAddr([0xff; 6]), SENDER),
        1,
        SENDER,
        [198, 51, 100, 1].into(),
        MacAddr::default(),
        [198, 51, 100, 10].into(),
    );
    // A 2,000-byte frame: larger than an afpacket ring slot and than an
    // afxdp UMEM frame can take; it must be dropped and counted, not sent.
    let oversized = build::tcp_frame(
        &L2::new(GROUP, SENDER),
        client,
        39999,
        vip,
        443,
        tcp_flags::ACK,
        &[0x5a; 1946],
    );
    assert_eq!(oversized.len(), 2000);
    let mut f = std::fs::File::create(dir.join("frames.hex")).expect("frames");
    let extra = ring_backend.then_some(&oversized);
    for fr in frames.iter().chain(std::iter::once(&arp)).chain(extra) {
        writeln!(
            f,
            "{}",
            fr.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
        .expect("write");
    }
    drop(f);

    let helper = dir.join("helper.py");
    let capture = |iface: &str, out: &Path| {
        Command::new("ip")
            .args(["netns", "exec", &name, "python3"])
            .arg(&helper)
            .args(["capture", iface, "4"])
            .arg(out)
            .spawn()
            .expect("capture")
    };
    let (tm_out, outside_out) = (dir.join("t0.hex"), dir.join("o0.hex"));
    let mut cap_t = capture("t0", &tm_out);
    let mut cap_o = capture("o0", &outside_out);
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("ip")
        .args(["netns", "exec", &name, "python3"])
        .arg(&helper)
        .args(["send", "o0"])
        .arg(dir.join("frames.hex"))
        .status()
        .expect("send");
    assert!(sent.success());
    cap_t.wait().expect("capture t0");
    cap_o.wait().expect("capture o0");

    // Every SYN left on the TM link, addressed to the MAC of the TM the table names.
    let on_tm: Vec<Vec<u8>> = captured(&tm_out)
        .into_iter()
        .filter(|f| f.len() > 14 && f[6..12] == SENDER.0 && f[12..14] == [8, 0])
        .collect();
    assert_eq!(
        on_tm.len(),
        60,
        "every SYN crossed to the TM link (and nothing else)"
    );
    if ring_backend {
        // The oversized frame is in the backend's drop counter (published
        // every 100 ms).
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c"])
            .arg("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9180/metrics').read().decode())")
            .output()
            .expect("metrics");
        let text = String::from_utf8_lossy(&out.stdout);
        let drops = text
            .lines()
            .find_map(|l| l.strip_prefix("std_backend_drops_total "))
            .unwrap_or_else(|| panic!("no std_backend_drops_total in {text}"));
        assert_eq!(drops.trim(), "1", "the oversized frame, counted once");
        if backend == "afxdp" {
            let steered = text
                .lines()
                .find_map(|l| l.strip_prefix("std_xdp_frames_total{path=\"steered\"} "))
                .unwrap_or_else(|| panic!("no std_xdp_frames_total in {text}"));
            // With the TM port taking redirects, the kernel steers every
            // SYN but its queue's MAC-learning sample (one a second, the
            // first at once); without, none (the workers do).
            let steered: u64 = steered.trim().parse().expect("a count");
            if kernel {
                assert!(
                    (58..=59).contains(&steered),
                    "{steered} SYNs steered in the kernel"
                );
            } else {
                assert_eq!(steered, 0, "frames steered in the kernel");
            }
        }
    }
    let mut per_tm = [0usize; 4];
    for fr in &on_tm {
        let sport = u16::from_be_bytes([fr[34], fr[35]]);
        let tm = t
            .steer(&Flow::with_ports(proto::TCP, client, sport, vip, 443))
            .tm;
        assert_eq!(&fr[..6], &t.tms()[usize::from(tm)].mac.0, "port {sport}");
        assert_eq!(
            &fr[6..],
            &build::tcp_frame(
                &L2::new(GROUP, SENDER),
                client,
                sport,
                vip,
                443,
                tcp_flags::SYN,
                b""
            )[6..],
            "only the destination MAC changed"
        );
        per_tm[usize::from(tm)] += 1;
    }
    assert!(per_tm.iter().all(|&n| n > 0), "{per_tm:?}");
    // The ARP request for the VIP was answered on the outside link, from the group MAC.
    let replies: Vec<Vec<u8>> = captured(&outside_out)
        .into_iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2])
        .collect();
    assert_eq!(replies.len(), 1, "one ARP reply");
    assert_eq!(
        replies[0],
        build::arp(
            &L2::new(SENDER, GROUP),
            2,
            GROUP,
            [198, 51, 100, 10].into(),
            SENDER,
            [198, 51, 100, 1].into()
        )
    );
}
