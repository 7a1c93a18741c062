//! Folding recordings together, and carrying a profile to the next version
//! of its image.

use super::{FileRange, Profile, ProfileEntry, ProfileError, PROFILE_MAX_RANGES, PROFILE_MAX_RUNS};
use crate::{Digest, Manifest, NodeKind, ROOT};
use std::collections::HashMap;

/// A chunk's entry being merged: sums for the weighted means.
struct Acc {
    entry: ProfileEntry,
    /// Sum of weight x relative position (0..1) in each recording.
    rank_sum: f64,
    at_sum: f64,
    weight: f64,
    /// Where the chunk was first seen, to break ties stably.
    first_seen: usize,
}

impl Profile {
    /// Merges recordings of the same image into one profile: every chunk any
    /// of them touched, its read counts summed, its readahead flags or-ed, its
    /// file ranges joined, ordered by its mean relative position (weighted by
    /// how many recordings each input stands for) in the inputs that list it.
    pub fn merge(profiles: &[Profile]) -> Result<Profile, ProfileError> {
        let Some(first) = profiles.first() else {
            return Err(ProfileError::Invalid("nothing to merge".into()));
        };
        let mut runs = 0u32;
        let mut accs: Vec<Acc> = Vec::new();
        let mut index: HashMap<Digest, usize> = HashMap::new();
        for p in profiles {
            if p.manifest != first.manifest {
                return Err(ProfileError::OtherManifest {
                    expected: first.manifest,
                    got: p.manifest,
                });
            }
            runs = runs.saturating_add(p.runs);
            let n = p.entries.len().max(1) as f64;
            for (i, e) in p.entries.iter().enumerate() {
                // An entry stands for the recordings that read it (at least one).
                let weight = f64::from(e.reads.max(1));
                let rank = (i as f64 + 0.5) / n;
                let at = accs.len();
                let k = *index.entry(e.id).or_insert(at);
                if k == at {
                    accs.push(Acc {
                        entry: ProfileEntry {
                            ranges: Vec::new(),
                            reads: 0,
                            readahead: false,
                            ..e.clone()
                        },
                        rank_sum: 0.0,
                        at_sum: 0.0,
                        weight: 0.0,
                        first_seen: at,
                    });
                }
                let a = &mut accs[k];
                a.rank_sum += weight * rank;
                a.at_sum += weight * f64::from(e.at_ms);
                a.weight += weight;
                a.entry.reads = a.entry.reads.saturating_add(e.reads);
                a.entry.readahead |= e.readahead;
                a.entry.ranges.extend_from_slice(&e.ranges);
            }
        }
        if runs > PROFILE_MAX_RUNS {
            return Err(ProfileError::Invalid(format!(
                "{runs} recordings, more than a profile can merge ({PROFILE_MAX_RUNS})"
            )));
        }
        let mean = |a: &Acc| a.rank_sum / a.weight;
        accs.sort_by(|a, b| {
            mean(a)
                .total_cmp(&mean(b))
                .then(a.first_seen.cmp(&b.first_seen))
        });
        let mut room = PROFILE_MAX_RANGES;
        let entries = accs
            .into_iter()
            .map(|a| {
                let mut e = a.entry;
                e.at_ms = (a.at_sum / a.weight).round() as u32;
                e.ranges = join_ranges(std::mem::take(&mut e.ranges), e.len);
                // Ranges say what was read, for packing; past the cap, the
                // chunks still count.
                e.ranges.truncate(room);
                room -= e.ranges.len();
                e
            })
            .collect();
        Ok(Profile {
            manifest: first.manifest,
            runs,
            entries,
        })
    }

