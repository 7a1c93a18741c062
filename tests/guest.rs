//! Real Linux guests under QEMU (TCG): a virtio-fs mount served by
//! `virtiofsd`, and snapshot/restore through a file. They skip loudly where
//! QEMU, the guest kernel or virtiofsd is missing (`scripts/setup.sh`
//! installs them).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use thaw_testkit::guest::{Guest, GuestConfig, GuestKit, Virtiofsd};
use thaw_testkit::{noise, require_guest};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const TAG: &str = "shared";

/// A few files of different sizes, nested, one empty.
fn shared_dir(dir: &Path) {
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("hello.txt", b"hello from the host\n");
    write("noise.bin", &noise(1, 3 << 20));
    write("deep/er/nested.bin", &noise(2, 100_000));
    write("empty", b"");
}

/// `sha256sum`-style lines as path -> hash.
fn hashes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ")?;
            Some((path.to_string(), hash.to_string()))
        })
        .collect()
}

/// The host's `sha256sum` of `files`, run in `dir`.
fn host_hashes(dir: &Path, files: &[&str]) -> BTreeMap<String, String> {
    let out = Command::new("sha256sum")
        .args(files)
        .current_dir(dir)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum on the host failed");
    hashes(&String::from_utf8(out.stdout).unwrap())
}

fn virtiofsd_config(socket: &Path, script: &str) -> GuestConfig {
    GuestConfig::new(script).virtio_fs(socket, TAG)
}

#[test]
fn a_guest_hashes_files_that_virtiofsd_serves() {
    let kit = require_guest!(virtiofsd);
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    shared_dir(&shared);
    let files = ["hello.txt", "noise.bin", "deep/er/nested.bin", "empty"];
    let socket = tmp.path().join("fs.sock");
    let _virtiofsd = Virtiofsd::spawn(&kit, &shared, &socket).unwrap();

    let script = format!(
        "cd /mnt && sha256sum {} && cat hello.txt && ls -R /mnt | wc -l",
        files.join(" ")
    );
    let started = Instant::now();
    let mut guest = Guest::boot(&kit, &virtiofsd_config(&socket, &script)).unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    eprintln!("boot to result: {:.1?}", started.elapsed());

    assert_eq!(out.status, 0, "the script failed:\n{}", out.stdout);
    assert_eq!(hashes(&out.stdout), host_hashes(&shared, &files));
    assert!(
        out.stdout.contains("\nhello from the host\n"),
        "{}",
        out.stdout
    );
    assert!(guest.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

/// Prints a counter and a random value kept in guest memory, blocks on the
/// console until told to go on, then prints them again and fails on purpose
/// (its status must come through).
const COUNTER_SCRIPT: &str = r#"
i=0
while [ $i -lt 3 ]; do i=$((i + 1)); echo "count $i"; done
secret=$(head -c 8 /dev/urandom | md5sum | cut -c1-16)
echo "secret $secret"
echo "waiting for a line"
read line
echo "got $line"
i=$((i + 1)); echo "count $i"
echo "secret $secret"
exit 3
"#;

#[test]
fn a_guest_saved_to_a_file_runs_on_after_a_restore() {
    let kit = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let config = GuestConfig::new(COUNTER_SCRIPT).memory_mib(256);
    let mut guest = Guest::boot(&kit, &config).unwrap();
    let secret = guest.wait_for("secret ", SCRIPT_TIMEOUT).unwrap();
    guest
        .wait_for("waiting for a line", SCRIPT_TIMEOUT)
        .unwrap();

    let state = tmp.path().join("guest.state");
    let t = Instant::now();
    guest.save_to(&state).unwrap();
    let saved_in = t.elapsed();
    let t = Instant::now();
    let mut guest = Guest::restore(&kit, &config, &state).unwrap();
    let restored_in = t.elapsed();
    let size = std::fs::metadata(&state).unwrap().len();
    eprintln!(
        "save {saved_in:.1?}, restore {restored_in:.1?}, {} MiB",
        size >> 20
    );

    guest.write_line("go on").unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    assert_eq!(out.stdout, format!("got go on\ncount 4\n{secret}\n"));
    assert_eq!(out.status, 3);
    assert!(guest.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

/// A file opened before the save is read through the same descriptor after
/// the restore: virtiofsd hands its state over (vhost-user device state).
#[test]
fn a_guest_with_virtio_fs_is_saved_and_restored() {
    let kit = require_guest!(virtiofsd);
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    shared_dir(&shared);
    let socket = tmp.path().join("fs.sock");
    let script = r#"
        exec 3< /mnt/hello.txt
        sha256sum /mnt/deep/er/nested.bin
        echo "waiting for a line"
        read line
        cat <&3
        sha256sum /mnt/noise.bin
    "#;
    let config = virtiofsd_config(&socket, script);

    let virtiofsd = Virtiofsd::spawn(&kit, &shared, &socket).unwrap();
    let mut guest = Guest::boot(&kit, &config).unwrap();
    let before = guest.wait_for("nested.bin", SCRIPT_TIMEOUT).unwrap();
    guest
        .wait_for("waiting for a line", SCRIPT_TIMEOUT)
        .unwrap();
    let state = tmp.path().join("guest.state");
    let t = Instant::now();
    guest.save_to(&state).unwrap();
    let saved_in = t.elapsed();
    drop(virtiofsd);

    let _virtiofsd = Virtiofsd::spawn(&kit, &shared, &socket).unwrap();
    let t = Instant::now();
    let mut guest = Guest::restore(&kit, &config, &state).unwrap();
    eprintln!("save {saved_in:.1?}, restore {:.1?}", t.elapsed());
    guest.write_line("go").unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();

    assert_eq!(out.status, 0, "{}", out.stdout);
    let expected = host_hashes(&shared, &["deep/er/nested.bin", "noise.bin"]);
    let path = |p: &str| format!("/mnt/{p}");
    assert_eq!(
        format!("{before}\n{}", out.stdout),
        format!(
            "{}  {}\nhello from the host\n{}  {}\n",
            expected["deep/er/nested.bin"],
            path("deep/er/nested.bin"),
            expected["noise.bin"],
            path("noise.bin")
        )
    );
    assert!(guest.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

#[test]
fn a_missing_kit_is_a_loud_reason() {
    // On a machine without the pieces this must say what to run; with them,
    // the kit names real files.
    match GuestKit::find() {
        Ok(kit) => {
            assert!(kit.kernel.exists() && kit.modules.exists() && kit.qemu.exists());
        }
        Err(why) => assert!(why.contains("scripts/setup.sh"), "{why}"),
    }
}
