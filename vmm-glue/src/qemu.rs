//! QEMU as a snapshot-and-restore VMM.
//!
//! A VM directory holds the image-to-be in `image/` (see the crate docs)
//! and the running VM's sockets: `qmp.sock` (the monitor), `console.sock`
//! (the serial console, a socket any client may attach to), `qemu.pid`.
//!
//! - [`run`] boots a guest whose RAM is `image/memory`, a file mapped
//!   shared, so that at any moment the file is the guest's memory.
//! - [`snapshot`] pauses it and migrates with `x-ignore-shared` to
//!   `image/state`: the stream holds device state only (RAM is the file).
//!   The VM stays paused, so `image/` can be pushed as it is.
//! - [`restore`] starts QEMU on an `image/` that is a thaw mount, with the
//!   memory file opened read-only and mapped private (`share=off,
//!   readonly=on,rom=off`), loads `state` and continues: guest pages fault
//!   in from the mount on first touch, and the guest's writes stay private.
//!
//! Guest memory mapped private cannot also be shared with a vhost-user
//! device (virtio-fs), which needs shared memory: a restored VM here has no
//! virtio-fs device.

use crate::qmp::Qmp;
pub use crate::{console_socket, image_dir};
use crate::{Result, Status, VmError, VmSpec, Vmm};
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// QEMU as a [`Vmm`]: the functions of this module.
pub struct Qemu;

impl Vmm for Qemu {
    fn run(&self, dir: &Path, kernel: &Path, initrd: Option<&Path>, spec: &VmSpec) -> Result<()> {
        run(dir, kernel, initrd, spec)
    }

    fn snapshot(&self, dir: &Path) -> Result<Duration> {
        snapshot(dir)
    }

    fn restore(&self, dir: &Path, image: &Path, paused: bool) -> Result<Duration> {
        restore(dir, image, paused)
    }

    fn resume(&self, dir: &Path) -> Result<()> {
        resume(dir)
    }

    fn quit(&self, dir: &Path) -> Result<()> {
        quit(dir)
    }

    fn status(&self, dir: &Path) -> Result<Status> {
        status(dir)
    }

    fn control_socket(&self, dir: &Path) -> PathBuf {
        qmp_socket(dir)
    }
}

/// The QEMU binary: `$THAW_QEMU`, or `qemu-system-x86_64` on the path.
fn qemu_bin() -> PathBuf {
    std::env::var_os("THAW_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// How the guest's RAM file is mapped.
enum Memory {
    /// The running template: the file is the memory.
    Shared,
    /// A restore: the file opened read-only, the mapping private.
    Private,
}

fn args(spec: &VmSpec, image: &Path, dir: &Path, memory: Memory) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    let mapping = match memory {
        Memory::Shared => "share=on",
        Memory::Private => "share=off,readonly=on,rom=off",
    };
    let mut a: Vec<String> = vec![
        "-accel".into(),
        spec.accel.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-m".into(),
        mem.clone(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},{mapping}",
            image.join("memory").display()
        ),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-chardev".into(),
        format!(
            "socket,id=console,path={},server=on,wait=off",
            console_socket(dir).display()
        ),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_socket(dir).display()
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-kernel".into(),
        image.join("kernel").display().to_string(),
        "-append".into(),
        spec.append.clone(),
        "-daemonize".into(),
        "-pidfile".into(),
        pid_file(dir).display().to_string(),
    ];
    if spec.initrd {
        a.push("-initrd".into());
        a.push(image.join("initrd").display().to_string());
    }
    a
}

