//! Typed zero-copy views of the frames the distributor reads: Ethernet with VLAN tags, ARP, IPv4, IPv6 with extension headers, ports, ICMP/ICMPv6.
//!
//! Contract (as in smoltcp's `wire`): a view is made with `new_checked`,
//! which verifies every length the accessors rely on; after that no
//! accessor panics. Field positions are `Range<usize>` constants in a `field`
//! module per header. Setters exist only for what the data path rewrites.

use std::net::{Ipv4Addr, Ipv6Addr};

use allocation::MacAddr;

use crate::verdict::Drop;

type Field = std::ops::Range<usize>;

/// Ethertypes the distributor knows.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service tag (QinQ).
    pub const QINQ: u16 = 0x88a8;
    /// Pre-standard QinQ tag still seen in the field.
    pub const QINQ_9100: u16 = 0x9100;
}

/// Reads a big-endian u16 at `at` (caller checked the length).
#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn mac_at(b: &[u8], r: Field) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[r]);
    MacAddr(m)
}

/// An Ethernet II frame, with up to two VLAN tags (802.1Q, 802.1ad).
#[derive(Debug, Clone, Copy)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
    ethertype: u16,
    payload: usize,
    tags: u8,
}

/// Ethernet header fields.
pub mod eth {
    use super::Field;
    /// Destination MAC.
    pub const DST: Field = 0..6;
    /// Source MAC.
    pub const SRC: Field = 6..12;
    /// EtherType (untagged).
    pub const TYPE: usize = 12;
    /// Header length (untagged).
    pub const HEADER: usize = 14;
    /// An 802.1Q/802.1ad tag's length.
    pub const TAG: usize = 4;
}

/// Most VLAN tags walked (QinQ).
pub const MAX_TAGS: u8 = 2;

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Checks the header and walks the VLAN tags to the inner ethertype.
    pub fn new_checked(buffer: T) -> Result<Self, Drop> {
        let b = buffer.as_ref();
        if b.len() < eth::HEADER {
            return Err(Drop::Truncated);
        }
        let (mut ty, mut at, mut tags) = (be16(b, eth::TYPE), eth::HEADER, 0u8);
        while matches!(ty, ethertype::VLAN | ethertype::QINQ | ethertype::QINQ_9100) {
            if tags == MAX_TAGS {
                return Err(Drop::TooManyTags);
            }
            if b.len() < at + eth::TAG {
                return Err(Drop::Truncated);
            }
            ty = be16(b, at + 2);
            at += eth::TAG;
            tags += 1;
        }
        Ok(EthernetFrame {
            buffer,
            ethertype: ty,
            payload: at,
            tags,
        })
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        mac_at(self.buffer.as_ref(), eth::DST)
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        mac_at(self.buffer.as_ref(), eth::SRC)
    }

    /// The ethertype after the VLAN tags.
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }

    /// Offset of the payload (after the tags).
    pub fn payload_offset(&self) -> usize {
        self.payload
    }

    /// Number of VLAN tags.
    pub fn tags(&self) -> u8 {
        self.tags
    }
}

/// Rewrites the destination MAC of a frame in place (tags untouched).
/// The caller has checked the frame (at least an Ethernet header).
#[inline(always)]
pub fn set_dst_mac(frame: &mut [u8], mac: MacAddr) {
    frame[eth::DST].copy_from_slice(&mac.0);
}

/// Rewrites the source MAC of a frame in place.
#[inline(always)]
pub fn set_src_mac(frame: &mut [u8], mac: MacAddr) {
    frame[eth::SRC].copy_from_slice(&mac.0);
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy)]
pub struct ArpPacket<'a> {
    b: &'a [u8],
}

