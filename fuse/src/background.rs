//! Serving in the background: the command forks before anything else starts,
//! the child mounts and serves, and the parent returns once the child says the
//! mount answers, or reports why it failed (as mountpoint-s3 does).
//!
//! The fork happens while the process has one thread (before the async
//! runtime exists), so the child may do anything afterwards. The child starts
//! a new session (no terminal signals), reads nothing from the terminal, and
//! writes its log to a file in the private runtime directory, opened without
//! following symlinks.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Forked {
    /// The command the user ran: wait for the child's word.
    Parent(Waiter),
    /// The serving process: say when ready.
    Child(Notifier),
}

/// The parent's end.
#[derive(Debug)]
pub struct Waiter {
    pipe: File,
    child: libc::pid_t,
    log: PathBuf,
}

/// The child's end.
#[derive(Debug)]
pub struct Notifier {
    pipe: File,
}

const READY: &str = "ready";

/// Forks. Call only while the process has a single thread.
pub fn fork(log: &Path) -> std::io::Result<Forked> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)?;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees one thread, so the child inherits no
    // locks held by others.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read);
            detach(&log_file)?;
            Ok(Forked::Child(Notifier {
                pipe: File::from(write),
            }))
        }
        child => Ok(Forked::Parent(Waiter {
            pipe: File::from(read),
            child,
            log: log.to_path_buf(),
        })),
    }
}

/// Starts a new session and points stdio away from the terminal: stdin and
/// stdout at /dev/null, stderr (the log) at `log`.
fn detach(log: &File) -> std::io::Result<()> {
    // SAFETY: setsid has no preconditions; it fails only for a group leader,
    // which a fresh child is not.
    unsafe { libc::setsid() };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (null.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Waiter {
    /// Waits for the child's word: `Ok` once it serves, else the log's tail.
    pub fn wait(self) -> Result<(), String> {
        let mut line = String::new();
        let _ = BufReader::new(self.pipe).read_line(&mut line);
        if line.trim() == READY {
            return Ok(());
        }
        let mut status = 0;
        // SAFETY: `child` is our own child; waitpid stores its status.
        unsafe { libc::waitpid(self.child, &mut status, 0) };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let why = line.trim();
        Err(if why.is_empty() {
            log.trim_end().to_owned()
        } else {
            why.to_owned()
        })
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Notifier {
    /// Tells the parent the mount answers; it may exit.
    pub fn ready(mut self) {
        let _ = writeln!(self.pipe, "{READY}");
    }

    /// Tells the parent why serving could not start.
    pub fn failed(mut self, why: &str) {
        let _ = writeln!(self.pipe, "{}", why.replace('\n', " | "));
    }
}
