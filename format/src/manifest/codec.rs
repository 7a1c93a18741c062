//! Byte encoding of the manifest (layout in `docs/format.md`).
//!
//! Encoding writes fixed-size little-endian records followed by one string
//! table. Decoding reads the raw records with every count and offset bounded by
//! the input's length before anything is allocated, builds the typed
//! [`Manifest`], then runs [`Manifest::validate`].

use super::{ChunkRef, Extent, Manifest, ManifestError, Node, NodeKind, Xattr};
use crate::Digest;

/// Manifest magic.
pub const MANIFEST_MAGIC: [u8; 8] = *b"THAWMNF\0";
/// Manifest version written and read by this crate.
pub const MANIFEST_VERSION: u16 = 1;

const HEADER_LEN: usize = 64;
const CHUNK_REC: usize = 40;
const NODE_REC: usize = 64;
const EXTENT_REC: usize = 16;
const XATTR_REC: usize = 16;
const HOLE: u32 = u32::MAX;

const KIND_DIR: u8 = 1;
const KIND_FILE: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_HARDLINK: u8 = 4;
const KIND_CHARDEV: u8 = 5;
const KIND_BLOCKDEV: u8 = 6;
const KIND_FIFO: u8 = 7;
const KIND_SOCKET: u8 = 8;

struct Strings(Vec<u8>);

impl Strings {
    fn add(&mut self, s: &[u8]) -> (u32, u32) {
        let off = self.0.len() as u32;
        self.0.extend_from_slice(s);
        (off, s.len() as u32)
    }
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

impl Manifest {
    /// The canonical encoding. Equal manifests encode to equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut strings = Strings(Vec::new());
        let mut out = Vec::with_capacity(
            HEADER_LEN
                + self.chunks.len() * CHUNK_REC
                + self.nodes.len() * (NODE_REC + 24)
                + self.extents.len() * EXTENT_REC,
        );
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        put32(&mut out, self.chunk_size);
        put32(&mut out, self.chunks.len() as u32);
        put32(&mut out, self.nodes.len() as u32);
        put32(&mut out, self.extents.len() as u32);
        put32(&mut out, self.xattrs.len() as u32);
        let strings_len_at = out.len();
        put64(&mut out, 0); // strings length, patched below
        out.resize(HEADER_LEN, 0);

        for c in &self.chunks {
            out.extend_from_slice(&c.id.0);
            put32(&mut out, c.len);
            put32(&mut out, 0); // reserved
        }
        for n in &self.nodes {
            let (kind, a, b, rdev) = match &n.kind {
                NodeKind::Dir { children } => {
                    (KIND_DIR, children.start, children.end - children.start, 0)
                }
                NodeKind::File { extents } => {
                    (KIND_FILE, extents.start, extents.end - extents.start, 0)
                }
                NodeKind::Symlink { target } => {
                    let (o, l) = strings.add(target);
                    (KIND_SYMLINK, o, l, 0)
                }
                NodeKind::Hardlink { target } => (KIND_HARDLINK, *target, 0, 0),
                NodeKind::CharDev { rdev } => (KIND_CHARDEV, 0, 0, *rdev),
                NodeKind::BlockDev { rdev } => (KIND_BLOCKDEV, 0, 0, *rdev),
                NodeKind::Fifo => (KIND_FIFO, 0, 0, 0),
                NodeKind::Socket => (KIND_SOCKET, 0, 0, 0),
            };
            let (a, b) = if rdev != 0 {
                (rdev as u32, (rdev >> 32) as u32)
            } else {
                (a, b)
            };
            let (name_off, name_len) = strings.add(&n.name);
            put32(&mut out, n.parent);
            out.extend_from_slice(&[kind, 0, 0, 0]);
            put32(&mut out, n.mode);
            put32(&mut out, n.uid);
            put32(&mut out, n.gid);
            put32(&mut out, n.xattrs.end - n.xattrs.start);
            out.extend_from_slice(&n.mtime_ns.to_le_bytes());
            put64(&mut out, n.size);
            put32(&mut out, name_off);
            put32(&mut out, name_len);
            put32(&mut out, a);
            put32(&mut out, b);
            put32(&mut out, n.xattrs.start);
            put32(&mut out, 0);
        }
        for e in &self.extents {
            put32(&mut out, e.chunk.unwrap_or(HOLE));
            put32(&mut out, e.offset);
            put64(&mut out, e.len);
        }
        for x in &self.xattrs {
            let (no, nl) = strings.add(&x.name);
            let (vo, vl) = strings.add(&x.value);
            for v in [no, nl, vo, vl] {
                put32(&mut out, v);
            }
        }
        let strings_len = strings.0.len() as u64;
        out[strings_len_at..strings_len_at + 8].copy_from_slice(&strings_len.to_le_bytes());
        out.extend_from_slice(&strings.0);
        out
    }

