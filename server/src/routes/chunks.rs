//! Chunk routes: single reads and writes, the missing list, batch reads.
//!
//! A chunk is stored as the frame the client uploaded, after the server has
//! decoded it and checked its BLAKE3 digest against the id in the URL, so the
//! store never holds a frame that does not match its name, unless the store
//! itself damages it. So a frame read from the store is checked again before
//! it is served or cached; one that fails is moved to quarantine and reads as
//! not stored, and an upload over a stored frame that fails replaces it.
//! Reads go through the hot cache, which also takes every accepted upload (a
//! fresh push is usually followed by pulls of the same chunks).

use crate::error::ApiError;
use crate::http::{blocking, immutable, immutable_head, parse_digest, JsonBody, Param, RawBody};
use crate::layout;
use crate::responses::ResponseMemory;
use crate::state::{AppState, Shared};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use object_store::GetResult;
use thaw_format::frame::{self, FrameError};
use thaw_format::wire::{self, BATCH_MAX_IDS, MISSING_MAX_IDS};
use thaw_format::{ChunkRef, Digest, FRAME_HEADER_LEN};

/// Store requests in flight for one missing-list request.
pub(super) const EXISTS_CONCURRENCY: usize = 64;
/// Chunks a batch read finds in the store ahead of the one it sends: four
/// hide a store's latency well enough with the several batches a client has
/// in flight. Finding takes no memory; reading waits for its turn.
const BATCH_CONCURRENCY: usize = 4;

/// A chunk found and not read yet ([`AppState::open_chunk`]).
pub(crate) enum Opened {
    /// In the hot cache, with a frame of this length.
    Cached(usize),
    /// In the store, opened.
    Stored(GetResult),
    Missing,
}

/// What the store holds for a chunk a manifest names.
pub(super) enum ChunkState {
    Stored,
    Missing,
    /// A good frame of another length than the manifest gives.
    OtherLength(usize),
}

impl AppState {
    /// The frame of `id`, from the hot cache or the store: see
    /// [`AppState::open_chunk`] and [`AppState::read_opened`].
    pub(crate) async fn read_chunk(&self, id: &Digest) -> Result<Option<Bytes>, ApiError> {
        let opened = self.open_chunk(id).await?;
        self.read_opened(id, opened).await
    }

    /// Where the frame of `id` is, found but not read: it takes no memory
    /// yet, so that a batch read can look ahead without holding frames.
    pub(crate) async fn open_chunk(&self, id: &Digest) -> Result<Opened, ApiError> {
        if let Some(len) = self.cache.peek(id).map(|frame| frame.len()) {
            return Ok(Opened::Cached(len));
        }
        self.open_stored(id).await
    }

    async fn open_stored(&self, id: &Digest) -> Result<Opened, ApiError> {
        self.metrics.cache_miss();
        let object = layout::open(&*self.store, &layout::chunk_path(id))
            .await
            .map_err(ApiError::store)?;
        Ok(object.map_or(Opened::Missing, Opened::Stored))
    }

    /// The frame of an opened chunk, read once there is room for it in the
    /// response memory, which it holds for as long as any copy of it lives.
    /// A frame from the store is verified (by its seal, if sealed), then cached; one that fails is
    /// quarantined and reads as `None`.
    pub(crate) async fn read_opened(
        &self,
        id: &Digest,
        opened: Opened,
    ) -> Result<Option<Bytes>, ApiError> {
        let object = match opened {
            Opened::Missing => return Ok(None),
            Opened::Stored(object) => object,
            Opened::Cached(len) => {
                let room = self.responses.room(len as u64, &self.metrics).await;
                if let Some(frame) = self.cache.get(id) {
                    self.metrics.cache_hit();
                    return Ok(Some(ResponseMemory::hold(frame, room)));
                }
                // It left the cache while this read waited for room.
                drop(room);
                match self.open_stored(id).await? {
                    Opened::Stored(object) => object,
                    _ => return Ok(None),
                }
            }
        };
        let path = layout::chunk_path(id);
        let (frame, room) = self.read_into_room(object).await?;
        let (checked, id) = (frame.clone(), *id);
        if let Err(why) = blocking(move || frame::verify_stored(&checked, &id)).await? {
            self.quarantine(&path, why).await?;
            return Ok(None);
        }
        self.cache.insert(id, frame.clone());
        Ok(Some(ResponseMemory::hold(frame, room)))
    }

    /// Whether the store holds chunk `id`. The store decides, not the hot
    /// cache: a frame may stay cached after a collection removed it.
    pub(crate) async fn chunk_exists(&self, id: &Digest) -> Result<bool, ApiError> {
        let size = layout::size(&*self.store, &layout::chunk_path(id))
            .await
            .map_err(ApiError::store)?;
        Ok(size.is_some())
    }

    /// The ids among `ids` that are not stored, in order.
    pub(crate) async fn missing_chunks(&self, ids: Vec<Digest>) -> Result<Vec<Digest>, ApiError> {
        let present: Vec<bool> = stream::iter(ids.iter().copied())
            .map(|id| async move { self.chunk_exists(&id).await })
            .buffered(EXISTS_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(ids
            .into_iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(id, _)| id)
            .collect())
    }

