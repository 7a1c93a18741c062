//! Recording what a start reads: the chunks in the order first touched,
//! whether readahead fetched them before a read asked, and the file ranges
//! read from them.
//!
//! Reads are recorded as the image core sees them, before any cache answers,
//! so a recording does not depend on what was cached; a read the kernel's page
//! cache answered never reaches the core, which is why recordings are made
//! from a cold attach.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use thaw_format::profile::PROFILE_MAX_RANGES;
use thaw_format::{Digest, FileRange, Manifest, Profile, ProfileEntry};

/// A recording in progress.
pub(crate) struct Recorder {
    started: Instant,
    inner: Mutex<Recording>,
}

#[derive(Default)]
struct Recording {
    /// Chunks in the order first touched.
    order: Vec<u32>,
    touched: HashMap<u32, Touch>,
    /// Ranges kept over all chunks (bounded by the format's limit).
    ranges: usize,
}

struct Touch {
    at_ms: u32,
    read: bool,
    readahead: bool,
    ranges: Vec<FileRange>,
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder {
            started: Instant::now(),
            inner: Mutex::new(Recording::default()),
        }
    }

    fn touch<'a>(&self, r: &'a mut Recording, chunk: u32) -> &'a mut Touch {
        let at_ms = self.started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
        r.touched.entry(chunk).or_insert_with(|| {
            r.order.push(chunk);
            Touch {
                at_ms,
                read: false,
                readahead: false,
                ranges: Vec::new(),
            }
        })
    }

    /// A read of file `node` asked for `len` bytes at file offset `offset`,
    /// which chunk `chunk` (of `chunk_len` bytes) holds.
    pub(crate) fn read(&self, chunk: u32, chunk_len: u32, node: u32, offset: u64, len: u64) {
        let mut r = self.inner.lock().expect("recording lock");
        let room = r.ranges < PROFILE_MAX_RANGES;
        let t = self.touch(&mut r, chunk);
        t.read = true;
        // A read goes on where the last one of this file stopped: one range
        // (unless the file holds the chunk twice, back to back).
        if let Some(last) = t.ranges.last_mut() {
            let end = last.offset + u64::from(last.len);
            if last.node == node
                && end == offset
                && u64::from(last.len) + len <= u64::from(chunk_len)
            {
                last.len += len as u32;
                return;
            }
        }
        if room {
            // Pieces of a read lie within one chunk, far below 4 GiB.
            t.ranges.push(FileRange {
                node,
                offset,
                len: len as u32,
            });
            r.ranges += 1;
        }
    }

    /// Readahead started fetching `chunk`, which nothing had read yet.
    pub(crate) fn readahead(&self, chunk: u32) {
        let mut r = self.inner.lock().expect("recording lock");
        let t = self.touch(&mut r, chunk);
        if !t.read {
            t.readahead = true;
        }
    }

    /// The recording so far as a profile of manifest `m`, named `digest`.
    pub(crate) fn profile(&self, digest: Digest, m: &Manifest) -> Profile {
        let r = self.inner.lock().expect("recording lock");
        let entries = r
            .order
            .iter()
            .map(|c| {
                let t = &r.touched[c];
                let chunk = m.chunks[*c as usize];
                ProfileEntry {
                    id: chunk.id,
                    len: chunk.len,
                    at_ms: t.at_ms,
                    reads: u16::from(t.read),
                    readahead: t.readahead,
                    ranges: t.ranges.clone(),
                }
            })
            .collect();
        let raw = Profile {
            manifest: digest,
            runs: 1,
            entries,
        };
        // Merging one recording keeps its order and joins its ranges.
        Profile::merge(&[raw]).expect("one recording of one manifest merges")
    }
}
