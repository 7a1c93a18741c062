//! What thaw's integration tests and its benchmark lab both need, in one place.
//!
//! - [`process`]: the `thaw` binary cargo built beside the running test or
//!   bench, run as a process, and a real `thaw serve` child on port 0 over a
//!   temporary `file://` store (the tier above in-process servers).
//! - [`data`]: deterministic bytes, so runs compare and tests need no
//!   fixtures: incompressible noise, and a Python environment's source files
//!   and shared libraries with a real one's compressibility.
//! - [`tree`]: building trees with what push must keep (modes, mtimes to the
//!   nanosecond, xattrs, device nodes); [`compare`]: asserting two trees are
//!   the same in all of it (content, symlinks, hardlinks).
//! - [`guest`]: real Linux guests under QEMU (TCG): an initramfs built per
//!   boot, a virtio-fs mount, the console, QMP, snapshot and restore.

pub mod compare;
pub mod data;
pub mod garage;
pub mod guest;
pub mod process;
pub mod tree;

pub use compare::assert_same_tree;
pub use data::{noise, Python, PythonEnv, Rng};
pub use process::{
    assert_eio_within, finish_within, spawn_thaw, thaw, thaw_bin, thaw_json, thaw_ok, thaw_within,
    wait_for_chunks, Mount, Server,
};

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