    /// Whether `chunk` is stored with the length the manifest gives it. The
    /// frame header (12 bytes, a range read) says so when it agrees; when it
    /// does not, or cannot be read, only the whole frame, verified, tells a
    /// manifest that misstates a length from a frame damaged in the store
    /// (which is quarantined, so the chunk is missing).
    pub(super) async fn chunk_state(&self, chunk: &ChunkRef) -> Result<ChunkState, ApiError> {
        let expected = chunk.len as usize;
        // The store decides, as for `chunk_exists`.
        let path = layout::chunk_path(&chunk.id);
        let header = self
            .store
            .get_range(&path, 0..FRAME_HEADER_LEN as u64)
            .await;
        match header {
            Err(object_store::Error::NotFound { .. }) => return Ok(ChunkState::Missing),
            Ok(head) if frame::declared_len(&head).ok() == Some(expected) => {
                return Ok(ChunkState::Stored)
            }
            _ => {}
        }
        let Some(frame) = self.read_chunk(&chunk.id).await? else {
            return Ok(ChunkState::Missing);
        };
        let stored = frame::declared_len(&frame).map_err(ApiError::internal)?;
        Ok(if stored == expected {
            ChunkState::Stored
        } else {
            ChunkState::OtherLength(stored)
        })
    }
}

pub(super) async fn get(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let id = parse_digest(&raw)?;
    let frame = state
        .read_chunk(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("chunk {id}")))?;
    state.metrics.chunk_served();
    Ok(immutable(&id, frame))
}

pub(super) async fn head(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let id = parse_digest(&raw)?;
    // The store decides, as for `chunk_exists`.
    let len = layout::size(&*state.store, &layout::chunk_path(&id))
        .await
        .map_err(ApiError::store)?;
    let len = len.ok_or_else(|| ApiError::not_found(format!("chunk {id}")))?;
    Ok(immutable_head(&id, len))
}

pub(super) async fn put(
    State(state): State<Shared>,
    Param(raw): Param<String>,
    RawBody(frame, _room): RawBody,
) -> Result<StatusCode, ApiError> {
    let id = parse_digest(&raw)?;
    let body = frame.clone();
    blocking(move || frame::verify_all(&body, &id))
        .await?
        .map_err(|e| match e {
            FrameError::DigestMismatch { .. } => ApiError::digest_mismatch(e),
            e => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_frame",
                format!("{e}: upload a thaw chunk frame"),
            ),
        })?;
    let path = layout::chunk_path(&id);
    // The stored frame, not the cache, decides: an upload is how a frame
    // damaged in the store gets replaced.
    if let Some(stored) = layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?
    {
        if stored == frame {
            return Ok(StatusCode::OK);
        }
        // Another encoding of the same chunk is as good, if it verifies.
        let checked = stored.clone();
        match blocking(move || frame::verify_all(&checked, &id)).await? {
            Ok(_) => return Ok(StatusCode::OK),
            Err(why) => state.quarantine(&path, why).await?,
        }
    }
    state
        .store
        .put(&path, frame.clone().into())
        .await
        .map_err(ApiError::store)?;
    state.cache.insert(id, frame);
    tracing::debug!(%id, "chunk stored");
    Ok(StatusCode::CREATED)
}

/// The body of `POST /v1/chunks/missing` and `POST /v1/chunks/batch`.
#[derive(serde::Deserialize)]
pub(super) struct IdList {
    ids: Vec<String>,
}

impl IdList {
    fn parse(&self, max: usize) -> Result<Vec<Digest>, ApiError> {
        if self.ids.len() > max {
            return Err(ApiError::too_large(format!(
                "{} ids in one request; send at most {max} per request",
                self.ids.len()
            )));
        }
        self.ids.iter().map(|raw| parse_digest(raw)).collect()
    }
}

#[derive(serde::Serialize)]
pub(super) struct Missing {
    missing: Vec<Digest>,
}

pub(super) async fn missing(
    State(state): State<Shared>,
    JsonBody(list): JsonBody<IdList>,
) -> Result<Json<Missing>, ApiError> {
    let ids = list.parse(MISSING_MAX_IDS)?;
    Ok(Json(Missing {
        missing: state.missing_chunks(ids).await?,
    }))
}

/// Streams one record per requested id, in request order: the 32 raw id
/// bytes, a status byte, the frame length (u32 LE, 0 if not found) and the
/// frame. A store failure mid-stream aborts the response, which the client
/// sees as a truncated body.
pub(super) async fn batch(
    State(state): State<Shared>,
    JsonBody(list): JsonBody<IdList>,
) -> Result<Response, ApiError> {
    let ids = list.parse(BATCH_MAX_IDS)?;
    let io = |e: ApiError| std::io::Error::other(format!("{e:?}"));
    // Chunks are found ahead (a store's latency is in the finding), but
    // read one at a time, each when the last has been taken: a response
    // waiting for room holds no frame, and one whose client stops reading
    // holds one or two.
    let opener = state.clone();
    let records = stream::iter(ids)
        .map(move |id| {
            let state = opener.clone();
            async move { Ok((id, state.open_chunk(&id).await.map_err(io)?)) }
        })
        .buffered(BATCH_CONCURRENCY)
        .and_then(move |(id, opened)| {
            let state = state.clone();
            async move {
                let frame = state.read_opened(&id, opened).await.map_err(io)?;
                let parts = record(&id, frame.as_ref());
                if frame.is_some() {
                    state.metrics.chunk_served();
                }
                state
                    .metrics
                    .bytes_out(parts.iter().map(|p| p.len() as u64).sum());
                Ok::<_, std::io::Error>(stream::iter(
                    parts.into_iter().map(Ok::<_, std::io::Error>),
                ))
            }
        })
        .try_flatten();
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(records),
    )
        .into_response())
}

/// The record of `id` (`thaw_format::wire`): its header, then its frame if there is one.
fn record(id: &Digest, frame: Option<&Bytes>) -> Vec<Bytes> {
    let head = Bytes::copy_from_slice(&wire::encode_record_header(id, frame.map(Bytes::len)));
    match frame {
        Some(frame) => vec![head, frame.clone()],
        None => vec![head],
    }
}
