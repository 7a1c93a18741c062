//! `thaw virtiofs` serving images to real Linux guests under QEMU (TCG): the
//! guest mounts the image with `mount -t virtiofs` and reads it; the host
//! counts what the backend fetched. They skip loudly where QEMU or the guest
//! kernel is missing (`scripts/setup.sh` installs them).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thaw_testkit::guest::{Guest, GuestConfig, GuestKit};
use thaw_testkit::tree::{chmod, set_mtime_ns, write};
use thaw_testkit::{noise, require_guest, thaw_bin, thaw_json, thaw_ok, Server};

const MB: usize = 1 << 20;
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const TAG: &str = "thaw";

/// A `thaw virtiofs` process in the foreground; killed on drop (it exits by
/// itself when its VMM disconnects).
struct Backend {
    child: Child,
    socket: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Backend {
    /// Serves `reference` on `socket` and returns once the socket accepts.
    fn start(reference: &str, socket: &Path, cache: &Path, extra: &[&str]) -> Backend {
        let mut child = Command::new(thaw_bin())
            .args(["virtiofs", reference, "--foreground", "--socket"])
            .arg(socket)
            .arg("--cache-dir")
            .arg(cache)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run thaw virtiofs");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("thaw virtiofs ended before serving: {said}");
            }
            said += &line;
            if line.contains("over virtio-fs") {
                break;
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(said));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("[thaw virtiofs] {line}");
                keep.lock().unwrap().push_str(&line);
            }
        });
        Backend {
            child,
            socket: socket.to_path_buf(),
            log,
        }
    }

    /// Waits up to `timeout` for its log to contain `needle`.
    fn logged(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn stats(&self) -> serde_json::Value {
        thaw_json(&["stats", self.socket.to_str().unwrap()])
    }

    /// Waits for the process to end (after its VMM disconnected).
    fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "thaw virtiofs did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a store, a server, a source tree, a cache directory.
struct World {
    tmp: tempfile::TempDir,
    server: Server,
}

impl World {
    fn new() -> World {
        World::with_server(&[])
    }

    fn with_server(args: &[&str]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start_with(&tmp.path().join("store"), args);
        World { tmp, server }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn push(&self, src: &Path, name_tag: &str) -> String {
        let r = self.server.reference(name_tag);
        thaw_ok(&["push", src.to_str().unwrap(), &r]);
        r
    }

    fn backend(&self, r: &str, cache: &str, extra: &[&str]) -> Backend {
        Backend::start(r, &self.path("fs.sock"), &self.path(cache), extra)
    }

    fn config(&self, script: &str) -> GuestConfig {
        GuestConfig::new(script).virtio_fs(&self.path("fs.sock"), TAG)
    }
}

/// A static program that maps a file and writes the mapped bytes to stdout:
/// the guest's busybox has no mmap reader. Built with the machine's C
/// compiler; `None` (the test then says so) where there is none.
fn mmap_cat() -> Option<Vec<u8>> {
    const SOURCE: &str = r#"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) return 2;
    char *p = mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return 3;
    for (off_t done = 0; done < st.st_size;) {
        ssize_t n = write(1, p + done, st.st_size - done);
        if (n <= 0) return 4;
        done += n;
    }
    return 0;
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mmap_cat.c");
    let bin = dir.path().join("mmap_cat");
    std::fs::write(&src, SOURCE).unwrap();
    let built = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    built.then(|| std::fs::read(&bin).unwrap())
}

/// A tree with what the guest must see exactly: a large sparse file,
/// symlinks, hardlinks, modes and mtimes, nested and oddly named files.
fn edge_tree(src: &Path) {
    std::fs::create_dir_all(src.join("empty_dir")).unwrap();
    write(&src.join("empty"), b"");
    write(&src.join("a/b/c/deep.txt"), b"deep");
    write(&src.join("name with spaces.txt"), b"spaces");
    write(&src.join("big.bin"), &noise(1, 5 * MB + 123));
    for i in 0..120 {
        let body = format!("print({i})\n").repeat(i % 50 + 1);
        write(&src.join(format!("pkg/mod{i:03}.py")), body.as_bytes());
    }
    std::os::unix::fs::symlink("big.bin", src.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    std::fs::hard_link(src.join("pkg/mod007.py"), src.join("hard.py")).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(64 * MB as u64).unwrap();
    sparse.write_all_at(b"middle", 40 * MB as u64).unwrap();
    drop(sparse);
    chmod(&src.join("a/b"), 0o750);
    chmod(&src.join("empty"), 0o604);
    chmod(&src.join("pkg/mod001.py"), 0o755);
    set_mtime_ns(&src.join("a/b/c/deep.txt"), 1_234_567_890_123_456_789);
    set_mtime_ns(&src.join("big.bin"), 42_000_000_000);
}

/// What the guest prints for a tree: per entry `S|path|mode hex|links|size|mtime`,
/// `H|path|sha256` per file, `L|path|target` per symlink, `I|path|inode`.
const DESCRIBE: &str = r#"
cd /mnt
find . -exec stat -c 'S|%n|%f|%h|%s|%Y' {} \;
find . -type f -exec sh -c 'echo "H|$1|$(sha256sum < "$1" | cut -d" " -f1)"' _ {} \;
find . -type l -exec sh -c 'echo "L|$1|$(readlink "$1")"' _ {} \;
stat -c 'I|%n|%i' ./hard.py ./pkg/mod007.py
"#;

/// The same description, computed on the host from the source tree.
fn describe_host(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        let full = src.join(&rel);
        let md = std::fs::symlink_metadata(&full).unwrap();
        let name = rel.to_str().unwrap().to_string();
        // A directory's size and link count are the filesystem's business.
        let (links, size) = if md.is_dir() {
            ("-".into(), "-".into())
        } else {
            (md.nlink().to_string(), md.size().to_string())
        };
        out.insert(
            format!("S|{name}"),
            format!("{:x}|{links}|{size}|{}", md.mode(), md.mtime()),
        );
        if md.file_type().is_symlink() {
            let target = std::fs::read_link(&full).unwrap();
            out.insert(format!("L|{name}"), target.to_str().unwrap().to_string());
        } else if md.is_file() {
            out.insert(format!("H|{name}"), sha256(&full));
        } else if md.is_dir() {
            for e in std::fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Parses the guest's description; inodes are returned apart.
fn describe_guest(stdout: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut inodes = Vec::new();
    for line in stdout.lines() {
        let mut parts = line.splitn(3, '|');
        let (Some(kind), Some(name), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        match kind {
            "I" => inodes.push(rest.to_string()),
            "S" => {
                let f: Vec<&str> = rest.split('|').collect();
                let mode = u32::from_str_radix(f[0], 16).unwrap();
                let (links, size) = if mode & libc::S_IFMT == libc::S_IFDIR {
                    ("-", "-")
                } else {
                    (f[1], f[2])
                };
                out.insert(
                    format!("S|{name}"),
                    format!("{}|{links}|{size}|{}", f[0], f[3]),
                );
            }
            "H" | "L" => {
                out.insert(format!("{kind}|{name}"), rest.to_string());
            }
            _ => {}
        }
    }
    (out, inodes)
}

#[test]
fn the_guest_sees_the_image_exactly() {
    let kit = require_guest!();
    let w = World::new();
    let src = w.path("src");
    edge_tree(&src);
    let r = w.push(&src, "edge:v1");
    let _backend = w.backend(&r, "cache", &[]);
    let mmap = mmap_cat();
    let mut config = w.config(&format!(
        "{DESCRIBE}\n{}",
        if mmap.is_some() {
            "echo \"M|big.bin|$(/bin/mmap_cat /mnt/big.bin | sha256sum | cut -d' ' -f1)\""
        } else {
            ""
        }
    ));
    if let Some(bin) = mmap.clone() {
        config = config.file("bin/mmap_cat", bin, 0o755);
    } else {
        eprintln!("\nSKIP (part): no C compiler to build the mmap reader; mmap is not checked\n");
    }
    let t = Instant::now();
    let mut guest = Guest::boot(&kit, &config).unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    eprintln!("boot to result: {:.1?}", t.elapsed());
    assert_eq!(out.status, 0, "{}", out.stdout);

    let (seen, inodes) = describe_guest(&out.stdout);
    let expected = describe_host(&src);
    assert!(expected.len() > 250, "only {} facts", expected.len());
    for (k, v) in &expected {
        assert_eq!(seen.get(k), Some(v), "{k} differs in the guest");
    }
    assert_eq!(seen.len(), expected.len(), "the guest sees extra entries");
    assert_eq!(inodes.len(), 2);
    assert_eq!(inodes[0], inodes[1], "hardlinks are not one inode");
    if mmap.is_some() {
        let line = out.stdout.lines().find(|l| l.starts_with("M|")).unwrap();
        assert_eq!(&line[10..], sha256(&src.join("big.bin")), "mmap'd read");
    }
}

#[test]
fn one_byte_of_a_100mb_file_fetches_at_most_two_chunks() {
    let kit = require_guest!();
    let w = World::new();
    let data = noise(7, 100 * MB);
    let src = w.path("src");
    write(&src.join("weights.bin"), &data);
    let r = w.push(&src, "w:v1");
    let backend = w.backend(&r, "cache", &[]);
    // A missing name, three times: the guest keeps the negative entry, so
    // one lookup of it reaches the backend.
    let script = "for i in 1 2 3; do ls /mnt/no-such-module.py 2>/dev/null && echo FOUND; done\n\
                  dd if=/mnt/weights.bin bs=1 count=1 skip=52428801 2>/dev/null | od -An -tu1\n\
                  echo 'read done'\nread line\n";
    let mut guest = Guest::boot(&kit, &w.config(script)).unwrap();
    guest.wait_for("read done", SCRIPT_TIMEOUT).unwrap();
    let stats = backend.stats();
    let so_far = guest.output();
    guest.write_line("go").unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    assert_eq!(out.status, 0, "{}", out.stdout);
    let printed: u8 = so_far
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .expect("the byte the guest read");
    assert_eq!(printed, data[52_428_801]);
    let fetched = stats["chunks_fetched"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&fetched),
        "one byte fetched {fetched} chunks: {stats}"
    );
    assert_eq!(stats["transport"], "virtiofs");
    assert!(!so_far.contains("FOUND"), "{so_far}");
    // weights.bin, and the missing name once.
    assert_eq!(stats["lookups"], 2, "{stats}");
}

#[test]
fn a_corrupted_chunk_is_eio_in_the_guest_never_wrong_bytes() {
    let kit = require_guest!();
    // No hot cache: the server must read the damaged frame from its store.
    let w = World::with_server(&["--cache-mem", "0"]);
    let data = noise(13, 3 * MB);
    let src = w.path("src");
    write(&src.join("data"), &data);
    let r = w.push(&src, "bad:v1");
    // Replace the second chunk's frame with a well-formed frame of other bytes.
    let id = blake3::hash(&data[MB..2 * MB]).to_hex().to_string();
    let path = w.server.store.join("chunks").join(&id[..2]).join(&id);
    let mut frame = b"THCK\x01\x00\x00\x00".to_vec();
    frame.extend_from_slice(&(MB as u32).to_le_bytes());
    let mut evil = data[MB..2 * MB].to_vec();
    evil[777] ^= 1;
    frame.extend_from_slice(&evil);
    std::fs::write(&path, frame).unwrap();
    let _backend = w.backend(&r, "cache", &["--readahead", "0"]);
    let script = "dd if=/mnt/data bs=4096 count=1 2>/dev/null | sha256sum\n\
                  if dd if=/mnt/data of=/tmp/second bs=4096 count=1 skip=257 2>/tmp/err; \
                  then echo 'second: read'; sha256sum < /tmp/second; \
                  else echo \"second: failed: $(cat /tmp/err)\"; fi\n";
    let mut guest = Guest::boot(&kit, &w.config(script)).unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    let first = String::from_utf8(
        Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&data[..4096])?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(out.stdout.starts_with(&first[..64]), "{}", out.stdout);
    assert!(
        out.stdout.contains("second: failed") && out.stdout.contains("Input/output error"),
        "the corrupted chunk was not EIO:\n{}",
        out.stdout
    );
}

#[test]
fn with_the_server_gone_an_uncached_read_fails_within_the_fetch_timeout() {
    let kit = require_guest!();
    let mut w = World::new();
    let src = w.path("src");
    write(&src.join("cold.bin"), &noise(3, 3 * MB));
    write(&src.join("small.txt"), b"metadata still answers");
    let r = w.push(&src, "down:v1");
    let _backend = w.backend(&r, "cache", &["--fetch-timeout", "3"]);
    let script = "echo ready\nread line\n\
                  time -f 'took %e s' dd if=/mnt/cold.bin of=/dev/null bs=64k 2>&1 | grep -E 'error|took'\n\
                  ls /mnt\necho alive\n";
    let mut guest = Guest::boot(&kit, &w.config(script)).unwrap();
    guest.wait_for("ready", SCRIPT_TIMEOUT).unwrap();
    w.server.kill();
    let t = Instant::now();
    guest.write_line("go").unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    let waited = t.elapsed();
    assert!(out.stdout.contains("Input/output error"), "{}", out.stdout);
    assert!(out.stdout.contains("small.txt") && out.stdout.contains("alive"));
    let took: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("took ")?.strip_suffix(" s")?.parse().ok())
        .expect("the guest timed the read");
    // The deadline is 3 s; a guest under emulation adds its own slowness.
    assert!(
        took < 10.0,
        "the read failed after {took} s (host saw {waited:?})"
    );
}

#[test]
fn a_read_waiting_for_the_network_does_not_hold_up_the_others() {
    let kit = require_guest!();
    let w = World::new();
    let src = w.path("src");
    write(&src.join("slow.bin"), &noise(4, 2 * MB));
    write(&src.join("fast.bin"), &noise(5, 2 * MB));
    let r = w.push(&src, "par:v1");
    let _backend = w.backend(&r, "cache", &["--fetch-timeout", "60", "--readahead", "0"]);
    let script = "cat /mnt/fast.bin > /dev/null && echo 3 > /proc/sys/vm/drop_caches\n\
                  echo ready\nread line\n\
                  (dd if=/mnt/slow.bin of=/dev/null bs=4k count=1 2>/dev/null; echo 'slow done') &\n\
                  sleep 1\n\
                  sha256sum /mnt/fast.bin\nls /mnt\necho 'fast done'\nwait\n";
    let mut guest = Guest::boot(&kit, &w.config(script)).unwrap();
    guest.wait_for("ready", SCRIPT_TIMEOUT).unwrap();
    // The server stops answering: slow.bin's fetch hangs, fast.bin is cached.
    let pid = w.server.pid().expect("the server runs").to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    guest.write_line("go").unwrap();
    let fast = guest.wait_for("fast done", SCRIPT_TIMEOUT);
    let before = guest.output();
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    fast.unwrap();
    assert!(
        !before.contains("slow done"),
        "the slow read finished while the server was stopped:\n{before}"
    );
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    assert_eq!(out.status, 0, "{}", out.stdout);
    assert!(out.stdout.contains("slow done"), "{}", out.stdout);
    assert!(out.stdout.contains(&sha256(&src.join("fast.bin"))));
}

/// A guest that has files open is saved to a file, the backend is replaced
/// by a new process with an empty cache, and the restored guest reads the
/// open files to their end.
#[test]
fn open_files_survive_a_snapshot_and_a_new_backend() {
    let kit = require_guest!();
    let w = World::new();
    let src = w.path("src");
    let data = noise(9, 4 * MB + 77);
    write(&src.join("model.bin"), &data);
    write(&src.join("notes.txt"), b"first line\nsecond line\n");
    let r = w.push(&src, "snap:v1");
    write(&w.path("other/x"), b"another image");
    let other = w.push(&w.path("other"), "other:v1");
    let script = "exec 3< /mnt/model.bin\nexec 4< /mnt/notes.txt\n\
                  dd bs=1000000 count=1 <&3 > /tmp/head 2>/dev/null\nread first <&4\n\
                  echo \"ready $first\"\nread line\n\
                  cat <&3 > /tmp/tail\ncat /tmp/head /tmp/tail | sha256sum\ncat <&4\n";
    let config = w.config(script);
    let backend = w.backend(&r, "cache1", &[]);
    let mut guest = Guest::boot(&kit, &config).unwrap();
    guest.wait_for("ready first line", SCRIPT_TIMEOUT).unwrap();
    let state = w.path("guest.state");
    let t = Instant::now();
    guest.save_to(&state).unwrap();
    eprintln!("saved in {:.1?}", t.elapsed());
    assert!(backend.wait(Duration::from_secs(30)).success());

    // A backend of another image refuses the state: the restore fails.
    let wrong = w.backend(&other, "cache2", &[]);
    let refused = Guest::restore(&kit, &config, &state);
    assert!(refused.is_err(), "a state for another image was taken");
    assert!(
        wrong.logged("the device state is for image", Duration::from_secs(5)),
        "the refusal does not say why"
    );
    drop(refused);
    drop(wrong);

    let _backend = w.backend(&r, "cache3", &[]);
    let t = Instant::now();
    let mut guest = Guest::restore(&kit, &config, &state).unwrap();
    eprintln!("restored in {:.1?}", t.elapsed());
    guest.write_line("go").unwrap();
    let out = guest.wait_script(SCRIPT_TIMEOUT).unwrap();
    assert_eq!(out.status, 0, "{}", out.stdout);
    assert_eq!(
        out.stdout,
        format!("{}  -\nsecond line\n", sha256(&src.join("model.bin")))
    );
}

#[test]
fn the_guest_kit_is_found_or_the_reason_is_loud() {
    match GuestKit::find() {
        Ok(kit) => assert!(kit.kernel.exists()),
        Err(why) => assert!(why.contains("scripts/setup.sh"), "{why}"),
    }
}
