//! The demo: the whole path on an embedded default, with no setup.
//!
//! Starts a server on a temporary local store, generates an image (a Python
//! environment's worth of small files and a weights-like file), pushes it,
//! mounts it in this process, reads what a starting program would (one
//! package's modules and a few tensors), and reports how much was fetched
//! against the image size and how long each step took. Everything lives in a
//! temporary directory and is removed at the end.

use crate::thaw::{self, EmbeddedServer, InProcessMount};
use anyhow::{Context, Result};
use indicatif::HumanBytes;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;
use thaw_testkit::data::{noise, Python};

/// What the demo generates.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Size of the weights file.
    pub weights: u64,
    /// Number of small files in the environment.
    pub files: usize,
}

/// What the demo did and measured. `--json` prints the serialized fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    pub image_bytes: u64,
    pub files: u64,
    pub chunks: u64,
    pub push_seconds: f64,
    pub mount_ms: f64,
    pub first_byte_ms: f64,
    pub read_bytes: u64,
    pub read_ms: f64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub stored_bytes: u64,
    #[serde(skip)]
    pub narration: Narration,
}

/// What only the text report tells.
#[derive(Debug, Clone, Default)]
pub struct Narration {
    pub generated_files: usize,
    pub weights: u64,
    pub generate_seconds: f64,
    pub server: String,
    pub mountpoint: String,
}

/// Runs the demo in a temporary directory, removed at the end.
pub fn run(cfg: &DemoConfig) -> Result<DemoReport> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (src, mnt) = (tmp.path().join("src"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;

    let t = Instant::now();
    generate(&src, cfg.files, cfg.weights)?;
    let mut narration = Narration {
        generated_files: cfg.files,
        weights: cfg.weights,
        generate_seconds: t.elapsed().as_secs_f64(),
        mountpoint: mnt.display().to_string(),
        ..Default::default()
    };
    let server = EmbeddedServer::start(&rt, &tmp.path().join("store"))?;
    narration.server = server.addr.to_string();
    let reference = server.reference("demo:latest");
    let t = Instant::now();
    let pushed = thaw::push(&rt, &src, &reference)?;
    let push_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mount = InProcessMount::new(&rt, &reference, &mnt, &tmp.path().join("cache"))?;
    let mount_ms = t.elapsed().as_secs_f64() * 1000.0;
    let reads = startup_reads(&mnt, cfg.weights)?;
    let fetched = mount.stats();
    drop(mount);
    server.stop(&rt)?;
    Ok(DemoReport {
        image_bytes: pushed.bytes,
        files: pushed.files,
        chunks: pushed.chunks,
        push_seconds,
        mount_ms,
        first_byte_ms: reads.first_byte_ms,
        read_bytes: reads.bytes,
        read_ms: reads.ms,
        chunks_fetched: fetched.chunks_fetched,
        bytes_fetched: fetched.bytes_fetched,
        stored_bytes: pushed.bytes_uploaded,
        narration,
    })
}

/// `files` modules in forty packages, and a weights file of noise.
fn generate(dir: &Path, files: usize, weights: u64) -> Result<()> {
    let mut py = Python::new(0xDE30);
    for i in 0..files {
        let pkg = dir.join(format!("site-packages/pkg{:02}", i % 40));
        std::fs::create_dir_all(&pkg)?;
        let len = 512 + (i * 7919) % 16384;
        std::fs::write(pkg.join(format!("module{i}.py")), py.source(len))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors"))?);
    let mut written = 0u64;
    while written < weights {
        let n = (weights - written).min(8 << 20);
        f.write_all(&noise(written, n as usize))?;
        written += n;
    }
    f.flush()?;
    Ok(())
}

struct Reads {
    first_byte_ms: f64,
    bytes: u64,
    ms: f64,
}

/// What a starting program reads: the first byte of the weights, one
/// package's modules, and three 4 MiB tensors.
fn startup_reads(mnt: &Path, weights: u64) -> Result<Reads> {
    let t = Instant::now();
    let model = std::fs::File::open(mnt.join("model.safetensors"))?;
    model.read_exact_at(&mut [0u8; 1], 0)?;
    let first_byte_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut bytes = 0u64;
    for e in std::fs::read_dir(mnt.join("site-packages/pkg07"))? {
        bytes += std::fs::read(e?.path())?.len() as u64;
    }
    let mut buf = vec![0u8; 4 << 20];
    for k in [1u64, 5, 9] {
        let off = (weights / 10 * k).min(weights.saturating_sub(buf.len() as u64));
        model.read_exact_at(&mut buf, off)?;
        bytes += buf.len() as u64;
    }
    Ok(Reads {
        first_byte_ms,
        bytes,
        ms: t.elapsed().as_secs_f64() * 1000.0,
    })
}

/// The demo's story, step by step.
impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = &self.narration;
        writeln!(
            f,
            "generated {} small files and a {} weights file in {:.2}s",
            n.generated_files,
            HumanBytes(n.weights),
            n.generate_seconds
        )?;
        writeln!(f, "server listening on {} with a local store", n.server)?;
        writeln!(
            f,
            "pushed {} files, {} in {} chunks ({} sent) in {:.2}s",
            self.files,
            HumanBytes(self.image_bytes),
            self.chunks,
            HumanBytes(self.stored_bytes),
            self.push_seconds
        )?;
        writeln!(
            f,
            "mounted at {} in {:.1} ms (manifest only)",
            n.mountpoint, self.mount_ms
        )?;
        writeln!(
            f,
            "first byte of the weights in {:.2} ms",
            self.first_byte_ms
        )?;
        let pct = self.bytes_fetched as f64 * 100.0 / self.stored_bytes.max(1) as f64;
        writeln!(
            f,
            "read {} in {:.1} ms: fetched {} chunks, {} of the {} image ({pct:.1}% of its stored bytes)",
            HumanBytes(self.read_bytes),
            self.read_ms,
            self.chunks_fetched,
            HumanBytes(self.bytes_fetched),
            HumanBytes(self.image_bytes)
        )?;
        writeln!(
            f,
            "unmounted, stopped the server, removed the temporary files"
        )
    }
}
