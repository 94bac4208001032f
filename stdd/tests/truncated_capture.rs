//! A capture whose last record is cut short (a capture still being written, a copy interrupted): the records before it are steered by the pcap-file backend, `stdd run` and `stdd replay`, and the cut tail is counted and named by its byte offset.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, MacAddr};
use distributor::backend::PcapFileBackend;
use distributor::build::{self, tcp_flags, L2};
use distributor::io::{Backend, Batch};
use distributor::pcap::{Reader, Writer};

const GROUP: &str = "02:53:54:44:00:01";
const GOOD: usize = 60;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(what: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("std-truncated-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    Dir(d)
}

fn table() -> AllocationTable {
    testkit::uniform(4)
}

fn client(i: usize) -> (IpAddr, u16) {
    (
        IpAddr::V4([203, 0, 113, (i % 200) as u8 + 1].into()),
        30000 + i as u16,
    )
}

/// `GOOD` SYNs to the cluster, then one more record cut `cut` bytes short;
/// returns the capture and the byte offset where the cut record starts.
fn truncated_capture(cut: usize) -> (Vec<u8>, u64) {
    let l2 = L2::new(GROUP.parse().expect("mac"), MacAddr([2, 0xee, 0, 0, 0, 1]));
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let mut w = Writer::new(Vec::new()).expect("writer");
    let mut offset = 24u64;
    for i in 0..=GOOD {
        let (c, cp) = client(i);
        let f = build::tcp_frame(&l2, c, cp, vip, 443, tcp_flags::SYN, b"");
        w.write(1_000_000 + i as u64 * 1000, f.len() as u32, &f)
            .expect("write");
        if i < GOOD {
            offset += 16 + f.len() as u64;
        }
    }
    let mut bytes = w.into_inner().expect("flush");
    bytes.truncate(bytes.len() - cut);
    (bytes, offset)
}

fn records(path: &Path) -> Vec<Vec<u8>> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let Ok(mut r) = Reader::new(&bytes[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(Some(rec)) = r.next_record() {
        out.push(rec.data);
    }
    out
}

/// Every frame reached the port of the TM the table names for its flow.
fn check_steered(t: &AllocationTable, tm: usize, frames: &[Vec<u8>]) {
    for f in frames {
        let src = IpAddr::V4([f[26], f[27], f[28], f[29]].into());
        let sport = u16::from_be_bytes([f[34], f[35]]);
        let flow = Flow::with_ports(
            proto::TCP,
            src,
            sport,
            "198.51.100.10".parse().expect("addr"),
            443,
        );
        assert_eq!(usize::from(t.steer(&flow).tm), tm);
    }
}

#[test]
fn the_pcap_file_backend_delivers_the_records_before_a_cut_tail_and_counts_it() {
    for cut in [1, 5, 40, 60] {
        let dir = scratch(&format!("backend-{cut}"));
        let (bytes, _) = truncated_capture(cut);
        let input = dir.0.join("in.pcap");
        std::fs::write(&input, bytes).expect("capture");
        let mut b = PcapFileBackend::open(&[(Some(input.as_path()), None)]).expect("open");
        let mut batch = Batch::new(16);
        let mut got = 0;
        for _ in 0..100 {
            match b.recv(&mut batch) {
                Ok(n) => got += n,
                Err(e) => panic!("cut {cut}: after {got} frames: {e}"),
            }
            if b.finished() {
                break;
            }
        }
        assert!(b.finished(), "cut {cut}");
        assert_eq!(got, GOOD, "cut {cut}: every whole record is delivered");
        assert_eq!(b.dropped(), 1, "cut {cut}: the cut record is counted");
    }
}

#[test]
fn replay_steers_the_records_before_a_cut_tail_and_reports_it() {
    let t = table();
    let (bytes, offset) = truncated_capture(5);
    let dir = scratch("replay");
    let s = distributor::replay::replay(t.clone(), &bytes[..], &dir.0.join("lib"))
        .expect("a cut tail is not an error");
    assert_eq!(s.frames, GOOD as u64);
    assert_eq!(s.tms.iter().map(|t| t.packets).sum::<u64>(), GOOD as u64);
    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(json["truncated_tail"]["record"], GOOD as u64, "{json}");
    assert_eq!(json["truncated_tail"]["offset"], offset, "{json}");

    // The command: exit 0, every TM capture written, a warning naming the offset.
    allocation::file::save(dir.0.join("table.toml"), &t).expect("table");
    let capture = dir.0.join("cut.pcap");
    std::fs::write(&capture, &bytes).expect("capture");
    let out = dir.0.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_stdd"))
        .arg("replay")
        .arg("--table")
        .arg(dir.0.join("table.toml"))
        .arg(&capture)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run stdd");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("replayed {GOOD} frames")),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("byte offset {offset}")),
        "{stderr}"
    );
    let written: usize = t
        .tms()
        .iter()
        .map(|tm| records(&out.join(format!("tm-{}-{}.pcap", tm.id, tm.name))).len())
        .sum();
    assert_eq!(written, GOOD);
}

fn metrics(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[test]
fn stdd_run_steers_the_records_before_a_cut_tail() {
    let t = table();
    let dir = scratch("run");
    allocation::file::save(dir.0.join("table.toml"), &t).expect("table");
    let (bytes, offset) = truncated_capture(5);
    std::fs::write(dir.0.join("in.pcap"), bytes).expect("capture");
    let admin = testkit::free_port();
    let mut cfg = format!(
        "role = \"front\"\ngroup_mac = \"{GROUP}\"\ncluster_addresses = [\"198.51.100.10\"]\ntable = \"table.toml\"\nbackend = \"pcap-file\"\n\n[[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"in.pcap\"\n"
    );
    for k in 0..4 {
        cfg += &format!(
            "\n[[port]]\nname = \"tm{k}\"\nkind = \"tm\"\noutput = \"tm{k}.pcap\"\ntms = [{k}]\n"
        );
    }
    cfg += &format!("\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    std::fs::write(dir.0.join("stdd.toml"), cfg).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stdd"))
        .args(["run", "--config"])
        .arg(dir.0.join("stdd.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stdd");
    let steered = || -> usize {
        (0..4)
            .map(|k| records(&dir.0.join(format!("tm{k}.pcap"))).len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut counted = None;
    while Instant::now() < deadline {
        let m = metrics(admin);
        counted = metric(&m, "std_backend_drops_total");
        if steered() == GOOD && counted == Some(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = steered();
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = child.wait();
    assert_eq!(n, GOOD, "the whole records are steered: {stderr}");
    assert_eq!(counted, Some(1), "std_backend_drops_total: {stderr}");
    assert!(
        stderr.contains(&format!("byte offset {offset}")),
        "{stderr}"
    );
    for k in 0..4 {
        check_steered(&t, k, &records(&dir.0.join(format!("tm{k}.pcap"))));
    }
}
