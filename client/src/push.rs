//! `thaw push DIR REF`: turn a directory into an image on a chunk server.
//!
//! 1. Walk the tree breadth-first without following symlinks ([`walk`]).
//! 2. Cut files into units and hash them on all cores ([`plan`]); all-zero
//!    chunks become holes, small files share packed chunks.
//! 3. Ask the server which chunks it lacks, in batches.
//! 4. Read each missing chunk again, check it still has its digest (a file that
//!    changed fails the push instead of recording torn data), compress on all
//!    cores and upload with bounded concurrency and retries.
//! 5. Upload the manifest (the server refuses it unless every chunk is stored),
//!    then set the tag. The tag moves last, so an interrupted push leaves the
//!    old tag and a usable store.

mod plan;
mod walk;

use crate::error::{ClientError, Result};
use crate::reference::ImageRef;
use crate::remote::Remote;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use thaw_format::{frame, Chunking, Digest, Manifest, NodeKind};

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub chunking: Chunking,
    /// zstd level for chunk frames.
    pub level: i32,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Show progress bars (on a terminal).
    pub progress: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            chunking: Chunking::default(),
            level: 3,
            concurrency: 16,
            progress: false,
        }
    }
}

/// What a push did (`thaw push --json` prints this).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub manifest: Digest,
    /// Regular files (hardlinks count once).
    pub files: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Unique chunks the image refers to.
    pub chunks: u64,
    pub chunks_uploaded: u64,
    /// Frame bytes sent.
    pub bytes_uploaded: u64,
    pub manifest_bytes: u64,
    pub hash_seconds: f64,
    pub upload_seconds: f64,
    pub seconds: f64,
}

fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Builds the image of `dir` without uploading anything: the manifest and,
/// for each chunk, where its bytes are.
fn build(
    dir: &Path,
    opts: &PushOptions,
    show: bool,
) -> Result<(Manifest, walk::Walked, plan::Plan, plan::Assembled)> {
    let mut w = walk::walk(dir)?;
    let p = plan::plan(&w, &opts.chunking);
    let total: u64 = w
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, NodeKind::File { .. }))
        .map(|n| n.size)
        .sum();
    let pb = bar(show, total, "hashing");
    let pieces = plan::hash_all(&w, &p, &opts.chunking, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    let (assembled, extents) = plan::assemble(&mut w, &p, &pieces);
    let manifest = Manifest {
        chunk_size: opts.chunking.chunk_size(),
        chunks: assembled.chunks.clone(),
        nodes: w.nodes.clone(),
        extents,
        xattrs: w.xattrs.clone(),
    };
    manifest.validate()?;
    Ok((manifest, w, p, assembled))
}

/// Pushes `dir` to the server and repository `r` names, and tags it.
pub async fn push(
    dir: &Path,
    r: &ImageRef,
    remote: &Remote,
    opts: &PushOptions,
) -> Result<PushReport> {
    let tag = r
        .tag()
        .ok_or_else(|| ClientError::Usage("push needs a NAME:TAG reference".into()))?
        .to_owned();
    let started = Instant::now();
    let (dir, o) = (dir.to_path_buf(), opts.clone());
    let (manifest, w, p, assembled) =
        tokio::task::spawn_blocking(move || build(&dir, &o, o.progress))
            .await
            .expect("hashing task panicked")?;
    let hash_seconds = started.elapsed().as_secs_f64();

    let ids: Vec<Digest> = manifest.chunks.iter().map(|c| c.id).collect();
    let missing: std::collections::HashSet<Digest> =
        remote.missing(&ids).await?.into_iter().collect();
    let todo: Vec<usize> = (0..ids.len())
        .filter(|&i| missing.contains(&ids[i]))
        .collect();

    let upload_started = Instant::now();
    let todo_bytes = todo
        .iter()
        .map(|&i| u64::from(manifest.chunks[i].len))
        .sum();
    let pb = bar(opts.progress, todo_bytes, "uploading");
    let sent = Arc::new(AtomicU64::new(0));
    let ctx = Arc::new((w, p, assembled));
    let cpu = Arc::new(tokio::sync::Semaphore::new(
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    ));
    futures::stream::iter(todo.iter().copied())
        .map(|i| {
            let (ctx, cpu, sent, pb) = (ctx.clone(), cpu.clone(), sent.clone(), pb.clone());
            let level = opts.level;
            async move {
                let permit = cpu.acquire_owned().await.expect("semaphore open");
                let (id, len) = (ctx.2.chunks[i].id, u64::from(ctx.2.chunks[i].len));
                let frame = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let (w, p, a) = &*ctx;
                    let (unit, piece) = &a.sources[i];
                    let data = plan::read_unit(w, &p.units[*unit], piece.offset, piece.len)?;
                    if Digest::of(&data) != id {
                        return Err(changed(w, &p.units[*unit]));
                    }
                    Ok(Bytes::from(frame::encode(&data, level)))
                })
                .await
                .expect("compression task panicked")?;
                let frame_len = frame.len() as u64;
                remote.put_chunk(&id, frame).await?;
                sent.fetch_add(frame_len, Ordering::Relaxed);
                pb.inc(len);
                Ok::<_, ClientError>(())
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<()>()
        .await?;
    pb.finish_and_clear();

    let bytes = Bytes::from(manifest.encode());
    let digest = Digest::of(&bytes);
    remote.put_manifest(&digest, bytes.clone()).await?;
    remote.put_tag(&r.name, &tag, &digest).await?;
    Ok(PushReport {
        manifest: digest,
        files: manifest
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeKind::File { .. }))
            .count() as u64,
        bytes: manifest.logical_bytes(),
        chunks: ids.len() as u64,
        chunks_uploaded: todo.len() as u64,
        bytes_uploaded: sent.load(Ordering::Relaxed),
        manifest_bytes: bytes.len() as u64,
        hash_seconds,
        upload_seconds: upload_started.elapsed().as_secs_f64(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The error for a unit whose bytes no longer hash as they did.
fn changed(w: &walk::Walked, unit: &plan::Unit) -> ClientError {
    let file = match unit {
        plan::Unit::Range { file, .. } | plan::Unit::Cdc { file } => *file,
        plan::Unit::Pack { files } => files[0].0,
    };
    ClientError::Changed {
        path: w.paths[file as usize].clone(),
    }
}

/// Builds the manifest of `dir` locally, without a server (for tests and `--dry-run`).
pub fn manifest_of(dir: &Path, opts: &PushOptions) -> Result<Manifest> {
    build(dir, opts, false).map(|(m, ..)| m)
}
