//! Getting a chunk's verified bytes: memory, then disk, then the source.
//!
//! Every lookup of a chunk not in memory goes through one in-flight table, so
//! concurrent readers of the same chunk share a single fetch. The fetch runs as
//! its own task: a reader that goes away does not cancel it. Network fetches
//! take a permit from one of two pools: on-demand reads from a large one,
//! readahead from a small one, so background work never holds the connections
//! a blocked reader needs; a reader that joins a queued readahead fetch moves
//! it to the demand pool. Bytes are verified against the chunk id and the
//! manifest's length before they are cached or served; a mismatch is an error
//! naming the chunk, never data.
//!
//! Retries live here, not in the source: transient failures are retried with
//! backoff until one deadline (the mount's `--fetch-timeout`) measured from
//! when the read first asked, so a read fails within that time however the
//! server misbehaves. A failed chunk answers with its error for a moment
//! before it is fetched again, so the kernel's immediate retry of a failed
//! read does not wait out a second deadline.

mod batch;

use super::disk_cache::{DiskCache, Lookup};
use super::source::{ChunkSource, SourceError};
use super::stats::Stats;
use super::timeline::{Kind, Timeline, What};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use thaw_format::{frame, BudgetLru, ChunkRef, Digest};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Why a chunk could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("chunk {0} does not match its digest")]
    Corrupt(Digest),
    #[error("chunk {id} holds {actual} bytes, the manifest says {expected}")]
    WrongLength {
        id: Digest,
        expected: u32,
        actual: usize,
    },
    #[error("chunk {0} is not on the server")]
    Missing(Digest),
    #[error("cannot fetch chunk {id}: {message}")]
    Unavailable { id: Digest, message: String },
    #[error("gave up on chunk {id} after {:.1}s: {last}", after.as_secs_f64())]
    TimedOut {
        id: Digest,
        after: Duration,
        last: String,
    },
}

/// Who is asking: a blocked reader, or readahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Background,
}

/// How the fetcher talks to its source.
#[derive(Debug, Clone, Copy)]
pub struct FetchPolicy {
    /// Demand fetches in flight at once (readahead gets a quarter as many).
    pub concurrency: usize,
    /// How long a read may wait for a chunk, retries included.
    pub deadline: Duration,
    pub first_backoff: Duration,
    /// How long a failed chunk answers with its error before a new fetch:
    /// long enough for the kernel's immediate retry of a failed read (it
    /// follows within microseconds), short enough that a server back up is
    /// used at once.
    pub failure_memory: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            concurrency: 32,
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(50),
            failure_memory: Duration::from_millis(50),
        }
    }
}

type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// A fetch in flight, which readers join.
struct InFlight {
    result: Pending,
    /// Signalled when a reader joins a readahead fetch still queued for a permit.
    upgrade: Arc<Notify>,
}

/// A chunk whose last fetch failed, and when.
struct Failure {
    at: Instant,
    error: FetchError,
}

/// Loads chunks of one image.
pub struct Fetcher {
    source: Arc<dyn ChunkSource>,
    chunks: Arc<[ChunkRef]>,
    mem: Mutex<BudgetLru<u32, Bytes>>,
    inflight: Mutex<HashMap<u32, InFlight>>,
    failed: Mutex<HashMap<u32, Failure>>,
    disk: Option<Arc<DiskCache>>,
    stats: Arc<Stats>,
    demand: Semaphore,
    background: Semaphore,
    /// Profile batches being verified at once, one per core (see `fetch_batch`).
    stream_decodes: Semaphore,
    policy: FetchPolicy,
    /// Loads and disk cache writes not yet finished; [`Fetcher::flush`] waits for them.
    busy: Arc<AtomicUsize>,
    /// Told of each chunk as it enters memory (see [`Fetcher::on_resident`]).
    resident_hook: OnceLock<ResidentHook>,
    /// Disk cache writes held back while a profile's stream runs (see
    /// [`Fetcher::defer_disk_writes`]).
    deferred: Mutex<Deferred>,
    /// Where fetches and loads are noted, when asked (see [`Timeline`]).
    timeline: OnceLock<Arc<Timeline>>,
}

/// A disk cache write held back: the chunk, its bytes and their outboard.
type HeldWrite = (Digest, Bytes, Vec<u8>);

