//! The filesystem logic of an image, free of any transport.
//!
//! Inode numbers are node indices plus one (FUSE's root is inode 1), with a
//! hardlink answering as the file it names, so both names are one inode.
//! Metadata comes straight from the manifest; reads map a byte range onto
//! extents, fetch the chunks it touches concurrently, and copy the bytes out.
//! Holes read as zeros without a fetch.
//!
//! The read-only policy is decided here, once for every door: which opens are
//! allowed, what `access` answers, how long the kernel may cache entries,
//! attributes and pages ([`TTL`], [`Opened::keep_cache`]), and that every
//! operation that would change the image gets [`FsError::ReadOnly`]. The FUSE
//! adapter and the virtio-fs backend only translate calls and replies.

use super::disk_cache::DiskCache;
use super::fetch::{FetchError, Fetcher, Priority};
use super::layout::Layout;
use super::prefetch::{Prefetch, SMALL_FILE_CHUNKS};
use super::profile::{self, Recorder, StreamPolicy};
use super::stats::Stats;
use super::timeline::{Kind, Timeline, What};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thaw_format::{outboard, Digest, Extent, Manifest, Node, NodeKind, Profile, ROOT};

/// How long an image must see no lookup, open or read before the disk
/// cache writes a profile's stream held back are made, and how long they
/// wait at most.
const QUIET: Duration = Duration::from_millis(250);
const QUIET_WAIT_MAX: Duration = Duration::from_secs(30);

/// Waits until the image has seen no lookup, open or read for `quiet`, or
/// `max` has passed. A stream ends while the start it fed still runs (its
/// bytes are in memory, many already in the page cache), and writing them
/// to disk then takes a core and the file system from that start.
pub(crate) async fn until_quiet(stats: &Stats, quiet: Duration, max: Duration) {
    let activity = || {
        [&stats.lookups, &stats.opens, &stats.reads]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let (began, tick) = (Instant::now(), quiet / 5);
    let (mut last, mut still) = (activity(), Duration::ZERO);
    while still < quiet && began.elapsed() < max {
        tokio::time::sleep(tick).await;
        let now = activity();
        still = if now == last {
            still + tick
        } else {
            Duration::ZERO
        };
        last = now;
    }
}

/// A read of at most a chunk's length over this many, of a chunk only the
/// disk cache holds, reads just the part it covers (see
/// [`ImageFs::small_read_from_disk`]); a larger one loads the whole chunk.
const SMALL_READ_SHARE: usize = 4;

/// The image never changes, so entries, attributes and pages may be cached for long.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// For as long, a name that is not in the image never will be: a door may
/// let the kernel remember its absence (an import path search asks often).
pub const NEGATIVE_TTL: Duration = TTL;

/// Errors of filesystem operations; [`FsError::errno`] maps them for every door.
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

impl FsError {
    /// The errno every door answers with: the one mapping from filesystem
    /// errors to errno (a digest mismatch or a failed fetch is EIO, never
    /// wrong bytes).
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::NoXattr => libc::ENODATA,
            FsError::ReadOnly => libc::EROFS,
            FsError::Fetch(_) => libc::EIO,
        }
    }
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

/// A directory entry as listed.
#[derive(Debug, Clone, Copy)]
pub struct DirEntry<'a> {
    /// The offset to resume listing after this entry.
    pub next_offset: i64,
    pub ino: u64,
    pub mode: u32,
    pub name: &'a [u8],
}

/// How an open went: the kernel may keep a file's pages across opens when
/// `keep_cache` is set; with `stateless` set, reads need no handle from the
/// open, so a door may let the kernel skip opens (and their releases)
/// altogether.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub keep_cache: bool,
    pub stateless: bool,
}

/// Totals for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// 4 KiB blocks of file data.
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub max_name: u32,
}

/// One piece of a read: `len` bytes at `within` of extent `extent`, landing
/// at `at` in the output.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: usize,
    extent: Extent,
    within: u64,
    len: u64,
}

impl Piece {
    /// Where the piece's bytes are in its chunk.
    fn in_chunk(&self) -> std::ops::Range<usize> {
        let from = (u64::from(self.extent.offset) + self.within) as usize;
        from..from + self.len as usize
    }
}

/// An image's filesystem.
pub struct ImageFs {
    m: Arc<Manifest>,
    layout: Layout,
    fetcher: Arc<Fetcher>,
    pub stats: Arc<Stats>,
    prefetch: Prefetch,
    /// What is read, when recording a profile.
    recorder: Option<Arc<Recorder>>,
    /// The profile's stream, while it runs.
    replay: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Which files each chunk holds, built on first use.
    chunk_files: std::sync::OnceLock<ChunkFiles>,
    /// Per node, whether a door's reads have reached it: the kernel's own
    /// readahead reads those, so chunks arriving later are not pushed to
    /// them as well (see [`ImageFs::resident_runs`]).
    reached: Box<[AtomicBool]>,
}

