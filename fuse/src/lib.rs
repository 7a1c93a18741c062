//! thaw's FUSE door: a host mount of the lazy image core.
//!
//! The image core (`thaw_client::image`) decides everything about the
//! filesystem; this crate only carries it to the kernel. [`adapter`]
//! translates `fuser` calls and replies, [`Session`] owns a mount's lifecycle
//! (mount, control socket, serving until a signal or an unmount, clean-up),
//! and [`background`] lets the command return once a forked child serves.
//! `fuser` is a dependency of this crate alone, so the core builds and is
//! tested without it.

mod adapter;
pub mod background;
mod session;

pub use session::{Ended, Session};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thaw_client::image::control;
use thaw_client::image::stats::StatsReport;

/// Why a mount could not be made, answered or removed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot mount at {} (is the fuse3 package installed, and /dev/fuse there?)", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("the mount at {} does not answer", mountpoint.display())]
    NotAnswering {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve the control socket of {}", mountpoint.display())]
    Control {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot unmount {}: not a mount, or busy", mountpoint.display())]
    Unmount { mountpoint: PathBuf },
}

/// How a mount meets the kernel.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub allow_other: bool,
    /// Kernel readahead for the mount, in bytes (0 keeps the kernel's 128 KiB).
    /// Larger keeps more reads in flight for sequential readers, but makes each
    /// page fault of an mmap'd file read (and fetch) that much around it.
    pub kernel_readahead: u64,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            allow_other: false,
            kernel_readahead: 1 << 20,
        }
    }
}

impl FuseOptions {
    fn mount_options(&self, image: &str) -> Vec<fuser::MountOption> {
        use fuser::MountOption;
        let mut options = vec![
            MountOption::RO,
            MountOption::FSName(format!("thaw:{image}")),
            MountOption::Subtype("thaw".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        if self.allow_other {
            options.push(MountOption::AllowOther);
        }
        options
    }
}

/// Where the background mount at `mountpoint` logs.
pub fn log_path(mountpoint: &Path) -> std::io::Result<PathBuf> {
    Ok(control::socket_path(mountpoint)?.with_extension("log"))
}

/// The counters of the mount at `mountpoint`.
pub fn query_stats(mountpoint: &Path) -> std::io::Result<StatsReport> {
    control::query(mountpoint)
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

fn umount2(mountpoint: &Path, flags: i32) -> bool {
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::umount2(c.as_ptr(), flags) == 0 }
}

/// Unmounts a FUSE mount (as root directly, else through `fusermount3`).
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    if umount2(mountpoint, 0) {
        return Ok(());
    }
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => Err(FuseError::Unmount {
            mountpoint: mountpoint.to_path_buf(),
        }),
    }
}

/// Lazily detaches a mount (a dead process's), as root or through `fusermount3 -z`.
fn detach(mountpoint: &Path) -> bool {
    umount2(mountpoint, libc::MNT_DETACH)
        || std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .status()
            .is_ok_and(|s| s.success())
}

/// Unmounts a thaw mount, then waits (up to `timeout`) for its process to
/// finish its cache writes and exit, so a remount finds what it fetched.
pub fn unmount_and_wait(mountpoint: &Path, timeout: Duration) -> Result<(), FuseError> {
    let pid = query_stats(mountpoint)
        .ok()
        .map(|s| s.pid)
        .filter(|&p| p != 0);
    unmount(mountpoint)?;
    let Some(pid) = pid else { return Ok(()) };
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        // A zombie (our own child, never here) would also stop the wait.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
