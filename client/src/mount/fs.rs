//! The filesystem logic of a mounted image, free of any transport.
//!
//! Inode numbers are node indices plus one (FUSE's root is inode 1), with a
//! hardlink answering as the file it names, so both names are one inode.
//! Metadata comes straight from the manifest; reads map a byte range onto
//! extents, fetch the chunks it touches concurrently, and copy the bytes out.
//! Holes read as zeros without a fetch. The FUSE adapter (and later the
//! virtio-fs backend) only translates calls and replies.

use super::fetch::{FetchError, Fetcher, Priority};
use super::stats::Stats;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use thaw_format::{Manifest, Node, NodeKind, ROOT};

/// Errors of filesystem operations; the adapter maps them to errno in one place.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("no such attribute")]
    NoXattr,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

pub type FsResult<T> = Result<T, FsError>;

/// Attributes of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks of data (holes excluded).
    pub blocks: u64,
    /// Full `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub mtime_ns: i64,
}

/// Per-file sequential read detection for readahead.
#[derive(Debug, Clone, Copy, Default)]
struct ReadState {
    /// Where the next read starts if the reader is sequential.
    next: u64,
    /// Bytes read back to back so far.
    run: u64,
}

/// A directory entry as listed.
#[derive(Debug, Clone, Copy)]
pub struct DirEntry<'a> {
    /// The offset to resume listing after this entry.
    pub next_offset: i64,
    pub ino: u64,
    pub mode: u32,
    pub name: &'a [u8],
}

/// A mounted image.
pub struct ImageFs {
    m: Arc<Manifest>,
    nlink: Vec<u32>,
    blocks: Vec<u64>,
    /// File offset of each extent (parallel to `m.extents`).
    extent_starts: Vec<u64>,
    fetcher: Arc<Fetcher>,
    pub stats: Arc<Stats>,
    readahead: Mutex<HashMap<u32, ReadState>>,
    readahead_max: u64,
    /// Chunks that hold packed small files (see [`ImageFs::on_miss`]).
    packed: Vec<bool>,
}

/// A file with at most this many chunks is fetched whole on its first miss.
const SMALL_FILE_CHUNKS: u32 = 8;

