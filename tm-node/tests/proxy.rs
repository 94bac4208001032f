//! tmd on loopback: real clients, real servers; every server-side connection comes from a self-source port that steers back to this TM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::metric;

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, PortRange, Profile, SelfPorts};

const TM_ID: u32 = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

fn table() -> AllocationTable {
    testkit::uniform(4)
}

/// An echo server that records the peer address of every connection.
fn echo_server(addr: IpAddr) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let l = TcpListener::bind((addr, 0)).expect("bind server");
    let local = l.local_addr().expect("addr");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            if let Ok(p) = conn.peer_addr() {
                seen.lock().expect("lock").push(p);
            }
            std::thread::spawn(move || {
                let mut c = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (local, peers)
}

struct Tmd {
    child: Child,
    dir: PathBuf,
    admin: u16,
}

impl Drop for Tmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_tmd(name: &str, vip: SocketAddr, servers: &[SocketAddr], ports: &str) -> Tmd {
    let dir = tmd_dir(name);
    let admin = free_vip("127.0.0.1").port();
    let servers_toml: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ address = \"{s}\" }}"))
        .collect();
    let cfg = format!(
        "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nsnat_ports = \"{ports}\"\ndrain_timeout_ms = 2000\n\n\
         [[pool]]\nname = \"web\"\nmethod = \"round-robin\"\nservers = [{}]\n\n\
         [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        servers_toml.join(", ")
    );
    std::fs::write(dir.join("tmd.toml"), cfg).expect("config");
    let tmd = spawn_tmd(dir, admin, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(vip).is_err() {
        assert!(Instant::now() < deadline, "tmd did not listen on {vip}");
        std::thread::sleep(Duration::from_millis(50));
    }
    while TcpStream::connect(("127.0.0.1", tmd.admin)).is_err() {
        assert!(Instant::now() < deadline, "no admin endpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    tmd
}

/// A fresh directory for one test's tmd, with the table saved in it.
fn tmd_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tmd-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    allocation::file::save(dir.join("table.toml"), &table()).expect("table");
    dir
}

/// Starts tmd on `dir/tmd.toml` (`admin`: its admin port, when the test uses it).
fn spawn_tmd(dir: PathBuf, admin: u16, log: &str) -> Tmd {
    let child = Command::new(env!("CARGO_BIN_EXE_tmd"))
        .args(["run", "--config"])
        .arg(dir.join("tmd.toml"))
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tmd");
    Tmd { child, dir, admin }
}

fn free_vip(addr: &str) -> SocketAddr {
    TcpListener::bind((ip(addr), 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// True if the reply from `server` to `peer` steers to this TM and `peer`'s port is above the server's.
fn steers_home(t: &AllocationTable, server: SocketAddr, peer: SocketAddr) -> bool {
    let flow = Flow::with_ports(
        proto::TCP,
        server.ip(),
        server.port(),
        peer.ip(),
        peer.port(),
    );
    peer.port() > server.port() && t.steer(&flow).tm == t.tm_index_by_id(TM_ID).expect("tm")
}

fn stop(mut tmd: Tmd) -> String {
    let pid = tmd.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = tmd.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "tmd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = tmd.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "tmd exit {status}: {err}");
    err
}

#[test]
fn every_server_side_connection_uses_a_self_source_port_that_steers_home() {
    let t = table();
    let (s1, p1) = echo_server(ip("127.0.0.20"));
    let (s2, p2) = echo_server(ip("127.0.0.21"));
    let vip = free_vip("127.0.0.10");
    let tmd = start_tmd("ok", vip, &[s1, s2], "1024-65535");
    // The readiness probe was proxied too: forget it.
    std::thread::sleep(Duration::from_millis(300));
    p1.lock().expect("lock").clear();
    p2.lock().expect("lock").clear();
    for i in 0..40 {
        let mut c = TcpStream::connect(vip).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let msg = format!("hello {i}\n");
        c.write_all(msg.as_bytes()).expect("write");
        c.shutdown(Shutdown::Write).expect("half close");
        let mut back = String::new();
        c.read_to_string(&mut back).expect("read");
        assert_eq!(back, msg, "relayed both ways, half-close passed on");
    }
    let (a, b) = (
        p1.lock().expect("lock").clone(),
        p2.lock().expect("lock").clone(),
    );
    assert_eq!(a.len() + b.len(), 40);
    assert_eq!((a.len(), b.len()), (20, 20), "round robin");
    for (server, peers) in [(s1, &a), (s2, &b)] {
        for &peer in peers {
            assert_eq!(peer.ip(), ip("127.0.0.30"), "SNAT address");
            assert!(
                steers_home(&t, server, peer),
                "{peer} → {server} would not come back to TM {TM_ID}"
            );
        }
    }
    stop(tmd);
}

#[test]
fn exhaustion_is_refused_and_logged_never_a_wrong_port() {
    let t = table();
    let (server, peers) = echo_server(ip("127.0.0.22"));
    let vip = free_vip("127.0.0.11");
    let range = PortRange {
        lo: 61000,
        hi: 61060,
    };
    let ports = SelfPorts::build(
        &t,
        ip("127.0.0.30"),
        t.tm_index_by_id(TM_ID).expect("tm"),
        range,
    )
    .expect("ports");
    let expected = ports.count_above(server.port());
    assert!(expected > 3 && expected < 30, "{expected} usable ports");
    let tmd = start_tmd("exhaust", vip, &[server], "61000-61060");
    // Hold connections open; the ones past the last free port are refused (closed at once).
    let mut held = Vec::new();
    let (mut relayed, mut refused) = (0, 0);
    for _ in 0..expected + 10 {
        let mut c = TcpStream::connect(vip).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(b"x\n").expect("write");
        let mut line = String::new();
        match BufReader::new(c.try_clone().expect("clone")).read_line(&mut line) {
            Ok(2) => relayed += 1,
            _ => refused += 1,
        }
        held.push(c);
    }
    assert_eq!(
        relayed, expected,
        "exactly the self-source ports above the server port were used"
    );
    assert_eq!(refused, 10);
    for &peer in peers.lock().expect("lock").iter() {
        assert!(
            steers_home(&t, server, peer) && (61000..=61060).contains(&peer.port()),
            "wrong port {peer}"
        );
    }
    drop(held);
    let log = stop(tmd);
    assert!(log.contains("no self-source port left"), "{log}");
}

/// An echo server that can be stopped and started again on the same port.
struct Stoppable {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stoppable {
    fn start(addr: SocketAddr, peers: Arc<Mutex<Vec<SocketAddr>>>) -> Stoppable {
        let l = TcpListener::bind(addr).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, seen) = (Arc::clone(&stop), Arc::clone(&peers));
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, p)) => {
                        c.set_nonblocking(false).expect("blocking");
                        let seen = Arc::clone(&seen);
                        std::thread::spawn(move || {
                            // Counted once it carries data: health probes connect and close.
                            let mut c = c;
                            let mut buf = [0u8; 4096];
                            let mut first = true;
                            while let Ok(n) = c.read(&mut buf) {
                                if n > 0 && first {
                                    seen.lock().expect("lock").push(p);
                                    first = false;
                                }
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Stoppable {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
        (self.addr, Arc::clone(&self.peers))
    }
}

fn exchange(vip: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(vip) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    if c.write_all(b"ping\n").is_err() || c.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let mut back = String::new();
    c.read_to_string(&mut back).is_ok() && back == "ping\n"
}

#[test]
fn health_checks_take_a_server_out_and_bring_it_back() {
    let (pa, pb) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let a = Stoppable::start(SocketAddr::new(ip("127.0.0.23"), 0), Arc::clone(&pa));
    let b = Stoppable::start(SocketAddr::new(ip("127.0.0.24"), 0), Arc::clone(&pb));
    let (a_addr, b_addr) = (a.addr, b.addr);
    let vip = free_vip("127.0.0.12");
    let dir = tmd_dir("health");
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{a_addr}\" }}, {{ address = \"{b_addr}\" }}]\n\
             health = {{ kind = \"tcp\", interval_ms = 100, timeout_ms = 300, rise = 2, fall = 2 }}\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "info");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange(vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    let count = |p: &Arc<Mutex<Vec<SocketAddr>>>| p.lock().expect("lock").len();
    let relay = |n| (0..n).all(|_| exchange(vip));

    // Both up: both take connections.
    let (a0, b0) = (count(&pa), count(&pb));
    assert!(relay(10));
    assert!(count(&pa) > a0 && count(&pb) > b0);
    // A stops: after `fall` failed probes every connection goes to B, none fails.
    let (_, pa) = a.stop();
    std::thread::sleep(Duration::from_millis(700));
    let b1 = count(&pb);
    assert!(relay(10), "no client sees the dead server");
    assert_eq!(count(&pb), b1 + 10);
    // A returns on the same port: after `rise` good probes it takes traffic again.
    let a = Stoppable::start(a_addr, Arc::clone(&pa));
    std::thread::sleep(Duration::from_millis(700));
    let a1 = count(&pa);
    assert!(relay(10));
    assert!(count(&pa) >= a1 + 4, "A is back in rotation");
    // Both down: clients are refused, with the reason logged.
    a.stop();
    b.stop();
    std::thread::sleep(Duration::from_millis(700));
    assert!(!exchange(vip), "refused when no server is up");
    let log = stop(tmd);
    assert!(log.contains("is down") && log.contains("is up"), "{log}");
    assert!(log.contains("no server of pool 'web' is up"), "{log}");
}

#[test]
fn a_table_change_breaks_no_open_connection_and_new_ones_follow_the_new_table() {
    let t = table();
    let (server, peers) = echo_server(ip("127.0.0.25"));
    let vip = free_vip("127.0.0.13");
    let tmd = start_tmd("admin", vip, &[server], "1024-65535");
    let admin = tmd.admin;
    std::thread::sleep(Duration::from_millis(300));
    // A connection that stays open across the change.
    let mut open = held(vip).expect("an open connection, echoed");
    let mut buf = [0u8; 2];
    let m = http(admin, "GET", "/metrics", "").1;
    assert_eq!(metric(&m, "tmd_connections_active{vs=\"web\"}"), 1, "{m}");
    assert!(
        metric(
            &m,
            "tmd_snat_ports{address=\"127.0.0.30\",state=\"in_use\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(metric(&m, "tmd_table_version"), 1);

    // The new table moves buckets: many of the old self-source ports are no longer valid.
    let next = t
        .rebalance(
            0,
            &Profile::Gaussian {
                mean: Some(0.0),
                sigma: Some(1.0),
            },
        )
        .expect("rebalance")
        .table;
    let (code, body) = http(admin, "PUT", "/table", &allocation::file::render(&next));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        http(admin, "PUT", "/table", &allocation::file::render(&next)).0,
        409,
        "stale"
    );
    assert_eq!(http(admin, "PUT", "/table", "format = 1").0, 400, "garbage");
    assert_eq!(
        http(admin, "GET", "/table?key=include", "").1.trim_end(),
        allocation::file::render(&next).trim_end()
    );

    // The open connection still works.
    open.write_all(b"b\n").expect("write after the change");
    open.read_exact(&mut buf).expect("echo after the change");
    assert_eq!(&buf, b"b\n");
    // New connections use ports that steer home under the new table.
    peers.lock().expect("lock").clear();
    for _ in 0..20 {
        let mut c = TcpStream::connect(vip).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(b"x\n").expect("write");
        c.read_exact(&mut buf).expect("echo");
    }
    let seen = peers.lock().expect("lock").clone();
    assert_eq!(seen.len(), 20);
    for peer in seen {
        let flow = Flow::with_ports(
            proto::TCP,
            server.ip(),
            server.port(),
            peer.ip(),
            peer.port(),
        );
        assert_eq!(
            next.steer(&flow).tm,
            next.tm_index_by_id(TM_ID).expect("tm"),
            "{peer} under the new table"
        );
    }
    drop(open);
    stop(tmd);
}

/// One exchange from a chosen client source address.
fn exchange_from(src: IpAddr, vip: SocketAddr) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(src, 0)).expect("bind client");
        let Ok(mut c) = sock.connect(vip).await else {
            return false;
        };
        if c.write_all(b"hi\n").await.is_err() || c.shutdown().await.is_err() {
            return false;
        }
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.is_ok() && back == b"hi\n"
    })
}

#[test]
fn persistence_keeps_a_client_on_its_server() {
    let (sa, pa) = echo_server(ip("127.0.0.26"));
    let (sb, pb) = echo_server(ip("127.0.0.27"));
    let vip = free_vip("127.0.0.14");
    let dir = tmd_dir("persist");
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{sa}\" }}, {{ address = \"{sb}\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\npersistence = {{ v4_prefix = 32, timeout_ms = 60000 }}\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange_from(ip("127.0.0.49"), vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    pa.lock().expect("lock").clear();
    pb.lock().expect("lock").clear();
    // Client A: every connection to the same server (round robin alone would alternate).
    for _ in 0..8 {
        assert!(exchange_from(ip("127.0.0.50"), vip));
    }
    let (na, nb) = (
        pa.lock().expect("lock").len(),
        pb.lock().expect("lock").len(),
    );
    assert!(
        (na, nb) == (8, 0) || (na, nb) == (0, 8),
        "a client sticks to one server: {na}/{nb}"
    );
    // Client B (another /32) is balanced on its own and then sticks too.
    for _ in 0..4 {
        assert!(exchange_from(ip("127.0.0.51"), vip));
    }
    let (na2, nb2) = (
        pa.lock().expect("lock").len(),
        pb.lock().expect("lock").len(),
    );
    assert!(
        (na2 - na == 4) ^ (nb2 - nb == 4),
        "client B sticks too: {na2}/{nb2}"
    );
    stop(tmd);
}

#[test]
fn udp_sessions_use_self_source_ports_and_end_when_idle() {
    let t = table();
    let server_sock = std::net::UdpSocket::bind((ip("127.0.0.28"), 0)).expect("udp server");
    let server = server_sock.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = server_sock.recv_from(&mut buf) {
                seen.lock().expect("lock").push(from);
                let _ = server_sock.send_to(&buf[..n], from);
            }
        });
    }
    let vip = std::net::UdpSocket::bind((ip("127.0.0.15"), 0))
        .and_then(|s| s.local_addr())
        .expect("free udp port");
    let dir = tmd_dir("udp");
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"dns\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = \"{vip}\"\npool = \"dns\"\nidle_timeout_ms = 300\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "warn");
    let ask = |c: &std::net::UdpSocket, msg: &[u8]| -> bool {
        let _ = c.send_to(msg, vip);
        let mut buf = [0u8; 2048];
        matches!(c.recv_from(&mut buf), Ok((n, from)) if &buf[..n] == msg && from == vip)
    };
    let client = std::net::UdpSocket::bind((ip("127.0.0.1"), 0)).expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ask(&client, b"ready?") {
        assert!(Instant::now() < deadline, "tmd did not answer");
    }
    for i in 0..5u8 {
        assert!(ask(&client, &[b'q', i]), "datagram {i} relayed both ways");
    }
    let first: Vec<SocketAddr> = seen.lock().expect("lock").clone();
    let session = *first.last().expect("seen");
    assert!(
        first.iter().rev().take(5).all(|&p| p == session),
        "one session, one self-source port: {first:?}"
    );
    let home = |p: SocketAddr| {
        let flow = Flow::with_ports(proto::UDP, server.ip(), server.port(), p.ip(), p.port());
        p.ip() == ip("127.0.0.30")
            && p.port() > server.port()
            && t.steer(&flow).tm == t.tm_index_by_id(TM_ID).expect("tm")
    };
    assert!(home(session), "{session}");
    // Another client: its own session.
    let other = std::net::UdpSocket::bind((ip("127.0.0.1"), 0)).expect("client");
    other
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    assert!(ask(&other, b"other"));
    let second = *seen.lock().expect("lock").last().expect("seen");
    assert_ne!(second, session);
    assert!(home(second));
    // Idle past the timeout: the session ends; the next datagram opens a new one on another port.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(ask(&client, b"again"));
    let third = *seen.lock().expect("lock").last().expect("seen");
    assert_ne!(third, session, "a new session after the idle timeout");
    assert!(home(third));
    stop(tmd);
}

#[test]
fn a_transition_prepares_dual_table_ports_counts_moving_connections_and_commits() {
    let t = table();
    let (server, peers) = echo_server(ip("127.0.0.29"));
    let vip = free_vip("127.0.0.16");
    let tmd = start_tmd("transition", vip, &[server], "1024-65535");
    let admin = tmd.admin;
    std::thread::sleep(Duration::from_millis(300));
    let mut open = held(vip).expect("an open connection, echoed");
    let mut buf = [0u8; 2];
    let state = |body: &str| -> control::TmTransition {
        serde_json::from_str(body.trim()).expect("a TM transition state")
    };
    let idle = state(&http(admin, "GET", "/transition", "").1);
    assert_eq!(
        (idle.phase, idle.current(), idle.next()),
        (control::TmPhase::Idle, control::TableId::of(&t), None)
    );

    // Drain this TM: in the next table it owns no bucket.
    let me = t.tm_index_by_id(TM_ID).expect("tm");
    let drained = t.failover(&[me]).expect("failover").table.with_version(2);
    let (code, body) = http(
        admin,
        "POST",
        "/transition/prepare",
        &allocation::file::render(&drained),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"connections_in_moved_buckets\":1"),
        "the open connection lives in a moved bucket: {body}"
    );
    assert_eq!(
        http(admin, "PUT", "/table", &allocation::file::render(&drained)).0,
        409,
        "no PUT during a transition"
    );
    // The ports a joining node must not take: the open connection's.
    let first_peer = *peers
        .lock()
        .expect("lock")
        .last()
        .expect("the held connection");
    let (code, ports) = http(admin, "GET", "/transition/ports", "");
    assert_eq!(code, 200);
    assert_eq!(
        ports.trim(),
        format!("[[\"{}\",{}]]", first_peer.ip(), first_peer.port())
    );
    // Drained to zero: no port is valid under both tables, so the node
    // keeps its current ports for connections still steered to it before
    // the distributors open the transition (they count as moving).
    let before = peers.lock().expect("lock").len();
    assert!(
        exchange(vip),
        "a drained node still serves until the switch"
    );
    let late = *peers.lock().expect("lock").last().expect("peer");
    assert_eq!(peers.lock().expect("lock").len(), before + 1);
    let late_reply = Flow::with_ports(
        proto::TCP,
        server.ip(),
        server.port(),
        late.ip(),
        late.port(),
    );
    assert_eq!(t.steer(&late_reply).tm, me, "a port of the running table");
    open.write_all(b"b\n").expect("write during the transition");
    open.read_exact(&mut buf)
        .expect("the open connection still works");
    // The late exchange's connection closes on tmd's side a moment after
    // the client has its answer: wait for it to be forgotten.
    let deadline = Instant::now() + Duration::from_secs(3);
    let m = loop {
        let m = http(admin, "GET", "/metrics", "").1;
        if metric(&m, "tmd_connections_in_moved_buckets") <= 1 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(metric(&m, "tmd_transition_prepared"), 1);
    assert_eq!(
        metric(&m, "tmd_connections_in_moved_buckets"),
        1,
        "the open one: {m}"
    );

    // Abort: back to the running table, new connections work again.
    assert_eq!(http(admin, "POST", "/transition/abort", "").0, 200);
    assert_eq!(
        http(admin, "POST", "/transition/commit", "").0,
        409,
        "nothing prepared"
    );
    assert!(exchange(vip));

    // Prepare and commit a rebalance: afterwards new connections steer home under it.
    let next = t
        .rebalance(
            0,
            &Profile::Gaussian {
                mean: None,
                sigma: None,
            },
        )
        .expect("rebalance")
        .table
        .with_version(3);
    let (code, body) = http(
        admin,
        "POST",
        "/transition/prepare",
        &allocation::file::render(&next),
    );
    assert_eq!(code, 200, "{body}");
    // During the transition, new connections get ports valid under both tables.
    peers.lock().expect("lock").clear();
    for _ in 0..10 {
        assert!(exchange(vip));
    }
    let home = |tab: &AllocationTable, peer: SocketAddr| {
        let flow = Flow::with_ports(
            proto::TCP,
            server.ip(),
            server.port(),
            peer.ip(),
            peer.port(),
        );
        tab.steer(&flow).tm == tab.tm_index_by_id(TM_ID).expect("tm")
    };
    for &p in peers.lock().expect("lock").iter() {
        assert!(home(&t, p) && home(&next, p), "{p} valid under both tables");
    }
    // A prepare whose held ports are not a list is refused, changing nothing.
    let bad = serde_json::json!({"table": allocation::file::render(&next), "held": "10.20.0.100"});
    let (code, body) = http(admin, "POST", "/transition/prepare", &bad.to_string());
    assert_eq!(code, 400, "{body}");
    // A body declared past the limit is refused before it is read.
    let mut s = TcpStream::connect(("127.0.0.1", admin)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"PUT /table HTTP/1.1\r\nHost: x\r\nContent-Length: 33554432\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A different table with the prepared version: refused, naming both.
    let other_v3 = t
        .rebalance(0, &Profile::Rayleigh { sigma: None })
        .expect("rebalance")
        .table
        .with_version(3);
    let (code, body) = http(
        admin,
        "POST",
        "/transition/prepare",
        &allocation::file::render(&other_v3),
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains(&allocation::file::checksum(&other_v3))
            && body.contains(&allocation::file::checksum(&next)),
        "{body}"
    );
    let (code, body) = http(admin, "POST", "/transition/commit", "");
    assert_eq!(code, 200, "{body}");
    let committed: control::CommitAnswer = serde_json::from_str(body.trim()).expect("answer");
    assert_eq!(committed.table, control::TableId::of(&next));
    assert_eq!(committed.persist_error, None);
    assert_eq!(
        allocation::file::load(tmd.dir.join("table.toml")).expect("table file"),
        next,
        "the committed table is where tmd starts from"
    );
    let idle = state(&http(admin, "GET", "/transition", "").1);
    assert_eq!(
        (idle.phase, idle.current()),
        (control::TmPhase::Idle, control::TableId::of(&next))
    );
    assert_eq!(
        http(admin, "GET", "/table?key=include", "").1.trim_end(),
        allocation::file::render(&next).trim_end()
    );
    open.write_all(b"c\n").expect("write after the commit");
    open.read_exact(&mut buf)
        .expect("still open after the commit");
    drop(open);
    stop(tmd);
}

#[test]
fn dnat_only_keeps_the_client_address_only_when_the_reply_steers_home() {
    let t = table();
    let me = t.tm_index_by_id(TM_ID).expect("tm");
    let (server, peers) = echo_server(ip("127.0.0.31"));
    let vip = free_vip("127.0.0.17");
    let dir = tmd_dir("dnat");
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\ndnat_only = true\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange_from(ip("127.0.0.59"), vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = ip("127.0.0.60");
    let reply_home = |port: u16| {
        t.steer(&Flow::with_ports(
            proto::TCP,
            server.ip(),
            server.port(),
            client,
            port,
        ))
        .tm == me
    };
    let keep = (40000..60000u16)
        .find(|&p| reply_home(p))
        .expect("a client port whose reply steers home");
    let flip = (40000..60000u16)
        .find(|&p| !reply_home(p))
        .expect("a client port whose reply steers elsewhere");
    // The client binds with SO_REUSEADDR: on loopback tmd binds the same local address and port.
    let from = |port: u16| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.set_reuseaddr(true).expect("reuseaddr");
            sock.bind(SocketAddr::new(client, port))
                .expect("bind client");
            let mut c = sock.connect(vip).await.expect("connect");
            c.write_all(b"dnat\n").await.expect("write");
            c.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.expect("read");
            assert_eq!(back, b"dnat\n");
        });
    };
    peers.lock().expect("lock").clear();
    from(keep);
    from(flip);
    let seen = peers.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0],
        SocketAddr::new(client, keep),
        "the client address is kept when the reply steers home"
    );
    assert_eq!(
        seen[1].ip(),
        ip("127.0.0.30"),
        "otherwise a self-source port: {}",
        seen[1]
    );
    assert!(steers_home(&t, server, seen[1]));
    stop(tmd);
}

