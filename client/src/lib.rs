//! thaw's client: push a tree to a chunk server, export it back, inspect it,
//! and serve it lazily.
//!
//! [`push`] turns a directory into chunks and a manifest and uploads only the
//! chunks the server lacks, setting the tag last so a tag never points at an
//! incomplete image. [`export`] is the full pull: it recreates the tree on local
//! disk. [`inspect`] summarizes an image. [`image`] is the lazy image core that
//! every door (the FUSE mount in `thaw-fuse`, virtio-fs, VM memory) serves:
//! each chunk is fetched the first time something reads it, verified and
//! cached, and a recorded working-set [`profile`] streams what a start will
//! read before it asks. [`remote`] is the HTTP client of the chunk server's API.

mod error;
pub mod export;
pub mod image;
pub mod inspect;
pub mod profile;
pub mod push;
pub mod reference;
pub mod remote;
#[cfg(test)]
mod testing;

pub use error::{chain, ClientError, Result};
pub use reference::ImageRef;
pub use remote::Remote;
