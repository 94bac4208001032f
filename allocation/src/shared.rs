//! The running table (or a snapshot built around it) behind one `ArcSwap`: wait-free reads, atomic swaps.
//!
//! Table, TM list, groups, rules and version live in one immutable value;
//! a packet sees the old snapshot or the new one, never a mix, and a swap
//! never blocks a reader. The distributor keeps its whole steering plan
//! (table, TM routes, cluster addresses) in one such snapshot.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::error::TableError;
use crate::table::AllocationTable;

/// A snapshot with a table version: what [`SharedTable`] holds.
pub trait Versioned {
    /// The table version the snapshot carries.
    fn version(&self) -> u64;
}

impl Versioned for AllocationTable {
    fn version(&self) -> u64 {
        AllocationTable::version(self)
    }
}

/// The live table (or snapshot) of a distributor or TM.
#[derive(Debug)]
pub struct SharedTable<T = AllocationTable> {
    current: ArcSwap<T>,
}

impl<T: Versioned> SharedTable<T> {
    /// Holds `table` as the running snapshot.
    pub fn new(table: T) -> Self {
        SharedTable {
            current: ArcSwap::from_pointee(table),
        }
    }

    /// The running table, for the duration of a batch: wait-free, no
    /// reference-count traffic in the common case.
    #[inline]
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    /// The running table as an owned reference (for the control path).
    pub fn snapshot(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Installs `table` if its version is newer than the running one;
    /// returns the table it replaced. A concurrent swap that wins first is
    /// taken into account (compare-and-swap loop).
    pub fn swap(&self, table: T) -> Result<Arc<T>, TableError> {
        let new = Arc::new(table);
        loop {
            let cur = self.current.load_full();
            if new.version() <= cur.version() {
                return Err(TableError::StaleVersion {
                    current: cur.version(),
                    offered: new.version(),
                });
            }
            let prev = self.current.compare_and_swap(&cur, Arc::clone(&new));
            if Arc::ptr_eq(&prev, &cur) {
                return Ok(cur);
            }
        }
    }

    /// Installs `table` whatever its version (a failover table, which keeps
    /// its base version, or an operator's rollback); returns the old one.
    pub fn replace(&self, table: T) -> Arc<T> {
        self.current.swap(Arc::new(table))
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::profile::Profile;
    use crate::table::test::uniform;
    use crate::table::AllocationTable;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Waits (yielding) until `done` holds, at most ten seconds.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn swap_requires_a_newer_version() {
        let s = SharedTable::new(uniform(4));
        let old = s.swap(uniform(4).with_version(2)).expect("swap");
        assert_eq!(old.version(), 1);
        assert!(matches!(
            s.swap(uniform(4).with_version(2)),
            Err(TableError::StaleVersion {
                current: 2,
                offered: 2
            })
        ));
        assert_eq!(s.replace(uniform(4).with_version(1)).version(), 2);
        assert_eq!(s.load().version(), 1);
    }

    /// Readers steer while a writer swaps thousands of tables. Table version
    /// `v` gives every bucket to TM `v % 4`; a reader that ever saw two owners
    /// in one snapshot would have seen a mix of tables.
    #[test]
    fn concurrent_swaps_are_atomic() {
        let n = 4usize;
        let base = uniform(n);
        let tables: Vec<AllocationTable> = (0..n)
            .map(|k| {
                let mut w = vec![0.0; n];
                w[k] = 1.0;
                base.rebalance(0, &Profile::Custom { weights: w })
                    .expect("rebalance")
                    .table
            })
            .collect();
        let shared = Arc::new(SharedTable::new(tables[1].clone().with_version(1)));
        let stop = Arc::new(AtomicBool::new(false));
        let lookups = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                let (lookups, started) = (Arc::clone(&lookups), Arc::clone(&started));
                std::thread::spawn(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t = shared.load();
                        let want = (t.version() % 4) as u16;
                        let b = &t.groups()[0].buckets;
                        for i in (0..4096).step_by(97) {
                            assert_eq!(b.get(i), want, "mixed table at version {}", t.version());
                        }
                        assert!(t.version() >= last, "version went backwards");
                        last = t.version();
                        lookups.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Swaps interleave with reads: all readers run before the first
        // swap, and every 100 swaps the writer waits for them to make progress.
        wait_until("the readers to start", || {
            started.load(Ordering::SeqCst) == 3
        });
        let mut progress_points = 0;
        for v in 2..=5000u64 {
            shared
                .swap(tables[(v % 4) as usize].clone().with_version(v))
                .expect("swap");
            if v % 100 == 0 {
                let seen = lookups.load(Ordering::Relaxed);
                wait_until("reader progress", || lookups.load(Ordering::Relaxed) > seen);
                progress_points += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader panicked");
        }
        assert_eq!(shared.load().version(), 5000);
        assert_eq!(progress_points, 50);
        assert!(lookups.load(Ordering::Relaxed) >= 50);
    }
}
