//! How a mount meets the kernel, and why it can fail.

use std::path::PathBuf;

/// Why a mount could not be made, answered or removed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot mount at {} (is the fuse3 package installed, and /dev/fuse there?)", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("the mount at {} does not answer", mountpoint.display())]
    NotAnswering {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve the control socket of {}", mountpoint.display())]
    Control {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot unmount {}: not a mount, or busy", mountpoint.display())]
    Unmount { mountpoint: PathBuf },
}

/// How a mount meets the kernel.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub allow_other: bool,
    /// Kernel readahead for the mount, in bytes (0 keeps the kernel's 128 KiB).
    /// Larger keeps more reads in flight for sequential readers, but makes each
    /// page fault of an mmap'd file read (and fetch) that much around it.
    pub kernel_readahead: u64,
    /// Hand bytes in memory to the kernel's page cache before they are read
    /// (see `push`), so reads of a streamed working set never ask.
    pub push: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            allow_other: false,
            kernel_readahead: 1 << 20,
            push: true,
        }
    }
}

impl FuseOptions {
    pub(crate) fn mount_options(&self, image: &str) -> Vec<fuser::MountOption> {
        use fuser::MountOption;
        let mut options = vec![
            MountOption::RO,
            MountOption::FSName(format!("thaw:{image}")),
            MountOption::Subtype("thaw".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        if self.allow_other {
            options.push(MountOption::AllowOther);
        }
        options
    }
}
