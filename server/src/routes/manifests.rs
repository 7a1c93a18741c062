//! Manifest routes.
//!
//! A manifest is accepted only when it decodes, hashes to the digest in the
//! URL, and every chunk it refers to is already stored: a stored manifest is
//! therefore always fully readable, and a pusher uploads chunks first and the
//! manifest last.

use crate::error::ApiError;
use crate::http::{blocking, immutable, immutable_head, parse_digest, Param, RawBody};
use crate::layout;
use crate::state::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use std::collections::HashSet;
use thaw_format::{Manifest, ManifestError};

pub(super) async fn get(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&raw)?;
    let path = layout::manifest_path(&digest);
    let bytes = layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?;
    let bytes = bytes.ok_or_else(|| ApiError::not_found(format!("manifest {digest}")))?;
    Ok(immutable(&digest, bytes))
}

pub(super) async fn head(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&raw)?;
    let path = layout::manifest_path(&digest);
    let len = layout::size(&*state.store, &path)
        .await
        .map_err(ApiError::store)?;
    let len = len.ok_or_else(|| ApiError::not_found(format!("manifest {digest}")))?;
    Ok(immutable_head(&digest, len))
}

pub(super) async fn put(
    State(state): State<Shared>,
    Param(raw): Param<String>,
    RawBody(bytes): RawBody,
) -> Result<StatusCode, ApiError> {
    let digest = parse_digest(&raw)?;
    let body = bytes.clone();
    let manifest = blocking(move || Manifest::decode_verified(&body, &digest))
        .await?
        .map_err(|e| match e {
            ManifestError::DigestMismatch { .. } => ApiError::digest_mismatch(e),
            e => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_manifest",
                format!("{e}: upload a thaw manifest"),
            ),
        })?;
    let mut seen = HashSet::with_capacity(manifest.chunks.len());
    let ids = manifest
        .chunks
        .iter()
        .map(|c| c.id)
        .filter(|id| seen.insert(*id))
        .collect();
    let missing = state.missing_chunks(ids).await?;
    if !missing.is_empty() {
        return Err(ApiError::missing_chunks(missing));
    }
    let path = layout::manifest_path(&digest);
    if layout::size(&*state.store, &path)
        .await
        .map_err(ApiError::store)?
        .is_some()
    {
        return Ok(StatusCode::OK);
    }
    state
        .store
        .put(&path, bytes.into())
        .await
        .map_err(ApiError::store)?;
    tracing::info!(%digest, chunks = manifest.chunks.len(), nodes = manifest.nodes.len(), "manifest stored");
    Ok(StatusCode::CREATED)
}