fn start_with(
    name: &str,
    vip: SocketAddr,
    server: SocketAddr,
    extra_vs: &str,
    extra_top: &str,
) -> Tmd {
    let dir = tmd_dir(name);
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\n{extra_top}\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n{extra_vs}\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange(vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    tmd
}

/// An open connection that has exchanged one line.
fn held(vip: SocketAddr) -> Option<TcpStream> {
    let mut c = TcpStream::connect(vip).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    c.write_all(b"h\n").ok()?;
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).ok()?;
    (&buf == b"h\n").then_some(c)
}

#[test]
fn connection_limit_and_idle_timeout() {
    let (server, _) = echo_server(ip("127.0.0.32"));
    let vip = free_vip("127.0.0.18");
    let tmd = start_with(
        "limits",
        vip,
        server,
        "max_connections = 2\nidle_timeout_ms = 500",
        "drain_timeout_ms = 1000",
    );
    let a = held(vip).expect("first");
    let b = held(vip).expect("second");
    assert!(
        held(vip).is_none(),
        "a third connection is refused at max_connections = 2"
    );
    // Idle past the timeout: tmd closes both.
    std::thread::sleep(Duration::from_millis(900));
    for mut c in [a, b] {
        let mut buf = [0u8; 1];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "closed by the idle timeout"
        );
    }
    assert!(held(vip).is_some(), "room again");
    stop(tmd);
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let (server, _) = echo_server(ip("127.0.0.33"));
    let vip = free_vip("127.0.0.19");
    let mut tmd = start_with("drain", vip, server, "", "drain_timeout_ms = 10000");
    let mut open = held(vip).expect("open");
    let pid = tmd.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!exchange(vip), "no new connections while draining");
    open.write_all(b"d\n")
        .expect("the open connection still works");
    let mut buf = [0u8; 2];
    open.read_exact(&mut buf).expect("echo while draining");
    assert_eq!(&buf, b"d\n");
    assert!(
        tmd.child.try_wait().expect("wait").is_none(),
        "still draining"
    );
    let closed_at = Instant::now();
    drop(open);
    let status = loop {
        if let Some(s) = tmd.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            closed_at.elapsed() < Duration::from_secs(5),
            "tmd did not exit once drained"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(
        closed_at.elapsed() < Duration::from_secs(5),
        "exited well before the 10 s deadline"
    );
}

