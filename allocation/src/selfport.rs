//! Self-source port tables and the SNAT port allocator (the design's process 900).
//!
//! For a SNAT address `A` and TM `k`, the self-source ports are the ports `p`
//! of the configured range whose reply — a server sending to `A:p` from a
//! lower port — the table steers to `k`. [`SelfPorts`] holds them as a
//! 65,536-bit set built once per table version; [`PortAllocator`] hands them
//! out in O(1) (a two-level bitmap: 1024 words and a 16-word summary of the
//! words that still have a free port) from a rotating cursor, so a released
//! port is reused last; [`SnatAllocator`] walks several SNAT addresses.
//!
//! With several groups, the reply must also be *classified* into the TM's
//! own group (DESIGN §2 step 5: rules see both ports and both addresses).
//! A port of another group's port rule never is a self-source port; the
//! rest depends on the server: [`ReplyFit`] says, per connection, whether
//! every self-source port fits, only those in the ranges of the TM's own
//! group's port rules, or none (the replies land in another group whatever
//! the port — a configuration that cannot work, refused by tmd).

use std::net::IpAddr;

use bitvec::prelude::*;

use crate::error::PortError;
use crate::hash::{bucket, hash_endpoint};
use crate::rules::PortRange;
use crate::table::{AllocationTable, HashMode, TmIndex};

const WORDS: usize = 65536 / 64;
const SUMMARY: usize = WORDS / 64;

/// The self-source ports of one (SNAT address, TM) pair under one table (or,
/// intersected, under two).
#[derive(Clone, PartialEq, Eq)]
pub struct SelfPorts {
    addr: IpAddr,
    tm: TmIndex,
    bits: BitBox<u64, Lsb0>,
}

impl std::fmt::Debug for SelfPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SelfPorts({} for TM {}: {} ports)",
            self.addr,
            self.tm,
            self.count()
        )
    }
}

impl SelfPorts {
    /// The self-source ports of `tm` for SNAT address `addr` within `range`.
    ///
    /// A port qualifies when the TM's group hashes (`addr`, port) to a bucket
    /// owned by `tm`, and the port is not named by any rule of another group
    /// (such a port could move the reply into that group's table).
    pub fn build(
        table: &AllocationTable,
        addr: IpAddr,
        tm: TmIndex,
        range: PortRange,
    ) -> Result<Self, PortError> {
        let mut all = Self::build_all(table, addr, range);
        if usize::from(tm) >= all.len() {
            return Err(PortError::NoSuchTm(usize::from(tm)));
        }
        Ok(all.swap_remove(usize::from(tm)))
    }

    /// The self-source port sets of every TM for `addr`, indexed by TM: one
    /// hash per port in the range.
    pub fn build_all(table: &AllocationTable, addr: IpAddr, range: PortRange) -> Vec<Self> {
        let n = table.tms().len();
        let mut words = vec![[0u64; WORDS]; n];
        for (g, group) in table.groups().iter().enumerate() {
            let members = table.members(g);
            if members.is_empty() {
                continue;
            }
            let excluded = excluded_ports(table, g);
            match group.hash {
                HashMode::Endpoint => {
                    for p in range.lo..=range.hi {
                        if excluded.iter().any(|r| r.contains(p)) {
                            continue;
                        }
                        let owner = usize::from(group.buckets.get(bucket(hash_endpoint(
                            table.key(),
                            addr,
                            p,
                        ))));
                        words[owner][usize::from(p) / 64] |= 1 << (p % 64);
                    }
                }
                HashMode::Address { .. } => {
                    // Every port of the address shares one bucket: all or nothing.
                    let owner = usize::from(group.buckets.get(table.endpoint_bucket(g, addr, 0)));
                    for p in range.lo..=range.hi {
                        if !excluded.iter().any(|r| r.contains(p)) {
                            words[owner][usize::from(p) / 64] |= 1 << (p % 64);
                        }
                    }
                }
            }
        }
        words
            .into_iter()
            .enumerate()
            .map(|(tm, w)| SelfPorts {
                addr,
                tm: tm as TmIndex,
                bits: BitBox::from_bitslice(w.view_bits::<Lsb0>()),
            })
            .collect()
    }

    /// The SNAT address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The TM index.
    pub fn tm(&self) -> TmIndex {
        self.tm
    }

    /// True if `port` is a self-source port.
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port)]
    }

    /// How many self-source ports there are.
    pub fn count(&self) -> usize {
        self.bits.count_ones()
    }

    /// How many self-source ports are above `port`.
    pub fn count_above(&self, port: u16) -> usize {
        self.bits[usize::from(port) + 1..].count_ones()
    }

    /// The ports, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.bits.iter_ones().map(|p| p as u16)
    }

    /// The ports valid under both `self` and `other` (the dual-table mode of
    /// a transition: valid under the current and the next table). The two
    /// sets are for the same address and the same node; the node's index
    /// may differ between two tables (indexes shift when a TM is removed),
    /// so only the address must match. The result keeps `self`'s index.
    pub fn intersect(&self, other: &SelfPorts) -> Result<SelfPorts, PortError> {
        if self.addr != other.addr {
            return Err(PortError::Mismatch);
        }
        let mut bits = self.bits.clone();
        bits &= &other.bits[..];
        Ok(SelfPorts {
            addr: self.addr,
            tm: self.tm,
            bits,
        })
    }

    /// This set without `ports` (ports another node may still hold).
    pub fn without(mut self, ports: impl IntoIterator<Item = u16>) -> SelfPorts {
        for p in ports {
            self.bits.set(usize::from(p), false);
        }
        self
    }

    fn words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }
}

