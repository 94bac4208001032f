//! TCP virtual servers: accept on VIP:port, pick a server, connect from a self-source port, relay both ways until close or idle.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balance::{Balancer, Candidate, Method};
use crate::snat::{self, ConnectError, Snat};

/// Relay buffer per direction.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// A pool of real servers and its balancing state.
#[derive(Debug)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Server addresses.
    pub servers: Vec<SocketAddr>,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    balancer: Balancer,
    candidates: Vec<Candidate>,
}

impl Pool {
    /// A pool of `servers` (address, weight), all up.
    pub fn new(
        name: &str,
        method: Method,
        servers: &[(SocketAddr, u32)],
        key: allocation::HashKey,
    ) -> Self {
        Pool {
            name: name.to_string(),
            servers: servers.iter().map(|s| s.0).collect(),
            state: Mutex::new(PoolState {
                balancer: Balancer::new(
                    method,
                    &servers.iter().map(|s| s.0).collect::<Vec<_>>(),
                    key,
                ),
                candidates: servers
                    .iter()
                    .map(|&(_, weight)| Candidate {
                        weight,
                        up: true,
                        active: 0,
                    })
                    .collect(),
            }),
        }
    }

    /// Counts a connection on server `i` if it is up (persistence).
    pub fn acquire_server(&self, i: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.candidates.get_mut(i) {
            Some(c) if c.up && c.weight > 0 => {
                c.active += 1;
                true
            }
            _ => false,
        }
    }

    /// Per server: up with a non-zero weight.
    pub fn usable_all(&self) -> Vec<bool> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.candidates.iter().map(|c| c.up && c.weight > 0).collect()
    }

    /// True if server `i` is up with a non-zero weight.
    pub fn usable(&self, i: usize) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.candidates.get(i).is_some_and(|c| c.up && c.weight > 0)
    }

    /// Picks a server for `client` and counts the connection as active on it.
    pub fn acquire(&self, client: IpAddr) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let PoolState {
            balancer,
            candidates,
        } = &mut *st;
        let i = balancer.pick(candidates, client)?;
        candidates[i].active += 1;
        Some(i)
    }

    /// A connection to server `i` ended.
    pub fn release(&self, i: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = st.candidates.get_mut(i) {
            c.active = c.active.saturating_sub(1);
        }
    }

    /// Marks server `i` up or down (health checks).
    pub fn set_up(&self, i: usize, up: bool) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = st.candidates.get_mut(i) {
            c.up = up;
        }
    }

    /// Health state per server.
    pub fn up(&self) -> Vec<bool> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .candidates
            .iter()
            .map(|c| c.up)
            .collect()
    }

    /// Active connections per server.
    pub fn active(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .candidates
            .iter()
            .map(|c| c.active)
            .collect()
    }
}

/// A buddy link from the follower's side: the leader's pool and
/// persistence, and the host map.
#[derive(Debug)]
pub struct Follow {
    /// The leading virtual server's name.
    pub leader_name: String,
    /// Its pool.
    pub leader_pool: Arc<Pool>,
    /// Its persistence domain.
    pub leader: Arc<crate::persist::Domain>,
    /// Leader host → this virtual server's host (unlisted: the same host).
    pub hosts: Vec<(IpAddr, IpAddr)>,
}

impl Follow {
    /// The server of `pool` (an index) on the host the leader would send
    /// `client` to, if one is usable there, counted active on it.
    fn pick(&self, pool: &Pool, client: IpAddr, now: std::time::Instant) -> Option<usize> {
        let usable = self.leader_pool.usable_all();
        let li = self
            .leader
            .peek(client, &self.leader_pool.servers, &usable, now)?;
        let lh = self.leader_pool.servers.get(li)?.ip();
        let host = self
            .hosts
            .iter()
            .find(|(a, _)| *a == lh)
            .map_or(lh, |&(_, b)| b);
        let mine = pool.usable_all();
        let i = pool
            .servers
            .iter()
            .enumerate()
            .find(|(i, s)| mine.get(*i).copied().unwrap_or(false) && s.ip() == host)?
            .0;
        pool.acquire_server(i).then_some(i)
    }
}

