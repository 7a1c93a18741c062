//! Working-set profiles end to end: a real `thaw serve`, real FUSE mounts,
//! `thaw profile record`, `thaw mount --record`, a push that carries a profile
//! to the next version, and what a cold mount does with them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thaw_testkit::tree::write;
use thaw_testkit::{noise, thaw_json, Mount, Server};

const MB: usize = 1 << 20;

/// One test's world: a store, a server and a source tree.
struct World {
    tmp: tempfile::TempDir,
    server: Server,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start(&tmp.path().join("store"));
        World { tmp, server }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// A large file the start reads, one it does not, and 400 small modules
    /// (five packs), of which the start imports the first hundred.
    fn tree(&self) -> PathBuf {
        let src = self.path("src");
        write(&src.join("lib/core.so"), &noise(1, 6 * MB + 100));
        write(&src.join("lib/unused.so"), &noise(2, 4 * MB));
        for i in 0..400u64 {
            write(
                &src.join(format!("pkg/m{i:03}.py")),
                &noise(100 + i, 12_000),
            );
        }
        src
    }

    /// The [`World::tree`] pushed as `app:v1` and its start recorded `runs`
    /// times: the tree, the reference and what `thaw profile record` said.
    fn recorded(&self, runs: usize) -> (PathBuf, String, Value) {
        let src = self.tree();
        let (r, _) = self.push(&src, "app:v1");
        let runs = runs.to_string();
        let said = thaw_json(&["profile", "record", &r, "--run", START, "--runs", &runs]);
        (src, r, said)
    }

    fn push(&self, src: &Path, name_tag: &str) -> (String, Value) {
        let r = self.server.reference(name_tag);
        let report = thaw_json(&["push", src.to_str().unwrap(), &r]);
        (r, report)
    }

