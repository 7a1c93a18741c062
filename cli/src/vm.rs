//! `thaw vm`: boot a VM whose memory is a file, snapshot it into a thaw
//! image, and restore it lazily from a thaw mount (`thaw-vmm`).

use crate::cmd::{human, parse_bytes, AccessArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;
use thaw_client::push::PushOptions;
use thaw_client::ImageRef;
use thaw_format::{Chunking, ChunkingMode};
use thaw_vmm::{qemu, VmSpec};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a VM (QEMU) in DIR whose RAM is DIR/image/memory, in the background.
    Run(RunArgs),
    /// Pause the VM in DIR, save its device state and push DIR/image as an image.
    Snapshot(SnapshotArgs),
    /// Mount a snapshot image at DIR/image and resume the VM from it, memory on demand.
    Restore(RestoreArgs),
    /// Continue a paused VM.
    Resume(DirArgs),
    /// End the VM in DIR (and unmount its image if it was restored).
    Stop(DirArgs),
    /// Keep N VMs restored from REF paused in DIR, refilled in the background.
    Pool(PoolArgs),
    /// Take a running VM from the pool in DIR; prints its directory and sockets.
    Claim(ClaimArgs),
}

#[derive(Args)]
pub struct PoolArgs {
    reference: String,
    dir: PathBuf,
    /// VMs kept ready.
    #[arg(long, default_value_t = 2)]
    size: usize,
    /// Shared on-disk chunk cache [default: ~/.cache/thaw].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args)]
pub struct ClaimArgs {
    dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    dir: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    append: String,
    /// Guest memory (suffixes K, M, G).
    #[arg(long, default_value = "512M", value_parser = parse_bytes)]
    memory: u64,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// QEMU accelerator: kvm, or tcg where there is no KVM.
    #[arg(long, default_value = "kvm")]
    accel: String,
}

#[derive(Args)]
pub struct SnapshotArgs {
    dir: PathBuf,
    /// The image to push the snapshot as.
    #[arg(long)]
    push: String,
    /// Chunk size of the snapshot's files: a page fault fetches one chunk.
    #[arg(long, default_value = "256K", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Continue the VM after the push (it stays paused otherwise).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    reference: String,
    dir: PathBuf,
    /// Shared on-disk chunk cache [default: ~/.cache/thaw].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Load the state but leave the VM paused.
    #[arg(long)]
    paused: bool,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args)]
pub struct DirArgs {
    dir: PathBuf,
}

pub fn run(cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Run(a) => boot(a),
        VmCommand::Snapshot(a) => snapshot(a),
        VmCommand::Restore(a) => restore(a),
        VmCommand::Resume(a) => Ok(qemu::resume(&a.dir)?),
        VmCommand::Stop(a) => stop(a),
        VmCommand::Pool(a) => pool(a),
        VmCommand::Claim(a) => claim(a),
    }
}

fn boot(a: RunArgs) -> Result<()> {
    let spec = VmSpec::qemu(
        &a.accel,
        u32::try_from(a.memory >> 20).context("memory too large")?,
        a.cpus,
        &a.append,
        a.initrd.is_some(),
    );
    qemu::run(&a.dir, &a.kernel, a.initrd.as_deref(), &spec)
        .with_context(|| format!("cannot start the VM in {}", a.dir.display()))?;
    print_sockets(&a.dir, "running");
    Ok(())
}

