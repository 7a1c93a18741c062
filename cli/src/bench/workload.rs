//! Built-in workloads: generated, reproducible images and the reads a
//! starting program makes from them.
//!
//! - **python-env**: site-packages with thousands of small modules (text-like,
//!   compressible) and some large shared libraries (binary-like). Startup
//!   "imports" three packages: it lists their directories, stats and reads every
//!   module, and touches a third of each shared library's pages, as the dynamic
//!   loader's page faults would.
//! - **weights**: a safetensors-like file (8-byte header length, a JSON header
//!   of tensor offsets, then the tensors). Startup reads the header and touches
//!   one tensor in twenty, as a program that maps the file and uses part of the
//!   model would.
//!
//! Each workload writes a read plan next to the image: the ranges startup
//! reads and the BLAKE3 of the bytes it must find there, so every run checks
//! that the data read matched.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One read of the plan: `len` bytes at `offset` of `path` (0/0 = whole file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlannedRead {
    pub path: String,
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
}

/// What a startup reads, and the stats it makes first.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub list_dirs: Vec<String>,
    pub reads: Vec<PlannedRead>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Text-like bytes (zstd ratio around 4) or noise.
fn fill(rng: &mut Rng, len: usize, text: bool) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"import ", b"def ", b"return ", b"self.", b"(x, y)", b" = ", b"\n    ", b"numpy",
        b"class ", b"if ", b"not ", b"None", b"# ", b"value", b"_cache", b"\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = rng.next();
        if text {
            out.extend_from_slice(WORDS[(r & 15) as usize]);
            if r & 0x300 == 0 {
                out.extend_from_slice(format!("{:x}", r >> 40).as_bytes());
            }
        } else {
            out.extend_from_slice(&r.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Library-like bytes: runs of noise between runs of repeated structure (ratio ~2).
fn fill_binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 4096);
    while out.len() < len {
        if rng.below(2) == 0 {
            out.extend_from_slice(&fill(rng, 4096, false));
        } else {
            let pat = rng.next().to_le_bytes();
            for _ in 0..512 {
                out.extend_from_slice(&pat[..4]);
                out.extend_from_slice(&[0, 0, 0, 0]);
            }
        }
    }
    out.truncate(len);
    out
}

fn record(plan: &mut Plan, root: &Path, rel: &str, offset: u64, len: u64) -> Result<()> {
    let f = std::fs::File::open(root.join(rel))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    plan.reads.push(PlannedRead {
        path: rel.into(),
        offset,
        len,
        blake3: blake3::hash(&buf).to_hex().to_string(),
    });
    Ok(())
}

