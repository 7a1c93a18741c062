//! Attaching an image: `thaw mount` (FUSE on the host) and `thaw virtiofs`
//! (a vhost-user-fs backend for a VM), their clean-up and counters. Both open
//! the image the same way, with the same cache and fetch flags, and both
//! serve in a forked child unless `--foreground`, the command returning once
//! the child answers.

use crate::cmd::{
    absolute_path, human, parse_bytes, print_json, shutdown_signal, Access, AccessArgs,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thaw_client::image::{Image, ImageOptions, Replay};
use thaw_client::ImageRef;
use thaw_fuse::background::{self, Forked};

/// How an attached image is served: caches, readahead, fetching.
#[derive(Args)]
pub struct ImageArgs {
    /// Shared on-disk chunk cache [default: ~/.cache/thaw].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache (suffixes K, M, G); 0 disables it.
    #[arg(long, default_value = "10G", value_parser = parse_bytes)]
    cache_size: u64,
    /// Byte budget of the in-memory chunk cache.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    cache_mem: u64,
    /// Largest readahead window on sequential reads; 0 disables readahead.
    #[arg(long, default_value = "16M", value_parser = parse_bytes)]
    readahead: u64,
    /// Seconds a read retries an unreachable server before failing with EIO.
    #[arg(long, default_value_t = 30.0)]
    fetch_timeout: f64,
    /// Network fetches in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Which recorded profile (what earlier starts read) to stream ahead of
    /// the reads.
    #[arg(long, value_enum, default_value_t = ProfileArg::Auto)]
    profile: ProfileArg,
    /// Stream no profile: the same as --profile off.
    #[arg(long, conflicts_with = "profile")]
    no_profile: bool,
    /// Record what is read until detached, and merge it into the image's
    /// profile on the server (needs the push token if the server has one).
    #[arg(long)]
    record: bool,
    /// Keep a timeline of reads, chunk fetches and loads, stream batches and
    /// page cache pushes, and write it to this file (JSON) when detached.
    #[arg(long, value_parser = absolute_path)]
    timeline: Option<PathBuf>,
    /// Stay attached to the terminal instead of serving in the background.
    #[arg(long)]
    foreground: bool,
    #[command(flatten)]
    access: AccessArgs,
}

/// Which recorded profile an attach streams.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ProfileArg {
    /// The image's profile on the server, else what the last attach on this
    /// host read (kept in the disk cache at each detach; only what is still
    /// there is loaded).
    Auto,
    /// Only the image's profile on the server.
    Server,
    /// Only what the last attach on this host read.
    Local,
    /// None.
    Off,
}

impl ImageArgs {
    fn replay(&self) -> Replay {
        match (self.no_profile, self.profile) {
            (true, _) | (_, ProfileArg::Off) => Replay::Off,
            (_, ProfileArg::Auto) => Replay::Auto,
            (_, ProfileArg::Server) => Replay::Server,
            (_, ProfileArg::Local) => Replay::Local,
        }
    }

    fn options(&self) -> ImageOptions {
        ImageOptions {
            cache_dir: Some(
                self.cache_dir
                    .clone()
                    .unwrap_or_else(thaw_client::image::default_cache_dir),
            ),
            cache_size: self.cache_size,
            cache_mem: self.cache_mem,
            concurrency: self.concurrency,
            readahead_max: self.readahead,
            fetch_timeout: self.fetch_timeout(),
            replay: self.replay(),
            record: self.record,
            timeline: self.timeline.is_some(),
            ..Default::default()
        }
    }

    fn fetch_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.fetch_timeout.max(0.0))
    }
}

#[derive(Args)]
pub struct MountArgs {
    reference: String,
    mountpoint: PathBuf,
    /// Kernel readahead of the mount (root only); 0 keeps the kernel's default.
    #[arg(long, default_value = "1M", value_parser = parse_bytes)]
    kernel_readahead: u64,
    /// Let other users access the mount.
    #[arg(long)]
    allow_other: bool,
    /// Do not hand chunks in memory (a profile's stream, a fetched chunk's
    /// other files) to the kernel's page cache before they are read; every
    /// first read of a page then asks the mount.
    #[arg(long)]
    no_push: bool,
    #[command(flatten)]
    image: ImageArgs,
}

