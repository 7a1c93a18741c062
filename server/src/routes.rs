//! The HTTP API (`docs/api.md`): routes, shared state, middleware, extractors.
//!
//! Requests pass, outermost first, through [`observe`] (a tracing span, the
//! request and byte counters), [`auth::require_token`] and
//! [`limit_concurrency`], then reach a handler in [`chunks`], [`manifests`],
//! [`profiles`] or [`tags`]. Handlers take bodies through [`RawBody`] and [`JsonBody`],
//! which stream them within the route's limit and the body timeout, and turn
//! every rejection (too large, too slow, malformed) into the JSON error shape
//! instead of axum's plain text.
//!
//! [`RawBody`]: crate::http::RawBody
//! [`JsonBody`]: crate::http::JsonBody

mod chunks;
mod manifests;
mod profiles;
mod tags;

use crate::auth::{self, Auth};
use crate::connections::ConnHandle;
use crate::error::ApiError;
use crate::http::{matched_route, with_body_read};
use crate::metrics;
use crate::state::Shared;
use crate::ServerConfig;
use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self as mw, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

pub(crate) fn build(state: Shared, config: &ServerConfig) -> Router {
    let auth = Arc::new(Auth::new(
        config.push_token.as_deref(),
        config.pull_token.as_deref(),
    ));
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/chunks/missing", post(chunks::missing))
        .route("/v1/chunks/batch", post(chunks::batch))
        .route(
            "/v1/chunks/{id}",
            get(chunks::get).head(chunks::head).put(chunks::put),
        )
        .route(
            "/v1/manifests/{digest}",
            get(manifests::get)
                .head(manifests::head)
                .put(manifests::put),
        )
        .route(
            "/v1/profiles/{digest}",
            get(profiles::get).head(profiles::head).put(profiles::put),
        )
        .route("/v1/tags/{name}", get(tags::list))
        .route("/v1/tags/{name}/{tag}", get(tags::get).put(tags::put))
        .route("/v1/gc", post(collect))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(mw::from_fn_with_state(state.clone(), limit_concurrency))
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

/// Which permits a request's handler holds while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permits {
    /// Cheap answers (health, metrics, unknown routes) take none, so they
    /// answer under load.
    None,
    Reads,
    /// A batch read: its small body is read first, so a body that trickles
    /// holds no read permit.
    ReadsAfterBody,
    Uploads,
}

fn permits(method: &Method, route: Option<&str>) -> Permits {
    match route {
        None | Some("/v1/health" | "/metrics") => Permits::None,
        Some("/v1/chunks/batch") if method == Method::POST => Permits::ReadsAfterBody,
        Some("/v1/chunks/missing") if method == Method::POST => Permits::Uploads,
        Some(_) if method == Method::GET || method == Method::HEAD => Permits::Reads,
        Some(_) if method == Method::PUT => Permits::Uploads,
        Some(_) => Permits::None,
    }
}

/// Middleware: at most `max_concurrency` reads and `max_uploads` uploads
/// are handled at once; others wait. While a request holds its permit its
/// connection is not closed to make room at the connection cap.
async fn limit_concurrency(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let (semaphore, request) = match permits(request.method(), matched_route(&request)) {
        Permits::None => return next.run(request).await,
        Permits::Reads => (&state.reads, request),
        Permits::Uploads => (&state.uploads, request),
        // The ids are parsed from the body in the handler, so the body's
        // room goes as soon as it is read: it is small.
        Permits::ReadsAfterBody => match with_body_read(request, &state).await {
            Ok((request, _room)) => (&state.reads, request),
            Err(refused) => return refused.into_response(),
        },
    };
    match semaphore.acquire().await {
        Ok(_permit) => {
            let _handling = request
                .extensions()
                .get::<ConnHandle>()
                .map(ConnHandle::handling);
            next.run(request).await
        }
        Err(closed) => ApiError::internal(closed).into_response(),
    }
}

/// `POST /v1/gc?grace=SECONDS&keep=N&dry_run=true`: one garbage collection
/// of the store (`crate::gc`), one at a time per server; answers its report.
#[derive(serde::Deserialize)]
struct GcQuery {
    grace: Option<u64>,
    keep: Option<usize>,
    dry_run: Option<bool>,
}

async fn collect(
    State(state): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<GcQuery>,
) -> Result<Json<crate::GcReport>, ApiError> {
    let Ok(_one) = state.collecting.try_lock() else {
        let msg = "a garbage collection is running on this server";
        return Err(ApiError::new(StatusCode::CONFLICT, "busy", msg));
    };
    let defaults = crate::GcOptions::default();
    let options = crate::GcOptions {
        grace: q
            .grace
            .map_or(defaults.grace, std::time::Duration::from_secs),
        keep: q.keep.unwrap_or(defaults.keep).max(1),
        dry_run: q.dry_run.unwrap_or(false),
        ..defaults
    };
    let report = crate::gc(&state.store, &options)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(report))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    let text = state.metrics.render(
        state.cache.bytes(),
        state.body_bytes(),
        state.responses.held(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_permits_by_what_they_do() {
        let cases = [
            (Method::GET, Some("/v1/health"), Permits::None),
            (Method::GET, None, Permits::None),
            (Method::GET, Some("/v1/chunks/{id}"), Permits::Reads),
            (Method::HEAD, Some("/v1/manifests/{digest}"), Permits::Reads),
            (
                Method::POST,
                Some("/v1/chunks/batch"),
                Permits::ReadsAfterBody,
            ),
            (Method::POST, Some("/v1/chunks/missing"), Permits::Uploads),
            (Method::PUT, Some("/v1/chunks/{id}"), Permits::Uploads),
            (Method::PUT, Some("/v1/tags/{name}/{tag}"), Permits::Uploads),
            (Method::GET, Some("/v1/profiles/{digest}"), Permits::Reads),
            (Method::PUT, Some("/v1/profiles/{digest}"), Permits::Uploads),
            (Method::DELETE, Some("/v1/chunks/{id}"), Permits::None),
        ];
        for (method, route, expected) in cases {
            assert_eq!(permits(&method, route), expected, "{method} {route:?}");
        }
    }
}
