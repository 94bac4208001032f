//! Self-source port leases: a (SNAT address, port) whose replies the table steers back to this TM, from the `allocation` allocator, released on drop (the connecting is `tm_node::snat::connect`'s).
//!
//! The port comes from the `allocation` allocator for this node's TM index
//! and is greater than the server's port, so the server's reply hashes on
//! (SNAT address, port) — a bucket this TM owns. A port that is still in
//! use toward the same server (TIME_WAIT) makes `bind` or `connect` fail
//! with address-in-use: the next port is tried. When no port is left on
//! any SNAT address the connection is refused: never a port that would
//! steer the reply elsewhere.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use allocation::{AllocationTable, PortError, PortRange, SnatAllocator, TmIndex};
use thiserror::Error;

/// Address-in-use answers tolerated for one connection before giving up.
pub const MAX_PORT_RETRIES: usize = 32;

/// Why a server-side connection could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// No self-source port is free above the server port on any SNAT address of the family.
    #[error("no self-source port left: {0}")]
    Exhausted(PortError),
    /// No SNAT address of the server's address family.
    #[error("no SNAT address for {0}")]
    NoAddress(&'static str),
    /// The server did not answer in time.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// The connection failed.
    #[error("connect to {server}: {error}")]
    Failed {
        /// The server.
        server: SocketAddr,
        /// The error.
        error: io::Error,
    },
    /// Too many ports were in use (TIME_WAIT) one after the other.
    #[error("{0} self-source ports in a row were in use toward {1}")]
    Busy(usize, SocketAddr),
}

/// The self-source port allocators of one node: one per address family.
#[derive(Debug)]
pub struct Snat {
    tm_id: u32,
    range: PortRange,
    v4: Option<Mutex<SnatAllocator>>,
    v6: Option<Mutex<SnatAllocator>>,
}

/// A leased (address, port): released when dropped.
#[derive(Debug)]
pub struct Lease {
    snat: Arc<Snat>,
    /// The SNAT address.
    pub addr: IpAddr,
    /// The self-source port.
    pub port: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.snat.release(self.addr, self.port);
    }
}

