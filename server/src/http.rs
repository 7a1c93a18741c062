//! What the route handlers share: extractors that render every rejection in
//! the API's JSON error shape, responses for immutable objects, and small
//! helpers. A sibling of `routes`, so the routes and their handlers
//! depend on it and not on each other.

use crate::error::ApiError;
use crate::state::{AppState, BodyBound, Shared};
use axum::body::{Body, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use thaw_format::wire::FRAME_MAX;
use thaw_format::Digest;
use tokio::sync::OwnedSemaphorePermit;

/// The route template a request matched (`/v1/chunks/{id}`), if any.
pub(crate) fn matched_route(request: &Request) -> Option<&str> {
    request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
}

/// Parses a `blake3:<hex>` path segment or body string.
pub(crate) fn parse_digest(raw: &str) -> Result<Digest, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_id(raw))
}

/// Headers of an immutable, content-addressed object named `id`.
fn immutable_headers(id: &Digest) -> [(header::HeaderName, HeaderValue); 3] {
    let etag =
        HeaderValue::from_str(&format!("\"{id}\"")).expect("a digest is a valid header value");
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        ),
        (header::ETAG, etag),
    ]
}

/// A GET response carrying the immutable object `id`.
pub(crate) fn immutable(id: &Digest, body: Bytes) -> Response {
    (immutable_headers(id), body).into_response()
}

/// A HEAD response for the immutable object `id` of `len` bytes.
pub(crate) fn immutable_head(id: &Digest, len: u64) -> Response {
    let mut response = immutable_headers(id).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

/// A path parameter whose rejection is rendered as JSON.
pub(crate) struct Param<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Param<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Param(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "bad URL path: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Most bytes reserved for a body before they arrive: a larger body grows
/// as it comes, so a declared length that is a lie costs nothing.
const RESERVE_MAX: usize = FRAME_MAX;

/// Room held in the server's body memory (`ServerConfig::body_memory`) for
/// one request body, until the request is done with it.
pub(crate) struct BodyRoom(Option<OwnedSemaphorePermit>);

impl BodyRoom {
    /// Waits for room for `bytes` more bytes of body.
    async fn grow(&mut self, bytes: usize, state: &AppState) -> Result<(), ApiError> {
        let held = self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        let needed = bytes.div_ceil(1024).saturating_sub(held);
        if needed == 0 {
            return Ok(());
        }
        if held + needed > state.body_memory_kib {
            return Err(ApiError::too_large(
                "request body exceeds the server's body memory (--body-memory)",
            ));
        }
        let more = state
            .bodies
            .clone()
            .acquire_many_owned(needed as u32)
            .await
            .map_err(ApiError::internal)?;
        match &mut self.0 {
            Some(room) => room.merge(more),
            None => self.0 = Some(more),
        }
        Ok(())
    }
}

/// Reads a request body of at most `bound.limit` bytes within the body
/// timeout, in room taken from the body memory (if `bound.takes_room`). A
/// body is refused (413) before a byte is read when its declared length is
/// over the limit, and as soon as the bytes that came exceed it, so nothing
/// beyond the limit is ever held; one that does not arrive in time, room
/// included, gets 408. Room for the declared length is taken before
/// reading, so such a body never holds part of its room while it waits for
/// the rest.
pub(crate) async fn read_body(
    body: Body,
    bound: BodyBound,
    state: &AppState,
) -> Result<(Bytes, BodyRoom), ApiError> {
    let limit = bound.limit;
    let too_large = || {
        ApiError::too_large(format!(
            "request body exceeds this route's limit of {limit} bytes (see docs/api.md)"
        ))
    };
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        return Err(too_large());
    }
    let declared = declared as usize;
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    let mut room = BodyRoom(None);
    if bound.takes_room {
        in_time(deadline, room.grow(declared, state)).await??;
    }
    let mut buf = BytesMut::with_capacity(declared.min(RESERVE_MAX));
    let mut body = body.into_data_stream();
    loop {
        let data = match in_time(deadline, body.next()).await? {
            None => return Ok((buf.freeze(), room)),
            Some(Err(e)) => {
                return Err(ApiError::bad_request(format!("cannot read the body: {e}")))
            }
            Some(Ok(data)) => data,
        };
        let len = buf.len() + data.len();
        if len > limit {
            return Err(too_large());
        }
        if bound.takes_room {
            in_time(deadline, room.grow(len, state)).await??;
        }
        buf.extend_from_slice(&data);
    }
}

/// `work`, if it finishes by `deadline`; a body timeout otherwise.
async fn in_time<T>(
    deadline: tokio::time::Instant,
    work: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_elapsed| ApiError::body_timeout())
}

/// A request whose body was read ahead ([`read_body`] with its route's
/// bound), and the room it holds.
pub(crate) async fn with_body_read(
    request: Request,
    state: &AppState,
) -> Result<(Request, BodyRoom), ApiError> {
    let bound = state.body_bound(matched_route(&request));
    let (parts, body) = request.into_parts();
    let (bytes, room) = read_body(body, bound, state).await?;
    Ok((Request::from_parts(parts, Body::from(bytes)), room))
}

/// The whole request body ([`read_body`]), counted in bytes-in, and the
/// room it holds in the body memory until the handler is done.
pub(crate) struct RawBody(pub(crate) Bytes, pub(crate) BodyRoom);

impl FromRequest<Shared> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, ApiError> {
        let bound = state.body_bound(matched_route(&request));
        let (body, room) = read_body(request.into_body(), bound, state).await?;
        state.metrics.bytes_in(body.len() as u64);
        Ok(RawBody(body, room))
    }
}

/// A JSON request body. The content type is not checked: the body is.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, ApiError> {
        let RawBody(body, _room) = RawBody::from_request(request, state).await?;
        serde_json::from_slice(&body).map(JsonBody).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("malformed JSON body: {e}"),
            )
        })
    }
}

/// Runs CPU-bound work (decompression, hashing) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ApiError::internal)
}
