//! The fragment handler: first fragments' TMs remembered for a bounded time; early fragments held in a bounded pool until their first arrives.
//!
//! Frames are never reassembled: the original fragments are forwarded. A
//! non-first fragment whose first fragment has been seen follows it; one
//! that comes first is copied into a preallocated hold slot (bounded count,
//! bytes and time) and released, in arrival order, when its first fragment
//! is steered. A held fragment whose first never comes is dropped and
//! counted when its time is up.

use std::net::IpAddr;

use allocation::{HashKey, TmIndex};

use crate::steer::FragKey;
use crate::table::{ExpiringMap, MapKey};
use crate::verdict::Drop;

/// Limits of the fragment handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragConfig {
    /// Remembered first fragments (slots).
    pub memory: usize,
    /// How long a first fragment's TM is remembered, in nanoseconds.
    pub memory_ttl_ns: u64,
    /// Hold slots for fragments that arrive before their first.
    pub hold_slots: usize,
    /// Largest frame a hold slot takes, in bytes.
    pub hold_slot_bytes: usize,
    /// How long a fragment is held, in nanoseconds.
    pub hold_ttl_ns: u64,
}

impl Default for FragConfig {
    fn default() -> Self {
        FragConfig {
            memory: 4096,
            memory_ttl_ns: 2_000_000_000,
            hold_slots: 128,
            hold_slot_bytes: 9216,
            hold_ttl_ns: 500_000_000,
        }
    }
}

impl MapKey for FragKey {
    fn encode(&self, out: &mut [u8; 48]) -> usize {
        let mut n = 0;
        for a in [self.src, self.dst] {
            match a {
                IpAddr::V4(v) => {
                    out[n..n + 4].copy_from_slice(&v.octets());
                    n += 4;
                }
                IpAddr::V6(v) => {
                    out[n..n + 16].copy_from_slice(&v.octets());
                    n += 16;
                }
            }
        }
        out[n] = self.proto;
        out[n + 1..n + 5].copy_from_slice(&self.id.to_be_bytes());
        n + 5
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    key: FragKey,
    len: usize,
    expiry: u64,
    seq: u64,
    /// Set when the first fragment arrived: the TM to send to.
    released: Option<TmIndex>,
}

/// Per-worker fragment state.
#[derive(Debug, Clone)]
pub struct FragTable {
    cfg: FragConfig,
    memory: ExpiringMap<FragKey, TmIndex>,
    held: Vec<Option<Held>>,
    data: Vec<u8>,
    seq: u64,
    releasable: usize,
    /// Occupied hold slots: when zero (the common case), a first fragment
    /// has nothing to release and the slots are not scanned.
    occupied: usize,
}

impl FragTable {
    /// Allocates all memory up front.
    pub fn new(cfg: FragConfig, key: HashKey) -> Self {
        FragTable {
            cfg,
            memory: ExpiringMap::new(cfg.memory, key),
            held: vec![None; cfg.hold_slots],
            data: vec![0; cfg.hold_slots * cfg.hold_slot_bytes],
            seq: 0,
            releasable: 0,
            occupied: 0,
        }
    }

    /// Remembers the TM of a first fragment, and releases the fragments of
    /// the same datagram that were held.
    pub fn remember(&mut self, key: FragKey, tm: TmIndex, now: u64) {
        self.memory
            .insert(key, tm, now.saturating_add(self.cfg.memory_ttl_ns), now);
        if self.occupied == self.releasable {
            return;
        }
        for h in self.held.iter_mut().flatten() {
            if h.key == key && h.released.is_none() && h.expiry > now {
                h.released = Some(tm);
                self.releasable += 1;
            }
        }
    }

    /// The TM of a datagram whose first fragment was seen.
    #[inline]
    pub fn lookup(&self, key: &FragKey, now: u64) -> Option<TmIndex> {
        self.memory.get(key, now)
    }

    /// Holds a copy of an early fragment in a free slot (expired fragments
    /// free theirs through [`FragTable::expire`], which counts them). Errors
    /// are drops of this frame.
    pub fn hold(&mut self, frame: &[u8], key: FragKey, now: u64) -> Result<(), Drop> {
        if frame.len() > self.cfg.hold_slot_bytes {
            return Err(Drop::FragmentTooLarge);
        }
        let slot = self
            .held
            .iter()
            .position(Option::is_none)
            .ok_or(Drop::FragmentHoldFull)?;
        let at = slot * self.cfg.hold_slot_bytes;
        self.data[at..at + frame.len()].copy_from_slice(frame);
        self.seq += 1;
        if self.held[slot].is_none() {
            self.occupied += 1;
        }
        self.held[slot] = Some(Held {
            key,
            len: frame.len(),
            expiry: now.saturating_add(self.cfg.hold_ttl_ns),
            seq: self.seq,
            released: None,
        });
        Ok(())
    }

    /// Frees held fragments whose time is up; returns how many (each a
    /// `fragment_timeout` drop).
    pub fn expire(&mut self, now: u64) -> usize {
        let mut n = 0;
        for h in self.held.iter_mut() {
            if h.is_some_and(|x| x.released.is_none() && x.expiry <= now) {
                *h = None;
                n += 1;
            }
        }
        self.occupied -= n;
        n
    }

    /// True if fragments wait to be sent.
    pub fn has_released(&self) -> bool {
        self.releasable > 0
    }

    /// Hands every released fragment, oldest first, to `emit` (frame bytes,
    /// TM) and frees its slot.
    pub fn drain_released(&mut self, mut emit: impl FnMut(&mut [u8], TmIndex)) {
        while self.releasable > 0 {
            let next = self
                .held
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.and_then(|h| h.released.map(|tm| (h.seq, i, tm, h.len))))
                .min();
            let Some((_, slot, tm, len)) = next else {
                self.releasable = 0;
                break;
            };
            let at = slot * self.cfg.hold_slot_bytes;
            emit(&mut self.data[at..at + len], tm);
            self.held[slot] = None;
            self.releasable -= 1;
            self.occupied -= 1;
        }
    }

    /// Fragments held now.
    pub fn held(&self) -> usize {
        self.occupied
    }

    /// Remembered first fragments (occupied slots).
    pub fn remembered(&self) -> usize {
        self.memory.len()
    }

    /// First fragments forgotten early because the memory was full.
    pub fn evictions(&self) -> u64 {
        self.memory.evictions()
    }
}
