//! Working-set profiles: what a start of an image read, in the order it read
//! it, so that the next cold start can fetch it before it asks.
//!
//! A profile names the manifest it was recorded on and lists chunks in the
//! order a start first touched them, each with how many of the merged
//! recordings read it, whether readahead fetched it before a read asked, when
//! it was first touched, and the file ranges that were read from it (node
//! indices of that manifest). Replay streams the *working set*: the entries
//! read in at least half of the recordings ([`Profile::working_set`]).
//!
//! Recordings of the same start are merged ([`Profile::merge`]): the union of
//! their chunks with their read counts summed, ordered by the mean of each
//! chunk's relative position in the recordings that touched it. Keeping the
//! union (with counts) rather than dropping what few runs touched makes the
//! merge exact however many recordings are folded in, one at a time.
//!
//! A profile recorded on one version of an image helps the next through the
//! chunks they share: [`Profile::carry_to`] keeps the entries whose chunks the
//! new manifest also holds and maps their file ranges by path.
//!
//! The encoding (byte layout in `docs/format.md`) ends with a BLAKE3 digest of
//! everything before it, so a damaged profile is refused, never half-used.

mod merge;
#[cfg(test)]
mod tests;

use crate::frame::MAX_CHUNK_LEN;
use crate::sealed::{seal, unseal, Reader, Unsealed, TRAILER_LEN};
use crate::{Digest, Manifest, NodeKind};
use std::collections::HashSet;

/// `THAWPRF\0`: the first bytes of every profile.
pub const PROFILE_MAGIC: [u8; 8] = *b"THAWPRF\0";
pub const PROFILE_VERSION: u16 = 1;
/// Most entries a profile may hold (a million chunks: a terabyte at 1 MiB).
pub const PROFILE_MAX_ENTRIES: usize = 1 << 20;
/// Most file ranges a profile may hold, over all entries.
pub const PROFILE_MAX_RANGES: usize = 1 << 20;
/// Most recordings a profile may merge (an entry's read count is a `u16`).
pub const PROFILE_MAX_RUNS: u32 = u16::MAX as u32;

const HEADER_LEN: usize = 64;
const ENTRY_LEN: usize = 48;
const RANGE_LEN: usize = 16;
/// Largest encoding of a profile: the most entries and ranges there can be.
pub const PROFILE_MAX_LEN: usize =
    HEADER_LEN + ENTRY_LEN * PROFILE_MAX_ENTRIES + RANGE_LEN * PROFILE_MAX_RANGES + TRAILER_LEN;

/// Entry flag: readahead fetched the chunk before a read asked for it.
const FLAG_READAHEAD: u8 = 1;

/// A recorded working set of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The manifest it was recorded on (node indices in ranges are its).
    pub manifest: Digest,
    /// How many recordings were merged into it (at least 1).
    pub runs: u32,
    /// Chunks in the order first touched.
    pub entries: Vec<ProfileEntry>,
}

/// One chunk a start touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEntry {
    pub id: Digest,
    /// Uncompressed length, as in the manifest.
    pub len: u32,
    /// Milliseconds from the start of the recording to the first touch
    /// (the mean over the recordings that touched it).
    pub at_ms: u32,
    /// Recordings in which a read touched it; 0 when only readahead
    /// fetched it.
    pub reads: u16,
    /// Readahead fetched it before a read asked, in some recording.
    pub readahead: bool,
    /// The file ranges read from it.
    pub ranges: Vec<FileRange>,
}

/// Bytes of one file that were read from one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange {
    /// A regular file of the profile's manifest.
    pub node: u32,
    /// Where the bytes start in the file.
    pub offset: u64,
    pub len: u32,
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("not a thaw profile (bad magic)")]
    BadMagic,
    #[error("profile version {0} is not supported (this build reads version {PROFILE_VERSION})")]
    UnsupportedVersion(u16),
    #[error("profile has unknown flags {0:#x}")]
    UnknownFlags(u16),
    #[error("profile is truncated or has trailing bytes")]
    Length,
    #[error("profile is damaged (checksum mismatch)")]
    Checksum,
    #[error("profile has non-zero reserved bytes")]
    Reserved,
    #[error("profile is invalid: {0}")]
    Invalid(String),
    #[error("profile is for manifest {got}, not {expected}")]
    OtherManifest { expected: Digest, got: Digest },
}

fn invalid(msg: impl Into<String>) -> ProfileError {
    ProfileError::Invalid(msg.into())
}

impl Profile {
    /// The entries a replay streams, in order: those read in at least half
    /// of the recordings. A chunk one of two runs needed is more likely worth
    /// fetching early than a round trip later.
    pub fn working_set(&self) -> impl Iterator<Item = &ProfileEntry> {
        let runs = self.runs;
        self.entries
            .iter()
            .filter(move |e| e.reads > 0 && u32::from(e.reads) * 2 >= runs)
    }