impl Snat {
    /// Builds the self-port tables of TM `tm` for `addrs` under `table`.
    pub fn new(
        table: &AllocationTable,
        tm: TmIndex,
        addrs: &[IpAddr],
        range: PortRange,
    ) -> Result<Self, PortError> {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv4());
        let build = |list: &[IpAddr]| -> Result<Option<Mutex<SnatAllocator>>, PortError> {
            if list.is_empty() {
                Ok(None)
            } else {
                Ok(Some(Mutex::new(SnatAllocator::new(
                    table, tm, list, range,
                )?)))
            }
        };
        let tm_id = table.tm(tm).map_or(u32::MAX, |t| t.id);
        Ok(Snat {
            tm_id,
            range,
            v4: build(&v4)?,
            v6: build(&v6)?,
        })
    }

    /// This node's TM id (stable across tables).
    pub fn tm_id(&self) -> u32 {
        self.tm_id
    }

    fn family(&self, v4: bool) -> Result<&Mutex<SnatAllocator>, ConnectError> {
        if v4 {
            self.v4.as_ref().ok_or(ConnectError::NoAddress("IPv4"))
        } else {
            self.v6.as_ref().ok_or(ConnectError::NoAddress("IPv6"))
        }
    }

    /// Leases a self-source port above `server_port` for a server of the given family.
    pub fn lease(self: &Arc<Self>, v4: bool, server_port: u16) -> Result<Lease, ConnectError> {
        let alloc = self.family(v4)?;
        let mut a = alloc.lock().unwrap_or_else(|p| p.into_inner());
        let (addr, port) = a.allocate(server_port).map_err(ConnectError::Exhausted)?;
        Ok(Lease {
            snat: Arc::clone(self),
            addr,
            port,
        })
    }

    fn release(&self, addr: IpAddr, port: u16) {
        if let Ok(alloc) = self.family(addr.is_ipv4()) {
            let mut a = alloc.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = a.release(addr, port) {
                log::error!("releasing {addr}:{port}: {e}");
            }
        }
    }

    /// Recomputes the self-port tables for a new table (and, during a
    /// transition, only ports valid under both); leased ports stay
    /// reserved. This node is found in each table by its TM id — never by
    /// index, which shifts when a TM is removed. A node that owns no
    /// bucket of `table` has no port valid under both: see
    /// [`Snat::prepare_joining`].
    pub fn retable(
        &self,
        table: &AllocationTable,
        next: Option<&AllocationTable>,
    ) -> Result<(), PortError> {
        let tm = table
            .tm_index_by_id(self.tm_id)
            .ok_or(PortError::NotInTable(self.tm_id))?;
        let next = match next {
            Some(n) => Some((
                n,
                n.tm_index_by_id(self.tm_id)
                    .ok_or(PortError::NotInTable(self.tm_id))?,
            )),
            None => None,
        };
        for alloc in [&self.v4, &self.v6].into_iter().flatten() {
            alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retable(table, tm, next, self.range)?;
        }
        Ok(())
    }

    /// A transition's prepare for a node *joining* it: one that owns no
    /// bucket of the running table (added, or readmitted after a
    /// failover). It takes the ports `next` gives it except `held`, the
    /// (address, port) pairs the old owners still hold in buckets moving to
    /// it ([`Snat::moving_ports`] of every other node, taken after they
    /// prepared: from then on that set only shrinks). The distributors
    /// remember the connections it opens during the window (DESIGN §4), so
    /// the servers' answers reach it.
    pub fn prepare_joining(
        &self,
        next: &AllocationTable,
        held: &[(IpAddr, u16)],
    ) -> Result<(), PortError> {
        let tm = next
            .tm_index_by_id(self.tm_id)
            .ok_or(PortError::NotInTable(self.tm_id))?;
        for alloc in [&self.v4, &self.v6].into_iter().flatten() {
            alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .prepare_joining(next, tm, held, self.range)?;
        }
        Ok(())
    }

    /// True if this node owns no bucket of `table` (it would join a transition from it).
    pub fn joins_from(&self, table: &AllocationTable) -> bool {
        match table.tm_index_by_id(self.tm_id) {
            None => true,
            Some(i) => table
                .groups()
                .iter()
                .all(|g| g.buckets.as_slice().iter().all(|&o| o != i)),
        }
    }

    /// Ports in use whose replies would not steer to this TM under `next`:
    /// the open connections living in buckets a transition moves away.
    pub fn moving_ports(&self, next: &AllocationTable) -> Vec<(IpAddr, u16)> {
        let tm = next.tm_index_by_id(self.tm_id);
        let mut out = Vec::new();
        for m in [&self.v4, &self.v6].into_iter().flatten() {
            let a = m.lock().unwrap_or_else(|p| p.into_inner());
            for p in a.pools() {
                let valid = tm.and_then(|tm| {
                    allocation::SelfPorts::build(next, p.addr(), tm, self.range).ok()
                });
                out.extend(
                    p.used_ports()
                        .filter(|&port| valid.as_ref().is_none_or(|v| !v.contains(port)))
                        .map(|port| (p.addr(), port)),
                );
            }
        }
        out
    }

    /// How many of [`Snat::moving_ports`] there are.
    pub fn in_use_moving(&self, next: &AllocationTable) -> usize {
        self.moving_ports(next).len()
    }

    /// (address, ports in use, ports free) per SNAT address.
    pub fn usage(&self) -> Vec<(IpAddr, usize, usize)> {
        [&self.v4, &self.v6]
            .into_iter()
            .flatten()
            .flat_map(|m| {
                let a = m.lock().unwrap_or_else(|p| p.into_inner());
                a.pools()
                    .iter()
                    .map(|p| (p.addr(), p.in_use(), p.free()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use allocation::rules::proto;
    use allocation::{Flow, HashKey, Profile};

    fn table() -> AllocationTable {
        testkit::table(1, HashKey::from_bytes([1; 16]), 4, Profile::Uniform)
    }

    #[test]
    fn a_node_is_found_by_id_in_every_table() {
        let t = table();
        let snat = Arc::new(
            Snat::new(
                &t,
                3,
                &["10.1.0.1".parse().expect("addr")],
                PortRange {
                    lo: 1024,
                    hi: 65535,
                },
            )
            .expect("snat"),
        );
        let next = t.remove_tm(0).expect("remove").table.with_version(2);
        snat.retable(&next, None).expect("retable");
        let me = next.tm_index_by_id(3).expect("id 3");
        for _ in 0..300 {
            let lease = snat.lease(true, 80).expect("lease");
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                lease.addr,
                lease.port,
            );
            assert_eq!(next.steer(&reply).tm, me);
        }
        // A table without this node is refused.
        let without = next.remove_tm(me).expect("remove").table;
        assert!(matches!(
            snat.retable(&without, None),
            Err(PortError::NotInTable(3))
        ));
    }

    #[test]
    fn a_joining_node_prepares_with_the_next_table() {
        let t = table();
        let range = PortRange {
            lo: 1024,
            hi: 65535,
        };
        let addr: IpAddr = "10.1.0.1".parse().expect("addr");
        // TM 2 failed: the failover table keeps it, with no bucket.
        let failover = t.failover(&[2]).expect("failover").table;
        let back = failover
            .rebalance_to_targets(0, &t.counts(0), None)
            .expect("readmit")
            .table;
        let snat = Arc::new(Snat::new(&failover, 2, &[addr], range).expect("snat"));
        assert!(snat.lease(true, 80).is_err(), "no bucket, no port");
        assert!(snat.joins_from(&failover));
        // A member holds ports in buckets moving to TM 2 ...
        let member = Arc::new(Snat::new(&failover, 1, &[addr], range).expect("snat"));
        let mut leases: Vec<Lease> = (0..400)
            .map(|_| member.lease(true, 80).expect("lease"))
            .collect();
        member.retable(&failover, Some(&back)).expect("prepare");
        let held = member.moving_ports(&back);
        assert!(!held.is_empty());
        let held_to_2: Vec<u16> = held
            .iter()
            .filter(|&&(_, p)| {
                back.steer(&Flow::with_ports(
                    proto::TCP,
                    "198.51.100.1".parse().expect("addr"),
                    80,
                    addr,
                    p,
                ))
                .tm == 2
            })
            .map(|&(_, p)| p)
            .collect();
        assert!(!held_to_2.is_empty(), "some held ports move to TM 2");
        // ... which the joining TM never takes.
        snat.prepare_joining(&back, &held).expect("prepare");
        let mut got = Vec::new();
        while let Ok(lease) = snat.lease(true, 80) {
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                addr,
                lease.port,
            );
            assert_eq!(back.steer(&reply).tm, 2, "a port of the next table");
            assert!(
                !held_to_2.contains(&lease.port),
                "port {} is held by TM 1",
                lease.port
            );
            got.push(lease);
            if got.len() > 20_000 {
                break;
            }
        }
        assert!(got.len() > 1000);
        // The member, prepared, only takes ports valid under both tables.
        leases.clear();
        for _ in 0..100 {
            let lease = member.lease(true, 80).expect("lease");
            let reply = Flow::with_ports(
                proto::TCP,
                "198.51.100.1".parse().expect("addr"),
                80,
                addr,
                lease.port,
            );
            assert_eq!(failover.steer(&reply).tm, 1);
            assert_eq!(back.steer(&reply).tm, 1);
        }
    }
}
