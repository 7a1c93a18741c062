//! thaw's client: push a tree to a chunk server, export it back, inspect it,
//! and mount it lazily over FUSE.
//!
//! [`push`] turns a directory into chunks and a manifest and uploads only the
//! chunks the server lacks, setting the tag last so a tag never points at an
//! incomplete image. [`export`] is the full pull: it recreates the tree on local
//! disk. [`inspect`] summarizes an image. [`mount`] serves an image lazily over
//! FUSE, fetching each chunk the first time something reads it.

mod error;
pub mod export;
pub mod inspect;
pub mod mount;
pub mod push;
pub mod reference;
pub mod remote;

pub use error::{ClientError, Result};
pub use reference::ImageRef;
pub use remote::Remote;