#[test]
fn a_udp_session_survives_an_icmp_error_from_its_server() {
    // The server's port is closed at first: the session's datagram draws a
    // port unreachable, which the kernel reports on the session's socket.
    let server = std::net::UdpSocket::bind((ip("127.0.0.33"), 0))
        .and_then(|s| s.local_addr())
        .expect("a free server port");
    let vip = std::net::UdpSocket::bind((ip("127.0.0.19"), 0))
        .and_then(|s| s.local_addr())
        .expect("free udp port");
    let dir = tmd_dir("udp-icmp");
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.34\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"late\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"late\"\nprotocol = \"udp\"\nlisten = \"{vip}\"\npool = \"late\"\nidle_timeout_ms = 5000\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            free_vip("127.0.0.1").port()
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, 0, "warn");
    let client = std::net::UdpSocket::bind((ip("127.0.0.1"), 0)).expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until tmd listens, and a few more: each draws a port unreachable.
    let mut sent = 0;
    while sent < 3 {
        assert!(Instant::now() < deadline, "tmd did not start");
        if client.send_to(b"early", vip).is_ok() {
            sent += 1;
        }
        assert!(client.recv_from(&mut buf).is_err(), "nobody answers yet");
    }
    // Now the server comes up on that port: the same session answers.
    let up = std::net::UdpSocket::bind(server).expect("server binds its port");
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, from)) = up.recv_from(&mut b) {
            let _ = up.send_to(&b[..n], from);
        }
    });
    let mut answered = false;
    for _ in 0..10 {
        let _ = client.send_to(b"later", vip);
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            answered = &buf[..n] == b"later";
            if answered {
                break;
            }
        }
    }
    assert!(
        answered,
        "the session's return path survived the ICMP errors"
    );
    stop(tmd);
}

