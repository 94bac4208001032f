//! The relay on real loopback sockets: bulk bytes spliced intact both ways with the half-close passed on, a body a server sends from a file (sendfile(2), as nginx does) spliced through whole, copied intact when splicing is off or the descriptor budget has no room for a pipe, and a pipe left holding bytes by the idle timeout never reused.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tm_node::fds::FdBudget;
use tm_node::relay::{relay, Moved, RelayOptions};

/// Byte `i` of a test stream (`seed` tells the two directions apart).
fn pattern(seed: u8, i: usize) -> u8 {
    (i.wrapping_mul(31).wrapping_add(seed as usize) % 251) as u8
}

/// Writes `n` pattern bytes, in chunks of `chunk`.
fn send(s: &mut TcpStream, seed: u8, n: usize, chunk: usize) {
    let mut at = 0;
    let mut buf = vec![0u8; chunk];
    while at < n {
        let k = chunk.min(n - at);
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(seed, at + j);
        }
        s.write_all(&buf[..k]).expect("write");
        at += k;
    }
}

/// Reads to the end of the stream: how many bytes, and whether each was the pattern's.
fn receive(s: &mut TcpStream, seed: u8) -> (usize, bool) {
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut intact) = (0usize, true);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (n, intact),
            Ok(k) => {
                intact &= buf[..k]
                    .iter()
                    .enumerate()
                    .all(|(j, &b)| b == pattern(seed, n + j));
                n += k;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A server that reads the client's stream to its end (the half-close),
/// then answers `answer` bytes and closes; it reports what it read.
fn half_close_server(answer: usize) -> (SocketAddr, std::sync::mpsc::Receiver<(usize, bool)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        let got = receive(&mut c, 1);
        let _ = tx.send(got);
        send(&mut c, 2, answer, 100_000);
    });
    (addr, rx)
}

/// A current-thread runtime: one thread, one pipe pool.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// On `rt`: a client on a new listener, driven by `client` on its own
/// thread, relayed to `server` (the relay must end within 30 s).
fn relay_one<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    server: SocketAddr,
    opts: &RelayOptions,
    client: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (Moved, T) {
    let front = TcpListener::bind("127.0.0.1:0").expect("bind front");
    let vip = front.local_addr().expect("addr");
    let c = std::thread::spawn(move || client(TcpStream::connect(vip).expect("connect")));
    let moved = rt.block_on(async move {
        front.set_nonblocking(true).expect("nonblocking");
        let front = tokio::net::TcpListener::from_std(front).expect("listener");
        let (a, _) = front.accept().await.expect("accept");
        let b = tokio::net::TcpStream::connect(server)
            .await
            .expect("connect server");
        tokio::time::timeout(Duration::from_secs(30), relay(a, b, opts))
            .await
            .expect("the relay ended")
    });
    (moved, c.join().expect("client"))
}

/// As `relay_one`, on a runtime of its own.
fn through_relay<T: Send + 'static>(
    server: SocketAddr,
    opts: RelayOptions,
    client: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (Moved, T) {
    relay_one(&runtime(), server, &opts, client)
}

const UP: usize = 24 << 20;
const DOWN: usize = 40 << 20;

/// Sends `UP` bytes, half-closes, reads the answer to its end.
fn bulk_client(mut s: TcpStream) -> (usize, bool) {
    send(&mut s, 1, UP, 1 << 20);
    s.shutdown(Shutdown::Write).expect("half-close");
    receive(&mut s, 2)
}

#[test]
fn bulk_bytes_are_spliced_intact_both_ways_and_the_half_close_passes() {
    let budget = Arc::new(FdBudget::new(1024));
    let (server, read) = half_close_server(DOWN);
    let opts = RelayOptions {
        idle: Duration::from_secs(10),
        splice: Some(Arc::clone(&budget)),
    };
    let (moved, answer) = through_relay(server, opts, bulk_client);
    assert_eq!(
        read.recv().expect("server"),
        (UP, true),
        "the server read the client's bytes, in order, then the end"
    );
    assert_eq!(answer, (DOWN, true), "the client read the server's answer");
    assert_eq!((moved.up, moved.down), (UP as u64, DOWN as u64));
    assert!(
        moved.spliced > (UP + DOWN) as u64 * 9 / 10,
        "bulk bytes are spliced, not copied: {moved:?}"
    );
    // Pipes are held only with bytes in them: every pipe left is pooled,
    // empty, and the only descriptors the budget still counts.
    assert!(budget.used() <= 2 * tm_node::relay::POOL_PER_THREAD as u64);
    assert_eq!(budget.used(), 2 * tm_node::relay::pooled_here() as u64);
}