/// Which of a TM's self-source ports can carry one server-side connection:
/// those whose reply the distributors classify into the TM's own group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFit {
    /// Every one: the TM's group matches the replies whatever the port.
    Any,
    /// Only those in these ranges (above the server's port): the TM's
    /// group matches the replies by port rules alone (none of which names
    /// the server's port).
    Within(Vec<PortRange>),
    /// None: the replies land in group `lands_in` whatever the port.
    Never {
        /// The group they land in.
        lands_in: usize,
    },
}

impl ReplyFit {
    /// The fit of TM `tm`'s connections from SNAT address `snat` to
    /// `server`:`server_port` carrying `protocol`, under `table`: the
    /// groups' rules in steering order (groups 1… first match, else the
    /// default group 0), each rule matching the reply whatever the port,
    /// for ports of a range, or never. A TM that is not in the table fits
    /// nothing.
    pub fn of(
        table: &AllocationTable,
        tm: TmIndex,
        server: IpAddr,
        server_port: u16,
        protocol: u8,
        snat: IpAddr,
    ) -> ReplyFit {
        use crate::rules::ReplyMatch;
        let Some(g) = table.tm(tm).map(|t| t.group) else {
            return ReplyFit::Never { lands_in: 0 };
        };
        let mut own: Vec<PortRange> = Vec::new();
        for (h, group) in table.groups().iter().enumerate().skip(1) {
            let mut always = false;
            for r in &group.rules {
                match r.reply_match(protocol, server, server_port, snat) {
                    ReplyMatch::Always => always = true,
                    // Ports of another group's rules are no self-source
                    // ports (`SelfPorts`): only the TM's own ranges count.
                    // Only ports above the server's: the reply hashes on
                    // the SNAT side's endpoint only then.
                    ReplyMatch::Ports(range) if h == g && range.hi > server_port => {
                        own.push(PortRange {
                            lo: range.lo.max(server_port + 1),
                            hi: range.hi,
                        })
                    }
                    ReplyMatch::Ports(_) | ReplyMatch::Never => {}
                }
            }
            if h == g && always {
                return ReplyFit::Any;
            }
            if h == g && !own.is_empty() {
                return ReplyFit::Within(own);
            }
            if always {
                return ReplyFit::Never { lands_in: h };
            }
        }
        if g == 0 {
            ReplyFit::Any
        } else {
            ReplyFit::Never { lands_in: 0 }
        }
    }

    /// The fit under two tables at once (a transition: valid under both).
    pub fn and(self, other: ReplyFit) -> ReplyFit {
        match (self, other) {
            (ReplyFit::Never { lands_in }, _) | (_, ReplyFit::Never { lands_in }) => {
                ReplyFit::Never { lands_in }
            }
            (ReplyFit::Any, x) | (x, ReplyFit::Any) => x,
            (ReplyFit::Within(a), ReplyFit::Within(b)) => {
                let both: Vec<PortRange> = a
                    .iter()
                    .flat_map(|x| {
                        b.iter().filter_map(move |y| {
                            let (lo, hi) = (x.lo.max(y.lo), x.hi.min(y.hi));
                            (lo <= hi).then_some(PortRange { lo, hi })
                        })
                    })
                    .collect();
                if both.is_empty() {
                    ReplyFit::Never { lands_in: 0 }
                } else {
                    ReplyFit::Within(both)
                }
            }
        }
    }
}

/// Port ranges named by rules of groups other than `g`.
fn excluded_ports(table: &AllocationTable, g: usize) -> Vec<PortRange> {
    table
        .groups()
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != g)
        .flat_map(|(_, grp)| grp.rules.iter().filter_map(|r| r.ports))
        .collect()
}

/// Hands out the self-source ports of one SNAT address. Not thread-safe: a
/// TM keeps one per worker or behind its own lock.
#[derive(Clone)]
pub struct PortAllocator {
    addr: IpAddr,
    tm: TmIndex,
    valid: Box<[u64; WORDS]>,
    used: Box<[u64; WORDS]>,
    /// Bit `w` set: word `w` has a port that is valid and free.
    summary: [u64; SUMMARY],
    cursor: u32,
    in_use: u32,
}

impl std::fmt::Debug for PortAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PortAllocator({} TM {}: {} in use, {} free)",
            self.addr,
            self.tm,
            self.in_use,
            self.free()
        )
    }
}

impl PortAllocator {
    /// An allocator over `ports`, all free.
    pub fn new(ports: &SelfPorts) -> Self {
        let mut a = PortAllocator {
            addr: ports.addr,
            tm: ports.tm,
            valid: Box::new([0; WORDS]),
            used: Box::new([0; WORDS]),
            summary: [0; SUMMARY],
            cursor: 0,
            in_use: 0,
        };
        a.set_ports(ports);
        a
    }

    /// The SNAT address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Replaces the valid set (a new table, or a transition's dual set).
    /// Ports in use stay reserved until released, valid or not.
    pub fn set_ports(&mut self, ports: &SelfPorts) {
        self.valid.copy_from_slice(ports.words());
        self.tm = ports.tm;
        for w in 0..WORDS {
            self.refresh(w);
        }
    }

