//! The mount suite's results: what `--json` prints and `mount.json` holds,
//! and the table a reader sees.

use crate::sys::mbps;
use anyhow::Result;
use indicatif::HumanBytes;
use std::fmt;
use std::path::{Path, PathBuf};

/// Sequential reads of one file, in bytes per second, beside their ceilings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sequential {
    pub cold_bytes_per_sec: f64,
    pub warm_bytes_per_sec: f64,
    /// `None` when squashfs-tools or squashfuse are not installed.
    pub squashfuse_bytes_per_sec: Option<f64>,
    pub fetch_decompress_bytes_per_sec: f64,
    pub cold_vs_squashfuse: Option<f64>,
    pub warm_vs_squashfuse: Option<f64>,
    pub cold_vs_fetch_decompress: f64,
    pub mount_peak_rss_bytes: u64,
}

impl Sequential {
    pub fn new(
        cold: f64,
        warm: f64,
        squashfuse: Option<f64>,
        fetch_decompress: f64,
        mount_peak_rss_bytes: u64,
    ) -> Sequential {
        Sequential {
            cold_bytes_per_sec: cold,
            warm_bytes_per_sec: warm,
            squashfuse_bytes_per_sec: squashfuse,
            fetch_decompress_bytes_per_sec: fetch_decompress,
            cold_vs_squashfuse: squashfuse.map(|s| cold / s),
            warm_vs_squashfuse: squashfuse.map(|s| warm / s),
            cold_vs_fetch_decompress: cold / fetch_decompress,
            mount_peak_rss_bytes,
        }
    }
}

/// 4 KiB random read latency percentiles, in ms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RandomLatency {
    pub cold_p50: f64,
    pub cold_p99: f64,
    pub warm_p50: f64,
    pub warm_p99: f64,
}

/// The whole suite's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MountReport {
    pub compressible: Sequential,
    pub incompressible: Sequential,
    pub random_4k_ms: RandomLatency,
    pub first_byte_ms: f64,
    /// A whole `thaw mount` command of a 10k-file image.
    pub mount_10k_files_ms: f64,
    /// The mounts' in-memory chunk cache budget (`thaw mount`'s default).
    pub mem_cache_budget_bytes: u64,
}

impl MountReport {
    /// Writes `mount.json` into `out`; returns its path.
    pub fn write_files(&self, out: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(out)?;
        let path = out.join("mount.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

fn or_na(v: Option<String>) -> String {
    v.unwrap_or_else(|| "n/a".into())
}

impl fmt::Display for MountReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = |r: Option<f64>| or_na(r.map(|r| format!("{:.0}%", r * 100.0)));
        writeln!(f, "\nthaw bench --suite mount (loopback)")?;
        writeln!(
            f,
            "{:<15} {:>11} {:>11} {:>12} {:>14} {:>9} {:>9} {:>10}",
            "data", "cold", "warm", "squashfuse", "fetch+decomp", "cold/sq", "warm/sq", "peak RSS"
        )?;
        for (name, s) in [
            ("compressible", &self.compressible),
            ("incompressible", &self.incompressible),
        ] {
            writeln!(
                f,
                "{:<15} {:>11} {:>11} {:>12} {:>14} {:>9} {:>9} {:>10}",
                name,
                mbps(s.cold_bytes_per_sec),
                mbps(s.warm_bytes_per_sec),
                or_na(s.squashfuse_bytes_per_sec.map(mbps)),
                mbps(s.fetch_decompress_bytes_per_sec),
                percent(s.cold_vs_squashfuse),
                percent(s.warm_vs_squashfuse),
                HumanBytes(s.mount_peak_rss_bytes).to_string(),
            )?;
        }
        let r = &self.random_4k_ms;
        writeln!(
            f,
            "random 4 KiB reads: cold p50 {:.2} ms, p99 {:.2} ms; warm p50 {:.3} ms, p99 {:.3} ms",
            r.cold_p50, r.cold_p99, r.warm_p50, r.warm_p99
        )?;
        writeln!(
            f,
            "first byte {:.2} ms; `thaw mount` of a 10k-file image {:.1} ms (whole command)",
            self.first_byte_ms, self.mount_10k_files_ms
        )
    }
}
