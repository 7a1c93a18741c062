//! Bearer-token access control.
//!
//! Two optional tokens: the push token guards writes (every `PUT` and
//! `POST /v1/chunks/missing`, which tells an uploader what to send), the pull
//! token guards reads. The push token is accepted for reads too, so one
//! credential suffices for a build pipeline. An unset token leaves its side
//! open. `/v1/health` and unknown routes (which answer 404) are always open.
//! The access class of a request is decided here, in one place, from its
//! method and route template.

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// What a request needs to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    Pull,
    Push,
}

fn access(method: &Method, route: Option<&str>) -> Access {
    match route {
        None | Some("/v1/health") => Access::Open,
        Some("/v1/chunks/missing") => Access::Push,
        Some(_) if method == Method::GET || method == Method::HEAD => Access::Pull,
        Some("/v1/chunks/batch") if method == Method::POST => Access::Pull,
        Some(_) => Access::Push,
    }
}

pub(crate) struct Auth {
    push: Option<Vec<u8>>,
    pull: Option<Vec<u8>>,
}

impl Auth {
    pub(crate) fn new(push: Option<&str>, pull: Option<&str>) -> Self {
        Auth {
            push: push.map(|t| t.as_bytes().to_vec()),
            pull: pull.map(|t| t.as_bytes().to_vec()),
        }
    }

    fn allows(&self, access: Access, presented: Option<&[u8]>) -> bool {
        let matches = |token: &Option<Vec<u8>>| match (token, presented) {
            (Some(t), Some(p)) => constant_time_eq(t, p),
            _ => false,
        };
        match access {
            Access::Open => true,
            Access::Push => self.push.is_none() || matches(&self.push),
            Access::Pull => self.pull.is_none() || matches(&self.pull) || matches(&self.push),
        }
    }
}

/// Compares in time that depends only on the lengths, not on where the first
/// difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(request: &Request) -> Option<&[u8]> {
    let value = request.headers().get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// Middleware: refuses requests without the token their access class needs.
pub(crate) async fn require_token(
    State(auth): State<Arc<Auth>>,
    request: Request,
    next: Next,
) -> Response {
    let needed = access(request.method(), crate::http::matched_route(&request));
    if auth.allows(needed, bearer(&request)) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests() {
        assert_eq!(access(&Method::GET, Some("/v1/health")), Access::Open);
        assert_eq!(access(&Method::GET, None), Access::Open);
        assert_eq!(access(&Method::HEAD, Some("/v1/chunks/{id}")), Access::Pull);
        assert_eq!(
            access(&Method::POST, Some("/v1/chunks/batch")),
            Access::Pull
        );
        assert_eq!(access(&Method::GET, Some("/metrics")), Access::Pull);
        assert_eq!(
            access(&Method::POST, Some("/v1/chunks/missing")),
            Access::Push
        );
        assert_eq!(
            access(&Method::PUT, Some("/v1/tags/{name}/{tag}")),
            Access::Push
        );
        assert_eq!(
            access(&Method::PUT, Some("/v1/profiles/{digest}")),
            Access::Push
        );
        assert_eq!(
            access(&Method::GET, Some("/v1/profiles/{digest}")),
            Access::Pull
        );
        assert_eq!(
            access(&Method::DELETE, Some("/v1/chunks/{id}")),
            Access::Push
        );
    }

    #[test]
    fn push_token_also_pulls_and_pull_token_cannot_push() {
        let auth = Auth::new(Some("push"), Some("pull"));
        assert!(auth.allows(Access::Pull, Some(b"pull")));
        assert!(auth.allows(Access::Pull, Some(b"push")));
        assert!(!auth.allows(Access::Pull, None));
        assert!(auth.allows(Access::Push, Some(b"push")));
        assert!(!auth.allows(Access::Push, Some(b"pull")));
        assert!(!auth.allows(Access::Push, Some(b"pus")));
        assert!(Auth::new(None, None).allows(Access::Push, None));
    }
}