/// Counters of a virtual server.
#[derive(Debug, Default)]
pub struct VsStats {
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections accepted and relayed.
    pub total: AtomicU64,
    /// Refused: the connection limit was reached.
    pub refused_limit: AtomicU64,
    /// Refused: no server up.
    pub refused_no_server: AtomicU64,
    /// Refused: no self-source port left.
    pub refused_ports: AtomicU64,
    /// The server connection failed or timed out.
    pub connect_failed: AtomicU64,
    /// Buddy link: connections sent to the leader's host.
    pub followed: AtomicU64,
    /// Buddy link: connections whose leader's host had no usable server here.
    pub follow_missed: AtomicU64,
    /// DNAT-only: connections that kept the client's address.
    pub dnat_kept: AtomicU64,
    /// DNAT-only: connections that fell back to a self-source port.
    pub dnat_fallback: AtomicU64,
    /// Bytes from clients to servers.
    pub bytes_up: AtomicU64,
    /// Bytes from servers to clients.
    pub bytes_down: AtomicU64,
}

/// One TCP virtual server.
#[derive(Debug)]
pub struct VirtualServer {
    /// Name.
    pub name: String,
    /// The pool it forwards to.
    pub pool: Arc<Pool>,
    /// Self-source ports.
    pub snat: Arc<Snat>,
    /// Most connections open at once.
    pub max_connections: u64,
    /// Server connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout (no byte in either direction).
    pub idle_timeout: Duration,
    /// Its persistence domain (its own, or its buddy group's), if configured.
    pub persistence: Option<Arc<crate::persist::Domain>>,
    /// The leader it follows (a buddy link), if any.
    pub follows: Option<Follow>,
    /// DNAT-only mode, with the tables its reply check reads.
    pub dnat_only: Option<Arc<crate::tables::Tables>>,
    /// The node's tables, where open connections are registered.
    pub tables: Arc<crate::tables::Tables>,
    /// Counters.
    pub stats: VsStats,
}