#[test]
fn without_splicing_or_without_room_for_a_pipe_bytes_are_copied_intact() {
    for (what, splice) in [
        ("splicing off", None),
        (
            "no descriptor left for a pipe",
            Some(Arc::new(FdBudget::new(10))),
        ),
    ] {
        let (server, read) = half_close_server(DOWN);
        let opts = RelayOptions {
            idle: Duration::from_secs(10),
            splice,
        };
        let (moved, answer) = through_relay(server, opts, bulk_client);
        assert_eq!(read.recv().expect("server"), (UP, true), "{what}");
        assert_eq!(answer, (DOWN, true), "{what}");
        assert_eq!(
            moved,
            Moved {
                up: UP as u64,
                down: DOWN as u64,
                spliced: 0
            },
            "{what}"
        );
    }
}

/// The idle timeout ends a relay whose server never reads, with bytes in
/// its pipe; the next relay on the same thread gets a clean pipe — not
/// the stale bytes of the last one.
#[test]
fn a_pipe_the_idle_timeout_leaves_holding_bytes_is_never_reused() {
    let budget = Arc::new(FdBudget::new(1024));
    let rt = runtime();
    // A server that never reads (holds the connection 5 s).
    let deaf = TcpListener::bind("127.0.0.1:0").expect("bind");
    let deaf_addr = deaf.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (c, _) = deaf.accept().expect("accept");
        std::thread::sleep(Duration::from_secs(5));
        drop(c);
    });
    let opts = RelayOptions {
        idle: Duration::from_millis(400),
        splice: Some(Arc::clone(&budget)),
    };
    // A client that writes until every buffer on the way is full.
    let (first, sent) = relay_one(&rt, deaf_addr, &opts, |mut s| {
        s.set_write_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let chunk = vec![0xEEu8; 1 << 16];
        let mut sent = 0usize;
        while s.write_all(&chunk).is_ok() && sent < (256 << 20) {
            sent += chunk.len();
        }
        sent
    });
    assert!(sent > 0);
    assert!(
        first.spliced > 0,
        "the blocked relay was splicing: {first:?}"
    );
    assert_eq!(
        budget.used(),
        2 * tm_node::relay::pooled_here() as u64,
        "the pipe left with bytes in it was closed, its descriptors given back"
    );
    // The next relay, on this thread: only its own bytes arrive.
    let (server, read) = half_close_server(DOWN);
    let (second, answer) = relay_one(&rt, server, &opts, bulk_client);
    assert_eq!(
        read.recv().expect("server"),
        (UP, true),
        "no stale bytes upstream"
    );
    assert_eq!(answer, (DOWN, true));
    assert!(second.spliced > 0);
}

/// A server answering from a file with sendfile(2) (std's `io::copy` from
/// a file to a socket), as nginx does: page-backed segments whose splices
/// come back short with bytes still queued — the relay must not take a
/// short splice for a drained socket (it stalled at ~4 MB when it did).
#[test]
fn a_body_sent_from_a_file_is_spliced_through_whole() {
    let dir = testkit::Scratch::new("relay-sendfile");
    let path = dir.path().join("body");
    let body: Vec<u8> = (0..DOWN).map(|i| pattern(2, i)).collect();
    std::fs::write(&path, &body).expect("write body");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        // A request first, as HTTP: the body only once it has come.
        let mut req = [0u8; 4];
        c.read_exact(&mut req).expect("request");
        let mut f = std::fs::File::open(&path).expect("open");
        std::io::copy(&mut f, &mut c).expect("sendfile");
        // Keep-alive, as nginx: no FIN after the body (a FIN would make the
        // socket readable again and hide a stall); wait for the client.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let budget = Arc::new(FdBudget::new(1024));
    let opts = RelayOptions {
        idle: Duration::from_secs(5),
        splice: Some(budget),
    };
    let (moved, got) = through_relay(server, opts, |mut s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET\n").expect("request");
        // The body's length, as a client that knows it (Content-Length),
        // read as curl does, 16 KiB at a time.
        let mut buf = vec![0u8; 16 << 10];
        let (mut n, mut intact) = (0usize, true);
        while n < DOWN {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break, // closed, or stalled 10 s
                Ok(k) => {
                    intact &= buf[..k]
                        .iter()
                        .enumerate()
                        .all(|(j, &b)| b == pattern(2, n + j));
                    n += k;
                }
            }
        }
        (n, intact)
    });
    assert_eq!(got, (DOWN, true), "the whole body, in order: {moved:?}");
    assert!(moved.spliced > DOWN as u64 / 2, "{moved:?}");
}
