//! Maglev consistent hashing as described in the NSDI 2016 paper (Eisenbud et al., section 3.4), the baseline our allocation table is compared against.
//!
//! Each backend gets a preference permutation of the M table slots from two
//! hashes of its name (offset, skip); the table is filled in rounds, each
//! backend taking its next preferred free slot in turn. Weights are applied
//! by giving backends turns in proportion to them (the paper's suggestion
//! of "relative frequency"). Written from the paper for this comparison.

/// Maglev's recommended table size (a prime well above 100 × backends).
pub const M: usize = 65_537;

/// 64-bit FNV-1a of `bytes` with a seed, for the two permutation hashes.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x100_0000_01b3);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    // Finalise (FNV alone mixes its low bits poorly).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A Maglev lookup table over named, weighted backends.
#[derive(Debug, Clone)]
pub struct Maglev {
    /// Slot → backend index.
    pub entry: Vec<u16>,
}

impl Maglev {
    /// Builds the table for `backends` (name, weight); weights ≥ 1.
    pub fn new(backends: &[(String, u32)]) -> Maglev {
        let n = backends.len();
        let perm: Vec<(usize, usize)> = backends
            .iter()
            .map(|(name, _)| {
                let offset = (fnv(0xdead, name.as_bytes()) % M as u64) as usize;
                let skip = (fnv(0xbeef, name.as_bytes()) % (M as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let max_w = backends.iter().map(|b| b.1).max().unwrap_or(1).max(1);
        let mut next = vec![0usize; n];
        let mut credit = vec![0u64; n];
        let mut entry = vec![u16::MAX; M];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                // A backend of weight w gets w turns for every max_w rounds.
                credit[i] += u64::from(backends[i].1);
                if credit[i] < u64::from(max_w) {
                    continue;
                }
                credit[i] -= u64::from(max_w);
                let (offset, skip) = perm[i];
                let mut c = (offset + next[i] * skip) % M;
                while entry[c] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % M;
                }
                entry[c] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == M {
                    break 'fill;
                }
            }
        }
        Maglev { entry }
    }

    /// The backend of a flow hash.
    #[inline]
    pub fn lookup(&self, h: u64) -> u16 {
        self.entry[(h % M as u64) as usize]
    }

    /// Entries per backend.
    pub fn counts(&self, n: usize) -> Vec<u32> {
        let mut c = vec![0u32; n];
        for &e in &self.entry {
            c[usize::from(e)] += 1;
        }
        c
    }
}
