//! What to fetch before it is asked for: sequential readahead, and what a
//! cold miss says about the reads that follow it at startup.
//!
//! - A reader that keeps reading where it stopped is a stream: fetch a quarter
//!   as far ahead as it has read back to back (so the window grows with the
//!   run, up to a maximum), and a reader that stops leaves little fetched in
//!   vain. A random read resets the run.
//! - A miss on a small file (a shared library, a config) fetches all its chunks
//!   at once: it is usually read whole, and one fault at a time would wait a
//!   round trip each.
//! - A miss on a pack of small files fetches the next pack: the next modules of
//!   the same package, in tree order.
//!
//! All of it is readahead: fetched at background priority, never ahead of a
//! blocked reader.

use super::fetch::Fetcher;
use super::layout::Layout;
use super::profile::Recorder;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use thaw_format::{Manifest, NodeKind};

/// A file with at most this many chunks is fetched whole on its first miss.
pub(crate) const SMALL_FILE_CHUNKS: usize = 8;

/// Per-file sequential read detection.
#[derive(Debug, Clone, Copy, Default)]
struct ReadState {
    /// Where the next read starts if the reader is sequential.
    next: u64,
    /// Bytes read back to back so far.
    run: u64,
}

/// The prefetch policy of one image.
pub(crate) struct Prefetch {
    states: Mutex<HashMap<u32, ReadState>>,
    /// Largest readahead window; 0 turns prefetching off.
    max: u64,
    /// Told what readahead fetches, when recording a profile.
    recorder: Option<Arc<Recorder>>,
}

impl Prefetch {
    pub(crate) fn new(max: u64, recorder: Option<Arc<Recorder>>) -> Prefetch {
        Prefetch {
            states: Mutex::new(HashMap::new()),
            max,
            recorder,
        }
    }

    /// Starts fetching `chunk` at background priority.
    fn ahead(&self, f: &Arc<Fetcher>, chunk: u32) {
        if let (true, Some(r)) = (f.prefetch(chunk), &self.recorder) {
            r.readahead(chunk);
        }
    }

    /// Called for each chunk of a read that is neither cached nor pending.
    pub(crate) fn on_miss(
        &self,
        m: &Manifest,
        l: &Layout,
        f: &Arc<Fetcher>,
        file: u32,
        chunk: u32,
    ) {
        if self.max == 0 {
            return;
        }
        if l.packed[chunk as usize] {
            if let Some(true) = l.packed.get(chunk as usize + 1) {
                self.ahead(f, chunk + 1);
            }
            return;
        }
        let chunks: Vec<u32> = m
            .file_extents(file)
            .iter()
            .filter_map(|e| e.chunk)
            .collect();
        if chunks.len() > 1 && chunks.len() <= SMALL_FILE_CHUNKS {
            for c in chunks.into_iter().filter(|&c| c != chunk) {
                self.ahead(f, c);
            }
        }
    }

    /// Called for every read of `[offset, end)` of `file`.
    pub(crate) fn on_read(
        &self,
        m: &Manifest,
        l: &Layout,
        f: &Arc<Fetcher>,
        file: u32,
        offset: u64,
        end: u64,
    ) {
        let window = self.window(m.chunk_size, file, offset, end);
        if window == 0 {
            return;
        }
        let NodeKind::File { extents } = &m.nodes[file as usize].kind else {
            return;
        };
        let stop = end + window;
        for e in extents.start as usize..extents.end as usize {
            let start = l.extent_starts[e];
            if start >= stop {
                break;
            }
            let ext = &m.extents[e];
            if start + ext.len > end {
                if let Some(c) = ext.chunk {
                    self.ahead(f, c);
                }
            }
        }
    }

    /// How far past `end` to fetch for this read.
    fn window(&self, chunk_size: u32, file: u32, offset: u64, end: u64) -> u64 {
        if self.max == 0 {
            return 0;
        }
        let chunk = u64::from(chunk_size);
        let mut states = self.states.lock().expect("readahead lock");
        let st = states.entry(file).or_default();
        st.run = if offset == st.next {
            st.run + (end - offset)
        } else {
            end - offset
        };
        st.next = end;
        // A run longer than two chunks is a stream, not one large random read
        // (a page fault's readahead, one tensor).
        if st.run > 2 * chunk {
            (st.run / 4).clamp(chunk, self.max.max(chunk))
        } else {
            0
        }
    }
}
