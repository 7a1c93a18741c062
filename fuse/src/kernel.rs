//! Talking to the kernel about mounts: readahead, unmounting, detaching the
//! mount of a process that died, waiting for a mount's process to exit.

use crate::options::FuseError;
use std::path::Path;
use std::time::{Duration, Instant};

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

fn umount2(mountpoint: &Path, flags: i32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    match unsafe { libc::umount2(c.as_ptr(), flags) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Unmounts a FUSE mount (as root directly, else through `fusermount3`).
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    if umount2(mountpoint, 0).is_ok() {
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
pub(crate) fn detach(mountpoint: &Path) -> bool {
    umount2(mountpoint, libc::MNT_DETACH).is_ok()
        || std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .status()
            .is_ok_and(|s| s.success())
}

/// Unmounts a thaw mount, then waits (up to `timeout`) for its process to
/// finish its cache writes and exit, so a remount finds what it fetched.
pub fn unmount_and_wait(mountpoint: &Path, timeout: Duration) -> Result<(), FuseError> {
    let pid = thaw_client::image::control::query(mountpoint)
        .ok()
        .map(|s| s.pid)
        .filter(|&p| p != 0);
    let deadline = Instant::now() + timeout;
    // A process that has just exited (a VMM that mapped the image's files)
    // may still be letting go of them: busy is asked again until the deadline.
    loop {
        match umount2(mountpoint, 0) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => {
                unmount(mountpoint)?;
                break;
            }
        }
    }
    let Some(pid) = pid else { return Ok(()) };
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
