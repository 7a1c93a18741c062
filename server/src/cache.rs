//! The hot cache: recently read or written chunk frames, in memory, within a
//! byte budget ([`BudgetLru`], shared with the client's chunk cache). Frames
//! are immutable (named by their content), so there is nothing to invalidate,
//! and only verified frames enter it (uploads, and store reads that passed
//! their check), so what it holds is trusted.
//! A lock shared by every request: the critical sections are a hash lookup
//! and a list splice.

use bytes::Bytes;
use std::sync::{Mutex, MutexGuard};
use thaw_format::{BudgetLru, Digest};

pub(crate) struct HotCache(Mutex<BudgetLru<Digest, Bytes>>);

impl HotCache {
    pub(crate) fn new(budget: u64) -> Self {
        HotCache(Mutex::new(BudgetLru::new(budget)))
    }

    fn lock(&self) -> MutexGuard<'_, BudgetLru<Digest, Bytes>> {
        // The critical sections cannot leave the LRU inconsistent, so a
        // poisoned lock (a panic elsewhere) is safe to keep using.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The frame of `id`, marking it recently used.
    pub(crate) fn get(&self, id: &Digest) -> Option<Bytes> {
        self.lock().get(id).cloned()
    }

    /// The frame of `id`, without marking it used.
    pub(crate) fn peek(&self, id: &Digest) -> Option<Bytes> {
        self.lock().peek(id).cloned()
    }

    pub(crate) fn insert(&self, id: Digest, frame: Bytes) {
        self.lock().insert(id, frame);
    }

    /// Sum of the lengths of the cached frames.
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes()
    }
}