    /// This profile, recorded on `old`, for `new` (named `new_digest`), in
    /// the same order: an entry whose chunk `new` also holds is kept, with
    /// its file ranges mapped by path; an entry whose chunk `new` lacks (a
    /// file changed, or small files were packed anew) becomes the chunks of
    /// `new` that hold the same file ranges. Ranges of files `new` lacks are
    /// dropped, and of files it has shortened, cut. What a start of the old
    /// version read first is what a start of the new one will most likely
    /// read first.
    pub fn carry_to(&self, old: &Manifest, new: &Manifest, new_digest: Digest) -> Profile {
        let index: HashMap<Digest, u32> = new
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i as u32))
            .collect();
        let mut nodes: HashMap<u32, Option<(u32, u64)>> = HashMap::new();
        let mut map_range = |r: &FileRange| {
            let (node, size) = (*nodes.entry(r.node).or_insert_with(|| {
                let i = new.resolve(lookup_path(new, &old.path(r.node))?);
                match new.nodes[i as usize].kind {
                    NodeKind::File { .. } => Some((i, new.nodes[i as usize].size)),
                    _ => None,
                }
            }))?;
            let len = (r.offset + u64::from(r.len))
                .min(size)
                .checked_sub(r.offset)?;
            (len > 0).then_some(FileRange {
                node,
                offset: r.offset,
                len: len as u32,
            })
        };
        let mut out = Carried::default();
        for e in &self.entries {
            let ranges: Vec<FileRange> = e
                .ranges
                .iter()
                .filter(|r| (r.node as usize) < old.nodes.len())
                .filter_map(&mut map_range)
                .collect();
            match index.get(&e.id) {
                Some(&c) if new.chunks[c as usize].len == e.len => out.add(new, c, e, ranges),
                _ => {
                    for r in ranges {
                        for (c, piece) in chunks_holding(new, r) {
                            out.add(new, c, e, vec![piece]);
                        }
                    }
                }
            }
        }
        Profile {
            manifest: new_digest,
            runs: self.runs,
            entries: out.entries,
        }
    }
}

/// A carried profile being built: each chunk of the new manifest once, in
/// the order first reached.
#[derive(Default)]
struct Carried {
    entries: Vec<ProfileEntry>,
    at: HashMap<u32, usize>,
    ranges: usize,
}

impl Carried {
    /// Adds chunk `c` of `new` for old entry `e`, with `ranges` of it.
    fn add(&mut self, new: &Manifest, c: u32, e: &ProfileEntry, mut ranges: Vec<FileRange>) {
        ranges.truncate(PROFILE_MAX_RANGES - self.ranges);
        self.ranges += ranges.len();
        match self.at.get(&c) {
            Some(&i) => self.entries[i].ranges.extend(ranges),
            None => {
                self.at.insert(c, self.entries.len());
                let chunk = new.chunks[c as usize];
                self.entries.push(ProfileEntry {
                    id: chunk.id,
                    len: chunk.len,
                    ranges,
                    ..e.clone()
                });
            }
        }
    }
}

/// The chunks of `m` that hold the bytes of range `r` (of one of its
/// files), each with the part of `r` it holds.
fn chunks_holding(m: &Manifest, r: FileRange) -> Vec<(u32, FileRange)> {
    let (start, end) = (r.offset, r.offset + u64::from(r.len));
    let mut at = 0u64;
    let mut out = Vec::new();
    for e in m.file_extents(r.node) {
        let (from, to) = (at.max(start), (at + e.len).min(end));
        if let (Some(c), true) = (e.chunk, from < to) {
            let piece = FileRange {
                node: r.node,
                offset: from,
                len: (to - from) as u32,
            };
            out.push((c, piece));
        }
        at += e.len;
        if at >= end {
            break;
        }
    }
    out
}

/// The node at `/`-separated `path` (relative to the root).
fn lookup_path(m: &Manifest, path: &[u8]) -> Option<u32> {
    path.split(|&b| b == b'/')
        .try_fold(ROOT, |dir, name| m.lookup(dir, name))
}

/// Ranges of one chunk of `len` bytes with overlapping or touching ranges of
/// the same file joined, as long as a joined range fits the chunk (a file
/// that repeats a chunk reads it at two places); files in the order first
/// seen, each file's ranges by offset.
fn join_ranges(ranges: Vec<FileRange>, len: u32) -> Vec<FileRange> {
    let mut by_node: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    for r in ranges {
        let span = (r.offset, r.offset + u64::from(r.len));
        match by_node.iter_mut().find(|(n, _)| *n == r.node) {
            Some((_, spans)) => spans.push(span),
            None => by_node.push((r.node, vec![span])),
        }
    }
    let mut out = Vec::new();
    for (node, mut spans) in by_node {
        spans.sort_unstable();
        let mut cur = spans[0];
        for &(s, e) in &spans[1..] {
            if s <= cur.1 && e.max(cur.1) - cur.0 <= u64::from(len) {
                cur.1 = cur.1.max(e);
            } else {
                out.push(range(node, cur));
                cur = (s, e);
            }
        }
        out.push(range(node, cur));
    }
    out
}

fn range(node: u32, (start, end): (u64, u64)) -> FileRange {
    // Joined ranges stay within the chunk's length (< 4 GiB).
    FileRange {
        node,
        offset: start,
        len: (end - start) as u32,
    }
}
