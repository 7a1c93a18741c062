//! The HTTP API (`docs/api.md`): routes, shared state, middleware, extractors.
//!
//! Requests pass, outermost first, through [`observe`] (a tracing span, the
//! request and byte counters), [`auth::require_token`], [`limit_concurrency`]
//! (a semaphore of `max_concurrency` permits; health and metrics skip it so
//! they answer under load) and a per-route body limit, then reach a handler in
//! [`chunks`], [`manifests`] or [`tags`]. Handlers take bodies through
//! [`RawBody`] and [`JsonBody`], which turn every rejection (too large,
//! malformed) into the JSON error shape instead of axum's plain text.

mod chunks;
mod manifests;
mod tags;

use crate::auth::{self, Auth};
use crate::cache::HotCache;
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::ServerConfig;
use axum::body::HttpBody;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::{header, request::Parts, HeaderValue, Method, StatusCode};
use axum::middleware::{self as mw, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use object_store::ObjectStore;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Instant;
use thaw_format::wire::{
    id_list_body_max, BATCH_MAX_IDS, FRAME_MAX as CHUNK_BODY_MAX, MISSING_MAX_IDS, TAG_BODY_MAX,
};
use thaw_format::Digest;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) cache: HotCache,
    pub(crate) metrics: Metrics,
}

type Shared = Arc<AppState>;

pub(crate) fn build(store: Arc<dyn ObjectStore>, config: &ServerConfig) -> Router {
    let state = Arc::new(AppState {
        store,
        cache: HotCache::new(config.cache_mem),
        metrics: Metrics::default(),
    });
    let auth = Arc::new(Auth::new(
        config.push_token.as_deref(),
        config.pull_token.as_deref(),
    ));
    let permits = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
    let limit = DefaultBodyLimit::max;
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics_text))
        .route(
            "/v1/chunks/missing",
            post(chunks::missing).layer(limit(id_list_body_max(MISSING_MAX_IDS))),
        )
        .route(
            "/v1/chunks/batch",
            post(chunks::batch).layer(limit(id_list_body_max(BATCH_MAX_IDS))),
        )
        .route(
            "/v1/chunks/{id}",
            get(chunks::get)
                .head(chunks::head)
                .put(chunks::put)
                .layer(limit(CHUNK_BODY_MAX)),
        )
        .route(
            "/v1/manifests/{digest}",
            get(manifests::get)
                .head(manifests::head)
                .put(manifests::put)
                .layer(limit(config.max_body)),
        )
        .route("/v1/tags/{name}", get(tags::list))
        .route(
            "/v1/tags/{name}/{tag}",
            get(tags::get).put(tags::put).layer(limit(TAG_BODY_MAX)),
        )
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(mw::from_fn_with_state(permits, limit_concurrency))
        .layer(mw::from_fn_with_state(auth, auth::require_token))
        .layer(mw::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The route template a request matched (`/v1/chunks/{id}`), if any.
pub(crate) fn matched_route(request: &Request) -> Option<&str> {
    request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
}

/// Middleware: a span per request, and the request and bytes-out counters.
async fn observe(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let route = matched_route(&request)
        .unwrap_or(metrics::UNMATCHED_ROUTE)
        .to_owned();
    let method = request.method().clone();
    let span = tracing::info_span!("http", %method, route = %route, path = %request.uri().path());
    async move {
        let start = Instant::now();
        let response = next.run(request).await;
        let status = response.status().as_u16();
        // Streamed bodies (batch reads) have no exact size and count their
        // own bytes; HEAD bodies are dropped before they are sent.
        if method != Method::HEAD {
            if let Some(n) = response.body().size_hint().exact() {
                state.metrics.bytes_out(n);
            }
        }
        state.metrics.request(&route, status);
        tracing::debug!(
            status,
            micros = start.elapsed().as_micros() as u64,
            "request done"
        );
        response
    }
    .instrument(span)
    .await
}

/// Middleware: at most `max_concurrency` requests run at once; others wait.
async fn limit_concurrency(
    State(permits): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(matched_route(&request), Some("/v1/health" | "/metrics")) {
        return next.run(request).await;
    }
    match permits.acquire().await {
        Ok(_permit) => next.run(request).await,
        Err(closed) => ApiError::internal(closed).into_response(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    let text = state.metrics.render(state.cache.bytes());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: see docs/api.md for the API",
    )
}

async fn method_not_allowed() -> ApiError {
    let msg = "this route does not take that method: see docs/api.md for the API";
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", msg)
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
