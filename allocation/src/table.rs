//! The allocation table: TM list, groups with their rules and 4096 buckets, and the steering lookup.
//!
//! An [`AllocationTable`] is immutable once built: every constructor
//! validates all invariants, and every change (rebalance, add, remove,
//! failover) returns a new table together with the list of moved buckets.
//! The data path only indexes it: [`AllocationTable::steer`] is a pure
//! function of (flow, table).

use std::fmt;
use std::net::IpAddr;

use crate::error::TableError;
use crate::hash::{bucket, hash_address, hash_endpoint, hash_triple, mask_addr, HashKey};
use crate::mac::MacAddr;
use crate::profile::Profile;
use crate::rules::Rule;
use crate::TABLE_SIZE;

/// Index of a TM in the table's TM list (dense, 0-based). Stable only within
/// one table; the TM's `id` is the stable name across tables.
pub type TmIndex = u16;

/// The most TMs a table can hold: one per bucket.
pub const MAX_TMS: usize = TABLE_SIZE;

/// The largest table version: the table file stores it as a TOML integer,
/// which is signed 64-bit, so a larger version could be written but never
/// read back. Tables beyond it cannot be built.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// A traffic manager as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tm {
    /// Stable, operator-assigned identifier (unique in the table).
    pub id: u32,
    /// Human name (unique in the table).
    pub name: String,
    /// The TM's MAC address: distributors rewrite the destination MAC to it.
    pub mac: MacAddr,
    /// Capacity weight, used by the `weighted` profile.
    pub weight: u32,
    /// Index of the TM's group in the table's group list.
    pub group: usize,
}

/// How a group turns a flow's greater-port endpoint into a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashMode {
    /// Hash (address, port) of the greater-port endpoint: the default.
    #[default]
    Endpoint,
    /// Hash the greater-port endpoint's address alone, masked to a prefix:
    /// source affinity. Such a group cannot use self-source ports (all ports
    /// of one address share one bucket), so its TMs must keep the client
    /// address (DNAT-only).
    Address {
        /// IPv4 prefix length kept (0–32).
        v4_prefix: u8,
        /// IPv6 prefix length kept (0–128).
        v6_prefix: u8,
    },
}

/// The 4096 bucket owners of one group.
#[derive(Clone, PartialEq, Eq)]
pub struct Buckets(Box<[TmIndex; TABLE_SIZE]>);

impl Buckets {
    /// Buckets from a list of exactly 4096 owners.
    pub fn from_vec(owners: Vec<TmIndex>, group: &str) -> Result<Self, TableError> {
        let size = owners.len();
        let boxed: Box<[TmIndex; TABLE_SIZE]> =
            owners
                .into_boxed_slice()
                .try_into()
                .map_err(|_| TableError::InvalidTableSize {
                    group: group.to_string(),
                    size,
                    expected: TABLE_SIZE,
                })?;
        Ok(Buckets(boxed))
    }

    /// The owner of bucket `b` (`b` is masked to 12 bits).
    #[inline(always)]
    pub fn get(&self, b: usize) -> TmIndex {
        self.0[b & (TABLE_SIZE - 1)]
    }

    /// All owners in bucket order.
    pub fn as_slice(&self) -> &[TmIndex] {
        &self.0[..]
    }

    /// Entry count per TM index, for `tms` TMs.
    pub fn counts(&self, tms: usize) -> Vec<u32> {
        let mut c = vec![0u32; tms];
        for &o in self.0.iter() {
            if let Some(slot) = c.get_mut(usize::from(o)) {
                *slot += 1;
            }
        }
        c
    }

    /// The longest run of consecutive buckets (cyclic) owned by one TM:
    /// `(tm, length)`. A well-spread table has short runs.
    pub fn longest_run(&self) -> (TmIndex, usize) {
        let v = &self.0;
        if v.iter().all(|&o| o == v[0]) {
            return (v[0], TABLE_SIZE);
        }
        // Start right after a change of owner so cyclic runs are not split.
        let start = (0..TABLE_SIZE)
            .find(|&i| v[i] != v[(i + TABLE_SIZE - 1) % TABLE_SIZE])
            .unwrap_or(0);
        let (mut best, mut best_len, mut len) = (v[start], 0, 0);
        let mut prev = None;
        for k in 0..TABLE_SIZE {
            let o = v[(start + k) % TABLE_SIZE];
            len = if prev == Some(o) { len + 1 } else { 1 };
            prev = Some(o);
            if len > best_len {
                best_len = len;
                best = o;
            }
        }
        (best, best_len)
    }
}