/// Starts QEMU (it daemonizes once the guest is set up) and connects to it.
fn start(args: &[String], dir: &Path) -> Result<Qmp> {
    for s in [qmp_socket(dir), console_socket(dir)] {
        let _ = std::fs::remove_file(s);
    }
    let out = Command::new(qemu_bin())
        .args(args)
        .output()
        .map_err(VmError::io(format!("run {}", qemu_bin().display())))?;
    if !out.status.success() {
        return Err(VmError::Qemu(format!(
            "failed to start ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    connect(dir)
}

/// The monitor of the VM in `dir`.
pub fn connect(dir: &Path) -> Result<Qmp> {
    let path = qmp_socket(dir);
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let stream = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(VmError::io(format!("connect to {}", path.display()))(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Ok(Qmp::handshake(stream)?)
}

/// Boots a VM in `dir` from `kernel` (and `initrd`) with `spec`; returns
/// once QEMU runs in the background.
pub fn run(dir: &Path, kernel: &Path, initrd: Option<&Path>, spec: &VmSpec) -> Result<()> {
    let image = crate::prepare_image(dir, kernel, initrd, spec)?;
    let _ = std::fs::remove_file(image.join("state"));
    start(&args(spec, &image, dir, Memory::Shared), dir)?;
    Ok(())
}

/// Pauses the VM in `dir` and writes its device state to `image/state`.
/// The VM stays paused: `image/` is a consistent snapshot until [`resume`].
pub fn snapshot(dir: &Path) -> Result<Duration> {
    let started = Instant::now();
    let mut qmp = connect(dir)?;
    ignore_shared(&mut qmp)?;
    qmp.execute("stop", json!({}))?;
    let uri = format!("file:{}", image_dir(dir).join("state").display());
    qmp.execute("migrate", json!({ "uri": uri }))?;
    wait_migration(&mut qmp)?;
    Ok(started.elapsed())
}

/// Continues a paused VM.
pub fn resume(dir: &Path) -> Result<()> {
    connect(dir)?.execute("cont", json!({}))?;
    Ok(())
}

/// Ends the VM and waits for QEMU to exit (so its files are closed).
pub fn quit(dir: &Path) -> Result<()> {
    let pid = crate::process_runs(&pid_file(dir), "qemu");
    connect(dir)?.execute("quit", json!({}))?;
    if let Some(pid) = pid {
        crate::wait_gone(pid, SOCKET_TIMEOUT);
    }
    Ok(())
}

/// What the VM in `dir` is doing now.
pub fn status(dir: &Path) -> Result<Status> {
    if crate::process_runs(&pid_file(dir), "qemu").is_none() {
        return Ok(Status::Gone);
    }
    let info = connect(dir)?.execute("query-status", json!({}))?;
    Ok(Status::Up(
        info["status"].as_str().unwrap_or("unknown").to_string(),
    ))
}

/// Starts a VM in `dir` from the snapshot at `image` (a thaw mount, or any
/// directory holding one) and loads its state; continues it unless
/// `paused`. Returns how long QEMU's start and the state load took.
pub fn restore(dir: &Path, image: &Path, paused: bool) -> Result<Duration> {
    let spec = VmSpec::read(image)?;
    std::fs::create_dir_all(dir).map_err(VmError::io(format!("create {}", dir.display())))?;
    let started = Instant::now();
    let mut a = args(&spec, image, dir, Memory::Private);
    a.extend(["-incoming".into(), "defer".into()]);
    let mut qmp = start(&a, dir)?;
    ignore_shared(&mut qmp)?;
    let uri = format!("file:{}", image.join("state").display());
    qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
    wait_migration(&mut qmp)?;
    if !paused {
        qmp.execute("cont", json!({}))?;
    }
    Ok(started.elapsed())
}

/// RAM lives in the memory file: the migration stream must not carry it.
fn ignore_shared(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
    )?;
    Ok(())
}

fn wait_migration(qmp: &mut Qmp) -> Result<()> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(VmError::Migration {
                    status,
                    detail: info["error-desc"].as_str().unwrap_or("").to_string(),
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(VmError::Migration {
                    status,
                    detail: format!("not done after {MIGRATION_TIMEOUT:?}"),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_maps_memory_private_and_read_only() {
        let spec = VmSpec::qemu("tcg", 256, 2, "console=ttyS0", true);
        let run = args(&spec, Path::new("/i"), Path::new("/d"), Memory::Shared);
        let restore = args(&spec, Path::new("/m"), Path::new("/d"), Memory::Private);
        let mem = |a: &[String]| {
            a.iter()
                .find(|s| s.starts_with("memory-backend-file"))
                .cloned()
        };
        assert_eq!(
            mem(&run).unwrap(),
            "memory-backend-file,id=mem,size=256M,mem-path=/i/memory,share=on"
        );
        assert_eq!(
            mem(&restore).unwrap(),
            "memory-backend-file,id=mem,size=256M,mem-path=/m/memory,share=off,readonly=on,rom=off"
        );
        assert!(restore.contains(&"/m/initrd".to_string()));
        assert!(restore.contains(&"/m/kernel".to_string()));
    }
}
