//! What the steering decides for a frame: the action, the branch that decided, the drop reasons, and per-worker counters.

use allocation::TmIndex;

/// A distributor port (an index into the configured port list).
pub type PortId = u16;

/// Why a frame was dropped. Every reason is a metric label (`name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// Shorter than a header it claims to have.
    Truncated,
    /// A header field is impossible (bad version, IHL < 5, length < header).
    Malformed,
    /// More than two VLAN tags.
    TooManyTags,
    /// More IPv6 extension headers than walked.
    TooManyExtensions,
    /// An ICMP error whose embedded datagram is too short to find its flow:
    /// steering it by anything else could reach the wrong TM.
    IcmpInnerTruncated,
    /// The table steers to a TM that has no configured port.
    NoTmPort,
    /// A non-first fragment arrived and no slot was free to hold it.
    FragmentHoldFull,
    /// A held fragment's first fragment never came.
    FragmentTimeout,
    /// A frame too large for a hold slot.
    FragmentTooLarge,
    /// The bridge would send the frame back out of the port it came in on.
    Hairpin,
    /// A reply (an ND advertisement, longer than the solicitation it
    /// answers) does not fit the buffer the backend gave the frame.
    NoRoomForReply,
    /// A flow in a bucket a transition was moving when this distributor
    /// restarted: its memory of that transition is gone, so it cannot tell
    /// the old owner's flows from the new owner's until the coordinator
    /// hands it the TMs' pins (see [`crate::steer::Plan::recovering`]).
    Recovering,
}

impl Drop {
    /// Every reason, for metrics.
    pub const ALL: [Drop; 12] = [
        Drop::Truncated,
        Drop::Malformed,
        Drop::TooManyTags,
        Drop::TooManyExtensions,
        Drop::IcmpInnerTruncated,
        Drop::NoTmPort,
        Drop::FragmentHoldFull,
        Drop::FragmentTimeout,
        Drop::FragmentTooLarge,
        Drop::Hairpin,
        Drop::NoRoomForReply,
        Drop::Recovering,
    ];

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            Drop::Truncated => "truncated",
            Drop::Malformed => "malformed",
            Drop::TooManyTags => "too_many_tags",
            Drop::TooManyExtensions => "too_many_extensions",
            Drop::IcmpInnerTruncated => "icmp_inner_truncated",
            Drop::NoTmPort => "no_tm_port",
            Drop::FragmentHoldFull => "fragment_hold_full",
            Drop::FragmentTimeout => "fragment_timeout",
            Drop::FragmentTooLarge => "fragment_too_large",
            Drop::Hairpin => "hairpin",
            Drop::NoRoomForReply => "no_room_for_reply",
            Drop::Recovering => "recovering",
        }
    }

    /// Position in [`Drop::ALL`] (declaration order, pinned by a test).
    #[inline(always)]
    fn index(self) -> usize {
        self as usize
    }
}

/// The branch of the steering rule that decided. Every branch is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// Layer 2: not for the cluster, bridged.
    Bridge,
    /// An ARP request for a cluster address, answered with the group MAC.
    ArpReply,
    /// An IPv6 neighbour solicitation for a cluster address, answered with the group MAC.
    NdReply,
    /// An ARP/ND answer to a TM's question, delivered to every TM.
    NeighbourToTms,
    /// From a TM, its cluster-address ARP/ND/IP sender rewritten to the group MAC, then bridged.
    FromTmRewritten,
    /// From a TM, bridged unchanged.
    FromTm,
    /// A non-first fragment following its first fragment's TM.
    Fragment,
    /// An ICMP error steered by its embedded flow.
    IcmpError,
    /// TCP/UDP with equal ports: the group's predetermined TM.
    EqualPorts,
    /// The greater-port endpoint was hashed.
    Endpoint,
    /// A source-affinity group hashed the masked address.
    Address,
    /// No ports: (src, dst, protocol) was hashed.
    NoPorts,
    /// Transition, moved bucket: a flow seen starting (TCP SYN from
    /// outside) goes to the new owner, and is remembered there.
    TransitionNew,
    /// Transition, moved bucket: a flow remembered from its start follows it.
    TransitionRemembered,
    /// Transition, moved bucket: any other packet goes to the old owner.
    TransitionOld,
    /// Transition, moved bucket: an ICMP error about a flow this
    /// distributor did not see start (it may have taken another
    /// distributor) goes to both the old and the new owner.
    TransitionIcmpBoth,
    /// A pinned flow (a UDP session or a connection its old owner still
    /// serves after a table change) goes to that owner.
    Pinned,
}

impl Branch {
    /// Every branch, for metrics.
    pub const ALL: [Branch; 17] = [
        Branch::Bridge,
        Branch::ArpReply,
        Branch::NdReply,
        Branch::NeighbourToTms,
        Branch::FromTmRewritten,
        Branch::FromTm,
        Branch::Fragment,
        Branch::IcmpError,
        Branch::EqualPorts,
        Branch::Endpoint,
        Branch::Address,
        Branch::NoPorts,
        Branch::TransitionNew,
        Branch::TransitionRemembered,
        Branch::TransitionOld,
        Branch::TransitionIcmpBoth,
        Branch::Pinned,
    ];

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            Branch::Bridge => "bridge",
            Branch::ArpReply => "arp_reply",
            Branch::NdReply => "nd_reply",
            Branch::NeighbourToTms => "neighbour_to_tms",
            Branch::FromTmRewritten => "from_tm_rewritten",
            Branch::FromTm => "from_tm",
            Branch::Fragment => "fragment",
            Branch::IcmpError => "icmp_error",
            Branch::EqualPorts => "equal_ports",
            Branch::Endpoint => "endpoint",
            Branch::Address => "address",
            Branch::NoPorts => "no_ports",
            Branch::TransitionNew => "transition_new",
            Branch::TransitionRemembered => "transition_remembered",
            Branch::TransitionOld => "transition_old",
            Branch::TransitionIcmpBoth => "transition_icmp_both",
            Branch::Pinned => "pinned",
        }
    }

    /// Position in [`Branch::ALL`] (declaration order, pinned by a test).
    #[inline(always)]
    fn index(self) -> usize {
        self as usize
    }
}