/// An admin request to tmd on loopback `port` (no token).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    testkit::http(("127.0.0.1", port), method, path, None, body)
}

/// A server that answers every connection with its own address and
/// closes; it stops accepting (connections refused) once `stop` is set.
fn naming_server(addr: IpAddr, stop: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind((addr, 0)).expect("bind server");
    let local = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break; // the listener closes: refused from now on
            }
            if let Ok(mut c) = conn {
                let _ = c.write_all(addr.to_string().as_bytes());
            }
        }
    });
    local
}

/// The host that answered a connection from `src` to `vip`.
fn named_by(src: IpAddr, vip: SocketAddr) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let sock = tokio::net::TcpSocket::new_v4().ok()?;
        sock.bind(SocketAddr::new(src, 0)).ok()?;
        let mut c = tokio::time::timeout(Duration::from_secs(3), sock.connect(vip))
            .await
            .ok()?
            .ok()?;
        let mut back = String::new();
        tokio::time::timeout(Duration::from_secs(3), c.read_to_string(&mut back))
            .await
            .ok()?
            .ok()?;
        (!back.is_empty()).then_some(back)
    })
}

/// Persistence holds across the cluster: two tmd processes, TMs 1 and 2
/// of one table, before three hosts that each serve `web` and `shop` (a
/// buddy group) and `hash` (the source-hash method), and two app hosts
/// that `app` follows `web` to (a buddy link, many-to-one). 20 client
/// addresses connect alternately through both TMs to both buddies: each
/// sees one host for all of them, and the app host its web host maps to;
/// source hash answers alike on both TMs; a host stopped moves only its
/// clients, to one new host each, on both TMs, and their app host follows.
#[test]
fn two_tms_send_each_client_to_one_host_across_a_buddy_group() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let hosts = [ip("127.0.0.81"), ip("127.0.0.82"), ip("127.0.0.83")];
    let stops: Vec<Arc<AtomicBool>> = hosts
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let listeners = |i: usize| {
        [
            naming_server(hosts[i], Arc::clone(&stops[i])),
            naming_server(hosts[i], Arc::clone(&stops[i])),
            naming_server(hosts[i], Arc::clone(&stops[i])),
        ]
    };
    let per_host: Vec<[SocketAddr; 3]> = (0..3).map(listeners).collect();
    let app_hosts = [ip("127.0.0.84"), ip("127.0.0.85")];
    let never = Arc::new(AtomicBool::new(false));
    let app: Vec<SocketAddr> = app_hosts
        .iter()
        .map(|&h| naming_server(h, Arc::clone(&never)))
        .collect();
    // web hosts 81 and 82 → app host 84; 83 → 85.
    let app_of = |web: &str| {
        if web == "127.0.0.83" {
            "127.0.0.85"
        } else {
            "127.0.0.84"
        }
    };
    let pool = |k: usize| -> String {
        per_host
            .iter()
            .map(|h| format!("{{ address = \"{}\" }}", h[k]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let health =
        "health = { kind = \"tcp\", interval_ms = 100, timeout_ms = 200, rise = 1, fall = 1 }";
    let mut tms = Vec::new();
    let mut vips = Vec::new();
    let mut app_vips = Vec::new();
    for (n, id) in [1u32, 2].into_iter().enumerate() {
        let vip_addr = format!("127.0.0.{}", 91 + n);
        let (web, shop, hash) = (
            free_vip(&vip_addr),
            free_vip(&vip_addr),
            free_vip(&vip_addr),
        );
        let app_vip = free_vip(&vip_addr);
        let admin = free_vip("127.0.0.1").port();
        let dir = tmd_dir(&format!("buddy{id}"));
        std::fs::write(
            dir.join("tmd.toml"),
            format!(
                "tm_id = {id}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
                 [[pool]]\nname = \"web\"\nservers = [{}]\n{health}\n\n\
                 [[pool]]\nname = \"shop\"\nservers = [{}]\n{health}\n\n\
                 [[pool]]\nname = \"hash\"\nmethod = \"source-hash\"\nservers = [{}]\n\n\
                 [[virtual_server]]\nname = \"web\"\nlisten = \"{web}\"\npool = \"web\"\npersistence = {{ v4_prefix = 32, timeout_ms = 60000 }}\n\n\
                 [[virtual_server]]\nname = \"shop\"\nlisten = \"{shop}\"\npool = \"shop\"\npersistence = {{ v4_prefix = 24, timeout_ms = 30000 }}\n\n\
                 [[virtual_server]]\nname = \"hash\"\nlisten = \"{hash}\"\npool = \"hash\"\n\n\
                 [[pool]]\nname = \"app\"\nservers = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n\n\
                 [[virtual_server]]\nname = \"app\"\nlisten = \"{app_vip}\"\npool = \"app\"\n\n\
                 [[buddy_group]]\nname = \"site\"\nvirtual_servers = [\"web\", \"shop\"]\n\n\
                 [[buddy_link]]\nfrom = \"web\"\nto = \"app\"\nhosts = [{{ from = \"127.0.0.81\", to = \"127.0.0.84\" }}, {{ from = \"127.0.0.82\", to = \"127.0.0.84\" }}, {{ from = \"127.0.0.83\", to = \"127.0.0.85\" }}]\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
                pool(0),
                pool(1),
                pool(2),
                app[0],
                app[1]
            ),
        )
        .expect("config");
        tms.push(spawn_tmd(dir, admin, "warn"));
        vips.push((web, shop, hash));
        app_vips.push(app_vip);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for &(web, shop, hash) in &vips {
        for vip in [web, shop, hash] {
            while named_by(ip("127.0.0.99"), vip).is_none() {
                assert!(Instant::now() < deadline, "tmd did not serve {vip}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let clients: Vec<IpAddr> = (100..120u8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    // Each client: web and shop through TM 1, then TM 2, then both again.
    let round = || -> Vec<String> {
        clients
            .iter()
            .map(|&c| {
                let seen: Vec<String> = [vips[0].0, vips[1].1, vips[1].0, vips[0].1]
                    .into_iter()
                    .map(|vip| named_by(c, vip).expect("an answer"))
                    .collect();
                assert!(
                    seen.iter().all(|h| *h == seen[0]),
                    "client {c}: one host across both TMs and both buddies: {seen:?}"
                );
                for vip in &app_vips {
                    assert_eq!(
                        named_by(c, *vip).as_deref(),
                        Some(app_of(&seen[0])),
                        "client {c}: app follows web's host {}",
                        seen[0]
                    );
                }
                seen[0].clone()
            })
            .collect()
    };
    let before = round();
    let used: std::collections::BTreeSet<&String> = before.iter().collect();
    assert!(used.len() >= 2, "clients spread over the hosts: {used:?}");
    // Source hash (no persistence): the same server on both TMs.
    for &c in &clients {
        assert_eq!(
            named_by(c, vips[0].2),
            named_by(c, vips[1].2),
            "source hash for {c}"
        );
    }
    // The first client's host stops: both TMs' health checks take it out.
    let gone = hosts
        .iter()
        .position(|h| h.to_string() == before[0])
        .expect("a host");
    stops[gone].store(true, Ordering::SeqCst);
    for &s in &per_host[gone] {
        let _ = TcpStream::connect(s); // wakes the accept loop, which then closes
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for t in &tms {
        loop {
            let m = http(t.admin, "GET", "/metrics", "").1;
            let down = [0, 1].iter().all(|&k| {
                metric(
                    &m,
                    &format!(
                        "tmd_server_up{{pool=\"{}\",server=\"{}\"}}",
                        ["web", "shop"][k],
                        per_host[gone][k]
                    ),
                ) == 0
                    && m.contains(&format!("server=\"{}\"", per_host[gone][k]))
            });
            if down {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the stopped host is still up: {m}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let after = round();
    for (i, c) in clients.iter().enumerate() {
        if before[i] == hosts[gone].to_string() {
            assert_ne!(after[i], before[i], "client {c} moved off the stopped host");
        } else {
            assert_eq!(after[i], before[i], "client {c} of a running host stays");
        }
    }
    // What a TM holds: the buddy group's bindings, counted.
    let (code, body) = http(tms[0].admin, "GET", "/persistence", "");
    assert_eq!(code, 200, "{body}");
    let v: control::api::PersistenceView = serde_json::from_str(&body).expect("json");
    assert_eq!(v.tm_id, 1);
    let site = v
        .domains
        .iter()
        .find(|d| d.name == "site")
        .expect("the buddy group");
    assert!(site.buddy_group);
    assert_eq!(
        (site.v4_prefix, site.timeout_ms),
        (32, 30_000),
        "merged: most granular, shortest"
    );
    // The 20 clients and the readiness probe's address.
    assert_eq!(site.bindings_total, 21);
    let moved = before
        .iter()
        .filter(|h| **h == hosts[gone].to_string())
        .count() as u64;
    assert_eq!(
        site.rebinds, moved,
        "one rebind per moved client on this TM"
    );
    // Every client that came back is off the stopped host (the probe's
    // address, which did not, keeps its binding until it expires).
    assert!(site
        .bindings
        .iter()
        .filter(|b| b.client != ip("127.0.0.99"))
        .all(|b| b.server != hosts[gone].to_string()));
    for t in tms {
        stop(t);
    }
}

#[test]
fn a_udp_session_in_a_moved_bucket_is_reported_as_pins_and_kept_past_its_idle_timeout() {
    let t = table();
    let server_sock = std::net::UdpSocket::bind((ip("127.0.0.34"), 0)).expect("udp server");
    let server = server_sock.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = server_sock.recv_from(&mut buf) {
                seen.lock().expect("lock").push(from);
                let _ = server_sock.send_to(&buf[..n], from);
            }
        });
    }
    let vip = std::net::UdpSocket::bind((ip("127.0.0.21"), 0))
        .and_then(|s| s.local_addr())
        .expect("free udp port");
    let dir = tmd_dir("udp-pins");
    let admin = free_vip("127.0.0.1").port();
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\ndrain_timeout_ms = 2000\n\n\
             [[pool]]\nname = \"dns\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = \"{vip}\"\npool = \"dns\"\nidle_timeout_ms = 300\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, admin, "warn");
    let ask = |c: &std::net::UdpSocket, msg: &[u8]| -> bool {
        let _ = c.send_to(msg, vip);
        let mut buf = [0u8; 2048];
        matches!(c.recv_from(&mut buf), Ok((n, from)) if &buf[..n] == msg && from == vip)
    };
    let client = std::net::UdpSocket::bind((ip("127.0.0.1"), 0)).expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ask(&client, b"ready?") {
        assert!(Instant::now() < deadline, "tmd did not answer");
    }
    let session = *seen.lock().expect("lock").last().expect("seen");
    // No transition: the server side (a self-source port) steers here and
    // is never pinned; the client side only if the running table steers it
    // to another TM (on loopback every client reaches this one).
    let pins = |body: &str| -> control::api::TmPins {
        serde_json::from_str(body.trim()).expect("a TM's pins")
    };
    let me = t.tm_index_by_id(TM_ID).expect("tm");
    let (code, body) = http(admin, "GET", "/transition/pins", "");
    assert_eq!(code, 200, "{body}");
    let idle = pins(&body);
    assert!(idle.ports.is_empty(), "{body}");
    for f in &idle.flows {
        assert_eq!(f.2, vip, "only client sides: {body}");
        assert_ne!(t.steer(&f.flow().expect("flow")).tm, me, "{body}");
    }
    // Drain this TM: in the next table it owns no bucket, so both sides of
    // the session live where another TM will steer them.
    let drained = t.failover(&[me]).expect("failover").table.with_version(2);
    let (code, body) = http(
        admin,
        "POST",
        "/transition/prepare",
        &allocation::file::render(&drained),
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(admin, "GET", "/transition/pins", "");
    assert_eq!(code, 200, "{body}");
    let p = pins(&body);
    assert_eq!(p.tm, TM_ID);
    assert_eq!(p.table, control::TableId::of(&drained));
    let local = client.local_addr().expect("client addr");
    let want = [
        control::api::PinnedFlow(proto::UDP, local, vip, 300),
        control::api::PinnedFlow(proto::UDP, server, session, 300),
    ];
    for w in want {
        assert!(p.flows.contains(&w), "{w:?} in {body}");
    }
    assert_eq!(
        p.ports,
        vec![control::api::HeldPort(session.ip(), session.port())]
    );
    // A TM's commit takes held ports, never pins.
    let id = control::TableId::of(&drained);
    let bad = format!(
        "{{\"version\":2,\"checksum\":\"{}\",\"pins\":[]}}",
        id.checksum
    );
    assert_eq!(http(admin, "POST", "/transition/commit", &bad).0, 400);
    let body = format!(
        "{{\"version\":2,\"checksum\":\"{}\",\"held\":[[\"127.0.0.30\",40000]]}}",
        id.checksum
    );
    let (code, answer) = http(admin, "POST", "/transition/commit", &body);
    assert_eq!(code, 200, "{answer}");
    // Idle well past its 300 ms timeout: the session was reported, so a
    // distributor may still pin it — tmd keeps it, same port (without the
    // report it would end: see udp_sessions_use_self_source_ports_and_end_when_idle).
    std::thread::sleep(Duration::from_millis(1200));
    assert!(ask(&client, b"still there?"));
    let again = *seen.lock().expect("lock").last().expect("seen");
    assert_eq!(again, session, "the reported session lives on");
    stop(tmd);
}

/// SIGHUP: tmd reads its admin endpoint's token and TLS files again — a
/// renewed certificate at the same paths (from another CA) and a new token
/// for new connections; the old CA and the old token are refused after.
#[test]
fn sighup_renews_the_admin_certificate_and_token() {
    use admin_http::client::{Client, Endpoint};
    use admin_http::tls::ClientTls;
    let dir = tmd_dir("tls-reload");
    let admin = free_vip("127.0.0.1").port();
    let vip = free_vip("127.0.0.44");
    let one = testkit::pki::Ca::new(&dir, "one");
    let node = one.server(&dir, "node", &["127.0.0.1"]);
    let write = |token: &str| {
        let cfg = format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"127.0.0.45:9\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{token}\"\n\n\
             [admin.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            node.cert.display(),
            node.key.display()
        );
        std::fs::write(dir.join("tmd.toml"), cfg).expect("config");
    };
    write("old-t0ken");
    let tmd = spawn_tmd(dir.clone(), admin, "warn");
    let trusting = |ca: &Path| {
        let tls = ClientTls {
            ca: Some(ca.to_path_buf()),
            cert: None,
            key: None,
        };
        Client::with_tls(Duration::from_secs(2), tls.load("tls").expect("client"))
    };
    let healthz = |c: &Client, token: &str| {
        let node = Endpoint {
            name: "tmd".into(),
            url: format!("https://127.0.0.1:{admin}"),
            token: Some(token.into()),
        };
        c.request(&node, "GET", "/healthz", None)
    };
    testkit::wait_for("healthz over HTTPS", || {
        matches!(healthz(&trusting(&one.pem), "old-t0ken"), Ok((200, _)))
    });
    let two = testkit::pki::Ca::new(&dir, "two");
    two.server(&dir, "node", &["127.0.0.1"]);
    write("n3w-t0ken");
    assert!(Command::new("kill")
        .args(["-HUP", &tmd.child.id().to_string()])
        .status()
        .expect("kill")
        .success());
    testkit::wait_for("the renewed certificate served", || {
        matches!(healthz(&trusting(&two.pem), "n3w-t0ken"), Ok((200, _)))
    });
    assert!(
        healthz(&trusting(&one.pem), "n3w-t0ken").is_err(),
        "the old CA still trusted"
    );
    assert_eq!(
        healthz(&trusting(&two.pem), "old-t0ken")
            .expect("answered")
            .0,
        401
    );
}

/// A server that answers `ping` lines (and closes), holds a `hold`
/// connection without ever reading again, and writes to a `blast` one
/// without end.
fn stubborn_server(addr: IpAddr) -> SocketAddr {
    let l = TcpListener::bind((addr, 0)).expect("bind server");
    let local = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = conn;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while line.last() != Some(&b'\n') {
                    match c.read(&mut b) {
                        Ok(1) => line.push(b[0]),
                        _ => return,
                    }
                }
                match line.as_slice() {
                    b"ping\n" => {
                        let _ = c.write_all(b"ping\n");
                    }
                    b"blast\n" => {
                        let chunk = [7u8; 65536];
                        while c.write_all(&chunk).is_ok() {}
                    }
                    _ => std::thread::sleep(Duration::from_secs(60)), // holds, never reads
                }
            });
        }
    });
    local
}

/// True once `c` is closed (EOF or reset) — false if a read waits `within`
/// and nothing comes (the connection is still open).
fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 65536];
    let _ = c.set_read_timeout(Some(Duration::from_millis(250)));
    while Instant::now() < deadline {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // what was in flight before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true, // reset
        }
    }
    false
}

