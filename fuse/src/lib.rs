//! thaw's FUSE door: a host mount of the lazy image core.
//!
//! The image core (`thaw_client::image`) decides everything about the
//! filesystem; this crate only carries it to the kernel. [`adapter`]
//! translates `fuser` calls and replies, [`Session`] owns a mount's lifecycle
//! (mount, control socket, serving until a signal or an unmount, clean-up),
//! and [`background`] lets the command return once a forked child serves.
//! `fuser` is a dependency of this crate alone, so the core builds and is
//! tested without it.

mod adapter;
pub mod background;
mod kernel;
mod options;
mod push;
mod session;

pub use kernel::{set_readahead, unmount, unmount_and_wait};
pub use options::{FuseError, FuseOptions};
pub use session::{Ended, Session};

use std::path::{Path, PathBuf};
use thaw_client::image::control;
use thaw_client::image::stats::StatsReport;

/// Where the background mount at `mountpoint` logs.
pub fn log_path(mountpoint: &Path) -> std::io::Result<PathBuf> {
    Ok(control::socket_path(mountpoint)?.with_extension("log"))
}

/// The counters of the mount at `mountpoint`.
pub fn query_stats(mountpoint: &Path) -> std::io::Result<StatsReport> {
    control::query(mountpoint)
}
