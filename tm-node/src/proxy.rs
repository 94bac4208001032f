//! TCP virtual servers: accept on VIP:port, pick a server, connect from a self-source port, relay both ways until close or idle.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::balance::{Balancer, Candidate, Method};
use crate::relay::{relay, relay_from, RelayOptions};
use crate::snat::{self, ConnectError, Snat};

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
    /// Refused: the process's descriptor budget is spent (`crate::fds`).
    pub refused_fds: AtomicU64,
    /// Accepts that failed (out of descriptors, …).
    pub accept_errors: AtomicU64,
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
    /// Of those bytes (both ways), the ones spliced (never in user space).
    pub bytes_spliced: AtomicU64,
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
    /// Splice directions that move full buffers (`crate::relay`).
    pub splice: bool,
    /// Its persistence domain (its own, or its buddy group's), if configured.
    pub persistence: Option<Arc<crate::persist::Domain>>,
    /// The leader it follows (a buddy link), if any.
    pub follows: Option<Follow>,
    /// DNAT-only mode, with the tables its reply check reads.
    pub dnat_only: Option<Arc<crate::tables::Tables>>,
    /// The node's tables, where open connections are registered.
    pub tables: Arc<crate::tables::Tables>,
    /// The process's descriptor budget (shared by every virtual server).
    pub fds: Arc<crate::fds::FdBudget>,
    /// Counters.
    pub stats: VsStats,
}

impl VirtualServer {
    /// How its relays move bytes.
    fn relay_options(&self) -> RelayOptions {
        RelayOptions {
            idle: self.idle_timeout,
            splice: self.splice.then(|| Arc::clone(&self.fds)),
        }
    }

    /// Counts what a relay moved.
    fn account(&self, m: crate::relay::Moved) {
        self.stats.bytes_up.fetch_add(m.up, Ordering::Relaxed);
        self.stats.bytes_down.fetch_add(m.down, Ordering::Relaxed);
        self.stats
            .bytes_spliced
            .fetch_add(m.spliced, Ordering::Relaxed);
    }
}

