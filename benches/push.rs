//! Push throughput beside the ceilings that bound it, measured in one run.
//!
//! Two data sets: a tree shaped like a Python environment (many small
//! source-like files and some large shared-library-like files, about 3-4x
//! compressible under zstd level 3) and one incompressible file. Each is
//! pushed twice with the release `thaw` binary to a `thaw serve` child over a
//! temporary `file://` store: a first push (hash, compress, upload) and an
//! unchanged re-push (hash only, nothing uploaded). In the same run, over the
//! same bytes cut into the same chunks: zstd level 3 on one core and on all
//! cores, and BLAKE3 on one core and on all cores. The figures that matter
//! are ratios: first push / all-core zstd-3, and re-push in GB/s.
//!
//! Run: `cargo bench -p thaw-bench --bench push`. Builds `thaw` in release
//! first (`cargo build --release -p thaw`) unless `THAW_BIN` names a binary.
//! `THAW_BENCH_SCALE` scales the data sets (1 = 1 GiB each; 0.1 for a quick
//! run). Data is generated from fixed seeds, so runs are comparable. The page
//! cache is left warm: push reads what was just written, as a build pipeline
//! would.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use thaw_testkit::{noise, thaw_bin, thaw_json, PythonEnv, Server};

const GIB: f64 = (1u64 << 30) as f64;

fn main() {
    let scale: f64 = std::env::var("THAW_BENCH_SCALE")
        .ok()
        .map(|s| s.parse().expect("THAW_BENCH_SCALE is a number"))
        .unwrap_or(1.0);
    assert!(scale > 0.0, "THAW_BENCH_SCALE must be positive");
    let target = (GIB * scale) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = thaw_format::Chunking::default().chunk_size() as usize;

    ensure_release_binary();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut server = Server::start(&tmp.path().join("store"));
    let sizes = format!("{:.2} GiB", target as f64 / GIB);
    eprintln!("generating a Python-environment-like tree of {sizes} ...");
    let tree = python_tree(&tmp.path().join("python-env"), target);
    let tree = measure(tree, &server, chunk, cores);
    eprintln!("generating an incompressible file of {sizes} ...");
    let random = incompressible_file(&tmp.path().join("random"), target);
    let random = measure(random, &server, chunk, cores);
    server.kill();

    let results = [tree, random];
    print_table(scale, cores, chunk, &results);
    let report = json!({
        "bench": "push",
        "scale": scale,
        "cores": cores,
        "chunk_size": chunk,
        "unit": "GB/s (1e9 bytes per second) of logical bytes",
        "datasets": results,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

// ---------------------------------------------------------------------------
// The binary, the data sets and pushing

/// Builds the release `thaw` binary with cargo, unless `THAW_BIN` names one.
fn ensure_release_binary() {
    if std::env::var_os("THAW_BIN").is_none() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("building the release thaw binary (cargo build --release -p thaw) ...");
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "thaw", "--bin", "thaw"])
            .current_dir(root)
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --release -p thaw failed");
    }
    let bin = thaw_bin();
    assert!(bin.exists(), "no binary at {}", bin.display());
}

/// A tree to push, and every file's bytes in the order written (what the
/// ceilings are measured over).
struct DataSet {
    label: &'static str,
    /// The image's name on the server.
    name: &'static str,
    root: PathBuf,
    stream: Vec<u8>,
    files: u64,
}

/// A Python-environment-like tree of about `target` bytes under `root`.
fn python_tree(root: &Path, target: usize) -> DataSet {
    let mut stream = Vec::with_capacity(target + (32 << 20));
    let mut files = 0;
    for f in PythonEnv::new(0x7468_6177) {
        if stream.len() >= target {
            break;
        }
        thaw_testkit::tree::write(&root.join(&f.path), &f.data);
        stream.extend_from_slice(&f.data);
        files += 1;
    }
    DataSet {
        label: "python-like tree",
        name: "tree",
        root: root.to_path_buf(),
        stream,
        files,
    }
}

fn incompressible_file(root: &Path, len: usize) -> DataSet {
    let stream = noise(7, len);
    thaw_testkit::tree::write(&root.join("random.bin"), &stream);
    DataSet {
        label: "incompressible file",
        name: "random",
        root: root.to_path_buf(),
        stream,
        files: 1,
    }
}

