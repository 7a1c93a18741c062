//! A guest: one QEMU process, its console and its QMP monitor.

use super::console::{Console, Waited};
use super::initramfs::{Initramfs, INIT_FAILED, SCRIPT_BEGIN, SCRIPT_END};
use super::{GuestConfig, GuestError, GuestKit, Qmp};
use serde_json::json;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long QEMU may take to start and connect its sockets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a save or a load may take (a few hundred MiB under TCG).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Console lines shown in an error.
const TAIL: usize = 40;

/// What the script printed (between the markers) and its exit status.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    pub stdout: String,
    pub status: i32,
}

/// A running guest; QEMU is killed on drop.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    console: Console,
    qmp: Qmp,
    /// Where the initramfs, the sockets and QEMU's log live.
    dir: tempfile::TempDir,
}

impl Guest {
    /// Boots a guest of `config`.
    pub fn boot(kit: &GuestKit, config: &GuestConfig) -> Result<Guest, GuestError> {
        Guest::start(kit, config, false)
    }

    /// Starts QEMU with `config` (the one the saved guest had) and loads the
    /// guest saved at `path` by [`Guest::save_to`]; the guest runs on from
    /// where it stopped. A virtio-fs backend must listen on the config's
    /// socket again.
    pub fn restore(kit: &GuestKit, config: &GuestConfig, path: &Path) -> Result<Guest, GuestError> {
        let mut guest = Guest::start(kit, config, true)?;
        let uri = format!("file:{}", path.display());
        guest
            .qmp
            .execute("migrate-incoming", json!({ "uri": uri }))?;
        guest.wait_migration("load")?;
        guest.qmp.execute("cont", json!({}))?;
        Ok(guest)
    }

    /// Stops the guest, writes its whole state to `path` and ends QEMU.
    pub fn save_to(mut self, path: &Path) -> Result<(), GuestError> {
        self.qmp.execute("stop", json!({}))?;
        let uri = format!("file:{}", path.display());
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        self.wait_migration("save")?;
        self.qmp.execute("quit", json!({}))?;
        self.wait_exit(CONNECT_TIMEOUT)?;
        Ok(())
    }

    fn start(kit: &GuestKit, config: &GuestConfig, incoming: bool) -> Result<Guest, GuestError> {
        let dir = tempfile::Builder::new()
            .prefix("thaw-guest")
            .tempdir()
            .map_err(GuestError::io("create a guest directory"))?;
        let initrd = dir.path().join("initramfs.cpio");
        let cpio = Initramfs::for_guest(kit, config)?.to_cpio();
        std::fs::write(&initrd, cpio)
            .map_err(GuestError::io(format!("write {}", initrd.display())))?;

        // QEMU connects to these as a client: nothing it prints is lost.
        let listen = |name: &str| {
            let path = dir.path().join(name);
            let listener = UnixListener::bind(&path)
                .map_err(GuestError::io(format!("bind {}", path.display())))?;
            Ok::<_, GuestError>((path, listener))
        };
        let (console_path, console_listener) = listen("console.sock")?;
        let (qmp_path, qmp_listener) = listen("qmp.sock")?;

        let log_path = dir.path().join("qemu.log");
        let log = std::fs::File::create(&log_path)
            .map_err(GuestError::io(format!("create {}", log_path.display())))?;
        let mut command = Command::new(&kit.qemu);
        command.args(qemu_args(kit, config, &initrd, &console_path, &qmp_path));
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(GuestError::io("clone the log file"))?,
            )
            .stderr(log)
            .spawn()
            .map_err(GuestError::io(format!("run {}", kit.qemu.display())))?;

