//! The keyed flow hash shared by distributors, traffic managers and stdctl (SipHash-1-3, `docs/hash.md`).
//!
//! Every node of a cluster must compute the same value for the same bytes,
//! forever: the encoding below is a wire contract, pinned by golden vectors in
//! the tests of this module and in `docs/hash.md`.
//!
//! * Endpoint message: address bytes in network order (4 for IPv4, 16 for
//!   IPv6; an IPv4-mapped IPv6 address `::ffff:a.b.c.d` is hashed as the IPv4
//!   address `a.b.c.d`) followed by the port as 2 big-endian bytes.
//! * Triple message (non-TCP/UDP traffic): source address bytes ‖ destination
//!   address bytes ‖ protocol number (1 byte), with the same IPv4-mapped rule.
//! * Address message (source-affinity groups): the masked address bytes alone.
//!
//! The function is SipHash-1-3 (one compression round, three finalisation
//! rounds) keyed with the cluster's 128-bit secret. SipHash's length byte
//! separates the message kinds (6, 18, 9, 33, 4 and 16 bytes). The bucket is
//! the low 12 bits of the 64-bit result.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::error::ParseError;
use crate::TABLE_SIZE;

/// The cluster-wide 128-bit hash secret (SipHash key).
///
/// Byte `i` of the key is byte `i` of the SipHash key as in the reference
/// implementation: `k0` is bytes 0..8 read little-endian, `k1` bytes 8..16.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashKey {
    k0: u64,
    k1: u64,
}

impl HashKey {
    /// Builds a key from its 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            lo[i] = bytes[i];
            hi[i] = bytes[i + 8];
            i += 1;
        }
        HashKey {
            k0: u64::from_le_bytes(lo),
            k1: u64::from_le_bytes(hi),
        }
    }

    /// SipHash's initial state v0..v3 under this key: what every hash here
    /// starts from (the in-kernel steering loads it from a map).
    #[inline(always)]
    pub const fn sip_state(&self) -> [u64; 4] {
        [self.k0 ^ C0, self.k1 ^ C1, self.k0 ^ C2, self.k1 ^ C3]
    }

    /// The key's 16 bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.k0.to_le_bytes());
        out[8..].copy_from_slice(&self.k1.to_le_bytes());
        out
    }

    /// Lower-case hex of the 16 bytes (32 characters), the table-file form.
    pub fn to_hex(self) -> String {
        self.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A fresh random key from the operating system (`/dev/urandom`).
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        Ok(HashKey::from_bytes(bytes))
    }
}

impl fmt::Debug for HashKey {
    /// The key is a secret: debug output never shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(<secret>)")
    }
}

impl FromStr for HashKey {
    type Err = ParseError;

    /// Parses 32 hex digits (the table-file form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::new(
                "hash key",
                s,
                "expected 32 hex digits (16 bytes)",
            ));
        }
        let mut bytes = [0u8; 16];
        for (i, out) in bytes.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| ParseError::new("hash key", s, "expected 32 hex digits (16 bytes)"))?;
        }
        Ok(HashKey::from_bytes(bytes))
    }
}

const C0: u64 = 0x736f_6d65_7073_6575;
const C1: u64 = 0x646f_7261_6e64_6f6d;
const C2: u64 = 0x6c79_6765_6e65_7261;
const C3: u64 = 0x7465_6462_7974_6573;

