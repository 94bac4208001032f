//! A batch of received frames in slots allocated once: what a backend fills and the worker decides on, frame by frame or in one pass.

use crate::verdict::{Action, Branch, PortId};

/// Largest frame a batch slot holds (jumbo frames and room for a reply).
pub const SLOT_BYTES: usize = 9216 + 256;

/// Frames received in one go, in slots allocated once.
#[derive(Debug)]
pub struct Batch {
    data: Vec<u8>,
    lens: Vec<usize>,
    ports: Vec<PortId>,
    stamps: Vec<u64>,
    actions: Vec<Action>,
    branches: Vec<Option<Branch>>,
    n: usize,
}

impl Batch {
    /// A batch of `capacity` slots of [`SLOT_BYTES`].
    pub fn new(capacity: usize) -> Self {
        Batch {
            data: vec![0; capacity * SLOT_BYTES],
            lens: vec![0; capacity],
            ports: vec![0; capacity],
            stamps: vec![0; capacity],
            actions: vec![Action::Held; capacity],
            branches: vec![None; capacity],
            n: 0,
        }
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Frames in the batch.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Empties the batch (the slots stay).
    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Appends a frame (cut to a slot); false when the batch is full.
    pub fn push(&mut self, port: PortId, ts_ns: u64, frame: &[u8]) -> bool {
        if self.n == self.capacity() {
            return false;
        }
        let len = frame.len().min(SLOT_BYTES);
        let at = self.n * SLOT_BYTES;
        self.data[at..at + len].copy_from_slice(&frame[..len]);
        self.lens[self.n] = len;
        self.ports[self.n] = port;
        self.stamps[self.n] = ts_ns;
        self.n += 1;
        true
    }

    /// The action decided for frame `i` (by `Worker::process_batch`).
    pub fn action(&self, i: usize) -> Action {
        self.actions[i]
    }

    /// Records the action decided for frame `i`.
    pub fn set_action(&mut self, i: usize, a: Action) {
        self.actions[i] = a;
    }

    /// The branch that decided frame `i` (`None`: dropped or held), as
    /// `Worker::process_batch` recorded it: what a capture annotates.
    pub fn branch(&self, i: usize) -> Option<Branch> {
        self.branches[i]
    }

    /// Records the branch that decided frame `i`.
    pub fn set_branch(&mut self, i: usize, b: Option<Branch>) {
        self.branches[i] = b;
    }

    /// Frame `i` read-only: (ingress port, the whole slot, frame length).
    pub fn get(&self, i: usize) -> (PortId, &[u8], usize) {
        let at = i * SLOT_BYTES;
        (self.ports[i], &self.data[at..at + SLOT_BYTES], self.lens[i])
    }

    /// Frame `i`: (ingress port, capture time, the whole slot, frame length).
    pub fn get_mut(&mut self, i: usize) -> (PortId, u64, &mut [u8], usize) {
        let at = i * SLOT_BYTES;
        (
            self.ports[i],
            self.stamps[i],
            &mut self.data[at..at + SLOT_BYTES],
            self.lens[i],
        )
    }
}