    /// The files the working set read (nodes of the profile's manifest),
    /// each once, in the order first read.
    pub fn files_in_read_order(&self) -> Vec<u32> {
        let mut seen = HashSet::new();
        self.working_set()
            .flat_map(|e| &e.ranges)
            .map(|r| r.node)
            .filter(|n| seen.insert(*n))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let ranges: usize = self.entries.iter().map(|e| e.ranges.len()).sum();
        let len = HEADER_LEN + ENTRY_LEN * self.entries.len() + RANGE_LEN * ranges + TRAILER_LEN;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&PROFILE_MAGIC);
        out.extend_from_slice(&PROFILE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&0u32.to_le_bytes()); // reserved
        out.extend_from_slice(&self.manifest.0);
        out.extend_from_slice(&self.runs.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(ranges as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // reserved
        for e in &self.entries {
            out.extend_from_slice(&e.id.0);
            out.extend_from_slice(&e.len.to_le_bytes());
            out.extend_from_slice(&e.at_ms.to_le_bytes());
            out.extend_from_slice(&(e.ranges.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.reads.to_le_bytes());
            out.push(if e.readahead { FLAG_READAHEAD } else { 0 });
            out.push(0); // reserved
        }
        for r in self.entries.iter().flat_map(|e| &e.ranges) {
            out.extend_from_slice(&r.node.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&r.offset.to_le_bytes());
        }
        seal(&mut out);
        out
    }

    /// Decodes and checks a profile on its own; [`Profile::check_against`]
    /// checks it against the manifest it names.
    pub fn decode(bytes: &[u8]) -> Result<Profile, ProfileError> {
        let body =
            unseal(bytes, &PROFILE_MAGIC, HEADER_LEN, PROFILE_VERSION).map_err(|e| match e {
                Unsealed::BadMagic => ProfileError::BadMagic,
                Unsealed::Length => ProfileError::Length,
                Unsealed::Version(v) => ProfileError::UnsupportedVersion(v),
                Unsealed::Checksum => ProfileError::Checksum,
            })?;
        let mut r = Reader(body);
        let flags = r.u16();
        if flags != 0 {
            return Err(ProfileError::UnknownFlags(flags));
        }
        if r.u32() != 0 {
            return Err(ProfileError::Reserved);
        }
        let manifest = Digest(r.take::<32>());
        let runs = r.u32();
        let (entry_count, range_count) = (r.u32() as usize, r.u32() as usize);
        if r.u32() != 0 {
            return Err(ProfileError::Reserved);
        }
        if runs == 0 || runs > PROFILE_MAX_RUNS {
            return Err(invalid(format!("{runs} recordings merged")));
        }
        if entry_count > PROFILE_MAX_ENTRIES || range_count > PROFILE_MAX_RANGES {
            return Err(invalid(format!(
                "{entry_count} entries and {range_count} ranges, more than a profile holds"
            )));
        }
        // Counts are bounded above, so this cannot overflow.
        if r.0.len() != ENTRY_LEN * entry_count + RANGE_LEN * range_count {
            return Err(ProfileError::Length);
        }
        let mut entries = Vec::with_capacity(entry_count);
        let mut counts = Vec::with_capacity(entry_count);
        let mut seen = HashSet::with_capacity(entry_count);
        for _ in 0..entry_count {
            let id = Digest(r.take::<32>());
            let (len, at_ms, ranges, reads) = (r.u32(), r.u32(), r.u32() as usize, r.u16());
            let [flags, reserved] = r.take::<2>();
            if reserved != 0 {
                return Err(ProfileError::Reserved);
            }
            if flags & !FLAG_READAHEAD != 0 {
                return Err(invalid(format!("entry {id} has unknown flags {flags:#x}")));
            }
            if len == 0 || len as usize > MAX_CHUNK_LEN {
                return Err(invalid(format!("entry {id} has length {len}")));
            }
            if u32::from(reads) > runs {
                return Err(invalid(format!(
                    "entry {id} was read in {reads} of {runs} recordings"
                )));
            }
            if !seen.insert(id) {
                return Err(invalid(format!("chunk {id} is listed twice")));
            }
            counts.push(ranges);
            entries.push(ProfileEntry {
                id,
                len,
                at_ms,
                reads,
                readahead: flags & FLAG_READAHEAD != 0,
                ranges: Vec::new(),
            });
        }
        if counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)) != Some(range_count) {
            return Err(invalid("entries' range counts do not add up to the ranges"));
        }
        for (e, count) in entries.iter_mut().zip(counts) {
            e.ranges.reserve_exact(count);
            for _ in 0..count {
                let (node, len, offset) = (r.u32(), r.u32(), r.u64());
                if len == 0 || len > e.len || offset.checked_add(u64::from(len)).is_none() {
                    return Err(invalid(format!(
                        "a range of chunk {} is out of bounds",
                        e.id
                    )));
                }
                e.ranges.push(FileRange { node, offset, len });
            }
        }
        Ok(Profile {
            manifest,
            runs,
            entries,
        })
    }

    /// Checks that the profile fits manifest `m` (named `digest`): it names
    /// it, every chunk is one of its chunks with its length, and every range
    /// lies within one of its regular files.
    pub fn check_against(&self, digest: &Digest, m: &Manifest) -> Result<(), ProfileError> {
        if self.manifest != *digest {
            return Err(ProfileError::OtherManifest {
                expected: *digest,
                got: self.manifest,
            });
        }
        let lens: std::collections::HashMap<Digest, u32> =
            m.chunks.iter().map(|c| (c.id, c.len)).collect();
        for e in &self.entries {
            match lens.get(&e.id) {
                Some(&len) if len == e.len => {}
                Some(&len) => {
                    return Err(invalid(format!(
                        "chunk {} is {} bytes in the profile but {len} in the manifest",
                        e.id, e.len
                    )))
                }
                None => return Err(invalid(format!("chunk {} is not in the image", e.id))),
            }
            for r in &e.ranges {
                let size = match m.nodes.get(r.node as usize).map(|n| (&n.kind, n.size)) {
                    Some((NodeKind::File { .. }, size)) => size,
                    _ => return Err(invalid(format!("node {} is not a file", r.node))),
                };
                if r.offset + u64::from(r.len) > size {
                    return Err(invalid(format!(
                        "a range of node {} is past its end",
                        r.node
                    )));
                }
            }
        }
        Ok(())
    }
}
