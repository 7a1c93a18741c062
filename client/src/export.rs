//! `thaw export REF DIR`: the full pull. Downloads a whole image and recreates
//! the tree exactly: contents (holes stay sparse), modes, ownership when run as
//! root, symlinks, hardlinks, device nodes, fifos, xattrs and mtimes.
//!
//! The tree is created first (directories writable until the end), then chunks
//! are fetched in batches with bounded concurrency, verified, and written with
//! positioned writes to every place that uses them; metadata is applied last,
//! deepest first, so directory mtimes survive their children being written.

use crate::error::{ClientError, Result};
use crate::reference::ImageRef;
use crate::remote::{Remote, READ_BATCH};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;
use thaw_format::{frame, ChunkRef, Digest, Manifest, NodeKind};

/// What an export did (`thaw export --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub manifest: Digest,
    pub files: u64,
    pub bytes: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub seconds: f64,
}

/// Uncompressed bytes one batch read asks for at most.
const BATCH_BYTES: u64 = 32 << 20;

/// Exports the image `r` names into `dest`, which must not exist or be empty.
pub async fn export(
    r: &ImageRef,
    remote: &Remote,
    dest: &Path,
    concurrency: usize,
) -> Result<ExportReport> {
    let started = Instant::now();
    let fetched = remote.image(r).await?;
    let (digest, m) = (fetched.digest, fetched.manifest);
    prepare_dest(dest)?;
    create_tree(&m, dest)?;

    let uses = chunk_uses(&m);
    let fetched = std::sync::atomic::AtomicU64::new(0);
    let (m_ref, uses_ref, fetched_ref) = (&m, &uses, &fetched);
    futures::stream::iter(batches(&m, &uses))
        .map(|batch| async move {
            let ids: Vec<Digest> = batch.iter().map(|&c| m_ref.chunks[c as usize].id).collect();
            let frames_max = batch
                .iter()
                .map(|&c| frame::max_frame_len(m_ref.chunks[c as usize].len as usize))
                .sum();
            let frames = remote.chunks(&ids, frames_max).await?;
            for (c, frame) in batch.iter().zip(frames) {
                let frame = frame.ok_or_else(|| ClientError::NotFound {
                    what: format!("chunk {}", m_ref.chunks[*c as usize].id),
                })?;
                fetched_ref.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
                write_chunk(m_ref, *c, &frame, &uses_ref[c], dest)?;
            }
            Ok::<_, ClientError>(())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await?;
    apply_metadata(&m, dest)?;
    Ok(ExportReport {
        manifest: digest,
        files: m
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeKind::File { .. }))
            .count() as u64,
        bytes: m.logical_bytes(),
        chunks_fetched: uses.len() as u64,
        bytes_fetched: fetched.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Chunk indices in batches of at most [`READ_BATCH`] ids and [`BATCH_BYTES`] bytes.
fn batches(m: &Manifest, uses: &HashMap<u32, Vec<ChunkUse>>) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = uses.keys().copied().collect();
    order.sort_unstable();
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut size = 0;
    for c in order {
        let len = u64::from(m.chunks[c as usize].len);
        match batches.last_mut() {
            Some(b) if b.len() < READ_BATCH && size + len <= BATCH_BYTES => b.push(c),
            _ => {
                batches.push(vec![c]);
                size = 0;
            }
        }
        size += len;
    }
    batches
}

/// Verifies chunk `c`'s frame and writes its bytes everywhere they are used.
fn write_chunk(m: &Manifest, c: u32, frame: &[u8], uses: &[ChunkUse], dest: &Path) -> Result<()> {
    let ChunkRef { id, len } = m.chunks[c as usize];
    let data =
        frame::decode_verified(frame, &id).map_err(|e| ClientError::Frame { id, source: e })?;
    if data.len() != len as usize {
        return Err(ClientError::ChunkLength {
            id,
            expected: len,
            actual: data.len(),
        });
    }
    for u in uses {
        let path = dest.join(OsStr::from_bytes(&m.path(u.file)));
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ClientError::io(&path, e))?;
        // Validation keeps extents inside their chunks; checked again, never a panic.
        let bytes = data
            .get(u.chunk_offset as usize..)
            .and_then(|d| d.get(..u.len as usize))
            .ok_or(ClientError::ChunkLength {
                id,
                expected: u.chunk_offset.saturating_add(u.len as u32),
                actual: data.len(),
            })?;
        f.write_all_at(bytes, u.file_offset)
            .map_err(|e| ClientError::io(&path, e))?;
    }
    Ok(())
}

/// Where one extent of a chunk goes: `len` bytes from `chunk_offset` of the
/// chunk to `file_offset` of node `file`.
struct ChunkUse {
    file: u32,
    file_offset: u64,
    chunk_offset: u32,
    len: u64,
}

/// Every place each chunk's bytes go, by chunk index.
fn chunk_uses(m: &Manifest) -> HashMap<u32, Vec<ChunkUse>> {
    let mut uses: HashMap<u32, Vec<ChunkUse>> = HashMap::new();
    for (i, n) in m.nodes.iter().enumerate() {
        if let NodeKind::File { extents } = &n.kind {
            let mut at = 0;
            for e in &m.extents[extents.start as usize..extents.end as usize] {
                if let Some(c) = e.chunk {
                    uses.entry(c).or_default().push(ChunkUse {
                        file: i as u32,
                        file_offset: at,
                        chunk_offset: e.offset,
                        len: e.len,
                    });
                }
                at += e.len;
            }
        }
    }
    uses
}

fn prepare_dest(dest: &Path) -> Result<()> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(ClientError::NotEmpty(dest.to_path_buf())),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(|e| ClientError::io(dest, e))
        }
        Err(e) => Err(ClientError::io(dest, e)),
    }
}

