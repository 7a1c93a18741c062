//! Getting a chunk's verified bytes: memory, then disk, then the network.
//!
//! Every lookup of a chunk not in memory goes through one in-flight table, so
//! concurrent readers of the same chunk share a single fetch. The fetch runs as
//! its own task: a reader that goes away does not cancel it. Network fetches
//! take a permit from one of two pools: on-demand reads from a large one,
//! readahead from a small one, so background work never holds the connections
//! a blocked reader needs. Bytes are verified against the chunk id before they
//! are cached or served; a mismatch is an error naming the chunk, never data.

use super::disk_cache::{DiskCache, Lookup};
use super::stats::Stats;
use crate::remote::Remote;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thaw_format::{frame, ChunkRef, Digest};
use tokio::sync::Semaphore;

/// Why a chunk could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("chunk {0} does not match its digest")]
    Corrupt(Digest),
    #[error("cannot fetch chunk {id}: {message}")]
    Unavailable { id: Digest, message: String },
}

/// Who is asking: a blocked reader, or readahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Background,
}

type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// An LRU of chunk bytes bounded by a byte budget.
struct MemCache {
    lru: lru::LruCache<u32, Bytes>,
    bytes: u64,
    budget: u64,
}

impl MemCache {
    fn insert(&mut self, chunk: u32, data: Bytes) {
        if data.len() as u64 > self.budget {
            return;
        }
        if let Some(old) = self.lru.put(chunk, data.clone()) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += data.len() as u64;
        while self.bytes > self.budget {
            match self.lru.pop_lru() {
                Some((_, d)) => self.bytes -= d.len() as u64,
                None => break,
            }
        }
    }
}

