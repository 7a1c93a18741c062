//! Manifest routes.
//!
//! A manifest is accepted only when it decodes, hashes to the digest in the
//! URL, and every chunk it refers to is already stored with the length it
//! gives: a stored manifest is therefore always fully readable, and a pusher
//! uploads chunks first and the manifest last. Manifests are served as
//! stored (clients check them against their digest); an upload over a stored
//! manifest that the store damaged replaces it.

use super::chunks::{ChunkState, EXISTS_CONCURRENCY};
use crate::error::ApiError;
use crate::http::{blocking, immutable, immutable_head, parse_digest, Param, RawBody};
use crate::state::{AppState, Shared};
use crate::{gc, layout};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use futures::{stream, StreamExt};
use std::collections::HashSet;
use thaw_format::{Manifest, ManifestError};

/// Most missing chunks a refused manifest upload lists (`docs/api.md`).
const MISSING_LISTED_MAX: usize = 1000;

impl AppState {
    /// Checks that every chunk of `manifest` is stored, with the length the
    /// manifest gives it. Missing chunks are listed in chunk-table order, up
    /// to [`MISSING_LISTED_MAX`]; the check stops there, since the upload is
    /// refused anyway.
    async fn check_chunks(&self, manifest: &Manifest) -> Result<(), ApiError> {
        let chunks = &manifest.chunks;
        let mut seen = HashSet::new();
        // Owned items: closures over borrowed ones trip the `Send` check of
        // the handler's future.
        let unique = (0..chunks.len())
            .filter(move |&i| seen.insert(chunks[i].id))
            .map(|i| chunks[i]);
        let mut states = stream::iter(unique)
            .map(|chunk| async move { (chunk, self.chunk_state(&chunk).await) })
            .buffered(EXISTS_CONCURRENCY);
        let mut missing = Vec::new();
        while let Some((chunk, state)) = states.next().await {
            match state? {
                ChunkState::Stored => {}
                ChunkState::Missing if missing.len() == MISSING_LISTED_MAX => {
                    return Err(ApiError::missing_chunks(missing, true))
                }
                ChunkState::Missing => missing.push(chunk.id),
                ChunkState::OtherLength(stored) => {
                    let msg = format!(
                        "chunk {} is {} bytes in the manifest but {stored} bytes as stored: fix the manifest",
                        chunk.id, chunk.len
                    );
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_manifest", msg));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ApiError::missing_chunks(missing, false))
        }
    }
}

pub(super) async fn get(
    State(state): State<Shared>,
    Param(raw): Param<String>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&raw)?;
    let path = layout::manifest_path(&digest);
    let bytes = state.read_for_response(&path).await?;
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
    RawBody(bytes, _room): RawBody,
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
    state.check_chunks(&manifest).await?;
    let path = layout::manifest_path(&digest);
    // The uploaded bytes hash to the name, so stored bytes that differ from
    // them do not: they were damaged in the store, and are replaced.
    let mut created = true;
    match layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?
    {
        Some(stored) if stored == bytes => created = false,
        Some(_) => state.quarantine(&path, "does not hash to its name").await?,
        None => {}
    }
    if created {
        state
            .store
            .put(&path, bytes.into())
            .await
            .map_err(ApiError::store)?;
    }
    // A collection running now may have moved what this manifest names to
    // its trash since the check above: bring it back (`gc`).
    let back = gc::bring_back_if_running(&*state.store, &digest).await;
    if let Some(back) = back.map_err(ApiError::store)? {
        if !back.missing.is_empty() {
            if created {
                let _ = state.store.delete(&path).await;
            }
            return Err(ApiError::missing_chunks(back.missing, false));
        }
    }
    if !created {
        return Ok(StatusCode::OK);
    }
    tracing::info!(%digest, chunks = manifest.chunks.len(), nodes = manifest.nodes.len(), "manifest stored");
    Ok(StatusCode::CREATED)
}
