//! The kernel modules a guest loads, with their dependencies, in load order.
//!
//! A kernel package unpacked with `dpkg-deb -x` has no `modules.dep` (its
//! post-install script would have run `depmod`), so the dependencies come
//! from each module's own `.modinfo` section: a `depends=a,b` string.
//! Modules may be compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`); busybox
//! `insmod` loads only plain ones, so they are decompressed here.

use super::GuestError;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A module ready to go into an initramfs.
#[derive(Debug)]
pub(crate) struct Module {
    pub name: String,
    /// The plain (decompressed) `.ko`.
    pub bytes: Vec<u8>,
}

/// `names` and everything they depend on, dependencies first. Modules built
/// into the kernel are left out.
pub(crate) fn resolve(dir: &Path, names: &[String]) -> Result<Vec<Module>, GuestError> {
    let files = index(dir)?;
    let builtin = builtin(dir)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in names {
        visit(
            dir,
            &files,
            &builtin,
            &normalize(name),
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

/// Depth-first: a module comes after all it depends on.
fn visit(
    dir: &Path,
    files: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    name: &str,
    seen: &mut HashSet<String>,
    order: &mut Vec<Module>,
) -> Result<(), GuestError> {
    if !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let path = files.get(name).ok_or_else(|| GuestError::MissingModule {
        name: name.to_string(),
        dir: dir.to_path_buf(),
    })?;
    let bytes = decompress(path)?;
    for dep in depends(&bytes) {
        visit(dir, files, builtin, &dep, seen, order)?;
    }
    order.push(Module {
        name: name.to_string(),
        bytes,
    });
    Ok(())
}

/// Module names are spelled with `_`; file names may use `-`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name, if it is a module (`virtio-rng.ko.xz`).
fn module_name(file_name: &str) -> Option<String> {
    let (stem, ext) = file_name.split_once(".ko")?;
    matches!(ext, "" | ".xz" | ".zst" | ".gz").then(|| normalize(stem))
}

/// Every module file under `dir/kernel`, by module name.
fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, GuestError> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.join("kernel")];
    while let Some(d) = pending.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(GuestError::io(format!("read {}", d.display())))?;
        for entry in entries {
            let entry = entry.map_err(GuestError::io(format!("read {}", d.display())))?;
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                files.insert(name, path);
            }
        }
    }
    Ok(files)
}

/// The names listed in `modules.builtin` (`kernel/fs/ext4/ext4.ko` lines).
fn builtin(dir: &Path) -> Result<HashSet<String>, GuestError> {
    let path = dir.join("modules.builtin");
    let text = std::fs::read_to_string(&path)
        .map_err(GuestError::io(format!("read {}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| module_name(l.rsplit('/').next()?))
        .collect())
}

/// The `depends=` list of a module's `.modinfo` strings.
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &ko[at + KEY.len()..];
    let value = &value[..value.iter().position(|&b| b == 0).unwrap_or(value.len())];
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(normalize)
        .collect()
}

fn decompress(path: &Path) -> Result<Vec<u8>, GuestError> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => {
            return std::fs::read(path).map_err(GuestError::io(format!("read {}", path.display())))
        }
    };
    let what = format!("{tool} -dc {}", path.display());
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(GuestError::io(what.clone()))?;
    if !out.status.success() {
        return Err(GuestError::Io {
            what,
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_modules_as_the_kernel_does() {
        assert_eq!(module_name("virtiofs.ko").as_deref(), Some("virtiofs"));
        assert_eq!(
            module_name("virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("fuse.ko.zst").as_deref(), Some("fuse"));
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name("x.kobj"), None);
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=fuse,virtio-ring,virtio\0retpoline=Y\0";
        assert_eq!(depends(ko), ["fuse", "virtio_ring", "virtio"]);
        assert!(depends(b"\0depends=\0name=virtio\0").is_empty());
        assert!(depends(b"no modinfo here").is_empty());
    }

    #[test]
    fn orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel/fs");
        std::fs::create_dir_all(&kernel).unwrap();
        let module = |name: &str, deps: &str| {
            let body = format!("\0name={name}\0depends={deps}\0");
            std::fs::write(kernel.join(format!("{name}.ko")), body).unwrap();
        };
        module("virtiofs", "fuse,virtio,virtio_ring");
        module("fuse", "");
        module("virtio_ring", "virtio");
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let order = resolve(dir.path(), &["virtiofs".to_string()]).unwrap();
        let names: Vec<_> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["fuse", "virtio_ring", "virtiofs"]);

        let err = resolve(dir.path(), &["nosuch".to_string()]).unwrap_err();
        assert!(matches!(err, GuestError::MissingModule { .. }), "{err}");
    }
}
