//! The admin plane's TLS on real handshakes: HTTPS with a server certificate, mutual TLS demanding a client certificate from one CA, refusals of every bad certificate on both sides, settings that cannot work refused by file, the client certificate named in what the handler sees, and the token compare taking as long whichever byte differs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_http::auth::AdminConfig;
use admin_http::client::{Client, Endpoint};
use admin_http::tls::{ClientTls, ServerTls};
use admin_http::{Limits, Reply, Request, Server};
use control::coordinator::CallError;
use testkit::pki::{Ca, Issued};

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<admin_http::server::ServerStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTPS endpoint on loopback whose `/who` answers the client
/// certificate's fingerprint (or "none").
fn start(tls: ServerTls) -> Running {
    let mut admin =
        AdminConfig::<0>::plain("127.0.0.1:0".parse().expect("addr"), Some("tok".into()));
    admin.tls = Some(tls);
    let server = Server::bind(&admin, Limits::default()).expect("bind");
    let addr = server.local_addr().expect("addr");
    let stats = server.stats();
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let handler = Arc::new(|req: Request| match req.path.as_str() {
        "/who" => Reply::text(200, req.client_cert.unwrap_or_else(|| "none".into())),
        _ => Reply::text(404, "no"),
    });
    let thread = std::thread::spawn(move || {
        let _ = server.serve(handler, &s);
    });
    Running {
        addr,
        stop,
        stats,
        thread: Some(thread),
    }
}

struct Pki {
    dir: testkit::Scratch,
    ca: Ca,
    server: Issued,
    client: Issued,
    /// A CA the endpoints do not trust, and a client certificate it signed.
    rogue: Ca,
    rogue_client: Issued,
}

fn pki(name: &str) -> Pki {
    let dir = testkit::Scratch::new(&format!("std-tls-{name}"));
    let ca = Ca::new(dir.path(), "cluster");
    let server = ca.server(dir.path(), "node", &["127.0.0.1"]);
    let client = ca.client(dir.path(), "operator");
    let rogue = Ca::new(dir.path(), "rogue");
    let rogue_client = rogue.client(dir.path(), "intruder");
    Pki {
        dir,
        ca,
        server,
        client,
        rogue,
        rogue_client,
    }
}

fn client(ca: Option<&Path>, id: Option<&Issued>) -> Client {
    let tls = ClientTls {
        ca: ca.map(Path::to_path_buf),
        cert: id.map(|i| i.cert.clone()),
        key: id.map(|i| i.key.clone()),
    };
    Client::with_tls(Duration::from_secs(5), tls.load("tls").expect("client TLS"))
}

fn who(c: &Client, addr: SocketAddr) -> Result<String, CallError> {
    let node = Endpoint {
        name: "node".into(),
        url: format!("https://{addr}"),
        token: Some("tok".into()),
    };
    c.ok_text(&node, "GET", "/who", None)
}

#[test]
fn https_with_a_server_certificate_and_refusals_of_what_is_not_trusted() {
    let p = pki("server");
    let r = start(ServerTls {
        cert: p.server.cert.clone(),
        key: p.server.key.clone(),
        client_ca: None,
    });
    // Trusting the cluster's CA: answered, no client certificate asked.
    assert_eq!(
        who(&client(Some(&p.ca.pem), None), r.addr).expect("answered"),
        "none\n"
    );
    // Trusting another CA, or none: the handshake fails, naming why.
    let e = who(&client(Some(&p.rogue.pem), None), r.addr).expect_err("untrusted");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let e = who(&Client::new(Duration::from_secs(5)), r.addr).expect_err("no CA");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // Plain HTTP to the HTTPS endpoint: no answer, a counted failure.
    let failed = r.stats.tls_failures.load(Ordering::Relaxed);
    let mut s = TcpStream::connect(r.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
        .expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!out.starts_with(b"HTTP/1.1 200"), "plain HTTP answered");
    testkit::wait_for("the failed handshake counted", || {
        r.stats.tls_failures.load(Ordering::Relaxed) > failed
    });
    // A certificate for another address is refused by the client.
    let other = p.ca.server(p.dir.path(), "elsewhere", &["10.9.9.9"]);
    let r2 = start(ServerTls {
        cert: other.cert,
        key: other.key,
        client_ca: None,
    });
    let e = who(&client(Some(&p.ca.pem), None), r2.addr).expect_err("wrong name");
    assert!(e.to_string().contains("not valid for name"), "{e}");
}

