//! The mount suite: the mount's own figures beside their ceilings.
//!
//! Cold and warm sequential throughput (compressible and incompressible data),
//! 4 KiB random read latency cold and warm, time to first byte, time to mount a
//! 10k-file image, and the mount process's peak memory, beside the same data
//! read through squashfuse from local disk and fetched and decompressed
//! without FUSE. Every mount is a real `thaw mount` process, as users run it.

mod report;

pub use report::{MountReport, RandomLatency, Sequential};

use crate::ceilings::Squash;
use crate::sys;
use crate::thaw::{self, EmbeddedServer, MountFlags, ThawBin};
use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thaw_testkit::data::{noise, PythonEnv, Rng};

/// How to run the mount suite.
#[derive(Debug, Clone)]
pub struct MountSuiteConfig {
    /// The `thaw` binary whose mounts are measured.
    pub thaw_bin: PathBuf,
    /// 1.0: two files of 512 MiB.
    pub scale: f64,
    /// Where generated data, the store and mounts live.
    pub work_dir: PathBuf,
    /// Kernel readahead of the sequential mounts and of squashfuse.
    pub kernel_readahead: u64,
}

/// The images the suite mounts, on an embedded server.
struct Images {
    thaw: ThawBin,
    /// Two large files: `compressible.bin` and `incompressible.bin`.
    files_ref: String,
    files_dir: PathBuf,
    /// Ten thousand tiny files.
    small_ref: String,
    size: usize,
    mp: PathBuf,
    work: PathBuf,
}

impl Images {
    fn mount(&self, reference: &str, cache: &Path, flags: MountFlags) -> Result<()> {
        self.thaw.mount(reference, &self.mp, cache, flags)
    }

    fn umount(&self) {
        self.thaw.umount(&self.mp)
    }
}

/// Runs the suite; progress goes to stderr.
pub fn run(cfg: &MountSuiteConfig) -> Result<MountReport> {
    sys::drop_caches_or_warn();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let work = cfg.work_dir.join("mount-suite");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let server = EmbeddedServer::start(&rt, &work.join("store"))?;
    let images = push_images(cfg, &rt, &server, work)?;
    let squash = Squash::mount(
        &images.files_dir,
        &images.work.join("files.sqfs"),
        &images.work.join("sqfs"),
        cfg.kernel_readahead,
    )?;
    let mut sequential = Vec::new();
    for file in ["compressible.bin", "incompressible.bin"] {
        eprintln!("thaw bench: sequential reads of {file}");
        sequential.push(sequential_reads(&images, &rt, file, squash.as_ref(), cfg)?);
    }
    drop(squash);
    let [compressible, incompressible] = <[Sequential; 2]>::try_from(sequential)
        .map_err(|_| anyhow::anyhow!("two files were measured"))?;
    eprintln!("thaw bench: random 4 KiB reads");
    let random_4k_ms = random_reads(&images)?;
    eprintln!("thaw bench: first byte and mount time");
    let (first_byte_ms, mount_10k_files_ms) = first_byte_and_mount(&images)?;
    Ok(MountReport {
        compressible,
        incompressible,
        random_4k_ms,
        first_byte_ms,
        mount_10k_files_ms,
        mem_cache_budget_bytes: 256 << 20,
    })
}

/// Generates (once) and pushes the two images.
fn push_images(
    cfg: &MountSuiteConfig,
    rt: &tokio::runtime::Runtime,
    server: &EmbeddedServer,
    work: PathBuf,
) -> Result<Images> {
    let data = cfg.work_dir.join("data/mount-suite");
    let size = ((512.0 * cfg.scale) as usize).max(16) << 20;
    let files_dir = data.join(format!("files-{size}"));
    std::fs::create_dir_all(&files_dir)?;
    let human = indicatif::HumanBytes(size as u64);
    eprintln!("thaw bench: generating {human} compressible + {human} incompressible");
    generate_file(&files_dir.join("compressible.bin"), size, |out| {
        python_stream(out, size)
    })?;
    generate_file(&files_dir.join("incompressible.bin"), size, |out| {
        (0..size.div_ceil(8 << 20)).try_for_each(|i| out.write_all(&noise(i as u64, 8 << 20)))
    })?;
    let small = data.join("10k-files");
    if !small.exists() {
        for i in 0..10_000 {
            let d = small.join(format!("d{:03}", i / 100));
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join(format!("f{i}.py")), format!("x = {i}\n"))?;
        }
    }
    eprintln!("thaw bench: pushing");
    let (files_ref, small_ref) = (
        server.reference("files:latest"),
        server.reference("small:latest"),
    );
    thaw::push(rt, &files_dir, &files_ref)?;
    thaw::push(rt, &small, &small_ref)?;
    Ok(Images {
        thaw: ThawBin(cfg.thaw_bin.clone()),
        files_ref,
        files_dir,
        small_ref,
        size,
        mp: work.join("mnt"),
        work,
    })
}

