//! Where chunk frames come from: the one seam between the image core and the
//! network.
//!
//! A [`ChunkSource`] makes one attempt to get one chunk's frame (or many in
//! one request, for a profile's stream) and says
//! whether a failure is worth retrying; it neither verifies, caches, retries
//! nor times out, because the `Fetcher` does all of
//! that once for every source. [`HttpSource`] is the chunk server;
//! [`MemorySource`] holds frames in memory and counts what was asked of it, so
//! fetch counts, prefetch and single-flight are unit tests (as mountpoint-s3's
//! `MockClient` does for its `ObjectClient`).

mod memory;

pub use memory::MemorySource;

use crate::remote::Remote;
use bytes::Bytes;
use futures::future::BoxFuture;
use thaw_format::{frame, ChunkRef, Digest};

/// Why a source could not produce a frame.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The source does not hold the chunk (retrying will not help).
    #[error("chunk {0} is not on the server")]
    NotFound(Digest),
    /// The source could not be reached or failed; `transient` says whether
    /// trying again may help.
    #[error("{message}")]
    Unavailable { message: String, transient: bool },
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SourceError::Unavailable {
                transient: true,
                ..
            }
        )
    }
}

/// Gets chunk frames, one attempt each. Frames are not yet verified.
pub trait ChunkSource: Send + Sync + 'static {
    fn frame(&self, id: Digest) -> BoxFuture<'_, Result<Bytes, SourceError>>;

    /// The frames of many chunks in one request, in order; `None` for a
    /// chunk the source does not hold. The lengths bound what is accepted.
    fn frames(
        &self,
        chunks: Vec<ChunkRef>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, SourceError>>;
}

/// The chunk server, over HTTP.
#[derive(Debug, Clone)]
pub struct HttpSource {
    remote: Remote,
}

impl HttpSource {
    pub fn new(remote: Remote) -> HttpSource {
        HttpSource { remote }
    }
}

/// A failed request as the fetcher sees it.
fn source_error(e: crate::ClientError) -> SourceError {
    SourceError::Unavailable {
        transient: e.is_transient(),
        message: crate::error::chain(&e),
    }
}

impl ChunkSource for HttpSource {
    fn frame(&self, id: Digest) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            self.remote.chunk_once(&id).await.map_err(|e| match e {
                crate::ClientError::NotFound { .. } => SourceError::NotFound(id),
                e => source_error(e),
            })
        })
    }

    fn frames(
        &self,
        chunks: Vec<ChunkRef>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, SourceError>> {
        Box::pin(async move {
            let ids: Vec<Digest> = chunks.iter().map(|c| c.id).collect();
            let frames_max = chunks
                .iter()
                .map(|c| frame::max_frame_len(c.len as usize))
                .sum();
            self.remote
                .chunks_once(&ids, frames_max)
                .await
                .map_err(source_error)
        })
    }
}
