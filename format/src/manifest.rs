//! The manifest: an image's tree and where every byte of every file lives.
//!
//! Nodes are laid out breadth-first with node 0 the root, so the children of a
//! directory are one contiguous run of nodes, sorted by name: a lookup is a
//! binary search and a readdir a slice, with no index to build at mount. Files
//! point at a run of [`Extent`]s, each a byte range of one chunk or a hole.
//! Every record is fixed-size (see `docs/format.md`), so decoding 100k files is
//! a single linear pass.
//!
//! [`Manifest::validate`] is the one place that checks the invariants; decoding
//! always runs it, so a decoded manifest never needs bounds checks downstream.

mod codec;

use crate::frame::MAX_CHUNK_LEN;
use crate::Digest;
use std::ops::Range;

pub use codec::{MANIFEST_MAGIC, MANIFEST_VERSION};

/// Index of the root directory.
pub const ROOT: u32 = 0;

/// A chunk the manifest refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: Digest,
    /// Uncompressed length.
    pub len: u32,
}

/// A byte range of a file: `len` bytes from `chunk` at `offset`, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Index into [`Manifest::chunks`]; `None` for a hole (zeros).
    pub chunk: Option<u32>,
    pub offset: u32,
    pub len: u64,
}

/// An extended attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Children are `nodes[children]`, sorted by name.
    Dir {
        children: Range<u32>,
    },
    /// Contents are `extents[extents]`, in file order.
    File {
        extents: Range<u32>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another name for the non-directory entry `nodes[target]` (one inode).
    Hardlink {
        target: u32,
    },
    CharDev {
        rdev: u64,
    },
    BlockDev {
        rdev: u64,
    },
    Fifo,
    Socket,
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub parent: u32,
    /// The entry's name in its parent (empty for the root).
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Full `st_mode`, file type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Logical size: file length, symlink target length, 0 otherwise.
    pub size: u64,
    /// Indices into [`Manifest::xattrs`].
    pub xattrs: Range<u32>,
}

/// A whole image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// Nominal chunk size the image was cut with.
    pub chunk_size: u32,
    pub chunks: Vec<ChunkRef>,
    pub nodes: Vec<Node>,
    pub extents: Vec<Extent>,
    pub xattrs: Vec<Xattr>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a thaw manifest (bad magic)")]
    BadMagic,
    #[error("unsupported manifest version {0}: upgrade thaw")]
    UnsupportedVersion(u16),
    #[error("unknown manifest flags {0:#x}")]
    UnknownFlags(u16),
    #[error("manifest truncated: {0}")]
    Truncated(&'static str),
    #[error("manifest has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("manifest digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
}

fn invalid(msg: String) -> ManifestError {
    ManifestError::Invalid(msg)
}

/// The file type bits of `st_mode` (`S_IFMT`), and each type's value.
const S_IFMT: u32 = 0o170000;
const S_IFSOCK: u32 = 0o140000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;
const S_IFBLK: u32 = 0o060000;
const S_IFDIR: u32 = 0o040000;
const S_IFCHR: u32 = 0o020000;
const S_IFIFO: u32 = 0o010000;

/// Longest xattr name (Linux `XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest xattr value (Linux `XATTR_SIZE_MAX`).
pub const XATTR_VALUE_MAX: usize = 64 << 10;

/// Directory entry names: non-empty, no `/` or NUL, not `.` or `..`.
pub(crate) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// Xattr names: non-empty, no NUL, at most [`XATTR_NAME_MAX`] bytes.
fn valid_xattr(x: &Xattr) -> bool {
    !x.name.is_empty()
        && x.name.len() <= XATTR_NAME_MAX
        && !x.name.contains(&0)
        && x.value.len() <= XATTR_VALUE_MAX
}

impl NodeKind {
    /// The `st_mode` file type bits of this kind; `None` for a hardlink,
    /// which has its target's.
    fn type_bits(&self) -> Option<u32> {
        Some(match self {
            NodeKind::Dir { .. } => S_IFDIR,
            NodeKind::File { .. } => S_IFREG,
            NodeKind::Symlink { .. } => S_IFLNK,
            NodeKind::Hardlink { .. } => return None,
            NodeKind::CharDev { .. } => S_IFCHR,
            NodeKind::BlockDev { .. } => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
            NodeKind::Socket => S_IFSOCK,
        })
    }
}

