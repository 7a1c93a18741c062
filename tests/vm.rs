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
const MEMORY_MIB: u64 = 256;

/// Keeps a secret and 48 MiB of random "weights" in guest memory across the
/// snapshot; after the restore, hashes the weights again and answers.
const SCRIPT: &str = r#"
read hello
dd if=/dev/urandom of=/tmp/weights bs=1M count=48 2>/dev/null
secret="$(head -c 16 /dev/urandom | md5sum | cut -c1-16) $(md5sum < /tmp/weights | cut -c1-32)"
echo "secret $secret"
read go
echo "after restore: secret $(echo $secret | cut -d' ' -f1) $(md5sum < /tmp/weights | cut -c1-32)"
"#;

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

/// Boots the template, waits for its secret, snapshots it into `vm:v1`.
fn snapshot(kit: &GuestKit, tmp: &Path, server: &Server) -> (String, String) {
    let initrd = tmp.join("initrd");
    let cpio = Initramfs::for_guest(kit, &GuestConfig::new(SCRIPT))
        .unwrap()
        .to_cpio();
    std::fs::write(&initrd, cpio).unwrap();
    let reference = server.reference("vm:v1");
    let template = tmp.join("template");
    let t = template.to_str().unwrap();
    thaw_ok(&[
        "vm",
        "run",
        t,
        "--kernel",
        kit.kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        &format!("{MEMORY_MIB}M"),
        "--accel",
        "tcg",
        "--append",
        "console=ttyS0 quiet panic=-1",
    ]);
    let _running = Vm(&template);
    let mut c = console(&template);
    c.write_line("hello").unwrap();
    let secret = line(&mut c, "secret ");
    let pushed = thaw_ok(&["vm", "snapshot", t, "--push", &reference]);
    eprintln!("{pushed}");
    (reference, secret)
}

#[test]
fn a_snapshot_restores_lazily_from_a_thaw_mount() {
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("store"));
    let (reference, secret) = snapshot(&kit, tmp.path(), &server);
    // A new server process over the same store, and an empty cache.
    server.restart();

    let restored = tmp.path().join("restored");
    let r = restored.to_str().unwrap();
    let cache = tmp.path().join("cache");
    let said = thaw_ok(&[
        "vm",
        "restore",
        &reference,
        r,
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    eprintln!("{said}");
    let _vm = Vm(&restored);
    let mut c = console(&restored);
    c.write_line("go").unwrap();
    let after = line(&mut c, "after restore: ");
    assert_eq!(after, format!("after restore: {secret}"));

    // The memory came on demand: a fraction of it was fetched.
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

#[test]
fn a_pool_hands_out_running_vms() {
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    let (reference, secret) = snapshot(&kit, tmp.path(), &server);
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
        con.write_line("go").unwrap();
        assert_eq!(
            line(&mut con, "after restore: "),
            format!("after restore: {secret}")
        );
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
