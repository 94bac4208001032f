//! The admin server against careless and hostile clients: slow bodies, idle connections by the hundred, pipelined requests never read, oversized heads and bodies — while `/healthz` keeps answering fast.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_http::auth::AdminConfig;
use admin_http::{Limits, Reply, Request, Server};

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(token: Option<&str>, limits: Limits) -> Running {
    let admin = AdminConfig::<0>::plain(
        "127.0.0.1:0".parse().expect("addr"),
        token.map(String::from),
    );
    let server = Server::bind(&admin, limits).expect("bind");
    let addr = server.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let handler = Arc::new(|req: Request| match req.path.as_str() {
        "/healthz" => Reply::text(200, "ok"),
        "/echo" => Reply::text(200, format!("{} bytes", req.body.len())),
        "/slow" => {
            std::thread::sleep(Duration::from_millis(1500));
            Reply::text(200, "slow")
        }
        _ => Reply::text(404, "no"),
    });
    let thread = std::thread::spawn(move || {
        server.serve(handler, &s).expect("serve");
    });
    Running {
        addr,
        stop,
        thread: Some(thread),
    }
}

fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

/// `/healthz` answered 200 within `within`.
fn healthy_within(addr: SocketAddr, token: Option<&str>, within: Duration) -> Duration {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let t0 = Instant::now();
    let (code, out) = request(
        addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
    );
    let took = t0.elapsed();
    assert_eq!(code, 200, "{out}");
    assert!(took < within, "healthz took {took:?}");
    took
}

#[test]
fn an_unauthenticated_slow_body_is_refused_on_its_head() {
    let r = start(Some("tok"), Limits::default());
    let mut s = TcpStream::connect(r.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nab")
        .expect("send");
    let t0 = Instant::now();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "at once, not after the body"
    );
    healthy_within(r.addr, Some("tok"), Duration::from_millis(100));
}

#[test]
fn a_trickled_body_times_out_while_health_answers() {
    let limits = Limits {
        body_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let r = start(None, limits);
    // Three clients trickle bodies a byte at a time.
    let trickles: Vec<_> = (0..3)
        .map(|_| {
            let addr = r.addr;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                    .expect("head");
                for _ in 0..20 {
                    if s.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut out = String::new();
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let _ = s.read_to_string(&mut out);
                out
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        healthy_within(r.addr, None, Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(100));
    }
    for t in trickles {
        let out = t.join().expect("trickle");
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }
}

#[test]
fn hundreds_of_idle_connections_neither_block_nor_kill_the_endpoint() {
    let limits = Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let r = start(None, limits);
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(r.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        healthy_within(r.addr, None, Duration::from_millis(100));
    }
    // A slow handler does not hold up a quick one.
    let slow = std::thread::spawn({
        let addr = r.addr;
        move || request(addr, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    });
    std::thread::sleep(Duration::from_millis(100));
    healthy_within(r.addr, None, Duration::from_millis(100));
    assert_eq!(slow.join().expect("slow").0, 200);
    drop(idle);
}

#[test]
fn pipelined_requests_never_read_are_cut_at_the_deadline() {
    let limits = Limits {
        deadline: Duration::from_secs(1),
        ..Limits::default()
    };
    let r = start(None, limits);
    let mut s = TcpStream::connect(r.addr).expect("connect");
    let one = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    // Write and never read.
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let _ = s.write_all(one.as_bytes());
    healthy_within(r.addr, None, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(1200));
    healthy_within(r.addr, None, Duration::from_millis(100));
}

#[test]
fn oversized_heads_and_bodies_are_refused() {
    let limits = Limits {
        max_body_bytes: 1000,
        ..Limits::default()
    };
    let r = start(None, limits);
    let (code, out) = request(
        r.addr,
        "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
    );
    assert_eq!(code, 413, "{out}");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (code, out) = request(r.addr, &big);
    assert!(code == 431 || code == 0, "refused or closed: {out}");
    // A chunked body past the limit.
    let chunked = format!(
        "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
        "b".repeat(2000)
    );
    let (code, out) = request(r.addr, &chunked);
    assert_eq!(code, 413, "{out}");
    let (code, out) = request(
        r.addr,
        "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(code, 200, "{out}");
    assert!(out.ends_with("3 bytes\n"), "{out}");
}

#[test]
fn the_loopback_rule() {
    let any = "0.0.0.0:0".parse().expect("addr");
    let e =
        Server::bind(&AdminConfig::<0>::plain(any, None), Limits::default()).expect_err("refused");
    assert!(e.to_string().contains("admin.token is required"), "{e}");
    let e = Server::bind(
        &AdminConfig::<0>::plain(any, Some("t".into())),
        Limits::default(),
    )
    .expect_err("refused");
    assert!(e.to_string().starts_with("admin.tls is required"), "{e}");
}
