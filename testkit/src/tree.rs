//! Building trees with everything push must keep: files written with their
//! parents, modes, mtimes to the nanosecond, xattrs, device nodes. Each helper
//! acts on the entry itself (a symlink is never followed) and panics with the
//! path and the OS error, as a test wants.

use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes `data` to `p`, creating its parent directories.
pub fn write(p: &Path, data: &[u8]) {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    std::fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Sets the mtime of `p` itself to `ns` nanoseconds since the epoch.
pub fn set_mtime_ns(p: &Path, ns: i64) {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000),
        },
    ];
    let c = cpath(p);
    // SAFETY: `c` is a valid path and `times` holds the two timespecs utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}: {}", p.display(), errno());
}

/// Creates a FIFO or a device node (`mode` includes the file type).
pub fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> std::io::Result<()> {
    let c = cpath(p);
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    match unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev) } {
        0 => Ok(()),
        _ => Err(errno()),
    }
}

/// Sets an xattr on `p` itself.
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    xattr::set(p, name, value)
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

/// Every xattr of `p` itself as (name, value), sorted by name; none where
/// this kind of file cannot have them.
pub fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(names) = xattr::list(p) else {
        return Vec::new();
    };
    let mut out: Vec<_> = names
        .map(|name| {
            let value = xattr::get(p, &name)
                .unwrap_or_else(|e| panic!("getxattr {} of {}: {e}", name.display(), p.display()))
                .unwrap_or_default();
            (name.into_vec(), value)
        })
        .collect();
    out.sort();
    out
}
