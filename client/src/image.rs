//! The image core: one lazy, verified, cached image, whatever door serves it.
//!
//! Opening an image fetches only its manifest ([`open`]): every metadata
//! operation is answered from it, and each chunk is fetched the first time a
//! read or a page fault touches it ([`fs`]). Chunks come from memory, then
//! the shared disk cache, then the chunk source, one fetch per chunk however
//! many readers wait for it, and are verified against their BLAKE3 id before
//! they are cached or served ([`fetch`]). [`prefetch`] decides what to fetch
//! before it is asked for. The core knows no transport: the FUSE mount
//! (`thaw-fuse`), the virtio-fs backend and restored VM memory are thin doors
//! onto an [`Image`], and the network is behind the [`source::ChunkSource`]
//! seam, so all of this is tested in-process. Counters belong to the image
//! ([`stats`]) and are read over a [`control`] socket.
//!
//! An image may have a recorded working-set [`profile`]: opening fetches it
//! with the manifest and streams its chunks in the order the last starts read
//! them, and an image opened to record one records what is read. With a disk
//! cache, every attach also records what it reads and keeps it there at
//! detach ([`Image::keep_local_profile`]): the next attach of that image on
//! this host streams it when the server has no profile ([`Replay`]), so a
//! warm start loads its chunks from disk ahead of its reads.

pub mod control;
pub mod disk_cache;
pub mod fetch;
pub mod fs;
mod layout;
mod prefetch;
pub mod profile;
pub mod source;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod timeline;

use crate::error::{ClientError, Result};
use crate::reference::ImageRef;
use crate::remote::Remote;
use disk_cache::DiskCache;
use fetch::{FetchPolicy, Fetcher};
use profile::StreamPolicy;
use source::{ChunkSource, HttpSource};
use stats::{Stats, StatsReport};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thaw_format::{Digest, Manifest, Profile};

/// How to serve an image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Shared on-disk cache directory; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache (0 disables it).
    pub cache_size: u64,
    /// Byte budget of the in-memory chunk cache.
    pub cache_mem: u64,
    /// Network fetches in flight at once.
    pub concurrency: usize,
    /// Largest readahead window, in bytes (0 disables prefetching).
    pub readahead_max: u64,
    /// How long a read keeps retrying an unreachable server before it fails.
    pub fetch_timeout: Duration,
    /// How long a failed chunk answers with its error before it is fetched again.
    pub failure_memory: Duration,
    /// Which profile to stream, if there is one.
    pub replay: Replay,
    /// How the profile's chunks are streamed.
    pub stream: StreamPolicy,
    /// Record what is read, for the image's profile on the server
    /// ([`Image::save_recording`]). (With a disk cache, what is read is
    /// always recorded for the local profile.)
    pub record: bool,
    /// Keep a [`timeline::Timeline`] of reads, fetches, loads, stream
    /// batches and pushes ([`Image::timeline`]).
    pub timeline: bool,
}

/// Which recorded profile opening an image streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replay {
    /// The image's profile on the server, else the local one.
    #[default]
    Auto,
    /// Only the image's profile on the server.
    Server,
    /// Only the local profile: what the last attach on this host read.
    Local,
    /// None.
    Off,
}

impl Replay {
    fn server(self) -> bool {
        matches!(self, Replay::Auto | Replay::Server)
    }

    fn local(self) -> bool {
        matches!(self, Replay::Auto | Replay::Local)
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            cache_dir: Some(default_cache_dir()),
            cache_size: 10 << 30,
            cache_mem: 256 << 20,
            concurrency: 32,
            readahead_max: 16 << 20,
            fetch_timeout: Duration::from_secs(30),
            failure_memory: FetchPolicy::default().failure_memory,
            replay: Replay::Auto,
            stream: StreamPolicy::default(),
            record: false,
            timeline: false,
        }
    }
}

impl ImageOptions {
    fn fetch_policy(&self) -> FetchPolicy {
        FetchPolicy {
            concurrency: self.concurrency,
            deadline: self.fetch_timeout,
            failure_memory: self.failure_memory.min(self.fetch_timeout),
            ..FetchPolicy::default()
        }
    }

    fn disk_cache(&self) -> Result<Option<Arc<DiskCache>>> {
        match &self.cache_dir {
            Some(dir) if self.cache_size > 0 => DiskCache::open(dir, self.cache_size)
                .map(Some)
                .map_err(|e| ClientError::io(dir, e)),
            _ => Ok(None),
        }
    }