/// ARP field positions (relative to the ARP header).
pub mod arp {
    use super::Field;
    /// Operation.
    pub const OPER: usize = 6;
    /// Sender hardware address.
    pub const SHA: Field = 8..14;
    /// Sender protocol address.
    pub const SPA: Field = 14..18;
    /// Target hardware address.
    pub const THA: Field = 18..24;
    /// Target protocol address.
    pub const TPA: Field = 24..28;
    /// Header length.
    pub const LEN: usize = 28;
    /// Request.
    pub const REQUEST: u16 = 1;
    /// Reply.
    pub const REPLY: u16 = 2;
}

impl<'a> ArpPacket<'a> {
    /// Checks length and that it is Ethernet/IPv4 ARP.
    pub fn new_checked(b: &'a [u8]) -> Result<Self, Drop> {
        if b.len() < arp::LEN {
            return Err(Drop::Truncated);
        }
        if be16(b, 0) != 1 || be16(b, 2) != ethertype::IPV4 || b[4] != 6 || b[5] != 4 {
            return Err(Drop::Malformed);
        }
        Ok(ArpPacket { b })
    }

    /// Operation (1 request, 2 reply).
    pub fn oper(&self) -> u16 {
        be16(self.b, arp::OPER)
    }

    /// Sender MAC.
    pub fn sha(&self) -> MacAddr {
        mac_at(self.b, arp::SHA)
    }

    /// Sender IPv4 address.
    pub fn spa(&self) -> Ipv4Addr {
        ip4_at(self.b, arp::SPA.start)
    }

    /// Target IPv4 address.
    pub fn tpa(&self) -> Ipv4Addr {
        ip4_at(self.b, arp::TPA.start)
    }
}

fn ip4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn ip6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// IP protocol numbers the distributor reads.
pub mod proto {
    pub use allocation::rules::proto::{ICMP, ICMPV6, TCP, UDP};
    /// IPv6 hop-by-hop options.
    pub const HOPOPT: u8 = 0;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header.
    pub const AH: u8 = 51;
    /// IPv6 "no next header".
    pub const NONE: u8 = 59;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
    /// SCTP (has ports like TCP and UDP).
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;
}

/// Fragment information of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    /// Identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// The protocol the fragment header names (IPv4: the protocol; IPv6:
    /// the fragment header's next header), the same in every fragment.
    pub next: u8,
}

impl Frag {
    /// The first fragment (offset 0): it carries the transport header.
    pub fn is_first(&self) -> bool {
        self.offset == 0
    }
}

/// What an IP header (v4 or v6, extension headers walked) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    /// Source address.
    pub src: std::net::IpAddr,
    /// Destination address.
    pub dst: std::net::IpAddr,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the upper-layer header, relative to the IP header.
    pub l4: usize,
    /// End of the IP packet, relative to the IP header (total / payload length; Ethernet padding excluded).
    pub end: usize,
    /// Fragment information, if the packet is a fragment.
    pub frag: Option<Frag>,
}

/// IPv4 field positions.
pub mod ipv4 {
    use super::Field;
    /// Total length.
    pub const LEN: usize = 2;
    /// Identification.
    pub const ID: usize = 4;
    /// Flags and fragment offset.
    pub const FRAG: usize = 6;
    /// Protocol.
    pub const PROTO: usize = 9;
    /// Source address.
    pub const SRC: Field = 12..16;
    /// Destination address.
    pub const DST: Field = 16..20;
    /// Minimal header.
    pub const MIN: usize = 20;
}

/// IPv6 field positions.
pub mod ipv6 {
    use super::Field;
    /// Payload length.
    pub const LEN: usize = 4;
    /// Next header.
    pub const NEXT: usize = 6;
    /// Hop limit.
    pub const HOP: usize = 7;
    /// Source address.
    pub const SRC: Field = 8..24;
    /// Destination address.
    pub const DST: Field = 24..40;
    /// Fixed header.
    pub const HEADER: usize = 40;
    /// Most extension headers walked before giving up.
    pub const MAX_EXT: usize = 8;
}

