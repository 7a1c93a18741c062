//! The lab's one door into thaw: every call into `thaw_client` and
//! `thaw_server`, and the `thaw mount` / `thaw umount` processes the suites
//! measure. Suites speak in references and paths; when the libraries' surface
//! moves, this file moves with it and nothing else does.

use anyhow::{Context, Result};
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
pub use thaw_client::image::stats::StatsReport;
use thaw_client::image::{Image, ImageOptions};
use thaw_client::reference::Selector;
use thaw_client::{ImageRef, Remote};
use tokio::runtime::Runtime;

pub use thaw_client::export::ExportReport;
pub use thaw_client::inspect::InspectReport;
pub use thaw_client::push::PushReport;

/// A chunk server in this process over a `file://` store; stops on drop.
pub struct EmbeddedServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), thaw_server::ServerError>>>,
}

impl EmbeddedServer {
    pub fn start(rt: &Runtime, store: &Path) -> Result<EmbeddedServer> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = thaw_server::ServerConfig {
            store_url: format!("file://{}", store.display()),
            ..Default::default()
        };
        let task = rt.spawn(thaw_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Ok(EmbeddedServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `ADDR/NAME:TAG` on this server.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// Stops the server and waits until it has finished.
    pub fn stop(mut self, rt: &Runtime) -> Result<()> {
        let _ = self.stop.take().map(|s| s.send(()));
        match self.task.take() {
            Some(task) => Ok(rt.block_on(task)??),
            None => Ok(()),
        }
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

fn remote(reference: &str) -> Result<(ImageRef, Remote)> {
    let r = ImageRef::parse(reference)?;
    let remote = Remote::for_ref(&r, None)?;
    Ok((r, remote))
}

/// Pushes `dir` as `reference` with the default chunking and level.
pub fn push(rt: &Runtime, dir: &Path, reference: &str) -> Result<PushReport> {
    let (r, remote) = remote(reference)?;
    let opts = Default::default();
    Ok(rt.block_on(thaw_client::push::push(dir, &r, &remote, &opts))?)
}

/// Pushes `dir` as `reference` cut into fixed chunks of `chunk_size` bytes.
pub fn push_chunked(
    rt: &Runtime,
    dir: &Path,
    reference: &str,
    chunk_size: u32,
) -> Result<PushReport> {
    let (r, remote) = remote(reference)?;
    let opts = thaw_client::push::PushOptions {
        chunking: thaw_format::Chunking::new(thaw_format::ChunkingMode::Fixed, chunk_size)
            .map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    Ok(rt.block_on(thaw_client::push::push(dir, &r, &remote, &opts))?)
}

/// The full pull: the whole image into `dest`, eight batches in flight.
pub fn export(rt: &Runtime, reference: &str, dest: &Path) -> Result<ExportReport> {
    let (r, remote) = remote(reference)?;
    let opts = thaw_client::export::ExportOptions::default();
    Ok(rt.block_on(thaw_client::export::export(&r, &remote, dest, &opts))?)
}

pub fn inspect(rt: &Runtime, reference: &str) -> Result<InspectReport> {
    let (r, remote) = remote(reference)?;
    Ok(rt.block_on(thaw_client::inspect::inspect(&r, &remote))?)
}

/// A reference split into the server's address and the image on it.
pub struct Upstream {
    pub addr: SocketAddr,
    /// `NAME:TAG` or `NAME@DIGEST`.
    pub image: String,
}

pub fn upstream(reference: &str) -> Result<Upstream> {
    let r = ImageRef::parse(reference)?;
    let addr = r
        .server
        .trim_start_matches("http://")
        .parse()
        .context("the image's server must be HOST:PORT with an IP address")?;
    let image = match &r.selector {
        Selector::Tag(t) => format!("{}:{t}", r.name),
        Selector::Digest(d) => format!("{}@{d}", r.name),
    };
    Ok(Upstream { addr, image })
}

/// Fetches and decompresses (verified) every chunk of `file` in the image,
/// `concurrency` requests in flight, without FUSE; returns bytes per second.
pub async fn fetch_decompress(reference: &str, file: &str, concurrency: usize) -> Result<f64> {
    let (r, remote) = remote(reference)?;
    let m = remote.image(&r).await?.manifest;
    let node = m
        .lookup(thaw_format::ROOT, file.as_bytes())
        .with_context(|| format!("no {file} in the image"))?;
    let ids: Vec<_> = m
        .file_extents(node)
        .iter()
        .filter_map(|e| e.chunk)
        .map(|c| m.chunks[c as usize].id)
        .collect();
    let t = Instant::now();
    let sizes: Vec<Result<usize>> = futures::stream::iter(ids)
        .map(|id| {
            let remote = remote.clone();
            async move {
                let frame = remote.chunk(&id).await?;
                let decode = move || thaw_format::frame::decode_verified(&frame, &id);
                Ok(tokio::task::spawn_blocking(decode).await??.len())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let total = sizes.into_iter().sum::<Result<usize>>()?;
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// The counters of the thaw mount at `mp`.
pub fn mount_stats(mp: &Path) -> Result<StatsReport> {
    Ok(thaw_fuse::query_stats(mp)?)
}

/// Sets the kernel readahead of any mount at `mp` (root only).
pub fn set_readahead(mp: &Path, bytes: u64) {
    thaw_fuse::set_readahead(mp, bytes);
}

/// Unmounts any FUSE mount at `mp`.
pub fn unmount(mp: &Path) -> Result<()> {
    Ok(thaw_fuse::unmount(mp)?)
}

/// Flags of a `thaw mount` beyond its cache directory; `None` keeps the default.
#[derive(Debug, Clone, Default)]
pub struct MountFlags {
    pub readahead: Option<u64>,
    pub kernel_readahead: Option<u64>,
    /// `--profile`: which recorded profile to stream (`auto`, `server`,
    /// `local`, `off`); `None` keeps the default.
    pub profile: Option<&'static str>,
    /// `--record`: record what is read and save it as the image's profile at unmount.
    pub record: bool,
    /// `--timeline`: where the mount writes its timeline when unmounted.
    pub timeline: Option<PathBuf>,
}

/// The `thaw` binary, for what the suites measure as a user would run it.
#[derive(Debug, Clone)]
pub struct ThawBin(pub PathBuf);

impl ThawBin {
    /// `thaw mount` (a real background process); returns once the mount answers.
    pub fn mount(&self, reference: &str, mp: &Path, cache: &Path, flags: MountFlags) -> Result<()> {
        std::fs::create_dir_all(mp)?;
        let mut cmd = Command::new(&self.0);
        cmd.arg("mount")
            .arg(reference)
            .arg(mp)
            .arg("--cache-dir")
            .arg(cache);
        if let Some(r) = flags.readahead {
            cmd.arg("--readahead").arg(r.to_string());
        }
        if let Some(k) = flags.kernel_readahead {
            cmd.arg("--kernel-readahead").arg(k.to_string());
        }
        if let Some(p) = flags.profile {
            cmd.arg("--profile").arg(p);
        }
        if flags.record {
            cmd.arg("--record");
        }
        if let Some(t) = &flags.timeline {
            cmd.arg("--timeline").arg(t);
        }
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", self.0.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "thaw mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `thaw umount`, which waits for the mount process to exit.
    pub fn umount(&self, mp: &Path) {
        let _ = Command::new(&self.0).arg("umount").arg(mp).output();
    }
}

/// A mount served by this process (the demo); unmounted on drop.
pub struct InProcessMount {
    image: std::sync::Arc<Image>,
    /// Kept only to be dropped: dropping the session unmounts.
    _session: thaw_fuse::Session,
}

impl InProcessMount {
    pub fn new(rt: &Runtime, reference: &str, mp: &Path, cache: &Path) -> Result<InProcessMount> {
        let (r, remote) = remote(reference)?;
        let opts = ImageOptions {
            cache_dir: Some(cache.to_path_buf()),
            ..Default::default()
        };
        let image = std::sync::Arc::new(rt.block_on(thaw_client::image::open(&r, remote, &opts))?);
        let fuse = thaw_fuse::FuseOptions::default();
        let session = thaw_fuse::Session::mount(image.clone(), mp, &fuse, rt.handle().clone())?;
        Ok(InProcessMount {
            image,
            _session: session,
        })
    }

    pub fn stats(&self) -> StatsReport {
        self.image.report("fuse", "")
    }
}
