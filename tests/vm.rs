//! `thaw vm`: a QEMU guest (TCG) whose RAM is a file is snapshotted into a
//! thaw image and restored from a thaw mount with a fresh cache, its memory
//! faulting in on demand. Skips loudly where QEMU or the guest kernel is
//! missing (`scripts/setup.sh` installs them).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use thaw_testkit::guest::console::{Console, Waited};
use thaw_testkit::guest::initramfs::Initramfs;
use thaw_testkit::guest::{GuestConfig, GuestKit};
use thaw_testkit::{require_guest, thaw, thaw_bin, thaw_json, thaw_ok, Server};

const WAIT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u64 = 1024;

/// A small agent: 256 MiB of random "weights" and a secret in guest memory,
/// a counter, and a command loop on the serial console.
const SCRIPT: &str = r#"
read hello
dd if=/dev/urandom of=/tmp/weights bs=1M count=256 2>/dev/null
secret=$(head -c 16 /dev/urandom | md5sum | cut -c1-16)
i=0
echo "ready $secret"
while read cmd; do
  case "$cmd" in
    count) i=$((i + 1)); echo "count $i" ;;
    hash) echo "hash $(md5sum < /tmp/weights | cut -c1-32)" ;;
    secret) echo "secret $secret" ;;
    quit) break ;;
  esac
done
"#;

/// Sends `cmd` to the agent and returns its answer.
fn ask(c: &mut Console, cmd: &str) -> String {
    c.write_line(cmd).unwrap();
    line(c, &format!("{cmd} "))
}

fn console(dir: &Path) -> Console {
    let path = dir.join("console.sock");
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => return Console::start(s).unwrap(),
            Err(e) if Instant::now() > deadline => panic!("console {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn line(c: &mut Console, prefix: &str) -> String {
    match c.wait_line(WAIT, |l| l.starts_with(prefix)) {
        Waited::Line(_, l) => l,
        other => panic!("no {prefix:?} line: {other:?}\n{}", c.lines().join("\n")),
    }
}

/// Stops the VM in a directory on drop, whatever the test did.
struct Vm<'a>(&'a Path);

impl Drop for Vm<'_> {
    fn drop(&mut self) {
        let _ = thaw(&["vm", "stop", self.0.to_str().unwrap()]);
    }
}

/// What the template's agent said before its snapshot.
struct Template {
    reference: String,
    secret: String,
    hash: String,
}

/// The number of new chunks a `thaw vm snapshot` reported, and of all.
fn chunks(said: &str) -> (u64, u64) {
    let (all, rest) = said.split_once(" chunks (").expect("a chunk count");
    let all = all.rsplit(' ').next().unwrap().parse().unwrap();
    let new = rest.split(' ').next().unwrap().parse().unwrap();
    (new, all)
}

/// How a test's VMs run.
#[derive(Clone, Copy)]
enum Vmm {
    /// QEMU under software emulation: runs anywhere.
    Qemu,
    /// Cloud Hypervisor: needs its binary and a KVM that runs guests.
    CloudHypervisor,
}

impl Vmm {
    fn run_args(self) -> &'static [&'static str] {
        match self {
            Vmm::Qemu => &["--accel", "tcg"],
            Vmm::CloudHypervisor => &["--vmm", "cloud-hypervisor"],
        }
    }
}

/// Boots the template and snapshots it into `vm:v1` after one `count`;
/// then resumes it, counts once more and snapshots `vm:v2`, which must
/// share at least 90% of its chunks with `vm:v1`. `None` if the guest says
/// nothing within `first_words` (a VMM that cannot run guests here).
fn snapshot(
    kit: &GuestKit,
    tmp: &Path,
    server: &Server,
    vmm: Vmm,
    first_words: Duration,
) -> Option<Template> {
    let initrd = tmp.join("initrd");
    let cpio = Initramfs::for_guest(kit, &GuestConfig::new(SCRIPT))
        .unwrap()
        .to_cpio();
    std::fs::write(&initrd, cpio).unwrap();
    let reference = server.reference("vm:v1");
    let template = tmp.join("template");
    let t = template.to_str().unwrap();
    thaw_ok(
        &[
            "vm",
            "run",
            t,
            "--kernel",
            kit.kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            &format!("{MEMORY_MIB}M"),
            "--append",
            "console=ttyS0 quiet panic=-1",
        ]
        .into_iter()
        .chain(vmm.run_args().iter().copied())
        .collect::<Vec<_>>(),
    );
    let _running = Vm(&template);
    let mut c = console(&template);
    c.write_line("hello").unwrap();
    let secret = match c.wait_line(first_words, |l| l.starts_with("ready ")) {
        Waited::Line(_, l) => l["ready ".len()..].to_string(),
        _ => return None,
    };
    assert_eq!(ask(&mut c, "count"), "count 1");
    let hash = ask(&mut c, "hash");
    let first = thaw_ok(&["vm", "snapshot", t, "--push", &reference, "--resume"]);
    eprintln!("{first}");
    assert_eq!(ask(&mut c, "count"), "count 2");
    let second = thaw_ok(&["vm", "snapshot", t, "--push", &server.reference("vm:v2")]);
    eprintln!("{second}");
    let (new, all) = chunks(&second);
    assert!(
        new * 10 <= all,
        "a second snapshot after a small change stored {new} new chunks of {all}"
    );
    assert!(chunks(&first).1 > 0);
    Some(Template {
        reference,
        secret,
        hash,
    })
}

