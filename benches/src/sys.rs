//! The host the lab runs on: its page cache, the tools it has installed, its
//! mount table; and the small arithmetic every suite reports with.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Drops the page cache (root only); returns whether it could.
pub fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Drops the page cache before a suite, warning when it cannot; returns whether it could.
pub fn drop_caches_or_warn() -> bool {
    let dropped = drop_caches();
    if !dropped {
        eprintln!("thaw bench: WARNING: cannot drop the page cache (not root?): cold figures will be optimistic");
    }
    dropped
}

/// Whether `cmd` is on the PATH.
pub fn installed(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Waits until `mp` is in the mount table, or fails when `child` (the process
/// that mounts it) exits first or a minute passes.
pub fn wait_mounted(mp: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted = mp.display().to_string();
    loop {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(wanted.as_str()))
        {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("mount process exited with {st}");
        }
        if Instant::now() > deadline {
            bail!("mount did not appear");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The median (the upper one of an even count); 0 for no values.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes per second in MB/s.
pub fn mbps(bytes_per_sec: f64) -> String {
    format!("{:.0} MB/s", bytes_per_sec / 1e6)
}