#[test]
fn mutual_tls_demands_a_client_certificate_from_the_configured_ca() {
    let p = pki("mutual");
    let r = start(ServerTls {
        cert: p.server.cert.clone(),
        key: p.server.key.clone(),
        client_ca: Some(p.ca.pem.clone()),
    });
    // The operator's certificate: answered, and the handler knows whose.
    let seen = who(&client(Some(&p.ca.pem), Some(&p.client)), r.addr).expect("answered");
    assert_eq!(seen.trim(), admin_http::tls::fingerprint(&p.client.der));
    // No client certificate, or one the rogue CA signed: refused in the handshake.
    for (c, what) in [
        (client(Some(&p.ca.pem), None), "no certificate"),
        (
            client(Some(&p.ca.pem), Some(&p.rogue_client)),
            "rogue certificate",
        ),
    ] {
        let before = r.stats.tls_failures.load(Ordering::Relaxed);
        let e = who(&c, r.addr).expect_err(what);
        assert!(matches!(e, CallError::NoAnswer(_)), "{what}: {e}");
        testkit::wait_for("the refusal counted", || {
            r.stats.tls_failures.load(Ordering::Relaxed) > before
        });
    }
    // A server certificate presented as a client's: wrong purpose, refused.
    let e =
        who(&client(Some(&p.ca.pem), Some(&p.server)), r.addr).expect_err("server cert as client");
    assert!(matches!(e, CallError::NoAnswer(_)), "{e}");
}

#[test]
fn tls_settings_that_cannot_work_are_refused_naming_the_file() {
    let p = pki("bad");
    let garbage = p.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = p.dir.path().join("missing.pem");
    let bind = |tls: ServerTls| {
        let mut admin = AdminConfig::<0>::plain("127.0.0.1:0".parse().expect("addr"), None);
        admin.tls = Some(tls);
        Server::bind(&admin, Limits::default())
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    let ok = ServerTls {
        cert: p.server.cert.clone(),
        key: p.server.key.clone(),
        client_ca: None,
    };
    let e = bind(ServerTls {
        cert: missing.clone(),
        ..ok.clone()
    });
    assert!(
        e.starts_with("admin.tls.cert ") && e.contains("missing.pem"),
        "{e}"
    );
    let e = bind(ServerTls {
        cert: garbage.clone(),
        ..ok.clone()
    });
    assert!(
        e.starts_with("admin.tls.cert ") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = bind(ServerTls {
        key: garbage.clone(),
        ..ok.clone()
    });
    assert!(
        e.starts_with("admin.tls.key ") && e.contains("no PEM private key"),
        "{e}"
    );
    // The key of another certificate.
    let e = bind(ServerTls {
        key: p.client.key.clone(),
        ..ok.clone()
    });
    assert!(e.starts_with("admin.tls.key:"), "{e}");
    let e = bind(ServerTls {
        client_ca: Some(garbage.clone()),
        ..ok.clone()
    });
    assert!(
        e.starts_with("admin.tls.client_ca ") && e.contains("garbage.pem"),
        "{e}"
    );
    // The client side: a certificate without its key, a key without the CA.
    let half = ClientTls {
        ca: Some(p.ca.pem.clone()),
        cert: Some(p.client.cert.clone()),
        key: None,
    };
    assert!(half
        .load("tls")
        .expect_err("half")
        .to_string()
        .contains("cert and key go together"));
    let no_ca = ClientTls {
        ca: None,
        cert: Some(p.client.cert.clone()),
        key: Some(p.client.key.clone()),
    };
    assert!(no_ca
        .load("tls")
        .expect_err("no CA")
        .to_string()
        .contains("ca is required"));
    let bad_ca = ClientTls {
        ca: Some(garbage),
        cert: None,
        key: None,
    };
    assert!(bad_ca
        .load("tls")
        .expect_err("bad CA")
        .to_string()
        .starts_with("tls.ca "));
}

/// The token compare looks at every byte: a guess wrong in its first byte
/// takes as long as one wrong in its last (an early exit would be about a
/// thousand times quicker on a 64 KiB token). Medians of many rounds, a
/// factor of 3 allowed: the machine's noise is far inside that.
#[test]
fn the_token_compare_takes_as_long_whichever_byte_differs() {
    let token = vec![b'a'; 64 * 1024];
    let mut first = token.clone();
    first[0] = b'b';
    let mut last = token.clone();
    *last.last_mut().expect("byte") = b'b';
    let time = |guess: &[u8]| {
        let mut runs: Vec<Duration> = (0..101)
            .map(|_| {
                let t = Instant::now();
                let eq = admin_http::auth::constant_time_eq(
                    std::hint::black_box(&token),
                    std::hint::black_box(guess),
                );
                let took = t.elapsed();
                assert!(!eq);
                took
            })
            .collect();
        runs.sort();
        runs[50]
    };
    let _ = time(&first); // warm up
    let (a, b) = (time(&first), time(&last));
    let ratio = a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    assert!(
        (1.0 / 3.0..3.0).contains(&ratio),
        "first-byte {a:?} vs last-byte {b:?}"
    );
    assert!(admin_http::auth::constant_time_eq(&token, &token.clone()));
}