/// The idle timeout counts bytes moved, not bytes offered: a server that
/// never reads (tmd's write to it blocked) or a client that never reads
/// (tmd's write to it blocked) is cut after `idle_timeout_ms` without
/// progress, with its SNAT port and its slot — not held forever.
#[test]
fn the_idle_timeout_fires_while_a_write_is_blocked() {
    let server = stubborn_server(ip("127.0.0.34"));
    let vip = free_vip("127.0.0.20");
    let tmd = start_with(
        "blocked",
        vip,
        server,
        "max_connections = 2\nidle_timeout_ms = 500",
        "drain_timeout_ms = 1000",
    );
    // A server that never reads: the client writes until every buffer on
    // the way is full, then waits.
    let mut c = TcpStream::connect(vip).expect("connect");
    c.write_all(b"hold\n").expect("hold");
    c.set_write_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let chunk = [1u8; 65536];
    let t0 = Instant::now();
    while c.write_all(&chunk).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the writes never blocked"
        );
    }
    assert!(
        closed_within(&mut c, Duration::from_secs(4)),
        "a connection whose server never reads is held past the idle timeout"
    );
    // A client that never reads: the server writes without end.
    let mut d = TcpStream::connect(vip).expect("connect");
    d.write_all(b"blast\n").expect("blast");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        closed_within(&mut d, Duration::from_secs(4)),
        "a connection whose client never reads is held past the idle timeout"
    );
    // Both slots free again (max_connections = 2).
    let mut e = TcpStream::connect(vip).expect("connect");
    let mut f = TcpStream::connect(vip).expect("connect");
    for s in [&mut e, &mut f] {
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        s.write_all(b"ping\n").expect("ping");
        let mut back = [0u8; 5];
        s.read_exact(&mut back)
            .expect("served: the slots were freed");
    }
    stop(tmd);
}