    /// An allocator of the same address with this one's valid ports and
    /// none in use: one more destination's (its ports are independent of
    /// this one's — the kernel only needs the 4-tuple unique).
    pub fn fresh(&self) -> PortAllocator {
        let mut a = self.clone();
        a.used.fill(0);
        a.in_use = 0;
        a.cursor = 0;
        for w in 0..WORDS {
            a.refresh(w);
        }
        a
    }

    /// Takes `other`'s valid set (another destination's allocator of the
    /// same address, already retabled); ports in use here stay reserved.
    pub fn set_valid_from(&mut self, other: &PortAllocator) {
        self.valid.copy_from_slice(&other.valid[..]);
        self.tm = other.tm;
        for w in 0..WORDS {
            self.refresh(w);
        }
    }

    #[inline(always)]
    fn refresh(&mut self, w: usize) {
        let bit = 1u64 << (w % 64);
        if self.valid[w] & !self.used[w] != 0 {
            self.summary[w / 64] |= bit;
        } else {
            self.summary[w / 64] &= !bit;
        }
    }

    /// The first valid free port in `lo..=hi`, if any.
    #[inline]
    fn find(&self, lo: u32, hi: u32) -> Option<u32> {
        if lo > hi {
            return None;
        }
        let (wl, wh) = ((lo / 64) as usize, (hi / 64) as usize);
        let mask_lo = u64::MAX << (lo % 64);
        let mask_hi = u64::MAX >> (63 - hi % 64);
        let word = |w: usize| self.valid[w] & !self.used[w];
        let first = word(wl) & mask_lo & if wl == wh { mask_hi } else { u64::MAX };
        if first != 0 {
            return Some(wl as u32 * 64 + first.trailing_zeros());
        }
        // Next word after wl with a free port, through the summary.
        let mut w = wl + 1;
        while w <= wh {
            let s = self.summary[w / 64] & (u64::MAX << (w % 64));
            if s == 0 {
                w = (w / 64 + 1) * 64;
                continue;
            }
            let found = (w / 64) * 64 + s.trailing_zeros() as usize;
            if found > wh {
                return None;
            }
            let bits = word(found) & if found == wh { mask_hi } else { u64::MAX };
            return (bits != 0).then(|| found as u32 * 64 + bits.trailing_zeros());
        }
        None
    }

    /// A free self-source port greater than `above` (the server's port):
    /// the first one at or after the cursor, wrapping to the lowest.
    #[inline]
    pub fn allocate(&mut self, above: u16) -> Option<u16> {
        let lo = u32::from(above) + 1;
        let start = self.cursor.max(lo);
        let port = self
            .find(start, 65535)
            .or_else(|| self.find(lo, start.saturating_sub(1)))?;
        self.take(port);
        self.cursor = port + 1;
        Some(port as u16)
    }

    /// Marks free port `port` in use.
    #[inline(always)]
    fn take(&mut self, port: u32) {
        let w = (port / 64) as usize;
        self.used[w] |= 1 << (port % 64);
        self.in_use += 1;
        self.refresh(w);
    }

    /// A free self-source port greater than `above` that `fit` allows:
    /// [`PortAllocator::allocate`] for [`ReplyFit::Any`]; for
    /// [`ReplyFit::Within`] the first free one in its ranges (a search of
    /// those ranges' words only).
    #[inline]
    pub fn allocate_fit(&mut self, above: u16, fit: &ReplyFit) -> Option<u16> {
        match fit {
            ReplyFit::Any => self.allocate(above),
            ReplyFit::Never { .. } => None,
            ReplyFit::Within(ranges) => {
                let port = ranges.iter().find_map(|r| {
                    self.find(u32::from(r.lo).max(u32::from(above) + 1), u32::from(r.hi))
                })?;
                self.take(port);
                Some(port as u16)
            }
        }
    }

    /// Marks `port` as in use (a connection that already holds it, e.g. kept
    /// across a restart). Returns false if it was already in use.
    pub fn reserve(&mut self, port: u16) -> bool {
        if self.is_used(port) {
            return false;
        }
        self.take(u32::from(port));
        true
    }

    /// Returns `port` to the free set.
    #[inline]
    pub fn release(&mut self, port: u16) -> Result<(), PortError> {
        let (w, bit) = (usize::from(port) / 64, 1u64 << (port % 64));
        if self.used[w] & bit == 0 {
            return Err(PortError::NotAllocated {
                addr: self.addr,
                port,
            });
        }
        self.used[w] &= !bit;
        self.in_use -= 1;
        self.refresh(w);
        Ok(())
    }

    /// True if `port` is currently allocated.
    pub fn is_used(&self, port: u16) -> bool {
        self.used[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// The ports in use, ascending (a scan of the bitmap: control path).
    pub fn used_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.used.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u32)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| (w as u32 * 64 + b) as u16)
        })
    }

    /// Ports in use.
    pub fn in_use(&self) -> usize {
        self.in_use as usize
    }

    /// Valid ports that are free.
    pub fn free(&self) -> usize {
        self.valid
            .iter()
            .zip(self.used.iter())
            .map(|(v, u)| (v & !u).count_ones() as usize)
            .sum()
    }
}

