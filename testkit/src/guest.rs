//! Real Linux guests under QEMU, for the tests and benchmarks that need a
//! kernel's view of a filesystem: a virtio-fs mount, a snapshot and a restore.
//!
//! A guest is a Debian cloud kernel and an initramfs built here, in Rust, for
//! each boot ([`initramfs`]): a static busybox with its applet links, the
//! kernel modules virtio-fs needs (found by their own `depends=` list, loaded
//! in order), and an `/init` that mounts `/proc`, `/sys`, `/dev`, mounts the
//! virtio-fs tag at `/mnt` when there is one, runs the caller's shell script
//! between two marker lines and powers off. No disk image, no distribution
//! inside: a boot is a few seconds even under TCG, and what a test checks is
//! exactly what its script printed.
//!
//! QEMU ([`qemu`]) always runs with `-accel tcg` (no usable KVM is assumed) and
//! guest memory in a shared memfd, as vhost-user devices require. Its serial
//! console and its QMP monitor are unix sockets the harness listens on before
//! QEMU starts (QEMU connects as the client), so no output is lost and no
//! socket path is polled for. The console is read line by line on a thread
//! ([`console`]); a test waits for a line, writes a line (a script blocked on
//! `read` goes on), or waits for the script's end and its exit status.
//!
//! Snapshot and restore use migration to a file over QMP ([`Qmp`], from `thaw-vmm`):
//! [`Guest::save_to`] stops the guest, migrates to `file:PATH` and quits;
//! [`Guest::restore`] starts QEMU with the same configuration and
//! `-incoming defer`, loads the file and continues. A virtio-fs device
//! migrates only if its backend can hand over its state (QEMU >= 8.2;
//! `virtiofsd` can).
//!
//! What a guest needs from the machine, [`GuestKit::find`] locates:
//! `qemu-system-x86_64` (>= 8.2), the kernel and its modules unpacked by
//! `scripts/setup.sh` (in `$THAW_GUEST_DIR`, default `/var/cache/thaw/guest`),
//! a static busybox, and optionally `virtiofsd` ([`Virtiofsd`]). When one is
//! missing, tests skip loudly with [`require_guest!`](crate::require_guest).
//! `THAW_GUEST_LOG=1` copies every console line to stderr.

mod config;
pub mod console;
pub mod initramfs;
mod kit;
mod modules;
pub mod qemu;
mod virtiofsd;

pub use config::{GuestConfig, GuestFile, VirtioFs};
pub use kit::GuestKit;
pub use qemu::{Guest, ScriptOutput};
pub use thaw_vmm::qmp::Qmp;
pub use virtiofsd::Virtiofsd;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong between building a guest and its exit. `Debug` shows
/// the message, so a test's `unwrap()` prints QEMU's log and the console as
/// lines.
#[derive(thiserror::Error)]
pub enum GuestError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel module {name} is not in {dir} (nor built in)")]
    MissingModule { name: String, dir: PathBuf },
    #[error(
        "QEMU exited ({status}) while {doing}\n--- QEMU log ---\n{log}\n--- console ---\n{console}"
    )]
    QemuExited {
        status: String,
        doing: String,
        log: String,
        console: String,
    },
    #[error("timed out after {waited:?} waiting for {what}\n--- console ---\n{console}")]
    Timeout {
        what: String,
        waited: Duration,
        console: String,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
}

impl std::fmt::Debug for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl From<thaw_vmm::qmp::QmpError> for GuestError {
    fn from(e: thaw_vmm::qmp::QmpError) -> GuestError {
        GuestError::Qmp(e.to_string())
    }
}

impl GuestError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
        let what = what.into();
        move |source| GuestError::Io { what, source }
    }
}

/// The [`GuestKit`] of this machine, or prints `SKIP: <test>: <why>` to
/// stderr and returns from the calling test. `require_guest!(virtiofsd)`
/// also needs `virtiofsd`. Set `THAW_REQUIRE_GUEST=1` (on a machine where
/// `scripts/setup.sh` ran) to make a missing piece fail the test instead.
#[macro_export]
macro_rules! require_guest {
    () => {
        $crate::require_guest!(@with false)
    };
    (virtiofsd) => {
        $crate::require_guest!(@with true)
    };
    (@with $virtiofsd:expr) => {
        match $crate::guest::find_for_test($virtiofsd) {
            Ok(kit) => kit,
            Err(why) => {
                // Its path names the test the macro is in.
                fn here() {}
                $crate::guest::skip_or_fail(::std::any::type_name_of_val(&here), &why);
                return;
            }
        }
    };
}

#[doc(hidden)]
pub fn find_for_test(virtiofsd: bool) -> Result<GuestKit, String> {
    let kit = GuestKit::find()?;
    if virtiofsd {
        kit.virtiofsd()?;
    }
    Ok(kit)
}

/// Prints the loud skip line, or panics when skipping is not allowed.
#[doc(hidden)]
pub fn skip_or_fail(here: &str, why: &str) {
    let test = here.strip_suffix("::here").unwrap_or(here);
    skip_unless_required("THAW_REQUIRE_GUEST", test, why);
}

/// Says loudly that `test` skips, and why; panics instead when the
/// environment variable `require` is set (and not `0`): there, what is
/// missing should have been installed.
pub fn skip_unless_required(require: &str, test: &str, why: &str) {
    if std::env::var_os(require).is_some_and(|v| v != "0") {
        panic!("{test}: {require} is set but {why}");
    }
    skip(test, why);
}

/// Says loudly that `test` skips, and why.
pub fn skip(test: &str, why: &str) {
    // Straight to stderr: the test harness captures `eprintln!` of a test that
    // passes, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "\nSKIP: {test}: {why}\n");
}