/// Parses an IPv4 header at the start of `b` (options skipped).
#[inline(always)]
pub fn parse_ipv4(b: &[u8]) -> Result<IpHeader, Drop> {
    parse_ipv4_in(b, false)
}

/// Parses the datagram embedded in an ICMP error: it is cut short by
/// design, so its length field may exceed what is present (`end` is then
/// the end of `b`).
pub fn parse_ipv4_embedded(b: &[u8]) -> Result<IpHeader, Drop> {
    parse_ipv4_in(b, true)
}

#[inline(always)]
fn parse_ipv4_in(b: &[u8], embedded: bool) -> Result<IpHeader, Drop> {
    if b.len() < ipv4::MIN {
        return Err(Drop::Truncated);
    }
    if b[0] >> 4 != 4 {
        return Err(Drop::Malformed);
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(be16(b, ipv4::LEN));
    if ihl < ipv4::MIN || total < ihl {
        return Err(Drop::Malformed);
    }
    if ihl > b.len() || (total > b.len() && !embedded) {
        return Err(Drop::Truncated);
    }
    let total = total.min(b.len());
    let ff = be16(b, ipv4::FRAG);
    let (offset, more) = (ff & 0x1fff, ff & 0x2000 != 0);
    let frag = (offset != 0 || more).then(|| Frag {
        id: u32::from(be16(b, ipv4::ID)),
        offset,
        more,
        next: b[ipv4::PROTO],
    });
    Ok(IpHeader {
        src: ip4_at(b, ipv4::SRC.start).into(),
        dst: ip4_at(b, ipv4::DST.start).into(),
        proto: b[ipv4::PROTO],
        l4: ihl,
        end: total,
        frag,
    })
}

/// Parses an IPv6 header at the start of `b`, walking hop-by-hop, routing,
/// fragment, destination-options and AH headers to the upper layer.
#[inline(always)]
pub fn parse_ipv6(b: &[u8]) -> Result<IpHeader, Drop> {
    parse_ipv6_in(b, false)
}

/// Parses the IPv6 datagram embedded in an ICMPv6 error (cut short by design).
pub fn parse_ipv6_embedded(b: &[u8]) -> Result<IpHeader, Drop> {
    parse_ipv6_in(b, true)
}

#[inline(always)]
fn parse_ipv6_in(b: &[u8], embedded: bool) -> Result<IpHeader, Drop> {
    if b.len() < ipv6::HEADER {
        return Err(Drop::Truncated);
    }
    if b[0] >> 4 != 6 {
        return Err(Drop::Malformed);
    }
    let mut end = ipv6::HEADER + usize::from(be16(b, ipv6::LEN));
    if end > b.len() {
        if !embedded {
            return Err(Drop::Truncated);
        }
        end = b.len();
    }
    let (mut next, mut at, mut frag) = (b[ipv6::NEXT], ipv6::HEADER, None);
    let header = |proto, l4, frag| IpHeader {
        src: ip6_at(b, ipv6::SRC.start).into(),
        dst: ip6_at(b, ipv6::DST.start).into(),
        proto,
        l4,
        end,
        frag,
    };
    for _ in 0..ipv6::MAX_EXT {
        let len = match next {
            proto::HOPOPT | proto::ROUTING | proto::DSTOPTS => {
                if at + 2 > end {
                    return Err(Drop::Truncated);
                }
                (usize::from(b[at + 1]) + 1) * 8
            }
            proto::AH => {
                if at + 2 > end {
                    return Err(Drop::Truncated);
                }
                (usize::from(b[at + 1]) + 2) * 4
            }
            proto::FRAGMENT => {
                if at + 8 > end {
                    return Err(Drop::Truncated);
                }
                let ff = be16(b, at + 2);
                frag = Some(Frag {
                    id: u32::from_be_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]),
                    offset: ff >> 3,
                    more: ff & 1 != 0,
                    next: b[at],
                });
                8
            }
            _ => return Ok(header(next, at, frag)),
        };
        if at + len > end {
            return Err(Drop::Truncated);
        }
        next = b[at];
        at += len;
        // A non-first fragment's payload is not a header chain.
        if frag.is_some_and(|f| !f.is_first()) {
            return Ok(header(next, at, frag));
        }
    }
    Err(Drop::TooManyExtensions)
}

