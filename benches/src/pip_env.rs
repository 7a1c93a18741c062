//! A real Python environment as a workload: PyPI packages installed with
//! pip into a directory (`thaw bench --pip 'numpy pandas pyarrow'`), once per
//! machine and package list, and a start that imports them.
//!
//! A generated environment once hid a gap that the real one showed at once:
//! real packages have real file counts, sizes, compression ratios and
//! import orders.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the packages `spec` (pip requirement strings) are installed under
/// `cache`: one directory per package list.
fn target(cache: &Path, spec: &[String]) -> PathBuf {
    let key = blake3::hash(spec.join("\n").as_bytes()).to_hex();
    cache.join(&key.as_str()[..16]).join("site-packages")
}

/// The packages of `spec` installed by pip under `cache` (only the first
/// time); returns the directory that holds them.
pub fn install(cache: &Path, spec: &[String]) -> Result<PathBuf> {
    if spec.is_empty() {
        bail!("--pip needs at least one package");
    }
    let dir = target(cache, spec);
    let done = dir.with_file_name("installed");
    if done.exists() {
        return Ok(dir);
    }
    eprintln!(
        "thaw bench: pip install {} into {}",
        spec.join(" "),
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(&dir)
        .args(spec)
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("pip install {} failed ({status})", spec.join(" "));
    }
    std::fs::write(&done, spec.join("\n"))?;
    Ok(dir)
}

/// The interpreter `python3` names, by its own path: a wrapper on `PATH`
/// (pyenv's shim is a shell script that runs several processes) would add
/// its own start to every measured one.
pub fn interpreter() -> Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("cannot run python3")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || path.is_empty() {
        bail!("python3 does not say where it is ({})", out.status);
    }
    Ok(path)
}

/// The start that imports every package of `spec` from the image's root
/// (`$THAW_ROOT`) with `python`, as `thaw bench --run` takes it. Import
/// names are the package names without version pins, `-` as `_`; pass
/// `--run` for packages whose import name differs (scikit-learn is `sklearn`).
pub fn import_command(spec: &[String], python: &str) -> String {
    let modules: Vec<String> = spec
        .iter()
        .map(|p| {
            let name = p
                .split(['=', '<', '>', '~', '!', '[', ';', ' '])
                .next()
                .unwrap_or(p);
            name.trim().to_ascii_lowercase().replace('-', "_")
        })
        .collect();
    format!(
        "{python} -c 'import os, sys; sys.path.insert(0, os.environ[\"THAW_ROOT\"]); import {}'",
        modules.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_imports_each_package_by_its_module_name() {
        let spec = vec![
            "numpy==2.4.0".into(),
            "python-dateutil".into(),
            "PyArrow>=20".into(),
        ];
        let cmd = import_command(&spec, "/usr/bin/python3");
        assert!(cmd.starts_with("/usr/bin/python3 -c "), "{cmd}");
        assert!(
            cmd.ends_with("import numpy, python_dateutil, pyarrow'"),
            "{cmd}"
        );
        assert!(cmd.contains("os.environ[\"THAW_ROOT\"]"), "{cmd}");
    }

    #[test]
    fn each_package_list_has_its_own_directory() {
        let cache = Path::new("/c");
        let a = target(cache, &["numpy".into()]);
        let b = target(cache, &["numpy".into(), "pandas".into()]);
        assert_ne!(a, b);
        assert_eq!(a, target(cache, &["numpy".into()]));
    }
}