#[derive(Args)]
pub struct VirtiofsArgs {
    reference: String,
    /// The vhost-user socket to create; the VMM connects to it.
    #[arg(long)]
    socket: PathBuf,
    /// Request queues offered to the guest (besides the high-priority queue).
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Largest size of each queue.
    #[arg(long, default_value_t = 1024)]
    queue_size: usize,
    #[command(flatten)]
    image: ImageArgs,
}

#[derive(Args)]
pub struct UmountArgs {
    mountpoint: PathBuf,
}

#[derive(Args)]
pub struct StatsArgs {
    /// A mountpoint, or the vhost-user socket of `thaw virtiofs`.
    place: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Opens `r` on a new runtime and hands both to `serve`, which calls its
/// `ready` argument once the image answers.
type Serve<'a> =
    &'a dyn Fn(&tokio::runtime::Runtime, Arc<Image>, &mut dyn FnMut(String)) -> Result<()>;

/// What the command prints once a background child answers.
struct Announce<'a> {
    what: &'a str,
    done: String,
}

/// Serves `r` through `serve`, in the foreground or in a forked child that
/// writes its log to `log`.
fn attach(
    r: &ImageRef,
    a: &ImageArgs,
    log: &Path,
    say: Announce<'_>,
    serve: Serve<'_>,
) -> Result<()> {
    let what = say.what;
    let access = a.access.read()?;
    let run = |access: Access, ready: &mut dyn FnMut(String)| -> Result<()> {
        let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let remote = access.remote(r)?;
        let image = rt
            .block_on(thaw_client::image::open(r, remote, &a.options()))
            .with_context(|| format!("cannot open {r}"))?;
        let image = Arc::new(image);
        serve(&rt, image.clone(), ready)?;
        match image.keep_local_profile() {
            Ok(kept) => tracing::debug!(kept, "local profile"),
            Err(e) => tracing::warn!("cannot keep the local profile: {e}"),
        }
        if let (Some(path), Some(t)) = (&a.timeline, image.timeline()) {
            let written = std::fs::File::create(path)
                .map_err(anyhow::Error::from)
                .and_then(|f| {
                    let mut out = std::io::BufWriter::new(f);
                    t.write_json(&mut out)?;
                    Ok(std::io::Write::flush(&mut out)?)
                });
            if let Err(e) = written {
                tracing::warn!("cannot write the timeline to {}: {e}", path.display());
            }
        }
        if a.record {
            save_recording(&rt, &image)?;
        }
        Ok(())
    };
    if a.foreground {
        return run(access, &mut |m| eprintln!("thaw: {m} (Ctrl-C to stop)"));
    }
    match background::fork(log).with_context(|| format!("cannot start the {what} process"))? {
        Forked::Parent(waiter) => match waiter.wait() {
            Ok(()) => {
                println!("{} (log: {})", say.done, log.display());
                Ok(())
            }
            Err(why) => bail!("{what} failed: {why}"),
        },
        Forked::Child(notifier) => {
            let mut notifier = Some(notifier);
            let result = run(access, &mut |_| {
                notifier.take().expect("ready once").ready()
            });
            if let (Err(e), Some(n)) = (&result, notifier) {
                n.failed(&format!("{e:#}"));
            }
            result
        }
    }
}

/// Merges what `image` recorded into its profile on the server.
fn save_recording(rt: &tokio::runtime::Runtime, image: &Image) -> Result<()> {
    let saved = rt
        .block_on(image.save_recording())
        .with_context(|| format!("cannot save the profile of {}", image.reference))?;
    if let Some(p) = saved {
        let s = thaw_client::profile::ProfileSummary::of(&p);
        tracing::info!(
            runs = s.runs,
            chunks = s.working_set_chunks,
            bytes = s.working_set_bytes,
            "profile saved"
        );
    }
    Ok(())
}