/// Runs `thaw push DIR REF --json`; returns its report and wall-clock seconds.
fn push(server: &Server, dir: &Path, name_tag: &str) -> (Value, f64) {
    let started = Instant::now();
    let dir = dir.to_str().expect("a UTF-8 temporary path");
    let report = thaw_json(&["push", dir, &server.reference(name_tag)]);
    (report, started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Measuring

fn measure(data: DataSet, server: &Server, chunk: usize, cores: usize) -> Value {
    let label = data.label;
    // Written data should not be flushing to disk during the measurements.
    let _ = Command::new("sync").status();
    let bytes = data.stream.len() as f64;
    let chunks: Vec<&[u8]> = data.stream.chunks(chunk).collect();
    eprintln!("{label}: ceilings ...");
    let (z1, ratio) = zstd3(&chunks, 1);
    let (zn, _) = zstd3(&chunks, cores);
    let b1 = blake3_rate(&chunks, 1);
    let bn = blake3_rate(&chunks, cores);
    drop(chunks);
    drop(data.stream); // the pushes read the files, not this copy

    eprintln!("{label}: first push ...");
    let (first, first_s) = push(server, &data.root, &format!("{}:first", data.name));
    eprintln!("{label}: unchanged re-push ...");
    let (again, again_s) = push(server, &data.root, &format!("{}:again", data.name));
    assert_eq!(
        again["chunks_uploaded"], 0,
        "re-push uploaded chunks: {again}"
    );
    assert_eq!(first["manifest"], again["manifest"]);
    let logical = first["bytes"].as_f64().unwrap();
    let gbps = |seconds: f64| logical / seconds / 1e9;
    let (push_first, push_again) = (gbps(first_s), gbps(again_s));
    json!({
        "name": label,
        "bytes": logical,
        "generated_bytes": bytes,
        "files": data.files,
        "zstd3_ratio": ratio,
        "push_first_gbps": push_first,
        "push_first_seconds": first_s,
        "push_first_hash_seconds": first["hash_seconds"],
        "push_first_upload_seconds": first["upload_seconds"],
        "push_first_chunks": first["chunks"],
        "push_first_bytes_uploaded": first["bytes_uploaded"],
        "repush_gbps": push_again,
        "repush_seconds": again_s,
        "repush_chunks_uploaded": again["chunks_uploaded"],
        "zstd3_1core_gbps": z1,
        "zstd3_allcores_gbps": zn,
        "blake3_1core_gbps": b1,
        "blake3_allcores_gbps": bn,
        "first_push_over_zstd3_allcores": push_first / zn,
        "repush_over_blake3_allcores": push_again / bn,
    })
}

/// Splits `chunks` over `threads` threads running `work` on each chunk;
/// returns the seconds taken and the sum of what `work` returned. Each thread
/// first warms up (contexts, tables) on one chunk, untimed; the clock runs
/// from when all threads start together until the last one ends.
fn parallel(
    chunks: &[&[u8]],
    threads: usize,
    work: impl Fn(&[u8]) -> usize + Sync,
) -> (f64, usize) {
    let barrier = std::sync::Barrier::new(threads);
    let results: Vec<(Instant, Instant, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (work, barrier) = (&work, &barrier);
                s.spawn(move || {
                    let mine = || chunks.iter().skip(t).step_by(threads);
                    if let Some(c) = mine().next() {
                        work(c);
                    }
                    barrier.wait();
                    let started = Instant::now();
                    let sum = mine().map(|c| work(c)).sum::<usize>();
                    (started, Instant::now(), sum)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = results.iter().map(|r| r.0).min().unwrap();
    let end = results.iter().map(|r| r.1).max().unwrap();
    let total = results.iter().map(|r| r.2).sum();
    ((end - start).as_secs_f64(), total)
}

/// zstd level 3 over every chunk on `threads` threads (one reused context
/// each): throughput in GB/s of input, and the compression ratio.
fn zstd3(chunks: &[&[u8]], threads: usize) -> (f64, f64) {
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    let (seconds, compressed) = parallel(chunks, threads, |c| {
        thread_local! {
            static CTX: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
                std::cell::RefCell::new(zstd::bulk::Compressor::new(3).unwrap());
        }
        CTX.with(|ctx| ctx.borrow_mut().compress(c).unwrap().len())
    });
    (
        bytes as f64 / seconds / 1e9,
        bytes as f64 / compressed as f64,
    )
}

/// BLAKE3 over every chunk on `threads` threads, in GB/s.
fn blake3_rate(chunks: &[&[u8]], threads: usize) -> f64 {
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    let (seconds, _) = parallel(chunks, threads, |c| blake3::hash(c).as_bytes()[0] as usize);
    bytes as f64 / seconds / 1e9
}

fn print_table(scale: f64, cores: usize, chunk: usize, results: &[Value]) {
    println!();
    println!(
        "thaw push: scale {scale}, {cores} cores, {} KiB chunks; throughput in GB/s (1e9 B/s) of logical bytes",
        chunk >> 10
    );
    println!(
        "{:<20} {:>9} {:>7} {:>6} | {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} | {:>11} {:>11}",
        "data set",
        "GiB",
        "files",
        "ratio",
        "push 1st",
        "re-push",
        "zstd 1c",
        "zstd Nc",
        "b3 1c",
        "b3 Nc",
        "1st/zstd Nc",
        "re/b3 Nc"
    );
    for r in results {
        let f = |k: &str| r[k].as_f64().unwrap();
        println!(
            "{:<20} {:>9.3} {:>7} {:>6.2} | {:>8.3} {:>7.3} | {:>7.3} {:>7.3} {:>7.3} {:>7.3} | {:>11.2} {:>11.2}",
            r["name"].as_str().unwrap(),
            f("bytes") / GIB,
            r["files"].as_u64().unwrap(),
            f("zstd3_ratio"),
            f("push_first_gbps"),
            f("repush_gbps"),
            f("zstd3_1core_gbps"),
            f("zstd3_allcores_gbps"),
            f("blake3_1core_gbps"),
            f("blake3_allcores_gbps"),
            f("first_push_over_zstd3_allcores"),
            f("repush_over_blake3_allcores"),
        );
    }
    println!("(zstd = level 3, b3 = BLAKE3; 1c = one core, Nc = {cores} cores; aims: 1st/zstd Nc >= 0.70, re-push >= 1.5 GB/s)");
    println!();
}
