//! The startup suite's results: what `--json` prints and `startup.json`
//! holds, the table a reader sees, and the files written beside them.

use crate::ceilings::Ceilings;
use crate::link::{self, Link};
use crate::sys::{self, mbps};
use crate::thaw::InspectReport;
use anyhow::Result;
use indicatif::HumanBytes;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One measurement.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub bytes_fetched: u64,
}

impl Sample {
    /// A sample that started at `start` and ends now.
    pub fn new(start: Instant, bytes_fetched: u64) -> Sample {
        Sample {
            seconds: start.elapsed().as_secs_f64(),
            bytes_fetched,
        }
    }
}

/// A mode's runs and their medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResult {
    pub mode: String,
    /// Set when the mode could not run (a peer not installed).
    pub skipped: Option<String>,
    pub samples: Vec<Sample>,
    pub median_seconds: f64,
    pub median_bytes_fetched: u64,
    pub vs_full_pull: f64,
    pub vs_local: f64,
}

impl ModeResult {
    /// Medians of a mode's samples (ratios are filled in once every mode ran).
    pub fn from_samples(mode: &str, samples: Vec<Sample>) -> ModeResult {
        let mut secs: Vec<f64> = samples.iter().map(|s| s.seconds).collect();
        let mut bytes: Vec<f64> = samples.iter().map(|s| s.bytes_fetched as f64).collect();
        ModeResult {
            mode: mode.into(),
            skipped: None,
            median_seconds: sys::median(&mut secs),
            median_bytes_fetched: sys::median(&mut bytes) as u64,
            samples,
            vs_full_pull: 0.0,
            vs_local: 0.0,
        }
    }

    /// A mode that could not run, and why.
    pub fn skipped(mode: &str, why: &str) -> ModeResult {
        eprintln!("thaw bench: SKIPPED {mode}: {why}");
        ModeResult {
            skipped: Some(why.into()),
            ..ModeResult::from_samples(mode, Vec::new())
        }
    }
}

/// One workload's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadResult {
    pub workload: String,
    pub image_bytes: u64,
    pub image_files: u64,
    pub stored_bytes: u64,
    pub read_bytes: u64,
    pub share_read: f64,
    pub modes: Vec<ModeResult>,
}

impl WorkloadResult {
    /// A workload's figures before its modes ran.
    pub fn new(workload: String, image: &InspectReport, read_bytes: u64) -> WorkloadResult {
        let mut w = WorkloadResult {
            workload,
            image_bytes: image.bytes,
            image_files: image.files,
            stored_bytes: image.stored_bytes,
            read_bytes: 0,
            share_read: 0.0,
            modes: Vec::new(),
        };
        w.set_read_bytes(read_bytes);
        w
    }

    /// Sets the bytes the startup reads (known from a built-in workload's
    /// plan, or measured on a mount).
    pub fn set_read_bytes(&mut self, read_bytes: u64) {
        self.read_bytes = read_bytes;
        self.share_read = match self.image_bytes {
            0 => 0.0,
            b => read_bytes as f64 / b as f64,
        };
    }
}

/// The whole suite's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartupReport {
    pub suite: &'static str,
    /// The link's description, or "loopback".
    pub link: String,
    pub page_cache_dropped: bool,
    pub ceilings: Ceilings,
    pub workloads: Vec<WorkloadResult>,
}

impl StartupReport {
    pub fn new(
        link: Option<Link>,
        page_cache_dropped: bool,
        ceilings: Ceilings,
        workloads: Vec<WorkloadResult>,
    ) -> StartupReport {
        StartupReport {
            suite: "startup",
            link: link::describe(link),
            page_cache_dropped,
            ceilings,
            workloads,
        }
    }

    /// Writes `startup.json` and the chart `startup.svg` into `out`; returns their paths.
    pub fn write_files(&self, out: &Path) -> Result<[PathBuf; 2]> {
        std::fs::create_dir_all(out)?;
        let (json, svg) = (out.join("startup.json"), out.join("startup.svg"));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)?;
        std::fs::write(&svg, crate::chart::startup(self)?)?;
        Ok([json, svg])
    }
}

/// The table: ceilings, then per workload each mode's median and ratios.
impl fmt::Display for StartupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.ceilings;
        writeln!(f, "\nthaw bench: cold start, link {}, medians", self.link)?;
        let shaped = c
            .link_bytes_per_sec
            .map(|b| format!(", shaped link {}", mbps(b)));
        writeln!(
            f,
            "ceilings: loopback {}{}, LZ4 decompress {}, zstd-3 decompress {} (1 core each), BLAKE3 {} (1 core)",
            mbps(c.loopback_bytes_per_sec),
            shaped.unwrap_or_default(),
            mbps(c.lz4_decompress_bytes_per_sec),
            mbps(c.zstd_decompress_bytes_per_sec),
            mbps(c.blake3_bytes_per_sec)
        )?;
        self.workloads.iter().try_for_each(|w| write!(f, "{w}"))
    }
}

impl fmt::Display for WorkloadResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\n{}: {} files, {} ({} stored); startup reads {} ({:.1}% of the image)",
            self.workload,
            self.image_files,
            HumanBytes(self.image_bytes),
            HumanBytes(self.stored_bytes),
            HumanBytes(self.read_bytes),
            self.share_read * 100.0
        )?;
        writeln!(
            f,
            "  {:<13} {:>10} {:>12} {:>12} {:>10}",
            "mode", "ready (s)", "fetched", "vs full pull", "vs local"
        )?;
        for m in &self.modes {
            match &m.skipped {
                Some(why) => writeln!(f, "  {:<13} skipped: {why}", m.mode)?,
                None => writeln!(
                    f,
                    "  {:<13} {:>10.3} {:>12} {:>11.2}x {:>9.2}x",
                    m.mode,
                    m.median_seconds,
                    HumanBytes(m.median_bytes_fetched).to_string(),
                    m.vs_full_pull,
                    m.vs_local
                )?,
            }
        }
        Ok(())
    }
}
