//! The hot cache: recently read or written chunk frames, in memory.
//!
//! Bounded by bytes, not entries: frames range from a few bytes to 17 MiB, so
//! an entry count says nothing about memory. The LRU list itself is unbounded
//! and [`HotCache::insert`] evicts from the cold end until the sum of frame
//! lengths fits the budget. Frames are immutable (named by their content), so
//! there is nothing to invalidate. A frame larger than the whole budget is not
//! cached; a budget of 0 disables the cache.

use bytes::Bytes;
use lru::LruCache;
use std::sync::{Mutex, MutexGuard};
use thaw_format::Digest;

pub(crate) struct HotCache {
    budget: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    frames: LruCache<Digest, Bytes>,
    bytes: u64,
}

impl HotCache {
    pub(crate) fn new(budget: u64) -> Self {
        HotCache {
            budget,
            inner: Mutex::new(Inner {
                frames: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot leave `Inner` inconsistent, so a
        // poisoned lock (a panic elsewhere) is safe to keep using.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The frame of `id`, marking it recently used.
    pub(crate) fn get(&self, id: &Digest) -> Option<Bytes> {
        self.lock().frames.get(id).cloned()
    }

    /// The length of the frame of `id`, without marking it used.
    pub(crate) fn peek_len(&self, id: &Digest) -> Option<u64> {
        self.lock().frames.peek(id).map(|f| f.len() as u64)
    }

    pub(crate) fn contains(&self, id: &Digest) -> bool {
        self.lock().frames.contains(id)
    }

    /// Caches `frame` as the frame of `id`, evicting the least recently used
    /// frames until the budget holds.
    pub(crate) fn insert(&self, id: Digest, frame: Bytes) {
        let len = frame.len() as u64;
        if len > self.budget {
            return;
        }
        let mut inner = self.lock();
        if let Some((_, old)) = inner.frames.push(id, frame) {
            // `push` on an unbounded cache only returns a replaced value.
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        while inner.bytes > self.budget {
            match inner.frames.pop_lru() {
                Some((_, evicted)) => inner.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }

    /// Sum of the lengths of the cached frames.
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn evicts_least_recently_used_to_fit_budget() {
        let cache = HotCache::new(100);
        cache.insert(id(1), Bytes::from(vec![0; 40]));
        cache.insert(id(2), Bytes::from(vec![0; 40]));
        assert!(cache.get(&id(1)).is_some()); // 1 is now the most recent
        cache.insert(id(3), Bytes::from(vec![0; 40]));
        assert!(cache.contains(&id(1)) && cache.contains(&id(3)));
        assert!(!cache.contains(&id(2)));
        assert_eq!(cache.bytes(), 80);
    }

    #[test]
    fn replacing_and_oversized_frames_keep_the_count_right() {
        let cache = HotCache::new(100);
        cache.insert(id(1), Bytes::from(vec![0; 40]));
        cache.insert(id(1), Bytes::from(vec![0; 40]));
        assert_eq!(cache.bytes(), 40);
        cache.insert(id(2), Bytes::from(vec![0; 101]));
        assert!(!cache.contains(&id(2)));
        assert_eq!(cache.peek_len(&id(1)), Some(40));
        let disabled = HotCache::new(0);
        disabled.insert(id(1), Bytes::from_static(b"x"));
        assert_eq!(disabled.bytes(), 0);
    }
}
