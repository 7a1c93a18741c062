//! The thaw image format: chunk ids, chunk frames, chunking and the manifest.
//!
//! An image is a directory tree cut into chunks. Each chunk is named by the
//! BLAKE3-256 digest of its uncompressed bytes ([`Digest`], written
//! `blake3:<64 hex>`), travels and rests as a [`frame`] (a 12-byte header and the
//! zstd-compressed bytes), and is verified against its name every time it is
//! read. The [`Manifest`] holds the tree and, for each regular file, the extents
//! that say which chunk holds each byte range; it is itself named by the BLAKE3
//! digest of its encoding. The byte layouts are in `docs/format.md`.
//!
//! [`wire`] holds what server and clients must agree on beyond those (the
//! batch record, request limits, the name rule), and [`BudgetLru`] the one
//! byte-bounded cache both sides keep in memory. [`device_state`] is what a
//! virtio-fs backend hands over when its VM is snapshotted, and [`profile`]
//! what a start of an image read, for the next cold start to fetch early.
//!
//! This crate is pure: bytes in, bytes out. It performs no I/O, so the same code
//! serves the server, the push client, the FUSE mount and later the VM launcher.
#![forbid(unsafe_code)]

pub mod budget_lru;
mod chunking;
pub mod device_state;
mod digest;
pub mod frame;
mod manifest;
pub mod outboard;
pub mod profile;
mod sealed;
pub mod wire;

pub use budget_lru::BudgetLru;
pub use chunking::{
    cdc_chunks, cdc_stream, is_zero, CdcBounds, CdcChunk, Chunking, ChunkingMode, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};
pub use digest::{Digest, ParseDigestError};
pub use frame::{FrameError, FRAME_HEADER_LEN, MAX_CHUNK_LEN};
pub use manifest::{
    node_path, ChunkRef, Extent, Manifest, ManifestError, Node, NodeKind, Xattr, MANIFEST_MAGIC,
    MANIFEST_VERSION, ROOT, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};
pub use profile::{FileRange, Profile, ProfileEntry, ProfileError};

/// A chunk is named by the digest of its uncompressed bytes.
pub type ChunkId = Digest;
