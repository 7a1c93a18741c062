//! An in-memory [`ChunkSource`] that counts requests, single and batch, and
//! can misbehave on purpose: fail transiently, hold chosen chunks until
//! released, or serve a corrupt frame. For tests of the image core (and of the transports built on
//! it) without a server or a kernel.

use super::{ChunkSource, SourceError};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use thaw_format::{frame, ChunkRef, Digest};
use tokio::sync::Notify;

/// Frames in memory, with request counts and injected faults.
#[derive(Debug, Default)]
pub struct MemorySource {
    frames: Mutex<HashMap<Digest, Bytes>>,
    /// Every chunk asked for, in the order asked (a batch asks for each of its chunks).
    log: Mutex<Vec<Digest>>,
    /// Every batch request, in the order made.
    batches: Mutex<Vec<Vec<Digest>>>,
    /// The next this-many requests fail as a transient error.
    fail_next: AtomicU32,
    /// Batch requests fail as a transient error while set.
    fail_batches: AtomicBool,
    /// Chunks whose requests wait until [`MemorySource::release`].
    held: Mutex<HashSet<Digest>>,
    released: Notify,
    /// Every request waits this long first.
    delay: Mutex<Duration>,
}

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Stores `frame` as the frame of `id` (not checked: tests plant bad ones).
    pub fn insert(&self, id: Digest, frame: Bytes) {
        self.lock_frames().insert(id, frame);
    }

    /// Stores the bytes of a chunk, framed at zstd level 1.
    pub fn insert_chunk(&self, data: &[u8]) -> Digest {
        let id = Digest::of(data);
        self.insert(id, Bytes::from(frame::encode(data, 1)));
        id
    }

    /// Replaces the frame of `id` with a valid frame of other bytes.
    pub fn corrupt(&self, id: &Digest) {
        let mut frames = self.lock_frames();
        let bad = match frames.get(id).map(|f| frame::decode(f)) {
            Some(Ok(mut data)) if !data.is_empty() => {
                data[0] ^= 0xff;
                data
            }
            _ => b"not the chunk".to_vec(),
        };
        frames.insert(*id, Bytes::from(frame::encode(&bad, 1)));
    }

    /// Makes the next `n` requests fail as if the server were unreachable.
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Makes every batch request fail as if the server were unreachable
    /// (single requests still succeed) while `on`.
    pub fn fail_batches(&self, on: bool) {
        self.fail_batches.store(on, Ordering::SeqCst);
    }

    /// Makes requests for `id` wait until [`MemorySource::release`].
    pub fn hold(&self, id: Digest) {
        self.held.lock().expect("held lock").insert(id);
    }

    /// Lets every held request go on.
    pub fn release(&self) {
        self.held.lock().expect("held lock").clear();
        self.released.notify_waiters();
    }

    /// Makes every request wait `d` first, as a slow link would.
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("delay lock") = d;
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Digest> {
        self.log.lock().expect("log lock").clone()
    }

    /// How many requests so far.
    pub fn request_count(&self) -> usize {
        self.log.lock().expect("log lock").len()
    }

    /// Every batch request so far, in order.
    pub fn batches(&self) -> Vec<Vec<Digest>> {
        self.batches.lock().expect("batches lock").clone()
    }

    /// How many requests so far asked for `id`.
    pub fn requests_for(&self, id: &Digest) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|r| *r == id)
            .count()
    }

    fn lock_frames(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Bytes>> {
        self.frames.lock().expect("frames lock")
    }

    async fn wait_while_held(&self, id: &Digest) {
        loop {
            let released = self.released.notified();
            if !self.held.lock().expect("held lock").contains(id) {
                return;
            }
            released.await;
        }
    }
}

impl MemorySource {
    /// What every request goes through before it is answered: the delay,
    /// held chunks, injected failures.
    async fn misbehave(&self, ids: &[Digest]) -> Result<(), SourceError> {
        let delay = *self.delay.lock().expect("delay lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        for id in ids {
            self.wait_while_held(id).await;
        }
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(SourceError::Unavailable {
                message: "injected failure".into(),
                transient: true,
            });
        }
        Ok(())
    }
}

impl ChunkSource for MemorySource {
    fn frame(&self, id: Digest) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.log.lock().expect("log lock").push(id);
            self.misbehave(&[id]).await?;
            self.lock_frames()
                .get(&id)
                .cloned()
                .ok_or(SourceError::NotFound(id))
        })
    }

    fn frames(
        &self,
        chunks: Vec<ChunkRef>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, SourceError>> {
        Box::pin(async move {
            let ids: Vec<Digest> = chunks.iter().map(|c| c.id).collect();
            self.log.lock().expect("log lock").extend(&ids);
            self.batches.lock().expect("batches lock").push(ids.clone());
            self.misbehave(&ids).await?;
            if self.fail_batches.load(Ordering::SeqCst) {
                return Err(SourceError::Unavailable {
                    message: "injected batch failure".into(),
                    transient: true,
                });
            }
            let frames = self.lock_frames();
            Ok(ids.iter().map(|id| frames.get(id).cloned()).collect())
        })
    }
}
