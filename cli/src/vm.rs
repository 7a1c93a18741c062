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
use thaw_vmm::{Status, VmSpec, Vmm};

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
    /// Say whether the VM in DIR runs; for a restored VM that stopped because
    /// its image could not be read, say why (and exit 1).
    Status(StatusArgs),
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
    /// The VMM: QEMU, or Cloud Hypervisor (`$THAW_CLOUD_HYPERVISOR` or
    /// `cloud-hypervisor` on the path; KVM only, no pool yet).
    #[arg(long, value_enum, default_value_t = VmmKind::Qemu)]
    vmm: VmmKind,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum VmmKind {
    Qemu,
    CloudHypervisor,
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
    /// Record what the restored VM reads of its snapshot until it is stopped,
    /// and merge it into the snapshot's profile (the next cold restore
    /// streams it ahead of the guest's faults).
    #[arg(long)]
    record: bool,
    /// Do not stream the snapshot's profile.
    #[arg(long)]
    no_profile: bool,
    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
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
        VmCommand::Resume(a) => Ok(vmm_of(&a.dir)?.resume(&a.dir)?),
        VmCommand::Status(a) => status(a),
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
    let spec = match a.vmm {
        VmmKind::Qemu => spec,
        VmmKind::CloudHypervisor => spec.for_cloud_hypervisor(),
    };
    let vmm = thaw_vmm::vmm_named(&spec.vmm)?;
    vmm.run(&a.dir, &a.kernel, a.initrd.as_deref(), &spec)
        .with_context(|| format!("cannot start the VM in {}", a.dir.display()))?;
    print_sockets(&*vmm, &a.dir, "running");
    Ok(())
}

fn snapshot(a: SnapshotArgs) -> Result<()> {
    let r = ImageRef::parse(&a.push)?;
    let remote = a.access.read()?.remote(&r)?;
    let chunk_size = u32::try_from(a.chunk_size).context("chunk size too large")?;
    let chunking = Chunking::new(ChunkingMode::Fixed, chunk_size).map_err(anyhow::Error::msg)?;
    let vmm = vmm_of(&a.dir)?;
    let saved = vmm.snapshot(&a.dir).context("cannot snapshot the VM")?;
    let image = thaw_vmm::image_dir(&a.dir);
    let opts = PushOptions {
        chunking,
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
        vmm.resume(&a.dir)?;
    }
    Ok(())
}

fn restore(a: RestoreArgs) -> Result<()> {
    let image = thaw_vmm::image_dir(&a.dir);
    std::fs::create_dir_all(&image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    let started = Instant::now();
    let profile_flags: Vec<&str> = [(a.record, "--record"), (a.no_profile, "--no-profile")]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
    mount(
        &a.reference,
        &image,
        a.cache_dir.as_deref(),
        &a.access,
        &profile_flags,
    )?;
    let mounted = started.elapsed();
    // The snapshot's own spec names its VMM.
    let loaded = vmm_of(&a.dir)
        .and_then(|vmm| Ok((vmm.restore(&a.dir, &image, a.paused)?, vmm)))
        .with_context(|| format!("cannot restore {} in {}", a.reference, a.dir.display()));
    let (loaded, vmm) = match loaded {
        Ok(done) => done,
        Err(e) => {
            let e = match read_error(&image) {
                Some(why) => e.context(format!("the snapshot could not be read: {why}")),
                None => e,
            };
            let _ = thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15));
            return Err(e);
        }
    };
    println!(
        "restored {} (mount {:.0} ms, VMM start and state {:.0} ms)",
        a.reference,
        mounted.as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0
    );
    print_sockets(&*vmm, &a.dir, if a.paused { "paused" } else { "running" });
    Ok(())
}

/// The VMM of the VM in `dir`, as its image's `vm.json` names it.
fn vmm_of(dir: &Path) -> Result<Box<dyn Vmm>> {
    thaw_vmm::vmm_of(dir).with_context(|| format!("no VM in {}", dir.display()))
}

/// Why the last read of the thaw mount at `image` failed, if one did.
fn read_error(image: &Path) -> Option<String> {
    let stats = thaw_fuse::query_stats(image).ok()?;
    Some(stats.last_error).filter(|e| !e.is_empty())
}

/// What `thaw vm status --json` prints.
#[derive(serde::Serialize)]
struct VmStatus {
    /// QEMU's run state (`running`, `paused`...), `stopped`, or `failed`: no
    /// QEMU runs and the image's last read failed. A restored VM maps its
    /// memory from the mount, so a page that cannot be read (a chunk gone
    /// from the server or damaged there, a server that does not answer
    /// within the fetch timeout) stops it rather than let it run on wrong
    /// memory.
    state: String,
    /// Why the image's last read failed, if one did.
    read_error: Option<String>,
}

fn status(a: StatusArgs) -> Result<()> {
    let read_error = read_error(&thaw_vmm::image_dir(&a.dir));
    let state = match vmm_of(&a.dir)?
        .status(&a.dir)
        .context("cannot ask the VMM")?
    {
        Status::Up(state) => state,
        Status::Gone if read_error.is_some() => "failed".to_owned(),
        Status::Gone => "stopped".to_owned(),
    };
    let failed = state == "failed";
    let report = VmStatus { state, read_error };
    if a.json {
        crate::cmd::print_json(&report)?;
    } else {
        println!("{}", report.state);
        if let Some(why) = &report.read_error {
            println!("last read of the image failed: {why}");
        }
    }
    if failed {
        bail!(
            "the VM in {} stopped: its image could not be read",
            a.dir.display()
        );
    }
    Ok(())
}

/// Mounts the snapshot with a `thaw mount` process of this binary.
fn mount(
    reference: &str,
    image: &Path,
    cache: Option<&Path>,
    access: &AccessArgs,
    extra: &[&str],
) -> Result<()> {
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
    cmd.args(extra);
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
    let image = thaw_vmm::image_dir(&a.dir);
    std::fs::create_dir_all(&image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    mount(&a.reference, &image, a.cache_dir.as_deref(), &a.access, &[])?;
    let spec = VmSpec::read(&image);
    if let Some(other) = spec.as_ref().ok().filter(|s| s.vmm != thaw_vmm::QEMU) {
        let vmm = other.vmm.clone();
        let _ = thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15));
        bail!(
            "{} is a {vmm} snapshot: the pool runs QEMU VMs only",
            a.reference
        );
    }
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
    let vmm = vmm_of(&a.dir)?;
    match vmm.status(&a.dir) {
        Ok(Status::Up(_)) => vmm.quit(&a.dir).context("cannot stop the VM")?,
        _ => eprintln!("thaw: the VM in {} is not running", a.dir.display()),
    }
    let image = thaw_vmm::image_dir(&a.dir);
    // A restored VM's image is a thaw mount; a booted VM's is a directory.
    if thaw_fuse::query_stats(&image).is_ok() {
        thaw_fuse::unmount_and_wait(&image, std::time::Duration::from_secs(15))?;
    }
    Ok(())
}

fn print_sockets(vmm: &dyn Vmm, dir: &Path, state: &str) {
    println!(
        "VM {state}: monitor {}, console {}",
        vmm.control_socket(dir).display(),
        thaw_vmm::console_socket(dir).display()
    );
}