/// The inodes of the files each chunk holds bytes of (compressed rows).
struct ChunkFiles {
    /// Where chunk `c`'s inodes start in `inos`; `c + 1`'s start ends them.
    starts: Vec<u32>,
    inos: Vec<u64>,
}

impl ChunkFiles {
    fn of(m: &Manifest) -> ChunkFiles {
        let mut per_chunk = vec![0u32; m.chunks.len() + 1];
        let files = || {
            m.nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| match &n.kind {
                    NodeKind::File { extents } => Some((i as u64 + 1, extents.clone())),
                    _ => None,
                })
        };
        let chunks_of = |extents: std::ops::Range<u32>| {
            let mut cs: Vec<u32> = m.extents[extents.start as usize..extents.end as usize]
                .iter()
                .filter_map(|e| e.chunk)
                .collect();
            cs.dedup();
            cs
        };
        for (_, extents) in files() {
            for c in chunks_of(extents) {
                per_chunk[c as usize + 1] += 1;
            }
        }
        for c in 1..per_chunk.len() {
            per_chunk[c] += per_chunk[c - 1];
        }
        let mut next = per_chunk.clone();
        let mut inos = vec![0; per_chunk[m.chunks.len()] as usize];
        for (ino, extents) in files() {
            for c in chunks_of(extents) {
                inos[next[c as usize] as usize] = ino;
                next[c as usize] += 1;
            }
        }
        ChunkFiles {
            starts: per_chunk,
            inos,
        }
    }

    fn of_chunk(&self, c: u32) -> &[u64] {
        match (self.starts.get(c as usize), self.starts.get(c as usize + 1)) {
            (Some(&a), Some(&b)) => &self.inos[a as usize..b as usize],
            _ => &[],
        }
    }
}

impl ImageFs {
    /// The filesystem of `m` over `fetcher`; `record` records what is read
    /// for a profile ([`ImageFs::recording`]).
    pub fn new(
        m: Arc<Manifest>,
        fetcher: Arc<Fetcher>,
        stats: Arc<Stats>,
        readahead_max: u64,
        record: bool,
    ) -> ImageFs {
        let recorder = record.then(|| Arc::new(Recorder::new()));
        let reached = (0..m.nodes.len()).map(|_| AtomicBool::new(false)).collect();
        ImageFs {
            layout: Layout::of(&m),
            m,
            fetcher,
            stats,
            prefetch: Prefetch::new(readahead_max, recorder.clone()),
            recorder,
            replay: Mutex::new(None),
            chunk_files: std::sync::OnceLock::new(),
            reached,
        }
    }

    /// Keeps a [`Timeline`] of this image's reads, fetches, loads, stream
    /// batches and pushes from now on.
    pub fn keep_timeline(&self) {
        self.fetcher.set_timeline(Arc::new(Timeline::new()));
    }

    /// The timeline kept, if one is.
    pub fn timeline(&self) -> Option<&Arc<Timeline>> {
        self.fetcher.timeline()
    }

    /// Calls `hook` with each chunk as it enters memory (a fetch, a load
    /// from disk, a profile's stream), so a door can hand the bytes on ahead
    /// of reads ([`ImageFs::resident_runs`]). One hook per image.
    pub fn on_resident(&self, hook: impl Fn(u32) + Send + Sync + 'static) {
        if self.fetcher.on_resident(Box::new(hook)).is_err() {
            tracing::warn!("a second resident-chunk hook was ignored");
        }
    }

    /// The inodes of the files that hold bytes of `chunk`.
    pub fn files_of_chunk(&self, chunk: u32) -> &[u64] {
        self.chunk_files
            .get_or_init(|| ChunkFiles::of(&self.m))
            .of_chunk(chunk)
    }

