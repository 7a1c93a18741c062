//! The control socket: how `thaw stats` and `thaw umount` find a serving
//! process and read its counters, whatever door it serves through.
//!
//! Each served image answers on a unix socket in the runtime directory, named
//! by a hash of where it is attached (a mountpoint, a vhost-user socket), and
//! writes one JSON [`StatsReport`] to every connection. The runtime directory
//! is `$XDG_RUNTIME_DIR/thaw/mounts`, or `/tmp/thaw-<uid>/mounts` without it;
//! as `/tmp` is shared, the directory must be ours, not a symlink, and closed
//! to others, or nothing is created in it (a local user could otherwise have
//! root truncate a file through a planted link, or answer for a mount).

use super::stats::StatsReport;
use super::Image;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where serving processes keep their control sockets and logs; created
/// (mode 0700) if missing, refused unless it is a directory of our own that
/// no one else can write.
pub fn runtime_dir() -> std::io::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let base = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("thaw"),
        None => std::env::temp_dir().join(format!("thaw-{uid}")),
    };
    private_dir(&base, uid)?;
    private_dir(&base.join("mounts"), uid)
}

/// Creates `dir` (mode 0700) if missing; refuses it unless it is a real
/// directory owned by `uid` that no one else can write.
fn private_dir(dir: &Path, uid: u32) -> std::io::Result<PathBuf> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let md = std::fs::symlink_metadata(dir)?;
    if !md.is_dir() || md.uid() != uid || md.permissions().mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of user {uid} (a symlink, another owner, or writable by others): remove it",
                dir.display()
            ),
        ));
    }
    Ok(dir.to_path_buf())
}

/// The control socket of the image attached at `place`.
pub fn socket_path(place: &Path) -> std::io::Result<PathBuf> {
    let canon = std::fs::canonicalize(place).unwrap_or_else(|_| place.to_path_buf());
    let key = blake3::hash(canon.as_os_str().as_encoded_bytes()).to_hex();
    Ok(runtime_dir()?.join(format!("{}.sock", &key[..16])))
}

/// A control socket being served; removed on drop if it is still ours (a
/// newer server at the same place may have replaced it).
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    ino: u64,
}

impl ControlSocket {
    /// Serves `report()` as JSON to every connection on `path`, on a thread.
    pub fn serve(
        path: PathBuf,
        report: impl Fn() -> StatsReport + Send + 'static,
    ) -> std::io::Result<ControlSocket> {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let ino = std::fs::symlink_metadata(&path)?.ino();
        std::thread::Builder::new()
            .name("thaw-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let body = serde_json::to_vec(&report()).unwrap_or_default();
                    let _ = std::io::Write::write_all(&mut conn, &body);
                }
            })?;
        Ok(ControlSocket { path, ino })
    }

    /// Serves the counters of `image`, attached through `transport` at
    /// `place` (a mountpoint, a vhost-user socket), on `place`'s socket.
    pub fn for_image(
        image: &Arc<Image>,
        place: &Path,
        transport: &'static str,
    ) -> std::io::Result<ControlSocket> {
        let path = socket_path(place)?;
        let at = std::fs::canonicalize(place)
            .unwrap_or_else(|_| place.to_path_buf())
            .display()
            .to_string();
        let image = image.clone();
        ControlSocket::serve(path, move || image.report(transport, &at))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads the report of the image attached at `place` from its control socket.
pub fn query(place: &Path) -> std::io::Result<StatsReport> {
    let path = socket_path(place)?;
    let mut conn = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no thaw image answers at {} ({e})", place.display()),
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut conn, 1 << 20), &mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_directory_of_our_own_is_used() {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("fresh");
        assert_eq!(private_dir(&fresh, uid).unwrap(), fresh);
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A planted symlink to a directory someone else chose.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link, uid).is_err(), "a symlink is refused");
        // Writable by others.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            private_dir(&open, uid).is_err(),
            "a world-writable directory is refused"
        );
        // Another owner.
        assert!(
            private_dir(&fresh, uid + 1).is_err(),
            "another user's directory is refused"
        );
    }
}