/// Out of descriptors: tmd raises its soft limit to the hard one and keeps
/// a budget below it, so clients beyond it are closed at once (counted),
/// never left to stall in the backlog; the open connections go on; the
/// admin endpoint answers; the log holds no flood of failed accepts. Run
/// under a hard limit of 128 (prlimit): 32 kept, a budget of 96
/// descriptors, 48 connections.
#[test]
fn out_of_descriptors_clients_are_refused_at_once_and_the_rest_keeps_working() {
    let (server, _) = echo_server(ip("127.0.0.35"));
    let vip = free_vip("127.0.0.21");
    let dir = tmd_dir("nofile");
    let admin = free_vip("127.0.0.1").port();
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nworkers = 1\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{server}\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    )
    .expect("config");
    let mut child = Command::new("prlimit")
        .args(["--nofile=64:128", "--"])
        .arg(env!("CARGO_BIN_EXE_tmd"))
        .args(["run", "--config"])
        .arg(dir.join("tmd.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tmd under prlimit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange(vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 100 clients that stay: the first 48 served, the others closed at once.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        match held(vip) {
            Some(c) => open.push(c),
            None => refused += 1,
        }
    }
    assert!(
        (44..=48).contains(&open.len()) && refused == 100 - open.len(),
        "{} served, {refused} refused",
        open.len()
    );
    // The admin endpoint answers; what was refused is counted.
    let (code, m) = testkit::http(("127.0.0.1", admin), "GET", "/metrics", None, "");
    assert_eq!(code, 200, "{m}");
    assert_eq!(metric(&m, "tmd_descriptors{state=\"budget\"}"), 96, "{m}");
    assert_eq!(
        metric(&m, "tmd_refused_total{reason=\"descriptors\",vs=\"web\"}"),
        refused as u64,
        "{m}"
    );
    // The open ones still work.
    for c in open.iter_mut().take(5) {
        c.write_all(b"x\n").expect("write");
        let mut b = [0u8; 2];
        c.read_exact(&mut b).expect("still served");
    }
    drop(open);
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(err.contains("file descriptors: limit 128"), "{err}");
    assert!(
        err.lines().filter(|l| l.contains("accept")).count() <= 3,
        "the log floods: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Port exhaustion does not mark healthy servers down: the health probe
/// that finds no self-source port toward a full server changes nothing
/// (it is not a failure of the server), so clients beyond the ports are
/// refused as `no_port` — never `no_server` — and the first one after a
/// port frees up is served at once, not after `rise` probes.
#[test]
fn port_exhaustion_leaves_healthy_servers_up() {
    let (server, _) = echo_server(ip("127.0.0.36"));
    let vip = free_vip("127.0.0.22");
    let dir = tmd_dir("exhausted");
    let admin = free_vip("127.0.0.1").port();
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {TM_ID}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nsnat_ports = \"65400-65499\"\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"{server}\" }}]\n\
             health = {{ kind = \"tcp\", interval_ms = 100, timeout_ms = 300, rise = 3, fall = 2 }}\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"{vip}\"\npool = \"web\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
    )
    .expect("config");
    let tmd = spawn_tmd(dir, admin, "warn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exchange(vip) {
        assert!(Instant::now() < deadline, "tmd did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every self-source port toward the server taken by a held connection.
    let mut open = Vec::new();
    while let Some(c) = held(vip) {
        open.push(c);
        assert!(open.len() <= 100, "more connections than ports");
    }
    assert!(!open.is_empty());
    // Twenty probe intervals with no port left: the server stays up.
    std::thread::sleep(Duration::from_secs(2));
    let m = http(admin, "GET", "/metrics", "").1;
    let up = format!("tmd_server_up{{pool=\"web\",server=\"{server}\"}}");
    assert_eq!(
        metric(&m, &up),
        1,
        "a healthy server marked down by port exhaustion: {m}"
    );
    assert!(held(vip).is_none(), "still full");
    let m = http(admin, "GET", "/metrics", "").1;
    assert_eq!(
        metric(&m, "tmd_refused_total{reason=\"no_server\",vs=\"web\"}"),
        0,
        "{m}"
    );
    assert!(
        metric(&m, "tmd_refused_total{reason=\"no_port\",vs=\"web\"}") >= 2,
        "{m}"
    );
    // One port back: the next client is served at once.
    drop(open.pop());
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        held(vip).is_some(),
        "a freed port serves the next client at once"
    );
    drop(open);
    stop(tmd);
}