/// Loads chunks of one image.
pub struct Fetcher {
    remote: Remote,
    chunks: Arc<Vec<ChunkRef>>,
    mem: Mutex<MemCache>,
    inflight: Mutex<HashMap<u32, Pending>>,
    disk: Option<Arc<DiskCache>>,
    stats: Arc<Stats>,
    demand: Semaphore,
    background: Semaphore,
    /// Disk cache writes not yet finished; [`Fetcher::flush`] waits for them.
    pending_writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Fetcher {
    pub fn new(
        remote: Remote,
        chunks: Arc<Vec<ChunkRef>>,
        mem_budget: u64,
        disk: Option<Arc<DiskCache>>,
        stats: Arc<Stats>,
        concurrency: usize,
    ) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            remote,
            chunks,
            mem: Mutex::new(MemCache {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                budget: mem_budget,
            }),
            inflight: Mutex::new(HashMap::new()),
            disk,
            stats,
            demand: Semaphore::new(concurrency.max(1)),
            background: Semaphore::new((concurrency / 4).max(1)),
            pending_writes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    fn mem_get(&self, chunk: u32) -> Option<Bytes> {
        self.mem
            .lock()
            .expect("mem cache lock")
            .lru
            .get(&chunk)
            .cloned()
    }

    /// Whether the chunk is in memory or already being fetched.
    pub fn is_resident_or_pending(&self, chunk: u32) -> bool {
        self.mem
            .lock()
            .expect("mem cache lock")
            .lru
            .contains(&chunk)
            || self
                .inflight
                .lock()
                .expect("inflight lock")
                .contains_key(&chunk)
    }

    /// The verified bytes of chunk `chunk`.
    pub async fn get(self: &Arc<Self>, chunk: u32, prio: Priority) -> Result<Bytes, FetchError> {
        if let Some(b) = self.mem_get(chunk) {
            Stats::inc(&self.stats.mem_hits);
            return Ok(b);
        }
        let pending = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            // Checked again under the lock: a fetch may have just finished.
            if let Some(b) = self.mem_get(chunk) {
                Stats::inc(&self.stats.mem_hits);
                return Ok(b);
            }
            if let Some(p) = inflight.get(&chunk) {
                Stats::inc(&self.stats.joined);
                p.clone()
            } else {
                let this = self.clone();
                let task = tokio::spawn(async move { this.load(chunk, prio).await });
                let id = self.chunks[chunk as usize].id;
                let p: Pending = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(FetchError::Unavailable {
                            id,
                            message: e.to_string(),
                        })
                    })
                }
                .boxed()
                .shared();
                inflight.insert(chunk, p.clone());
                p
            }
        };
        pending.await
    }

    /// Starts fetching `chunk` in the background if it is not cached or pending.
    pub fn prefetch(self: &Arc<Self>, chunk: u32) {
        if self.is_resident_or_pending(chunk) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.get(chunk, Priority::Background).await;
        });
    }

    /// Waits (up to `timeout`) for disk cache writes in flight, so a remount
    /// finds every chunk this mount fetched.
    pub fn flush(&self, timeout: std::time::Duration) {
        let deadline = Instant::now() + timeout;
        while self
            .pending_writes
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    async fn load(self: Arc<Self>, chunk: u32, prio: Priority) -> Result<Bytes, FetchError> {
        let result = self.load_uncached(chunk, prio).await;
        if let Ok(b) = &result {
            let mut mem = self.mem.lock().expect("mem cache lock");
            mem.insert(chunk, b.clone());
            self.stats
                .mem_cache_bytes
                .store(mem.bytes, std::sync::atomic::Ordering::Relaxed);
        }
        self.inflight.lock().expect("inflight lock").remove(&chunk);
        result
    }

    async fn load_uncached(&self, chunk: u32, prio: Priority) -> Result<Bytes, FetchError> {
        let ChunkRef { id, len } = self.chunks[chunk as usize];
        if let Some(disk) = &self.disk {
            let d = disk.clone();
            match tokio::task::spawn_blocking(move || d.get(&id, len)).await {
                Ok(Lookup::Hit(data)) => {
                    Stats::inc(&self.stats.disk_hits);
                    return Ok(data);
                }
                Ok(Lookup::Corrupt) => Stats::inc(&self.stats.disk_corrupt),
                _ => {}
            }
        }
        let pool = match prio {
            Priority::Demand => &self.demand,
            Priority::Background => &self.background,
        };
        let permit = pool.acquire().await.expect("semaphore open");
        let started = Instant::now();
        let frame = self.remote.chunk(&id).await.map_err(|e| {
            Stats::inc(&self.stats.fetch_errors);
            tracing::warn!(chunk = %id, "fetch failed: {e}");
            FetchError::Unavailable {
                id,
                message: e.to_string(),
            }
        })?;
        drop(permit);
        self.stats.record_fetch(
            started.elapsed(),
            frame.len() as u64,
            prio == Priority::Background,
        );
        let data = tokio::task::spawn_blocking(move || frame::decode_verified(&frame, &id))
            .await
            .map_err(|e| FetchError::Unavailable { id, message: e.to_string() })?
            .map_err(|e| {
                Stats::inc(&self.stats.digest_mismatches);
                tracing::error!(chunk = %id, "chunk from the server failed verification, refusing to serve it: {e}");
                FetchError::Corrupt(id)
            })?;
        let data = Bytes::from(data);
        if let Some(disk) = &self.disk {
            let (d, bytes, stats) = (disk.clone(), data.clone(), self.stats.clone());
            let pending = self.pending_writes.clone();
            pending.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            tokio::task::spawn_blocking(move || {
                let _done = PendingGuard(pending);
                match d.put(&id, &bytes) {
                    Ok(evicted) => Stats::add(&stats.disk_evicted, evicted),
                    Err(e) => {
                        // A full or failing disk degrades to serving from memory and the network.
                        if stats
                            .disk_write_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            == 0
                        {
                            tracing::warn!(
                                "cannot write the disk cache, continuing without it: {e}"
                            );
                        }
                    }
                }
            });
        }
        Ok(data)
    }
}

/// Decrements the pending-write count when a cache write ends, however it ends.
struct PendingGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