    /// The bytes of file `ino` that are in memory now, as runs `(offset,
    /// pieces)` starting and ending on multiples of `align` (or at the file's
    /// end): every run of chunks in memory, or, given `chunk`, only the
    /// bytes of that chunk (with the neighbours' bytes that complete their
    /// first and last `align` blocks, when those are in memory too). A
    /// chunk arriving for a file that reads have already reached is not
    /// pushed: the kernel's readahead for that reader runs just ahead of
    /// what arrives, and pushing too cut a cold sequential read by a third.
    /// Never fetches, and does not count as a read.
    pub fn resident_runs(
        &self,
        ino: u64,
        chunk: Option<u32>,
        align: u64,
    ) -> Vec<(u64, Vec<Bytes>)> {
        let Ok((node_index, node)) = self.node(ino) else {
            return Vec::new();
        };
        let NodeKind::File { extents } = &node.kind else {
            return Vec::new();
        };
        let range = extents.start as usize..extents.end as usize;
        let size = node.size;
        if chunk.is_some() && self.reached[node_index as usize].load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for e in range.clone() {
            let wanted = match (self.m.extents[e].chunk, chunk) {
                (Some(c), Some(only)) => c == only,
                (Some(c), None) => self.fetcher.resident(c).is_some(),
                (None, _) => false,
            };
            if !wanted {
                continue;
            }
            let start = self.layout.extent_starts[e];
            let end = start + self.m.extents[e].len;
            match spans.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => spans.push((start, end)),
            }
        }
        let whole = |at: u64| if at >= size { size } else { at / align * align };
        spans
            .into_iter()
            .filter_map(|(start, end)| {
                // Widened to whole blocks with the neighbours' bytes, else
                // narrowed to the blocks this span fills alone.
                let wide = (whole(start), whole(end.div_ceil(align) * align));
                let narrow = (whole(start.div_ceil(align) * align), whole(end));
                [wide, narrow].into_iter().find_map(|(from, to)| {
                    let pieces = (from < to).then(|| self.gather(range.clone(), from, to))??;
                    Some((from, pieces))
                })
            })
            .collect()
    }

    /// A door handed `len` bytes at `offset` of file `ino` to the kernel,
    /// whose reads of them will not reach the image: they count as read
    /// for the recording (the local profile), since the kernel is handed
    /// only files it was given by a lookup or a listing.
    pub fn pushed(&self, ino: u64, offset: u64, len: u64) {
        Stats::inc(&self.stats.pushes);
        Stats::add_to(&self.stats.pushed_bytes, len);
        self.fetcher.note(Kind::Push, Instant::now(), || What {
            node: Some(ino),
            bytes: len,
            ..What::default()
        });
        let (Some(_), Ok((i, node))) = (&self.recorder, self.node(ino)) else {
            return;
        };
        let NodeKind::File { extents } = &node.kind else {
            return;
        };
        let range = extents.start as usize..extents.end as usize;
        self.record(i, offset, &self.pieces(range, offset, offset + len));
    }

    /// Records, when recording, that `pieces` of node `i` from `offset` on
    /// were read.
    fn record(&self, i: u32, offset: u64, pieces: &[Piece]) {
        let Some(r) = &self.recorder else {
            return;
        };
        for p in pieces {
            if let Some(c) = p.extent.chunk {
                let len = self.m.chunks[c as usize].len;
                r.read(c, len, i, offset + p.at as u64, p.len);
            }
        }
    }

    /// The bytes `[from, to)` of the file with extents `range`, as slices of
    /// chunks in memory; `None` if any is not (or is a hole).
    fn gather(&self, range: std::ops::Range<usize>, from: u64, to: u64) -> Option<Vec<Bytes>> {
        self.pieces(range, from, to)
            .iter()
            .map(|p| {
                let data = self.fetcher.resident(p.extent.chunk?)?;
                Some(data.slice(p.in_chunk()))
            })
            .collect()
    }

    /// Stops the profile's stream, then waits for fetches and disk cache
    /// writes in flight (call before exiting).
    pub fn flush(&self) {
        if let Some(stream) = self.replay.lock().expect("replay lock").take() {
            stream.abort();
        }
        self.fetcher.flush(std::time::Duration::from_secs(10));
    }

    /// Starts streaming the working set of `p` (checked against this image)
    /// in the background, within `budget` bytes. Call on a tokio runtime.
    pub fn start_replay(&self, p: &Profile, budget: u64, policy: StreamPolicy) {
        let plan = profile::plan(p, &self.m);
        // Said before the task runs, so no one sees a stream not yet begun.
        self.stats.set_profile("streaming");
        let stream = profile::stream(
            self.fetcher.clone(),
            plan,
            budget,
            policy,
            self.stats.clone(),
        );
        // What the stream fetches is written to the disk cache once it ends
        // and the image has gone quiet (or at flush, if it is stopped), not
        // while the start it feeds runs.
        self.fetcher.defer_disk_writes();
        let (fetcher, stats) = (self.fetcher.clone(), self.stats.clone());
        let stream = async move {
            stream.await;
            fetcher.stop_deferring();
            until_quiet(&stats, QUIET, QUIET_WAIT_MAX).await;
            fetcher.write_deferred();
        };
        *self.replay.lock().expect("replay lock") = Some(tokio::spawn(stream));
    }

    /// What was read so far, as a profile of this image (named `digest`),
    /// when recording.
    pub fn recording(&self, digest: Digest) -> Option<Profile> {
        Some(self.recorder.as_ref()?.profile(digest, &self.m))
    }

    /// The disk cache chunks are kept in, if any.
    pub fn disk_cache(&self) -> Option<&Arc<DiskCache>> {
        self.fetcher.disk_cache()
    }

    #[cfg(test)]
    pub(crate) fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
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
            blocks: self.layout.blocks[i as usize],
            mode: n.mode,
            nlink: self.layout.nlink[i as usize],
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
        Stats::inc(&self.stats.lookups);
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

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: self.m.logical_bytes().div_ceil(4096),
            files: self.m.nodes.len() as u64,
            block_size: 4096,
            max_name: 255,
        }
    }

    /// Opens `ino` with open(2) `flags`: only for reading.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        Stats::inc(&self.stats.opens);
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        self.node(ino)?;
        // The data never changes: keep the page cache across opens. A read
        // names its inode, not an open file.
        Ok(Opened {
            keep_cache: true,
            stateless: true,
        })
    }

    /// access(2): anything but writing, on an entry that exists.
    pub fn access(&self, ino: u64, mask: i32) -> FsResult<()> {
        self.node(ino)?;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    /// The answer to every operation that would change the image.
    pub fn modify(&self) -> FsResult<()> {
        Err(FsError::ReadOnly)
    }

    /// Reads up to `size` bytes at `offset` of file `ino`.
    /// A read inside one chunk returns a slice of the cached chunk, without a copy.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let began = Instant::now();
        let got = self.read_now(ino, offset, size).await;
        self.fetcher.note(Kind::Read, began, || What {
            node: Some(ino),
            bytes: u64::from(size),
            ..What::default()
        });
        got
    }

    async fn read_now(&self, ino: u64, offset: u64, size: u32) -> FsResult<Bytes> {
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
        let pieces = self.pieces(extents.start as usize..extents.end as usize, offset, end);
        self.reached[i as usize].store(true, Ordering::Relaxed);
        self.record(i, offset, &pieces);
        // Readahead starts before this read waits, so the two overlap.
        self.prefetch
            .on_read(&self.m, &self.layout, &self.fetcher, i, offset, end);
        let mut wanted: Vec<u32> = pieces.iter().filter_map(|p| p.extent.chunk).collect();
        wanted.dedup();
        let mut missed = false;
        for &c in &wanted {
            if !self.fetcher.is_resident_or_pending(c) {
                missed = true;
                self.prefetch
                    .on_miss(&self.m, &self.layout, &self.fetcher, i, c);
            }
        }
        let large = extents.len() > SMALL_FILE_CHUNKS;
        if missed && large {
            if let Some(b) = self.small_read_from_disk(&pieces).await {
                return Ok(b);
            }
        }
        let got = futures::future::try_join_all(
            wanted
                .iter()
                .map(|&c| self.fetcher.get(c, Priority::Demand)),
        )
        .await?;
        if let [p] = pieces[..] {
            if p.extent.chunk.is_some() {
                return Ok(got[0].slice(p.in_chunk()));
            }
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for p in pieces {
            if let Some(c) = p.extent.chunk {
                let data = &got[wanted.iter().position(|&w| w == c).expect("fetched")];
                out[p.at..p.at + p.len as usize].copy_from_slice(&data[p.in_chunk()]);
            }
        }
        Ok(Bytes::from(out))
    }

    /// A small read of a large file (weights, a VM's memory, a big shared
    /// library), within one chunk that is neither in memory nor on its way
    /// (the caller knows), from the disk cache alone: only the 16 KiB groups
    /// it covers are read and verified (the entry's outboard), and the chunk
    /// stays out of memory. `None` if it is not such a read or the disk
    /// cache does not hold the chunk. Packs of small files and small files
    /// are loaded whole, as their next bytes are read next.
    async fn small_read_from_disk(&self, pieces: &[Piece]) -> Option<Bytes> {
        let [p] = pieces else { return None };
        let c = p.extent.chunk?;
        let len = self.fetcher.chunk_len(c) as usize;
        if self.layout.packed[c as usize]
            || p.len as usize * SMALL_READ_SHARE > len
            || outboard::groups(len) == 0
        {
            return None;
        }
        self.fetcher.disk_slice(c, p.in_chunk()).await
    }

    /// The pieces of extents `range` (one file's) that `[offset, end)` covers.
    fn pieces(&self, range: std::ops::Range<usize>, offset: u64, end: u64) -> Vec<Piece> {
        let starts = &self.layout.extent_starts[range.clone()];
        let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let mut pieces = Vec::new();
        let mut at = offset;
        let mut e = range.start + first;
        while at < end && e < range.end {
            let extent = self.m.extents[e];
            let start = self.layout.extent_starts[e];
            let len = (start + extent.len).min(end) - at;
            pieces.push(Piece {
                at: (at - offset) as usize,
                extent,
                within: at - start,
                len,
            });
            at += len;
            e += 1;
        }
        pieces
    }
}
