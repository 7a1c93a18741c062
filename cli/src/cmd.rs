//! Subcommands and their arguments.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thaw_client::push::PushOptions;
use thaw_client::{ImageRef, Remote};
use thaw_format::{Chunking, ChunkingMode};

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
    /// Push a directory as an image: upload only missing chunks, then set the tag.
    Push(PushArgs),
    /// Download a whole image into a new directory (the full pull).
    Export(ExportArgs),
    /// Summarize an image.
    Inspect(InspectArgs),
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
    /// Allow listening on a non-loopback address without a push token.
    #[arg(long)]
    insecure: bool,
    /// Requests served at once.
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChunkingArg {
    Fixed,
    Cdc,
}

#[derive(Args)]
pub struct ClientArgs {
    /// File holding the bearer token for the server.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
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
    /// zstd compression level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
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
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(a) => rt.block_on(serve(a)),
        Command::Push(a) => rt.block_on(push(a)),
        Command::Export(a) => rt.block_on(export(a)),
        Command::Inspect(a) => rt.block_on(inspect(a)),
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
    if !a.listen.ip().is_loopback() && push_token.is_none() && !a.insecure {
        bail!("refusing to listen on {} without --push-token-file: anyone could upload (pass --insecure to allow)", a.listen);
    }
    let config = thaw_server::ServerConfig {
        store_url: a.store.unwrap_or_else(default_store),
        cache_mem: a.cache_mem,
        push_token,
        pull_token: read_token(a.pull_token_file.as_deref())?,
        max_concurrency: a.max_concurrency,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port.
    println!(
        "thaw serve: listening on {addr} (store {})",
        config.store_url
    );
    thaw_server::run(listener, config, shutdown_signal()).await?;
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

fn remote_for(r: &ImageRef, c: &ClientArgs) -> Result<Remote> {
    Ok(Remote::for_ref(r, read_token(c.token_file.as_deref())?)?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human(bytes: u64) -> String {
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
        level: a.level,
        concurrency: a.concurrency,
        progress: !a.client.json && std::io::stderr().is_terminal(),
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
    Ok(())
}

async fn export(a: ExportArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    let remote = remote_for(&r, &a.client)?;
    let report = thaw_client::export::export(&r, &remote, &a.dir, a.concurrency)
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
    Ok(())
}
