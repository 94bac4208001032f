//! Frame builders: real Ethernet/IP/TCP/UDP/ICMP/ARP/ND bytes with correct checksums, for tests, simulations and benchmarks.
//!
//! These allocate (they are not on the data path). Every builder produces a
//! frame a real stack would accept: IPv4 header checksums, TCP/UDP/ICMPv6
//! checksums over the pseudo-header, ICMPv4 checksums.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use allocation::MacAddr;

use crate::wire::{checksum_add, checksum_fold, ethertype, icmp, icmpv6_checksum, proto};

/// Layer-2 framing: addresses and VLAN tags (outermost first, as (TPID, VLAN id)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2 {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// VLAN tags, outermost first.
    pub tags: Vec<(u16, u16)>,
}

impl L2 {
    /// Untagged framing.
    pub fn new(dst: MacAddr, src: MacAddr) -> Self {
        L2 {
            dst,
            src,
            tags: Vec::new(),
        }
    }

    /// The same framing with one more (inner) tag.
    pub fn tagged(mut self, tpid: u16, vid: u16) -> Self {
        self.tags.push((tpid, vid));
        self
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(l2: &L2, ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * l2.tags.len() + payload.len());
    f.extend_from_slice(&l2.dst.0);
    f.extend_from_slice(&l2.src.0);
    for &(tpid, vid) in &l2.tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The ethertype of an IP packet.
fn ip_ethertype(packet: &[u8]) -> u16 {
    if packet.first().is_some_and(|b| b >> 4 == 6) {
        ethertype::IPV6
    } else {
        ethertype::IPV4
    }
}

/// An Ethernet frame around an IP packet (v4 or v6, by its version nibble).
pub fn frame(l2: &L2, packet: &[u8]) -> Vec<u8> {
    ethernet(l2, ip_ethertype(packet), packet)
}

/// An IPv4 packet: 20-byte header (or longer with `options`, padded to
/// 4 bytes), header checksum set. `frag` = (offset in 8-byte units, more).
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    frag: (u16, bool),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let opt_len = options.len().div_ceil(4) * 4;
    let ihl = 20 + opt_len;
    let mut p = vec![0u8; ihl];
    p[0] = 0x40 | (ihl / 4) as u8;
    p[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let ff = (frag.0 & 0x1fff) | if frag.1 { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&ff.to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..20 + options.len()].copy_from_slice(options);
    let sum = checksum_fold(checksum_add(0, &p));
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet; `ext` is an already-built extension header chain whose
/// first header is `first_next` (use `protocol` and an empty `ext` for none).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, first_next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    p[6] = first_next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(ext);
    p.extend_from_slice(payload);
    p
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = checksum_add(acc, &s.octets());
            acc = checksum_add(acc, &d.octets());
            acc = checksum_add(acc, &[0, protocol]);
            acc = checksum_add(acc, &(len as u16).to_be_bytes());
        }
        (s, d) => {
            let (s6, d6) = (to_v6(s), to_v6(d));
            acc = checksum_add(acc, &s6.octets());
            acc = checksum_add(acc, &d6.octets());
            acc = checksum_add(acc, &(len as u32).to_be_bytes());
            acc = checksum_add(acc, &[0, 0, 0, protocol]);
        }
    }
    acc
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// TCP flags.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment (20-byte header) with its checksum for (src, dst).
pub fn tcp(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[12] = 5 << 4;
    s[13] = flags;
    s[14..16].copy_from_slice(&65535u16.to_be_bytes());
    s.extend_from_slice(payload);
    let sum = checksum_fold(checksum_add(pseudo_sum(src, dst, proto::TCP, s.len()), &s));
    s[16..18].copy_from_slice(&sum.to_be_bytes());
    s
}

/// A UDP datagram with its checksum for (src, dst).
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&sport.to_be_bytes());
    d[2..4].copy_from_slice(&dport.to_be_bytes());
    d[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(payload);
    let mut sum = checksum_fold(checksum_add(pseudo_sum(src, dst, proto::UDP, d.len()), &d));
    if sum == 0 {
        sum = 0xffff;
    }
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

/// A whole IP packet carrying `l4` from `src` to `dst` (v4 or v6 by address family).
pub fn ip(src: IpAddr, dst: IpAddr, protocol: u8, id: u16, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, protocol, id, (0, false), &[], l4),
        (s, d) => ipv6(to_v6(s), to_v6(d), protocol, &[], l4),
    }
}

/// A complete TCP frame.
pub fn tcp_frame(
    l2: &L2,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    frame(
        l2,
        &ip(
            src,
            dst,
            proto::TCP,
            1,
            &tcp(src, sport, dst, dport, flags, 1, payload),
        ),
    )
}

/// A complete UDP frame.
pub fn udp_frame(
    l2: &L2,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    frame(
        l2,
        &ip(
            src,
            dst,
            proto::UDP,
            1,
            &udp(src, sport, dst, dport, payload),
        ),
    )
}

