//! Cloud Hypervisor's REST API over its `--api-socket`, as the snapshot
//! launcher uses it: `vm.create`, `vm.boot`, `vm.pause`, `vm.resume`,
//! `vm.snapshot` and `vm.restore` with `memory_restore_mode` (v52 and later:
//! `OnDemand` serves each guest fault from the snapshot's `memory-ranges`
//! file, which on a thaw mount is a chunk fetch).
//!
//! HTTP/1.1 over a unix socket, one request per connection, as `ch-remote`
//! does; the request shapes follow `vmm/src/api/openapi/cloud-hypervisor.yaml`.
//!
//! Lazy restore and vhost-user devices do not mix: with `OnDemand`, guest
//! memory is shared memory that the VMM fills on the guest's first fault
//! (userfaultfd, MISSING mode, registered in the VMM's own mapping). A
//! vhost-user backend (virtio-fs) writes into guest memory through its own
//! mapping, where no fault is raised: the page is allocated with the
//! backend's bytes and zeroes around them, the VMM never copies the
//! snapshot's page in, and the guest sees a page that is neither. The used
//! rings the backend updates sit in such pages. So [`restore_mode`] asks for
//! `OnDemand` only when the snapshot has no vhost-user device, and `Copy`
//! otherwise.

use crate::{console_socket, image_dir, Result, Status, VmError, VmSpec, Vmm};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new process has to answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The Cloud Hypervisor binary: `$THAW_CLOUD_HYPERVISOR`, or
/// `cloud-hypervisor` on the path.
pub fn binary() -> PathBuf {
    std::env::var_os("THAW_CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cloud-hypervisor".into())
}

/// The API socket of the VM in `dir`.
pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("cloud-hypervisor.pid")
}

/// Cloud Hypervisor as a [`Vmm`]: one process per VM directory, started in
/// the background with its API on `DIR/api.sock` and its output in
/// `DIR/cloud-hypervisor.log`. Guest memory is shared (`memory.shared`), so
/// a snapshot writes it to `image/memory-ranges` beside `config.json` and
/// `state.json`, and a restore maps it on demand ([`restore_mode`]).
pub struct CloudHypervisor;