#[test]
fn a_snapshot_restores_lazily_from_a_thaw_mount() {
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("store"));
    let tpl =
        snapshot(&kit, tmp.path(), &server, Vmm::Qemu, WAIT).expect("the agent's first words");
    let reference = tpl.reference.clone();
    // A new server process over the same store, and an empty cache.
    server.restart();
    let restored = tmp.path().join("restored");
    let _vm = Vm(&restored);
    restore_and_check(tmp.path(), &tpl, &restored);

    // A dead server: a restore with an empty cache fails at once, saying so.
    server.kill();
    let started = Instant::now();
    let out = restore_into(tmp.path(), "dead", &reference);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a restore from a dead server: {said}"
    );
    assert!(
        said.contains("cannot mount") && said.contains(&server.addr()),
        "{said}"
    );
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());

    // Memory damaged in the store: one byte flipped in every stored chunk
    // of the memory file. The server finds them bad and quarantines them,
    // so a restore with an empty cache cannot read the guest's memory. The
    // VM must stop rather than run on other memory, and say why.
    server.restart();
    let damaged = damage_memory_chunks(tmp.path());
    assert!(
        damaged > 0,
        "no chunk of the memory file found in the store"
    );
    let started = Instant::now();
    let out = restore_into(tmp.path(), "damaged", &reference);
    let dir = tmp.path().join("damaged");
    let _damaged_vm = Vm(&dir);
    let why = if out.status.success() {
        // The state loaded; the guest's first touch of damaged memory stops it.
        wait_for_failure(&dir)
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    eprintln!(
        "damaged memory ({damaged} chunks): {why} ({:?})",
        started.elapsed()
    );
    assert!(why.contains("is not on the server"), "{why}");

    // Stopping the restored VM takes its image's mount down with it, even
    // while the VMM that mapped the image's files is still letting go.
    thaw_ok(&["vm", "stop", restored.to_str().unwrap()]);
    let image = restored.join("image");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", image.display())),
        "{} is still mounted after thaw vm stop",
        image.display()
    );
}

/// Restores the template into `restored` with an empty cache and checks
/// that the guest goes on where it was, on the template's memory, fetched
/// on demand: a fraction of it.
fn restore_and_check(tmp: &Path, tpl: &Template, restored: &Path) {
    let name = restored.file_name().unwrap().to_str().unwrap();
    let out = restore_into(tmp, name, &tpl.reference);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "thaw vm restore failed: {}\n{said}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    let mut c = console(restored);
    // The counter goes on from the snapshot; memory is the template's.
    assert_eq!(ask(&mut c, "count"), "count 2");
    assert_eq!(ask(&mut c, "secret"), format!("secret {}", tpl.secret));
    assert_eq!(ask(&mut c, "hash"), tpl.hash);

    let stats = thaw_json(&["stats", restored.join("image").to_str().unwrap()]);
    let fetched = stats["chunk_bytes_fetched"].as_u64().unwrap();
    let memory = MEMORY_MIB << 20;
    eprintln!(
        "fetched {} MiB in {} chunks of {} MiB of memory",
        fetched >> 20,
        stats["chunks_fetched"],
        MEMORY_MIB
    );
    assert!(fetched > 0, "{stats}");
    assert!(
        fetched < memory / 2,
        "restore fetched {fetched} bytes: {stats}"
    );
    assert_eq!(stats["digest_mismatches"].as_u64(), Some(0));
}