        let connected = connect(&mut child, &console_listener, &qmp_listener, &log_path);
        let (console, qmp) = match connected {
            Ok(ends) => ends,
            Err(e) => {
                // QEMU quitting (a device's backend is missing, say) closes
                // the sockets first: its log says why.
                let exited = wait_child(&mut child, Duration::from_secs(1));
                let _ = child.kill();
                let _ = child.wait();
                return Err(match exited {
                    Some(status) => GuestError::QemuExited {
                        status: status.to_string(),
                        doing: "starting".into(),
                        log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                        console: String::new(),
                    },
                    None => e,
                });
            }
        };
        Ok(Guest {
            child,
            console,
            qmp,
            dir,
        })
    }

    /// The next console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, GuestError> {
        match self.console.wait_line(timeout, |l| l.contains(needle)) {
            Waited::Line(_, line) => Ok(line),
            Waited::Closed => Err(self.exited(&format!("waiting for {needle:?}"))),
            Waited::TimedOut => Err(self.timed_out(format!("{needle:?}"), timeout)),
        }
    }

    /// Types `line` on the guest's console (a script's `read` returns it).
    pub fn write_line(&mut self, line: &str) -> Result<(), GuestError> {
        self.console
            .write_line(line)
            .map_err(GuestError::io("write to the console"))
    }

    /// Waits for the script to finish; its output is what it printed since
    /// it began, or, in a restored guest, since the restore.
    pub fn wait_script(&mut self, timeout: Duration) -> Result<ScriptOutput, GuestError> {
        let end = self.console.wait_line(timeout, |l| {
            l.starts_with(SCRIPT_END) || l.starts_with(INIT_FAILED)
        });
        let (end_index, end_line) = match end {
            Waited::Line(i, line) if line.starts_with(SCRIPT_END) => (i, line),
            Waited::Line(_, failed) => return Err(self.exited(&format!("setting up: {failed}"))),
            Waited::Closed => return Err(self.exited("running the script")),
            Waited::TimedOut => return Err(self.timed_out("the script's end".into(), timeout)),
        };
        let lines = self.console.lines();
        let begin = lines[..end_index]
            .iter()
            .rposition(|l| l == SCRIPT_BEGIN)
            .map_or(0, |i| i + 1);
        let status = end_line[SCRIPT_END.len()..]
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        let mut stdout = lines[begin..end_index].join("\n");
        if end_index > begin {
            stdout.push('\n');
        }
        Ok(ScriptOutput { stdout, status })
    }

    /// Waits for QEMU to end (the guest powers off after its script).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        wait_child(&mut self.child, timeout)
            .ok_or_else(|| self.timed_out("QEMU to exit".into(), timeout))
    }

    /// Everything the console printed so far, one string.
    pub fn output(&self) -> String {
        self.console.lines().join("\n")
    }

    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Polls `query-migrate` until the save or load completes.
    fn wait_migration(&mut self, what: &str) -> Result<(), GuestError> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.qmp.execute("query-migrate", json!({}))?;
            let status = info["status"].as_str().unwrap_or("none").to_string();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let detail = info["error-desc"].as_str().unwrap_or("").to_string();
                    let log = self.log();
                    return Err(GuestError::Migration {
                        status,
                        detail: format!("{what}: {detail}\n--- QEMU log ---\n{log}"),
                    });
                }
                _ if Instant::now() >= deadline => {
                    return Err(self.timed_out(format!("the {what} ({status})"), MIGRATION_TIMEOUT));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    fn exited(&mut self, doing: &str) -> GuestError {
        // The console closes as QEMU ends: give it a moment to be reaped.
        let status = wait_child(&mut self.child, Duration::from_secs(1))
            .map_or("still running".to_string(), |s| s.to_string());
        GuestError::QemuExited {
            status,
            doing: doing.to_string(),
            log: self.log(),
            console: self.console.tail(TAIL),
        }
    }

    fn timed_out(&self, what: String, waited: Duration) -> GuestError {
        GuestError::Timeout {
            what,
            waited,
            console: self.console.tail(TAIL),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything but `-incoming`.
fn qemu_args(
    kit: &GuestKit,
    config: &GuestConfig,
    initrd: &Path,
    console: &Path,
    qmp: &Path,
) -> Vec<String> {
    let mem = format!("{}M", config.memory_mib);
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        // A reboot or a kernel panic ends QEMU instead of booting again.
        "-no-reboot",
        "-m",
        &mem,
        // vhost-user devices map guest memory: it must be a shared file.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-numa",
        "node,memdev=mem",
        "-chardev",
        &format!("socket,id=console,path={}", console.display()),
        "-serial",
        "chardev:console",
        "-chardev",
        &format!("socket,id=qmp,path={}", qmp.display()),
        "-mon",
        "chardev=qmp,mode=control",
        "-kernel",
        &kit.kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        "console=ttyS0 quiet panic=-1",
    ]
    .map(String::from)
    .to_vec();
    if let Some(fs) = &config.virtio_fs {
        args.extend([
            "-chardev".to_string(),
            format!("socket,id=fs0,path={}", fs.socket.display()),
            "-device".to_string(),
            format!("vhost-user-fs-pci,chardev=fs0,tag={}", fs.tag),
        ]);
    }
    args
}

/// The console and the QMP monitor, once QEMU has connected both.
fn connect(
    child: &mut Child,
    console: &UnixListener,
    qmp: &UnixListener,
    log: &Path,
) -> Result<(Console, Qmp), GuestError> {
    let console = accept(child, console, log)?;
    let qmp = accept(child, qmp, log)?;
    let console = Console::start(console).map_err(GuestError::io("read the console"))?;
    Ok((console, Qmp::handshake(qmp)?))
}

/// The child's exit status if it ends within `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for QEMU to connect to `listener`, or to die trying.
fn accept(
    child: &mut Child,
    listener: &UnixListener,
    log: &Path,
) -> Result<UnixStream, GuestError> {
    listener
        .set_nonblocking(true)
        .map_err(GuestError::io("poll a socket"))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(GuestError::io("set a socket blocking"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(GuestError::io("accept QEMU's connection")(e)),
        }
        if let Some(status) = child.try_wait().map_err(GuestError::io("wait for QEMU"))? {
            return Err(GuestError::QemuExited {
                status: status.to_string(),
                doing: "starting".into(),
                log: std::fs::read_to_string(log).unwrap_or_default(),
                console: String::new(),
            });
        }
        if Instant::now() >= deadline {
            return Err(GuestError::Timeout {
                what: "QEMU to connect its sockets".into(),
                waited: CONNECT_TIMEOUT,
                console: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
