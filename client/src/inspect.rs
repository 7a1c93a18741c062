//! `thaw inspect REF`: what an image holds and what it costs to store.

use crate::error::{ClientError, Result};
use crate::profile::ProfileSummary;
use crate::reference::ImageRef;
use crate::remote::Remote;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use thaw_format::{Digest, Manifest, NodeKind};

/// A summary of an image (`thaw inspect --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    pub manifest: Digest,
    pub manifest_bytes: u64,
    pub chunk_size: u32,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub other: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Bytes recorded as holes (never stored).
    pub hole_bytes: u64,
    /// Extents that refer to a chunk.
    pub chunks: u64,
    pub unique_chunks: u64,
    /// Uncompressed bytes of the unique chunks.
    pub unique_bytes: u64,
    /// Bytes of the unique chunks as stored (compressed frames).
    pub stored_bytes: u64,
    /// unique_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// The image's working-set profile, if it has one.
    pub profile: Option<ProfileSummary>,
}

/// Counts what `m` holds; `stored_bytes` is left at 0.
pub fn summarize(digest: Digest, manifest_bytes: u64, m: &Manifest) -> InspectReport {
    let mut r = InspectReport {
        manifest: digest,
        manifest_bytes,
        chunk_size: m.chunk_size,
        files: 0,
        dirs: 0,
        symlinks: 0,
        hardlinks: 0,
        other: 0,
        bytes: m.logical_bytes(),
        hole_bytes: 0,
        chunks: 0,
        unique_chunks: 0,
        unique_bytes: 0,
        stored_bytes: 0,
        compression_ratio: 0.0,
        profile: None,
    };
    for n in &m.nodes {
        match n.kind {
            NodeKind::Dir { .. } => r.dirs += 1,
            NodeKind::File { .. } => r.files += 1,
            NodeKind::Symlink { .. } => r.symlinks += 1,
            NodeKind::Hardlink { .. } => r.hardlinks += 1,
            _ => r.other += 1,
        }
    }
    for e in &m.extents {
        match e.chunk {
            Some(_) => r.chunks += 1,
            None => r.hole_bytes += e.len,
        }
    }
    let unique: HashSet<Digest> = m.chunks.iter().map(|c| c.id).collect();
    r.unique_chunks = unique.len() as u64;
    r.unique_bytes = m.chunks.iter().map(|c| u64::from(c.len)).sum();
    r
}

/// Summarizes the image `r` names, asking the server for stored sizes.
pub async fn inspect(r: &ImageRef, remote: &Remote) -> Result<InspectReport> {
    let fetched = remote.image(r).await?;
    let (digest, m, bytes) = (fetched.digest, fetched.manifest, fetched.bytes);
    let mut report = summarize(digest, bytes.len() as u64, &m);
    let sizes: Vec<u64> = futures::stream::iter(m.chunks.iter())
        .map(|c| remote.chunk_stored_len(&c.id))
        .buffer_unordered(32)
        .try_collect()
        .await?;
    report.stored_bytes = sizes.iter().sum();
    report.profile = match crate::profile::fetch(remote, &digest).await {
        Ok(p) => p.as_ref().map(ProfileSummary::of),
        Err(ClientError::Profile(e)) => {
            tracing::warn!("the image's profile is unusable: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    if report.stored_bytes > 0 {
        report.compression_ratio = report.unique_bytes as f64 / report.stored_bytes as f64;
    }
    Ok(report)
}
