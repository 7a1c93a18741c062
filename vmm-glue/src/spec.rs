//! `vm.json`: what a VM was started with, stored beside its memory so a
//! restore can start the VMM the same way.

use crate::{Result, VmError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file name of the spec in a VM's image directory.
pub const SPEC_FILE: &str = "vm.json";
const SPEC_VERSION: u32 = 1;
/// The names of the VMMs a spec may give.
pub const QEMU: &str = "qemu";
pub const CLOUD_HYPERVISOR: &str = "cloud-hypervisor";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub version: u32,
    /// `qemu` or `cloud-hypervisor`.
    pub vmm: String,
    /// QEMU's accelerator (`kvm`, `tcg`); a restore must use the same.
    /// Cloud Hypervisor always uses KVM.
    pub accel: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The kernel command line.
    pub append: String,
    /// Whether an `initrd` file is part of the image.
    pub initrd: bool,
}

impl VmSpec {
    pub fn qemu(accel: &str, memory_mib: u32, cpus: u32, append: &str, initrd: bool) -> VmSpec {
        VmSpec {
            version: SPEC_VERSION,
            vmm: QEMU.into(),
            accel: accel.into(),
            memory_mib,
            cpus,
            append: append.into(),
            initrd,
        }
    }

    /// Reads the spec of the image at `dir`.
    pub fn read(dir: &Path) -> Result<VmSpec> {
        let path = dir.join(SPEC_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::NotAVm(dir.display().to_string()))
            }
            Err(e) => return Err(VmError::io(format!("read {}", path.display()))(e)),
        };
        let spec: VmSpec =
            serde_json::from_slice(&bytes).map_err(|e| VmError::Spec(e.to_string()))?;
        if spec.version != SPEC_VERSION {
            return Err(VmError::Spec(format!(
                "version {} (this build reads {SPEC_VERSION})",
                spec.version
            )));
        }
        if spec.vmm != QEMU && spec.vmm != CLOUD_HYPERVISOR {
            return Err(VmError::Spec(format!("unknown VMM {:?}", spec.vmm)));
        }
        Ok(spec)
    }

    /// The same VM run by Cloud Hypervisor (KVM).
    pub fn for_cloud_hypervisor(mut self) -> VmSpec {
        self.vmm = CLOUD_HYPERVISOR.into();
        self.accel = "kvm".into();
        self
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SPEC_FILE);
        let json = serde_json::to_vec_pretty(self).expect("a spec serializes");
        std::fs::write(&path, json).map_err(VmError::io(format!("write {}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(VmSpec::read(dir.path()), Err(VmError::NotAVm(_))));
        let spec = VmSpec::qemu("tcg", 256, 1, "console=ttyS0", true);
        spec.write(dir.path()).unwrap();
        assert_eq!(VmSpec::read(dir.path()).unwrap(), spec);
        let mut future = spec.clone();
        future.version = 9;
        future.write(dir.path()).unwrap();
        assert!(matches!(VmSpec::read(dir.path()), Err(VmError::Spec(_))));
    }
}