/// Writes `path` with `fill` unless an earlier run did, then cuts it to `len`.
fn generate_file(
    path: &Path,
    len: usize,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    fill(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.set_len(len as u64)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// A Python environment's files, one after another, `len` bytes or a little more.
fn python_stream(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    let mut written = 0;
    for f in PythonEnv::new(0x5EED_0003) {
        if written >= len {
            break;
        }
        out.write_all(&f.data)?;
        written += f.data.len();
    }
    Ok(())
}

fn read_seq(path: &Path) -> Result<f64> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

/// Cold and warm reads of `file` through thaw, beside squashfuse and
/// fetch+decompress.
fn sequential_reads(
    images: &Images,
    rt: &tokio::runtime::Runtime,
    file: &str,
    squash: Option<&Squash>,
    cfg: &MountSuiteConfig,
) -> Result<Sequential> {
    // The ceiling is the best of three reads: squashfuse is single-threaded and noisy.
    let squashfuse = match squash {
        Some(s) => {
            let mut best = 0.0f64;
            for _ in 0..3 {
                sys::drop_caches();
                best = best.max(read_seq(&s.mountpoint.join(file))?);
            }
            Some(best)
        }
        None => None,
    };
    let fetch_decompress = rt.block_on(thaw::fetch_decompress(&images.files_ref, file, 8))?;
    let cache = images.work.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let flags = MountFlags {
        kernel_readahead: Some(cfg.kernel_readahead),
        ..Default::default()
    };
    images.mount(&images.files_ref, &cache, flags.clone())?;
    sys::drop_caches();
    let cold = read_seq(&images.mp.join(file))?;
    let stats = thaw::mount_stats(&images.mp)?;
    images.umount();
    images.mount(&images.files_ref, &cache, flags)?;
    sys::drop_caches();
    let warm = read_seq(&images.mp.join(file))?;
    images.umount();
    Ok(Sequential::new(
        cold,
        warm,
        squashfuse,
        fetch_decompress,
        stats.peak_rss_bytes,
    ))
}

/// Median and 99th percentile of 4 KiB reads at `offsets`, in ms.
fn latencies(path: &Path, offsets: &[u64]) -> Result<(f64, f64)> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::new();
    for &o in offsets {
        let t = Instant::now();
        f.read_exact_at(&mut buf, o)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    Ok((p(0.5), p(0.99)))
}

/// 200 random 4 KiB reads of the incompressible file: cold (no readahead,
/// empty cache), then warm (the cache the sequential reads filled).
fn random_reads(images: &Images) -> Result<RandomLatency> {
    let mut rng = Rng::new(0x1234_5678);
    let span = images.size - 4096;
    let offsets: Vec<u64> = (0..200).map(|_| (rng.below(span) & !4095) as u64).collect();
    let file = images.mp.join("incompressible.bin");
    let no_readahead = MountFlags {
        readahead: Some(0),
        ..Default::default()
    };
    images.mount(
        &images.files_ref,
        &images.work.join("cache-random"),
        no_readahead,
    )?;
    sys::drop_caches();
    let (cold_p50, cold_p99) = latencies(&file, &offsets)?;
    images.umount();
    images.mount(
        &images.files_ref,
        &images.work.join("cache"),
        MountFlags::default(),
    )?;
    sys::drop_caches();
    let (warm_p50, warm_p99) = latencies(&file, &offsets)?;
    images.umount();
    Ok(RandomLatency {
        cold_p50,
        cold_p99,
        warm_p50,
        warm_p99,
    })
}

/// Medians of five: the first byte of a fresh mount, and a whole `thaw
/// mount` of the 10k-file image.
fn first_byte_and_mount(images: &Images) -> Result<(f64, f64)> {
    let (mut first, mut mount_ms) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let cache = images.work.join(format!("cache-first-{i}"));
        images.mount(&images.files_ref, &cache, MountFlags::default())?;
        sys::drop_caches();
        let t = Instant::now();
        let f = std::fs::File::open(images.mp.join("incompressible.bin"))?;
        f.read_exact_at(&mut [0u8; 1], 0)?;
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(f);
        images.umount();
        let t = Instant::now();
        images.mount(&images.small_ref, &cache, MountFlags::default())?;
        mount_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        images.umount();
    }
    Ok((sys::median(&mut first), sys::median(&mut mount_ms)))
}
