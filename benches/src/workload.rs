//! Built-in workloads: generated, reproducible images and the reads a
//! starting program makes from them.
//!
//! - **python-env**: site-packages with thousands of small modules (source,
//!   compressible) and some large shared libraries. Startup "imports" three
//!   packages: it lists their directories, stats and reads every module, and
//!   touches a third of each shared library's pages, as the dynamic loader's
//!   page faults would.
//! - **weights**: a safetensors-like file (8-byte header length, a JSON header
//!   of tensor offsets, then the tensors). Startup reads the header and touches
//!   one tensor in twenty, as a program that maps the file and uses part of the
//!   model would.
//! - **both**: one image holding both, the common case of a model server.
//!
//! Each workload records a [`Plan`] next to the image: the ranges startup
//! reads and the BLAKE3 of the bytes it must find there, so every run checks
//! that the data read matched. Generated data is kept and reused by later runs.

mod plan;

pub use plan::{Plan, PlannedRead};

use anyhow::Result;
use std::io::Write;
use std::path::{Path, PathBuf};
use thaw_testkit::data::{noise, Python, Rng};

/// A built-in workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    PythonEnv,
    Weights,
    Both,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::PythonEnv => "python-env",
            Workload::Weights => "weights",
            Workload::Both => "both",
        }
    }
}

/// Sizes of the built-in workloads at a scale (1.0: 400 MiB of Python
/// environment and 2 GiB of weights).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub env_bytes: u64,
    pub weight_bytes: u64,
}

impl Sizes {
    pub fn at_scale(scale: f64) -> Sizes {
        let mib = |m: f64| (m * scale * (1u64 << 20) as f64) as u64;
        Sizes {
            env_bytes: mib(400.0),
            weight_bytes: mib(2048.0),
        }
    }
}

/// A generated workload: its tree and its startup's plan.
pub struct Generated {
    pub dir: PathBuf,
    pub plan: Plan,
}

/// Generates workload `w` under `base`, or reuses what an earlier run generated.
pub fn generate(base: &Path, w: Workload, sizes: Sizes) -> Result<Generated> {
    let home = base.join(format!(
        "{}-{}-{}",
        w.name(),
        sizes.env_bytes,
        sizes.weight_bytes
    ));
    let dir = home.join("image");
    let plan_path = home.join("plan.json");
    if plan_path.exists() && dir.exists() {
        let plan = serde_json::from_slice(&std::fs::read(&plan_path)?)?;
        return Ok(Generated { dir, plan });
    }
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&dir)?;
    let mut plan = Plan::default();
    if w != Workload::Weights {
        python_env(&dir, sizes.env_bytes, &mut plan)?;
    }
    if w != Workload::PythonEnv {
        weights(&dir, sizes.weight_bytes, &mut plan)?;
    }
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
    Ok(Generated { dir, plan })
}

const SITE_PACKAGES: &str = "venv/lib/python3.11/site-packages";

/// A python-env-like tree of about `bytes` bytes under `root/venv`: sixty
/// packages, each about 40% modules (a third of them in `sub/`) and 60% in
/// one or two shared libraries.
pub fn python_env(root: &Path, bytes: u64, plan: &mut Plan) -> Result<()> {
    let mut py = Python::new(0x5EED_0001);
    let packages = 60usize;
    let per_pkg = (bytes / packages as u64).max(64 << 10);
    for p in 0..packages {
        let dir = root.join(format!("{SITE_PACKAGES}/pkg{p:02}"));
        std::fs::create_dir_all(dir.join("sub"))?;
        let (mut module_bytes, mut i) = (0u64, 0);
        while module_bytes < per_pkg * 2 / 5 {
            let len = 1024 + py.rng().below(24 << 10);
            let sub = if i % 3 == 0 { "sub/" } else { "" };
            std::fs::write(dir.join(format!("{sub}mod{i:03}.py")), py.source(len))?;
            module_bytes += len as u64;
            i += 1;
        }
        let libs = 1 + p % 2;
        for l in 0..libs {
            let len = (per_pkg * 3 / 5 / libs as u64) as usize;
            std::fs::write(dir.join(format!("_native{l}.so")), py.shared_library(len))?;
        }
    }
    for p in [3usize, 17, 42] {
        import(root, &format!("{SITE_PACKAGES}/pkg{p:02}"), py.rng(), plan)?;
    }
    Ok(())
}

/// What importing the package at `rel` reads: every module whole, and about
/// a third of each shared library's pages, 64 KiB at a time, as the loader
/// faults them in.
fn import(root: &Path, rel: &str, rng: &mut Rng, plan: &mut Plan) -> Result<()> {
    plan.list_dirs.push(rel.to_string());
    plan.list_dirs.push(format!("{rel}/sub"));
    let mut names: Vec<String> = Vec::new();
    for sub in ["", "sub/"] {
        for e in std::fs::read_dir(root.join(rel).join(sub))? {
            let e = e?;
            if e.file_type()?.is_file() {
                names.push(format!("{sub}{}", e.file_name().to_string_lossy()));
            }
        }
    }
    names.sort();
    for n in names {
        let path = format!("{rel}/{n}");
        let size = std::fs::metadata(root.join(&path))?.len();
        if !n.ends_with(".so") {
            plan.record(root, &path, 0, size)?;
            continue;
        }
        let page = 64 << 10;
        for off in (0..size.saturating_sub(page - 1)).step_by(page as usize) {
            if rng.below(3) == 0 {
                plan.record(root, &path, off, page)?;
            }
        }
    }
    Ok(())
}

/// `root/model.safetensors` of about `bytes` bytes in 8 MiB tensors.
pub fn weights(root: &Path, bytes: u64, plan: &mut Plan) -> Result<()> {
    let tensor = 8u64 << 20;
    let count = (bytes / tensor).max(4);
    let mut header = String::from("{");
    for t in 0..count {
        let (a, b) = (t * tensor, (t + 1) * tensor);
        header.push_str(&format!(
            "{}\"layers.{t}.weight\":{{\"dtype\":\"BF16\",\"shape\":[2048,2048],\"data_offsets\":[{a},{b}]}}",
            if t > 0 { "," } else { "" }
        ));
    }
    header.push('}');
    while (8 + header.len()) % 4096 != 0 {
        header.push(' ');
    }
    std::fs::create_dir_all(root)?;
    let file = std::fs::File::create(root.join("model.safetensors"))?;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, file);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for t in 0..count {
        f.write_all(&noise(0x5EED_0002 + t, tensor as usize))?;
    }
    f.flush()?;
    drop(f);
    let data_start = 8 + header.len() as u64;
    plan.record(root, "model.safetensors", 0, data_start)?;
    for t in (0..count).step_by(20) {
        let offset = data_start + t * tensor;
        plan.record(root, "model.safetensors", offset, tensor)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_generates_and_its_plan_replays() {
        let base = tempfile::tempdir().unwrap();
        let sizes = Sizes {
            env_bytes: 4 << 20,
            weight_bytes: 32 << 20,
        };
        for w in [Workload::PythonEnv, Workload::Weights, Workload::Both] {
            let g = generate(base.path(), w, sizes).unwrap();
            let read = g.plan.execute(&g.dir).unwrap();
            assert!(read > 0, "{} reads nothing", w.name());
            let again = generate(base.path(), w, sizes).unwrap();
            assert_eq!(again.plan.read_bytes(), read, "reused plan differs");
        }
    }
}