/// An ICMPv4 message (type, code, 4 bytes of "rest of header", body) with its checksum.
pub fn icmpv4(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let sum = checksum_fold(checksum_add(0, &m));
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An ICMPv6 message with its checksum for (src, dst).
pub fn icmpv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let sum = icmpv6_checksum(&src, &dst, &m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An ICMP error from `router` to `to` about `offending` (an IP packet it
/// could not forward): IPv4 "fragmentation needed" (type 3 code 4, with
/// `mtu`) or IPv6 "packet too big" — the path-MTU error. The offending
/// packet is cut after its first 28 (IPv4) or 48 bytes plus extension
/// headers' worth (IPv6: at most 1232 bytes), as routers do.
pub fn too_big(l2: &L2, router: IpAddr, to: IpAddr, mtu: u16, offending: &[u8]) -> Vec<u8> {
    match (router, to) {
        (IpAddr::V4(r), IpAddr::V4(t)) => {
            let ihl = usize::from(offending.first().map_or(5, |b| b & 0x0f)) * 4;
            let cut = &offending[..offending.len().min(ihl + 8)];
            let m = icmpv4(
                icmp::V4_UNREACHABLE,
                4,
                [0, 0, (mtu >> 8) as u8, mtu as u8],
                cut,
            );
            frame(l2, &ipv4(r, t, proto::ICMP, 7, (0, false), &[], &m))
        }
        (r, t) => {
            let (r6, t6) = (to_v6(r), to_v6(t));
            let cut = &offending[..offending.len().min(1232)];
            let m = icmpv6(
                r6,
                t6,
                icmp::V6_TOO_BIG,
                0,
                u32::from(mtu).to_be_bytes(),
                cut,
            );
            frame(l2, &ipv6(r6, t6, proto::ICMPV6, &[], &m))
        }
    }
}

/// An ARP frame (Ethernet/IPv4). `oper`: 1 request, 2 reply.
pub fn arp(
    l2: &L2,
    oper: u16,
    sha: MacAddr,
    spa: Ipv4Addr,
    tha: MacAddr,
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4];
    a.extend_from_slice(&oper.to_be_bytes());
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha.0);
    a.extend_from_slice(&tpa.octets());
    let mut f = ethernet(l2, ethertype::ARP, &a);
    f.resize(f.len().max(60), 0); // minimum Ethernet frame, as on the wire
    f
}

/// The solicited-node multicast address of `target` and its MAC.
pub fn solicited_node(target: Ipv6Addr) -> (Ipv6Addr, MacAddr) {
    let t = target.octets();
    let ip = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    (ip, MacAddr([0x33, 0x33, 0xff, t[13], t[14], t[15]]))
}

/// A neighbour solicitation for `target` from `src` (to the solicited-node
/// address), with a source link-layer option when `slla` is given.
pub fn neighbour_solicitation(
    src_mac: MacAddr,
    src: Ipv6Addr,
    target: Ipv6Addr,
    slla: Option<MacAddr>,
) -> Vec<u8> {
    let (dst, dst_mac) = solicited_node(target);
    let mut body = target.octets().to_vec();
    if let Some(m) = slla {
        body.extend_from_slice(&[icmp::OPT_SLLA, 1]);
        body.extend_from_slice(&m.0);
    }
    let m = icmpv6(src, dst, icmp::NS, 0, [0; 4], &body);
    let mut p = ipv6(src, dst, proto::ICMPV6, &[], &m);
    p[7] = 255;
    frame(&L2::new(dst_mac, src_mac), &p)
}

/// A solicited neighbour advertisement of `target` (at `tlla`) from `src` to `dst`.
pub fn neighbour_advertisement(
    l2: &L2,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    tlla: MacAddr,
) -> Vec<u8> {
    let mut body = target.octets().to_vec();
    body.extend_from_slice(&[icmp::OPT_TLLA, 1]);
    body.extend_from_slice(&tlla.0);
    let m = icmpv6(src, dst, icmp::NA, 0, [0x60, 0, 0, 0], &body);
    let mut p = ipv6(src, dst, proto::ICMPV6, &[], &m);
    p[7] = 255;
    frame(l2, &p)
}

/// Splits an IPv4 packet into fragments whose payloads are at most
/// `max_payload` bytes (rounded down to a multiple of 8).
pub fn fragment_v4(packet: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let (hdr, data) = packet.split_at(ihl);
    let src = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
    let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
    let id = u16::from_be_bytes([hdr[4], hdr[5]]);
    let step = (max_payload / 8).max(1) * 8;
    data.chunks(step)
        .enumerate()
        .map(|(i, chunk)| {
            let more = (i + 1) * step < data.len();
            ipv4(
                src,
                dst,
                hdr[9],
                id,
                (((i * step) / 8) as u16, more),
                &hdr[20..],
                chunk,
            )
        })
        .collect()
}

/// Splits an IPv6 packet (without extension headers) into fragments with a
/// fragment header (identification `id`), payloads at most `max_payload`
/// bytes (rounded down to a multiple of 8).
pub fn fragment_v6(packet: &[u8], id: u32, max_payload: usize) -> Vec<Vec<u8>> {
    let (hdr, data) = packet.split_at(40);
    let mut s = [0u8; 16];
    s.copy_from_slice(&hdr[8..24]);
    let mut d = [0u8; 16];
    d.copy_from_slice(&hdr[24..40]);
    let next = hdr[6];
    let step = (max_payload / 8).max(1) * 8;
    data.chunks(step)
        .enumerate()
        .map(|(i, chunk)| {
            let more = (i + 1) * step < data.len();
            let off = (((i * step) / 8) as u16) << 3 | u16::from(more);
            let mut fh = vec![next, 0];
            fh.extend_from_slice(&off.to_be_bytes());
            fh.extend_from_slice(&id.to_be_bytes());
            ipv6(
                Ipv6Addr::from(s),
                Ipv6Addr::from(d),
                proto::FRAGMENT,
                &fh,
                chunk,
            )
        })
        .collect()
}