impl CloudHypervisor {
    /// Starts a Cloud Hypervisor process for `dir` and waits for its API.
    fn start(dir: &Path) -> Result<ChClient> {
        let socket = api_socket(dir);
        let _ = std::fs::remove_file(&socket);
        let log_path = dir.join("cloud-hypervisor.log");
        let log = std::fs::File::create(&log_path)
            .map_err(VmError::io(format!("create {}", log_path.display())))?;
        let err_log = log.try_clone().map_err(VmError::io("open the log"))?;
        let mut child = Command::new(binary())
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: a signal to the caller's group (a
            // Ctrl-C at the shell) does not end the VM.
            .process_group(0)
            .spawn()
            .map_err(VmError::io(format!("run {}", binary().display())))?;
        let pid = pid_file(dir);
        std::fs::write(&pid, child.id().to_string())
            .map_err(VmError::io(format!("write {}", pid.display())))?;
        let client = ChClient::new(&socket);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(exit)) = child.try_wait() {
                let said = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(VmError::Vmm(format!(
                    "Cloud Hypervisor exited at start ({exit}): {}",
                    said.trim()
                )));
            }
            if client.ping().is_ok() {
                return Ok(client);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Err(VmError::Vmm(format!(
                    "Cloud Hypervisor did not answer on {} within {START_TIMEOUT:?}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VM's configuration for `vm.create`: the image's kernel and
    /// initrd, the serial console on `DIR/console.sock`.
    pub fn config(dir: &Path, spec: &VmSpec) -> ChVmConfig {
        let image = image_dir(dir);
        ChVmConfig {
            cpus: spec.cpus,
            memory_bytes: u64::from(spec.memory_mib) << 20,
            kernel: image.join("kernel"),
            initramfs: spec.initrd.then(|| image.join("initrd")),
            cmdline: spec.append.clone(),
            fs: Vec::new(),
            serial_socket: Some(console_socket(dir)),
        }
    }
}

/// `vm.create` and `vm.boot`.
pub fn boot(client: &ChClient, config: &ChVmConfig) -> Result<()> {
    client.create(config)?;
    client.boot()
}

/// `vm.pause` and `vm.snapshot` into `image`; the VM stays paused.
pub fn snapshot_into(client: &ChClient, image: &Path) -> Result<()> {
    client.pause()?;
    client.snapshot(image)
}

/// `vm.restore` of the snapshot at `image` in the mode it allows.
pub fn restore_from(client: &ChClient, image: &Path, paused: bool) -> Result<()> {
    client.restore(image, restore_mode(image)?, !paused)
}

impl Vmm for CloudHypervisor {
    fn run(&self, dir: &Path, kernel: &Path, initrd: Option<&Path>, spec: &VmSpec) -> Result<()> {
        crate::prepare_image(dir, kernel, initrd, spec)?;
        let client = Self::start(dir)?;
        boot(&client, &Self::config(dir, spec))
    }

    fn snapshot(&self, dir: &Path) -> Result<Duration> {
        let started = Instant::now();
        snapshot_into(&ChClient::new(api_socket(dir)), &image_dir(dir))?;
        Ok(started.elapsed())
    }

    fn restore(&self, dir: &Path, image: &Path, paused: bool) -> Result<Duration> {
        std::fs::create_dir_all(dir).map_err(VmError::io(format!("create {}", dir.display())))?;
        let started = Instant::now();
        let client = Self::start(dir)?;
        restore_from(&client, image, paused)?;
        Ok(started.elapsed())
    }

    fn resume(&self, dir: &Path) -> Result<()> {
        ChClient::new(api_socket(dir)).resume()
    }

    fn quit(&self, dir: &Path) -> Result<()> {
        let pid = crate::process_runs(&pid_file(dir), "cloud-hypervisor");
        ChClient::new(api_socket(dir)).shutdown_vmm()?;
        if let Some(pid) = pid {
            crate::wait_gone(pid, START_TIMEOUT);
        }
        Ok(())
    }

    fn status(&self, dir: &Path) -> Result<Status> {
        if crate::process_runs(&pid_file(dir), "cloud-hypervisor").is_none() {
            return Ok(Status::Gone);
        }
        let info = ChClient::new(api_socket(dir)).info()?;
        let state = info["state"].as_str().unwrap_or("unknown");
        Ok(Status::Up(state.to_ascii_lowercase()))
    }

    fn control_socket(&self, dir: &Path) -> PathBuf {
        api_socket(dir)
    }
}

/// A client of one Cloud Hypervisor process.
#[derive(Debug, Clone)]
pub struct ChClient {
    socket: PathBuf,
}

/// How `vm.restore` brings memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read all of memory before the guest runs.
    Copy,
    /// Fault each page in from the snapshot when the guest first touches it.
    OnDemand,
}

impl RestoreMode {
    fn api_name(self) -> &'static str {
        match self {
            RestoreMode::Copy => "Copy",
            RestoreMode::OnDemand => "OnDemand",
        }
    }
}

/// What a VM boots with.
#[derive(Debug, Clone)]
pub struct ChVmConfig {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// virtio-fs devices: (tag, vhost-user socket), e.g. `thaw virtiofs`.
    pub fs: Vec<(String, PathBuf)>,
    /// The serial console as a unix socket.
    pub serial_socket: Option<PathBuf>,
}

impl ChVmConfig {
    /// The `VmConfig` body of `vm.create`. Memory is shared: virtio-fs needs
    /// it, and so does an `OnDemand` restore.
    pub fn to_json(&self) -> Value {
        let mut payload = json!({
            "kernel": self.kernel.display().to_string(),
            "cmdline": self.cmdline,
        });
        if let Some(i) = &self.initramfs {
            payload["initramfs"] = json!(i.display().to_string());
        }
        let serial = match &self.serial_socket {
            Some(s) => json!({ "mode": "Socket", "socket": s.display().to_string() }),
            None => json!({ "mode": "Null" }),
        };
        let fs: Vec<Value> = self
            .fs
            .iter()
            .map(|(tag, socket)| {
                json!({
                    "tag": tag,
                    "socket": socket.display().to_string(),
                    "num_queues": 1,
                    "queue_size": 1024,
                })
            })
            .collect();
        let mut config = json!({
            "cpus": { "boot_vcpus": self.cpus, "max_vcpus": self.cpus },
            "memory": { "size": self.memory_bytes, "shared": true },
            "payload": payload,
            "serial": serial,
            "console": { "mode": "Off" },
        });
        if !fs.is_empty() {
            config["fs"] = Value::Array(fs);
        }
        config
    }
}

/// The restore mode a snapshot allows: `OnDemand` unless its `config.json`
/// names a vhost-user device (see the module docs).
pub fn restore_mode(snapshot: &Path) -> Result<RestoreMode> {
    let path = snapshot.join("config.json");
    let bytes = std::fs::read(&path).map_err(VmError::io(format!("read {}", path.display())))?;
    let config: Value = serde_json::from_slice(&bytes)
        .map_err(|e| VmError::Spec(format!("{}: {e}", path.display())))?;
    let vhost_user = |key: &str| {
        config[key]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["vhost_user"] == true))
    };
    let has_fs = config["fs"].as_array().is_some_and(|a| !a.is_empty());
    Ok(if has_fs || vhost_user("disks") || vhost_user("net") {
        RestoreMode::Copy
    } else {
        RestoreMode::OnDemand
    })
}

