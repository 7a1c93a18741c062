//! Tag routes: mutable names for manifests (`python/3.12` -> `blake3:...`).
//!
//! A tag is one small object holding the manifest digest as text, so moving a
//! tag is one atomic put and listing an image's tags is one prefix listing.
//! Tags may only point at stored manifests.

use crate::error::ApiError;
use crate::http::{parse_digest, Param, RawBody};
use crate::state::Shared;
use crate::{gc, layout};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{stream, StreamExt, TryStreamExt};
use thaw_format::Digest;

/// Tag objects read at once while listing.
const LIST_CONCURRENCY: usize = 32;

fn check_name(kind: &str, s: &str) -> Result<(), ApiError> {
    if layout::valid_name(s) {
        return Ok(());
    }
    let shown: String = s.chars().take(80).collect();
    let msg = format!(
        "bad {kind} {shown:?}: use 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
    );
    Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_name", msg))
}

pub(super) async fn put(
    State(state): State<Shared>,
    Param((name, tag)): Param<(String, String)>,
    RawBody(body, _room): RawBody,
) -> Result<StatusCode, ApiError> {
    check_name("name", &name)?;
    check_name("tag", &tag)?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad_id("<not UTF-8>"))?;
    let digest = parse_digest(text.trim())?;
    let manifest = layout::manifest_path(&digest);
    if layout::size(&*state.store, &manifest)
        .await
        .map_err(ApiError::store)?
        .is_none()
    {
        let msg = format!("manifest {digest} is not stored: push it before tagging it");
        return Err(ApiError::new(StatusCode::CONFLICT, "unknown_manifest", msg));
    }
    // History first: a version a garbage collection keeps (`--keep`) is
    // never one the tag did not reach.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    state
        .store
        .put(
            &layout::tag_history_path(&name, &tag, at),
            digest.to_string().into(),
        )
        .await
        .map_err(ApiError::store)?;
    let path = layout::tag_path(&name, &tag);
    let before = layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?;
    state
        .store
        .put(&path, digest.to_string().into())
        .await
        .map_err(ApiError::store)?;
    // A collection running now may have moved the manifest, or chunks it
    // names, to its trash since the check above: bring them back, or undo.
    let back = gc::bring_back_if_running(&*state.store, &digest).await;
    if let Some(back) = back.map_err(ApiError::store)? {
        if !back.manifest || !back.missing.is_empty() {
            let undone = match before {
                Some(old) => state.store.put(&path, old.into()).await.map(drop),
                None => state.store.delete(&path).await,
            };
            undone.map_err(ApiError::store)?;
            let msg = format!("manifest {digest} was collected while it was tagged: push it again");
            return Err(ApiError::new(StatusCode::CONFLICT, "unknown_manifest", msg));
        }
    }
    tracing::info!(%name, %tag, %digest, "tag set");
    Ok(StatusCode::OK)
}

pub(super) async fn get(
    State(state): State<Shared>,
    Param((name, tag)): Param<(String, String)>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    check_name("tag", &tag)?;
    let path = layout::tag_path(&name, &tag);
    let bytes = layout::get(&*state.store, &path)
        .await
        .map_err(ApiError::store)?;
    let bytes = bytes.ok_or_else(|| ApiError::not_found(format!("tag {name}/{tag}")))?;
    let digest = layout::parse_tag_object(&bytes)
        .ok_or_else(|| ApiError::internal(format!("tag object {path} does not hold a digest")))?;
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    Ok((headers, digest.to_string()).into_response())
}

#[derive(serde::Serialize)]
pub(super) struct TagList {
    name: String,
    tags: Vec<TagEntry>,
}

#[derive(serde::Serialize)]
struct TagEntry {
    tag: String,
    manifest: Digest,
}

pub(super) async fn list(
    State(state): State<Shared>,
    Param(name): Param<String>,
) -> Result<Json<TagList>, ApiError> {
    check_name("name", &name)?;
    let objects: Vec<_> = state
        .store
        .list(Some(&layout::tag_prefix(&name)))
        .try_collect()
        .await
        .map_err(ApiError::store)?;
    // Only `tags/<name>/<tag>` objects with valid tag names are tags.
    let tags = objects.into_iter().filter_map(|meta| {
        let parts: Vec<_> = meta.location.parts().collect();
        let tag = parts.get(2)?.as_ref().to_owned();
        (parts.len() == 3 && layout::valid_name(&tag)).then_some((tag, meta.location))
    });
    let store = &*state.store;
    let mut tags: Vec<TagEntry> = stream::iter(tags)
        .map(|(tag, path)| async move {
            let bytes = layout::get(store, &path).await?;
            Ok::<_, object_store::Error>(
                bytes
                    .and_then(|b| layout::parse_tag_object(&b))
                    .map(|manifest| TagEntry { tag, manifest }),
            )
        })
        .buffered(LIST_CONCURRENCY)
        .try_filter_map(|entry| async move { Ok(entry) })
        .try_collect()
        .await
        .map_err(ApiError::store)?;
    tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    Ok(Json(TagList { name, tags }))
}
