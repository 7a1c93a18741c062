//! The virtio-fs suite: what a guest sees through `thaw virtiofs`, beside
//! `virtiofsd` serving the same tree from local disk in the same run.
//!
//! Each run boots a real guest under QEMU (TCG) per mode and times, in the
//! guest, a sequential read of a large file and a cold start that reads many
//! small files (every `.py` of a Python environment, found by walking it):
//! thaw cold (an empty cache), thaw warm (its disk cache, a new backend
//! process) and virtiofsd. Between the phases the host reads the backend's
//! counters, so the bytes fetched for each phase are set against the bytes
//! the guest read in it. The guest times with busybox `time` (10 ms steps),
//! so the workloads are sized to take seconds.

use crate::sys::median;
use crate::thaw::{self, EmbeddedServer};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use thaw_testkit::data::{noise, PythonEnv};
use thaw_testkit::guest::{Guest, GuestConfig, GuestKit, Virtiofsd};

const TAG: &str = "bench";
const TIMEOUT: Duration = Duration::from_secs(600);

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct VirtiofsSuiteConfig {
    /// The `thaw` binary whose backend is measured.
    pub thaw_bin: PathBuf,
    /// 1.0: a 256 MiB file and a 48 MiB generated environment.
    pub scale: f64,
    /// A real environment (a `site-packages`) instead of the generated one.
    pub env_dir: Option<PathBuf>,
    pub runs: usize,
    pub work_dir: PathBuf,
}

