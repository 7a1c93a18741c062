//! Real FUSE mounts of images on a real `thaw serve` process.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thaw_testkit::tree::{chmod, set_xattr, write};
use thaw_testkit::{assert_eio_within, assert_same_tree, noise, thaw, thaw_ok, Mount, Server};

const MB: usize = 1 << 20;

/// One test's world: a store, a server, a source tree and a cache directory.
struct World {
    tmp: tempfile::TempDir,
    server: Server,
}

impl World {
    fn new(server_args: &[&str]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start_with(&tmp.path().join("store"), server_args);
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

    /// Pushes the [`edge_tree`]; returns where it is and its reference.
    fn push_edge_tree(&self, name_tag: &str) -> (PathBuf, String) {
        let src = self.path("src");
        edge_tree(&src);
        let r = self.push(&src, name_tag);
        (src, r)
    }

    /// Pushes an image of one file, `name`, holding `data`.
    fn push_file(&self, name: &str, data: &[u8], name_tag: &str) -> String {
        let src = self.path("src");
        write(&src.join(name), data);
        self.push(&src, name_tag)
    }

    fn mount(&self, r: &str, name: &str, extra: &[&str]) -> Mount {
        let cache = self.path("cache");
        let mut args = vec!["--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Mount::new(r, &self.path(name), &args)
    }
}

/// A tree with the edge cases a mount must reproduce.
fn edge_tree(src: &Path) {
    std::fs::create_dir_all(src.join("empty_dir")).unwrap();
    write(&src.join("empty"), b"");
    write(&src.join("a/b/c/d/deep.txt"), b"deep");
    write(&src.join("ünï cødé name.txt"), b"unicode");
    write(&src.join("big.bin"), &noise(1, 5 * MB + 123));
    for i in 0..300 {
        let body = format!("print({i})\n").repeat(i % 50 + 1);
        write(&src.join(format!("a/small{i:03}.py")), body.as_bytes());
    }
    std::os::unix::fs::symlink("big.bin", src.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    std::fs::hard_link(src.join("a/small007.py"), src.join("hard.py")).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(20 * MB as u64).unwrap();
    sparse.write_all_at(b"middle", 10 * MB as u64).unwrap();
    chmod(&src.join("a/b"), 0o750);
    chmod(&src.join("empty"), 0o604);
    set_xattr(&src.join("big.bin"), "user.origin", b"generated");
}

#[test]
fn mounted_tree_matches_source_and_is_read_only() {
    let w = World::new(&[]);
    let (src, r) = w.push_edge_tree("edge:v1");
    let t = Instant::now();
    let m = w.mount(&r, "mnt", &[]);
    eprintln!("mounted in {:?}", t.elapsed());
    let entries = assert_same_tree(&src, &m.dir);
    assert!(entries > 300, "only {entries} entries compared");
    // Holes read as zeros, data around them intact.
    let f = std::fs::File::open(m.dir.join("sparse")).unwrap();
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, 5 * MB as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut mid = [0u8; 6];
    f.read_exact_at(&mut mid, 10 * MB as u64).unwrap();
    assert_eq!(&mid, b"middle");
    // Read-only: writes are refused with EROFS.
    let err = std::fs::write(m.dir.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(m.dir.join("big.bin"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(
        std::fs::remove_file(m.dir.join("empty"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(
        std::fs::create_dir(m.dir.join("d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // A missing name stays missing, and the kernel remembers it: one
    // lookup reaches the mount. Opens after the first never reach it (the
    // kernel opens without a message), and reopened files and listings read
    // the same.
    let before = m.stats();
    for _ in 0..3 {
        let err = std::fs::metadata(m.dir.join("no-such-module.py")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert_eq!(
            std::fs::read(m.dir.join("big.bin")).unwrap(),
            std::fs::read(src.join("big.bin")).unwrap()
        );
        assert_eq!(
            std::fs::read_dir(&m.dir).unwrap().count(),
            std::fs::read_dir(&src).unwrap().count()
        );
    }
    let stats = m.stats();
    let count = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    assert_eq!(
        count(&stats, "lookups") - count(&before, "lookups"),
        1,
        "{stats}"
    );
    assert_eq!(count(&stats, "opens"), 1, "one open per mount: {stats}");
    assert!(stats["chunks_fetched"].as_u64().unwrap() > 0);
    assert_eq!(stats["digest_mismatches"].as_u64(), Some(0));
}

#[test]
fn one_byte_of_a_large_file_fetches_at_most_two_chunks() {
    let w = World::new(&[]);
    let data = noise(7, 100 * MB);
    let r = w.push_file("weights.bin", &data, "w:v1");
    // Mounting fetches no chunk.
    let before = w.server.metric("thaw_chunks_served_total");
    let m = w.mount(&r, "mnt", &[]);
    assert_eq!(w.server.metric("thaw_chunks_served_total"), before);
    let f = std::fs::File::open(m.dir.join("weights.bin")).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 50 * MB as u64 + 12345).unwrap();
    assert_eq!(b[0], data[50 * MB + 12345]);
    std::thread::sleep(Duration::from_millis(200));
    let served = w.server.metric("thaw_chunks_served_total") - before;
    assert!(
        (1.0..=2.0).contains(&served),
        "served {served} chunks for one byte"
    );
    assert!(m.fetched() <= 2);
}

#[test]
fn mmap_shared_and_private_fault_in_only_touched_chunks() {
    let w = World::new(&[]);
    let data = noise(9, 64 * MB);
    let r = w.push_file("model.safetensors", &data, "mm:v1");
    let m = w.mount(&r, "mnt", &[]);
    let f = std::fs::File::open(m.dir.join("model.safetensors")).unwrap();
    // SAFETY: the file is on a read-only filesystem; nothing changes it while mapped.
    let shared = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    // SAFETY: as above; a private map is copy-on-write.
    let mut private = unsafe { memmap2::MmapOptions::new().map_copy(&f) }.unwrap();
    // Mid-chunk, so the kernel's fault readahead stays within one chunk.
    let offsets = [
        3 * MB + MB / 2 + 17,
        40 * MB + MB / 2,
        62 * MB + MB / 2 + 999,
    ];
    for &o in &offsets {
        assert_eq!(shared[o], data[o]);
        assert_eq!(private[o], data[o]);
    }
    private[5] ^= 0xff; // copy-on-write stays private
    assert_eq!(shared[5], data[5]);
    let fetched = m.fetched();
    assert!(
        (3..=4).contains(&fetched),
        "{fetched} chunks fetched for 3 touched pages"
    );
    assert!(shared[..] == data[..], "whole mapping matches");
}

#[test]
fn eight_threads_read_same_and_different_files() {
    let w = World::new(&[]);
    let src = w.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| noise(100 + i, 6 * MB + i as usize * 1000))
        .collect();
    for (i, d) in files.iter().enumerate() {
        std::fs::write(src.join(format!("f{i}")), d).unwrap();
    }
    let r = w.push(&src, "mt:v1");
    let m = w.mount(&r, "mnt", &[]);
    std::thread::scope(|s| {
        for t in 0..8usize {
            let (dir, files) = (&m.dir, &files);
            s.spawn(move || {
                // Threads 0-3 share file 0; 4-7 read files 0-3; offsets interleave.
                let i = t.saturating_sub(4);
                let f = std::fs::File::open(dir.join(format!("f{i}"))).unwrap();
                let mut buf = vec![0u8; 300_000];
                for k in 0..20 {
                    let off = ((k * 7 + t) * 301_111) % (files[i].len() - buf.len());
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(
                        buf[..] == files[i][off..off + buf.len()],
                        "thread {t} read {k}"
                    );
                }
                assert!(std::fs::read(dir.join(format!("f{i}"))).unwrap() == files[i]);
            });
        }
    });
    let stats = m.stats();
    // Each chunk was fetched once however many threads wanted it.
    assert!(
        stats["chunks_fetched"].as_u64().unwrap() <= 4 * 7,
        "{stats}"
    );
}

#[test]
fn server_down_gives_eio_quickly_then_recovers() {
    let mut w = World::new(&[]);
    let data = noise(11, 16 * MB);
    let r = w.push_file("data", &data, "down:v1");
    let m = w.mount(&r, "mnt", &["--fetch-timeout", "2", "--readahead", "0"]);
    let f = std::fs::File::open(m.dir.join("data")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    w.server.kill();
    // Cached data is still served.
    f.read_exact_at(&mut buf, 100).unwrap();
    assert!(buf[..] == data[100..4196]);
    // Uncached data fails with EIO within the bounded time.
    assert_eio_within(&f, 9 * MB as u64, &mut buf, Duration::from_secs(15));
    // Back up: the same read works without a remount.
    w.server.restart();
    f.read_exact_at(&mut buf, 9 * MB as u64).unwrap();
    assert!(buf[..] == data[9 * MB..9 * MB + 4096]);
    assert!(m.stats()["fetch_errors"].as_u64().unwrap() >= 1);
}

#[test]
fn corrupted_chunk_in_the_store_gives_eio_never_wrong_bytes() {
    let w = World::new(&["--cache-mem", "0"]);
    let data = noise(13, 3 * MB);
    let r = w.push_file("data", &data, "bad:v1");
    // Replace the second chunk's frame with a valid frame of other bytes.
    let id = blake3::hash(&data[MB..2 * MB]).to_hex().to_string();
    let path = w.server.store.join("chunks").join(&id[..2]).join(&id);
    let mut frame = b"THCK\x01\x00\x00\x00".to_vec();
    frame.extend_from_slice(&(MB as u32).to_le_bytes());
    let mut evil = data[MB..2 * MB].to_vec();
    evil[777] ^= 1;
    frame.extend_from_slice(&evil);
    std::fs::write(&path, frame).unwrap();
    let m = w.mount(&r, "mnt", &["--readahead", "0"]);
    let f = std::fs::File::open(m.dir.join("data")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    let err = f.read_exact_at(&mut buf, MB as u64 + 512).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The server verifies what it reads from its store: it quarantines the
    // frame and answers "not found", which the mount reports as EIO.
    assert!(m.stats()["fetch_errors"].as_u64().unwrap() >= 1);
    assert!(w.server.metric("thaw_quarantined_total") >= 1.0);
    // Nothing bad reached the disk cache.
    let cached = w.path("cache/v3/chunks").join(&id[..2]).join(&id);
    assert!(!cached.exists());
}

#[test]
fn small_disk_cache_evicts_and_stays_correct() {
    let w = World::new(&[]);
    let data = noise(17, 24 * MB);
    let r = w.push_file("data", &data, "ev:v1");
    let m = w.mount(&r, "mnt", &["--cache-size", "6M", "--cache-mem", "2M"]);
    assert!(std::fs::read(m.dir.join("data")).unwrap() == data);
    std::thread::sleep(Duration::from_millis(300));
    let total: u64 = walk_sizes(&w.path("cache/v3"));
    // The budget, and at most one entry (a chunk, its outboard, the
    // trailer) written while the last eviction ran.
    let entry = (MB + 64 * 32 + 64) as u64;
    assert!(
        total <= 6 * MB as u64 + entry,
        "disk cache holds {total} bytes"
    );
    assert!(total > 0);
    assert!(m.stats()["disk_evicted"].as_u64().unwrap() > 0);
}

#[test]
fn full_cache_disk_degrades_to_the_network() {
    let w = World::new(&[]);
    let data = noise(19, 12 * MB);
    let r = w.push_file("data", &data, "full:v1");
    // A 2 MiB filesystem under a cache that believes it may use 1 GiB.
    let cache = w.path("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success(), "cannot mount a tmpfs (tests run as root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _tmpfs = Unmount(cache.clone());
    {
        let m = w.mount(&r, "mnt", &["--cache-size", "1G", "--cache-mem", "1M"]);
        assert!(
            std::fs::read(m.dir.join("data")).unwrap() == data,
            "reads stay correct on a full disk"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(m.stats()["disk_write_errors"].as_u64().unwrap() > 0);
    }
}

fn walk_sizes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.metadata().unwrap();
        if md.is_dir() {
            if e.file_name() != "tmp" {
                total += walk_sizes(&e.path());
            }
        } else {
            total += md.len();
        }
    }
    total
}

#[test]
fn remount_reads_everything_from_the_disk_cache() {
    let w = World::new(&[]);
    let (src, r) = w.push_edge_tree("warm:v1");
    {
        let m = w.mount(&r, "mnt", &[]);
        assert_same_tree(&src, &m.dir);
    }
    std::thread::sleep(Duration::from_millis(300)); // cache writes finish in the background
    let before = w.server.metric("thaw_chunks_served_total");
    let m = w.mount(&r, "mnt", &[]);
    assert_same_tree(&src, &m.dir);
    assert_eq!(
        w.server.metric("thaw_chunks_served_total"),
        before,
        "remount fetched over the network"
    );
    let s = m.stats();
    assert_eq!(s["chunks_fetched"].as_u64(), Some(0), "{s}");
    assert!(s["disk_hits"].as_u64().unwrap() > 0);
}

/// A 4 KiB read of a large file whose chunks only the disk cache holds
/// reads and hashes the 16 KiB group around it, not the 1 MiB chunk, and
/// still never serves a damaged byte: a damaged group or outboard makes the
/// entry corrupt and the chunk is fetched again; damage elsewhere in the
/// entry does not concern that read.
#[test]
fn a_small_warm_read_of_a_large_file_verifies_only_its_part_of_the_cache() {
    let w = World::new(&[]);
    let data = noise(29, 16 * MB);
    let r = w.push_file("weights", &data, "slice:v1");
    {
        let m = w.mount(&r, "mnt", &[]);
        assert!(std::fs::read(m.dir.join("weights")).unwrap() == data);
    }
    std::thread::sleep(Duration::from_millis(300)); // cache writes finish in the background
    let entry = |k: usize| {
        let id = blake3::hash(&data[k * MB..(k + 1) * MB]).to_hex();
        w.path("cache/v3/chunks").join(&id[..2]).join(id.as_str())
    };
    // The chunk's bytes, a 32-byte value per 16 KiB group, the trailer.
    assert_eq!(
        std::fs::metadata(entry(3)).unwrap().len(),
        (MB + 64 * 32 + 64) as u64
    );
    // Page-sized reads at 20 KiB into chunks 1, 5, 9 and 13, no readahead.
    let within = 5 * 4096;
    let read_pages = |m: &Mount| {
        let f = std::fs::File::open(m.dir.join("weights")).unwrap();
        // SAFETY: a valid open descriptor; advice only.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_RANDOM,
            )
        };
        for k in [1, 5, 9, 13] {
            let at = k * MB + within;
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(buf[..] == data[at..at + 4096], "chunk {k}");
        }
        m.stats()
    };
    let flags = ["--profile", "off", "--readahead", "0"];
    let counts = |s: &serde_json::Value, keys: [&str; 3]| keys.map(|k| s[k].as_u64());
    let s = read_pages(&w.mount(&r, "mnt", &flags));
    assert_eq!(
        counts(&s, ["disk_slice_hits", "disk_hits", "chunks_fetched"]),
        [Some(4), Some(0), Some(0)],
        "{s}"
    );

    let flip = |k: usize, at: usize| {
        let p = entry(k);
        let mut b = std::fs::read(&p).unwrap();
        b[at] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    };
    flip(5, within + 100); // in the group the read covers
    flip(9, MB + 3 * 32 + 1); // in the outboard
    flip(13, 3 * 16384 + 7); // in another group of the chunk
    let s = read_pages(&w.mount(&r, "mnt", &flags));
    assert_eq!(
        counts(&s, ["disk_slice_hits", "disk_corrupt", "chunks_fetched"]),
        [Some(2), Some(2), Some(2)],
        "{s}"
    );
    assert_eq!(s["digest_mismatches"].as_u64(), Some(0), "{s}");
}

#[test]
fn tampered_manifest_is_refused_at_mount() {
    let w = World::new(&[]);
    let r = w.push_file("f", b"hello", "t:v1");
    let dir = w.server.store.join("manifests");
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&entry, bytes).unwrap();
    std::fs::create_dir_all(w.path("mnt")).unwrap();
    let out = thaw(&[
        "mount",
        &r,
        w.path("mnt").to_str().unwrap(),
        "--cache-dir",
        w.path("cache").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("digest mismatch"), "{err}");
}

#[test]
fn a_crashed_mount_is_replaced_by_the_next_one() {
    let w = World::new(&[]);
    let src = w.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"still here").unwrap();
    let r = w.push(&src, "crash:v1");
    let m = w.mount(&r, "mnt", &[]);
    let pid = m.stats()["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the mount process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let dead = std::fs::read_dir(&m.dir).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    // A new mount at the same place detaches the dead one by itself.
    let again = w.mount(&r, "mnt", &[]);
    assert_eq!(std::fs::read(again.dir.join("a")).unwrap(), b"still here");
    std::mem::forget(m);
}
