//! Load-balancing methods: which server of a pool takes a new connection — pure functions over the pool's state.

use std::net::IpAddr;

use allocation::hash::HashKey;
use serde::Deserialize;

/// How a pool picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Each server in turn.
    #[default]
    RoundRobin,
    /// In turn, in proportion to the weights, evenly interleaved (smooth weighted round robin).
    WeightedRoundRobin,
    /// The server with the fewest active connections per unit of weight.
    LeastConnections,
    /// A hash of the client address (rendezvous hashing): a client keeps its
    /// server while that server is up; a server going down moves only its clients.
    SourceHash,
}

/// What the balancer knows of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Weight (0: takes no new connections).
    pub weight: u32,
    /// Up according to its health checks.
    pub up: bool,
    /// Connections open now.
    pub active: u32,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.up && self.weight > 0
    }
}

/// A pool's balancing state (round-robin position, weighted credits).
#[derive(Debug, Clone)]
pub struct Balancer {
    method: Method,
    next: usize,
    credit: Vec<i64>,
    key: HashKey,
    /// The servers' addresses: the source hash scores a server by its
    /// address, not its place in the list, so TMs whose configurations
    /// list a pool in another order still agree.
    ids: Vec<std::net::SocketAddr>,
}

impl Balancer {
    /// A balancer for `servers`; `key` keys the source hash (the cluster's,
    /// `persist::cluster_key`, for every TM to pick alike).
    pub fn new(method: Method, servers: &[std::net::SocketAddr], key: HashKey) -> Self {
        Balancer {
            method,
            next: 0,
            credit: vec![0; servers.len()],
            key,
            ids: servers.to_vec(),
        }
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The server for a new connection from `client`, or `None` when no
    /// server is up (with a non-zero weight).
    pub fn pick(&mut self, servers: &[Candidate], client: IpAddr) -> Option<usize> {
        if servers.len() != self.credit.len() {
            self.credit = vec![0; servers.len()];
        }
        let n = servers.len();
        match self.method {
            Method::RoundRobin => {
                let start = self.next;
                let i = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| servers[i].eligible())?;
                self.next = (i + 1) % n;
                Some(i)
            }
            Method::WeightedRoundRobin => {
                let total: i64 = servers
                    .iter()
                    .filter(|s| s.eligible())
                    .map(|s| i64::from(s.weight))
                    .sum();
                let mut best: Option<usize> = None;
                for (i, s) in servers.iter().enumerate() {
                    if !s.eligible() {
                        continue;
                    }
                    self.credit[i] += i64::from(s.weight);
                    if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                        best = Some(i);
                    }
                }
                let b = best?;
                self.credit[b] -= total;
                Some(b)
            }
            Method::LeastConnections => {
                // Fewest active per weight (compare a/w < b/v as a·v < b·w); ties rotate.
                let start = self.next;
                let mut best: Option<usize> = None;
                for i in (0..n).map(|k| (start + k) % n) {
                    let s = servers[i];
                    if !s.eligible() {
                        continue;
                    }
                    let better = match best {
                        None => true,
                        Some(b) => {
                            u64::from(s.active) * u64::from(servers[b].weight)
                                < u64::from(servers[b].active) * u64::from(s.weight)
                        }
                    };
                    if better {
                        best = Some(i);
                    }
                }
                let b = best?;
                self.next = (b + 1) % n;
                Some(b)
            }
            Method::SourceHash => servers
                .iter()
                .enumerate()
                .filter(|(_, s)| s.eligible())
                .filter_map(|(i, _)| self.ids.get(i).map(|&id| (i, id)))
                .max_by_key(|&(_, id)| crate::persist::score(&self.key, b"source-hash", client, id))
                .map(|(i, _)| i),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn up(weight: u32, active: u32) -> Candidate {
        Candidate {
            weight,
            up: true,
            active,
        }
    }

    fn addrs(n: u8) -> Vec<std::net::SocketAddr> {
        (1..=n)
            .map(|i| std::net::SocketAddr::new(IpAddr::from([10, 0, 0, i]), 80))
            .collect()
    }

    fn any() -> IpAddr {
        "192.0.2.1".parse().expect("addr")
    }

    #[test]
    fn round_robin_skips_down_servers() {
        let mut b = Balancer::new(Method::RoundRobin, &addrs(3), HashKey::from_bytes([1; 16]));
        let mut s = vec![up(1, 0), up(1, 0), up(1, 0)];
        let picks: Vec<usize> = (0..6).filter_map(|_| b.pick(&s, any())).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        s[1].up = false;
        let picks: Vec<usize> = (0..4).filter_map(|_| b.pick(&s, any())).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        s.iter_mut().for_each(|c| c.up = false);
        assert_eq!(b.pick(&s, any()), None);
    }

    #[test]
    fn weighted_round_robin_is_proportional_and_smooth() {
        let mut b = Balancer::new(
            Method::WeightedRoundRobin,
            &addrs(3),
            HashKey::from_bytes([1; 16]),
        );
        let s = vec![up(5, 0), up(1, 0), up(1, 0)];
        let picks: Vec<usize> = (0..7).filter_map(|_| b.pick(&s, any())).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 5);
        assert_eq!(
            picks,
            vec![0, 0, 1, 0, 2, 0, 0],
            "nginx's smooth order for 5:1:1"
        );
    }

    #[test]
    fn least_connections_by_weight() {
        let mut b = Balancer::new(
            Method::LeastConnections,
            &addrs(3),
            HashKey::from_bytes([1; 16]),
        );
        assert_eq!(b.pick(&[up(1, 5), up(1, 2), up(1, 9)], any()), Some(1));
        assert_eq!(
            b.pick(&[up(1, 4), up(3, 9), up(1, 9)], any()),
            Some(1),
            "9/3 < 4/1"
        );
        assert_eq!(
            b.pick(
                &[
                    up(1, 0),
                    Candidate {
                        weight: 1,
                        up: false,
                        active: 0
                    }
                ],
                any()
            ),
            Some(0)
        );
    }

    #[test]
    fn source_hash_is_sticky_and_moves_only_the_failed_servers_clients() {
        let mut b = Balancer::new(Method::SourceHash, &addrs(4), HashKey::from_bytes([1; 16]));
        let mut s = vec![up(1, 0); 4];
        let clients: Vec<IpAddr> = (0..400u32)
            .map(|i| IpAddr::V4((0xc000_0200 + i).into()))
            .collect();
        let before: Vec<usize> = clients
            .iter()
            .map(|&c| b.pick(&s, c).expect("server"))
            .collect();
        for (i, &c) in clients.iter().enumerate() {
            assert_eq!(b.pick(&s, c), Some(before[i]), "sticky");
        }
        for k in 0..4 {
            assert!(before.iter().filter(|&&p| p == k).count() > 60, "spread");
        }
        s[2].up = false;
        for (i, &c) in clients.iter().enumerate() {
            let now = b.pick(&s, c).expect("server");
            if before[i] != 2 {
                assert_eq!(now, before[i], "clients of healthy servers stay");
            } else {
                assert_ne!(now, 2);
            }
        }
        // Another TM listing the pool in another order picks the same servers.
        let mut reversed = addrs(4);
        reversed.reverse();
        let mut other = Balancer::new(Method::SourceHash, &reversed, HashKey::from_bytes([1; 16]));
        let all = vec![up(1, 0); 4];
        for (i, &c) in clients.iter().enumerate() {
            assert_eq!(
                other.pick(&all, c),
                Some(3 - before[i]),
                "by address, not position"
            );
        }
    }
}