/// True for protocols whose first four bytes are source and destination port.
#[inline(always)]
pub fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        proto::TCP | proto::UDP | proto::SCTP | proto::UDPLITE
    )
}

/// The (source, destination) ports at the start of `l4`.
#[inline(always)]
pub fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    (l4.len() >= 4).then(|| (be16(l4, 0), be16(l4, 2)))
}

/// ICMP and ICMPv6 message types the distributor acts on.
pub mod icmp {
    /// ICMPv4 destination unreachable (includes "fragmentation needed").
    pub const V4_UNREACHABLE: u8 = 3;
    /// ICMPv4 source quench (deprecated, still carries the datagram).
    pub const V4_SOURCE_QUENCH: u8 = 4;
    /// ICMPv4 time exceeded.
    pub const V4_TIME_EXCEEDED: u8 = 11;
    /// ICMPv4 parameter problem.
    pub const V4_PARAMETER: u8 = 12;
    /// ICMPv6 destination unreachable.
    pub const V6_UNREACHABLE: u8 = 1;
    /// ICMPv6 packet too big.
    pub const V6_TOO_BIG: u8 = 2;
    /// ICMPv6 time exceeded.
    pub const V6_TIME_EXCEEDED: u8 = 3;
    /// ICMPv6 parameter problem.
    pub const V6_PARAMETER: u8 = 4;
    /// ICMPv6 neighbour solicitation.
    pub const NS: u8 = 135;
    /// ICMPv6 neighbour advertisement.
    pub const NA: u8 = 136;
    /// Offset of the embedded datagram in an error message.
    pub const ERROR_PAYLOAD: usize = 8;
    /// Offset of the target address in NS/NA.
    pub const ND_TARGET: usize = 8;
    /// Offset of the options in NS/NA.
    pub const ND_OPTIONS: usize = 24;
    /// ND option: source link-layer address.
    pub const OPT_SLLA: u8 = 1;
    /// ND option: target link-layer address.
    pub const OPT_TLLA: u8 = 2;

    /// True for ICMP (v4, `v6 = false`) or ICMPv6 error types that embed the offending datagram.
    pub fn is_error(v6: bool, ty: u8) -> bool {
        if v6 {
            matches!(
                ty,
                V6_UNREACHABLE | V6_TOO_BIG | V6_TIME_EXCEEDED | V6_PARAMETER
            )
        } else {
            matches!(
                ty,
                V4_UNREACHABLE | V4_SOURCE_QUENCH | V4_TIME_EXCEEDED | V4_PARAMETER
            )
        }
    }
}

/// The link-layer address option of type `opt` in ND options `b`, with its
/// offset inside `b`. Malformed options (length 0, running past the end) end
/// the search.
pub fn nd_lla_option(b: &[u8], opt: u8) -> Option<(usize, MacAddr)> {
    let mut at = 0;
    while at + 2 <= b.len() {
        let len = usize::from(b[at + 1]) * 8;
        if len == 0 || at + len > b.len() {
            return None;
        }
        if b[at] == opt && len >= 8 {
            return Some((at, mac_at(b, at + 2..at + 8)));
        }
        at += len;
    }
    None
}