/// Connects to `server` from the client's own address and port (DNAT-only):
/// IP_TRANSPARENT lets the socket bind an address this host does not own
/// (it needs CAP_NET_ADMIN; without it only local addresses bind, and the
/// caller falls back). IPv4 (IP_TRANSPARENT) and IPv6 (IPV6_TRANSPARENT).
async fn connect_transparent(
    client: SocketAddr,
    server: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(client),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    let transparent = match client {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => sock.set_ip_transparent_v6(true),
    };
    if let Err(e) = transparent {
        log::debug!("IP(V6)_TRANSPARENT: {e}");
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
    // Accepted connections inherit TCP_NODELAY (Linux): one system call
    // less per connection.
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// A worker is handed a connection another accepted only when it serves
/// at least this many fewer than the accepting one — and a quarter of the
/// accepting one's count: a hand-off wakes another thread, so the counts'
/// coming and going under many short connections is left alone
/// (measured: handing off at any difference of 2 cost 5–10 % of the new
/// connections per second on one core).
pub const HAND_OFF_SLACK: u64 = 2;

/// The worker runtimes accepted connections are spread over: each one's
/// handle and how many connections it serves now. SO_REUSEPORT spreads by
/// a hash of the addresses, not by load, so a few long connections can
/// pile on one worker; a connection accepted on a worker that serves
/// `HAND_OFF_SLACK` more than the least loaded is handed to that one (its
/// socket registers there: no system call more).
#[derive(Debug)]
pub struct Workers {
    handles: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
    active: Vec<AtomicU64>,
}

impl Workers {
    /// `n` workers (at least one), none started yet.
    pub fn new(n: usize) -> Self {
        Workers {
            handles: std::sync::OnceLock::new(),
            active: (0..n.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Once every worker's runtime is up: their handles, in worker order.
    /// False (nothing handed off, ever) if the count is wrong or they were
    /// set before.
    pub fn set_handles(&self, handles: Vec<tokio::runtime::Handle>) -> bool {
        handles.len() == self.active.len() && self.handles.set(handles).is_ok()
    }

    /// Counts a connection accepted on worker `me` on the worker that is
    /// to serve it (`pick`) until the guard drops.
    fn take(self: &Arc<Self>, me: usize) -> Serving {
        let w = self.pick(me);
        if let Some(a) = self.active.get(w) {
            a.fetch_add(1, Ordering::Relaxed);
        }
        Serving(Arc::clone(self), w)
    }

    /// Connections worker `w` serves now.
    pub fn serving(&self, w: usize) -> u64 {
        self.active.get(w).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// The worker to serve a connection accepted on worker `me`: `me`,
    /// unless the least loaded serves `HAND_OFF_SLACK` fewer (or the
    /// handles are not set yet).
    pub fn pick(&self, me: usize) -> usize {
        if self.handles.get().is_none() {
            return me;
        }
        let mine = self.serving(me);
        let (mut best, mut least) = (me, mine);
        for (i, a) in self.active.iter().enumerate() {
            let n = a.load(Ordering::Relaxed);
            if n < least {
                (best, least) = (i, n);
            }
        }
        if mine - least >= HAND_OFF_SLACK.max(mine / 4) {
            best
        } else {
            me
        }
    }
}

/// A connection counted on its worker until dropped.
struct Serving(Arc<Workers>, usize);

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(a) = self.0.active.get(self.1) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// `listener` registered with this runtime for readiness. `AsyncFd::new`
/// is deprecated because a caller could close the descriptor while it is
/// registered; here the AsyncFd owns the listener, nothing else can close
/// it, and dropping the AsyncFd deregisters before the listener closes.
#[allow(deprecated)]
fn register_listener(
    listener: std::net::TcpListener,
) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    AsyncFd::with_interest(listener, tokio::io::Interest::READABLE)
}

/// One accept4(2) on `listener`: the new socket (non-blocking, close-on-
/// exec, not yet registered with any runtime) and its peer.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    use rustix::net::SocketFlags;
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|l| {
            rustix::net::acceptfrom_with(l.get_ref(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
                .map_err(std::io::Error::from)
        }) {
            Ok(Ok((fd, Some(addr)))) => {
                if let Ok(peer) = SocketAddr::try_from(addr) {
                    return Ok((std::net::TcpStream::from(fd), peer));
                } // not an IP peer: closed
            }
            Ok(Ok((_, None))) => {} // no peer address: closed
            Ok(Err(e)) => return Err(e),
            Err(_) => {} // would block: the readiness is cleared
        }
    }
}

/// Accepts connections until `stop` turns true; each is handled on its own
/// task, on this worker (`me`) or the least-loaded one (`Workers`). A
/// failed accept (out of descriptors despite the budget: another
/// process's, the system's) is counted and backs off, 10 ms doubling to
/// 1 s; it is logged once a second with how many failed since, while every
/// open connection goes on being served.
pub async fn serve(
    vs: Arc<VirtualServer>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    workers: Arc<Workers>,
    me: usize,
) {
    // The address clients reach: the listener's, unless it is a wildcard
    // (then each connection's own, one getsockname each).
    let local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    // Accepted by hand (accept4), so that a connection registers with the
    // runtime of the worker that serves it.
    let listener = match listener.into_std().and_then(register_listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{}: the listener: {e}", vs.name);
            return;
        }
    };
    let mut backoff = Duration::ZERO;
    let mut failed_since_log = 0u64;
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            r = accept(&listener) => match r {
                Ok((client, peer)) => {
                    backoff = Duration::ZERO;
                    let vs = Arc::clone(&vs);
                    let serving = workers.take(me);
                    let w = serving.1;
                    let task = async move {
                        let _serving = serving;
                        // Registered with the runtime that runs this task.
                        match TcpStream::from_std(client) {
                            Ok(client) => handle(vs, client, peer, local).await,
                            Err(e) => log::warn!("{}: {peer}: registering the connection: {e}", vs.name),
                        }
                    };
                    match workers.handles.get().and_then(|h| h.get(w)) {
                        Some(h) if w != me => drop(h.spawn(task)),
                        _ => drop(tokio::spawn(task)),
                    }
                }
                Err(e) => {
                    vs.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    failed_since_log += 1;
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        log::warn!("{}: accept: {e} ({failed_since_log} failed accepts since the last line)", vs.name);
                        failed_since_log = 0;
                        last_log = Some(std::time::Instant::now());
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = stop.changed() => break,
        }
    }
}

async fn handle(
    vs: Arc<VirtualServer>,
    client: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) {
    let st = &vs.stats;
    // Two descriptors: the client's (already open) and the server's.
    let Some(_fds) = vs.fds.take(2) else {
        st.refused_fds.fetch_add(1, Ordering::Relaxed);
        return; // closed at once: the client sees it, nothing stalls
    };
    if st.active.fetch_add(1, Ordering::AcqRel) >= vs.max_connections {
        st.active.fetch_sub(1, Ordering::AcqRel);
        st.refused_limit.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let done = |vs: &VirtualServer| {
        vs.stats.active.fetch_sub(1, Ordering::AcqRel);
    };
    let local = local.unwrap_or_else(|| client.local_addr().unwrap_or(peer));
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
                    vs.account(relay(client, upstream, &vs.relay_options()).await);
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
    // The client's first bytes, if they are here already (a request sent
    // right after the handshake usually is): sent with the connect.
    let mut first = Vec::with_capacity(crate::relay::RELAY_BUFFER);
    let _ = rustix::io::read(&client, rustix::buffer::spare_capacity(&mut first));
    match snat::connect_first(&vs.snat, server, vs.connect_timeout, &first).await {
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
        Ok((upstream, lease, sent)) => {
            open.connected(server, SocketAddr::new(lease.addr, lease.port));
            st.total.fetch_add(1, Ordering::Relaxed);
            // TCP_NODELAY: the server's set before the connect, the
            // client's inherited from the listener.
            first.drain(..sent);
            let mut m = relay_from(client, upstream, &vs.relay_options(), first).await;
            m.up += sent as u64;
            vs.account(m);
            drop(lease);
        }
    }
    vs.pool.release(i);
    if let Some(a) = bound {
        a.end(peer.ip(), std::time::Instant::now());
    }
    done(&vs);
}

#[cfg(test)]
mod workers_test {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_loaded_worker_only_past_the_slack() {
        let w = Arc::new(Workers::new(3));
        assert_eq!(w.pick(0), 0, "no handles yet: where accepted");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(
            !w.set_handles(vec![rt.handle().clone()]),
            "a wrong count is refused"
        );
        assert!(w.set_handles(vec![rt.handle().clone(); 3]));
        assert!(!w.set_handles(vec![rt.handle().clone(); 3]), "set once");
        w.active[0].store(5, Ordering::Relaxed);
        w.active[1].store(4, Ordering::Relaxed);
        w.active[2].store(3, Ordering::Relaxed);
        assert_eq!(w.pick(0), 2, "5 against 3: handed off");
        assert_eq!(w.pick(1), 1, "4 against 3: within the slack, kept");
        assert_eq!(w.pick(2), 2);
        w.active[0].store(25, Ordering::Relaxed);
        w.active[2].store(20, Ordering::Relaxed);
        w.active[1].store(30, Ordering::Relaxed);
        assert_eq!(w.pick(0), 0, "25 against 20: less than a quarter, kept");
        assert_eq!(w.pick(1), 2, "30 against 20: handed off");
        let s = w.take(1);
        assert_eq!((s.1, w.serving(2)), (2, 21), "counted where it is served");
        drop(s);
        assert_eq!(w.serving(2), 20, "a connection's end is counted");
    }
}
