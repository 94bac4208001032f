//! The admin endpoints of a running stdd and tmd under a hostile client — slow bodies, an idle-connection flood, a descriptor limit — while `/healthz` keeps answering within 100 ms and stdd's health probe never fails the flooded TM over.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use allocation::{AllocationTable, HashKey, Profile};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon binary of this workspace, built if the test run did not build it.
fn binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--bin", name, "-p", package]);
        if profile == "release" {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building {name}"
        );
    }
    path
}

fn table() -> AllocationTable {
    testkit::table(1, HashKey::from_bytes([9; 16]), 2, Profile::Uniform)
}

fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while testkit::http(addr, "GET", "/healthz", None, "").0 != 200 {
        assert!(Instant::now() < deadline, "{addr} never answered /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The slowest of `n` health answers, one every `gap`.
fn slowest_health(addr: SocketAddr, n: usize, gap: Duration) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let t0 = Instant::now();
        let (code, out) = testkit::http(addr, "GET", "/healthz", None, "");
        assert_eq!(code, 200, "{addr}: {out}");
        worst = worst.max(t0.elapsed());
        std::thread::sleep(gap);
    }
    worst
}

/// tmd on `dir`, its admin endpoint on `admin`; `nofile`: a descriptor limit.
fn tmd(dir: &Path, admin: u16, nofile: Option<u32>) -> Proc {
    allocation::file::save(dir.join("table.toml"), &table()).expect("table");
    let vip = testkit::free_port();
    let cfg = format!(
        "tm_id = 0\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nsnat_ports = \"1024-65535\"\n\n\
         [[pool]]\nname = \"web\"\nmethod = \"round-robin\"\nservers = [{{ address = \"127.0.0.29:9\" }}]\n\n\
         [[virtual_server]]\nname = \"web\"\nlisten = \"127.0.0.1:{vip}\"\npool = \"web\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    std::fs::write(dir.join("tmd.toml"), cfg).expect("config");
    let bin = binary("tmd", "tm-node");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(["run", "--config"])
        .arg(dir.join("tmd.toml"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc(cmd.spawn().expect("start tmd"))
}

/// stdd (pcap-file backend) probing tmd's health at `tm_health`.
fn stdd(dir: &Path, admin: u16, tm_health: u16) -> Proc {
    allocation::file::save(dir.join("table.toml"), &table()).expect("table");
    std::fs::write(
        dir.join("in.pcap"),
        [
            0xd4u8, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0,
            0, 0,
        ],
    )
    .expect("capture");
    let cfg = format!(
        "role = \"front\"\ngroup_mac = \"02:53:54:44:00:01\"\ntable = \"table.toml\"\nbackend = \"pcap-file\"\n\n\
         [[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"in.pcap\"\noutput = \"out.pcap\"\n\n\
         [[port]]\nname = \"tms\"\nkind = \"tm\"\noutput = \"tms.pcap\"\ntms = [0, 1]\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [failover]\ninterval_ms = 100\nmisses = 3\ntimeout_ms = 250\nstartup_grace_ms = 0\n\n\
         [[failover.tm]]\nid = 0\nhealth = \"http://127.0.0.1:{tm_health}/healthz\"\n"
    );
    std::fs::write(dir.join("stdd.toml"), cfg).expect("config");
    Proc(
        Command::new(binary("stdd", "distributor"))
            .args(["run", "--config"])
            .arg(dir.join("stdd.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stdd"),
    )
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("admin-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Clients that announce a large body and trickle it, a byte every 100 ms, for `for_`.
fn slow_bodies(
    addr: SocketAddr,
    clients: usize,
    for_: Duration,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return;
                };
                let _ = s.write_all(
                    b"PUT /table HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
                );
                let end = Instant::now() + for_;
                while Instant::now() < end {
                    if s.write_all(b"x").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect()
}

#[test]
fn slow_bodies_and_an_idle_flood_neither_stall_health_nor_fail_a_tm_over() {
    let d = dir("flood");
    let (tmd_admin, stdd_admin) = (testkit::free_port(), testkit::free_port());
    let _tmd = tmd(&d, tmd_admin, None);
    let tm_addr: SocketAddr = ([127, 0, 0, 1], tmd_admin).into();
    wait_healthy(tm_addr);
    let sd = dir("flood-stdd");
    let _stdd = stdd(&sd, stdd_admin, tmd_admin);
    let std_addr: SocketAddr = ([127, 0, 0, 1], stdd_admin).into();
    wait_healthy(std_addr);
    let metrics = || testkit::http(std_addr, "GET", "/metrics", None, "").1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while testkit::metric(&metrics(), "std_tm_up{tm_id=\"0\"}") != 1 {
        assert!(Instant::now() < deadline, "stdd never saw tmd up");
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3 s of slow bodies and 500 idle connections against both endpoints.
    let mut idle = Vec::new();
    for addr in [tm_addr, std_addr] {
        for _ in 0..250 {
            if let Ok(s) = TcpStream::connect(addr) {
                idle.push(s);
            }
        }
    }
    let mut trickles = slow_bodies(tm_addr, 20, Duration::from_secs(3));
    trickles.extend(slow_bodies(std_addr, 20, Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(100));
    let worst_tm = slowest_health(tm_addr, 25, Duration::from_millis(100));
    let worst_std = slowest_health(std_addr, 5, Duration::from_millis(100));
    assert!(
        worst_tm < Duration::from_millis(100),
        "tmd's /healthz took {worst_tm:?}"
    );
    assert!(
        worst_std < Duration::from_millis(100),
        "stdd's /healthz took {worst_std:?}"
    );
    for t in trickles {
        let _ = t.join();
    }
    drop(idle);
    let m = metrics();
    assert_eq!(
        testkit::metric(&m, "std_failovers_total"),
        0,
        "no failover: {m}"
    );
    assert_eq!(testkit::metric(&m, "std_failed_tms"), 0);
    assert_eq!(testkit::metric(&m, "std_tm_up{tm_id=\"0\"}"), 1);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&sd);
}

#[test]
fn out_of_descriptors_the_endpoint_sheds_idle_connections_and_lives() {
    let d = dir("emfile");
    let admin = testkit::free_port();
    let _tmd = tmd(&d, admin, Some(96));
    let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    wait_healthy(addr);
    // More connections than descriptors: accept meets EMFILE.
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let worst = slowest_health(addr, 10, Duration::from_millis(50));
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?} at the limit"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    let worst = slowest_health(addr, 10, Duration::from_millis(20));
    assert!(
        worst < Duration::from_millis(100),
        "/healthz took {worst:?} after"
    );
    let _ = std::fs::remove_dir_all(&d);
}
