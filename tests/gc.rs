//! `thaw gc` on a store a real `thaw serve` serves: old versions go, and
//! while pushes retag images and collections run in a loop, every tag stays
//! whole (its export matches what was pushed) and every push succeeds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thaw_testkit::tree::write;
use thaw_testkit::{assert_same_tree, noise, s, thaw_json, thaw_ok, Server};

/// A small tree: a file of its own, a larger one that comes back every
/// fifth version (so a push reuses chunks that an earlier version had and
/// a collection may be removing), and one the same in every version.
fn version(dir: &Path, seed: u64) -> PathBuf {
    let src = dir.join(format!("v{seed}"));
    write(&src.join("own.txt"), format!("version {seed}").as_bytes());
    write(&src.join("data.bin"), &noise(seed % 5, 300 << 10));
    write(&src.join("base.bin"), &noise(99, 200 << 10));
    src
}

fn gc(store: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["gc", "--store", s(store)];
    args.extend_from_slice(extra);
    thaw_json(&args)
}

#[test]
fn old_versions_go_and_the_tagged_ones_stay_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start(&store);
    let r = server.reference("app:latest");
    let (v1, v2) = (version(tmp.path(), 1), version(tmp.path(), 2));
    thaw_ok(&["push", s(&v1), &r]);
    thaw_ok(&["push", s(&v2), &r]);

    let dry = gc(&store, &["--grace", "0", "--dry-run"]);
    assert_eq!(dry["manifests_removed"], 1, "{dry}");
    let kept = gc(&store, &["--grace", "0", "--keep", "2"]);
    assert_eq!(kept["manifests_removed"], 0, "{kept}");
    let report = gc(&store, &["--grace", "0"]);
    assert_eq!(report["manifests_removed"], 1, "{report}");
    assert!(report["chunks_removed"].as_u64().unwrap() >= 1, "{report}");

    let out = tmp.path().join("out");
    thaw_ok(&["export", &r, s(&out)]);
    assert_same_tree(&v2, &out);
}

#[test]
fn tags_stay_whole_while_pushes_and_collections_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let server = Server::start(&store);
    let tags = ["a", "b", "c"];
    let stop = Arc::new(AtomicBool::new(false));
    // Collections with a short grace period, one after another.
    let collector = {
        let (stop, store) = (stop.clone(), store.clone());
        std::thread::spawn(move || {
            let (mut runs, mut removed) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let report = gc(&store, &["--grace", "2"]);
                removed += report["chunks_removed"].as_u64().unwrap();
                runs += 1;
            }
            (runs, removed)
        })
    };
    // Pushes that retag the same few tags with new versions.
    let mut last = std::collections::HashMap::new();
    let started = Instant::now();
    let mut seed = 0;
    // `THAW_GC_SOAK_SECONDS` runs it longer.
    let seconds = std::env::var("THAW_GC_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    while started.elapsed() < Duration::from_secs(seconds) {
        seed += 1;
        let tag = tags[seed as usize % tags.len()];
        let src = version(tmp.path(), seed);
        thaw_ok(&["push", s(&src), &server.reference(&format!("app:{tag}"))]);
        if let Some(old) = last.insert(tag, src) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, removed) = collector.join().unwrap();
    eprintln!("{seed} pushes, {runs} collections, {removed} chunks removed");
    assert!(removed > 0, "the collections removed nothing");
    // Once more with everything old enough, then every tag exports whole.
    std::thread::sleep(Duration::from_secs(2));
    gc(&store, &["--grace", "1"]);
    for (tag, src) in &last {
        let out = tmp.path().join(format!("out-{tag}"));
        thaw_ok(&["export", &server.reference(&format!("app:{tag}")), s(&out)]);
        assert_same_tree(src, &out);
    }
}
