//! thaw's VM glue: VM memory snapshots as thaw images, restored lazily.
//!
//! The fastest start of an agent VM is not a boot but the resume of a memory
//! snapshot taken once the environment was imported. A snapshot here is a
//! directory that becomes an ordinary thaw image:
//!
//! ```text
//! vm.json   the VM's spec (VMM, memory, CPUs, kernel command line)
//! kernel    the kernel and initramfs it booted (restore needs the same)
//! initrd
//! memory    guest RAM, a sparse file: pages never touched are holes
//! state     the VMM's device state (QEMU: a migration stream without RAM)
//! ```
//!
//! Pushed with thaw, zero pages and untouched memory are never stored or
//! fetched, and unchanged memory deduplicates across snapshots of one base.
//! To restore, the image is mounted (chunks arrive on first read) and the
//! VMM maps `memory` privately: each page the guest touches faults in
//! through the mount, verified and cached, and the guest's writes stay in its
//! own copy. Pages it never touches never move.
//!
//! [`qemu`] drives QEMU this way (the technique Kata uses for VM templates:
//! RAM in a shared file while the template runs, `x-ignore-shared`
//! migration so the stream holds only device state, and a private,
//! read-only-opened mapping of the file on restore). [`qmp`] is the monitor
//! client. [`cloud_hypervisor`] is the client of Cloud Hypervisor's REST
//! API, whose `OnDemand` restore reads each faulting page from the
//! snapshot's memory file, here on a thaw mount; [`CloudHypervisor`] drives
//! one Cloud Hypervisor process per VM directory with it. Both are a [`Vmm`],
//! and a VM directory's `vm.json` says which one it runs ([`vmm_of`]).
//! [`pool`] keeps restored, paused QEMU VMs ready and hands them out running.

pub mod cloud_hypervisor;
pub mod pool;
pub mod qemu;
pub mod qmp;
mod spec;

pub use cloud_hypervisor::CloudHypervisor;
pub use qemu::Qemu;
pub use spec::{VmSpec, CLOUD_HYPERVISOR, QEMU, SPEC_FILE};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `thaw vm` asks of a VMM. A VM directory holds the image-to-be in
/// `image/` (kernel, initrd, `vm.json`, the VMM's memory and state once
/// snapshotted), the VMM's API socket, the serial console socket
/// (`console.sock`) and the VMM's pid file.
pub trait Vmm {
    /// Boots a VM in `dir` from `kernel` (and `initrd`) with `spec`; returns
    /// once the VMM runs in the background.
    fn run(&self, dir: &Path, kernel: &Path, initrd: Option<&Path>, spec: &VmSpec) -> Result<()>;
    /// Pauses the VM and writes its snapshot into `image/`; the VM stays
    /// paused. Returns how long that took.
    fn snapshot(&self, dir: &Path) -> Result<Duration>;
    /// Starts a VM in `dir` from the snapshot at `image` (a thaw mount),
    /// memory on demand, and continues it unless `paused`. Returns how long
    /// the VMM's start and the restore took.
    fn restore(&self, dir: &Path, image: &Path, paused: bool) -> Result<Duration>;
    /// Continues a paused VM.
    fn resume(&self, dir: &Path) -> Result<()>;
    /// Ends the VM and waits for its VMM to exit.
    fn quit(&self, dir: &Path) -> Result<()>;
    /// What the VM is doing now.
    fn status(&self, dir: &Path) -> Result<Status>;
    /// The socket that drives the VMM (QMP, Cloud Hypervisor's API).
    fn control_socket(&self, dir: &Path) -> PathBuf;
}

/// Whether the VMM runs for a VM directory, and as what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The VMM runs; the VM's state as the VMM gives it (`running`,
    /// `paused`...), lower case.
    Up(String),
    /// No VMM runs for this directory: it was never started, it was
    /// stopped, or it died.
    Gone,
}

/// The VMM named `name` in a `vm.json` (`qemu`, `cloud-hypervisor`).
pub fn vmm_named(name: &str) -> Result<Box<dyn Vmm>> {
    match name {
        spec::QEMU => Ok(Box::new(Qemu)),
        spec::CLOUD_HYPERVISOR => Ok(Box::new(CloudHypervisor)),
        other => Err(VmError::Spec(format!(
            "unknown VMM {other:?} (known: {}, {})",
            spec::QEMU,
            spec::CLOUD_HYPERVISOR
        ))),
    }
}

/// The VMM of the VM in `dir`, from `dir/image/vm.json`. A VM of a pool
/// has no image of its own (it maps the pool's): QEMU, whose files it has.
pub fn vmm_of(dir: &Path) -> Result<Box<dyn Vmm>> {
    match VmSpec::read(&image_dir(dir)) {
        Ok(spec) => vmm_named(&spec.vmm),
        Err(VmError::NotAVm(_)) if qemu::qmp_socket(dir).exists() => Ok(Box::new(Qemu)),
        Err(e) => Err(e),
    }
}

/// Where a VM directory keeps its image.
pub fn image_dir(dir: &Path) -> PathBuf {
    dir.join("image")
}

/// The VM's serial console, a unix socket.
pub fn console_socket(dir: &Path) -> PathBuf {
    dir.join("console.sock")
}

/// Copies `kernel` and `initrd` into `dir/image` and writes `spec` there:
/// what a boot starts from and a snapshot carries.
pub(crate) fn prepare_image(
    dir: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    spec: &VmSpec,
) -> Result<PathBuf> {
    let image = image_dir(dir);
    std::fs::create_dir_all(&image).map_err(VmError::io(format!("create {}", image.display())))?;
    let copy = |from: &Path, name: &str| {
        std::fs::copy(from, image.join(name))
            .map(|_| ())
            .map_err(VmError::io(format!("copy {}", from.display())))
    };
    copy(kernel, "kernel")?;
    if let Some(initrd) = initrd {
        copy(initrd, "initrd")?;
    }
    spec.write(&image)?;
    Ok(image)
}

/// Whether the process in the pid file `pid_file` runs and is `what`
/// (a name in its command line): a dead VMM may leave its pid file, and
/// its pid may be reused.
pub(crate) fn process_runs(pid_file: &Path, what: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // A zombie (a VMM started by this process that died) does not run.
    (String::from_utf8_lossy(&cmdline).contains(what) && !is_zombie(pid)).then_some(pid)
}

/// Waits up to `limit` for the process `pid` to be gone (or a zombie).
pub(crate) fn wait_gone(pid: u32, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    while proc.exists() && !is_zombie(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` has exited and waits to be reaped (state `Z` in its stat,
/// after the parenthesized command name).
fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .is_some_and(|s| s.trim_start().starts_with('Z'))
}

/// Errors of the VM glue.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error("{0} is not a VM directory: no {SPEC_FILE} (start one with `thaw vm run`)")]
    NotAVm(String),
    #[error("bad {SPEC_FILE}: {0}")]
    Spec(String),
    #[error("QEMU {0}")]
    Qemu(String),
    #[error("{0}")]
    Vmm(String),
    #[error("Cloud Hypervisor refused {action} ({status}): {message}")]
    Api {
        action: String,
        status: u16,
        message: String,
    },
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, VmError>;