/// The allocators of one TM over its SNAT addresses, tried in order.
#[derive(Debug, Clone)]
pub struct SnatAllocator {
    tm: TmIndex,
    pools: Vec<PortAllocator>,
}

impl SnatAllocator {
    /// Builds the self-port sets of `tm` for every address under `table`.
    pub fn new(
        table: &AllocationTable,
        tm: TmIndex,
        addrs: &[IpAddr],
        range: PortRange,
    ) -> Result<Self, PortError> {
        let pools = addrs
            .iter()
            .map(|&a| SelfPorts::build(table, a, tm, range).map(|p| PortAllocator::new(&p)))
            .collect::<Result<_, _>>()?;
        Ok(SnatAllocator { tm, pools })
    }

    /// Switches every address to the ports valid under `table` for this
    /// node, which is TM index `tm` there (or, with `next` = (table, this
    /// node's index there), valid under both: a transition's prepare
    /// phase). Indexes are per table — they shift when a TM is removed —
    /// so the caller resolves them from the node's stable TM id. Ports in
    /// use stay reserved.
    ///
    /// A node the next table drains to zero has no port valid under both;
    /// it keeps its current ports instead, so that connections still
    /// steered to it before the distributors open the transition are
    /// served rather than refused. That is safe because its buckets go to
    /// nodes that only take ports valid under both (their own), and the
    /// servers' replies to those ports reach it as the old owner until
    /// commit, which waits for them.
    pub fn retable(
        &mut self,
        table: &AllocationTable,
        tm: TmIndex,
        next: Option<(&AllocationTable, TmIndex)>,
        range: PortRange,
    ) -> Result<(), PortError> {
        self.retable_holding(table, tm, next, range, &[])
    }

    /// [`SnatAllocator::retable`], none of `held` handed out: the
    /// (address, port) pairs other TMs' pinned flows still hold in buckets
    /// this table gives to this TM (DESIGN §4).
    pub fn retable_holding(
        &mut self,
        table: &AllocationTable,
        tm: TmIndex,
        next: Option<(&AllocationTable, TmIndex)>,
        range: PortRange,
        held: &[(IpAddr, u16)],
    ) -> Result<(), PortError> {
        for pool in self.pools.iter_mut() {
            let mut ports = SelfPorts::build(table, pool.addr, tm, range)?;
            if let Some((n, tm_next)) = next {
                // A TM `next` drains to zero keeps its current ports (see
                // above); one still in service takes only ports valid
                // under both, even none (an address-hash group whose SNAT
                // address's bucket moves away, a small range): refused,
                // never a port the next table steers elsewhere.
                if n.buckets_of(tm_next) > 0 {
                    let after = SelfPorts::build(n, pool.addr, tm_next, range)?;
                    ports = ports.intersect(&after)?;
                }
            }
            let addr = pool.addr;
            let ports = ports.without(held.iter().filter(|(a, _)| *a == addr).map(|&(_, p)| p));
            pool.set_ports(&ports);
        }
        self.tm = tm;
        Ok(())
    }

    /// A transition's prepare for a node that owns no bucket of the running
    /// table (added, or readmitted after a failover; `tm` is its index in
    /// `next`): the ports `next` gives it, but none of `held` — the
    /// (address, port) pairs the old owners still hold in buckets moving to
    /// it, which they keep until their connections end. Ports in use stay
    /// reserved.
    pub fn prepare_joining(
        &mut self,
        next: &AllocationTable,
        tm: TmIndex,
        held: &[(IpAddr, u16)],
        range: PortRange,
    ) -> Result<(), PortError> {
        for pool in self.pools.iter_mut() {
            let ports = SelfPorts::build(next, pool.addr, tm, range)?;
            let addr = pool.addr;
            pool.set_ports(
                &ports.without(held.iter().filter(|(a, _)| *a == addr).map(|&(_, p)| p)),
            );
        }
        self.tm = tm;
        Ok(())
    }

    /// A (SNAT address, port) whose reply from a server port `above` steers
    /// to this TM: the first address with a free port, in order.
    pub fn allocate(&mut self, above: u16) -> Result<(IpAddr, u16), PortError> {
        for pool in self.pools.iter_mut() {
            if let Some(p) = pool.allocate(above) {
                return Ok((pool.addr, p));
            }
        }
        Err(PortError::Exhausted {
            above,
            tm: usize::from(self.tm),
            addresses: self.pools.len(),
        })
    }

    /// A (SNAT address, port) for a connection to `server` whose replies
    /// to address `a` fit as `fit(a)` says: the first address with a free
    /// port that fits, in order. When no address fits at all the error
    /// says where the replies land; when some fit but are full, exhaustion.
    pub fn allocate_fit(
        &mut self,
        server: std::net::SocketAddr,
        fit: impl Fn(IpAddr) -> ReplyFit,
    ) -> Result<(IpAddr, u16), PortError> {
        let above = server.port();
        let mut elsewhere = None;
        let mut any_fits = false;
        for pool in self.pools.iter_mut() {
            let f = fit(pool.addr);
            if let ReplyFit::Never { lands_in } = f {
                elsewhere = Some((pool.addr, lands_in));
                continue;
            }
            any_fits = true;
            if let Some(p) = pool.allocate_fit(above, &f) {
                return Ok((pool.addr, p));
            }
        }
        match elsewhere {
            Some((addr, lands_in)) if !any_fits => Err(PortError::ReplyElsewhere {
                server,
                addr,
                lands_in,
            }),
            _ => Err(PortError::Exhausted {
                above,
                tm: usize::from(self.tm),
                addresses: self.pools.len(),
            }),
        }
    }

