//! Server-side connections from self-source ports: connect from a leased (SNAT address, port) whose replies the table steers back to this TM — the leases and their allocator are `tm_core::snat`'s.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

pub use tm_core::snat::*;

fn in_use(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}

/// Connects to `server` from a self-source port: lease, bind with
/// SO_REUSEADDR, connect; on address-in-use the next port.
pub async fn connect(
    snat: &Arc<Snat>,
    server: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Lease), ConnectError> {
    for _ in 0..MAX_PORT_RETRIES {
        let lease = snat.lease(server, allocation::rules::proto::TCP)?;
        let socket = if server.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|error| ConnectError::Failed { server, error })?;
        socket
            .set_reuseaddr(true)
            .map_err(|error| ConnectError::Failed { server, error })?;
        if let Err(e) = socket.bind(SocketAddr::new(lease.addr, lease.port)) {
            if in_use(&e) {
                continue; // the lease drops: the port goes back, the cursor has moved on
            }
            return Err(ConnectError::Failed { server, error: e });
        }
        match tokio::time::timeout(timeout, socket.connect(server)).await {
            Err(_) => return Err(ConnectError::Timeout(server)),
            Ok(Ok(stream)) => return Ok((stream, lease)),
            Ok(Err(e)) if in_use(&e) => continue,
            Ok(Err(error)) => return Err(ConnectError::Failed { server, error }),
        }
    }
    Err(ConnectError::Busy(MAX_PORT_RETRIES, server))
}
