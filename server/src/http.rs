//! What the route handlers share: extractors that render every rejection in
//! the API's JSON error shape, responses for immutable objects, and small
//! helpers. A sibling of `routes`, so the routes and their handlers
//! depend on it and not on each other.

use crate::error::ApiError;
use crate::state::Shared;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use thaw_format::Digest;

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

/// The whole request body, within the route's limit, counted in bytes-in.
pub(crate) struct RawBody(pub(crate) Bytes);

impl FromRequest<Shared> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, ApiError> {
        match Bytes::from_request(request, state).await {
            Ok(body) => {
                state.metrics.bytes_in(body.len() as u64);
                Ok(RawBody(body))
            }
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(
                ApiError::too_large("request body exceeds this route's limit (see docs/api.md)"),
            ),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "cannot read the body: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// A JSON request body. The content type is not checked: the body is.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, ApiError> {
        let RawBody(body) = RawBody::from_request(request, state).await?;
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
