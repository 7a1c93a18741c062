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
//! Run: `cargo bench -p thaw-benches --bench push`. Builds `thaw` in release
//! first (`cargo build --release -p thaw`) unless `THAW_BIN` names a binary.
//! `THAW_BENCH_SCALE` scales the data sets (1 = 1 GiB each; 0.1 for a quick
//! run). Data is generated from fixed seeds, so runs are comparable. The page
//! cache is left warm: push reads what was just written, as a build pipeline
//! would.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: usize = 1 << 20;

fn main() {
    let scale: f64 = std::env::var("THAW_BENCH_SCALE")
        .ok()
        .map(|s| s.parse().expect("THAW_BENCH_SCALE is a number"))
        .unwrap_or(1.0);
    assert!(scale > 0.0, "THAW_BENCH_SCALE must be positive");
    let target = (GIB * scale) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = thaw_format::Chunking::default().chunk_size() as usize;

    let thaw = thaw_binary();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut server = Server::start(&thaw, &tmp.path().join("store"));

    let mut results = Vec::new();
    {
        let root = tmp.path().join("python-env");
        eprintln!(
            "generating a Python-environment-like tree of {:.2} GiB ...",
            target as f64 / GIB
        );
        let (stream, files) = python_tree(&root, target);
        results.push(measure(
            "python-like tree",
            &thaw,
            &server,
            &root,
            "tree",
            stream,
            files,
            chunk,
            cores,
        ));
    }
    {
        let root = tmp.path().join("random");
        eprintln!(
            "generating an incompressible file of {:.2} GiB ...",
            target as f64 / GIB
        );
        let data = incompressible(7, target);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("random.bin"), &data).unwrap();
        results.push(measure(
            "incompressible file",
            &thaw,
            &server,
            &root,
            "random",
            data,
            1,
            chunk,
            cores,
        ));
    }
    server.stop();

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
// The binary and the server

/// The release `thaw` binary: `THAW_BIN`, or built here with cargo.
fn thaw_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("THAW_BIN") {
        return PathBuf::from(bin);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the release thaw binary (cargo build --release -p thaw) ...");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "thaw", "--bin", "thaw"])
        .current_dir(&root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build --release -p thaw failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/thaw");
    assert!(bin.exists(), "no binary at {}", bin.display());
    bin
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(thaw: &Path, store: &Path) -> Server {
        let mut child = Command::new(thaw)
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("file://{}", store.display()))
            .env("THAW_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start thaw serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from thaw serve: {line:?}"))
            .to_owned();
        Server { child, addr }
    }

    /// SIGKILL is enough: nothing is read from the store afterwards.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `thaw push DIR REF --json`; returns its report and wall-clock seconds.
fn push(thaw: &Path, server: &Server, dir: &Path, name_tag: &str) -> (Value, f64) {
    let started = Instant::now();
    let out = Command::new(thaw)
        .arg("push")
        .arg(dir)
        .arg(format!("{}/{name_tag}", server.addr))
        .arg("--json")
        .output()
        .expect("run thaw push");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "thaw push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).expect("push prints JSON"),
        seconds,
    )
}

// ---------------------------------------------------------------------------
// Measuring