/// The same life under Cloud Hypervisor, where its binary
/// (`$THAW_CLOUD_HYPERVISOR` or `cloud-hypervisor` on the path) and a KVM
/// that runs guests exist; elsewhere it says loudly that it skips.
#[test]
fn a_cloud_hypervisor_snapshot_restores_lazily_from_a_thaw_mount() {
    let test = "vm::a_cloud_hypervisor_snapshot_restores_lazily_from_a_thaw_mount";
    let binary = thaw_vmm::cloud_hypervisor::binary();
    let found = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let why = format!("no Cloud Hypervisor binary ({})", binary.display());
        thaw_testkit::guest::skip(test, &why);
        return;
    }
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("store"));
    let first_words = Duration::from_secs(30);
    let vmm = Vmm::CloudHypervisor;
    let Some(tpl) = snapshot(&kit, tmp.path(), &server, vmm, first_words) else {
        let why = format!(
            "Cloud Hypervisor booted, but its guest said nothing within {first_words:?}: this KVM cannot run guests"
        );
        thaw_testkit::guest::skip(test, &why);
        return;
    };
    server.restart();
    let restored = tmp.path().join("restored");
    let _vm = Vm(&restored);
    restore_and_check(tmp.path(), &tpl, &restored);
}

/// `thaw vm restore REF TMP/NAME` with an empty cache of its own
/// (`TMP/NAME-cache`).
fn restore_into(tmp: &Path, name: &str, reference: &str) -> std::process::Output {
    let dir = tmp.join(name);
    let cache = tmp.join(format!("{name}-cache"));
    thaw(&[
        "vm",
        "restore",
        reference,
        dir.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ])
}

/// Flips a byte in the stored frame of every 256 KiB chunk of the
/// template's memory file (the chunk size `thaw vm snapshot` uses); returns
/// how many it found stored (zero chunks are holes, never stored).
fn damage_memory_chunks(tmp: &Path) -> usize {
    let memory = std::fs::read(tmp.join("template/image/memory")).unwrap();
    let chunks = tmp.join("store/chunks");
    let mut damaged = 0;
    for chunk in memory.chunks(256 << 10) {
        let hex = thaw_format::Digest::of(chunk).to_hex();
        let path = chunks.join(&hex[..2]).join(&hex);
        if let Ok(mut frame) = std::fs::read(&path) {
            let last = frame.len() - 1;
            frame[last] ^= 0x55;
            std::fs::write(&path, frame).unwrap();
            damaged += 1;
        }
    }
    damaged
}

/// Waits for `thaw vm status` to say that the VM in `dir` failed on a read
/// of its image; returns the read error it gives.
fn wait_for_failure(dir: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = thaw(&["vm", "status", dir.to_str().unwrap(), "--json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if status["state"] == "failed" {
            assert!(!out.status.success(), "a failed VM's status exits 1");
            return status["read_error"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the VM on damaged memory did not stop: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pool_hands_out_running_vms() {
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let tpl =
        snapshot(&kit, tmp.path(), &server, Vmm::Qemu, WAIT).expect("the agent's first words");
    let reference = tpl.reference.clone();
    let dir = tmp.path().join("pool");
    let cache = tmp.path().join("cache");
    let mut pool = std::process::Command::new(thaw_bin())
        .args([
            "vm",
            "pool",
            &reference,
            dir.to_str().unwrap(),
            "--size",
            "2",
        ])
        .arg("--cache-dir")
        .arg(&cache)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !dir.join("pool.sock").exists() {
        assert!(Instant::now() < deadline, "the pool never listened");
        assert!(pool.try_wait().unwrap().is_none(), "the pool exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let c = thaw_json(&["vm", "claim", dir.to_str().unwrap()]);
        eprintln!("claimed {c}");
        let vm = std::path::PathBuf::from(c["dir"].as_str().unwrap());
        let mut con = console(&vm);
        assert_eq!(ask(&mut con, "count"), "count 2");
        assert_eq!(ask(&mut con, "secret"), format!("secret {}", tpl.secret));
        claimed.push(vm);
    }
    let distinct: std::collections::HashSet<_> = claimed.iter().collect();
    assert_eq!(distinct.len(), 3, "a VM was handed out twice");
    // SIGTERM: the pool ends the VMs nobody claimed.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pool.id() as i32, libc::SIGTERM) };
    assert!(pool.wait().unwrap().success());
    for vm in &claimed {
        thaw_ok(&["vm", "stop", vm.to_str().unwrap()]);
    }
    let _ = thaw(&["umount", dir.join("image").to_str().unwrap()]);
}