impl fmt::Debug for Buckets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Buckets([{}, {}, {}, …])",
            self.0[0], self.0[1], self.0[2]
        )
    }
}

/// A TM group: the traffic its rules select is steered by its own buckets
/// over its own member TMs.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Group name (unique). The first group is the default group.
    pub name: String,
    /// Match rules (any rule matching selects the group). Empty for the default group.
    pub rules: Vec<Rule>,
    /// How the greater-port endpoint is hashed.
    pub hash: HashMode,
    /// The profile the buckets were built for.
    pub profile: Profile,
    /// The TM that takes TCP/UDP flows whose two ports are equal.
    pub equal_ports_tm: TmIndex,
    /// Bucket owners.
    pub buckets: Buckets,
}

/// A group before its buckets exist: what [`AllocationTable::new`] builds from.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    /// Group name.
    pub name: String,
    /// Match rules (none for the default, first group).
    pub rules: Vec<Rule>,
    /// Hash mode.
    pub hash: HashMode,
    /// Profile.
    pub profile: Profile,
}

impl GroupSpec {
    /// The default group: no rules, endpoint hash, the given profile.
    pub fn default_group(profile: Profile) -> Self {
        GroupSpec {
            name: "default".into(),
            rules: Vec::new(),
            hash: HashMode::Endpoint,
            profile,
        }
    }
}

/// The flow fields the steering rule reads: protocol, addresses, and the
/// ports for TCP/UDP (`None` for traffic without ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// IP protocol number.
    pub protocol: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// (source port, destination port) for TCP/UDP.
    pub ports: Option<(u16, u16)>,
}

impl Flow {
    /// A TCP/UDP flow.
    pub fn with_ports(
        protocol: u8,
        src: IpAddr,
        src_port: u16,
        dst: IpAddr,
        dst_port: u16,
    ) -> Self {
        Flow {
            protocol,
            src,
            dst,
            ports: Some((src_port, dst_port)),
        }
    }

    /// A flow without ports (ICMP, GRE, ESP …).
    pub fn without_ports(protocol: u8, src: IpAddr, dst: IpAddr) -> Self {
        Flow {
            protocol,
            src,
            dst,
            ports: None,
        }
    }

    /// The endpoint the steering rule hashes: the one with the greater port
    /// (`None` for equal ports and for flows without ports).
    #[inline]
    pub fn greater_port_endpoint(&self) -> Option<(IpAddr, u16)> {
        match self.ports {
            Some((sp, dp)) if sp > dp => Some((self.src, sp)),
            Some((sp, dp)) if sp < dp => Some((self.dst, dp)),
            _ => None,
        }
    }

    /// The reply direction: endpoints swapped.
    pub fn reversed(&self) -> Self {
        Flow {
            protocol: self.protocol,
            src: self.dst,
            dst: self.src,
            ports: self.ports.map(|(s, d)| (d, s)),
        }
    }
}

/// Which branch of the steering rule decided, and on what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerBy {
    /// Source port equals destination port: the group's predetermined TM.
    EqualPorts,
    /// The greater-port endpoint ([`Flow::greater_port_endpoint`]) was hashed.
    Endpoint {
        /// Bucket.
        bucket: u16,
    },
    /// Source-affinity group: the greater-port endpoint's address, masked to
    /// the group's prefixes, was hashed.
    Address {
        /// Bucket.
        bucket: u16,
    },
    /// No ports: (src, dst, protocol) was hashed.
    NoPorts {
        /// Bucket.
        bucket: u16,
    },
}

impl SteerBy {
    /// The bucket that decided, if a hash decided.
    pub fn bucket(&self) -> Option<u16> {
        match *self {
            SteerBy::Endpoint { bucket }
            | SteerBy::Address { bucket }
            | SteerBy::NoPorts { bucket } => Some(bucket),
            SteerBy::EqualPorts => None,
        }
    }
}

/// The outcome of a steering lookup: group, TM, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steering {
    /// Group index.
    pub group: usize,
    /// TM index.
    pub tm: TmIndex,
    /// The deciding branch.
    pub by: SteerBy,
}

/// A complete, validated allocation table (all groups), immutable.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationTable {
    version: u64,
    key: HashKey,
    tms: Vec<Tm>,
    groups: Vec<Group>,
}

