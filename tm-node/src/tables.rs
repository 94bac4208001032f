//! The running table and, during a transition, the next one: shared by the admin endpoint (which changes them) and the proxy (DNAT-only checks).

use std::sync::{Arc, Mutex};

use allocation::{AllocationTable, Flow};

/// This node's tables.
#[derive(Debug)]
pub struct Tables {
    /// This node's TM id (stable across tables).
    pub tm_id: u32,
    /// The running table.
    pub current: Mutex<Arc<AllocationTable>>,
    /// The next table while a transition is prepared.
    pub next: Mutex<Option<Arc<AllocationTable>>>,
}

impl Tables {
    /// Tables with `table` running and no transition.
    pub fn new(tm_id: u32, table: AllocationTable) -> Self {
        Tables {
            tm_id,
            current: Mutex::new(Arc::new(table)),
            next: Mutex::new(None),
        }
    }

    /// The running table.
    pub fn current(&self) -> Arc<AllocationTable> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The next table, during a transition.
    pub fn next(&self) -> Option<Arc<AllocationTable>> {
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True if `reply` (a server's packet toward a client or SNAT endpoint)
    /// steers to this node under the running table — and, during a
    /// transition, under the next table too.
    pub fn steers_home(&self, reply: &Flow) -> bool {
        let home = |t: &AllocationTable| {
            t.tm_index_by_id(self.tm_id)
                .is_some_and(|me| t.steer(reply).tm == me)
        };
        home(&self.current()) && self.next().is_none_or(|n| home(&n))
    }
}
