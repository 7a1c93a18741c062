//! Finding what a guest boots with on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest QEMU that migrates a vhost-user-fs device.
const MIN_QEMU: (u32, u32) = (8, 2);
const DEFAULT_GUEST_DIR: &str = "/var/cache/thaw/guest";
const SETUP_HINT: &str = "run scripts/setup.sh";

/// The pieces a guest is made of, as found on this machine.
#[derive(Debug, Clone)]
pub struct GuestKit {
    pub qemu: PathBuf,
    pub qemu_version: (u32, u32),
    /// The kernel image (`vmlinuz`).
    pub kernel: PathBuf,
    /// `lib/modules/<version>` of that kernel.
    pub modules: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// The reference virtio-fs backend, if installed.
    pub virtiofsd: Option<PathBuf>,
}

impl GuestKit {
    /// Locates QEMU, the kernel, its modules and busybox; the error says what
    /// is missing and is meant to be printed as the reason a test skipped.
    ///
    /// `$THAW_QEMU`, `$THAW_GUEST_DIR`, `$THAW_BUSYBOX` and `$THAW_VIRTIOFSD`
    /// override where each is looked for.
    pub fn find() -> Result<GuestKit, String> {
        let qemu = env_path("THAW_QEMU")
            .or_else(|| in_path("qemu-system-x86_64"))
            .ok_or(format!("no qemu-system-x86_64 in PATH ({SETUP_HINT})"))?;
        let qemu_version = qemu_version(&qemu)?;
        if qemu_version < MIN_QEMU {
            return Err(format!(
                "{} is QEMU {}.{}, older than {}.{} ({SETUP_HINT})",
                qemu.display(),
                qemu_version.0,
                qemu_version.1,
                MIN_QEMU.0,
                MIN_QEMU.1
            ));
        }

        let dir = env_path("THAW_GUEST_DIR").unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR));
        let kernel = dir.join("vmlinuz");
        std::fs::File::open(&kernel).map_err(|e| {
            format!(
                "no guest kernel at {}: {e} ({SETUP_HINT})",
                kernel.display()
            )
        })?;
        let modules = dir.join("modules");
        if !modules.join("modules.builtin").is_file() {
            return Err(format!(
                "no kernel modules at {} ({SETUP_HINT})",
                modules.display()
            ));
        }

        let busybox = env_path("THAW_BUSYBOX").unwrap_or_else(|| PathBuf::from("/bin/busybox"));
        match is_static(&busybox) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "{} is dynamically linked: a guest needs busybox-static ({SETUP_HINT})",
                    busybox.display()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "no busybox at {}: {e} ({SETUP_HINT})",
                    busybox.display()
                ))
            }
        }

        let virtiofsd = env_path("THAW_VIRTIOFSD").or_else(|| {
            [
                PathBuf::from("/usr/libexec/virtiofsd"),
                dir.join("bin/virtiofsd"),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| in_path("virtiofsd"))
        });

        Ok(GuestKit {
            qemu,
            qemu_version,
            kernel,
            modules,
            busybox,
            virtiofsd,
        })
    }

    /// `virtiofsd`, or why a test that needs it skips.
    pub fn virtiofsd(&self) -> Result<&Path, String> {
        match self.virtiofsd.as_deref() {
            Some(bin) if bin.is_file() => Ok(bin),
            Some(bin) => Err(format!("no virtiofsd at {} ({SETUP_HINT})", bin.display())),
            None => Err(format!("no virtiofsd found ({SETUP_HINT})")),
        }
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `(major, minor)` from `QEMU emulator version 10.0.2 (...)`.
fn qemu_version(qemu: &Path) -> Result<(u32, u32), String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e} ({SETUP_HINT})", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).ok_or(format!(
        "cannot read a version from `{} --version`: {text:?} ({SETUP_HINT})",
        qemu.display()
    ))
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

/// Whether an ELF executable has no program interpreter (`PT_INTERP`).
fn is_static(path: &Path) -> std::io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path)?;
    let not_elf = || std::io::Error::other("not a 64-bit little-endian ELF file");
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(not_elf());
    }
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err(not_elf());
    };
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(not_elf)?;
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_versions() {
        let debian = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n";
        assert_eq!(parse_qemu_version(debian), Some((10, 0)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 8.2.0\n"),
            Some((8, 2))
        );
        assert_eq!(parse_qemu_version("something else"), None);
        assert!((7, 2) < MIN_QEMU && (8, 2) >= MIN_QEMU && (10, 0) > MIN_QEMU);
    }

    #[test]
    fn tells_static_from_dynamic_executables() {
        // The running test is dynamically linked (it has an interpreter).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static(&me).unwrap());
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), "#!/bin/sh\n").unwrap();
        assert!(is_static(text.path()).is_err());
    }
}
