//! UDP virtual servers: per-client sessions, each with its own server-side socket on a self-source port, ended after an idle timeout.
//!
//! The first datagram from a client picks a server and leases a
//! self-source port above the server's port; a socket bound to (SNAT
//! address, port) and connected to the server carries the session both
//! ways. Replies from the server steer back to this TM like TCP ones. A
//! session idle for the timeout is ended: its socket closes and its port
//! goes back.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allocation::rules::proto;
use allocation::Flow;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::VirtualServer;
use crate::snat::{ConnectError, Lease, MAX_PORT_RETRIES};

/// Largest datagram relayed.
pub const MAX_DATAGRAM: usize = 65_535;

struct Session {
    /// Its entry in the node's tables (what the TM reports as pinned flows).
    id: u64,
    upstream: Arc<UdpSocket>,
    server: usize,
    last: Arc<Mutex<Instant>>,
    reader: tokio::task::JoinHandle<()>,
    _lease: Lease,
    /// The descriptor its socket holds of the budget.
    _fds: crate::fds::FdGuard,
}

/// A UDP socket bound to `local` with SO_REUSEADDR: a self-source port is
/// leased per server, so sessions toward different servers may share it
/// (each socket is connected to its server: the kernel delivers a datagram
/// to the socket whose 4-tuple it matches).
fn bind_shared(local: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if local.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&local.into())?;
    UdpSocket::from_std(sock.into())
}

/// Binds a UDP socket to a leased self-source port and connects it to `server`.
async fn connect_udp(
    vs: &VirtualServer,
    server: SocketAddr,
) -> Result<(UdpSocket, Lease), ConnectError> {
    for _ in 0..MAX_PORT_RETRIES {
        let lease = vs.snat.lease(server, allocation::rules::proto::UDP)?;
        let sock = match bind_shared(SocketAddr::new(lease.addr, lease.port)) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                continue
            }
            Err(error) => return Err(ConnectError::Failed { server, error }),
        };
        sock.connect(server)
            .await
            .map_err(|error| ConnectError::Failed { server, error })?;
        return Ok((sock, lease));
    }
    Err(ConnectError::Busy(MAX_PORT_RETRIES, server))
}