impl AllocationTable {
    /// Builds a table at `version`: each group's buckets are spread over its
    /// members by its profile. Errors on any invariant (see [`Self::from_parts`]).
    pub fn new(
        version: u64,
        key: HashKey,
        tms: Vec<Tm>,
        specs: Vec<GroupSpec>,
    ) -> Result<Self, TableError> {
        let mut groups = Vec::with_capacity(specs.len());
        for (g, spec) in specs.into_iter().enumerate() {
            let members: Vec<TmIndex> = tms
                .iter()
                .enumerate()
                .filter(|(_, t)| t.group == g)
                .map(|(i, _)| i as TmIndex)
                .collect();
            let targets = profile_targets(&spec.profile, &tms, &members, &spec.name)?;
            let owners = crate::rebalance::spread(
                &members
                    .iter()
                    .zip(&targets)
                    .map(|(&m, &t)| (m, t))
                    .collect::<Vec<_>>(),
            );
            let equal_ports_tm = largest_target(&members, &targets).unwrap_or(0);
            groups.push(Group {
                buckets: Buckets::from_vec(owners, &spec.name)?,
                name: spec.name,
                rules: spec.rules,
                hash: spec.hash,
                profile: spec.profile,
                equal_ports_tm,
            });
        }
        Self::from_parts(version, key, tms, groups)
    }

