//! Profile routes: the recorded working set of an image, attached to its
//! manifest.
//!
//! A profile lives at `profiles/<manifest hex>`: the manifest's digest is its
//! address, so a client that resolved an image finds its profile with no
//! other lookup, and the manifest (and so its digest) never changes when a
//! profile is recorded. Unlike a manifest, a profile is replaced by a later
//! upload (the merge of more recordings). An upload is accepted only when it
//! decodes, names the manifest in its URL, and fits that stored manifest:
//! every chunk is one of the image's chunks, every range lies in one of its
//! files. Profiles are served as stored, with their BLAKE3 as the ETag;
//! clients check them again.

use crate::error::ApiError;
use crate::http::{blocking, parse_digest, Param, RawBody};
use crate::layout;
use crate::state::Shared;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use thaw_format::{Digest, Manifest, Profile};

fn bad_profile(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_profile",
        format!("{why}: upload a thaw profile recorded on this manifest"),
    )
}

/// Headers of a profile whose bytes hash to `sum`: it may change, so caches
/// must ask again (the ETag lets them do so cheaply).
fn headers(sum: &Digest) -> [(header::HeaderName, HeaderValue); 3] {
    let etag = HeaderValue::from_str(&format!("\"{sum}\"")).expect("a digest is a header value");
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
    ]
}

async fn stored(state: &Shared, raw: &str) -> Result<(Digest, Bytes), ApiError> {
    let digest = parse_digest(raw)?;
    let bytes = state
        .read_for_response(&layout::profile_path(&digest))
        .await?;
    let bytes =
        bytes.ok_or_else(|| ApiError::not_found(format!("a profile of manifest {digest}")))?;
    Ok((digest, bytes))
}

pub(super) async fn get(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let (_, bytes) = stored(&state, &raw).await?;
    Ok((headers(&Digest::of(&bytes)), bytes).into_response())
}

pub(super) async fn head(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let (_, bytes) = stored(&state, &raw).await?;
    let mut response = headers(&Digest::of(&bytes)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(response)
}

pub(super) async fn put(
    State(state): State<Shared>,
    Param(raw): Param<String>,
    RawBody(bytes, _room): RawBody,
) -> Result<StatusCode, ApiError> {
    let digest = parse_digest(&raw)?;
    let body = bytes.clone();
    let profile = blocking(move || Profile::decode(&body))
        .await?
        .map_err(bad_profile)?;
    if profile.manifest != digest {
        return Err(bad_profile(format!(
            "the profile is for manifest {}, not {digest}",
            profile.manifest
        )));
    }
    let manifest = layout::get(&*state.store, &layout::manifest_path(&digest))
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| {
            let msg = format!("manifest {digest} is not stored: push the image before its profile");
            ApiError::new(StatusCode::CONFLICT, "unknown_manifest", msg)
        })?;
    let entries = profile.entries.len();
    blocking(move || {
        let m = Manifest::decode_verified(&manifest, &digest).map_err(|e| {
            let msg =
                format!("manifest {digest} is damaged in the store ({e}): push the image again");
            ApiError::new(StatusCode::CONFLICT, "unknown_manifest", msg)
        })?;
        profile.check_against(&digest, &m).map_err(bad_profile)
    })
    .await??;
    let path = layout::profile_path(&digest);
    let before = layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?;
    if before.as_ref() == Some(&bytes) {
        return Ok(StatusCode::OK);
    }
    state
        .store
        .put(&path, bytes.into())
        .await
        .map_err(ApiError::store)?;
    tracing::info!(%digest, entries, "profile stored");
    Ok(if before.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    })
}