impl ImageFs {
    pub fn new(
        m: Arc<Manifest>,
        fetcher: Arc<Fetcher>,
        stats: Arc<Stats>,
        readahead_max: u64,
    ) -> ImageFs {
        let n = m.nodes.len();
        let mut nlink = vec![1u32; n];
        let mut blocks = vec![0u64; n];
        let mut extent_starts = vec![0u64; m.extents.len()];
        let mut packed = vec![false; m.chunks.len()];
        for (i, node) in m.nodes.iter().enumerate() {
            match &node.kind {
                NodeKind::Dir { children } => {
                    let subdirs = m.nodes[children.start as usize..children.end as usize]
                        .iter()
                        .filter(|c| c.is_dir())
                        .count();
                    nlink[i] = 2 + subdirs as u32;
                }
                NodeKind::Hardlink { target } => nlink[*target as usize] += 1,
                NodeKind::File { extents } => {
                    let mut at = 0;
                    for e in extents.start..extents.end {
                        extent_starts[e as usize] = at;
                        let ext = &m.extents[e as usize];
                        at += ext.len;
                        if let Some(c) = ext.chunk {
                            blocks[i] += ext.len.div_ceil(512);
                            if node.size < u64::from(m.chunk_size / 8) {
                                packed[c as usize] = true;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        ImageFs {
            m,
            nlink,
            blocks,
            extent_starts,
            fetcher,
            stats,
            readahead: Mutex::new(HashMap::new()),
            readahead_max,
            packed,
        }
    }

    /// What a cold miss of `chunk` in `file` says about what comes next, at
    /// startup: a small file (a shared library, a config) is usually read
    /// whole, so all its chunks are fetched at once instead of one fault at a
    /// time; a pack of small files is usually followed by the next pack (the
    /// next modules of the same package, in tree order).
    fn on_miss(&self, file: u32, chunk: u32) {
        if self.readahead_max == 0 {
            return;
        }
        if self.packed[chunk as usize] {
            if let Some(true) = self.packed.get(chunk as usize + 1) {
                self.fetcher.prefetch(chunk + 1);
            }
            return;
        }
        let extents = self.m.file_extents(file);
        let chunks = extents.iter().filter(|e| e.chunk.is_some()).count() as u32;
        if chunks > 1 && chunks <= SMALL_FILE_CHUNKS {
            for c in extents.iter().filter_map(|e| e.chunk) {
                if c != chunk {
                    self.fetcher.prefetch(c);
                }
            }
        }
    }

    /// Waits for background disk cache writes (call before exiting).
    pub fn flush(&self) {
        self.fetcher.flush(std::time::Duration::from_secs(10));
    }

    pub fn manifest(&self) -> &Manifest {
        &self.m
    }

    fn node(&self, ino: u64) -> FsResult<(u32, &Node)> {
        let i = ino
            .checked_sub(1)
            .filter(|&i| i < self.m.nodes.len() as u64)
            .ok_or(FsError::NotFound)? as u32;
        let i = self.m.resolve(i);
        Ok((i, &self.m.nodes[i as usize]))
    }

    fn attr_of(&self, i: u32) -> Attr {
        let i = self.m.resolve(i);
        let n = &self.m.nodes[i as usize];
        let rdev = match n.kind {
            NodeKind::CharDev { rdev } | NodeKind::BlockDev { rdev } => rdev,
            _ => 0,
        };
        Attr {
            ino: u64::from(i) + 1,
            size: n.size,
            blocks: self.blocks[i as usize],
            mode: n.mode,
            nlink: self.nlink[i as usize],
            uid: n.uid,
            gid: n.gid,
            rdev,
            mtime_ns: n.mtime_ns,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let (i, _) = self.node(ino)?;
        Ok(self.attr_of(i))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let (p, node) = self.node(parent)?;
        if !node.is_dir() {
            return Err(FsError::NotDir);
        }
        let i = self.m.lookup(p, name).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(i))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<&[u8]> {
        match &self.node(ino)?.1.kind {
            NodeKind::Symlink { target } => Ok(target),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// Entries of a directory from `offset` on: `.`, `..`, then the children.
    pub fn readdir(&self, ino: u64, offset: i64) -> FsResult<Vec<DirEntry<'_>>> {
        let (i, node) = self.node(ino)?;
        let NodeKind::Dir { children } = &node.kind else {
            return Err(FsError::NotDir);
        };
        let parent = if i == ROOT {
            ino
        } else {
            u64::from(node.parent) + 1
        };
        let mut out = Vec::new();
        let dir_mode = libc::S_IFDIR;
        if offset < 1 {
            out.push(DirEntry {
                next_offset: 1,
                ino,
                mode: dir_mode,
                name: b".",
            });
        }
        if offset < 2 {
            out.push(DirEntry {
                next_offset: 2,
                ino: parent,
                mode: dir_mode,
                name: b"..",
            });
        }
        let skip = (offset.max(2) - 2) as usize;
        for (k, c) in (children.start..children.end).enumerate().skip(skip) {
            let a = self.attr_of(c);
            out.push(DirEntry {
                next_offset: k as i64 + 3,
                ino: a.ino,
                mode: a.mode,
                name: &self.m.nodes[c as usize].name,
            });
        }
        Ok(out)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<&[u8]> {
        let (_, node) = self.node(ino)?;
        self.m.xattrs[node.xattrs.start as usize..node.xattrs.end as usize]
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.value.as_slice())
            .ok_or(FsError::NoXattr)
    }

    /// xattr names, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (_, node) = self.node(ino)?;
        let mut out = Vec::new();
        for x in &self.m.xattrs[node.xattrs.start as usize..node.xattrs.end as usize] {
            out.extend_from_slice(&x.name);
            out.push(0);
        }
        Ok(out)
    }

    /// (total data bytes, inode count) for statfs.
    pub fn totals(&self) -> (u64, u64) {
        (self.m.logical_bytes(), self.m.nodes.len() as u64)
    }

    /// Reads up to `size` bytes at `offset` of file `ino`.
    /// A read inside one chunk returns a slice of the cached chunk, without a copy.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let (i, node) = self.node(ino)?;
        let NodeKind::File { extents } = &node.kind else {
            return Ok(Bytes::new());
        };
        let end = offset.saturating_add(u64::from(size)).min(node.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        Stats::inc(&self.stats.reads);
        Stats::add(&self.stats.read_bytes, end - offset);
        let range = extents.start as usize..extents.end as usize;
        let starts = &self.extent_starts[range.clone()];
        let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        // (position in output, extent, offset within extent, length)
        let mut pieces = Vec::new();
        let mut at = offset;
        let mut e = range.start + first;
        while at < end && e < range.end {
            let ext = &self.m.extents[e];
            let s = self.extent_starts[e];
            let len = (s + ext.len).min(end) - at;
            pieces.push(((at - offset) as usize, *ext, at - s, len));
            at += len;
            e += 1;
        }
        // Readahead starts before this read waits, so the two overlap.
        self.readahead(i, offset, end);
        let mut wanted: Vec<u32> = pieces.iter().filter_map(|p| p.1.chunk).collect();
        wanted.dedup();
        for &c in &wanted {
            if !self.fetcher.is_resident_or_pending(c) {
                self.on_miss(i, c);
            }
        }
        let got = futures::future::try_join_all(
            wanted
                .iter()
                .map(|&c| self.fetcher.get(c, Priority::Demand)),
        )
        .await?;
        if let [(_, ext, within, len)] = pieces[..] {
            if ext.chunk.is_some() {
                let from = (u64::from(ext.offset) + within) as usize;
                return Ok(got[0].slice(from..from + len as usize));
            }
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for (pos, ext, within, len) in pieces {
            if let Some(c) = ext.chunk {
                let data = &got[wanted.iter().position(|&w| w == c).expect("fetched")];
                let from = u64::from(ext.offset) + within;
                out[pos..pos + len as usize]
                    .copy_from_slice(&data[from as usize..(from + len) as usize]);
            }
        }
        Ok(Bytes::from(out))
    }

    /// Prefetches, in the background, a quarter as far ahead of a sequential
    /// reader as it has already read back to back (so the window grows with
    /// the run, up to `readahead_max`); a random read resets the run.
    fn readahead(&self, file: u32, offset: u64, end: u64) {
        if self.readahead_max == 0 {
            return;
        }
        let chunk = u64::from(self.m.chunk_size);
        let window = {
            let mut states = self.readahead.lock().expect("readahead lock");
            let st = states.entry(file).or_default();
            st.run = if offset == st.next {
                st.run + (end - offset)
            } else {
                end - offset
            };
            st.next = end;
            // A run longer than two chunks is a stream, not one large random
            // read (a page fault's readahead, one tensor). The window is a
            // quarter of the run: it grows with the stream, and a reader that
            // stops (the tensor ended) leaves little fetched in vain.
            if st.run > 2 * chunk {
                (st.run / 4).clamp(chunk, self.readahead_max.max(chunk))
            } else {
                0
            }
        };
        if window == 0 {
            return;
        }
        let NodeKind::File { extents } = &self.m.nodes[file as usize].kind else {
            return;
        };
        let stop = end + window;
        for e in extents.start as usize..extents.end as usize {
            let s = self.extent_starts[e];
            let ext = &self.m.extents[e];
            if s >= stop {
                break;
            }
            if s + ext.len > end {
                if let Some(c) = ext.chunk {
                    self.fetcher.prefetch(c);
                }
            }
        }
    }
}
