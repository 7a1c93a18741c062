//! What a guest is made of: memory, devices, the script it runs, its files.

use std::path::{Path, PathBuf};

/// What to boot: memory, an optional virtio-fs device, the script `/init`
/// runs and extra files.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub memory_mib: u32,
    pub virtio_fs: Option<VirtioFs>,
    /// A shell script (busybox `sh`); its stdin is the console.
    pub script: String,
    pub files: Vec<GuestFile>,
    /// Kernel modules to load besides what the devices need.
    pub extra_modules: Vec<String>,
}

/// A vhost-user-fs device: the backend's socket and the tag the guest mounts.
#[derive(Debug, Clone)]
pub struct VirtioFs {
    pub socket: PathBuf,
    pub tag: String,
}

/// A file put into the guest's initramfs.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path in the guest.
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl GuestConfig {
    /// 512 MiB, no virtio-fs, `script` as the guest's work.
    pub fn new(script: &str) -> GuestConfig {
        GuestConfig {
            memory_mib: 512,
            virtio_fs: None,
            script: script.to_string(),
            files: Vec::new(),
            extra_modules: Vec::new(),
        }
    }

    pub fn memory_mib(mut self, mib: u32) -> GuestConfig {
        self.memory_mib = mib;
        self
    }

    /// A vhost-user-fs device whose backend listens on `socket`, mounted at
    /// `/mnt` in the guest as `tag`.
    pub fn virtio_fs(mut self, socket: &Path, tag: &str) -> GuestConfig {
        self.virtio_fs = Some(VirtioFs {
            socket: socket.to_path_buf(),
            tag: tag.to_string(),
        });
        self
    }

    pub fn file(mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> GuestConfig {
        self.files.push(GuestFile {
            path: path.to_string(),
            bytes: bytes.into(),
            mode,
        });
        self
    }

    pub fn module(mut self, name: &str) -> GuestConfig {
        self.extra_modules.push(name.to_string());
        self
    }

    /// The modules `/init` loads: the devices' drivers, then the extra ones.
    pub(crate) fn modules(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.virtio_fs.is_some() {
            names.extend(["virtio_pci".to_string(), "virtiofs".to_string()]);
        }
        names.extend(self.extra_modules.iter().cloned());
        names
    }
}