    /// What the profile's stream may bring in: the disk cache's budget when
    /// there is one (chunks stay there), else the memory cache's.
    fn stream_budget(&self, disk: bool) -> u64 {
        if disk {
            self.cache_size
        } else {
            self.cache_mem
        }
    }
}

/// How long opening an image waits for its profile.
const PROFILE_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// `$XDG_CACHE_HOME/thaw` or `~/.cache/thaw`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("thaw")
}

/// An image ready to be served: its manifest fetched and verified.
pub struct Image {
    pub fs: Arc<fs::ImageFs>,
    /// The reference it was opened by.
    pub reference: String,
    pub manifest: Digest,
    /// The chunk servers it is served from.
    remote: Remote,
    /// Opened to record its profile on the server (`ImageOptions::record`).
    record: bool,
}

impl Image {
    /// The image's counters, attached through `transport` at `attached_at`.
    pub fn report(&self, transport: &str, attached_at: &str) -> StatsReport {
        let m = self.fs.manifest();
        StatsReport {
            image: self.reference.clone(),
            manifest: self.manifest.to_string(),
            transport: transport.to_owned(),
            attached_at: attached_at.to_owned(),
            image_bytes: m.logical_bytes(),
            image_chunks: m.chunks.len() as u64,
            server: self.remote.base().to_owned(),
            failovers: self.remote.failovers(),
            ..self.fs.stats.report()
        }
    }

    /// The timeline kept since the image was opened, if asked
    /// ([`ImageOptions::timeline`]).
    pub fn timeline(&self) -> Option<&Arc<timeline::Timeline>> {
        self.fs.timeline()
    }

    /// Whether what is read is to be merged into the image's profile on the
    /// server (`ImageOptions::record`): a door then lets every read reach
    /// the image, rather than answer any from bytes it handed the kernel.
    pub fn recording_for_server(&self) -> bool {
        self.record
    }