/// What to do with a frame (already rewritten in place where needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send to TM `tm` out of `port` (destination MAC rewritten to the TM's).
    ToTm {
        /// TM index.
        tm: TmIndex,
        /// Its port.
        port: PortId,
    },
    /// Send to TM `tm` out of `port`, and a copy to TM `also` out of
    /// `also_port` (that copy's destination MAC rewritten to `also`'s): an
    /// ICMP error about a flow in a moved bucket that this distributor did
    /// not see start. Either the old or the new owner has the flow; the
    /// other has no such connection and ignores the error.
    ToTmAndCopy {
        /// The new owner.
        tm: TmIndex,
        /// Its port.
        port: PortId,
        /// The old owner.
        also: TmIndex,
        /// Its port.
        also_port: PortId,
    },
    /// Send out of one port unchanged (bridged).
    Forward(PortId),
    /// Send out of every port but the ingress.
    Flood,
    /// Send a copy to every TM, each with the destination MAC rewritten to that TM's.
    ToAllTms,
    /// The frame was turned into a reply of `len` bytes: send it back out of the ingress port.
    Reply {
        /// New frame length.
        len: usize,
    },
    /// A fragment was copied into the hold pool; it is sent when its first fragment arrives.
    Held,
    /// Dropped.
    Drop(Drop),
}

/// Per-worker counters: plain integers, no atomics, no locks. A worker
/// owns its counters; the admin endpoint sums snapshots of all workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets per branch (`Branch::ALL` order).
    pub branch: [u64; Branch::ALL.len()],
    /// Drops per reason (`Drop::ALL` order).
    pub drops: [u64; Drop::ALL.len()],
    /// Packets sent to each TM index.
    pub tm_packets: Vec<u64>,
    /// Bytes sent to each TM index.
    pub tm_bytes: Vec<u64>,
    /// Receive errors reported by the backend.
    pub rx_errors: u64,
    /// Frames the backend failed to send.
    pub tx_errors: u64,
    /// Frames the backend dropped before steering (larger than its
    /// buffers, or lost by the kernel for want of receive-ring room).
    pub backend_drops: u64,
}

impl Counters {
    /// Counters for `tms` TMs.
    pub fn new(tms: usize) -> Self {
        Counters {
            tm_packets: vec![0; tms],
            tm_bytes: vec![0; tms],
            ..Default::default()
        }
    }

    /// Counts a branch.
    #[inline]
    pub fn branch(&mut self, b: Branch) {
        self.branch[b.index()] += 1;
    }

    /// Counts a drop.
    #[inline]
    pub fn drop(&mut self, d: Drop) {
        self.drops[d.index()] += 1;
    }

    /// Counts a frame sent to a TM (grows on a table with more TMs: control path only).
    #[inline]
    pub fn to_tm(&mut self, tm: TmIndex, bytes: usize) {
        let i = usize::from(tm);
        if i >= self.tm_packets.len() {
            self.tm_packets.resize(i + 1, 0);
            self.tm_bytes.resize(i + 1, 0);
        }
        self.tm_packets[i] += 1;
        self.tm_bytes[i] += bytes as u64;
    }

    /// Packets counted for a branch.
    pub fn of_branch(&self, b: Branch) -> u64 {
        self.branch[b.index()]
    }

    /// Drops counted for a reason.
    pub fn of_drop(&self, d: Drop) -> u64 {
        self.drops[d.index()]
    }

    /// Adds `other` into `self` (scrape-time summing over workers).
    pub fn add(&mut self, other: &Counters) {
        for (a, b) in self.branch.iter_mut().zip(&other.branch) {
            *a += b;
        }
        for (a, b) in self.drops.iter_mut().zip(&other.drops) {
            *a += b;
        }
        self.rx_errors += other.rx_errors;
        self.tx_errors += other.tx_errors;
        self.backend_drops += other.backend_drops;
        let n = self.tm_packets.len().max(other.tm_packets.len());
        self.tm_packets.resize(n, 0);
        self.tm_bytes.resize(n, 0);
        for (i, (&p, &b)) in other.tm_packets.iter().zip(&other.tm_bytes).enumerate() {
            self.tm_packets[i] += p;
            self.tm_bytes[i] += b;
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn all_lists_follow_declaration_order() {
        for (i, d) in Drop::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{d:?}");
        }
        for (i, b) in Branch::ALL.iter().enumerate() {
            assert_eq!(b.index(), i, "{b:?}");
        }
        let mut names: Vec<&str> = Drop::ALL
            .iter()
            .map(|d| d.name())
            .chain(Branch::ALL.iter().map(|b| b.name()))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            Drop::ALL.len() + Branch::ALL.len(),
            "metric labels are unique"
        );
    }
}