/// The 16-bit one's-complement sum of `data` folded into `acc`.
pub fn checksum_add(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// Folds a one's-complement sum to the 16-bit checksum value.
pub fn checksum_fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The ICMPv6 checksum of `msg` (checksum field zeroed by the caller)
/// between `src` and `dst`.
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut acc = checksum_add(0, &src.octets());
    acc = checksum_add(acc, &dst.octets());
    acc = checksum_add(acc, &(msg.len() as u32).to_be_bytes());
    acc = checksum_add(acc, &[0, 0, 0, proto::ICMPV6]);
    checksum_fold(checksum_add(acc, msg))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn ethernet_tags() {
        let mut f = vec![0u8; 22];
        f[12..14].copy_from_slice(&ethertype::QINQ.to_be_bytes());
        f[16..18].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        f[20..22].copy_from_slice(&ethertype::IPV6.to_be_bytes());
        let e = EthernetFrame::new_checked(&f[..]).expect("frame");
        assert_eq!(
            (e.ethertype(), e.payload_offset(), e.tags()),
            (ethertype::IPV6, 22, 2)
        );
        assert_eq!(
            EthernetFrame::new_checked(&f[..20]).err(),
            Some(Drop::Truncated)
        );
        let mut three = f.clone();
        three[20..22].copy_from_slice(&ethertype::VLAN.to_be_bytes());
        three.extend_from_slice(&[0, 0, 0x08, 0]);
        assert_eq!(
            EthernetFrame::new_checked(&three[..]).err(),
            Some(Drop::TooManyTags)
        );
        assert_eq!(
            EthernetFrame::new_checked(&f[..13]).err(),
            Some(Drop::Truncated)
        );
    }

    #[test]
    fn ipv4_options_and_fragments() {
        // 24-byte header (one option word), MF set, id 0x1234.
        let mut h = vec![
            0x46, 0, 0, 28, 0x12, 0x34, 0x20, 0, 64, 17, 0, 0, 192, 0, 2, 1, 198, 51, 100, 2, 1, 1,
            1, 0,
        ];
        h.extend_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        let ip = parse_ipv4(&h).expect("ipv4");
        assert_eq!(ip.l4, 24);
        assert_eq!(
            ip.frag,
            Some(Frag {
                id: 0x1234,
                offset: 0,
                more: true,
                next: 17
            })
        );
        assert_eq!(ports(&h[ip.l4..ip.end]), Some((8080, 53)));
        // Padding after the packet is ignored; a short buffer is truncated.
        let mut padded = h.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(parse_ipv4(&padded).expect("ipv4").end, 28);
        assert_eq!(parse_ipv4(&h[..27]).err(), Some(Drop::Truncated));
        let mut bad = h.clone();
        bad[0] = 0x44;
        assert_eq!(parse_ipv4(&bad).err(), Some(Drop::Malformed));
    }

    #[test]
    fn ipv6_extension_chain() {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, proto::HOPOPT, 64];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[proto::DSTOPTS, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop, 8 bytes
        p.extend_from_slice(&[proto::FRAGMENT, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // dest opts, 16 bytes
        p.extend_from_slice(&[proto::UDP, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]); // fragment: offset 0, M
        p.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb, 0, 8, 0, 0]);
        let len = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        let ip = parse_ipv6(&p).expect("ipv6");
        assert_eq!(ip.proto, proto::UDP);
        assert_eq!(ip.l4, 40 + 8 + 16 + 8);
        assert_eq!(
            ip.frag,
            Some(Frag {
                id: 0xdead_beef,
                offset: 0,
                more: true,
                next: proto::UDP
            })
        );
        assert_eq!(ports(&p[ip.l4..ip.end]), Some((40000, 443)));
        assert_eq!(parse_ipv6(&p[..p.len() - 9]).err(), Some(Drop::Truncated));
    }

    #[test]
    fn nd_options() {
        let opts = [1, 1, 2, 0, 0, 0, 0, 9, 2, 1, 2, 0, 0, 0, 0, 7];
        assert_eq!(
            nd_lla_option(&opts, 2),
            Some((8, MacAddr([2, 0, 0, 0, 0, 7])))
        );
        assert_eq!(
            nd_lla_option(&[1, 0, 0, 0], 1),
            None,
            "zero length ends the walk"
        );
    }
}