    /// Merges what was read since the image was opened to record into the
    /// image's profile on the server; `None` when not recording, or when
    /// nothing was read (an empty recording would only dilute the profile).
    pub async fn save_recording(&self) -> Result<Option<Profile>> {
        if !self.record {
            return Ok(None);
        }
        match self.fs.recording(self.manifest) {
            Some(recorded) if recorded.working_set().next().is_some() => {
                crate::profile::save(&self.remote, recorded).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Keeps what was read since the image was opened in the disk cache, as
    /// the local profile the next attach of this image on this host streams
    /// (replacing the one there). Returns whether one was kept: not without a
    /// disk cache, nor when nothing was read (a start that read nothing says
    /// nothing about the next one).
    pub fn keep_local_profile(&self) -> std::io::Result<bool> {
        let Some(disk) = self.fs.disk_cache() else {
            return Ok(false);
        };
        match self.fs.recording(self.manifest) {
            Some(recorded) if recorded.working_set().next().is_some() => {
                disk.put_profile(&self.manifest, &recorded.encode())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Resolves `r`, fetches and verifies its manifest, and builds the image over
/// the chunk server. Nothing else is fetched. Manifests are kept in the disk
/// cache by digest, so reopening only resolves the tag (and an image named by
/// digest needs no network at all).
pub async fn open(r: &ImageRef, mut remote: Remote, opts: &ImageOptions) -> Result<Image> {
    // The manifest is fetched under the same deadline as chunks. Each
    // server gets an equal share of it, so a server that hangs leaves time
    // for the next before a read fails.
    remote.retry.deadline = opts.fetch_timeout;
    remote.retry.attempts = u32::MAX;
    let share = opts.fetch_timeout / remote.servers().len() as u32;
    remote.request_timeout = share.max(Duration::from_millis(100));
    let started = Instant::now();
    let digest = remote.resolve(r).await?;
    let disk = opts.disk_cache()?;
    // The profile is fetched beside the manifest, not after it, and gets
    // one short try: it only speeds the start up, so a server that is down
    // (an image named by digest, its manifest cached) must not hold it up.
    let mut quick = remote.clone();
    quick.retry.attempts = 1;
    quick.request_timeout = PROFILE_FETCH_TIMEOUT.min(remote.request_timeout);
    let profile = async {
        match opts.replay.server() {
            true => Some(quick.profile(&digest).await),
            false => None,
        }
    };
    let manifest = async {
        if let Some(m) = disk.as_ref().and_then(|d| cached_manifest(d, &digest)) {
            return Ok(m);
        }
        let fetched = remote.manifest(&digest).await?;
        if let Some(d) = &disk {
            if let Err(e) = d.put_manifest(&digest, &fetched.bytes) {
                tracing::debug!("cannot cache the manifest: {e}");
            }
        }
        Ok::<_, ClientError>(fetched.manifest)
    };
    let (m, profile) = futures::join!(manifest, profile);
    let m = m?;
    tracing::info!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        nodes = m.nodes.len(),
        "manifest ready"
    );
    let budget = opts.stream_budget(disk.is_some());
    let source = Arc::new(HttpSource::new(remote.clone()));
    let fs = build_fs(m, source, disk.clone(), opts);
    if opts.timeline {
        fs.keep_timeline();
    }
    let local = disk.as_deref().filter(|_| opts.replay.local());
    match opts.replay {
        Replay::Off => fs.stats.set_profile("off"),
        _ => replay(&fs, &digest, profile, local, budget, opts.stream),
    }
    Ok(Image {
        fs: Arc::new(fs),
        reference: r.to_string(),
        manifest: digest,
        remote,
        record: opts.record,
    })
}

/// Starts streaming the profile fetched for image `digest` from the server,
/// else the local one kept in `local`, or says in the stats why there is
/// none. A profile that cannot be used is logged and left out (a damaged
/// local one is also removed): the image works without it.
fn replay(
    fs: &fs::ImageFs,
    digest: &Digest,
    fetched: Option<Result<Option<bytes::Bytes>>>,
    local: Option<&DiskCache>,
    budget: u64,
    policy: StreamPolicy,
) {
    let checked = |bytes: &[u8]| {
        crate::profile::decode_for(bytes, digest)
            .and_then(|p| Ok(p.check_against(digest, fs.manifest()).map(|()| p)?))
    };
    let mut state = "none".to_owned();
    match fetched {
        None | Some(Ok(None)) => {}
        Some(Err(e)) => {
            let why = crate::error::chain(&e);
            tracing::warn!("cannot fetch the image's profile: {why}");
            state = format!("unavailable: {why}");
        }
        Some(Ok(Some(bytes))) => match checked(&bytes) {
            Ok(p) => {
                fs.stats.set_profile_source("server");
                return fs.start_replay(&p, budget, policy);
            }
            Err(e) => {
                let why = crate::error::chain(&e);
                tracing::warn!("refusing the image's profile: {why}");
                state = format!("refused: {why}");
            }
        },
    }
    if let Some((disk, bytes)) = local.and_then(|d| Some((d, d.get_profile(digest)?))) {
        match checked(&bytes) {
            Ok(p) => {
                fs.stats.set_profile_source("local");
                let disk_only = StreamPolicy {
                    fetch_missing: false,
                    ..policy
                };
                return fs.start_replay(&p, budget, disk_only);
            }
            Err(e) => {
                let why = crate::error::chain(&e);
                tracing::warn!("removing the local profile of this image: {why}");
                disk.remove_profile(digest);
                state = format!("refused (local): {why}");
            }
        }
    }
    fs.stats.set_profile(state);
}

/// The manifest `digest` from the disk cache, if there and intact.
fn cached_manifest(disk: &DiskCache, digest: &Digest) -> Option<Manifest> {
    let bytes = disk.get_manifest(digest)?;
    match Manifest::decode_verified(&bytes, digest) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(%digest, "cached manifest is bad, fetching it again: {e}");
            disk.remove_manifest(digest);
            None
        }
    }
}

/// The filesystem of manifest `m` over `source`.
pub fn build_fs(
    m: Manifest,
    source: Arc<dyn ChunkSource>,
    disk: Option<Arc<DiskCache>>,
    opts: &ImageOptions,
) -> fs::ImageFs {
    let m = Arc::new(m);
    let stats = Arc::new(Stats::default());
    let has_disk = disk.is_some();
    let fetcher = Fetcher::new(
        source,
        m.chunks.clone().into(),
        opts.cache_mem,
        disk,
        stats.clone(),
        opts.fetch_policy(),
    );
    // With a disk cache, what is read is recorded for the local profile.
    let record = opts.record || has_disk;
    fs::ImageFs::new(m, fetcher, stats, opts.readahead_max, record)
}