#[allow(clippy::too_many_arguments)]
fn measure(
    label: &str,
    thaw: &Path,
    server: &Server,
    root: &Path,
    name: &str,
    stream: Vec<u8>,
    files: u64,
    chunk: usize,
    cores: usize,
) -> Value {
    // Written data should not be flushing to disk during the measurements.
    let _ = Command::new("sync").status();
    let bytes = stream.len() as f64;
    let chunks: Vec<&[u8]> = stream.chunks(chunk).collect();
    eprintln!("{label}: ceilings ...");
    let (z1, ratio) = zstd3(&chunks, 1);
    let (zn, _) = zstd3(&chunks, cores);
    let b1 = blake3_rate(&chunks, 1);
    let bn = blake3_rate(&chunks, cores);
    drop(chunks);
    drop(stream);

    eprintln!("{label}: first push ...");
    let (first, first_s) = push(thaw, server, root, &format!("{name}:first"));
    eprintln!("{label}: unchanged re-push ...");
    let (again, again_s) = push(thaw, server, root, &format!("{name}:again"));
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
        "files": files,
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

// ---------------------------------------------------------------------------
// Data

/// SplitMix64: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

const ROOTS: &[&str] = &[
    "get", "set", "data", "frame", "array", "index", "value", "node", "tree", "parse", "load",
    "config", "cache", "buffer", "stream", "token", "model", "layer", "weight", "shape", "dtype",
    "axis", "item", "key", "path", "file", "name", "type", "size", "count", "error", "result",
    "client", "server", "request", "response", "handler", "manager", "factory", "util", "core",
    "base", "test", "init", "update", "apply", "reduce", "map", "filter", "tensor", "grad",
    "device", "module", "param", "state", "dict", "list", "call", "hook", "spec", "schema",
    "field", "column", "series", "block", "chunk", "codec", "format", "writer", "reader",
];

/// Identifiers (snake_case) and class names (CamelCase) shared by all files.
struct Vocab {
    names: Vec<String>,
    classes: Vec<String>,
    modules: Vec<String>,
}

impl Vocab {
    fn new(rng: &mut Rng) -> Vocab {
        let word = |rng: &mut Rng, camel: bool| {
            let parts = 1 + rng.below(3);
            let mut s = String::new();
            for i in 0..parts {
                let root = *rng.pick(ROOTS);
                if camel {
                    s.push_str(&root[..1].to_uppercase());
                    s.push_str(&root[1..]);
                } else {
                    if i > 0 {
                        s.push('_');
                    }
                    s.push_str(root);
                }
            }
            if rng.chance(15) {
                s.push_str(&rng.below(100).to_string());
            }
            s
        };
        Vocab {
            names: (0..4000).map(|_| word(rng, false)).collect(),
            classes: (0..1500).map(|_| word(rng, true)).collect(),
            modules: (0..600).map(|_| word(rng, false)).collect(),
        }
    }

    fn sentence(&self, rng: &mut Rng) -> String {
        let n = 4 + rng.below(10);
        (0..n)
            .map(|_| rng.pick(&self.names).replace('_', " "))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Source-like text: imports, classes, methods, comments, literals.
fn python_source(rng: &mut Rng, v: &Vocab, len: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut s = String::with_capacity(len + 256);
    let _ = writeln!(
        s,
        "# {}\n\"\"\"{}.\"\"\"\n",
        v.sentence(rng),
        v.sentence(rng)
    );
    for _ in 0..1 + rng.below(6) {
        let _ = writeln!(
            s,
            "from {}.{} import {}, {}",
            rng.pick(&v.modules),
            rng.pick(&v.modules),
            rng.pick(&v.classes),
            rng.pick(&v.names)
        );
    }
    while s.len() < len {
        let class = rng.pick(&v.classes);
        let _ = writeln!(
            s,
            "\nclass {class}({}):\n    \"\"\"{}.\"\"\"\n",
            rng.pick(&v.classes),
            v.sentence(rng)
        );
        for _ in 0..1 + rng.below(8) {
            let (a, b) = (rng.pick(&v.names), rng.pick(&v.names));
            let _ = writeln!(
                s,
                "    def {}(self, {a}, {b}={}):",
                rng.pick(&v.names),
                rng.below(1000)
            );
            for _ in 0..1 + rng.below(8) {
                match rng.below(7) {
                    0 => {
                        let _ = writeln!(s, "        # {}", v.sentence(rng));
                    }
                    1 => {
                        let _ = writeln!(
                            s,
                            "        if {a} is None:\n            raise {}Error(\"{}\")",
                            rng.pick(&v.classes),
                            v.sentence(rng)
                        );
                    }
                    2 => {
                        let _ = writeln!(
                            s,
                            "        for {} in range({}):",
                            rng.pick(&v.names),
                            rng.below(4096)
                        );
                    }
                    3 => {
                        let _ = writeln!(
                            s,
                            "        {} = 0x{:08x}",
                            rng.pick(&v.names),
                            rng.next() as u32
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            "        {} = self.{}.{}({a}, {b}, {})",
                            rng.pick(&v.names),
                            rng.pick(&v.names),
                            rng.pick(&v.names),
                            rng.below(100)
                        );
                    }
                }
            }
            let _ = writeln!(s, "        return {}\n", rng.pick(&v.names));
        }
    }
    let mut out = s.into_bytes();
    out.truncate(len);
    out
}

/// Machine-code-like bytes: "instructions" drawn from a fixed set of byte
/// patterns (a few of them far more common than the rest), some followed by
/// a random 32-bit operand.
struct Code {
    patterns: Vec<Vec<u8>>,
    /// Basic blocks that recur across libraries, as compiled code does.
    blocks: Vec<Vec<u8>>,
}

impl Code {
    fn new(rng: &mut Rng) -> Code {
        let patterns = (0..400)
            .map(|_| (0..2 + rng.below(6)).map(|_| rng.next() as u8).collect())
            .collect();
        let mut code = Code {
            patterns,
            blocks: Vec::new(),
        };
        code.blocks = (0..3000).map(|_| code.block(rng)).collect();
        code
    }

    fn block(&self, rng: &mut Rng) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..4 + rng.below(12) {
            let skewed = rng.below(self.patterns.len()) + 1;
            b.extend_from_slice(&self.patterns[rng.below(skewed)]);
            if rng.chance(30) {
                b.extend_from_slice(&(rng.next() as u32).to_le_bytes());
            }
        }
        b
    }
}

/// Shared-library-like bytes: code (recurring basic blocks, fresh ones, call
/// targets), string tables, symbol tables, page padding.
fn shared_library(rng: &mut Rng, v: &Vocab, code: &Code, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 4096);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    out.resize(64, 0);
    while out.len() < len {
        // .text
        let text_end = out.len() + (64 << 10) + rng.below(512 << 10);
        while out.len() < text_end {
            if rng.chance(20) {
                out.extend_from_slice(&code.block(rng));
            } else {
                let block: &Vec<u8> = rng.pick(&code.blocks);
                out.extend_from_slice(block);
            }
            out.extend_from_slice(&(rng.next() as u32).to_le_bytes());
        }
        // .rodata
        let rodata_end = out.len() + (8 << 10) + rng.below(64 << 10);
        while out.len() < rodata_end {
            out.extend_from_slice(v.sentence(rng).as_bytes());
            out.push(0);
        }
        // .dynsym
        let mut address = rng.next() & 0xffff_f000;
        let mut name = 0u32;
        for _ in 0..rng.below(2000) {
            address += rng.below(4096) as u64;
            name += 4 + rng.below(40) as u32;
            out.extend_from_slice(&name.to_le_bytes());
            out.extend_from_slice(&[0x12, 0, rng.below(30) as u8, 0]);
            out.extend_from_slice(&address.to_le_bytes());
            out.extend_from_slice(&(rng.below(2048) as u64).to_le_bytes());
        }
        // padding to a page
        out.resize(out.len().next_multiple_of(4096), 0);
    }
    out.truncate(len);
    out
}

/// Writes a Python-environment-like tree of about `target` bytes under
/// `root`: about 60% of the bytes in source-like files (most of them small),
/// 40% in shared libraries of 1-24 MiB. Returns every file's bytes, in the
/// order written, and the number of files.
fn python_tree(root: &Path, target: usize) -> (Vec<u8>, u64) {
    let mut rng = Rng(0x7468_6177);
    let vocab = Vocab::new(&mut rng);
    let code = Code::new(&mut rng);
    let site = root.join("lib/python3.12/site-packages");
    let mut stream = Vec::with_capacity(target + (32 << 20));
    let (mut files, mut lib_bytes) = (0u64, 0usize);
    let mut write = |path: PathBuf, data: Vec<u8>, stream: &mut Vec<u8>| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        stream.extend_from_slice(&data);
        files += 1;
    };
    let mut package = 0;
    while stream.len() < target {
        let pkg = site.join(format!("{}{package}", rng.pick(&vocab.modules)));
        package += 1;
        for m in 0..5 + rng.below(150) {
            let size = match rng.below(100) {
                0..=69 => 200 + rng.below(8 << 10),
                70..=94 => (8 << 10) + rng.below(56 << 10),
                _ => (64 << 10) + rng.below(448 << 10),
            };
            let sub = if rng.chance(40) {
                format!("{}/", rng.pick(&vocab.modules))
            } else {
                String::new()
            };
            let path = pkg.join(format!("{sub}{}_{m}.py", rng.pick(&vocab.names)));
            write(path, python_source(&mut rng, &vocab, size), &mut stream);
        }
        let record: String = (0..20)
            .map(|i| {
                format!(
                    "{}/{i}.py,sha256={:016x}{:016x},{}\n",
                    rng.pick(&vocab.modules),
                    rng.next(),
                    rng.next(),
                    rng.below(100_000)
                )
            })
            .collect();
        write(pkg.join("RECORD"), record.into_bytes(), &mut stream);
        if lib_bytes * 10 < stream.len() * 4 {
            let size = MIB + rng.below(23 * MIB);
            lib_bytes += size;
            let data = shared_library(&mut rng, &vocab, &code, size);
            write(
                pkg.join(format!("_core{package}.cpython-312-x86_64-linux-gnu.so")),
                data,
                &mut stream,
            );
        }
    }
    (stream, files)
}