    /// A mount over a fresh, empty cache.
    fn cold_mount(&self, r: &str, name: &str, extra: &[&str]) -> Mount {
        let cache = self.path(&format!("cache-{name}"));
        let mut args = vec!["--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Mount::new(r, &self.path(name), &args)
    }
}

/// The start: the large library, then the first hundred modules.
const START: &str = "cat lib/core.so pkg/m0[0-9][0-9].py > /dev/null";

/// Reads what [`START`] reads through `root` and checks it against `src`.
fn run_start(root: &Path, src: &Path) {
    for name in start_files() {
        let got = std::fs::read(root.join(&name)).unwrap();
        assert!(got == std::fs::read(src.join(&name)).unwrap(), "{name}");
    }
}

/// Waits until the mount's profile stream has ended; returns its stats.
fn streamed(m: &Mount) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = m.stats();
        if s["profile"] != "streaming" {
            return s;
        }
        assert!(Instant::now() < deadline, "the stream did not end: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn a_recorded_profile_is_fetched_before_the_reads_ask_and_no_profile_turns_it_off() {
    let w = World::new();
    let (src, r, recorded) = w.recorded(2);
    let p = &recorded["profile"];
    assert_eq!(num(p, "runs"), 2);
    assert_eq!(num(p, "files"), 101, "{p}");
    let working_set = num(p, "working_set_chunks");
    // Seven chunks of the library, and the two packs that hold the modules
    // read (the unused library and the later packs stay out).
    assert!((8..=10).contains(&working_set), "{p}");
    let inspected = thaw_json(&["inspect", &r]);
    assert_eq!(inspected["profile"]["working_set_chunks"], working_set);

    // A cold mount streams the working set in a few batch requests before
    // anything reads it.
    let served = w.server.metric("thaw_chunks_served_total");
    let m = w.cold_mount(&r, "mnt", &[]);
    let s = streamed(&m);
    assert_eq!(s["profile"], "done", "{s}");
    assert_eq!(num(&s, "reads"), 0);
    assert_eq!(num(&s, "profile_chunks"), working_set);
    assert_eq!(num(&s, "profile_chunks_streamed"), working_set);
    assert!(num(&s, "profile_batches") <= 4, "{s}");
    assert_eq!(num(&s, "chunks_fetched"), working_set);
    assert_eq!(
        w.server.metric("thaw_chunks_served_total") - served,
        working_set as f64
    );
    // The start finds everything fetched: no read fetches.
    run_start(&m.dir, &src);
    let s = m.stats();
    // What the kernel was handed ahead of a read does not reach the mount.
    assert!(num(&s, "reads") + num(&s, "pushes") > 0, "{s}");
    assert_eq!(num(&s, "chunks_fetched"), working_set, "{s}");
    assert_eq!(
        w.server.metric("thaw_chunks_served_total") - served,
        working_set as f64
    );
    drop(m);

    // Without the profile nothing is fetched before it is read.
    let served = w.server.metric("thaw_chunks_served_total");
    let m = w.cold_mount(&r, "plain", &["--no-profile"]);
    std::thread::sleep(Duration::from_millis(300));
    let s = m.stats();
    assert_eq!(s["profile"], "off");
    assert_eq!(num(&s, "chunks_fetched"), 0);
    assert_eq!(w.server.metric("thaw_chunks_served_total"), served);
    run_start(&m.dir, &src);
    let s = m.stats();
    assert_eq!(num(&s, "profile_chunks_streamed"), 0);
    assert_eq!(num(&s, "profile_batches"), 0);
    assert!(num(&s, "chunks_fetched") >= working_set, "{s}");
}

/// The files [`START`] reads.
fn start_files() -> Vec<String> {
    let mut names = vec!["lib/core.so".to_owned()];
    names.extend((0..100).map(|i| format!("pkg/m{i:03}.py")));
    names
}

#[test]
fn streamed_bytes_reach_the_page_cache_before_the_start_reads_them() {
    let w = World::new();
    let (src, r, _) = w.recorded(2);
    let wanted: u64 = start_files()
        .iter()
        .map(|n| std::fs::metadata(src.join(n)).unwrap().len())
        .sum();
    for (name, push) in [("pushed", true), ("asked", false)] {
        let extra: &[&str] = if push { &[] } else { &["--no-push"] };
        let m = w.cold_mount(&r, name, extra);
        assert_eq!(streamed(&m)["profile"], "done");
        // Each file the kernel learns of gets its streamed bytes at once
        // (6 MiB and 100 bytes of library, a tail that ends mid-page, and
        // a hundred 12,000-byte modules packed together).
        for n in start_files() {
            std::fs::metadata(m.dir.join(n)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while push && num(&m.stats(), "pushed_bytes") < wanted {
            assert!(Instant::now() < deadline, "not pushed: {}", m.stats());
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = m.stats();
        run_start(&m.dir, &src);
        let s = m.stats();
        if push {
            // Every byte read was already in the page cache, and right.
            assert_eq!(num(&s, "reads"), num(&before, "reads"), "{s}");
            assert_eq!(num(&s, "pushed_bytes"), wanted, "{s}");
        } else {
            assert!(num(&s, "reads") >= 101, "{s}");
            assert_eq!(num(&s, "pushes"), 0, "{s}");
        }
    }
}

/// `thaw mount --timeline` writes, when unmounted, what the mount did: the
/// stream's batches, the reads that reached it and the pushes, agreeing with
/// its counters; and a mount without a profile shows its demand fetches.
#[test]
fn a_mount_writes_its_timeline_when_unmounted() {
    let w = World::new();
    let (src, r, _) = w.recorded(1);
    let events = |path: &Path, kind: &str| -> Vec<Value> {
        let t: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(t["dropped"], 0, "{t}");
        let all = t["events"].as_array().unwrap().clone();
        assert!(all
            .iter()
            .all(|e| e["at_us"].is_u64() && e["dur_us"].is_u64()));
        all.into_iter().filter(|e| e["kind"] == kind).collect()
    };
    let sum =
        |es: &[Value], key: &str| es.iter().map(|e| e[key].as_u64().unwrap_or(0)).sum::<u64>();

    let path = w.path("profiled.json");
    let m = w.cold_mount(&r, "mnt", &["--timeline", path.to_str().unwrap()]);
    streamed(&m);
    run_start(&m.dir, &src);
    let s = m.stats();
    drop(m);
    let batches = events(&path, "batch");
    assert_eq!(batches.len() as u64, num(&s, "profile_batches"), "{s}");
    assert_eq!(
        sum(&batches, "chunks"),
        num(&s, "profile_chunks_streamed"),
        "{s}"
    );
    assert_eq!(
        sum(&batches, "bytes"),
        num(&s, "profile_bytes_streamed"),
        "{s}"
    );
    assert_eq!(events(&path, "read").len() as u64, num(&s, "reads"), "{s}");
    let pushes = events(&path, "push");
    assert_eq!(pushes.len() as u64, num(&s, "pushes"), "{s}");
    assert_eq!(sum(&pushes, "bytes"), num(&s, "pushed_bytes"), "{s}");

    let path = w.path("cold.json");
    let m = w.cold_mount(
        &r,
        "plain",
        &["--no-profile", "--timeline", path.to_str().unwrap()],
    );
    run_start(&m.dir, &src);
    let s = m.stats();
    drop(m);
    let fetched = [events(&path, "fetch"), events(&path, "prefetch")].concat();
    assert_eq!(fetched.len() as u64, num(&s, "chunks_fetched"), "{s}");
    assert_eq!(sum(&fetched, "bytes"), num(&s, "bytes_fetched"), "{s}");
    assert!(events(&path, "batch").is_empty());
    assert!(!events(&path, "read").is_empty());
}

#[test]
fn mount_record_saves_at_unmount_and_recordings_merge() {
    let w = World::new();
    let src = w.tree();
    let (r, _) = w.push(&src, "app:v1");
    let m = w.cold_mount(&r, "one", &["--record"]);
    std::fs::read(m.dir.join("lib/core.so")).unwrap();
    drop(m); // unmounting saves
    let p = &thaw_json(&["inspect", &r])["profile"];
    assert_eq!(
        (num(p, "runs"), num(p, "working_set_chunks")),
        (1, 7),
        "{p}"
    );

    let m = w.cold_mount(&r, "two", &["--record"]);
    std::fs::read(m.dir.join("lib/unused.so")).unwrap();
    drop(m);
    let p = &thaw_json(&["inspect", &r])["profile"];
    // Each library was read in one run of two: both are in the working set.
    assert_eq!(
        (num(p, "runs"), num(p, "working_set_chunks")),
        (2, 11),
        "{p}"
    );
    assert_eq!(num(p, "files"), 2);

    // A recording in which nothing was read is not saved.
    drop(w.cold_mount(&r, "idle", &["--record"]));
    let p = &thaw_json(&["inspect", &r])["profile"];
    assert_eq!(num(p, "runs"), 2, "{p}");
}

#[test]
fn the_next_version_inherits_the_profile_and_a_corrupt_one_is_refused() {
    let w = World::new();
    let (src, _, recorded) = w.recorded(1);
    let working_set = num(&recorded["profile"], "working_set_chunks");
    // The next version changes the library's last chunk and one module of
    // the second pack.
    let mut lib = std::fs::read(src.join("lib/core.so")).unwrap();
    lib[6 * MB + 50] ^= 1;
    write(&src.join("lib/core.so"), &lib);
    write(&src.join("pkg/m090.py"), &noise(7, 12_000));
    let (r2, pushed) = w.push(&src, "app:v1");
    // Carried: the chunks of v2 that hold what v1's start read, changed or not.
    let carried = num(&pushed, "profile_carried");
    assert_eq!(carried, working_set, "{pushed}");
    let m = w.cold_mount(&r2, "mnt", &[]);
    let s = streamed(&m);
    assert_eq!(s["profile"], "done", "{s}");
    assert_eq!(num(&s, "profile_chunks_streamed"), carried);
    run_start(&m.dir, &src);
    let s = m.stats();
    assert_eq!(
        num(&s, "chunks_fetched"),
        carried,
        "nothing fetched on demand: {s}"
    );
    drop(m);

    // A profile damaged in the store is refused with the reason; the mount
    // works without it.
    let manifest = pushed["manifest"].as_str().unwrap();
    let hex = manifest.trim_start_matches("blake3:");
    let stored = w.path("store/profiles").join(hex);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&stored, bytes).unwrap();
    let m = w.cold_mount(&r2, "damaged", &[]);
    let s = m.stats();
    let state = s["profile"].as_str().unwrap();
    assert!(
        state.starts_with("refused: ") && state.contains("checksum"),
        "{state}"
    );
    run_start(&m.dir, &src);
    assert_eq!(num(&m.stats(), "profile_batches"), 0);
}

#[test]
fn a_push_after_a_recording_packs_what_the_start_reads_together() {
    let w = World::new();
    let src = w.tree();
    let (r, _) = w.push(&src, "app:v1");
    // A start that reads every other module: spread over all five packs.
    let spread = "cat lib/core.so pkg/m*[02468].py > /dev/null";
    let recorded = thaw_json(&["profile", "record", &r, "--run", spread]);
    let before = num(&recorded["profile"], "working_set_chunks");
    assert_eq!(before, 7 + 5, "{recorded}");
    // The same tree again: the two hundred modules read now fill three packs.
    let (r2, pushed) = w.push(&src, "app:v1");
    assert_eq!(num(&pushed, "profile_carried"), 7 + 3, "{pushed}");
    let p = &thaw_json(&["inspect", &r2])["profile"];
    assert_eq!(num(p, "working_set_chunks"), 7 + 3, "{p}");
    let m = w.cold_mount(&r2, "mnt", &[]);
    let s = streamed(&m);
    assert_eq!(num(&s, "profile_chunks_streamed"), 7 + 3, "{s}");
    std::fs::read(m.dir.join("lib/core.so")).unwrap();
    for i in (0..400).step_by(2) {
        let name = format!("pkg/m{i:03}.py");
        let got = std::fs::read(m.dir.join(&name)).unwrap();
        assert!(got == std::fs::read(src.join(&name)).unwrap(), "{name}");
    }
    assert_eq!(num(&m.stats(), "chunks_fetched"), 7 + 3);
}

#[test]
fn a_warm_mount_streams_from_the_disk_cache_what_the_last_start_on_this_host_read() {
    let w = World::new();
    let src = w.tree();
    let (r, _) = w.push(&src, "app:v1");
    let cache = w.path("cache");
    let mount = |name: &str, extra: &[&str]| {
        let mut args = vec!["--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Mount::new(&r, &w.path(name), &args)
    };

    // A first start, with no profile anywhere: nothing streams.
    let m = mount("first", &[]);
    assert_eq!(m.stats()["profile"], "none");
    run_start(&m.dir, &src);
    let digest = m.stats()["manifest"].as_str().unwrap().to_owned();
    drop(m); // detaching keeps what was read in the disk cache
    assert!(thaw_json(&["inspect", &r])["profile"].is_null());
    let kept = cache
        .join("v3/profiles")
        .join(digest.trim_start_matches("blake3:"));
    assert!(kept.is_file(), "no local profile at {}", kept.display());

    // The next start on this host loads those chunks from the disk cache
    // before anything reads them, and nothing comes from the network.
    let served = w.server.metric("thaw_chunks_served_total");
    let m = mount("second", &[]);
    let s = streamed(&m);
    assert_eq!(
        (&s["profile"], &s["profile_source"]),
        (&"done".into(), &"local".into()),
        "{s}"
    );
    assert_eq!(num(&s, "reads"), 0);
    let working_set = num(&s, "profile_chunks");
    // The library's seven chunks and the packs of the hundred modules.
    assert!((8..=12).contains(&working_set), "{s}");
    assert_eq!(num(&s, "profile_chunks_loaded"), working_set, "{s}");
    run_start(&m.dir, &src);
    let s = m.stats();
    assert_eq!(num(&s, "chunks_fetched"), 0, "{s}");
    assert_eq!(
        num(&s, "disk_hits"),
        working_set,
        "only the stream loads: {s}"
    );
    assert_eq!(w.server.metric("thaw_chunks_served_total"), served);
    drop(m);

    // `--profile server` and `--profile off` leave it alone.
    for (name, which) in [("server", "server"), ("off", "off")] {
        let m = mount(name, &["--profile", which]);
        std::thread::sleep(Duration::from_millis(200));
        let s = m.stats();
        assert_eq!(num(&s, "profile_chunks_loaded"), 0, "{which}: {s}");
        assert_eq!(s["profile_source"], "", "{which}: {s}");
    }

    // A local profile is a hint for the disk only: with the chunks gone from
    // the disk cache, its stream loads nothing and fetches nothing.
    std::fs::remove_dir_all(cache.join("v3/chunks")).unwrap();
    let m = mount("emptied", &[]);
    let s = streamed(&m);
    assert_eq!(s["profile_source"], "local", "{s}");
    assert_eq!(num(&s, "profile_chunks_loaded"), 0, "{s}");
    assert_eq!(num(&s, "chunks_fetched"), 0, "{s}");
    run_start(&m.dir, &src);
    drop(m);

    // A damaged local profile is removed, and the mount works without it.
    std::fs::write(&kept, b"THAWPRF\0 not a profile").unwrap();
    let m = mount("damaged", &[]);
    let s = m.stats();
    let state = s["profile"].as_str().unwrap();
    assert!(state.starts_with("refused (local): "), "{s}");
    assert!(!kept.exists(), "the damaged profile is still there");
    run_start(&m.dir, &src);
}