/// Connects to `server` from the client's own address and port (DNAT-only):
/// IP_TRANSPARENT lets the socket bind an address this host does not own
/// (it needs CAP_NET_ADMIN; without it only local addresses bind, and the
/// caller falls back). IPv4.
async fn connect_transparent(
    client: SocketAddr,
    server: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if let Err(e) = sock.set_ip_transparent(true) {
        log::debug!("IP_TRANSPARENT: {e}");
    }
    sock.set_nonblocking(true)?;
    sock.bind(&client.into())?;
    let std_stream: std::net::TcpStream = sock.into();
    let tsock = tokio::net::TcpSocket::from_std_stream(std_stream);
    tokio::time::timeout(timeout, tsock.connect(server))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A listener on `addr` with SO_REUSEADDR and SO_REUSEPORT, so that every
/// worker thread can have its own (the kernel spreads connections). Call it
/// inside the runtime that will serve it.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Accepts connections until `stop` turns true; each is handled on its own task.
pub async fn serve(vs: Arc<VirtualServer>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((client, peer)) => {
                    let vs = Arc::clone(&vs);
                    tokio::spawn(async move { handle(vs, client, peer).await });
                }
                Err(e) => {
                    log::warn!("{}: accept: {e}", vs.name);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

async fn handle(vs: Arc<VirtualServer>, client: TcpStream, peer: SocketAddr) {
    let st = &vs.stats;
    if st.active.fetch_add(1, Ordering::AcqRel) >= vs.max_connections {
        st.active.fetch_sub(1, Ordering::AcqRel);
        st.refused_limit.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let done = |vs: &VirtualServer| {
        vs.stats.active.fetch_sub(1, Ordering::AcqRel);
    };
    let local = client.local_addr().unwrap_or(peer);
    let open = vs.tables.open(peer, local);
    open.idle(vs.idle_timeout);
    let now = std::time::Instant::now();
    // Persistence: the client's binding if alive and its server usable,
    // else the rendezvous winner every TM computes alike. Twice at most: a
    // server that went down between the look and the count is looked past.
    // A buddy link first: the leader's host for this client, if usable here.
    let followed = vs.follows.as_ref().and_then(|f| {
        let i = f.pick(&vs.pool, peer.ip(), now);
        let c = if i.is_some() {
            &st.followed
        } else {
            &st.follow_missed
        };
        c.fetch_add(1, Ordering::Relaxed);
        i
    });
    // The domain that counted this connection open (and ends it), if any.
    let bound = if followed.is_none() {
        vs.persistence.as_deref()
    } else {
        None
    };
    let picked = match (&vs.persistence, followed) {
        (_, Some(i)) => Some(i),
        (Some(d), None) => {
            let mut got = None;
            for _ in 0..2 {
                let usable = vs.pool.usable_all();
                let Some(i) = d.choose(peer.ip(), &vs.pool.servers, &usable, now) else {
                    break;
                };
                if vs.pool.acquire_server(i) {
                    got = Some(i);
                    break;
                }
                d.end(peer.ip(), now);
            }
            got
        }
        (None, None) => vs.pool.acquire(peer.ip()),
    };
    let Some(i) = picked else {
        st.refused_no_server.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "{}: refusing {peer}: no server of pool '{}' is up",
            vs.name,
            vs.pool.name
        );
        done(&vs);
        return;
    };
    let server = vs.pool.servers[i];
    // DNAT-only: keep the client's address if the server's reply (server →
    // client) comes back here under every table in force (or follows the
    // client's own packets: `Tables::dnat_reply_home`); otherwise, or if
    // the transparent connect fails, a self-source port.
    if let Some(tables) = &vs.dnat_only {
        let tcp = allocation::rules::proto::TCP;
        let reply =
            allocation::Flow::with_ports(tcp, server.ip(), server.port(), peer.ip(), peer.port());
        let request =
            allocation::Flow::with_ports(tcp, peer.ip(), peer.port(), local.ip(), local.port());
        if peer.is_ipv4() == server.is_ipv4() && tables.dnat_reply_home(&request, &reply) {
            match connect_transparent(peer, server, vs.connect_timeout).await {
                Ok(upstream) => {
                    open.connected(server, peer);
                    st.dnat_kept.fetch_add(1, Ordering::Relaxed);
                    st.total.fetch_add(1, Ordering::Relaxed);
                    let (up, down) = relay(client, upstream, vs.idle_timeout).await;
                    st.bytes_up.fetch_add(up, Ordering::Relaxed);
                    st.bytes_down.fetch_add(down, Ordering::Relaxed);
                    vs.pool.release(i);
                    if let Some(a) = bound {
                        a.end(peer.ip(), std::time::Instant::now());
                    }
                    done(&vs);
                    return;
                }
                Err(e) => log::debug!(
                    "{}: {peer}: keeping the client address failed ({e}): self-source port",
                    vs.name
                ),
            }
        }
        st.dnat_fallback.fetch_add(1, Ordering::Relaxed);
    }
    match snat::connect(&vs.snat, server, vs.connect_timeout).await {
        Err(e) => {
            match e {
                ConnectError::Exhausted(_)
                | ConnectError::ReplyElsewhere { .. }
                | ConnectError::Busy(..)
                | ConnectError::NoAddress(_) => {
                    st.refused_ports.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    st.connect_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            log::warn!("{}: refusing {peer}: {e}", vs.name);
        }
        Ok((upstream, lease)) => {
            open.connected(server, SocketAddr::new(lease.addr, lease.port));
            st.total.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (up, down) = relay(client, upstream, vs.idle_timeout).await;
            st.bytes_up.fetch_add(up, Ordering::Relaxed);
            st.bytes_down.fetch_add(down, Ordering::Relaxed);
            drop(lease);
        }
    }
    vs.pool.release(i);
    if let Some(a) = bound {
        a.end(peer.ip(), std::time::Instant::now());
    }
    done(&vs);
}

/// Copies both ways until both sides have closed (half-closes passed on),
/// an error, or `idle` without a byte. Returns (client → server, server → client) bytes.
pub async fn relay(a: TcpStream, b: TcpStream, idle: Duration) -> (u64, u64) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let mut abuf = vec![0u8; RELAY_BUFFER];
    let mut bbuf = vec![0u8; RELAY_BUFFER];
    let (mut a_open, mut b_open) = (true, true);
    let (mut up, mut down) = (0u64, 0u64);
    let mut deadline = Instant::now() + idle;
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => match r {
                Ok(0) => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                Ok(n) => {
                    if bw.write_all(&abuf[..n]).await.is_err() {
                        break;
                    }
                    up += n as u64;
                    deadline = Instant::now() + idle;
                }
                Err(_) => break,
            },
            r = br.read(&mut bbuf), if b_open => match r {
                Ok(0) => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&bbuf[..n]).await.is_err() {
                        break;
                    }
                    down += n as u64;
                    deadline = Instant::now() + idle;
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    (up, down)
}
