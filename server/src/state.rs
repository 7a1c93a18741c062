//! The state every handler shares: the store, the hot cache, the metrics,
//! the request permits, the body limits and the response memory.

use crate::cache::HotCache;
use crate::connections::Registry;
use crate::error::ApiError;
use crate::layout;
use crate::metrics::Metrics;
use crate::responses::{ResponseMemory, Room};
use crate::ServerConfig;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetResult, ObjectStore};
use std::sync::Arc;
use std::time::Duration;
use thaw_format::wire::{
    id_list_body_max, BATCH_MAX_IDS, FRAME_MAX as CHUNK_BODY_MAX, MISSING_MAX_IDS,
    PROFILE_BODY_MAX, TAG_BODY_MAX,
};
use tokio::sync::Semaphore;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) cache: HotCache,
    pub(crate) metrics: Metrics,
    /// Permits of requests that read (`GET`, `HEAD`, batch reads).
    pub(crate) reads: Semaphore,
    /// Permits of requests that upload (`PUT`, the missing list): kept apart
    /// so that slow uploads cannot hold up reads.
    pub(crate) uploads: Semaphore,
    /// How long a request body may take to arrive, once the server reads it.
    pub(crate) body_timeout: Duration,
    /// Room for request bodies, in KiB permits (`http::read_body`).
    pub(crate) bodies: Arc<Semaphore>,
    pub(crate) body_memory_kib: usize,
    max_body: usize,
    /// Room for the frames that responses hold.
    pub(crate) responses: ResponseMemory,
    /// Every open connection.
    pub(crate) connections: Arc<Registry>,
    /// Held while a garbage collection runs (`POST /v1/gc`).
    pub(crate) collecting: tokio::sync::Mutex<()>,
}

pub(crate) type Shared = Arc<AppState>;

/// What bounds a route's request body (`http::read_body`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyBound {
    /// The largest body the route takes (0 for routes without a body).
    pub(crate) limit: usize,
    /// Whether the body takes room in the body memory. A batch read's does
    /// not: it is small, one connection holds one at most, and a read must
    /// not wait for room that uploads hold for as long as their bodies
    /// take to arrive.
    pub(crate) takes_room: bool,
}

impl AppState {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, config: &ServerConfig) -> Shared {
        // Bodies take room in KiB permits, as responses do.
        let body_memory_kib = crate::responses::kib_permits(config.body_memory);
        let connections = Registry::new();
        Arc::new(AppState {
            store,
            cache: HotCache::new(config.cache_mem),
            metrics: Metrics::default(),
            reads: Semaphore::new(config.max_concurrency.max(1)),
            uploads: Semaphore::new(config.max_uploads.max(1)),
            body_timeout: config.body_timeout,
            bodies: Arc::new(Semaphore::new(body_memory_kib)),
            body_memory_kib,
            max_body: config.max_body,
            responses: ResponseMemory::new(config.response_memory, connections.clone()),
            connections,
            collecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Bytes of request bodies held now.
    pub(crate) fn body_bytes(&self) -> u64 {
        (self.body_memory_kib - self.bodies.available_permits()) as u64 * 1024
    }

    /// What bounds the body of the route template `route`.
    pub(crate) fn body_bound(&self, route: Option<&str>) -> BodyBound {
        let upload = |limit| BodyBound {
            limit,
            takes_room: true,
        };
        match route {
            Some("/v1/chunks/missing") => upload(id_list_body_max(MISSING_MAX_IDS)),
            Some("/v1/chunks/batch") => BodyBound {
                limit: id_list_body_max(BATCH_MAX_IDS),
                takes_room: false,
            },
            Some("/v1/chunks/{id}") => upload(CHUNK_BODY_MAX),
            Some("/v1/manifests/{digest}") => upload(self.max_body),
            Some("/v1/tags/{name}/{tag}") => upload(TAG_BODY_MAX),
            Some("/v1/profiles/{digest}") => upload(PROFILE_BODY_MAX),
            _ => upload(0),
        }
    }

    /// The bytes of an opened object, read once there is room for them in
    /// the response memory, and the room they take.
    pub(crate) async fn read_into_room(
        &self,
        object: GetResult,
    ) -> Result<(Bytes, Room), ApiError> {
        let room = self.responses.room(object.meta.size, &self.metrics).await;
        let bytes = object.bytes().await.map_err(ApiError::store)?;
        Ok((bytes, room))
    }

    /// The object at `path`, for a response: read once there is room for it
    /// in the response memory, which it holds for as long as any copy of it
    /// lives. `None` if there is none.
    pub(crate) async fn read_for_response(&self, path: &Path) -> Result<Option<Bytes>, ApiError> {
        let Some(object) = layout::open(&*self.store, path)
            .await
            .map_err(ApiError::store)?
        else {
            return Ok(None);
        };
        let (bytes, room) = self.read_into_room(object).await?;
        Ok(Some(ResponseMemory::hold(bytes, room)))
    }

    /// Moves the stored object at `path`, which failed verification for
    /// `why`, to quarantine: from now on it reads as not stored, so an
    /// uploader sends it again.
    pub(crate) async fn quarantine(
        &self,
        path: &Path,
        why: impl std::fmt::Display,
    ) -> Result<(), ApiError> {
        layout::quarantine(&*self.store, path)
            .await
            .map_err(ApiError::store)?;
        self.metrics.quarantined();
        tracing::error!(%path, %why, to = %layout::quarantine_path(path), "stored object failed verification: moved to quarantine");
        Ok(())
    }
}