/// Disk cache writes held back, and whether new ones are.
#[derive(Default)]
struct Deferred {
    holding: bool,
    held: Vec<HeldWrite>,
}

/// What a door wants to hear of each chunk entering memory.
pub type ResidentHook = Box<dyn Fn(u32) + Send + Sync>;

impl Fetcher {
    pub fn new(
        source: Arc<dyn ChunkSource>,
        chunks: Arc<[ChunkRef]>,
        mem_budget: u64,
        disk: Option<Arc<DiskCache>>,
        stats: Arc<Stats>,
        policy: FetchPolicy,
    ) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            source,
            chunks,
            mem: Mutex::new(BudgetLru::new(mem_budget)),
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            disk,
            stats,
            demand: Semaphore::new(policy.concurrency.max(1)),
            background: Semaphore::new((policy.concurrency / 4).max(1)),
            stream_decodes: Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
            policy,
            busy: Arc::new(AtomicUsize::new(0)),
            resident_hook: OnceLock::new(),
            deferred: Mutex::new(Deferred::default()),
            timeline: OnceLock::new(),
        })
    }

    /// Notes fetches and loads on `timeline` from then on (once per fetcher).
    pub fn set_timeline(&self, timeline: Arc<Timeline>) {
        let _ = self.timeline.set(timeline);
    }

    /// The timeline fetches are noted on, if one is kept.
    pub fn timeline(&self) -> Option<&Arc<Timeline>> {
        self.timeline.get()
    }

    /// Notes an event begun at `began`, if a timeline is kept.
    pub(crate) fn note(&self, kind: Kind, began: Instant, what: impl FnOnce() -> What) {
        if let Some(t) = self.timeline.get() {
            t.note(kind, began, what());
        }
    }

    /// Holds disk cache writes back until [`Fetcher::write_deferred`]: a
    /// profile's stream brings a start's working set while the start runs,
    /// and on a small machine the writes (10-15% of the stream's CPU) would
    /// take a core from the start for bytes it already has in memory.
    pub fn defer_disk_writes(&self) {
        self.deferred.lock().expect("deferred lock").holding = self.disk.is_some();
    }

    /// Writes from now on go at once; those held so far stay held until
    /// [`Fetcher::write_deferred`]. (What is held is then bounded by what the
    /// stream brought and what readers fetched while it ran.)
    pub fn stop_deferring(&self) {
        self.deferred.lock().expect("deferred lock").holding = false;
    }

    /// Writes what was held back, in the background, one after another;
    /// writes go at once from then on.
    pub fn write_deferred(&self) {
        let held = {
            let mut d = self.deferred.lock().expect("deferred lock");
            d.holding = false;
            std::mem::take(&mut d.held)
        };
        if !held.is_empty() {
            self.write(held);
        }
    }

    /// Writes verified chunks to the disk cache in the background, one
    /// after another. A full or failing disk degrades to serving from memory
    /// and the network. Outside the runtime (a flush at unmount, which waits
    /// for them anyway) they are written at once.
    fn write(&self, chunks: Vec<HeldWrite>) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let (stats, busy) = (self.stats.clone(), BusyGuard::new(&self.busy));
        let write = move || {
            let _busy = busy;
            for (id, data, outboard) in chunks {
                store_on_disk(&disk, &stats, &id, &data, &outboard);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// Calls `hook` with each chunk as it enters memory, from then on (once
    /// per fetcher; a second hook is refused and returned).
    pub fn on_resident(&self, hook: ResidentHook) -> Result<(), ResidentHook> {
        self.resident_hook.set(hook)
    }

    /// The verified bytes of `chunk` if it is in memory now; never fetches.
    pub fn resident(&self, chunk: u32) -> Option<Bytes> {
        self.mem
            .lock()
            .expect("mem cache lock")
            .peek(&chunk)
            .cloned()
    }

    fn mem_get(&self, chunk: u32) -> Option<Bytes> {
        self.mem
            .lock()
            .expect("mem cache lock")
            .get(&chunk)
            .cloned()
    }

    /// Whether the chunk is in memory or already being fetched.
    pub fn is_resident_or_pending(&self, chunk: u32) -> bool {
        self.mem.lock().expect("mem cache lock").contains(&chunk)
            || self
                .inflight
                .lock()
                .expect("inflight lock")
                .contains_key(&chunk)
    }

    /// The error of a recent failed fetch of `chunk`, if it is still remembered.
    fn recent_failure(&self, chunk: u32) -> Option<FetchError> {
        let mut failed = self.failed.lock().expect("failed lock");
        match failed.get(&chunk) {
            Some(f) if f.at.elapsed() < self.policy.failure_memory => Some(f.error.clone()),
            Some(_) => {
                failed.remove(&chunk);
                None
            }
            None => None,
        }
    }

    /// The verified bytes of chunk `chunk`.
    pub async fn get(self: &Arc<Self>, chunk: u32, prio: Priority) -> Result<Bytes, FetchError> {
        if let Some(b) = self.mem_get(chunk) {
            Stats::inc(&self.stats.mem_hits);
            return Ok(b);
        }
        if let Some(e) = self.recent_failure(chunk) {
            return Err(e);
        }
        let pending = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            // Checked again under the lock: a fetch may have just finished.
            if let Some(b) = self.mem_get(chunk) {
                Stats::inc(&self.stats.mem_hits);
                return Ok(b);
            }
            match inflight.get(&chunk) {
                Some(f) => {
                    Stats::inc(&self.stats.joined);
                    if prio == Priority::Demand {
                        f.upgrade.notify_one();
                    }
                    f.result.clone()
                }
                None => {
                    let f = self.start(chunk, prio);
                    let result = f.result.clone();
                    inflight.insert(chunk, f);
                    result
                }
            }
        };
        let got = pending.await;
        if let Err(e) = &got {
            self.stats.set_last_error(e.to_string());
        }
        got
    }

    /// Spawns the load of `chunk`; called with the in-flight table locked.
    fn start(self: &Arc<Self>, chunk: u32, prio: Priority) -> InFlight {
        let upgrade = Arc::new(Notify::new());
        let (this, up) = (self.clone(), upgrade.clone());
        self.in_flight(
            chunk,
            upgrade,
            async move { this.load(chunk, prio, &up).await },
        )
    }

    /// Runs `load` of `chunk` as its own task, counted as busy, for readers
    /// to join.
    fn in_flight(
        &self,
        chunk: u32,
        upgrade: Arc<Notify>,
        load: impl std::future::Future<Output = Result<Bytes, FetchError>> + Send + 'static,
    ) -> InFlight {
        let busy = BusyGuard::new(&self.busy);
        let task = tokio::spawn(async move {
            let _busy = busy;
            load.await
        });
        let id = self.chunks[chunk as usize].id;
        let result = async move {
            task.await.unwrap_or_else(|e| {
                Err(FetchError::Unavailable {
                    id,
                    message: format!("fetch task failed: {e}"),
                })
            })
        }
        .boxed()
        .shared();
        InFlight { result, upgrade }
    }

    /// Starts fetching `chunk` in the background if it is not cached, pending
    /// or recently failed; returns whether it was neither cached nor pending.
    pub fn prefetch(self: &Arc<Self>, chunk: u32) -> bool {
        if self.is_resident_or_pending(chunk) {
            return false;
        }
        if self.recent_failure(chunk).is_none() {
            let (this, busy) = (self.clone(), BusyGuard::new(&self.busy));
            tokio::spawn(async move {
                let _busy = busy;
                let _ = this.get(chunk, Priority::Background).await;
            });
        }
        true
    }

    /// Waits (up to `timeout`) for fetches and disk cache writes in flight, so
    /// a remount finds every chunk this one fetched.
    pub fn flush(&self, timeout: Duration) {
        self.write_deferred();
        let deadline = Instant::now() + timeout;
        while self.busy.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    async fn load(
        self: Arc<Self>,
        chunk: u32,
        prio: Priority,
        upgrade: &Notify,
    ) -> Result<Bytes, FetchError> {
        let result = self.load_uncached(chunk, prio, upgrade).await;
        self.settle(chunk, &result);
        result
    }

    /// Ends the fetch of `chunk` in flight: its bytes go to memory, or its
    /// error is remembered for a moment.
    fn settle(&self, chunk: u32, result: &Result<Bytes, FetchError>) {
        match result {
            Ok(b) => {
                {
                    let mut mem = self.mem.lock().expect("mem cache lock");
                    mem.insert(chunk, b.clone());
                    Stats::set(&self.stats.mem_cache_bytes, mem.bytes());
                }
                if let Some(hook) = self.resident_hook.get() {
                    hook(chunk);
                }
            }
            Err(e) => {
                let failure = Failure {
                    at: Instant::now(),
                    error: e.clone(),
                };
                self.failed
                    .lock()
                    .expect("failed lock")
                    .insert(chunk, failure);
            }
        }
        self.inflight.lock().expect("inflight lock").remove(&chunk);
    }

    async fn load_uncached(
        &self,
        chunk: u32,
        prio: Priority,
        upgrade: &Notify,
    ) -> Result<Bytes, FetchError> {
        let asked = Instant::now();
        let ChunkRef { id, len } = self.chunks[chunk as usize];
        if let Some(data) = self.disk_lookup(id, len).await {
            self.note(Kind::DiskLoad, asked, || What {
                chunk: Some(chunk),
                bytes: u64::from(len),
                ..What::default()
            });
            return Ok(data);
        }
        let deadline = asked + self.policy.deadline;
        let timed_out = |last: String| FetchError::TimedOut {
            id,
            after: asked.elapsed(),
            last,
        };
        let permit = tokio::time::timeout_at(deadline.into(), self.permit(prio, upgrade))
            .await
            .map_err(|_| timed_out("waiting for a connection".into()))?;
        let started = Instant::now();
        let frame = self.fetch_retrying(id, deadline, asked).await?;
        drop(permit);
        self.stats.record_fetch(
            started.elapsed(),
            frame.len() as u64,
            prio == Priority::Background,
        );
        let frame_len = frame.len() as u64;
        let data = tokio::task::spawn_blocking(move || verify(ChunkRef { id, len }, &frame))
            .await
            .map_err(|e| FetchError::Unavailable {
                id,
                message: format!("verification task failed: {e}"),
            })?;
        let kind = match prio {
            Priority::Background => Kind::Prefetch,
            Priority::Demand => Kind::Fetch,
        };
        self.note(kind, asked, || What {
            chunk: Some(chunk),
            bytes: frame_len,
            ..What::default()
        });
        self.verified(id, data)
    }

    /// Counts a chunk that failed verification, or sends verified bytes
    /// (and their outboard) to the disk cache.
    fn verified(
        &self,
        id: Digest,
        checked: Result<(Bytes, Vec<u8>), FetchError>,
    ) -> Result<Bytes, FetchError> {
        match checked {
            Ok((bytes, outboard)) => {
                Stats::add_to(&self.stats.chunk_bytes_fetched, bytes.len() as u64);
                self.disk_store(id, bytes.clone(), outboard);
                Ok(bytes)
            }
            Err(e) => {
                Stats::inc(&self.stats.digest_mismatches);
                tracing::error!("refusing a chunk from the server: {e}");
                Err(e)
            }
        }
    }

    /// A permit from the pool `prio` draws on. A readahead fetch still waiting
    /// when a reader joins it switches to the demand pool.
    async fn permit(&self, prio: Priority, upgrade: &Notify) -> SemaphorePermit<'_> {
        match prio {
            Priority::Demand => self.demand.acquire().await,
            Priority::Background => tokio::select! {
                p = self.background.acquire() => p,
                _ = upgrade.notified() => self.demand.acquire().await,
            },
        }
        .expect("fetch semaphores are never closed")
    }

    /// One frame from the source, retrying transient failures until `deadline`.
    async fn fetch_retrying(
        &self,
        id: Digest,
        deadline: Instant,
        asked: Instant,
    ) -> Result<Bytes, FetchError> {
        self.retrying(id, deadline, asked, || self.source.frame(id))
            .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or `deadline`
    /// passes; errors name chunk `id` (the first of a batch).
    async fn retrying<T, F>(
        &self,
        id: Digest,
        deadline: Instant,
        asked: Instant,
        attempt: impl Fn() -> F,
    ) -> Result<T, FetchError>
    where
        F: std::future::Future<Output = Result<T, SourceError>>,
    {
        let mut backoff = self.policy.first_backoff;
        loop {
            let error = match tokio::time::timeout_at(deadline.into(), attempt()).await {
                Ok(Ok(got)) => return Ok(got),
                Ok(Err(SourceError::NotFound(_))) => {
                    Stats::inc(&self.stats.fetch_errors);
                    return Err(FetchError::Missing(id));
                }
                Ok(Err(e)) if !e.is_transient() => {
                    Stats::inc(&self.stats.fetch_errors);
                    tracing::warn!(chunk = %id, "fetch failed: {e}");
                    return Err(FetchError::Unavailable {
                        id,
                        message: e.to_string(),
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            Stats::inc(&self.stats.fetch_errors);
            let now = Instant::now();
            if now + backoff >= deadline {
                tracing::warn!(chunk = %id, "fetch failed, giving up: {error}");
                return Err(FetchError::TimedOut {
                    id,
                    after: asked.elapsed(),
                    last: error,
                });
            }
            tracing::debug!(chunk = %id, "fetch failed, retrying: {error}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub(crate) fn disk_cache(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Bytes `range` of `chunk` from the disk cache alone, verified through
    /// the entry's outboard, without loading the whole chunk into memory;
    /// `None` if the disk cache does not hold it intact.
    pub async fn disk_slice(&self, chunk: u32, range: Range<usize>) -> Option<Bytes> {
        let ChunkRef { id, len } = self.chunks[chunk as usize];
        self.disk_ask(&self.stats.disk_slice_hits, move |d| {
            d.get_slice(&id, len, range)
        })
        .await
    }

    /// The chunk from the disk cache, if there and intact.
    async fn disk_lookup(&self, id: Digest, len: u32) -> Option<Bytes> {
        self.disk_ask(&self.stats.disk_hits, move |d| d.get(&id, len))
            .await
    }

    /// A disk cache lookup off the async threads, counted in `hits` or as
    /// a corrupt entry.
    async fn disk_ask<F>(&self, hits: &AtomicU64, lookup: F) -> Option<Bytes>
    where
        F: FnOnce(&DiskCache) -> Lookup + Send + 'static,
    {
        let disk = self.disk.clone()?;
        match tokio::task::spawn_blocking(move || lookup(&disk)).await {
            Ok(Lookup::Hit(data)) => {
                Stats::inc(hits);
                Some(data)
            }
            Ok(Lookup::Corrupt) => {
                Stats::inc(&self.stats.disk_corrupt);
                None
            }
            _ => None,
        }
    }

    /// Writes a verified chunk to the disk cache in the background, or holds
    /// it back while writes are deferred.
    fn disk_store(&self, id: Digest, data: Bytes, outboard: Vec<u8>) {
        if self.disk.is_none() {
            return;
        }
        {
            let mut d = self.deferred.lock().expect("deferred lock");
            if d.holding {
                d.held.push((id, data, outboard));
                return;
            }
        }
        self.write(vec![(id, data, outboard)]);
    }
}

/// Writes one verified chunk to the disk cache, counting what it evicted or
/// why it failed (said once: a full disk fails every write).
fn store_on_disk(disk: &DiskCache, stats: &Stats, id: &Digest, data: &[u8], outboard: &[u8]) {
    match disk.put_verified(id, data, outboard) {
        Ok(evicted) => Stats::add(&stats.disk_evicted, evicted),
        Err(e) => {
            if stats.disk_write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("cannot write the disk cache, continuing without it: {e}");
            }
        }
    }
}

/// Decodes `frame` and checks it against the chunk's id and the manifest's
/// length: the bytes and their outboard, or an error naming the chunk
/// (blocking work).
fn verify(chunk: ChunkRef, frame: &[u8]) -> Result<(Bytes, Vec<u8>), FetchError> {
    let ChunkRef { id, len } = chunk;
    let (data, outboard) =
        frame::decode_verified_with_outboard(frame, &id).map_err(|_| FetchError::Corrupt(id))?;
    if data.len() != len as usize {
        return Err(FetchError::WrongLength {
            id,
            expected: len,
            actual: data.len(),
        });
    }
    Ok((Bytes::from(data), outboard))
}

/// Counts one unit of unfinished work until dropped, however it ends.
struct BusyGuard(Arc<AtomicUsize>);

impl BusyGuard {
    fn new(count: &Arc<AtomicUsize>) -> BusyGuard {
        count.fetch_add(1, Ordering::AcqRel);
        BusyGuard(count.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
