//! `virtiofsd`, the reference virtio-fs backend: a local directory served to
//! a guest, the ceiling a lazy backend is measured against.

use super::{GuestError, GuestKit};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A `virtiofsd` process serving one directory on one socket; killed on drop.
/// It serves one QEMU: a restored guest needs a new one on the same socket.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts serving `shared_dir` on `socket` and returns once it listens.
    /// Its log goes to `<socket>.log`.
    pub fn spawn(
        kit: &GuestKit,
        shared_dir: &Path,
        socket: &Path,
    ) -> Result<Virtiofsd, GuestError> {
        let bin = kit.virtiofsd().map_err(|why| GuestError::Io {
            what: "find virtiofsd".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, why),
        })?;
        let log = socket.with_extension("log");
        let log_file = std::fs::File::create(&log)
            .map_err(GuestError::io(format!("create {}", log.display())))?;
        let _ = std::fs::remove_file(socket);
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared_dir)
            // No namespaces or seccomp filter: tests run in containers too.
            .args(["--sandbox", "none", "--seccomp", "none", "--cache", "auto"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(GuestError::io(format!("run {}", bin.display())))?;
        let mut daemon = Virtiofsd {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        daemon.wait_listening()?;
        Ok(daemon)
    }

    fn wait_listening(&mut self) -> Result<(), GuestError> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !self.socket.exists() {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(GuestError::io("wait for virtiofsd"))?
            {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(GuestError::Io {
                    what: format!("virtiofsd exited ({status})"),
                    source: std::io::Error::other(log),
                });
            }
            if Instant::now() >= deadline {
                return Err(GuestError::Timeout {
                    what: format!("virtiofsd to listen on {}", self.socket.display()),
                    waited: LISTEN_TIMEOUT,
                    console: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
