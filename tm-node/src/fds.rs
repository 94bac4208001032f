//! tmd's file-descriptor budget: the soft limit raised to the hard one at start, and how many descriptors proxied connections (two each) and UDP sessions (one each) may hold — the rest kept for listeners, health probes and the admin endpoint, so that running out refuses a new client at once (counted) instead of failing accepts, stalling clients and starving the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Descriptors never given to connections: listeners, the admin endpoint's
/// connections (at most 128), health probes, the runtime's own — an eighth
/// of the limit, at least 32 and at most 512.
pub fn reserved(limit: u64) -> u64 {
    (limit / 8).clamp(32, 512)
}

/// The descriptors connections may hold, and how many they do.
#[derive(Debug)]
pub struct FdBudget {
    used: AtomicU64,
    max: u64,
    /// Connections and sessions refused for want of descriptors.
    pub refused: AtomicU64,
}

/// Descriptors a connection holds; given back when dropped.
#[derive(Debug)]
pub struct FdGuard {
    budget: Arc<FdBudget>,
    n: u64,
}

impl Drop for FdGuard {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

impl FdBudget {
    /// The budget under a descriptor limit of `limit`.
    pub fn new(limit: u64) -> Self {
        FdBudget {
            used: AtomicU64::new(0),
            max: limit.saturating_sub(reserved(limit)),
            refused: AtomicU64::new(0),
        }
    }

    /// Descriptors connections may hold at once.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Descriptors connections hold now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `n` descriptors, or `None` (counted) when that would pass the budget.
    pub fn take(self: &Arc<Self>, n: u64) -> Option<FdGuard> {
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before + n > self.max {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(FdGuard {
            budget: Arc::clone(self),
            n,
        })
    }
}

/// Raises the soft descriptor limit to the hard one: the limit now in force.
pub fn raise_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_limit_and_gets_back_what_is_dropped() {
        let b = Arc::new(FdBudget::new(32 + 5));
        let two = b.take(2).expect("2 of 5");
        let four = b.take(2).expect("4 of 5");
        assert!(b.take(2).is_none(), "6 of 5");
        assert_eq!(b.refused.load(Ordering::Relaxed), 1);
        let one = b.take(1).expect("5 of 5");
        assert_eq!(b.used(), 5);
        drop(two);
        drop(four);
        drop(one);
        assert_eq!(b.used(), 0);
        assert_eq!(
            FdBudget::new(10).max(),
            0,
            "below the reserve: nothing for connections"
        );
        assert_eq!(FdBudget::new(20_000).max(), 20_000 - 512);
        assert_eq!(FdBudget::new(1024).max(), 1024 - 128);
    }
}