    /// Releases a port allocated on `addr`.
    pub fn release(&mut self, addr: IpAddr, port: u16) -> Result<(), PortError> {
        self.pools
            .iter_mut()
            .find(|p| p.addr == addr)
            .ok_or(PortError::UnknownAddress(addr))?
            .release(port)
    }

    /// The per-address allocators.
    pub fn pools(&self) -> &[PortAllocator] {
        &self.pools
    }

    /// The same addresses and valid ports, none in use: the allocator of
    /// one more destination ([`PortAllocator::fresh`]).
    pub fn fresh(&self) -> SnatAllocator {
        SnatAllocator {
            tm: self.tm,
            pools: self.pools.iter().map(PortAllocator::fresh).collect(),
        }
    }

    /// Takes `other`'s valid sets (the same addresses, in order: the
    /// destination template after a retable); ports in use stay reserved.
    pub fn set_valid_from(&mut self, other: &SnatAllocator) {
        self.tm = other.tm;
        for (a, b) in self.pools.iter_mut().zip(&other.pools) {
            a.set_valid_from(b);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::profile::Profile;
    use crate::rules::proto;
    use crate::rules::{Protocol, Rule};
    use crate::table::test::uniform;
    use crate::table::{Flow, GroupSpec, Tm};
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn self_ports_steer_back_to_their_tm() {
        let t = uniform(8);
        let a = ip("10.1.0.1");
        let sets = SelfPorts::build_all(&t, a, PortRange::ALL);
        assert_eq!(sets.iter().map(SelfPorts::count).sum::<usize>(), 65536);
        for set in &sets {
            for p in set.iter().filter(|&p| p > 80).take(500) {
                let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, a, p);
                assert_eq!(t.steer(&reply).tm, set.tm());
            }
        }
        let c = sets[3].count();
        assert!((7500..=8900).contains(&c), "{c}");
    }

    #[test]
    fn allocator_respects_above_and_exhausts() {
        let t = uniform(4);
        let ports = SelfPorts::build(&t, ip("10.1.0.1"), 2, "1024-1100".parse().expect("range"))
            .expect("ports");
        let mut a = PortAllocator::new(&ports);
        let n = ports.count_above(1050);
        let mut got = Vec::new();
        while let Some(p) = a.allocate(1050) {
            assert!(p > 1050 && ports.contains(p));
            got.push(p);
        }
        assert_eq!(got.len(), n);
        assert_eq!(a.in_use(), n);
        assert!(a.allocate(1050).is_none());
        a.release(got[0]).expect("release");
        assert!(a.release(got[0]).is_err(), "double release");
        assert_eq!(a.allocate(1050), Some(got[0]));
    }

    #[test]
    fn edges_of_the_port_space() {
        let t = uniform(2);
        let ports = SelfPorts::build(&t, ip("10.1.0.1"), 1, PortRange::ALL).expect("ports");
        let mut a = PortAllocator::new(&ports);
        assert_eq!(a.allocate(65535), None, "no port is above 65535");
        let top = ports.iter().last().expect("a port");
        assert_eq!(a.allocate(top - 1), Some(top));
        // The cursor is now past the top: the next allocation wraps around.
        let low = a.allocate(0).expect("port");
        assert!(low < top);
        assert_eq!(
            SelfPorts::build(&t, ip("10.1.0.1"), 7, PortRange::ALL),
            Err(PortError::NoSuchTm(7))
        );
    }

    /// Removing a TM listed before this node shifts its index (3 → 2):
    /// retabling with the node's index in the new table keeps every port
    /// steering home; with the old index, ports would belong to another TM.
    #[test]
    fn retable_follows_the_node_when_indexes_shift() {
        let t = uniform(4);
        let next = t.remove_tm(0).expect("remove").table;
        let (old_i, new_i) = (
            t.tm_index_by_id(3).expect("id 3"),
            next.tm_index_by_id(3).expect("id 3"),
        );
        assert_eq!((old_i, new_i), (3, 2));
        let a = ip("10.1.0.1");
        let mut s = SnatAllocator::new(&t, old_i, &[a], PortRange::ALL).expect("snat");
        s.retable(&next, new_i, None, PortRange::ALL)
            .expect("retable");
        for _ in 0..500 {
            let (addr, p) = s.allocate(80).expect("port");
            let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, addr, p);
            assert_eq!(
                next.steer(&reply).tm,
                new_i,
                "port {p} must steer to TM id 3 under the new table"
            );
        }
        // Dual-table mode across the shift: valid for id 3 under both tables.
        s.retable(&t, old_i, Some((&next, new_i)), PortRange::ALL)
            .expect("retable");
        for _ in 0..200 {
            let (addr, p) = s.allocate(80).expect("port");
            let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, addr, p);
            assert_eq!(t.steer(&reply).tm, old_i);
            assert_eq!(next.steer(&reply).tm, new_i);
        }
    }

    #[test]
    fn used_ports_are_listed() {
        let t = uniform(2);
        let ports = SelfPorts::build(&t, ip("10.1.0.1"), 0, PortRange::ALL).expect("ports");
        let mut a = PortAllocator::new(&ports);
        let got: Vec<u16> = (0..5).map(|_| a.allocate(1023).expect("port")).collect();
        assert_eq!(a.used_ports().collect::<Vec<_>>(), got);
    }

    #[test]
    fn released_ports_are_reused_last() {
        let t = uniform(2);
        let ports = SelfPorts::build(&t, ip("10.1.0.1"), 0, PortRange::ALL).expect("ports");
        let mut a = PortAllocator::new(&ports);
        let first = a.allocate(1023).expect("port");
        a.release(first).expect("release");
        let second = a.allocate(1023).expect("port");
        assert_ne!(first, second, "the cursor moves on");
        assert!(second > first);
    }

    #[test]
    fn snat_falls_over_to_the_next_address_then_refuses() {
        let t = uniform(4);
        let range: PortRange = "60000-60100".parse().expect("range");
        let addrs = [ip("10.1.0.1"), ip("10.1.0.2")];
        let mut s = SnatAllocator::new(&t, 1, &addrs, range).expect("snat");
        let total: usize = s.pools().iter().map(PortAllocator::free).sum();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..total {
            let (addr, port) = s.allocate(443).expect("port");
            let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 443, addr, port);
            assert_eq!(t.steer(&reply).tm, 1);
            assert!(seen.insert((addr, port)));
        }
        assert!(
            seen.iter().any(|(a, _)| *a == addrs[1]),
            "second address used"
        );
        assert_eq!(
            s.allocate(443),
            Err(PortError::Exhausted {
                above: 443,
                tm: 1,
                addresses: 2
            })
        );
        assert_eq!(
            s.release(ip("10.9.9.9"), 1),
            Err(PortError::UnknownAddress(ip("10.9.9.9")))
        );
    }

    #[test]
    fn dual_table_ports_are_valid_under_both() {
        let t = uniform(8);
        let next = t
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: None,
                    sigma: None,
                },
            )
            .expect("rebalance")
            .table;
        let a = ip("10.1.0.1");
        let mut s = SnatAllocator::new(&t, 5, &[a], PortRange::ALL).expect("snat");
        let held = s.allocate(80).expect("port");
        s.retable(&t, 5, Some((&next, 5)), PortRange::ALL)
            .expect("retable");
        assert!(s.pools()[0].is_used(held.1), "live ports stay reserved");
        for _ in 0..2000 {
            let (addr, p) = s.allocate(80).expect("port");
            let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, addr, p);
            assert_eq!(t.steer(&reply).tm, 5);
            assert_eq!(next.steer(&reply).tm, 5);
        }
        s.release(held.0, held.1).expect("release");
    }

    /// A TM still in service whose ports on an address are none under the
    /// next table (a small range: its buckets there all moved) gets no
    /// port in the transition — refused — never one of the running
    /// table's that the next steers elsewhere. Only a TM the next table
    /// drains to zero keeps its current ports.
    #[test]
    fn a_tm_in_service_with_no_port_under_both_tables_gets_none() {
        let t = uniform(8);
        let next = t
            .rebalance(0, &Profile::Rayleigh { sigma: None })
            .expect("rebalance")
            .table;
        let a = ip("10.1.0.1");
        let tm = 5;
        assert!(next.buckets_of(tm) > 0);
        let range = (1024u16..60000)
            .map(|lo| PortRange { lo, hi: lo + 3 })
            .find(|&r| {
                let now = SelfPorts::build(&t, a, tm, r).expect("ports");
                let after = SelfPorts::build(&next, a, tm, r).expect("ports");
                now.count() > 0 && after.count() == 0
            })
            .expect("a range whose ports all move");
        let mut s = SnatAllocator::new(&t, tm, &[a], range).expect("snat");
        s.retable(&t, tm, Some((&next, tm)), range)
            .expect("retable");
        assert!(s.allocate(80).is_err(), "no port valid under both tables");
        // Drained to zero, it keeps its current ports.
        let drained = t
            .rebalance_to_targets(
                0,
                &t.targets_excluding(0, &Profile::Uniform, &[tm])
                    .expect("targets"),
                None,
            )
            .expect("drain")
            .table;
        s.retable(&t, tm, Some((&drained, tm)), range)
            .expect("retable");
        let (_, p) = s.allocate(80).expect("its current port");
        let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, a, p);
        assert_eq!(t.steer(&reply).tm, tm);
    }

    #[test]
    fn rule_ports_of_other_groups_are_never_self_ports() {
        let mut tms: Vec<Tm> = uniform(4).tms().to_vec();
        tms[3].group = 1;
        let spec = GroupSpec {
            name: "alt".into(),
            rules: vec![Rule {
                protocol: Some(Protocol(proto::TCP)),
                ports: Some("40000-40999".parse().expect("r")),
                prefix: None,
            }],
            hash: HashMode::Endpoint,
            profile: Profile::Uniform,
        };
        let t = AllocationTable::new(
            1,
            *uniform(1).key(),
            tms,
            vec![GroupSpec::default_group(Profile::Uniform), spec],
        )
        .expect("table");
        let set = SelfPorts::build(&t, ip("10.1.0.1"), 0, PortRange::ALL).expect("ports");
        assert!(set.count() > 0);
        assert!(set.iter().all(|p| !(40000..=40999).contains(&p)));
        for p in set.iter().filter(|&p| p > 80) {
            let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 80, ip("10.1.0.1"), p);
            assert_eq!(t.steer(&reply).tm, 0);
        }
    }

    /// Four TMs: 0, 1 in the default group, 2, 3 in group 1 ("tls") with
    /// `rules`.
    fn partitioned(rules: Vec<Rule>) -> AllocationTable {
        let mut tms: Vec<Tm> = uniform(4).tms().to_vec();
        tms[2].group = 1;
        tms[3].group = 1;
        let tls = GroupSpec {
            name: "tls".into(),
            rules,
            hash: HashMode::Endpoint,
            profile: Profile::Uniform,
        };
        AllocationTable::new(
            1,
            *uniform(1).key(),
            tms,
            vec![GroupSpec::default_group(Profile::Uniform), tls],
        )
        .expect("table")
    }

    fn rule(protocol: u8, ports: &str) -> Rule {
        Rule {
            protocol: Some(Protocol(protocol)),
            ports: Some(ports.parse().expect("range")),
            prefix: None,
        }
    }

    /// Every port the allocator hands out under a fit steers the reply to
    /// the TM (and its group) by the distributors' own `steer`.
    fn allocate_all(
        t: &AllocationTable,
        tm: TmIndex,
        server: std::net::SocketAddr,
        protocol: u8,
        snat: IpAddr,
    ) -> Result<Vec<u16>, PortError> {
        let mut a = SnatAllocator::new(t, tm, &[snat], PortRange::ALL)?;
        let fit = |addr| ReplyFit::of(t, tm, server.ip(), server.port(), protocol, addr);
        let mut out = Vec::new();
        loop {
            match a.allocate_fit(server, fit) {
                Ok((addr, p)) => {
                    let reply = Flow::with_ports(protocol, server.ip(), server.port(), addr, p);
                    let s = t.steer(&reply);
                    assert_eq!(
                        (s.group, s.tm),
                        (t.tms()[usize::from(tm)].group, tm),
                        "port {p}"
                    );
                    out.push(p);
                }
                Err(PortError::Exhausted { .. }) => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    /// A TLS-group virtual server (rule: TCP 443) whose servers listen on
    /// 8080: every reply is classified into the default group, so no port
    /// can work — refused, naming the group; with the server port in a
    /// rule of the group, every self-source port works; with a rule over a
    /// port range of the SNAT side, just the ports in it.
    #[test]
    fn replies_are_classified_into_the_tms_group() {
        let server: std::net::SocketAddr = "198.51.100.7:8080".parse().expect("addr");
        let snat = ip("10.1.0.1");
        let t = partitioned(vec![rule(proto::TCP, "443")]);
        assert_eq!(
            ReplyFit::of(&t, 2, server.ip(), 8080, proto::TCP, snat),
            ReplyFit::Never { lands_in: 0 }
        );
        match allocate_all(&t, 2, server, proto::TCP, snat) {
            Err(PortError::ReplyElsewhere { lands_in, .. }) => assert_eq!(lands_in, 0),
            other => panic!("{other:?}"),
        }
        // The default group's TMs: any port, but never 443 (the TLS rule's).
        assert_eq!(
            ReplyFit::of(&t, 0, server.ip(), 8080, proto::TCP, snat),
            ReplyFit::Any
        );
        let ports = allocate_all(&t, 0, server, proto::TCP, snat).expect("ports");
        assert!(ports.len() > 10_000 && !ports.contains(&443));

        let t = partitioned(vec![rule(proto::TCP, "443"), rule(proto::TCP, "8080")]);
        assert_eq!(
            ReplyFit::of(&t, 2, server.ip(), 8080, proto::TCP, snat),
            ReplyFit::Any
        );
        assert!(
            allocate_all(&t, 2, server, proto::TCP, snat)
                .expect("ports")
                .len()
                > 10_000
        );
        // Now the default group's TMs cannot reach that server: its replies are TLS's.
        assert_eq!(
            ReplyFit::of(&t, 0, server.ip(), 8080, proto::TCP, snat),
            ReplyFit::Never { lands_in: 1 }
        );
        // Another protocol is not matched by the TLS rules.
        assert_eq!(
            ReplyFit::of(&t, 0, server.ip(), 8080, proto::UDP, snat),
            ReplyFit::Any
        );

        let t = partitioned(vec![
            rule(proto::TCP, "443"),
            rule(proto::TCP, "40000-40999"),
        ]);
        assert_eq!(
            ReplyFit::of(&t, 3, server.ip(), 8080, proto::TCP, snat),
            ReplyFit::Within(vec!["40000-40999".parse().expect("r")])
        );
        let ports = allocate_all(&t, 3, server, proto::TCP, snat).expect("ports");
        assert!(!ports.is_empty() && ports.iter().all(|p| (40000..=40999).contains(p)));

        // A prefix rule covering the SNAT address takes every reply to it.
        let t = partitioned(vec![Rule {
            protocol: None,
            ports: None,
            prefix: Some("10.1.0.0/16".parse().expect("prefix")),
        }]);
        assert_eq!(
            ReplyFit::of(&t, 2, server.ip(), 8080, proto::UDP, snat),
            ReplyFit::Any
        );
        assert_eq!(
            ReplyFit::of(&t, 1, server.ip(), 8080, proto::UDP, snat),
            ReplyFit::Never { lands_in: 1 }
        );
        assert_eq!(
            ReplyFit::of(&t, 1, server.ip(), 8080, proto::UDP, ip("10.2.0.1")),
            ReplyFit::Any
        );
    }

    #[test]
    fn fits_combine_as_both_tables_require() {
        let r = |s: &str| -> PortRange { s.parse().expect("r") };
        assert_eq!(ReplyFit::Any.and(ReplyFit::Any), ReplyFit::Any);
        assert_eq!(
            ReplyFit::Any.and(ReplyFit::Within(vec![r("10-20")])),
            ReplyFit::Within(vec![r("10-20")])
        );
        assert_eq!(
            ReplyFit::Within(vec![r("10-20"), r("30-40")]).and(ReplyFit::Within(vec![r("15-35")])),
            ReplyFit::Within(vec![r("15-20"), r("30-35")])
        );
        assert_eq!(
            ReplyFit::Within(vec![r("10-20")]).and(ReplyFit::Within(vec![r("30-40")])),
            ReplyFit::Never { lands_in: 0 }
        );
        assert_eq!(
            ReplyFit::Any.and(ReplyFit::Never { lands_in: 2 }),
            ReplyFit::Never { lands_in: 2 }
        );
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop::option::of(prop::sample::select(vec![proto::TCP, proto::UDP])),
            prop::option::of((1u16..65535, 0u16..3000)),
            prop::option::of(prop::sample::select(vec![
                "10.1.0.0/16",
                "198.51.100.0/24",
                "10.1.0.1/32",
                "192.0.2.0/24",
            ])),
        )
            .prop_map(|(p, ports, prefix)| Rule {
                protocol: p.map(Protocol),
                ports: ports.map(|(lo, w)| PortRange {
                    lo,
                    hi: lo.saturating_add(w),
                }),
                prefix: prefix.map(|s| s.parse().expect("prefix")),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random partitions (rules of protocol, ports and prefix; TMs in
        /// three groups): every port handed out steers its reply home by
        /// `steer`; when none can, no self-source port of the TM's would
        /// have (the refusal is never a false alarm).
        #[test]
        fn every_port_handed_out_steers_home(
            g1 in prop::collection::vec(arb_rule(), 1..3),
            g2 in prop::collection::vec(arb_rule(), 1..3),
            groups in prop::collection::vec(0usize..3, 6),
            tm in 0u16..6,
            server_port in 1u16..65535,
            udp in any::<bool>(),
            snat in prop::sample::select(vec!["10.1.0.1", "10.9.0.1"]),
        ) {
            let mut tms: Vec<Tm> = uniform(6).tms().to_vec();
            for (t, g) in tms.iter_mut().zip(&groups) {
                t.group = *g;
            }
            let spec = |name: &str, rules: Vec<Rule>| GroupSpec { name: name.into(), rules, hash: HashMode::Endpoint, profile: Profile::Uniform };
            let Ok(t) = AllocationTable::new(1, *uniform(1).key(), tms, vec![GroupSpec::default_group(Profile::Uniform), spec("a", g1), spec("b", g2)]) else {
                return Ok(()); // a group without TMs, or another invalid layout
            };
            let protocol = if udp { proto::UDP } else { proto::TCP };
            let server = std::net::SocketAddr::new(ip("198.51.100.7"), server_port);
            let snat = ip(snat);
            match allocate_all(&t, tm, server, protocol, snat) {
                Ok(_) => {}
                Err(PortError::ReplyElsewhere { .. }) => {
                    let own = SelfPorts::build(&t, snat, tm, PortRange::ALL).expect("ports");
                    let g = t.tms()[usize::from(tm)].group;
                    for p in own.iter().filter(|&p| p > server_port).step_by(97) {
                        let reply = Flow::with_ports(protocol, server.ip(), server_port, snat, p);
                        prop_assert_ne!(t.steer(&reply).group, g, "port {} would have worked", p);
                    }
                }
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Random allocate/release sequences: every port handed out is a
        /// self port above the server port, never handed out twice, and
        /// exhaustion only happens when no such port is free.
        #[test]
        fn allocator_model(ops in prop::collection::vec((any::<bool>(), 0u16..65535), 1..400), lo in 1024u16..60000, tm in 0u16..4) {
            let t = uniform(4);
            let range = PortRange { lo, hi: lo.saturating_add(700) };
            let ports = SelfPorts::build(&t, ip("192.0.2.10"), tm, range).expect("ports");
            let mut a = PortAllocator::new(&ports);
            let mut held: Vec<u16> = Vec::new();
            for (alloc, x) in ops {
                if alloc || held.is_empty() {
                    let above = lo.saturating_add(x % 800).saturating_sub(50);
                    match a.allocate(above) {
                        Some(p) => {
                            prop_assert!(p > above && ports.contains(p) && !held.contains(&p));
                            held.push(p);
                        }
                        None => {
                            let free_above = ports.iter().filter(|&p| p > above && !held.contains(&p)).count();
                            prop_assert_eq!(free_above, 0);
                        }
                    }
                } else {
                    let p = held.swap_remove(usize::from(x) % held.len());
                    prop_assert!(a.release(p).is_ok());
                }
                prop_assert_eq!(a.in_use(), held.len());
            }
        }
    }
}