    /// Decodes and validates a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let mut r = Reader { bytes, pos: 0 };
        let header = r.take(HEADER_LEN, "header")?;
        if header[0..8] != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let h = Reader {
            bytes: header,
            pos: 8,
        };
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([header[10], header[11]]);
        if flags != 0 {
            return Err(ManifestError::UnknownFlags(flags));
        }
        let chunk_size = h.u32_at(12);
        let counts = [h.u32_at(16), h.u32_at(20), h.u32_at(24), h.u32_at(28)].map(|c| c as usize);
        let [n_chunks, n_nodes, n_extents, n_xattrs] = counts;
        let strings_len = h.u64_at(32);
        if header[40..].iter().any(|&b| b != 0) {
            return Err(ManifestError::Invalid(
                "reserved header bytes are not zero".into(),
            ));
        }
        // Bound every count by what the input can hold before allocating.
        let need = (n_chunks as u128) * CHUNK_REC as u128
            + (n_nodes as u128) * NODE_REC as u128
            + (n_extents as u128) * EXTENT_REC as u128
            + (n_xattrs as u128) * XATTR_REC as u128
            + strings_len as u128;
        let have = (bytes.len() - HEADER_LEN) as u128;
        if need > have {
            return Err(ManifestError::Truncated("sections longer than the input"));
        }
        if need < have {
            return Err(ManifestError::TrailingBytes((have - need) as usize));
        }
        let chunk_recs = r.take(n_chunks * CHUNK_REC, "chunks")?;
        let node_recs = r.take(n_nodes * NODE_REC, "nodes")?;
        let extent_recs = r.take(n_extents * EXTENT_REC, "extents")?;
        let xattr_recs = r.take(n_xattrs * XATTR_REC, "xattrs")?;
        let strings = r.take(strings_len as usize, "strings")?;
        let string = |off: u32, len: u32| -> Result<Vec<u8>, ManifestError> {
            let (off, len) = (off as usize, len as usize);
            strings
                .get(
                    off..off
                        .checked_add(len)
                        .ok_or(ManifestError::Truncated("string"))?,
                )
                .map(<[u8]>::to_vec)
                .ok_or(ManifestError::Truncated("string out of bounds"))
        };

        let mut chunks = Vec::with_capacity(n_chunks);
        for (i, c) in chunk_recs.chunks_exact(CHUNK_REC).enumerate() {
            let r = Reader { bytes: c, pos: 0 };
            if r.u32_at(36) != 0 {
                return Err(ManifestError::Invalid(format!(
                    "chunk {i}: reserved bytes are not zero"
                )));
            }
            chunks.push(ChunkRef {
                id: Digest(c[..32].try_into().expect("32 bytes")),
                len: r.u32_at(32),
            });
        }
        let mut nodes = Vec::with_capacity(n_nodes);
        for (i, rec) in node_recs.chunks_exact(NODE_REC).enumerate() {
            let r = Reader { bytes: rec, pos: 0 };
            let (a, b) = (r.u32_at(48), r.u32_at(52));
            let rdev = u64::from(a) | (u64::from(b) << 32);
            let range = || -> Result<std::ops::Range<u32>, ManifestError> {
                let end = a
                    .checked_add(b)
                    .ok_or_else(|| ManifestError::Invalid(format!("node {i}: range overflow")))?;
                Ok(a..end)
            };
            let kind = match rec[4] {
                KIND_DIR => NodeKind::Dir { children: range()? },
                KIND_FILE => NodeKind::File { extents: range()? },
                KIND_SYMLINK => NodeKind::Symlink {
                    target: string(a, b)?,
                },
                KIND_HARDLINK if b == 0 => NodeKind::Hardlink { target: a },
                KIND_CHARDEV => NodeKind::CharDev { rdev },
                KIND_BLOCKDEV => NodeKind::BlockDev { rdev },
                KIND_FIFO if rdev == 0 => NodeKind::Fifo,
                KIND_SOCKET if rdev == 0 => NodeKind::Socket,
                // One encoding per manifest: fields a kind does not use are zero.
                KIND_HARDLINK | KIND_FIFO | KIND_SOCKET => {
                    return Err(ManifestError::Invalid(format!(
                        "node {i}: unused fields are not zero"
                    )))
                }
                k => {
                    return Err(ManifestError::Invalid(format!(
                        "node {i}: unknown kind {k}"
                    )))
                }
            };
            if rec[5..8] != [0, 0, 0] || r.u32_at(60) != 0 {
                return Err(ManifestError::Invalid(format!(
                    "node {i}: reserved bytes are not zero"
                )));
            }
            let xattr_start = r.u32_at(56);
            let xattr_end = xattr_start
                .checked_add(r.u32_at(20))
                .ok_or_else(|| ManifestError::Invalid(format!("node {i}: xattr range overflow")))?;
            nodes.push(Node {
                parent: r.u32_at(0),
                name: string(r.u32_at(40), r.u32_at(44))?,
                kind,
                mode: r.u32_at(8),
                uid: r.u32_at(12),
                gid: r.u32_at(16),
                mtime_ns: r.u64_at(24) as i64,
                size: r.u64_at(32),
                xattrs: xattr_start..xattr_end,
            });
        }
        let extents = extent_recs
            .chunks_exact(EXTENT_REC)
            .map(|e| {
                let r = Reader { bytes: e, pos: 0 };
                let chunk = r.u32_at(0);
                Extent {
                    chunk: (chunk != HOLE).then_some(chunk),
                    offset: r.u32_at(4),
                    len: r.u64_at(8),
                }
            })
            .collect();
        let xattrs = xattr_recs
            .chunks_exact(XATTR_REC)
            .map(|x| {
                let r = Reader { bytes: x, pos: 0 };
                Ok(Xattr {
                    name: string(r.u32_at(0), r.u32_at(4))?,
                    value: string(r.u32_at(8), r.u32_at(12))?,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        let m = Manifest {
            chunk_size,
            chunks,
            nodes,
            extents,
            xattrs,
        };
        m.validate()?;
        // One encoding per manifest, so one digest per tree: the string table
        // may only be laid out as the encoder lays it out.
        if m.encode() != bytes {
            return Err(ManifestError::Invalid(
                "not in canonical form (the encoder would lay it out differently)".into(),
            ));
        }
        Ok(m)
    }

    /// Decodes a manifest and checks that its bytes hash to `digest`.
    pub fn decode_verified(bytes: &[u8], digest: &Digest) -> Result<Manifest, ManifestError> {
        let actual = Digest::of(bytes);
        if actual != *digest {
            return Err(ManifestError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Manifest::decode(bytes)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], ManifestError> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(ManifestError::Truncated(what))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(ManifestError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }
}
