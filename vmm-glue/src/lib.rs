//! thaw's VM glue: VM memory snapshots as thaw images, restored lazily.
//!
//! The fastest start of an agent VM is not a boot but the resume of a memory
//! snapshot taken once the environment was imported. A snapshot here is a
//! directory that becomes an ordinary thaw image:
//!
//! ```text
//! vm.json   the VM's spec (VMM, memory, CPUs, kernel command line)
//! kernel    the kernel and initramfs it booted (restore needs the same)
//! initrd
//! memory    guest RAM, a sparse file: pages never touched are holes
//! state     the VMM's device state (QEMU: a migration stream without RAM)
//! ```
//!
//! Pushed with thaw, zero pages and untouched memory are never stored or
//! fetched, and unchanged memory deduplicates across snapshots of one base.
//! To restore, the image is mounted (chunks arrive on first read) and the
//! VMM maps `memory` privately: each page the guest touches faults in
//! through the mount, verified and cached, and the guest's writes stay in its
//! own copy. Pages it never touches never move.
//!
//! [`qemu`] drives QEMU this way (the technique Kata uses for VM templates:
//! RAM in a shared file while the template runs, `x-ignore-shared`
//! migration so the stream holds only device state, and a private,
//! read-only-opened mapping of the file on restore). [`qmp`] is the monitor
//! client. [`cloud_hypervisor`] is the client of Cloud Hypervisor's REST
//! API, whose `OnDemand` restore reads each faulting page from the
//! snapshot's memory file, here on a thaw mount. [`pool`] keeps restored,
//! paused VMs ready and hands them out running.

pub mod cloud_hypervisor;
pub mod pool;
pub mod qemu;
pub mod qmp;
mod spec;

pub use spec::{VmSpec, SPEC_FILE};

/// Errors of the VM glue.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error("{0} is not a VM directory: no {SPEC_FILE} (start one with `thaw vm run`)")]
    NotAVm(String),
    #[error("bad {SPEC_FILE}: {0}")]
    Spec(String),
    #[error("QEMU {0}")]
    Qemu(String),
    #[error("Cloud Hypervisor refused {action} ({status}): {message}")]
    Api {
        action: String,
        status: u16,
        message: String,
    },
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, VmError>;