fn node_path(m: &Manifest, dest: &Path, i: u32) -> PathBuf {
    if i == thaw_format::ROOT {
        return dest.to_path_buf();
    }
    dest.join(OsStr::from_bytes(&m.path(i)))
}

fn mknod(path: &Path, mode: u32, rdev: u64) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates every entry; regular files get their final size (holes stay sparse).
fn create_tree(m: &Manifest, dest: &Path) -> Result<()> {
    for (i, n) in m.nodes.iter().enumerate().skip(1) {
        let path = node_path(m, dest, i as u32);
        let io = |e| ClientError::io(&path, e);
        match &n.kind {
            NodeKind::Dir { .. } => std::fs::create_dir(&path).map_err(io)?,
            NodeKind::File { .. } => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                f.set_len(n.size).map_err(io)?;
            }
            NodeKind::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path).map_err(io)?
            }
            NodeKind::Hardlink { .. } => {} // after every file exists
            NodeKind::CharDev { rdev } | NodeKind::BlockDev { rdev } => {
                mknod(&path, n.mode, *rdev).map_err(io)?
            }
            NodeKind::Fifo | NodeKind::Socket => mknod(&path, n.mode, 0).map_err(io)?,
        }
    }
    for (i, n) in m.nodes.iter().enumerate() {
        if let NodeKind::Hardlink { target } = n.kind {
            let path = node_path(m, dest, i as u32);
            std::fs::hard_link(node_path(m, dest, target), &path)
                .map_err(|e| ClientError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Ownership (as root), modes, xattrs and mtimes, deepest entries first.
fn apply_metadata(m: &Manifest, dest: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for (i, n) in m.nodes.iter().enumerate().rev() {
        if matches!(n.kind, NodeKind::Hardlink { .. }) {
            continue; // same inode as its target
        }
        let path = node_path(m, dest, i as u32);
        let io = |e| ClientError::io(&path, e);
        let symlink = matches!(n.kind, NodeKind::Symlink { .. });
        if root {
            std::os::unix::fs::lchown(&path, Some(n.uid), Some(n.gid)).map_err(io)?;
        }
        if !symlink {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(n.mode & 0o7777))
                .map_err(io)?;
        }
        // After chown and chmod: chown clears security.capability.
        for x in &m.xattrs[n.xattrs.start as usize..n.xattrs.end as usize] {
            if let Err(e) = xattr::set(&path, OsStr::from_bytes(&x.name), &x.value) {
                tracing::warn!(path = %path.display(), name = %String::from_utf8_lossy(&x.name), "cannot set xattr: {e}");
            }
        }
        let t = filetime::FileTime::from_unix_time(
            n.mtime_ns.div_euclid(1_000_000_000),
            n.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        filetime::set_symlink_file_times(&path, t, t).map_err(io)?;
    }
    Ok(())
}