/// The path of node `index` of `nodes` (laid out as a manifest's), relative
/// to the root, `/`-separated.
pub fn node_path(nodes: &[Node], mut index: u32) -> Vec<u8> {
    let mut parts = Vec::new();
    while index != ROOT {
        let n = &nodes[index as usize];
        parts.push(n.name.as_slice());
        index = n.parent;
    }
    parts.reverse();
    parts.join(&b'/')
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

impl Manifest {
    /// The digest that names this manifest: BLAKE3 of its encoding.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// The children of directory `dir` (empty for a non-directory).
    pub fn children(&self, dir: u32) -> &[Node] {
        match &self.nodes[dir as usize].kind {
            NodeKind::Dir { children } => {
                &self.nodes[children.start as usize..children.end as usize]
            }
            _ => &[],
        }
    }

    /// The node index of `name` in directory `dir`.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let NodeKind::Dir { children } = &self.nodes[dir as usize].kind else {
            return None;
        };
        let slice = &self.nodes[children.start as usize..children.end as usize];
        slice
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| children.start + i as u32)
    }

    /// The node a hardlink resolves to (the node itself otherwise).
    pub fn resolve(&self, index: u32) -> u32 {
        match self.nodes[index as usize].kind {
            NodeKind::Hardlink { target } => target,
            _ => index,
        }
    }

    /// The extents of file `index` (after resolving hardlinks).
    pub fn file_extents(&self, index: u32) -> &[Extent] {
        match &self.nodes[self.resolve(index) as usize].kind {
            NodeKind::File { extents } => {
                &self.extents[extents.start as usize..extents.end as usize]
            }
            _ => &[],
        }
    }

    /// The path of node `index`, relative to the root, `/`-separated.
    pub fn path(&self, index: u32) -> Vec<u8> {
        node_path(&self.nodes, index)
    }

    /// Files smaller than this were packed with their neighbours at push
    /// ([`crate::Chunking::pack_threshold`] of the image's chunk size).
    pub fn pack_threshold(&self) -> u64 {
        crate::chunking::pack_threshold(self.chunk_size)
    }

    /// Sum of regular file sizes (each hardlinked file once).
    pub fn logical_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeKind::File { .. }))
            .map(|n| n.size)
            .sum()
    }

    /// Checks every invariant that readers rely on. Decoding always calls this.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let n = self.nodes.len();
        if n == 0
            || !self.nodes[0].is_dir()
            || self.nodes[0].parent != ROOT
            || !self.nodes[0].name.is_empty()
        {
            return Err(invalid("node 0 must be the root directory".into()));
        }
        if n > u32::MAX as usize - 1 || self.chunks.len() >= u32::MAX as usize {
            return Err(invalid("too many entries".into()));
        }
        if !self.chunk_size.is_power_of_two() || self.chunk_size as usize > MAX_CHUNK_LEN {
            return Err(invalid(format!("bad chunk size {}", self.chunk_size)));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            if c.len as usize > MAX_CHUNK_LEN || c.len == 0 {
                return Err(invalid(format!("chunk {i} has bad length {}", c.len)));
            }
        }
        if let Some(i) = self.xattrs.iter().position(|x| !valid_xattr(x)) {
            return Err(invalid(format!(
                "xattr {i}: names are 1 to {XATTR_NAME_MAX} bytes without NUL, values at most {XATTR_VALUE_MAX} bytes"
            )));
        }
        // Breadth-first layout: the child runs of directories, taken in node
        // order, tile 1..n exactly. This also rules out cycles and orphans.
        let mut next = 1u32;
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i as u32;
            let ctx = |m: &str| invalid(format!("node {i}: {m}"));
            if i != ROOT && !valid_name(&node.name) {
                return Err(ctx("invalid name"));
            }
            if node.xattrs.start > node.xattrs.end || node.xattrs.end as usize > self.xattrs.len() {
                return Err(ctx("xattr range out of bounds"));
            }
            match &node.kind {
                NodeKind::Dir { children } => {
                    if children.start != next
                        || children.end < children.start
                        || children.end as usize > n
                    {
                        return Err(ctx("children are not laid out breadth-first"));
                    }
                    next = children.end;
                    let kids = &self.nodes[children.start as usize..children.end as usize];
                    if kids.iter().any(|k| k.parent != i) {
                        return Err(ctx("child with wrong parent"));
                    }
                    if kids.windows(2).any(|w| w[0].name >= w[1].name) {
                        return Err(ctx("children not sorted or duplicated"));
                    }
                }
                NodeKind::File { extents } => {
                    if extents.start > extents.end || extents.end as usize > self.extents.len() {
                        return Err(ctx("extent range out of bounds"));
                    }
                    let mut total = 0u64;
                    for e in &self.extents[extents.start as usize..extents.end as usize] {
                        if let Some(c) = e.chunk {
                            let c = self
                                .chunks
                                .get(c as usize)
                                .ok_or_else(|| ctx("extent names a missing chunk"))?;
                            let end = u64::from(e.offset).checked_add(e.len);
                            if end.is_none_or(|end| end > u64::from(c.len)) {
                                return Err(ctx("extent overruns its chunk"));
                            }
                        } else if e.offset != 0 {
                            return Err(ctx("hole with an offset"));
                        }
                        total = total
                            .checked_add(e.len)
                            .ok_or_else(|| ctx("size overflow"))?;
                    }
                    if total != node.size {
                        return Err(ctx("extents do not add up to the size"));
                    }
                }
                NodeKind::Symlink { target } => {
                    if target.is_empty() || target.contains(&0) || node.size != target.len() as u64
                    {
                        return Err(ctx("bad symlink target"));
                    }
                }
                NodeKind::Hardlink { target } => match self.nodes.get(*target as usize) {
                    Some(t)
                        if !matches!(t.kind, NodeKind::Dir { .. } | NodeKind::Hardlink { .. })
                            && t.size == node.size => {}
                    _ => {
                        return Err(ctx(
                            "hardlink must name a non-directory entry of the same size",
                        ))
                    }
                },
                NodeKind::CharDev { .. }
                | NodeKind::BlockDev { .. }
                | NodeKind::Fifo
                | NodeKind::Socket => {}
            }
            let type_bits = match &node.kind {
                NodeKind::Hardlink { target } => self.nodes[*target as usize].mode & S_IFMT,
                kind => kind.type_bits().expect("only hardlinks borrow their type"),
            };
            if node.mode & S_IFMT != type_bits {
                return Err(ctx("mode type bits do not match the kind"));
            }
            let parent_is_dir = self
                .nodes
                .get(node.parent as usize)
                .is_some_and(Node::is_dir);
            if i != ROOT && !parent_is_dir {
                return Err(ctx("parent is not a directory"));
            }
        }
        if next as usize != n {
            return Err(invalid("nodes outside any directory".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
