//! Fixed-capacity open-addressing maps for per-worker state: allocated once, bounded probing, no allocation per packet.

use allocation::hash::{hash_bytes, HashKey};

/// Slots probed from a key's home slot before the map gives up or evicts.
pub const PROBE: usize = 8;

/// A map from `K` to `V` with a capacity fixed at creation; every entry
/// carries an expiry time, and expired entries count as free.
#[derive(Debug, Clone)]
pub struct ExpiringMap<K, V> {
    slots: Vec<Option<(K, V, u64)>>,
    mask: usize,
    key: HashKey,
    live: usize,
    evictions: u64,
}

/// Keys hash their bytes (a stable encoding) for the map.
pub trait MapKey: Copy + Eq {
    /// Writes the key's bytes into `out`, returns how many.
    fn encode(&self, out: &mut [u8; 48]) -> usize;
}

impl<K: MapKey, V: Copy> ExpiringMap<K, V> {
    /// A map of at least `capacity` slots (rounded up to a power of two).
    /// The hash key is per map: an attacker cannot aim entries at one slot
    /// range without knowing it.
    pub fn new(capacity: usize, key: HashKey) -> Self {
        let n = capacity.max(PROBE).next_power_of_two();
        ExpiringMap {
            slots: vec![None; n],
            mask: n - 1,
            key,
            live: 0,
            evictions: 0,
        }
    }

    #[inline]
    fn home(&self, k: &K) -> usize {
        let mut buf = [0u8; 48];
        let n = k.encode(&mut buf);
        (hash_bytes(&self.key, &buf[..n]) as usize) & self.mask
    }

    /// The live value of `k`.
    #[inline]
    pub fn get(&self, k: &K, now: u64) -> Option<V> {
        let h = self.home(k);
        (0..PROBE).find_map(|i| match &self.slots[(h + i) & self.mask] {
            Some((sk, v, exp)) if sk == k && *exp > now => Some(*v),
            _ => None,
        })
    }

    /// Inserts or refreshes `k` until `expiry`. When the probe window is
    /// full of live entries, the one expiring first is evicted (counted).
    pub fn insert(&mut self, k: K, v: V, expiry: u64, now: u64) {
        let h = self.home(&k);
        let mut victim = h;
        let mut victim_exp = u64::MAX;
        for i in 0..PROBE {
            let at = (h + i) & self.mask;
            match &self.slots[at] {
                Some((sk, _, _)) if *sk == k => {
                    self.slots[at] = Some((k, v, expiry));
                    return;
                }
                Some((_, _, exp)) if *exp > now => {
                    if *exp < victim_exp {
                        victim_exp = *exp;
                        victim = at;
                    }
                }
                other => {
                    if other.is_none() {
                        self.live += 1;
                    }
                    self.slots[at] = Some((k, v, expiry));
                    return;
                }
            }
        }
        self.evictions += 1;
        self.slots[victim] = Some((k, v, expiry));
    }

    /// Inserts or refreshes `k` until `expiry` only if there is room in its
    /// probe window (a free or expired slot, or `k` itself): never evicts a
    /// live entry. False when full.
    pub fn try_insert(&mut self, k: K, v: V, expiry: u64, now: u64) -> bool {
        let h = self.home(&k);
        let mut free = None;
        for i in 0..PROBE {
            let at = (h + i) & self.mask;
            match &self.slots[at] {
                Some((sk, _, _)) if *sk == k => {
                    self.slots[at] = Some((k, v, expiry));
                    return true;
                }
                Some((_, _, exp)) if *exp > now => {}
                other => {
                    if free.is_none() {
                        free = Some((at, other.is_none()));
                    }
                }
            }
        }
        match free {
            Some((at, empty)) => {
                if empty {
                    self.live += 1;
                }
                self.slots[at] = Some((k, v, expiry));
                true
            }
            None => false,
        }
    }

    /// The live value of `k`, its expiry pushed to `expiry`.
    #[inline]
    pub fn get_refresh(&mut self, k: &K, now: u64, expiry: u64) -> Option<V> {
        let h = self.home(k);
        for i in 0..PROBE {
            let at = (h + i) & self.mask;
            if let Some((sk, v, exp)) = &mut self.slots[at] {
                if sk == k && *exp > now {
                    *exp = expiry;
                    return Some(*v);
                }
            }
        }
        None
    }

    /// Occupied slots (live or not yet reused).
    pub fn len(&self) -> usize {
        self.live
    }

    /// True if no slot was ever used.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Live entries at `now` (a scan: for metrics, not the data path).
    pub fn live(&self, now: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Some((_, _, e)) if *e > now))
            .count()
    }

    /// Entries evicted while still live.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    struct K(u32);
    impl MapKey for K {
        fn encode(&self, out: &mut [u8; 48]) -> usize {
            out[..4].copy_from_slice(&self.0.to_be_bytes());
            4
        }
    }

    #[test]
    fn expiry_refresh_and_eviction() {
        let mut m: ExpiringMap<K, u8> = ExpiringMap::new(8, HashKey::from_bytes([7; 16]));
        m.insert(K(1), 10, 100, 0);
        assert_eq!(m.get(&K(1), 50), Some(10));
        assert_eq!(m.get(&K(1), 100), None, "expired");
        m.insert(K(1), 11, 200, 150);
        assert_eq!(m.get(&K(1), 150), Some(11));
        // Fill beyond capacity: the map stays bounded and evicts, counted.
        for i in 0..100 {
            m.insert(K(1000 + i), 1, 1000 + u64::from(i), 0);
        }
        assert!(m.len() <= m.capacity());
        assert!(m.evictions() > 0);
        assert_eq!(m.get(&K(1099), 0), Some(1), "the newest entry is present");
    }

    #[test]
    fn try_insert_never_evicts_and_refresh_extends() {
        let mut m: ExpiringMap<K, u8> = ExpiringMap::new(8, HashKey::from_bytes([9; 16]));
        let mut refused = 0;
        for i in 0..32 {
            if !m.try_insert(K(i), 1, 100, 0) {
                refused += 1;
            }
        }
        assert_eq!(
            refused,
            32 - m.capacity(),
            "exactly the overflow is refused"
        );
        assert_eq!(m.evictions(), 0);
        let kept: Vec<u32> = (0..32).filter(|&i| m.get(&K(i), 0).is_some()).collect();
        assert_eq!(kept.len(), m.capacity());
        let k = K(kept[0]);
        assert!(m.try_insert(k, 2, 100, 0), "an existing key is refreshed");
        assert_eq!(m.get(&k, 0), Some(2));
        assert_eq!(m.get_refresh(&k, 50, 300), Some(2));
        assert_eq!(m.get(&k, 200), Some(2), "refreshed past its first expiry");
        assert!(m.try_insert(K(99), 3, 400, 200), "expired slots are reused");
    }
}