/// One mode's medians.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    /// Sequential read of the large file, seconds in the guest.
    pub seq_s: f64,
    pub seq_mib_s: f64,
    /// Reading every `.py` of the environment, seconds in the guest.
    pub small_s: f64,
    /// Bytes the backend fetched during each phase (thaw only): frame
    /// bytes on the wire, and the chunks' own bytes.
    pub seq_fetched: Option<Fetched>,
    pub small_fetched: Option<Fetched>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fetched {
    pub wire: u64,
    pub chunks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VirtiofsReport {
    pub large_bytes: u64,
    pub small_files: usize,
    pub small_bytes: u64,
    pub env: String,
    pub runs: usize,
    pub modes: Vec<ModeResult>,
    /// thaw warm sequential throughput over virtiofsd's (aim: at least 0.8).
    pub warm_over_virtiofsd: f64,
    /// thaw cold: chunk bytes fetched over bytes read, sequential phase
    /// (aim: 1.1).
    pub cold_seq_fetch_ratio: f64,
    /// The same for the small-file phase, and wire bytes over bytes read.
    pub cold_small_fetch_ratio: f64,
    pub cold_small_wire_ratio: f64,
}

/// The guest's script: two timed phases, each followed by a pause in
/// which the host reads the backend's counters.
const SCRIPT: &str = r#"
time -f 'seq %e' cat /mnt/large.bin 2>&1 >/dev/null
echo 'phase seq'
read line
time -f 'small %e' sh -c 'find /mnt/env -type f -name "*.py" | xargs cat > /dev/null' 2>&1
echo 'phase small'
read line
"#;

/// A `thaw virtiofs` process; killed on drop.
struct Backend(Child);

impl Backend {
    fn start(thaw_bin: &Path, reference: &str, socket: &Path, cache: &Path) -> Result<Backend> {
        let mut child = Command::new(thaw_bin)
            .args(["virtiofs", reference, "--foreground", "--socket"])
            .arg(socket)
            .arg("--cache-dir")
            .arg(cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run thaw virtiofs")?;
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        while !line.contains("over virtio-fs") {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("thaw virtiofs ended before serving");
            }
        }
        std::thread::spawn(move || for _ in err.lines() {});
        Ok(Backend(child))
    }
}

impl Drop for Backend {
    /// The backend ends by itself once its VMM has gone, keeping what it
    /// read as the image's local profile (as a VM's backend does); it is
    /// killed if it has not within a few seconds.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the suite; progress goes to stderr.
pub fn run(cfg: &VirtiofsSuiteConfig) -> Result<VirtiofsReport> {
    let kit = GuestKit::find().map_err(|why| anyhow::anyhow!("cannot boot guests: {why}"))?;
    let work = cfg.work_dir.join("virtiofs");
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    let large = (256.0 * cfg.scale * (1 << 20) as f64) as usize;
    std::fs::write(src.join("large.bin"), noise(11, large))?;
    let env = match &cfg.env_dir {
        Some(dir) => {
            let ok = Command::new("cp")
                .arg("-a")
                .arg(dir)
                .arg(src.join("env"))
                .status()?
                .success();
            if !ok {
                bail!("cannot copy {}", dir.display());
            }
            dir.display().to_string()
        }
        None => {
            let budget = (48.0 * cfg.scale * (1 << 20) as f64) as usize;
            let mut used = 0;
            for f in PythonEnv::new(5) {
                if used >= budget {
                    break;
                }
                used += f.data.len();
                let path = src.join("env").join(&f.path);
                std::fs::create_dir_all(path.parent().expect("a parent"))?;
                std::fs::write(path, f.data)?;
            }
            "generated".into()
        }
    };
    let (small_files, small_bytes) = py_files(&src.join("env"))?;

    let rt = tokio::runtime::Runtime::new()?;
    let server = EmbeddedServer::start(&rt, &work.join("store"))?;
    let reference = server.reference("virtiofs-bench:v1");
    thaw::push(&rt, &src, &reference)?;
    let socket = work.join("fs.sock");
    let config = GuestConfig::new(SCRIPT)
        .memory_mib(1024)
        .virtio_fs(&socket, TAG);

    let mut samples: Vec<(&str, Vec<Sample>)> = vec![
        ("thaw cold", vec![]),
        ("thaw warm", vec![]),
        ("virtiofsd", vec![]),
    ];
    for run in 0..cfg.runs {
        let cache = work.join(format!("cache{run}"));
        for (mode, out) in samples.iter_mut() {
            eprintln!("run {}/{}: {mode}", run + 1, cfg.runs);
            let sample = if *mode == "virtiofsd" {
                let _daemon = Virtiofsd::spawn(&kit, &src, &socket)?;
                measure(&kit, &config, None)?
            } else {
                let backend = Backend::start(&cfg.thaw_bin, &reference, &socket, &cache)?;
                let sample = measure(&kit, &config, Some(&socket))?;
                drop(backend);
                sample
            };
            out.push(sample);
        }
    }
    server.stop(&rt)?;

    let modes: Vec<ModeResult> = samples
        .iter()
        .map(|(mode, s)| summarize(mode, s, large as u64))
        .collect();
    let by = |m: &str| modes.iter().find(|r| r.mode == m).expect("every mode ran");
    let ratio = |bytes: u64, read: u64| bytes as f64 / read.max(1) as f64;
    let cold = by("thaw cold");
    let (seq, small) = (
        cold.seq_fetched.expect("thaw counts"),
        cold.small_fetched.expect("thaw counts"),
    );
    Ok(VirtiofsReport {
        large_bytes: large as u64,
        small_files,
        small_bytes,
        env,
        runs: cfg.runs,
        warm_over_virtiofsd: by("thaw warm").seq_mib_s / by("virtiofsd").seq_mib_s,
        cold_seq_fetch_ratio: ratio(seq.chunks, large as u64),
        cold_small_fetch_ratio: ratio(small.chunks, small_bytes),
        cold_small_wire_ratio: ratio(small.wire, small_bytes),
        modes,
    })
}

/// One guest's figures.
struct Sample {
    seq_s: f64,
    small_s: f64,
    seq_fetched: Option<Fetched>,
    small_fetched: Option<Fetched>,
}

/// Boots a guest, runs both phases, reads the backend's counters between.
fn measure(kit: &GuestKit, config: &GuestConfig, thaw: Option<&Path>) -> Result<Sample> {
    let fetched = || -> Result<Option<Fetched>> {
        match thaw {
            Some(socket) => {
                let s = thaw::mount_stats(socket)?;
                Ok(Some(Fetched {
                    wire: s.bytes_fetched,
                    chunks: s.chunk_bytes_fetched,
                }))
            }
            None => Ok(None),
        }
    };
    let mut guest = Guest::boot(kit, config)?;
    guest.wait_for("phase seq", TIMEOUT)?;
    let after_seq = fetched()?;
    guest.write_line("go")?;
    guest.wait_for("phase small", TIMEOUT)?;
    let after_small = fetched()?;
    guest.write_line("go")?;
    let out = guest.wait_script(TIMEOUT)?;
    let time = |what: &str| -> Result<f64> {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
            .with_context(|| format!("the guest printed no {what}time:\n{}", out.stdout))
    };
    Ok(Sample {
        seq_s: time("seq ")?,
        small_s: time("small ")?,
        seq_fetched: after_seq,
        small_fetched: after_small.zip(after_seq).map(|(b, a)| Fetched {
            wire: b.wire - a.wire,
            chunks: b.chunks - a.chunks,
        }),
    })
}

fn summarize(mode: &str, s: &[Sample], large: u64) -> ModeResult {
    let mut seq: Vec<f64> = s.iter().map(|x| x.seq_s).collect();
    let mut small: Vec<f64> = s.iter().map(|x| x.small_s).collect();
    let med = |f: &dyn Fn(&Sample) -> Option<Fetched>| {
        let mut wire: Vec<f64> = s
            .iter()
            .filter_map(|x| f(x).map(|b| b.wire as f64))
            .collect();
        let mut chunks: Vec<f64> = s
            .iter()
            .filter_map(|x| f(x).map(|b| b.chunks as f64))
            .collect();
        (!wire.is_empty()).then(|| Fetched {
            wire: median(&mut wire) as u64,
            chunks: median(&mut chunks) as u64,
        })
    };
    let seq_s = median(&mut seq);
    ModeResult {
        mode: mode.to_string(),
        seq_s,
        seq_mib_s: large as f64 / (1 << 20) as f64 / seq_s.max(0.01),
        small_s: median(&mut small),
        seq_fetched: med(&|x| x.seq_fetched),
        small_fetched: med(&|x| x.small_fetched),
    }
}

/// The `.py` files under `dir`: how many, how many bytes.
fn py_files(dir: &Path) -> Result<(usize, u64)> {
    let (mut n, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && e.path().extension().is_some_and(|x| x == "py") {
                n += 1;
                bytes += e.metadata()?.len();
            }
        }
    }
    Ok((n, bytes))
}

impl fmt::Display for VirtiofsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "virtio-fs in a QEMU (TCG) guest, medians of {} runs; large file {} MiB; {} .py files, {:.1} MiB ({})",
            self.runs,
            self.large_bytes >> 20,
            self.small_files,
            self.small_bytes as f64 / (1 << 20) as f64,
            self.env
        )?;
        writeln!(
            f,
            "{:<11} {:>9} {:>10} {:>10} {:>14} {:>14}",
            "mode", "seq s", "seq MiB/s", "small s", "seq chunks", "small chunks"
        )?;
        let mib = |b: Option<Fetched>| {
            b.map_or("-".into(), |b| {
                format!("{:.1} MiB", b.chunks as f64 / (1 << 20) as f64)
            })
        };
        for m in &self.modes {
            writeln!(
                f,
                "{:<11} {:>9.2} {:>10.1} {:>10.2} {:>14} {:>14}",
                m.mode,
                m.seq_s,
                m.seq_mib_s,
                m.small_s,
                mib(m.seq_fetched),
                mib(m.small_fetched)
            )?;
        }
        writeln!(
            f,
            "thaw warm / virtiofsd sequential: {:.2} (aim >= 0.80)",
            self.warm_over_virtiofsd
        )?;
        writeln!(
            f,
            "thaw cold chunk bytes fetched / bytes read: sequential {:.2}, small files {:.2} (aim <= 1.10 plus one chunk of readahead per stream); small files on the wire (compressed) {:.2}",
            self.cold_seq_fetch_ratio, self.cold_small_fetch_ratio, self.cold_small_wire_ratio
        )
    }
}
