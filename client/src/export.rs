//! `thaw export REF DIR`: the full pull. Downloads a whole image and recreates
//! the tree exactly: contents (holes stay sparse), modes, ownership when run as
//! root, symlinks, hardlinks, device nodes, fifos, xattrs and mtimes.
//!
//! The tree is created first (directories writable until the end), then chunks
//! are fetched in batches with bounded concurrency, verified, and written with
//! positioned writes to every place that uses them; metadata is applied last,
//! deepest first, so directory mtimes survive their children being written.
//!
//! By default an export trusts the image as a build pipeline's own output:
//! as root it recreates device nodes, setuid and setgid bits, ownership and
//! every xattr (`security.capability` included), as `tar` does as root. With
//! [`ExportOptions::safe`] (`thaw export --safe`), for images from elsewhere, it
//! creates no device nodes, clears setuid and setgid bits, keeps the exporting
//! user as owner, and sets only `user.*` xattrs; what it skipped is counted.

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
    /// Entries or attributes left out by a safe export.
    pub skipped: u64,
    pub seconds: f64,
}

/// How to export.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// Batch reads in flight at once.
    pub concurrency: usize,
    /// Do not trust the image's devices, setuid/setgid bits, ownership and
    /// non-`user.*` xattrs (see the module docs).
    pub safe: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            concurrency: 8,
            safe: false,
        }
    }
}

/// Uncompressed bytes one batch read asks for at most.
const BATCH_BYTES: u64 = 32 << 20;

/// Exports the image `r` names into `dest`, which must not exist or be empty.
pub async fn export(
    r: &ImageRef,
    remote: &Remote,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let started = Instant::now();
    let fetched = remote.image(r).await?;
    let (digest, m) = (fetched.digest, fetched.manifest);
    prepare_dest(dest)?;
    let mut skipped = create_tree(&m, dest, opts.safe)?;

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
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<()>()
        .await?;
    skipped += apply_metadata(&m, dest, opts.safe)?;
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
        skipped,
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

/// Creates every entry; regular files get their final size (holes stay
/// sparse). A safe export creates no device nodes. Returns how many were left out.
fn create_tree(m: &Manifest, dest: &Path, safe: bool) -> Result<u64> {
    let device = |n: &thaw_format::Node| {
        matches!(n.kind, NodeKind::CharDev { .. } | NodeKind::BlockDev { .. })
    };
    let mut skipped = 0;
    for (i, n) in m.nodes.iter().enumerate().skip(1) {
        if safe && device(n) {
            tracing::warn!(path = %String::from_utf8_lossy(&m.path(i as u32)), "safe export: device node left out");
            skipped += 1;
            continue;
        }
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
            if safe && device(&m.nodes[target as usize]) {
                skipped += 1;
                continue;
            }
            let path = node_path(m, dest, i as u32);
            std::fs::hard_link(node_path(m, dest, target), &path)
                .map_err(|e| ClientError::io(&path, e))?;
        }
    }
    Ok(skipped)
}

/// Ownership (as root), modes, xattrs and mtimes, deepest entries first; a
/// safe export keeps the owner, clears setuid and setgid, and sets only
/// `user.*` xattrs. Returns how many attributes were left out.
fn apply_metadata(m: &Manifest, dest: &Path, safe: bool) -> Result<u64> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut skipped = 0;
    for (i, n) in m.nodes.iter().enumerate().rev() {
        if matches!(n.kind, NodeKind::Hardlink { .. }) {
            continue; // same inode as its target
        }
        let path = node_path(m, dest, i as u32);
        if std::fs::symlink_metadata(&path).is_err() {
            continue; // left out by a safe export
        }
        let io = |e| ClientError::io(&path, e);
        let symlink = matches!(n.kind, NodeKind::Symlink { .. });
        if root && !safe {
            std::os::unix::fs::lchown(&path, Some(n.uid), Some(n.gid)).map_err(io)?;
        }
        let privileged = libc::S_ISUID | libc::S_ISGID;
        let mode = if safe {
            n.mode & 0o7777 & !privileged
        } else {
            n.mode & 0o7777
        };
        skipped += u64::from(mode != n.mode & 0o7777);
        if !symlink {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        }
        // After chown and chmod: chown clears security.capability.
        for x in &m.xattrs[n.xattrs.start as usize..n.xattrs.end as usize] {
            if safe && !x.name.starts_with(b"user.") {
                skipped += 1;
                continue;
            }
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
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// As root: a device node, a setuid-root file and a capability xattr.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_safe_export_does_not_trust_the_image() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root (to make device nodes); the test suite runs as root");
        }
        let src = tempfile::tempdir().unwrap();
        let dev = src.path().join("mem");
        mknod(&dev, libc::S_IFCHR | 0o666, libc::makedev(1, 1)).unwrap();
        std::os::unix::fs::symlink("mem", src.path().join("link")).unwrap();
        let suid = src.path().join("su");
        std::fs::write(&suid, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        // cap_net_raw, in the VFS v2 layout.
        let cap = [
            0u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        xattr::set(&suid, "security.capability", &cap).unwrap();
        xattr::set(&suid, "user.note", b"kept").unwrap();
        let server = crate::testing::TestServer::start().await;
        let (r, remote) = server.image("untrusted:v1");
        crate::push::push(src.path(), &r, &remote, &Default::default())
            .await
            .unwrap();

        let trusted = tempfile::tempdir().unwrap();
        let t = trusted.path().join("out");
        export(&r, &remote, &t, &ExportOptions::default())
            .await
            .unwrap();
        assert!(std::fs::symlink_metadata(t.join("mem"))
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(
            std::fs::metadata(t.join("su")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert!(xattr::get(t.join("su"), "security.capability")
            .unwrap()
            .is_some());

        let safe = tempfile::tempdir().unwrap();
        let s = safe.path().join("out");
        let opts = ExportOptions {
            safe: true,
            ..ExportOptions::default()
        };
        let report = export(&r, &remote, &s, &opts).await.unwrap();
        assert!(
            std::fs::symlink_metadata(s.join("mem")).is_err(),
            "no device node"
        );
        assert_eq!(
            std::fs::metadata(s.join("su")).unwrap().mode() & 0o7777,
            0o755
        );
        assert!(xattr::get(s.join("su"), "security.capability")
            .unwrap()
            .is_none());
        assert_eq!(
            xattr::get(s.join("su"), "user.note").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        assert!(
            std::fs::read_link(s.join("link")).is_ok(),
            "a symlink is harmless"
        );
        assert_eq!(
            report.skipped, 3,
            "the device, the setuid bit, the capability"
        );
    }
}