impl ChClient {
    pub fn new(socket: impl Into<PathBuf>) -> ChClient {
        ChClient {
            socket: socket.into(),
        }
    }

    pub fn ping(&self) -> Result<Value> {
        self.call("GET", "vmm.ping", None)
    }

    pub fn create(&self, config: &ChVmConfig) -> Result<()> {
        self.call("PUT", "vm.create", Some(config.to_json()))
            .map(drop)
    }

    pub fn boot(&self) -> Result<()> {
        self.call("PUT", "vm.boot", None).map(drop)
    }

    pub fn pause(&self) -> Result<()> {
        self.call("PUT", "vm.pause", None).map(drop)
    }

    pub fn resume(&self) -> Result<()> {
        self.call("PUT", "vm.resume", None).map(drop)
    }

    /// Ends the VM and the process (`vmm.shutdown`).
    pub fn shutdown_vmm(&self) -> Result<()> {
        self.call("PUT", "vmm.shutdown", None).map(drop)
    }

    pub fn info(&self) -> Result<Value> {
        self.call("GET", "vm.info", None)
    }

    /// Writes the paused VM's snapshot (config, state, memory) to `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let body = json!({ "destination_url": format!("file://{}", dir.display()) });
        self.call("PUT", "vm.snapshot", Some(body)).map(drop)
    }

    /// Restores the snapshot in `dir` into this (fresh) process.
    pub fn restore(&self, dir: &Path, mode: RestoreMode, resume: bool) -> Result<()> {
        let body = json!({
            "source_url": format!("file://{}", dir.display()),
            "memory_restore_mode": mode.api_name(),
            "resume": resume,
        });
        self.call("PUT", "vm.restore", Some(body)).map(drop)
    }

    /// One request; the JSON body of a 200 answer, `Null` for a 204.
    fn call(&self, method: &str, action: &str, body: Option<Value>) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(VmError::io(format!("connect to {}", self.socket.display())))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(VmError::io("set a read timeout"))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = format!(
            "{method} /api/v1/{action} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        if !body.is_empty() {
            request += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        request += "\r\n";
        request += &body;
        stream
            .write_all(request.as_bytes())
            .map_err(VmError::io(format!("send {action}")))?;
        let (status, reply) =
            read_response(stream).map_err(VmError::io(format!("read the answer to {action}")))?;
        match status {
            200 if !reply.is_empty() => serde_json::from_slice(&reply)
                .map_err(|e| VmError::Qemu(format!("{action}: bad JSON answer: {e}"))),
            200 | 204 => Ok(Value::Null),
            _ => Err(VmError::Api {
                action: action.to_string(),
                status,
                message: String::from_utf8_lossy(&reply).trim().to_string(),
            }),
        }
    }
}

/// Reads a status line, headers and a `Content-Length` body (or to EOF).
fn read_response(stream: UnixStream) -> std::io::Result<(u16, Vec<u8>)> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<u64>().ok();
            }
        }
    }
    let mut body = Vec::new();
    if status == 204 {
        // No body, whatever the headers say; the server may keep the
        // connection open.
        return Ok((status, body));
    }
    match length {
        Some(n) => {
            r.take(n.min(16 << 20)).read_to_end(&mut body)?;
        }
        None => {
            r.take(16 << 20).read_to_end(&mut body)?;
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests;
