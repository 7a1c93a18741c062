//! A warm pool: N VMs restored from one snapshot and left paused, so that a
//! claim only resumes one (milliseconds) and the pool restores the next in
//! the background.
//!
//! All of a pool's VMs map the same memory file privately, so the pages
//! they read are fetched once and shared in the host's page cache; each
//! VM's writes are its own. The pool answers claims on `DIR/pool.sock`: a
//! client connects and reads one JSON line ([`Claimed`]) naming the VM's
//! directory and sockets. A claimed VM is the claimer's: `thaw vm stop`
//! ends it. Guests restored from one snapshot start identical (the same
//! random state): a guest agent that needs fresh entropy must reseed after
//! a resume.

use crate::{qemu, Result, VmError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a claim waits for a VM when the pool is empty.
const CLAIM_WAIT: Duration = Duration::from_secs(60);

/// The answer to a claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claimed {
    pub dir: PathBuf,
    pub monitor: PathBuf,
    pub console: PathBuf,
    /// From the claim's arrival to the VM running, in the pool.
    pub resume_ms: f64,
}

/// The socket a pool in `dir` answers claims on.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("pool.sock")
}

#[derive(Default)]
struct Slots {
    ready: VecDeque<PathBuf>,
    next: usize,
    failed: Option<String>,
}

struct Shared {
    dir: PathBuf,
    image: PathBuf,
    size: usize,
    slots: Mutex<Slots>,
    changed: Condvar,
}

/// Serves the pool of `size` VMs restored from `image` (a mounted snapshot)
/// in `dir` until `stop` is set; then ends the VMs nobody claimed.
pub fn serve(dir: &Path, image: &Path, size: usize, stop: &AtomicBool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(VmError::io(format!("create {}", dir.display())))?;
    let path = socket(dir);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(VmError::io(format!("listen on {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(VmError::io("set the pool socket non-blocking"))?;
    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        image: image.to_path_buf(),
        size: size.max(1),
        slots: Mutex::default(),
        changed: Condvar::new(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let refill = {
        let (shared, done) = (shared.clone(), done.clone());
        std::thread::spawn(move || refill(&shared, &done))
    };
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = answer(&shared, conn) {
                    eprintln!("thaw vm pool: a claim failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(VmError::io("accept a claim")(e)),
        }
    }
    done.store(true, Ordering::Relaxed);
    shared.changed.notify_all();
    let _ = refill.join();
    let slots = std::mem::take(&mut shared.slots.lock().expect("pool lock").ready);
    for slot in slots {
        let _ = qemu::quit(&slot);
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Keeps `size` paused VMs ready.
fn refill(shared: &Shared, done: &AtomicBool) {
    loop {
        let slot = {
            let mut s = shared.slots.lock().expect("pool lock");
            while s.ready.len() >= shared.size && !done.load(Ordering::Relaxed) {
                s = shared.changed.wait(s).expect("pool lock");
            }
            if done.load(Ordering::Relaxed) {
                return;
            }
            s.next += 1;
            shared.dir.join(format!("vm-{}", s.next))
        };
        let restored = std::fs::create_dir_all(&slot)
            .map_err(VmError::io(format!("create {}", slot.display())))
            .and_then(|()| qemu::restore(&slot, &shared.image, true));
        let mut s = shared.slots.lock().expect("pool lock");
        match restored {
            Ok(took) => {
                eprintln!(
                    "thaw vm pool: {} ready ({:.0} ms)",
                    slot.display(),
                    took.as_secs_f64() * 1000.0
                );
                s.failed = None;
                s.ready.push_back(slot);
            }
            Err(e) => {
                eprintln!("thaw vm pool: cannot restore {}: {e}", slot.display());
                s.failed = Some(e.to_string());
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        shared.changed.notify_all();
    }
}

/// Hands the oldest ready VM to `conn`, running.
fn answer(shared: &Shared, mut conn: UnixStream) -> Result<()> {
    let arrived = Instant::now();
    let deadline = arrived + CLAIM_WAIT;
    let slot = {
        let mut s = shared.slots.lock().expect("pool lock");
        loop {
            if let Some(slot) = s.ready.pop_front() {
                break slot;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = s.failed.clone().unwrap_or_else(|| "still restoring".into());
                let _ = writeln!(conn, "{{\"error\": {}}}", serde_json::json!(why));
                return Err(VmError::Qemu(format!("no VM ready: {why}")));
            }
            s = shared.changed.wait_timeout(s, left).expect("pool lock").0;
        }
    };
    shared.changed.notify_all();
    qemu::resume(&slot)?;
    let claimed = Claimed {
        monitor: qemu::qmp_socket(&slot),
        console: qemu::console_socket(&slot),
        dir: slot,
        resume_ms: arrived.elapsed().as_secs_f64() * 1000.0,
    };
    let line = serde_json::to_string(&claimed).expect("a claim serializes");
    writeln!(conn, "{line}").map_err(VmError::io("answer a claim"))?;
    Ok(())
}

/// Claims a running VM from the pool in `dir`.
pub fn claim(dir: &Path) -> Result<Claimed> {
    let path = socket(dir);
    let conn = UnixStream::connect(&path)
        .map_err(VmError::io(format!("connect to {}", path.display())))?;
    conn.set_read_timeout(Some(CLAIM_WAIT + Duration::from_secs(5)))
        .map_err(VmError::io("set a read timeout"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(VmError::io("read the claim"))?;
    let value: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| VmError::Qemu(format!("bad claim answer: {e}")))?;
    if let Some(why) = value.get("error") {
        return Err(VmError::Qemu(format!("the pool has no VM: {why}")));
    }
    serde_json::from_value(value).map_err(|e| VmError::Qemu(format!("bad claim answer: {e}")))
}
