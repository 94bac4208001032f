//! Port capacity per destination, on real sockets: 9,000 server-side connections held at once through one tmd from ONE SNAT address whose port range gives this TM about 4,000 self-source ports — fewer than half as many — to four server addresses, all established, self-source ports shared between servers (the 4-tuples unique). Its own process: it holds some 18,000 descriptors.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::metric;

const CONNECTIONS: usize = 9000;

struct Tmd(Child);
impl Drop for Tmd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server on `addr` that accepts and holds every connection, recording its peer.
fn holding_server(addr: SocketAddr, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    let l = TcpListener::bind(addr).expect("bind server");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming().flatten() {
            if let Ok(p) = conn.peer_addr() {
                peers.lock().expect("lock").push(p);
            }
            held.push(conn);
        }
    });
}

#[test]
fn nine_thousand_connections_from_one_snat_address_with_four_thousand_ports() {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise the descriptor limit");
    if limit < 19_500 {
        eprintln!("SKIPPED: the descriptor hard limit is {limit}; this test needs about 19,500 (tmd as many)");
        return;
    }
    let servers: Vec<SocketAddr> = (60..64)
        .map(|i| SocketAddr::new(IpAddr::from([127, 0, 0, i]), 1024))
        .collect();
    let peers = Arc::new(Mutex::new(Vec::new()));
    for &s in &servers {
        holding_server(s, Arc::clone(&peers));
    }
    let dir = std::env::temp_dir().join(format!("tmd-capacity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    allocation::file::save(dir.join("table.toml"), &testkit::uniform(4)).expect("table");
    let admin = testkit::free_port();
    let vip: SocketAddr = "127.0.0.64:7000".parse().expect("vip");
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ address = \"{s}\" }}"))
        .collect();
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = 2\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nsnat_ports = \"1025-17024\"\nworkers = 1\n\n\
             [[pool]]\nname = \"four\"\nservers = [{}]\n\n\
             [[virtual_server]]\nname = \"many\"\nlisten = \"{vip}\"\npool = \"four\"\nmax_connections = 20000\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            list.join(", ")
        ),
    )
    .expect("config");
    let _tmd = Tmd(Command::new(env!("CARGO_BIN_EXE_tmd"))
        .args(["run", "--config"])
        .arg(dir.join("tmd.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tmd"));
    let metrics = || testkit::http(("127.0.0.1", admin), "GET", "/metrics", None, "").1;
    testkit::wait_for("tmd's admin endpoint", || {
        metrics().contains("tmd_snat_ports")
    });
    // The range gives this TM (one of four) about a quarter of its 16,000
    // ports: fewer than half the connections to come.
    let own = metric(
        &metrics(),
        "tmd_snat_ports{address=\"127.0.0.30\",state=\"free\"}",
    ) as usize;
    assert!(
        own < CONNECTIONS / 2 && own > CONNECTIONS / servers.len(),
        "{own} self-source ports"
    );
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        clients.push(TcpStream::connect(vip).unwrap_or_else(|e| panic!("client {i}: {e}")));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while peers.lock().expect("lock").len() < CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "{} of {CONNECTIONS} server-side connections established",
            peers.lock().expect("lock").len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = metrics();
    assert_eq!(
        metric(&m, "tmd_connections_active{vs=\"many\"}"),
        CONNECTIONS as u64,
        "{m}"
    );
    assert_eq!(metric(&m, "tmd_refused_total"), 0, "{m}");
    // Every server-side connection from the one SNAT address, its port a
    // self-source port of the range; ports shared between servers.
    let seen = peers.lock().expect("lock").clone();
    assert!(seen
        .iter()
        .all(|p| p.ip() == IpAddr::from([127, 0, 0, 30]) && (1025..=17024).contains(&p.port())));
    let mut ports: Vec<u16> = seen.iter().map(|p| p.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert!(
        ports.len() <= own,
        "{} distinct self-source ports for {CONNECTIONS} connections ({own} this TM has)",
        ports.len()
    );
    // The clients still hold their connections: one byte is not refused.
    let mut probe = [0u8; 1];
    clients[0]
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    assert!(
        clients[0].read(&mut probe).is_err(),
        "the connection was closed"
    );
    drop(clients);
    let _ = std::fs::remove_dir_all(&dir);
}
