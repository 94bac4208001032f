//! Server-side connections from self-source ports: connect from a leased (SNAT address, port) whose replies the table steers back to this TM, the client's first bytes sent with the connect — the leases and their allocator are `tm_core::snat`'s.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use tm_core::snat::*;

fn in_use(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}

/// Connects to `server` from a self-source port: lease, bind with
/// SO_REUSEADDR, connect; on address-in-use the next port. Health probes
/// use it; proxied connections use [`connect_first`], which it is with no
/// first bytes.
pub async fn connect(
    snat: &Arc<Snat>,
    server: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Lease), ConnectError> {
    let (stream, lease, _) = connect_first(snat, server, timeout, &[]).await?;
    Ok((stream, lease))
}

/// Connects to `server` from a self-source port (lease, bind with
/// SO_REUSEADDR, connect; on address-in-use the next port), with the
/// client's first bytes (`first`, maybe none)
/// sent as soon as the connection is up: the number of them written is
/// returned too. A connection to a near server is often established by
/// the time connect(2) returns `EINPROGRESS` (loopback, a host on the same
/// switch): a write that succeeds then proves it, and the wait for the
/// connect's completion (an event loop turn, SO_ERROR) is saved — HAProxy
/// does the same. A write that would block means still connecting: then
/// as `connect` (writable within `timeout`, SO_ERROR). Any other error
/// of that write is the connect's (refused, unreachable).
pub async fn connect_first(
    snat: &Arc<Snat>,
    server: SocketAddr,
    timeout: Duration,
    first: &[u8],
) -> Result<(TcpStream, Lease, usize), ConnectError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let failed = |error| ConnectError::Failed { server, error };
    for _ in 0..MAX_PORT_RETRIES {
        let lease = snat.lease(server, allocation::rules::proto::TCP)?;
        let sock = Socket::new(
            Domain::for_address(server),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
        .map_err(failed)?;
        sock.set_reuse_address(true).map_err(failed)?;
        if let Err(e) = sock.bind(&SocketAddr::new(lease.addr, lease.port).into()) {
            if in_use(&e) {
                continue; // the lease drops: the port goes back, the cursor has moved on
            }
            return Err(failed(e));
        }
        sock.set_tcp_nodelay(true).map_err(failed)?;
        match sock.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
            Err(e) if in_use(&e) => continue,
            Err(e) => return Err(failed(e)),
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(sock)).map_err(failed)?;
        if !first.is_empty() {
            match rustix::io::write(&stream, first) {
                Ok(n) => return Ok((stream, lease, n)), // established
                Err(rustix::io::Errno::AGAIN) => {}     // still connecting
                Err(e) if in_use(&e.into()) => continue,
                Err(e) => return Err(failed(e.into())),
            }
        }
        match tokio::time::timeout(timeout, stream.writable()).await {
            Err(_) => return Err(ConnectError::Timeout(server)),
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(())) => match stream.take_error() {
                Ok(None) => return Ok((stream, lease, 0)),
                Ok(Some(e)) | Err(e) if in_use(&e) => continue,
                Ok(Some(e)) | Err(e) => return Err(failed(e)),
            },
        }
    }
    Err(ConnectError::Busy(MAX_PORT_RETRIES, server))
}