fn snapshot(a: SnapshotArgs) -> Result<()> {
    let r = ImageRef::parse(&a.push)?;
    let remote = a.access.read()?.remote(&r)?;
    let chunk_size = u32::try_from(a.chunk_size).context("chunk size too large")?;
    let chunking = Chunking::new(ChunkingMode::Fixed, chunk_size).map_err(anyhow::Error::msg)?;
    let saved = qemu::snapshot(&a.dir).context("cannot snapshot the VM")?;
    let image = qemu::image_dir(&a.dir);
    let opts = PushOptions {
        chunking,
        level: 3,
        concurrency: 16,
        progress: false,
        ..PushOptions::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt
        .block_on(thaw_client::push::push(&image, &r, &remote, &opts))
        .with_context(|| format!("push of {} failed", image.display()))?;
    println!(
        "snapshot saved in {:.2}s, pushed as {r} ({}): {} in {} chunks ({} new), {} uploaded",
        saved.as_secs_f64(),
        report.manifest,
        human(report.bytes),
        report.chunks,
        report.chunks_uploaded,
        human(report.bytes_uploaded)
    );
    if a.resume {
        qemu::resume(&a.dir)?;
    }
    Ok(())
}

fn restore(a: RestoreArgs) -> Result<()> {
    let image = qemu::image_dir(&a.dir);
    std::fs::create_dir_all(&image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    let started = Instant::now();
    mount(&a.reference, &image, a.cache_dir.as_deref(), &a.access)?;
    let mounted = started.elapsed();
    let loaded = qemu::restore(&a.dir, &image, a.paused)
        .with_context(|| format!("cannot restore {} in {}", a.reference, a.dir.display()));
    let loaded = match loaded {
        Ok(t) => t,
        Err(e) => {
            let _ = thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15));
            return Err(e);
        }
    };
    println!(
        "restored {} (mount {:.0} ms, QEMU start and state {:.0} ms)",
        a.reference,
        mounted.as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0
    );
    print_sockets(&a.dir, if a.paused { "paused" } else { "running" });
    Ok(())
}

/// Mounts the snapshot with a `thaw mount` process of this binary.
fn mount(reference: &str, image: &Path, cache: Option<&Path>, access: &AccessArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the thaw binary")?;
    let mut cmd = std::process::Command::new(exe);
    // Guest page faults are not sequential reads: no readahead beyond the
    // kernel's smallest window (`thaw bench --suite vm` measured both).
    cmd.arg("mount").arg(reference).arg(image).args([
        "--readahead",
        "0",
        "--kernel-readahead",
        "128K",
    ]);
    if let Some(c) = cache {
        cmd.arg("--cache-dir").arg(c);
    }
    access.pass_to(&mut cmd);
    let out = cmd.output().context("cannot run thaw mount")?;
    if !out.status.success() {
        bail!(
            "cannot mount {reference}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `thaw vm pool`: one mount of the snapshot, shared by every VM of the pool.
fn pool(a: PoolArgs) -> Result<()> {
    let image = qemu::image_dir(&a.dir);
    std::fs::create_dir_all(&image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    mount(&a.reference, &image, a.cache_dir.as_deref(), &a.access)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a signal runtime");
        rt.block_on(crate::cmd::shutdown_signal());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    eprintln!(
        "thaw: pool of {} VMs from {} in {} (claim with `thaw vm claim {}`)",
        a.size,
        a.reference,
        a.dir.display(),
        a.dir.display()
    );
    thaw_vmm::pool::serve(&a.dir, &image, a.size, &stop)?;
    // VMs that were claimed still map the image: it stays mounted until
    // they are stopped (then `thaw umount DIR/image`).
    if let Err(e) = thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15)) {
        eprintln!(
            "thaw: {} stays mounted for the claimed VMs: {e}",
            image.display()
        );
    }
    Ok(())
}

fn claim(a: ClaimArgs) -> Result<()> {
    let c = thaw_vmm::pool::claim(&a.dir)?;
    if a.json {
        return crate::cmd::print_json(&c);
    }
    println!(
        "claimed {} (running after {:.1} ms): monitor {}, console {}",
        c.dir.display(),
        c.resume_ms,
        c.monitor.display(),
        c.console.display()
    );
    Ok(())
}

fn stop(a: DirArgs) -> Result<()> {
    if qemu::qmp_socket(&a.dir).exists() {
        qemu::quit(&a.dir).context("cannot stop the VM")?;
    } else {
        eprintln!("thaw: the VM in {} is not running", a.dir.display());
    }
    let image = qemu::image_dir(&a.dir);
    // A restored VM's image is a thaw mount; a booted VM's is a directory.
    if thaw_fuse::query_stats(&image).is_ok() {
        thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15))?;
    }
    Ok(())
}

fn print_sockets(dir: &Path, state: &str) {
    println!(
        "VM {state}: monitor {}, console {}",
        qemu::qmp_socket(dir).display(),
        qemu::console_socket(dir).display()
    );
}
