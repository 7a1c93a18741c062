//! Subcommands and their arguments.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thaw_client::push::PushOptions;
use thaw_client::{ImageRef, Remote};
use thaw_format::{Chunking, ChunkingMode};
use thaw_server::ServerConfig;

#[derive(Parser)]
#[command(
    name = "thaw",
    version,
    about = "Lazy-loading chunk store for fast VM and container cold starts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP chunk server.
    Serve(ServeArgs),
    /// Check every chunk and manifest of a store against its name.
    Fsck(FsckArgs),
    /// Remove the chunks, manifests and profiles of a store that no tag reaches.
    Gc(GcArgs),
    /// Push a directory as an image: upload only missing chunks, then set the tag.
    Push(PushArgs),
    /// Download a whole image into a new directory (the full pull).
    Export(ExportArgs),
    /// Summarize an image.
    Inspect(InspectArgs),
    /// Mount an image read-only; chunks are fetched the first time they are read.
    Mount(crate::attach::MountArgs),
    /// Serve an image to a VM over virtio-fs (a vhost-user-fs backend); chunks are fetched on first read.
    Virtiofs(crate::attach::VirtiofsArgs),
    /// Unmount a thaw mount.
    Umount(crate::attach::UmountArgs),
    /// Show an image's counters (by mountpoint): chunks and bytes fetched, cache hits, fetch latency.
    Stats(crate::attach::StatsArgs),
    /// Serve, push, mount and read a generated image, with no setup, and report.
    Demo(crate::bench::DemoArgs),
    /// Measure cold starts: full pull, lazy cold, lazy warm, local and peers.
    Bench(crate::bench::BenchArgs),
    /// Working-set profiles: record what a start reads, for the next cold start to stream.
    Profile(crate::profile::ProfileArgs),
    /// VM memory snapshots as images: run, snapshot, restore lazily (QEMU).
    Vm {
        #[command(subcommand)]
        command: crate::vm::VmCommand,
    },
}

/// How to reach a chunk server.
#[derive(Args)]
pub struct AccessArgs {
    /// File holding the bearer token for the server.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// PEM bundle of the certificate authorities to trust for an https:// server.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Another chunk server over the same store, tried after the reference's
    /// own when a request fails (connection error, timeout, 5xx); repeat it
    /// for more, tried in order. It takes the reference's scheme unless it
    /// names one (https://HOST:PORT), and the same token and CAs.
    #[arg(long = "server", value_name = "HOST:PORT", global = true)]
    servers: Vec<String>,
}

/// What [`AccessArgs`] name, read before anything starts.
pub(crate) struct Access {
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    servers: Vec<String>,
}