/// `thaw mount`.
pub fn mount(a: MountArgs) -> Result<()> {
    if !a.mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", a.mountpoint.display());
    }
    let r = ImageRef::parse(&a.reference)?;
    let log = thaw_fuse::log_path(&a.mountpoint)?;
    let fuse = thaw_fuse::FuseOptions {
        allow_other: a.allow_other,
        kernel_readahead: a.kernel_readahead,
        push: !a.no_push,
    };
    let say = Announce {
        what: "mount",
        done: format!("mounted {r} at {}", a.mountpoint.display()),
    };
    attach(&r, &a.image, &log, say, &|rt, image, ready| {
        let session = thaw_fuse::Session::mount(image, &a.mountpoint, &fuse, rt.handle().clone())?;
        ready(format!("mounted {r} at {}", a.mountpoint.display()));
        session.run_until(rt.handle(), shutdown_signal());
        Ok(())
    })
}

/// `thaw virtiofs`: serves one VMM until it disconnects (the VM stopped or
/// was migrated away) or a signal.
pub fn virtiofs(a: VirtiofsArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    if let Some(dir) = a.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("the socket's directory {} does not exist", dir.display());
        }
    }
    let log = thaw_fuse::log_path(&a.socket)?;
    let opts = thaw_virtiofs::VirtiofsOptions {
        request_queues: a.queues,
        queue_size: a.queue_size,
        drain_timeout: a.image.fetch_timeout(),
        ..thaw_virtiofs::VirtiofsOptions::new(&a.socket)
    };
    let say = Announce {
        what: "virtiofs backend",
        done: format!("serving {r} over virtio-fs on {}", a.socket.display()),
    };
    attach(&r, &a.image, &log, say, &|rt, image, ready| {
        let socket = opts.socket.display().to_string();
        let ended = thaw_virtiofs::serve(
            image,
            &opts,
            rt.handle(),
            || ready(format!("serving {r} over virtio-fs on {socket}")),
            shutdown_signal(),
        )?;
        tracing::info!(?ended, "virtio-fs backend stopped");
        Ok(())
    })
}

/// Unmounts, then waits for the mount's process to finish its cache writes and exit.
pub fn umount(a: UmountArgs) -> Result<()> {
    thaw_fuse::unmount_and_wait(&a.mountpoint, Duration::from_secs(15))?;
    Ok(())
}

pub fn stats(a: StatsArgs) -> Result<()> {
    let s = thaw_fuse::query_stats(&a.place)?;
    if a.json {
        return print_json(&s);
    }
    println!("image       {}  ({})", s.image, s.manifest);
    println!("attached    {} at {}", s.transport, s.attached_at);
    println!("server      {} ({} failovers)", s.server, s.failovers);
    println!("reads       {} ({})", s.reads, human(s.read_bytes));
    if s.pushes > 0 {
        println!(
            "pushed      {} to the page cache ahead of reads, in {} messages",
            human(s.pushed_bytes),
            s.pushes
        );
    }
    println!(
        "fetched     {} chunks, {} of {} image bytes ({:.1}%), {} by readahead",
        s.chunks_fetched,
        human(s.bytes_fetched),
        human(s.image_bytes),
        if s.image_bytes > 0 {
            s.bytes_fetched as f64 * 100.0 / s.image_bytes as f64
        } else {
            0.0
        },
        s.prefetched
    );
    println!(
        "hits        memory {}, disk {} (and {} small reads of part of a chunk), joined in-flight {}",
        s.mem_hits, s.disk_hits, s.disk_slice_hits, s.joined
    );
    println!(
        "latency     fetch p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.fetch_ms_p50, s.fetch_ms_p90, s.fetch_ms_p99, s.fetch_ms_max
    );
    let source = match s.profile_source.as_str() {
        "" => String::new(),
        from => format!(" ({from})"),
    };
    println!(
        "profile     {}{source} after {:.0} ms: {} of {} chunks streamed in {} batches ({}), {} loaded from disk, {} fetched alone",
        s.profile,
        s.profile_stream_ms,
        s.profile_chunks_streamed,
        s.profile_chunks,
        s.profile_batches,
        human(s.profile_bytes_streamed),
        s.profile_chunks_loaded,
        s.profile_fallbacks
    );
    println!(
        "errors      fetch {}, digest mismatch {}, corrupt cache entries {}, cache write {}; evicted {}",
        s.fetch_errors, s.digest_mismatches, s.disk_corrupt, s.disk_write_errors, s.disk_evicted
    );
    if !s.last_error.is_empty() {
        println!("last error  {}", s.last_error);
    }
    Ok(())
}