    /// Assembles a table from its parts, checking every invariant: 1 to 4096
    /// TMs with unique ids, names and unicast MACs; at least one group; unique
    /// group names; the first group without rules and every other group with
    /// at least one non-empty rule; every TM in an existing group; every group
    /// with at least one member; every bucket owned by a member of its group;
    /// the equal-ports TM a member; prefix lengths in range; every group's
    /// profile parameters valid for its members ([`Profile::validate`]); the
    /// version at most [`MAX_VERSION`].
    pub fn from_parts(
        version: u64,
        key: HashKey,
        tms: Vec<Tm>,
        groups: Vec<Group>,
    ) -> Result<Self, TableError> {
        check_version(version)?;
        if tms.is_empty() || tms.len() > MAX_TMS {
            return Err(TableError::TmCount {
                found: tms.len(),
                max: MAX_TMS,
            });
        }
        for (i, a) in tms.iter().enumerate() {
            if a.mac.is_multicast() {
                return Err(TableError::Groups(format!(
                    "traffic manager '{}' has the multicast MAC {}",
                    a.name, a.mac
                )));
            }
            for (j, b) in tms.iter().enumerate().skip(i + 1) {
                let dup = |field: &'static str, value: String| TableError::DuplicateTm {
                    field,
                    value,
                    first: i,
                    second: j,
                };
                if a.id == b.id {
                    return Err(dup("id", a.id.to_string()));
                }
                if a.name == b.name {
                    return Err(dup("name", a.name.clone()));
                }
                if a.mac == b.mac {
                    return Err(dup("MAC", a.mac.to_string()));
                }
            }
        }
        if groups.is_empty() {
            return Err(TableError::Groups(
                "a table needs at least the default group".into(),
            ));
        }
        for (g, group) in groups.iter().enumerate() {
            if groups[..g].iter().any(|o| o.name == group.name) {
                return Err(TableError::Groups(format!(
                    "group name '{}' is used twice",
                    group.name
                )));
            }
            if g == 0 && !group.rules.is_empty() {
                return Err(TableError::Groups(format!(
                    "the first group ('{}') is the default group and takes no rules",
                    group.name
                )));
            }
            if g > 0 && group.rules.is_empty() {
                return Err(TableError::Groups(format!(
                    "group '{}' has no rules, so no traffic would ever select it",
                    group.name
                )));
            }
            if group.rules.iter().any(Rule::is_empty) {
                return Err(TableError::Groups(format!(
                    "group '{}' has a rule with no criterion",
                    group.name
                )));
            }
            if let HashMode::Address {
                v4_prefix,
                v6_prefix,
            } = group.hash
            {
                if v4_prefix > 32 || v6_prefix > 128 {
                    return Err(TableError::Groups(format!(
                        "group '{}': address hash prefixes /{v4_prefix} (IPv4) and /{v6_prefix} (IPv6) out of range",
                        group.name
                    )));
                }
            }
            if !tms.iter().any(|t| t.group == g) {
                return Err(TableError::Groups(format!(
                    "group '{}' has no traffic manager",
                    group.name
                )));
            }
            for (b, &owner) in group.buckets.as_slice().iter().enumerate() {
                let tm = tms
                    .get(usize::from(owner))
                    .ok_or_else(|| TableError::UnknownTm {
                        group: group.name.clone(),
                        bucket: b,
                        tm: usize::from(owner),
                        count: tms.len(),
                    })?;
                if tm.group != g {
                    return Err(TableError::ForeignTm {
                        group: group.name.clone(),
                        bucket: b,
                        tm: tm.name.clone(),
                        tm_group: groups
                            .get(tm.group)
                            .map(|o| o.name.clone())
                            .unwrap_or_default(),
                    });
                }
            }
            let ep = usize::from(group.equal_ports_tm);
            if tms.get(ep).map(|t| t.group) != Some(g) {
                return Err(TableError::EqualPortsTm {
                    group: group.name.clone(),
                    tm: ep,
                });
            }
            let members = tms.iter().filter(|t| t.group == g).count();
            group
                .profile
                .validate(members)
                .map_err(|source| TableError::Profile {
                    group: group.name.clone(),
                    source,
                })?;
        }
        if let Some(t) = tms.iter().find(|t| t.group >= groups.len()) {
            return Err(TableError::UnknownGroup {
                tm: t.name.clone(),
                group: format!("#{}", t.group),
            });
        }
        Ok(AllocationTable {
            version,
            key,
            tms,
            groups,
        })
    }

    /// The table version (monotonic across a cluster's history).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The same table under another version number.
    ///
    /// # Panics
    ///
    /// If `version` exceeds [`MAX_VERSION`]; for a version that comes from
    /// input, use [`Self::try_with_version`].
    pub fn with_version(self, version: u64) -> Self {
        match self.try_with_version(version) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// The same table under another version number, at most [`MAX_VERSION`].
    pub fn try_with_version(mut self, version: u64) -> Result<Self, TableError> {
        check_version(version)?;
        self.version = version;
        Ok(self)
    }

    /// The version after this one, for the operations that bump it: an
    /// error at [`MAX_VERSION`].
    pub fn next_version(&self) -> Result<u64, TableError> {
        let next = self.version.saturating_add(1);
        check_version(next)?;
        Ok(next)
    }

    /// The cluster's hash key.
    pub fn key(&self) -> &HashKey {
        &self.key
    }

    /// All TMs, by index.
    pub fn tms(&self) -> &[Tm] {
        &self.tms
    }

    /// The TM at `index`.
    pub fn tm(&self, index: TmIndex) -> Option<&Tm> {
        self.tms.get(usize::from(index))
    }

    /// The index of the TM with stable id `id`.
    pub fn tm_index_by_id(&self, id: u32) -> Option<TmIndex> {
        self.tms
            .iter()
            .position(|t| t.id == id)
            .map(|i| i as TmIndex)
    }

    /// The index of the TM named `name`.
    pub fn tm_index_by_name(&self, name: &str) -> Option<TmIndex> {
        self.tms
            .iter()
            .position(|t| t.name == name)
            .map(|i| i as TmIndex)
    }

    /// All groups; the first is the default group.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The index of the group named `name`.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// Member TM indexes of group `g`, in TM-list order.
    pub fn members(&self, g: usize) -> Vec<TmIndex> {
        self.tms
            .iter()
            .enumerate()
            .filter(|(_, t)| t.group == g)
            .map(|(i, _)| i as TmIndex)
            .collect()
    }

    /// Buckets TM `tm` owns in its own group's table (0 for an index the
    /// table does not have): whether it is in service.
    pub fn buckets_of(&self, tm: TmIndex) -> u32 {
        self.tm(tm).map_or(0, |t| {
            self.groups.get(t.group).map_or(0, |grp| {
                grp.buckets.as_slice().iter().filter(|&&o| o == tm).count() as u32
            })
        })
    }

    /// Buckets whose owner (by TM id) differs between this table and
    /// `other`, over the groups both have.
    pub fn moved_buckets(&self, other: &AllocationTable) -> usize {
        let id = |t: &AllocationTable, g: usize, k: usize| {
            t.tms[usize::from(t.groups[g].buckets.get(k))].id
        };
        (0..self.groups.len().min(other.groups.len()))
            .map(|g| {
                (0..TABLE_SIZE)
                    .filter(|&k| id(self, g, k) != id(other, g, k))
                    .count()
            })
            .sum()
    }

    /// Entries per TM index in group `g` (zero for TMs of other groups).
    pub fn counts(&self, g: usize) -> Vec<u32> {
        self.groups
            .get(g)
            .map(|grp| grp.buckets.counts(self.tms.len()))
            .unwrap_or_else(|| vec![0; self.tms.len()])
    }

    /// Target entries per TM index for group `g` under `profile` (zero for
    /// non-members), summing to 4096.
    pub fn targets(&self, g: usize, profile: &Profile) -> Result<Vec<u32>, TableError> {
        let group = self
            .groups
            .get(g)
            .ok_or_else(|| TableError::Groups(format!("no group #{g}")))?;
        let members = self.members(g);
        let t = profile_targets(profile, &self.tms, &members, &group.name)?;
        let mut out = vec![0u32; self.tms.len()];
        for (&m, &v) in members.iter().zip(&t) {
            out[usize::from(m)] = v;
        }
        Ok(out)
    }

    /// Like [`AllocationTable::targets`], with the TMs of `excluded` given
    /// no entry (failed or drained TMs): the profile spreads over the other
    /// members. An error if no member is left.
    pub fn targets_excluding(
        &self,
        g: usize,
        profile: &Profile,
        excluded: &[TmIndex],
    ) -> Result<Vec<u32>, TableError> {
        let group = self
            .groups
            .get(g)
            .ok_or_else(|| TableError::Groups(format!("no group #{g}")))?;
        let members: Vec<TmIndex> = self
            .members(g)
            .into_iter()
            .filter(|m| !excluded.contains(m))
            .collect();
        if members.is_empty() {
            return Err(TableError::NoSurvivors {
                group: group.name.clone(),
            });
        }
        let t = profile_targets(profile, &self.tms, &members, &group.name)?;
        let mut out = vec![0u32; self.tms.len()];
        for (&m, &v) in members.iter().zip(&t) {
            out[usize::from(m)] = v;
        }
        Ok(out)
    }

    /// The group whose rules match `flow`: the first non-default group with a
    /// matching rule, else the default group (0).
    #[inline]
    pub fn group_of(&self, flow: &Flow) -> usize {
        if self.groups.len() == 1 {
            return 0;
        }
        self.groups
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, g)| g.rules.iter().any(|r| r.matches(flow)))
            .map_or(0, |(i, _)| i)
    }

    /// The bucket of endpoint (`addr`, `port`) in group `g`, by the group's hash mode.
    #[inline]
    pub fn endpoint_bucket(&self, g: usize, addr: IpAddr, port: u16) -> usize {
        match self.groups.get(g).map(|grp| grp.hash) {
            Some(HashMode::Address {
                v4_prefix,
                v6_prefix,
            }) => bucket(hash_address(
                &self.key,
                mask_addr(addr, v4_prefix, v6_prefix),
            )),
            _ => bucket(hash_endpoint(&self.key, addr, port)),
        }
    }

    /// Steering rule, steps 5–7 of the design: group by rules, equal ports to
    /// the group's predetermined TM, otherwise the greater-port endpoint's
    /// bucket; flows without ports by (src, dst, protocol).
    #[inline]
    pub fn steer(&self, flow: &Flow) -> Steering {
        let g = self.group_of(flow);
        let group = &self.groups[g];
        let by = match (flow.ports, flow.greater_port_endpoint()) {
            (Some(_), None) => {
                return Steering {
                    group: g,
                    tm: group.equal_ports_tm,
                    by: SteerBy::EqualPorts,
                }
            }
            (_, Some((addr, port))) => match group.hash {
                HashMode::Endpoint => SteerBy::Endpoint {
                    bucket: bucket(hash_endpoint(&self.key, addr, port)) as u16,
                },
                HashMode::Address {
                    v4_prefix,
                    v6_prefix,
                } => SteerBy::Address {
                    bucket: bucket(hash_address(
                        &self.key,
                        mask_addr(addr, v4_prefix, v6_prefix),
                    )) as u16,
                },
            },
            (None, None) => SteerBy::NoPorts {
                bucket: bucket(hash_triple(&self.key, flow.src, flow.dst, flow.protocol)) as u16,
            },
        };
        Steering {
            group: g,
            tm: group.buckets.get(usize::from(by.bucket().unwrap_or(0))),
            by,
        }
    }

    /// Replaces the groups and TM list (used by the rebalancing operations,
    /// which keep the invariants themselves and re-check them here).
    pub(crate) fn rebuilt(
        &self,
        version: u64,
        tms: Vec<Tm>,
        groups: Vec<Group>,
    ) -> Result<Self, TableError> {
        Self::from_parts(version, self.key, tms, groups)
    }
}