/// Serves a UDP virtual server on `socket` until `stop` turns true.
pub async fn serve(vs: Arc<VirtualServer>, socket: UdpSocket, mut stop: watch::Receiver<bool>) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            log::error!(
                "{}: its socket has no local address ({e}): not served",
                vs.name
            );
            return;
        }
    };
    let socket = Arc::new(socket);
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(
        vs.idle_timeout
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10)),
    );
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("{}: receive: {e}", vs.name);
                        continue;
                    }
                };
                let s = match sessions.entry(client) {
                    Entry::Occupied(o) => o.into_mut(),
                    Entry::Vacant(v) => match open(&vs, &socket, client, local).await {
                        Some(s) => v.insert(s),
                        None => continue,
                    },
                };
                *s.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                // Addressed, though the socket is connected: a connected
                // UDP socket keeps the route it was connected with, and a
                // TM reaching its servers over several next hops (ECMP,
                // parallel back distributors) would send a session's
                // datagrams into a next hop that has failed until it comes
                // back; addressed, each takes the route lookup's live
                // choice (same socket, same port, no extra system call).
                match s.upstream.send_to(&buf[..n], vs.pool.servers[s.server]).await {
                    Ok(_) => {
                        vs.stats.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => log::debug!("{}: to server: {e}", vs.name),
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let idle = vs.idle_timeout;
                // A session a distributor may still pin stays (DESIGN §4):
                // its client would otherwise come back to a stranger.
                let now_ms = vs.tables.now_ms();
                let expired: Vec<SocketAddr> = sessions
                    .iter()
                    .filter(|(_, s)| now.duration_since(*s.last.lock().unwrap_or_else(|p| p.into_inner())) >= idle)
                    .filter(|(_, s)| vs.tables.kept_until_ms(s.id).is_none_or(|k| k <= now_ms))
                    .map(|(c, _)| *c)
                    .collect();
                for c in expired {
                    if let Some(s) = sessions.remove(&c) {
                        close(&vs, s);
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    for (_, s) in sessions.drain() {
        close(&vs, s);
    }
}

/// A new session for `client`, or `None` (refused, counted, logged).
async fn open(
    vs: &Arc<VirtualServer>,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    local: SocketAddr,
) -> Option<Session> {
    let st = &vs.stats;
    if st.active.load(Ordering::Acquire) >= vs.max_connections {
        st.refused_limit.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // One descriptor: the session's server-side socket.
    let Some(fds) = vs.fds.take(1) else {
        st.refused_fds.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let Some(i) = vs.pool.acquire(client.ip()) else {
        st.refused_no_server.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "{}: refusing {client}: no server of pool '{}' is up",
            vs.name,
            vs.pool.name
        );
        return None;
    };
    let server = vs.pool.servers[i];
    let (upstream, lease) = match connect_udp(vs, server).await {
        Ok(x) => x,
        Err(e) => {
            match e {
                ConnectError::Exhausted(_)
                | ConnectError::ReplyElsewhere { .. }
                | ConnectError::Busy(..)
                | ConnectError::NoAddress(_) => st.refused_ports.fetch_add(1, Ordering::Relaxed),
                _ => st.connect_failed.fetch_add(1, Ordering::Relaxed),
            };
            log::warn!("{}: refusing {client}: {e}", vs.name);
            vs.pool.release(i);
            return None;
        }
    };
    st.active.fetch_add(1, Ordering::AcqRel);
    st.total.fetch_add(1, Ordering::Relaxed);
    // Registered with both its sides, so a table change pins it here.
    let id = vs.tables.register(Flow::with_ports(
        proto::UDP,
        client.ip(),
        client.port(),
        local.ip(),
        local.port(),
    ));
    vs.tables.set_idle(
        id,
        vs.idle_timeout.as_millis().min(u128::from(u64::MAX)) as u64,
    );
    vs.tables.register_server(
        id,
        Flow::with_ports(
            proto::UDP,
            server.ip(),
            server.port(),
            lease.addr,
            lease.port,
        ),
    );
    let upstream = Arc::new(upstream);
    let last = Arc::new(Mutex::new(Instant::now()));
    let reader = {
        let (up, down, last, vs) = (
            Arc::clone(&upstream),
            Arc::clone(socket),
            Arc::clone(&last),
            Arc::clone(vs),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match up.recv(&mut buf).await {
                    Ok(n) => {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                        if down.send_to(&buf[..n], client).await.is_ok() {
                            vs.stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    // A connected UDP socket reports ICMP errors about earlier
                    // datagrams (port unreachable, fragmentation needed — the
                    // kernel has learned the smaller path MTU) on the next
                    // receive: the session goes on; it ends by idling out.
                    Err(e) if icmp_reported(&e) => {
                        log::debug!("{}: session to {server} for {client}: {e}", vs.name);
                    }
                    Err(e) => {
                        log::warn!("{}: session to {server} for {client}: {e}", vs.name);
                        break;
                    }
                }
            }
        })
    };
    Some(Session {
        id,
        upstream,
        server: i,
        last,
        reader,
        _lease: lease,
        _fds: fds,
    })
}

/// Errors a connected UDP socket reports for ICMP errors about datagrams it
/// sent (Linux errno values): port unreachable, fragmentation needed,
/// host or network unreachable, protocol errors.
fn icmp_reported(e: &std::io::Error) -> bool {
    const EPROTO: i32 = 71;
    const EMSGSIZE: i32 = 90;
    const ENETUNREACH: i32 = 101;
    const EHOSTUNREACH: i32 = 113;
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(EPROTO | EMSGSIZE | ENETUNREACH | EHOSTUNREACH)
    )
}

fn close(vs: &VirtualServer, s: Session) {
    s.reader.abort();
    vs.tables.unregister(s.id);
    vs.pool.release(s.server);
    vs.stats.active.fetch_sub(1, Ordering::AcqRel);
    // The lease is dropped with the session: the port goes back.
}
