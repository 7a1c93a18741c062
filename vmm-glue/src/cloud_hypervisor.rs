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

use crate::{Result, VmError};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

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
