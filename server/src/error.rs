//! Errors: [`ServerError`] for opening the store and serving, [`ApiError`] for
//! one refused request, rendered as `{"error": "<code>", "message": "<text>"}`.
//!
//! The codes are part of the HTTP API (`docs/api.md`): clients branch on them,
//! so they never change meaning. Messages are for people and say what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::fmt;
use std::path::PathBuf;
use thaw_format::Digest;

/// Why the server could not start or stopped with an error, or a store
/// check could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid store URL {url:?}: {reason}")]
    BadStoreUrl { url: String, reason: String },
    #[error("cannot create the store directory {}", path.display())]
    CreateStoreDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the object store at {url}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
    #[error("bad TLS configuration: {0}")]
    Tls(String),
    #[error("cannot read {path} from the store")]
    StoreRead {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

impl ServerError {
    /// Maps a store error on reading `path` to [`ServerError::StoreRead`].
    pub(crate) fn store_read(
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> ServerError {
        let path = path.to_string();
        move |source| ServerError::StoreRead { path, source }
    }
}

/// A refused request: an HTTP status, a stable code and a short message.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Chunk ids that must be uploaded first (only for `missing_chunks`).
    missing: Vec<Digest>,
    /// More chunks are missing than `missing` lists.
    truncated: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            missing: Vec::new(),
            truncated: false,
        }
    }

    pub(crate) fn bad_id(raw: &str) -> Self {
        let shown: String = raw.chars().take(80).collect();
        let msg = format!("{shown:?} is not a digest: use blake3:<64 lowercase hex digits>");
        Self::new(StatusCode::BAD_REQUEST, "bad_id", msg)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(what: impl fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} is not stored"),
        )
    }

    pub(crate) fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub(crate) fn digest_mismatch(detail: impl fmt::Display) -> Self {
        let msg = format!("{detail}: the body does not match the digest in the URL");
        Self::new(StatusCode::BAD_REQUEST, "digest_mismatch", msg)
    }

    /// A manifest names chunks that are not stored: `missing` lists the
    /// first of them, and `truncated` says there are more.
    pub(crate) fn missing_chunks(missing: Vec<Digest>, truncated: bool) -> Self {
        let at_least = if truncated { "at least " } else { "" };
        let msg = format!(
            "{at_least}{} chunks are not stored: upload them, then retry",
            missing.len()
        );
        ApiError {
            missing,
            truncated,
            ..Self::new(StatusCode::CONFLICT, "missing_chunks", msg)
        }
    }

    pub(crate) fn body_timeout() -> Self {
        let msg = "the request body did not arrive in time: send it faster, or ask for a longer --body-timeout";
        Self::new(StatusCode::REQUEST_TIMEOUT, "timeout", msg)
    }

    pub(crate) fn unauthorized() -> Self {
        let msg = "send the server's token as `Authorization: Bearer <token>`";
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
    }

    /// The object store failed: the request may succeed if retried.
    pub(crate) fn store(err: object_store::Error) -> Self {
        tracing::error!(error = %err, "object store request failed");
        let msg = "the server's object store failed; retry later";
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", msg)
    }

    /// A bug or a panic in a worker task.
    pub(crate) fn internal(err: impl fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; retry later",
        )
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    missing: &'a [Digest],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: &self.message,
            missing: &self.missing,
            truncated: self.truncated,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = axum::http::HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}
