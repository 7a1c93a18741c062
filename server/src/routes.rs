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
use crate::http::matched_route;
use crate::metrics::{self, Metrics};
use crate::state::{AppState, Shared};
use crate::ServerConfig;
use axum::body::HttpBody;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self as mw, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use object_store::ObjectStore;
use std::sync::Arc;
use std::time::Instant;
use thaw_format::wire::{
    id_list_body_max, BATCH_MAX_IDS, FRAME_MAX as CHUNK_BODY_MAX, MISSING_MAX_IDS, TAG_BODY_MAX,
};
use tokio::sync::Semaphore;
use tracing::Instrument;

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
