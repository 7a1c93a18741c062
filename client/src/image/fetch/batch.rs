//! Many chunks in one request: how a profile's stream fetches.
//!
//! A batch enters its chunks in the in-flight table only as it is sent, so a
//! reader that wants one of them joins the request already on the wire, and a
//! reader that wants a chunk the stream has not reached fetches it alone, on
//! demand, ahead of the stream. Batches take no permit from the demand or
//! readahead pools: the stream bounds its own requests. Every frame is
//! verified as a single fetch's is. A chunk the batch does not bring (the
//! request failed, the frame was bad or missing, the stream was stopped) is
//! fetched alone if a reader waits for it, and otherwise left for later.

use super::{verify, FetchError, Fetcher, Priority};
use crate::image::stats::Stats;
use crate::image::timeline::{Kind, What};
use bytes::Bytes;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Instant;
use thaw_format::ChunkRef;
use tokio::sync::{oneshot, Notify};

type Delivery = oneshot::Sender<Result<Bytes, FetchError>>;

impl Fetcher {
    /// The uncompressed length of `chunk`.
    pub(crate) fn chunk_len(&self, chunk: u32) -> u32 {
        self.chunks[chunk as usize].len
    }

    /// The memory cache's byte budget.
    pub(crate) fn mem_budget(&self) -> u64 {
        self.mem.lock().expect("mem cache lock").budget()
    }

    /// Whether the disk cache holds `chunk` (by its size, unverified).
    pub(crate) fn on_disk(&self, chunk: u32) -> bool {
        let ChunkRef { id, len } = self.chunks[chunk as usize];
        self.disk.as_ref().is_some_and(|d| d.contains(&id, len))
    }

    /// Fetches those of `chunks` not already cached or pending in one
    /// request, retried until the fetch deadline. Returns how many chunks it
    /// asked for; an error once the request failed for good.
    pub(crate) async fn fetch_batch(self: &Arc<Self>, chunks: &[u32]) -> Result<usize, FetchError> {
        let deliveries = self.enter_streamed(chunks);
        let Some(&(first, _)) = deliveries.first() else {
            return Ok(0);
        };
        let refs: Vec<ChunkRef> = deliveries
            .iter()
            .map(|&(c, _)| self.chunks[c as usize])
            .collect();
        let asked = Instant::now();
        let deadline = asked + self.policy.deadline;
        let id = self.chunks[first as usize].id;
        // On an error the deliveries are dropped: waiting readers fetch alone.
        let frames = self
            .retrying(id, deadline, asked, || self.source.frames(refs.clone()))
            .await?;
        if frames.len() != refs.len() {
            return Err(FetchError::Unavailable {
                id,
                message: format!("a batch of {} chunks answered {}", refs.len(), frames.len()),
            });
        }
        let found = frames.iter().flatten().count() as u64;
        let frame_bytes = frames.iter().flatten().map(|f| f.len() as u64).sum();
        self.stats.record_batch(found, frame_bytes);
        self.note(Kind::Batch, asked, || What {
            chunk: Some(first),
            chunks: Some(refs.len() as u32),
            bytes: frame_bytes,
            ..What::default()
        });
        // Each chunk goes to its readers as soon as it is verified (a large
        // one's segments inflated on every core), one batch per core at a
        // time: a start's reads wait on the next chunk, not on the whole batch,
        // nor on every batch in flight decoding at once. (Verifying on one
        // core, leaving the other to the start, was no faster.)
        let asked_for = deliveries.len();
        let _decoding = self.stream_decodes.acquire().await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            for ((r, f), (c, delivery)) in refs.iter().zip(frames).zip(deliveries) {
                let data = match f {
                    Some(f) => this.verified(r.id, verify(*r, &f)),
                    None => {
                        tracing::warn!(chunk = %r.id, "the server lacks a chunk of the profile");
                        Err(FetchError::Missing(r.id))
                    }
                };
                debug_assert_eq!(this.chunks[c as usize].id, r.id);
                let _ = delivery.send(data);
            }
        })
        .await
        .map_err(|e| FetchError::Unavailable {
            id,
            message: format!("verification task failed: {e}"),
        })?;
        Ok(asked_for)
    }

    /// Enters each of `chunks` that is not cached, pending or recently
    /// failed in the in-flight table, to be delivered by a batch.
    fn enter_streamed(self: &Arc<Self>, chunks: &[u32]) -> Vec<(u32, Delivery)> {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let mut out = Vec::with_capacity(chunks.len());
        for &c in chunks {
            if inflight.contains_key(&c)
                || self.mem.lock().expect("mem cache lock").contains(&c)
                || self.recent_failure(c).is_some()
            {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let upgrade = Arc::new(Notify::new());
            let (this, up) = (self.clone(), upgrade.clone());
            let f = self.in_flight(c, upgrade, async move {
                match rx.await {
                    Ok(Ok(bytes)) => {
                        let got = Ok(bytes);
                        this.settle(c, &got);
                        got
                    }
                    _ => this.unstreamed(c, &up).await,
                }
            });
            inflight.insert(c, f);
            out.push((c, tx));
        }
        out
    }

    /// The stream did not bring `chunk`: a reader waiting for it (it said so
    /// through `upgrade` when it joined) fetches it now, on demand; with none
    /// waiting, it leaves the table and is fetched when something asks.
    async fn unstreamed(
        self: Arc<Self>,
        chunk: u32,
        upgrade: &Notify,
    ) -> Result<Bytes, FetchError> {
        {
            // Readers join under this lock, so none can join unseen.
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if upgrade.notified().now_or_never().is_none() {
                inflight.remove(&chunk);
                return Err(FetchError::Unavailable {
                    id: self.chunks[chunk as usize].id,
                    message: "the profile's stream did not bring it".into(),
                });
            }
        }
        Stats::inc(&self.stats.profile_fallbacks);
        self.load(chunk, Priority::Demand, upgrade).await
    }
}