/// SipHash internal state.
#[derive(Clone, Copy)]
struct State {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl State {
    #[inline(always)]
    fn new(key: &HashKey) -> Self {
        let [v0, v1, v2, v3] = key.sip_state();
        State { v0, v1, v2, v3 }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress<const C: usize>(&mut self, m: u64) {
        self.v3 ^= m;
        for _ in 0..C {
            self.round();
        }
        self.v0 ^= m;
    }

    #[inline(always)]
    fn finish<const D: usize>(mut self) -> u64 {
        self.v2 ^= 0xff;
        for _ in 0..D {
            self.round();
        }
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// SipHash-c-d of `msg`; `hash_bytes` is the c = 1, d = 3 instance.
#[inline(always)]
fn siphash<const C: usize, const D: usize>(key: &HashKey, msg: &[u8]) -> u64 {
    let mut s = State::new(key);
    let mut chunks = msg.chunks_exact(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        s.compress::<C>(u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    last[7] = msg.len() as u8;
    s.compress::<C>(u64::from_le_bytes(last));
    s.finish::<D>()
}

/// SipHash-1-3 of an arbitrary message under `key`: the primitive under every
/// other function here.
#[inline]
pub fn hash_bytes(key: &HashKey, msg: &[u8]) -> u64 {
    siphash::<1, 3>(key, msg)
}

/// Hash of an IPv4 endpoint: SipHash-1-3 over the 6 bytes `addr ‖ port(BE)`.
///
/// This is the fast path of the data plane: the 6-byte message is one
/// SipHash block, so the function is four SipRounds and no memory traffic.
#[inline]
pub fn hash_v4_endpoint(key: &HashKey, addr: [u8; 4], port: u16) -> u64 {
    let p = port.to_be_bytes();
    let block = u64::from_le_bytes([addr[0], addr[1], addr[2], addr[3], p[0], p[1], 0, 6]);
    let mut s = State::new(key);
    s.compress::<1>(block);
    s.finish::<3>()
}

/// Hash of an IPv6 endpoint: SipHash-1-3 over the 18 bytes `addr ‖ port(BE)`,
/// except that an IPv4-mapped address hashes as its IPv4 endpoint.
#[inline]
pub fn hash_v6_endpoint(key: &HashKey, addr: [u8; 16], port: u16) -> u64 {
    if let Some(v4) = v4_mapped(&addr) {
        return hash_v4_endpoint(key, v4, port);
    }
    let p = port.to_be_bytes();
    let mut s = State::new(key);
    let mut w = [0u8; 8];
    w.copy_from_slice(&addr[0..8]);
    s.compress::<1>(u64::from_le_bytes(w));
    w.copy_from_slice(&addr[8..16]);
    s.compress::<1>(u64::from_le_bytes(w));
    s.compress::<1>(u64::from_le_bytes([p[0], p[1], 0, 0, 0, 0, 0, 18]));
    s.finish::<3>()
}

/// Hash of an (IP address, port) endpoint of either family.
#[inline]
pub fn hash_endpoint(key: &HashKey, addr: IpAddr, port: u16) -> u64 {
    match addr {
        IpAddr::V4(a) => hash_v4_endpoint(key, a.octets(), port),
        IpAddr::V6(a) => hash_v6_endpoint(key, a.octets(), port),
    }
}

/// Hash of (source address, destination address, protocol) for traffic that
/// has no ports (ICMP echo, GRE, ESP, …). Direction-free: a packet and its
/// reply hash alike.
///
/// Message: `lo ‖ hi ‖ protocol`, where each address is in its family's form
/// (IPv4-mapped IPv6 as IPv4) and `lo` is the lesser of the two by
/// (length, bytes): an IPv4 address orders before an IPv6 one, and addresses
/// of one family order by their bytes.
pub fn hash_triple(key: &HashKey, src: IpAddr, dst: IpAddr, protocol: u8) -> u64 {
    let (a, alen) = addr_bytes(src);
    let (b, blen) = addr_bytes(dst);
    let ((lo, lo_len), (hi, hi_len)) = if (alen, a) <= (blen, b) {
        ((a, alen), (b, blen))
    } else {
        ((b, blen), (a, alen))
    };
    let mut msg = [0u8; 33];
    msg[..lo_len].copy_from_slice(&lo[..lo_len]);
    msg[lo_len..lo_len + hi_len].copy_from_slice(&hi[..hi_len]);
    msg[lo_len + hi_len] = protocol;
    hash_bytes(key, &msg[..lo_len + hi_len + 1])
}

/// Hash of a bare address (source-affinity groups): the address bytes in
/// their family's form, already masked by the caller.
pub fn hash_address(key: &HashKey, addr: IpAddr) -> u64 {
    let mut msg = [0u8; 16];
    let len = write_addr(&mut msg, addr);
    hash_bytes(key, &msg[..len])
}

/// The table bucket of a hash value: its low 12 bits.
#[inline(always)]
pub const fn bucket(h: u64) -> usize {
    (h as usize) & (TABLE_SIZE - 1)
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn v4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[..10].iter().all(|&b| b == 0) && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// Canonical form of an address: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => match v4_mapped(&a.octets()) {
            Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            None => IpAddr::V6(a),
        },
        v4 => v4,
    }
}

/// Bytes of the canonical form and how many of them count (4 or 16).
fn addr_bytes(addr: IpAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    let len = write_addr(&mut out, addr);
    (out, len)
}

/// Writes the canonical bytes of `addr` (IPv4-mapped IPv6 as IPv4) to the
/// front of `out` (at least 16 bytes) and returns how many: 4 or 16.
pub fn write_addr(out: &mut [u8], addr: IpAddr) -> usize {
    match canonical(addr) {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            out[..16].copy_from_slice(&a.octets());
            16
        }
    }
}

/// Masks an address to its first `prefix` bits (per family), canonical form.
pub fn mask_addr(addr: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpAddr {
    match canonical(addr) {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = if v4_prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(v4_prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = if v6_prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(v6_prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    fn ref_key() -> HashKey {
        let mut k = [0u8; 16];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        HashKey::from_bytes(k)
    }

    #[test]
    fn siphash24_reference_vector() {
        // The SipHash paper, appendix A: key 00..0f, message 00..0e.
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash::<2, 4>(&ref_key(), &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    #[allow(deprecated)] // std's SipHasher is SipHash-2-4: a second implementation to test against
    fn siphash24_matches_std() {
        use std::hash::Hasher;
        let key = ref_key();
        for len in 0..40u8 {
            let msg: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            let mut h = std::hash::SipHasher::new_with_keys(key.k0, key.k1);
            h.write(&msg);
            assert_eq!(siphash::<2, 4>(&key, &msg), h.finish(), "len {len}");
        }
    }

    #[test]
    fn siphash13_matches_siphasher_crate() {
        use std::hash::Hasher;
        let key = ref_key();
        for len in 0..40u8 {
            let msg: Vec<u8> = (0..len).map(|i| i.wrapping_mul(91)).collect();
            let mut h = siphasher::sip::SipHasher13::new_with_keys(key.k0, key.k1);
            h.write(&msg);
            assert_eq!(hash_bytes(&key, &msg), h.finish(), "len {len}");
        }
    }

    /// Golden vectors: the same as in `docs/hash.md`. If this test fails, the
    /// wire contract changed: every distributor, TM and table file of every
    /// deployed cluster would disagree with this build.
    #[test]
    fn golden_vectors() {
        let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
        let v4 = |s: &str| s.parse::<IpAddr>().expect("addr");
        let cases: [(IpAddr, u16, u64); 6] = [
            (v4("203.0.113.7"), 6900, GOLDEN[0]),
            (v4("198.51.100.1"), 80, GOLDEN[1]),
            (v4("10.1.0.1"), 40000, GOLDEN[2]),
            (v4("2001:db8::1"), 443, GOLDEN[3]),
            (v4("::ffff:203.0.113.7"), 6900, GOLDEN[0]),
            (v4("fe80::1"), 65535, GOLDEN[4]),
        ];
        for (addr, port, want) in cases {
            let h = hash_endpoint(&key, addr, port);
            assert_eq!(h, want, "{addr}:{port} = {h:#018x}");
        }
        let t = hash_triple(&key, v4("192.0.2.1"), v4("198.51.100.2"), 1);
        assert_eq!(t, GOLDEN[5], "triple = {t:#018x}");
        let a = hash_address(&key, v4("192.0.2.0"));
        assert_eq!(a, GOLDEN[6], "address = {a:#018x}");
    }

    /// Values of [`golden_vectors`], kept apart so `docs/hash.md` can quote them.
    const GOLDEN: [u64; 7] = [
        0xa817_2714_64ad_30ab,
        0x3b94_d635_09a3_9267,
        0xd4ac_4864_04d9_aff9,
        0xfbf5_ff63_308f_7e16,
        0x652f_818d_ba18_658a,
        0x84d9_8dff_7acd_24c8,
        0x14ab_a470_8659_520c,
    ];

    #[test]
    fn key_hex_round_trip_and_errors() {
        let k = ref_key();
        assert_eq!(k.to_hex(), "000102030405060708090a0b0c0d0e0f");
        assert_eq!(k.to_hex().parse::<HashKey>().expect("parse"), k);
        assert!("0011".parse::<HashKey>().is_err());
        assert!("zz0102030405060708090a0b0c0d0e0f"
            .parse::<HashKey>()
            .is_err());
        assert_eq!(format!("{k:?}"), "HashKey(<secret>)");
    }

    #[test]
    fn bucket_is_low_12_bits() {
        assert_eq!(bucket(0xffff_ffff_ffff_f123), 0x123);
        assert_eq!(bucket(4096), 0);
    }

    #[test]
    fn masking() {
        let a: IpAddr = "192.0.2.77".parse().expect("addr");
        assert_eq!(
            mask_addr(a, 24, 64),
            "192.0.2.0".parse::<IpAddr>().expect("addr")
        );
        assert_eq!(
            mask_addr(a, 0, 64),
            "0.0.0.0".parse::<IpAddr>().expect("addr")
        );
        let m: IpAddr = "::ffff:192.0.2.77".parse().expect("addr");
        assert_eq!(mask_addr(m, 32, 0), a);
        let b: IpAddr = "2001:db8:1:2:3:4:5:6".parse().expect("addr");
        assert_eq!(
            mask_addr(b, 32, 48),
            "2001:db8:1::".parse::<IpAddr>().expect("addr")
        );
    }

    /// Flips each input bit of an IPv4 endpoint and counts output-bit flips:
    /// every output bit must flip with probability 1/2 (strict avalanche).
    #[test]
    fn strict_avalanche() {
        let key = ref_key();
        let samples = 2000u32;
        let mut flips = [[0u32; 64]; 48];
        let mut x = 0x1234_5678_9abc_u64;
        for _ in 0..samples {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let addr = ((x >> 16) as u32).to_be_bytes();
            let port = (x >> 48) as u16;
            let h0 = hash_v4_endpoint(&key, addr, port);
            for (bit, row) in flips.iter_mut().enumerate() {
                let (mut a, mut p) = (u32::from_be_bytes(addr), port);
                if bit < 32 {
                    a ^= 1 << bit;
                } else {
                    p ^= 1 << (bit - 32);
                }
                let d = h0 ^ hash_v4_endpoint(&key, a.to_be_bytes(), p);
                for (o, c) in row.iter_mut().enumerate() {
                    *c += ((d >> o) & 1) as u32;
                }
            }
        }
        for (bit, row) in flips.iter().enumerate() {
            for (o, &c) in row.iter().enumerate() {
                let p = f64::from(c) / f64::from(samples);
                // 2000 samples: sd = 0.011; 0.45..0.55 is > 4.4 sd.
                assert!(
                    (0.45..=0.55).contains(&p),
                    "input bit {bit} -> output bit {o}: {p}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn v4_fast_path_matches_bytes(k in any::<[u8; 16]>(), a in any::<[u8; 4]>(), port in any::<u16>()) {
            let key = HashKey::from_bytes(k);
            let mut msg = a.to_vec();
            msg.extend_from_slice(&port.to_be_bytes());
            prop_assert_eq!(hash_v4_endpoint(&key, a, port), hash_bytes(&key, &msg));
        }

        #[test]
        fn v6_fast_path_matches_bytes(k in any::<[u8; 16]>(), a in any::<[u8; 16]>(), port in any::<u16>()) {
            let key = HashKey::from_bytes(k);
            prop_assume!(v4_mapped(&a).is_none());
            let mut msg = a.to_vec();
            msg.extend_from_slice(&port.to_be_bytes());
            prop_assert_eq!(hash_v6_endpoint(&key, a, port), hash_bytes(&key, &msg));
        }

        #[test]
        fn v4_mapped_hashes_as_v4(k in any::<[u8; 16]>(), a in any::<[u8; 4]>(), port in any::<u16>()) {
            let key = HashKey::from_bytes(k);
            let mapped = Ipv4Addr::from(a).to_ipv6_mapped();
            prop_assert_eq!(hash_endpoint(&key, IpAddr::V6(mapped), port), hash_v4_endpoint(&key, a, port));
        }

        #[test]
        fn symmetric_triple(k in any::<[u8; 16]>(), a in any::<[u8; 16]>(), b in any::<[u8; 4]>(), p in any::<u8>()) {
            let key = HashKey::from_bytes(k);
            let (a, b) = (IpAddr::from(a), IpAddr::from(b));
            prop_assert_eq!(hash_triple(&key, a, b, p), hash_triple(&key, b, a, p));
        }
    }
}