/// Generates a python-env-like tree of about `bytes` bytes under `root/venv`.
pub fn python_env(root: &Path, bytes: u64, plan: &mut Plan) -> Result<()> {
    let mut rng = Rng(0x5EED_0001);
    let packages = 60usize;
    let per_pkg = (bytes / packages as u64).max(64 << 10);
    for p in 0..packages {
        let rel = format!("venv/lib/python3.11/site-packages/pkg{p:02}");
        let dir = root.join(&rel);
        std::fs::create_dir_all(dir.join("sub"))?;
        // About 40% of a package in modules, 60% in one or two shared libraries.
        let mut module_bytes = 0u64;
        let mut i = 0;
        while module_bytes < per_pkg * 2 / 5 {
            let len = 1024 + rng.below(24 << 10) as usize;
            let sub = if i % 3 == 0 { "sub/" } else { "" };
            std::fs::write(
                dir.join(format!("{sub}mod{i:03}.py")),
                fill(&mut rng, len, true),
            )?;
            module_bytes += len as u64;
            i += 1;
        }
        let libs = 1 + p % 2;
        for l in 0..libs {
            let len = (per_pkg * 3 / 5 / libs as u64) as usize;
            std::fs::write(
                dir.join(format!("_native{l}.so")),
                fill_binary(&mut rng, len),
            )?;
        }
    }
    // Startup imports three packages.
    for p in [3usize, 17, 42] {
        let rel = format!("venv/lib/python3.11/site-packages/pkg{p:02}");
        plan.list_dirs.push(rel.clone());
        plan.list_dirs.push(format!("{rel}/sub"));
        let mut names: Vec<String> = Vec::new();
        for sub in ["", "sub/"] {
            for e in std::fs::read_dir(root.join(&rel).join(sub))? {
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
            if n.ends_with(".so") {
                // The loader faults in about a third of the pages, 64 KiB at a time.
                let mut off = 0;
                while off + (64 << 10) <= size {
                    if rng.below(3) == 0 {
                        record(plan, root, &path, off, 64 << 10)?;
                    }
                    off += 64 << 10;
                }
            } else {
                record(plan, root, &path, 0, size)?;
            }
        }
    }
    Ok(())
}

/// Generates `root/model.safetensors` of about `bytes` bytes.
pub fn weights(root: &Path, bytes: u64, plan: &mut Plan) -> Result<()> {
    let mut rng = Rng(0x5EED_0002);
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
    let path = root.join("model.safetensors");
    std::fs::create_dir_all(root)?;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path)?);
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for _ in 0..count {
        f.write_all(&fill(&mut rng, tensor as usize, false))?;
    }
    f.flush()?;
    drop(f);
    let data_start = 8 + header.len() as u64;
    record(plan, root, "model.safetensors", 0, data_start)?;
    for t in (0..count).step_by(20) {
        record(
            plan,
            root,
            "model.safetensors",
            data_start + t * tensor,
            tensor,
        )?;
    }
    Ok(())
}

/// Reads a plan under `root` the way a starting program would and checks every
/// byte against the plan. Returns the bytes read.
pub fn execute(root: &Path, plan: &Plan) -> Result<u64> {
    for d in &plan.list_dirs {
        for e in std::fs::read_dir(root.join(d)).with_context(|| format!("listing {d}"))? {
            let _ = std::fs::symlink_metadata(e?.path())?;
        }
    }
    let mut total = 0;
    let mut open: Option<(String, std::fs::File)> = None;
    for r in &plan.reads {
        if open.as_ref().map(|o| &o.0) != Some(&r.path) {
            let f = std::fs::File::open(root.join(&r.path))
                .with_context(|| format!("opening {}", r.path))?;
            open = Some((r.path.clone(), f));
        }
        let f = &open.as_ref().expect("opened").1;
        let mut buf = vec![0u8; r.len as usize];
        f.read_exact_at(&mut buf, r.offset)
            .with_context(|| format!("reading {} at {}", r.path, r.offset))?;
        if blake3::hash(&buf).to_hex().as_str() != r.blake3 {
            bail!(
                "{} at {} does not hold the expected bytes",
                r.path,
                r.offset
            );
        }
        total += r.len;
    }
    Ok(total)
}

/// Where a workload's tree and plan live.
pub struct Generated {
    pub dir: PathBuf,
    pub plan_path: PathBuf,
    pub read_bytes: u64,
}

/// Generates workload `name` ("python-env", "weights" or "both") under `base`.
pub fn generate(base: &Path, name: &str, env_bytes: u64, weight_bytes: u64) -> Result<Generated> {
    let home = base.join(format!("{name}-{env_bytes}-{weight_bytes}"));
    let dir = home.join("image");
    let plan_path = home.join("plan.json");
    let mut plan = Plan::default();
    if plan_path.exists() && dir.exists() {
        let plan: Plan = serde_json::from_slice(&std::fs::read(&plan_path)?)?;
        let read_bytes = plan.reads.iter().map(|r| r.len).sum();
        return Ok(Generated {
            dir,
            plan_path,
            read_bytes,
        });
    }
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&dir)?;
    if name != "weights" {
        python_env(&dir, env_bytes, &mut plan)?;
    }
    if name != "python-env" {
        weights(&dir, weight_bytes, &mut plan)?;
    }
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
    let read_bytes = plan.reads.iter().map(|r| r.len).sum();
    Ok(Generated {
        dir,
        plan_path,
        read_bytes,
    })
}