fn check_version(version: u64) -> Result<(), TableError> {
    if version > MAX_VERSION {
        return Err(TableError::VersionRange {
            version,
            max: MAX_VERSION,
        });
    }
    Ok(())
}

/// Targets for `members` (in order) under `profile`, summing to 4096.
pub(crate) fn profile_targets(
    profile: &Profile,
    tms: &[Tm],
    members: &[TmIndex],
    group: &str,
) -> Result<Vec<u32>, TableError> {
    let capacity: Vec<u32> = members
        .iter()
        .map(|&m| tms.get(usize::from(m)).map_or(0, |t| t.weight))
        .collect();
    profile
        .targets(&capacity, TABLE_SIZE as u32)
        .map_err(|source| TableError::Profile {
            group: group.to_string(),
            source,
        })
}

/// The member with the largest target (ties: the first), for the equal-ports role.
pub(crate) fn largest_target(members: &[TmIndex], targets: &[u32]) -> Option<TmIndex> {
    members
        .iter()
        .zip(targets)
        .fold(None, |best: Option<(TmIndex, u32)>, (&m, &t)| match best {
            Some((_, bt)) if bt >= t => best,
            _ => Some((m, t)),
        })
        .map(|(m, _)| m)
}

#[cfg(test)]
pub(crate) mod test {
    use super::*;
    use crate::error::ProfileError;
    use crate::rules::{proto, Protocol};

