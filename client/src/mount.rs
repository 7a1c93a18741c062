//! `thaw mount`: a lazy, verified, cached, read-only FUSE filesystem.
//!
//! Mounting fetches only the manifest: every metadata operation is answered
//! from it, and each chunk is fetched the first time a read or a page fault
//! touches it ([`fs`]). Chunks come from memory, then the shared disk cache,
//! then the server, one fetch per chunk however many readers wait for it, and
//! are verified against their BLAKE3 id before they are cached or served
//! ([`fetch`]). Sequential reads grow a readahead window fetched at a lower
//! priority. The image is immutable, so the kernel keeps entries, attributes
//! and pages cached for long. [`fuse`] adapts the transport-free core to
//! `fuser`; counters are served on a control socket ([`stats`]).

pub mod disk_cache;
pub mod fetch;
pub mod fs;
pub mod fuse;
pub mod stats;

use crate::error::{ClientError, Result};
use crate::reference::ImageRef;
use crate::remote::Remote;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Shared on-disk cache directory; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache.
    pub cache_size: u64,
    /// Byte budget of the in-memory chunk cache.
    pub cache_mem: u64,
    /// Network fetches in flight at once.
    pub concurrency: usize,
    /// Largest readahead window, in bytes (0 disables readahead).
    pub readahead_max: u64,
    /// How long a read keeps retrying an unreachable server before EIO.
    pub fetch_timeout: Duration,
    pub allow_other: bool,
    /// Kernel readahead for the mount, in bytes (0 keeps the kernel's 128 KiB).
    /// Larger keeps more reads in flight for sequential readers, but makes each
    /// page fault of an mmap'd file read (and fetch) that much around it.
    pub kernel_readahead: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_dir: Some(default_cache_dir()),
            cache_size: 10 << 30,
            cache_mem: 256 << 20,
            concurrency: 32,
            readahead_max: 16 << 20,
            fetch_timeout: Duration::from_secs(30),
            allow_other: false,
            kernel_readahead: 1 << 20,
        }
    }
}

/// `$XDG_CACHE_HOME/thaw` or `~/.cache/thaw`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("thaw")
}

/// An image ready to be served: its manifest fetched and verified.
pub struct Prepared {
    pub fs: Arc<fs::ImageFs>,
    pub image: String,
    pub manifest: thaw_format::Digest,
}

/// Fetches and verifies the manifest and builds the filesystem. Nothing else
/// is fetched. Manifests are kept in the disk cache by digest, so a remount
/// only resolves the tag (and a mount by digest needs no network at all).
pub async fn prepare(r: &ImageRef, mut remote: Remote, opts: &MountOptions) -> Result<Prepared> {
    remote.retry.deadline = opts.fetch_timeout;
    remote.retry.attempts = u32::MAX;
    // A server that accepts but never answers must not hold a read past the deadline either.
    remote.request_timeout = opts.fetch_timeout.max(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let digest = remote.resolve(r).await?;
    let cached = opts
        .cache_dir
        .as_ref()
        .filter(|_| opts.cache_size > 0)
        .map(|d| d.join("v1/manifests").join(digest.to_hex()));
    let from_cache = cached
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| thaw_format::Manifest::decode_verified(&b, &digest).ok());
    let (m, source) = match from_cache {
        Some(m) => (m, "disk cache"),
        None => {
            let (m, bytes) = remote.manifest(&digest).await?;
            if let Some(path) = &cached {
                if let Err(e) = write_atomic(path, &bytes) {
                    tracing::debug!("cannot cache the manifest: {e}");
                }
            }
            (m, "server")
        }
    };
    tracing::info!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        nodes = m.nodes.len(),
        source,
        "manifest ready"
    );
    let m = Arc::new(m);
    let disk = match &opts.cache_dir {
        Some(dir) if opts.cache_size > 0 => Some(
            disk_cache::DiskCache::open(dir, opts.cache_size)
                .map_err(|e| ClientError::io(dir, e))?,
        ),
        _ => None,
    };
    let stats = Arc::new(stats::Stats::default());
    let fetcher = fetch::Fetcher::new(
        remote,
        Arc::new(m.chunks.clone()),
        opts.cache_mem,
        disk,
        stats.clone(),
        opts.concurrency,
    );
    let fs = Arc::new(fs::ImageFs::new(m, fetcher, stats, opts.readahead_max));
    Ok(Prepared {
        fs,
        image: r.to_string(),
        manifest: digest,
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Mounts `p` at `mountpoint` on a background session; dropping it unmounts.
pub fn mount(
    p: &Prepared,
    mountpoint: &Path,
    opts: &MountOptions,
    rt: tokio::runtime::Handle,
) -> Result<fuser::BackgroundSession> {
    use fuser::MountOption;
    let mut options = vec![
        MountOption::RO,
        MountOption::FSName(format!("thaw:{}", p.image)),
        MountOption::Subtype("thaw".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if opts.allow_other {
        options.push(MountOption::AllowOther);
    }
    let started = std::time::Instant::now();
    let adapter = fuse::FuseAdapter {
        fs: p.fs.clone(),
        rt,
    };
    let session =
        fuser::spawn_mount2(adapter, mountpoint, &options).map_err(|e| ClientError::Io {
            path: mountpoint.to_path_buf(),
            source: std::io::Error::new(
                e.kind(),
                format!("cannot mount (is fuse3 installed?): {e}"),
            ),
        })?;
    tracing::info!(ms = started.elapsed().as_secs_f64() * 1000.0, "mounted");
    if opts.kernel_readahead > 0 {
        set_readahead(mountpoint, opts.kernel_readahead);
    }
    let (fs, image, manifest, mp) = (
        p.fs.clone(),
        p.image.clone(),
        p.manifest.to_string(),
        mountpoint.to_path_buf(),
    );
    let mp_str = std::fs::canonicalize(&mp)
        .unwrap_or(mp.clone())
        .display()
        .to_string();
    stats::serve_socket(stats::socket_path(&mp), move || {
        let m = fs.manifest();
        stats::StatsReport {
            image: image.clone(),
            manifest: manifest.clone(),
            mountpoint: mp_str.clone(),
            image_bytes: m.logical_bytes(),
            image_chunks: m.chunks.len() as u64,
            ..fs.stats.report()
        }
    })
    .map_err(|e| ClientError::io(stats::socket_path(mountpoint), e))?;
    Ok(session)
}

/// FUSE mounts start with the kernel's default 128 KiB readahead, and a
/// daemon can only lower it at init; as root, set it through sysfs so a
/// sequential reader keeps more reads in flight. Best effort.
pub fn set_readahead(mountpoint: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, (bytes / 1024).to_string()) {
        tracing::debug!("cannot raise readahead at {path}: {e}");
    }
}

/// Unmounts a thaw mount (as root directly, else through `fusermount3`).
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| ClientError::Usage("mountpoint contains a NUL byte".into()))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => Err(ClientError::io(
            mountpoint,
            std::io::Error::other("cannot unmount: not a thaw mount, or busy"),
        )),
    }
}