impl AccessArgs {
    pub(crate) fn read(&self) -> Result<Access> {
        let ca_pem = match &self.ca_file {
            Some(p) => Some(
                std::fs::read(p).with_context(|| format!("cannot read CA file {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Access {
            token: read_token(self.token_file.as_deref())?,
            ca_pem,
            servers: self.servers.clone(),
        })
    }
}

impl AccessArgs {
    /// Passes these flags on to another `thaw` command.
    pub(crate) fn pass_to(&self, cmd: &mut std::process::Command) {
        if let Some(t) = &self.token_file {
            cmd.arg("--token-file").arg(t);
        }
        if let Some(c) = &self.ca_file {
            cmd.arg("--ca-file").arg(c);
        }
        for s in &self.servers {
            cmd.arg("--server").arg(s);
        }
    }
}

impl Access {
    pub(crate) fn remote(self, r: &ImageRef) -> Result<Remote> {
        let remote = Remote::for_ref(r, self.token)?.with_servers(&self.servers)?;
        Ok(match self.ca_pem {
            Some(pem) => remote.with_ca_pem(&pem)?,
            None => remote,
        })
    }
}

/// A path made absolute against the current directory, for a file a
/// background process writes later.
pub(crate) fn absolute_path(s: &str) -> Result<std::path::PathBuf, String> {
    std::path::absolute(s).map_err(|e| format!("{s}: {e}"))
}

/// Parses `1234`, `64K`, `512M`, `10G`, `1T` (powers of 1024).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("bad size {s:?}: use a number with K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad size {s:?}: use a number with K, M, G or T"))?;
    if n.is_nan() || n < 0.0 {
        return Err(format!("bad size {s:?}"));
    }
    Ok((n * mult as f64) as u64)
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Store URL: file:///dir, s3://bucket/prefix (AWS_* variables), memory://.
    /// Default: a directory under ~/.local/share/thaw/store.
    #[arg(long)]
    store: Option<String>,
    /// Byte budget of the in-memory hot chunk cache.
    #[arg(long, default_value_t = 256 << 20)]
    cache_mem: u64,
    /// File holding the bearer token required for uploads.
    #[arg(long)]
    push_token_file: Option<PathBuf>,
    /// File holding the bearer token required for downloads.
    #[arg(long)]
    pull_token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow listening on a non-loopback address without TLS or without a push
    /// token (behind a TLS-terminating proxy, say).
    #[arg(long)]
    insecure: bool,
    /// Reads served at once.
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
    /// Uploads served at once (apart from other requests).
    #[arg(long, default_value_t = ServerConfig::default().max_uploads)]
    max_uploads: usize,
    /// Bytes of request bodies held at once (suffixes K, M, G); bodies wait for room.
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    body_memory: u64,
    /// Bytes of frames, manifests and profiles held at once by responses being
    /// sent (suffixes K, M, G); reads wait for room, and close the client that
    /// stopped reading longest to make some.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    response_memory: u64,
    /// Connections open at once; at the cap a new one closes the one idle longest.
    #[arg(long, default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Seconds a client has to send a whole request head.
    #[arg(long, default_value_t = ServerConfig::default().header_timeout.as_secs())]
    header_timeout: u64,
    /// Seconds a connection may idle between requests, or without reading its response.
    #[arg(long, default_value_t = ServerConfig::default().idle_timeout.as_secs())]
    idle_timeout: u64,
    /// Seconds a request body has to arrive.
    #[arg(long, default_value_t = ServerConfig::default().body_timeout.as_secs())]
    body_timeout: u64,
    /// Seconds the requests in flight have to finish on shutdown.
    #[arg(long, default_value_t = ServerConfig::default().shutdown_grace.as_secs())]
    shutdown_grace: u64,
}

#[derive(Args)]
pub struct GcArgs {
    /// Store URL, as for `thaw serve`. Default: the directory `thaw serve` uses.
    #[arg(long)]
    store: Option<String>,
    /// Seconds an object must be old to be removed, and removed objects are
    /// kept in the store's trash: longer than any push takes.
    #[arg(long, default_value_t = thaw_server::GcOptions::default().grace.as_secs())]
    grace: u64,
    /// Versions of each tag to keep: the current one and the ones before it.
    #[arg(long, default_value_t = 1)]
    keep: usize,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FsckArgs {
    /// Store URL, as for `thaw serve`. Default: the directory `thaw serve` uses.
    #[arg(long)]
    store: Option<String>,
    /// Move what does not match to quarantine/ in the store, where the server no longer sees it.
    #[arg(long)]
    quarantine: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChunkingArg {
    Fixed,
    Cdc,
}

#[derive(Clone, Copy, ValueEnum)]
enum CodecArg {
    Lz4,
    Zstd,
}

/// The codec `--codec` and `--level` ask for.
fn codec(c: CodecArg, level: Option<i32>) -> Result<thaw_format::frame::Codec> {
    use thaw_format::frame::Codec;
    Ok(match (c, level) {
        (CodecArg::Lz4, None) => Codec::DEFAULT,
        (CodecArg::Zstd, None) => Codec::Zstd(3),
        (CodecArg::Lz4, Some(l @ 3..=12)) => Codec::Lz4(l),
        (CodecArg::Zstd, Some(l @ 1..=22)) => Codec::Zstd(l),
        (CodecArg::Lz4, Some(l)) => bail!("--level {l}: lz4 levels are 3 to 12"),
        (CodecArg::Zstd, Some(l)) => bail!("--level {l}: zstd levels are 1 to 22"),
    })
}

#[derive(Args)]
pub struct ClientArgs {
    #[command(flatten)]
    access: AccessArgs,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct PushArgs {
    dir: PathBuf,
    /// [http://]HOST:PORT/NAME:TAG
    reference: String,
    #[arg(long, value_enum, default_value = "fixed")]
    chunking: ChunkingArg,
    /// Chunk size in bytes: a power of two from 64 KiB to 16 MiB.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_size: u32,
    /// How chunks are compressed: LZ4 inflates about four times as fast as
    /// zstd (what a cold start waits on over a fast network) for 10-20% more
    /// bytes; zstd for slow links.
    #[arg(long, value_enum, default_value = "lz4")]
    codec: CodecArg,
    /// Compression level [default: 4 for lz4 (3-12), 3 for zstd (1-22)].
    #[arg(long)]
    level: Option<i32>,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The image whose working-set profile lays out this push (the small
    /// files its start read packed first, in read order) and is carried to
    /// it. Default: the image the tag names now, if it has a profile.
    #[arg(long, value_name = "REF")]
    profile_from: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct ExportArgs {
    reference: String,
    /// A new or empty directory.
    dir: PathBuf,
    /// Batch reads in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// For images you do not trust: no device nodes, no setuid/setgid bits,
    /// no ownership, only user.* xattrs (by default, as root, all are kept).
    #[arg(long)]
    safe: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    reference: String,
    #[command(flatten)]
    client: ClientArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    // Background attachments fork before the runtime starts its threads.
    let cli = match cli.command {
        Command::Mount(a) => return crate::attach::mount(a),
        Command::Virtiofs(a) => return crate::attach::virtiofs(a),
        command => Cli { command },
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(a) => rt.block_on(serve(a)),
        Command::Fsck(a) => rt.block_on(fsck(a)),
        Command::Gc(a) => rt.block_on(gc(a)),
        Command::Push(a) => rt.block_on(push(a)),
        Command::Export(a) => rt.block_on(export(a)),
        Command::Inspect(a) => rt.block_on(inspect(a)),
        Command::Mount(_) | Command::Virtiofs(_) => unreachable!("handled above"),
        Command::Umount(a) => crate::attach::umount(a),
        Command::Stats(a) => crate::attach::stats(a),
        Command::Demo(a) => crate::bench::demo(a),
        Command::Bench(a) => crate::bench::run(a),
        Command::Profile(a) => crate::profile::run(a),
        Command::Vm { command } => crate::vm::run(command),
    }
}

pub(crate) fn read_token(path: Option<&Path>) -> Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(Some(token))
}

/// The default store: a directory in the user's data directory.
pub(crate) fn default_store() -> String {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    format!("file://{}", base.join("thaw/store").display())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let push_token = read_token(a.push_token_file.as_deref())?;
    let exposed = !a.listen.ip().is_loopback() && !a.insecure;
    if exposed && push_token.is_none() {
        bail!("refusing to listen on {} without --push-token-file: anyone could upload (pass --insecure to allow)", a.listen);
    }
    if exposed && a.tls_cert.is_none() {
        bail!("refusing to listen on {} without --tls-cert and --tls-key: tokens would travel in cleartext (pass --insecure behind a TLS-terminating proxy)", a.listen);
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            Some(thaw_server::tls_config(&read(cert)?, &read(key)?)?)
        }
        _ => None,
    };
    let config = ServerConfig {
        store_url: a.store.unwrap_or_else(default_store),
        cache_mem: a.cache_mem,
        push_token,
        pull_token: read_token(a.pull_token_file.as_deref())?,
        max_concurrency: a.max_concurrency,
        max_uploads: a.max_uploads,
        body_memory: a.body_memory,
        response_memory: a.response_memory,
        max_connections: a.max_connections,
        header_timeout: Duration::from_secs(a.header_timeout),
        idle_timeout: Duration::from_secs(a.idle_timeout),
        body_timeout: Duration::from_secs(a.body_timeout),
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        tls,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port.
    println!(
        "thaw serve: listening on {addr}{} (store {})",
        if config.tls.is_some() {
            " with TLS"
        } else {
            ""
        },
        config.store_url
    );
    thaw_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

async fn gc(a: GcArgs) -> Result<()> {
    let url = a.store.unwrap_or_else(default_store);
    let store = thaw_server::open_store(&url)?;
    let options = thaw_server::GcOptions {
        grace: Duration::from_secs(a.grace),
        keep: a.keep,
        dry_run: a.dry_run,
        ..Default::default()
    };
    let r = thaw_server::gc(&store, &options)
        .await
        .with_context(|| format!("cannot collect the store {url}"))?;
    if a.json {
        return print_json(&r);
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!(
        "{url}: {} tags, {} live manifests, {} live chunks ({} objects scanned in {:.1}s)",
        r.tags, r.live_manifests, r.live_chunks, r.scanned, r.seconds
    );
    println!(
        "{verb} {} chunks, {} manifests, {} profiles ({}) and {} tag versions; brought back {}, deleted {} from the trash",
        r.chunks_removed,
        r.manifests_removed,
        r.profiles_removed,
        human(r.bytes_removed),
        r.history_removed,
        r.restored,
        r.trash_deleted
    );
    Ok(())
}

async fn fsck(a: FsckArgs) -> Result<()> {
    let url = a.store.unwrap_or_else(default_store);
    let store = thaw_server::open_store(&url)?;
    let options = thaw_server::FsckOptions {
        quarantine: a.quarantine,
        ..Default::default()
    };
    let spinner = if !a.json && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = |r: &thaw_server::FsckReport| {
        spinner.set_message(format!(
            "checked {} chunks, {} manifests, {}; {} bad",
            r.chunks,
            r.manifests,
            human(r.bytes),
            r.bad.len()
        ));
        spinner.tick();
    };
    let report = thaw_server::fsck(&store, &options, &progress)
        .await
        .with_context(|| format!("cannot check the store {url}"))?;
    spinner.finish_and_clear();
    if a.json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} chunks and {} manifests ({}) in {url}",
            report.chunks,
            report.manifests,
            human(report.bytes)
        );
        for bad in &report.bad {
            let moved = if bad.quarantined {
                " (quarantined)"
            } else {
                ""
            };
            println!("bad         {}: {}{moved}", bad.path, bad.reason);
        }
        for m in &report.incomplete_manifests {
            println!(
                "incomplete  manifest {}: {} chunks not stored or bad; push its image again",
                m.manifest, m.missing_chunks
            );
        }
    }
    if !report.is_clean() {
        let hint = if a.quarantine || report.bad.is_empty() {
            ""
        } else {
            " (--quarantine moves bad objects aside, so a push uploads them again)"
        };
        bail!(
            "{} bad objects, {} incomplete manifests{hint}",
            report.bad.len(),
            report.incomplete_manifests.len()
        );
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub(crate) fn remote_for(r: &ImageRef, c: &ClientArgs) -> Result<Remote> {
    c.access.read()?.remote(r)
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

async fn push(a: PushArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    let remote = remote_for(&r, &a.client)?;
    let mode = match a.chunking {
        ChunkingArg::Fixed => ChunkingMode::Fixed,
        ChunkingArg::Cdc => ChunkingMode::Cdc,
    };
    let opts = PushOptions {
        chunking: Chunking::new(mode, a.chunk_size).map_err(anyhow::Error::msg)?,
        codec: codec(a.codec, a.level)?,
        concurrency: a.concurrency,
        progress: !a.client.json && std::io::stderr().is_terminal(),
        profile_from: a.profile_from.as_deref().map(ImageRef::parse).transpose()?,
    };
    let report = thaw_client::push::push(&a.dir, &r, &remote, &opts)
        .await
        .with_context(|| format!("push of {} failed", a.dir.display()))?;
    if a.client.json {
        return print_json(&report);
    }
    println!(
        "pushed {} as {}\n  {} files, {}, {} chunks; uploaded {} chunks ({}) in {:.2}s",
        a.dir.display(),
        report.manifest,
        report.files,
        human(report.bytes),
        report.chunks,
        report.chunks_uploaded,
        human(report.bytes_uploaded),
        report.seconds
    );
    if report.profile_carried > 0 {
        println!(
            "  carried the previous version's profile: a working set of {} chunks",
            report.profile_carried
        );
    }
    Ok(())
}

async fn export(a: ExportArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    let remote = remote_for(&r, &a.client)?;
    let opts = thaw_client::export::ExportOptions {
        concurrency: a.concurrency,
        safe: a.safe,
    };
    let report = thaw_client::export::export(&r, &remote, &a.dir, &opts)
        .await
        .with_context(|| format!("export of {r} failed"))?;
    if a.client.json {
        return print_json(&report);
    }
    println!(
        "exported {} into {}: {} files, {}; fetched {} chunks ({}) in {:.2}s",
        report.manifest,
        a.dir.display(),
        report.files,
        human(report.bytes),
        report.chunks_fetched,
        human(report.bytes_fetched),
        report.seconds
    );
    if report.skipped > 0 {
        println!(
            "  safe export: left out {} device nodes, privileged mode bits or xattrs",
            report.skipped
        );
    }
    Ok(())
}

async fn inspect(a: InspectArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    let remote = remote_for(&r, &a.client)?;
    let s = thaw_client::inspect::inspect(&r, &remote).await?;
    if a.client.json {
        return print_json(&s);
    }
    println!(
        "image     {r}\nmanifest  {} ({})",
        s.manifest,
        human(s.manifest_bytes)
    );
    println!(
        "entries   {} files, {} dirs, {} symlinks, {} hardlinks, {} other",
        s.files, s.dirs, s.symlinks, s.hardlinks, s.other
    );
    println!(
        "data      {} logical, {} in holes",
        human(s.bytes),
        human(s.hole_bytes)
    );
    println!(
        "chunks    {} references, {} unique ({}), stored {} (ratio {:.2}), chunk size {}",
        s.chunks,
        s.unique_chunks,
        human(s.unique_bytes),
        human(s.stored_bytes),
        s.compression_ratio,
        human(u64::from(s.chunk_size))
    );
    match &s.profile {
        Some(p) => crate::profile::print_summary(p),
        None => println!("profile   none (thaw profile record, or thaw mount --record, makes one)"),
    }
    Ok(())
}
