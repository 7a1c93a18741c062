//! An LRU bounded by bytes, not entries: the one in-memory cache shape the
//! server's hot frame cache and the client's chunk cache share.
//!
//! Values range from a few bytes to 17 MiB, so an entry count says nothing
//! about memory. The list itself is unbounded and [`BudgetLru::insert`] evicts
//! from the cold end until the sum of value lengths fits the budget. A value
//! larger than the whole budget is not cached; a budget of 0 disables the cache.

use std::hash::Hash;

/// Something with a length in bytes.
pub trait Weigh {
    fn weight(&self) -> u64;
}

impl Weigh for Vec<u8> {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

impl Weigh for bytes::Bytes {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

/// A least-recently-used map whose values' total weight stays within a budget.
#[derive(Debug)]
pub struct BudgetLru<K: Hash + Eq, V> {
    lru: lru::LruCache<K, V>,
    bytes: u64,
    budget: u64,
}

impl<K: Hash + Eq, V: Weigh> BudgetLru<K, V> {
    pub fn new(budget: u64) -> Self {
        BudgetLru {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// The value of `k`, marking it recently used.
    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.lru.get(k)
    }

    /// The value of `k`, without marking it used.
    pub fn peek(&self, k: &K) -> Option<&V> {
        self.lru.peek(k)
    }

    pub fn contains(&self, k: &K) -> bool {
        self.lru.contains(k)
    }

    /// Caches `v` as the value of `k`, evicting the least recently used
    /// values until the budget holds. Returns how many were evicted.
    pub fn insert(&mut self, k: K, v: V) -> usize {
        let w = v.weight();
        if w > self.budget {
            return 0;
        }
        if let Some((_, old)) = self.lru.push(k, v) {
            // `push` on an unbounded cache only returns a replaced value.
            self.bytes -= old.weight();
        }
        self.bytes += w;
        let mut evicted = 0;
        while self.bytes > self.budget {
            match self.lru.pop_lru() {
                Some((_, old)) => {
                    self.bytes -= old.weight();
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }

    /// Removes `k`, returning its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let v = self.lru.pop(k)?;
        self.bytes -= v.weight();
        Some(v)
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Sum of the weights of the cached values.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_to_fit_budget() {
        let mut c = BudgetLru::new(100);
        c.insert(1, vec![0u8; 40]);
        c.insert(2, vec![0u8; 40]);
        assert!(c.get(&1).is_some()); // 1 is now the most recent
        assert_eq!(c.insert(3, vec![0u8; 40]), 1);
        assert!(c.contains(&1) && c.contains(&3) && !c.contains(&2));
        assert_eq!(c.bytes(), 80);
    }

    #[test]
    fn replacing_removing_and_oversized_values_keep_the_count_right() {
        let mut c = BudgetLru::new(100);
        c.insert(1, vec![0u8; 40]);
        c.insert(1, vec![0u8; 40]);
        assert_eq!(c.bytes(), 40);
        c.insert(2, vec![0u8; 101]);
        assert!(!c.contains(&2));
        assert_eq!(c.peek(&1).map(Vec::len), Some(40));
        assert_eq!(c.remove(&1).map(|v| v.len()), Some(40));
        assert_eq!((c.bytes(), c.len()), (0, 0));
        let mut disabled = BudgetLru::new(0);
        disabled.insert(1, vec![1u8]);
        assert_eq!(disabled.bytes(), 0);
    }
}
