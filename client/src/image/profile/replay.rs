//! Replaying a profile: streaming its working set, in order, while the
//! program starts.
//!
//! The stream walks the working set in the order it was read and keeps a few
//! batch requests in flight ([`Fetcher::fetch_batch`]): many small chunks in
//! one request, several requests at once, so the start's next reads find
//! their chunks already fetched. Each batch is made up just before it is sent,
//! skipping what a reader already brought in or is waiting for; a reader that
//! misses a chunk the stream has not reached fetches it alone, on demand,
//! ahead of the stream. The first batch is small, so the first chunks arrive
//! soon; later ones grow. Chunks already in the disk cache are loaded from it
//! into memory, in the same order, off the reader's path, up to three
//! quarters of the memory cache's budget (a chunk loaded past it would push
//! out one loaded before a reader got to it; readers load the rest from disk
//! as they come to it). The stream stops at
//! the end of the working set, when the next chunk would take it past the
//! cache budget (what it brings would start pushing out what it brought), or
//! when a batch fails for good (readers then fetch on demand, as without a
//! profile).

use crate::image::fetch::{Fetcher, Priority};
use crate::image::stats::Stats;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use thaw_format::wire::BATCH_MAX_IDS;
use thaw_format::{Digest, Manifest, Profile};

/// How a profile's chunks are streamed.
#[derive(Debug, Clone, Copy)]
pub struct StreamPolicy {
    /// Uncompressed bytes of the largest batch.
    pub batch_bytes: u64,
    /// Uncompressed bytes of the first batch (later ones double up to
    /// `batch_bytes`).
    pub first_batch_bytes: u64,
    /// Batch requests (and disk cache loads) in flight at once.
    pub in_flight: usize,
    /// Fetch what the disk cache lacks; off, only what it holds is loaded
    /// (a local profile: what an attach read, perhaps over hours, is a hint
    /// for the disk, not a reason to fetch).
    pub fetch_missing: bool,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        StreamPolicy {
            batch_bytes: 4 << 20,
            first_batch_bytes: 1 << 20,
            in_flight: 8,
            fetch_missing: true,
        }
    }
}

/// The chunks of `m` a replay of `p` streams, in order: the chunks of its
/// working set that `m` holds with the same length, each once. (A profile
/// checked against `m` names only its chunks; the check is repeated here so
/// that the stream never asks for what the image does not hold.)
pub(crate) fn plan(p: &Profile, m: &Manifest) -> Vec<u32> {
    let index: HashMap<Digest, u32> = m
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, i as u32))
        .collect();
    p.working_set()
        .filter_map(|e| {
            let &c = index.get(&e.id)?;
            (m.chunks[c as usize].len == e.len).then_some(c)
        })
        .collect()
}

type Step = BoxFuture<'static, Result<(), String>>;

/// Streams `plan` through `fetcher`, within `budget` bytes; says how it
/// ended in the stats.
pub(crate) async fn stream(
    fetcher: Arc<Fetcher>,
    plan: Vec<u32>,
    budget: u64,
    policy: StreamPolicy,
    stats: Arc<Stats>,
) {
    let started = std::time::Instant::now();
    let len = |c: u32| u64::from(fetcher.chunk_len(c));
    Stats::set(&stats.profile_chunks, plan.len() as u64);
    Stats::set(&stats.profile_bytes, plan.iter().map(|&c| len(c)).sum());
    let mut steps: FuturesUnordered<Step> = FuturesUnordered::new();
    let (mut next, mut spent, mut loaded) = (0, 0u64, 0u64);
    let load_budget = fetcher.mem_budget() / 4 * 3;
    let mut limit = policy.first_batch_bytes.min(policy.batch_bytes);
    let mut stopped: Option<String> = None;
    loop {
        while stopped.is_none() && steps.len() < policy.in_flight.max(1) && next < plan.len() {
            let (mut batch, mut bytes) = (Vec::new(), 0);
            while next < plan.len() && batch.len() < BATCH_MAX_IDS && bytes < limit {
                let c = plan[next];
                // What readers brought in takes the cache's room too.
                if spent + len(c) > budget {
                    stopped = Some("stopped: cache budget".into());
                    break;
                }
                spent += len(c);
                next += 1;
                if fetcher.is_resident_or_pending(c) {
                    continue;
                }
                let fits = loaded + len(c) <= load_budget;
                if !fits && !policy.fetch_missing {
                    // Neither loaded nor fetched: no need to look on disk.
                    continue;
                }
                if fetcher.on_disk(c) {
                    if !fits {
                        continue;
                    }
                    loaded += len(c);
                    steps.push(load_from_disk(fetcher.clone(), c, stats.clone()));
                    if steps.len() >= policy.in_flight {
                        break;
                    }
                    continue;
                }
                if !policy.fetch_missing {
                    continue;
                }
                batch.push(c);
                bytes += len(c);
            }
            if !batch.is_empty() {
                let f = fetcher.clone();
                steps.push(Box::pin(async move {
                    f.fetch_batch(&batch)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }));
                limit = (limit * 2).min(policy.batch_bytes);
            }
        }
        let step = steps.next().await;
        Stats::set(
            &stats.profile_stream_us,
            started.elapsed().as_micros() as u64,
        );
        match step {
            None => break,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!("the profile's stream stops: {e}");
                stopped.get_or_insert(format!("stopped: {e}"));
            }
        }
    }
    let state = stopped.unwrap_or_else(|| "done".into());
    tracing::info!(
        chunks = plan.len(),
        batches = stats
            .profile_batches
            .load(std::sync::atomic::Ordering::Relaxed),
        "profile stream {state}"
    );
    stats.set_profile(state);
}

/// Loads `chunk` from the disk cache into memory, as a reader would.
fn load_from_disk(fetcher: Arc<Fetcher>, chunk: u32, stats: Arc<Stats>) -> Step {
    Box::pin(async move {
        if fetcher.get(chunk, Priority::Background).await.is_ok() {
            Stats::inc(&stats.profile_chunks_loaded);
        }
        Ok(())
    })
}
