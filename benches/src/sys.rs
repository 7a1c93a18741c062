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

/// Raises this process's soft limit on open files to its hard limit (at
/// most `want`); returns the soft limit now in force. Children inherit it.
pub fn raise_open_files(want: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max.min(want).max(limit.rlim_cur);
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user and system) a process has used so far, from `/proc/<pid>/stat`.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / per_sec))
}

/// CPU time (user and system) this process has used so far.
pub fn own_cpu() -> Duration {
    proc_cpu(std::process::id()).unwrap_or_default()
}