    /// A table of `n` TMs in the default group, uniform, with a fixed key.
    pub(crate) fn uniform(n: usize) -> AllocationTable {
        let tms = (0..n)
            .map(|i| Tm {
                id: i as u32,
                name: format!("tm{i}"),
                mac: "02:53:54:00:00:00"
                    .parse::<MacAddr>()
                    .expect("mac")
                    .offset(i as u64 + 1),
                weight: 1,
                group: 0,
            })
            .collect();
        AllocationTable::new(
            1,
            test_key(),
            tms,
            vec![GroupSpec::default_group(Profile::Uniform)],
        )
        .expect("table")
    }

    pub(crate) fn test_key() -> HashKey {
        "000102030405060708090a0b0c0d0e0f".parse().expect("key")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn new_table_is_spread_and_exact() {
        let t = uniform(8);
        assert_eq!(t.counts(0), vec![512; 8]);
        assert_eq!(t.groups()[0].buckets.longest_run().1, 1);
        let t = uniform(3);
        assert_eq!(t.counts(0), vec![1366, 1365, 1365]);
        assert!(t.groups()[0].buckets.longest_run().1 <= 2);
    }

    #[test]
    fn steering_branches() {
        let t = uniform(8);
        // Greater port is the client's: the client endpoint is hashed, both ways.
        let f = Flow::with_ports(proto::TCP, ip("203.0.113.7"), 6900, ip("198.51.100.1"), 80);
        let s = t.steer(&f);
        assert_eq!(f.greater_port_endpoint(), Some((ip("203.0.113.7"), 6900)));
        assert_eq!(
            f.reversed().greater_port_endpoint(),
            Some((ip("203.0.113.7"), 6900))
        );
        let want = bucket(hash_endpoint(t.key(), ip("203.0.113.7"), 6900)) as u16;
        assert_eq!(s.by, SteerBy::Endpoint { bucket: want });
        assert_eq!(t.steer(&f.reversed()), s);
        assert_eq!(
            s.tm,
            t.groups()[0]
                .buckets
                .get(bucket(hash_endpoint(t.key(), ip("203.0.113.7"), 6900)))
        );
        // Equal ports: the predetermined TM.
        let e = Flow::with_ports(proto::UDP, ip("192.0.2.1"), 500, ip("192.0.2.2"), 500);
        assert_eq!(
            t.steer(&e),
            Steering {
                group: 0,
                tm: t.groups()[0].equal_ports_tm,
                by: SteerBy::EqualPorts
            }
        );
        // No ports: direction-free triple.
        let icmp = Flow::without_ports(proto::ICMP, ip("192.0.2.1"), ip("198.51.100.1"));
        assert_eq!(t.steer(&icmp).tm, t.steer(&icmp.reversed()).tm);
        assert!(matches!(t.steer(&icmp).by, SteerBy::NoPorts { .. }));
    }

    fn two_groups() -> AllocationTable {
        let mut tms = uniform(6).tms().to_vec();
        for t in tms.iter_mut().skip(4) {
            t.group = 1;
        }
        let dns = GroupSpec {
            name: "dns".into(),
            rules: vec![Rule {
                protocol: Some(Protocol(proto::UDP)),
                ports: Some("53".parse().expect("range")),
                prefix: None,
            }],
            hash: HashMode::Endpoint,
            profile: Profile::Uniform,
        };
        AllocationTable::new(
            1,
            test_key(),
            tms,
            vec![GroupSpec::default_group(Profile::Uniform), dns],
        )
        .expect("table")
    }

    #[test]
    fn group_rules_pick_the_table() {
        let t = two_groups();
        assert_eq!(t.counts(0), vec![1024, 1024, 1024, 1024, 0, 0]);
        assert_eq!(t.counts(1), vec![0, 0, 0, 0, 2048, 2048]);
        let q = Flow::with_ports(
            proto::UDP,
            ip("203.0.113.9"),
            40001,
            ip("198.51.100.53"),
            53,
        );
        let s = t.steer(&q);
        assert_eq!(s.group, 1);
        assert!(s.tm >= 4);
        assert_eq!(t.steer(&q.reversed()), s);
        let web = Flow::with_ports(
            proto::TCP,
            ip("203.0.113.9"),
            40001,
            ip("198.51.100.53"),
            53,
        );
        assert_eq!(t.steer(&web).group, 0);
        assert!(t.steer(&web).tm < 4);
    }

    #[test]
    fn source_affinity_group_hashes_the_masked_address() {
        let mut tms = uniform(4).tms().to_vec();
        tms.iter_mut().for_each(|t| t.group = 0);
        let spec = GroupSpec {
            hash: HashMode::Address {
                v4_prefix: 24,
                v6_prefix: 64,
            },
            ..GroupSpec::default_group(Profile::Uniform)
        };
        let t = AllocationTable::new(1, test_key(), tms, vec![spec]).expect("table");
        let a = t.steer(&Flow::with_ports(
            proto::TCP,
            ip("203.0.113.7"),
            50000,
            ip("198.51.100.1"),
            443,
        ));
        let b = t.steer(&Flow::with_ports(
            proto::TCP,
            ip("203.0.113.200"),
            41234,
            ip("198.51.100.1"),
            443,
        ));
        assert_eq!(a.tm, b.tm);
        assert!(
            matches!(a.by, SteerBy::Address { bucket } if usize::from(bucket) == t.endpoint_bucket(0, ip("203.0.113.0"), 0))
        );
    }

    #[test]
    fn invariants_are_enforced() {
        let t = uniform(4);
        let (tms, groups) = (t.tms().to_vec(), t.groups().to_vec());
        let key = test_key();
        let mut dup = tms.clone();
        dup[1].mac = dup[0].mac;
        assert!(matches!(
            AllocationTable::from_parts(1, key, dup, groups.clone()),
            Err(TableError::DuplicateTm { field: "MAC", .. })
        ));
        let mut dup = tms.clone();
        dup[2].id = 0;
        assert!(matches!(
            AllocationTable::from_parts(1, key, dup, groups.clone()),
            Err(TableError::DuplicateTm { field: "id", .. })
        ));
        let mut g = groups.clone();
        let mut owners = g[0].buckets.as_slice().to_vec();
        owners[77] = 9;
        g[0].buckets = Buckets::from_vec(owners, "default").expect("size");
        assert!(matches!(
            AllocationTable::from_parts(1, key, tms.clone(), g),
            Err(TableError::UnknownTm {
                bucket: 77,
                tm: 9,
                ..
            })
        ));
        assert!(matches!(
            Buckets::from_vec(vec![0; 4095], "x"),
            Err(TableError::InvalidTableSize { size: 4095, .. })
        ));
        let mut g = groups.clone();
        g[0].equal_ports_tm = 7;
        assert!(matches!(
            AllocationTable::from_parts(1, key, tms.clone(), g),
            Err(TableError::EqualPortsTm { .. })
        ));
        assert!(matches!(
            AllocationTable::from_parts(1, key, vec![], groups.clone()),
            Err(TableError::TmCount { .. })
        ));
        let mut g = groups.clone();
        g[0].rules.push(Rule {
            protocol: Some(Protocol(6)),
            ports: None,
            prefix: None,
        });
        assert!(matches!(
            AllocationTable::from_parts(1, key, tms.clone(), g),
            Err(TableError::Groups(_))
        ));
        let mut mc = tms;
        mc[0].mac = "01:00:5e:00:00:01".parse().expect("mac");
        assert!(matches!(
            AllocationTable::from_parts(1, key, mc, groups),
            Err(TableError::Groups(_))
        ));
    }

    #[test]
    fn foreign_tm_in_a_group_is_rejected() {
        let t = two_groups();
        let mut groups = t.groups().to_vec();
        let mut owners = groups[1].buckets.as_slice().to_vec();
        owners[5] = 0;
        groups[1].buckets = Buckets::from_vec(owners, "dns").expect("size");
        let r = AllocationTable::from_parts(1, test_key(), t.tms().to_vec(), groups);
        assert!(
            matches!(r, Err(TableError::ForeignTm { bucket: 5, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn longest_run_is_cyclic() {
        let mut owners = vec![1u16; TABLE_SIZE];
        owners[0] = 0;
        owners[TABLE_SIZE - 1] = 0;
        owners[TABLE_SIZE - 2] = 0;
        let b = Buckets::from_vec(owners, "x").expect("size");
        assert_eq!(b.longest_run(), (1, TABLE_SIZE - 3));
        let mut owners = vec![1u16; TABLE_SIZE];
        for (i, o) in owners.iter_mut().enumerate() {
            *o = (i % 2) as u16;
        }
        owners[TABLE_SIZE - 1] = 0;
        owners[1] = 0;
        let b = Buckets::from_vec(owners, "x").expect("size");
        // 4094, 4095, 0, 1, 2 are all TM 0.
        assert_eq!(b.longest_run(), (0, 5));
    }

    #[test]
    fn stored_profiles_are_validated_at_construction() {
        let t = uniform(4);
        let with = |profile: Profile| {
            let mut groups = t.groups().to_vec();
            groups[0].profile = profile;
            AllocationTable::from_parts(t.version(), *t.key(), t.tms().to_vec(), groups)
        };
        let named = |r: Result<AllocationTable, TableError>| match r {
            Err(TableError::Profile {
                source: ProfileError::InvalidParameter { name, .. },
                ..
            }) => name,
            Err(TableError::Profile {
                source: ProfileError::CustomLength { given, tms },
                ..
            }) => format!("{given} for {tms}"),
            other => panic!("{:?}", other.map(|_| ())),
        };
        let gaussian = |mean, sigma| Profile::Gaussian {
            mean: Some(mean),
            sigma: Some(sigma),
        };
        assert_eq!(named(with(gaussian(1.0, f64::NAN))), "sigma");
        assert_eq!(named(with(gaussian(1.0, -1.0))), "sigma");
        assert_eq!(named(with(gaussian(f64::INFINITY, 1.0))), "mean");
        assert_eq!(
            named(with(Profile::Rayleigh {
                sigma: Some(f64::NEG_INFINITY)
            })),
            "sigma"
        );
        let custom = |weights: &[f64]| Profile::Custom {
            weights: weights.to_vec(),
        };
        assert_eq!(named(with(custom(&[1.0, 1.0, 1.0]))), "3 for 4");
        assert_eq!(named(with(custom(&[]))), "0 for 4");
        assert_eq!(named(with(custom(&[1.0, 1.0, -0.5, 1.0]))), "weights[2]");
        assert_eq!(
            named(with(custom(&[f64::NAN, 1.0, 1.0, 1.0]))),
            "weights[0]"
        );
        // Valid parameters, defaults included, are accepted.
        assert!(with(custom(&[1.0, 0.0, 2.0, 3.0])).is_ok());
        assert!(with(gaussian(-3.0, 0.5)).is_ok());
        assert!(with(Profile::Gaussian {
            mean: None,
            sigma: None
        })
        .is_ok());
    }

    #[test]
    fn versions_beyond_i64_are_refused() {
        let max = i64::MAX as u64;
        let t = uniform(4);
        let at = |v: u64| {
            AllocationTable::from_parts(v, *t.key(), t.tms().to_vec(), t.groups().to_vec())
        };
        assert!(at(max).is_ok());
        for v in [max + 1, u64::MAX] {
            assert!(
                matches!(at(v), Err(TableError::VersionRange { version, .. }) if version == v),
                "{v}"
            );
            assert!(matches!(
                AllocationTable::new(
                    v,
                    *t.key(),
                    t.tms().to_vec(),
                    vec![GroupSpec::default_group(Profile::Uniform)]
                ),
                Err(TableError::VersionRange { .. })
            ));
        }
        // Operations that bump the version refuse to go past the top, without overflowing.
        let top = at(max).expect("top");
        assert!(matches!(
            top.rebalance(0, &Profile::Weighted),
            Err(TableError::VersionRange { .. })
        ));
        assert!(matches!(
            top.remove_tm(0),
            Err(TableError::VersionRange { .. })
        ));
        let mut extra = top.tms()[0].clone();
        extra.id = 99;
        extra.name = "tm99".into();
        extra.mac = extra.mac.offset(99);
        assert!(matches!(
            top.add_tm(extra),
            Err(TableError::VersionRange { .. })
        ));
        // A failover keeps the version: it still works at the top.
        assert!(top.failover(&[0]).is_ok());
    }
}
