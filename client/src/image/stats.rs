//! Counters of one image instance and fetch latency percentiles. They belong
//! to the image, not to a door onto it: a FUSE mount, a virtio-fs backend and
//! a restored VM report the same figures, and the door only adds where it is
//! attached ([`StatsReport::transport`], [`StatsReport::attached_at`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latencies kept for percentiles (the most recent ones).
const LATENCY_SAMPLES: usize = 8192;

/// Counters of one image instance. All are monotonic except the cache sizes.
#[derive(Debug, Default)]
pub struct Stats {
    /// Names looked up and files opened through a door (a kernel that
    /// remembers absent names and opens without a message asks less).
    pub lookups: AtomicU64,
    pub opens: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Bytes a door handed to the kernel's page cache before they were read
    /// (FUSE's page cache push), in how many messages.
    pub pushes: AtomicU64,
    pub pushed_bytes: AtomicU64,
    /// Chunk lookups answered from the in-memory cache.
    pub mem_hits: AtomicU64,
    /// Chunk lookups answered from the disk cache.
    pub disk_hits: AtomicU64,
    /// Small reads answered from the disk cache by reading and verifying
    /// only the part of a chunk they cover.
    pub disk_slice_hits: AtomicU64,
    /// Lookups that joined a fetch already in flight.
    pub joined: AtomicU64,
    /// Chunks fetched over the network, and their frame bytes.
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// The verified chunks' own (uncompressed) bytes.
    pub chunk_bytes_fetched: AtomicU64,
    /// Of those, fetched by readahead rather than on demand.
    pub prefetched: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub digest_mismatches: AtomicU64,
    pub disk_corrupt: AtomicU64,
    pub disk_write_errors: AtomicU64,
    pub disk_evicted: AtomicU64,
    pub mem_cache_bytes: AtomicU64,
    /// The profile's working set to stream: chunks and their bytes.
    pub profile_chunks: AtomicU64,
    pub profile_bytes: AtomicU64,
    /// Batch requests the stream made, the chunks they brought and their
    /// frame bytes (also counted in `chunks_fetched` and `bytes_fetched`).
    pub profile_batches: AtomicU64,
    pub profile_chunks_streamed: AtomicU64,
    pub profile_bytes_streamed: AtomicU64,
    /// Chunks of the working set the stream loaded from the disk cache.
    pub profile_chunks_loaded: AtomicU64,
    /// Chunks a reader waited for that the stream did not bring, fetched alone.
    pub profile_fallbacks: AtomicU64,
    /// How long the stream ran, in microseconds.
    pub profile_stream_us: AtomicU64,
    /// What became of the profile (see [`StatsReport::profile`]).
    profile: Mutex<String>,
    /// Where the streamed profile came from (see [`StatsReport::profile_source`]).
    profile_source: Mutex<&'static str>,
    /// Why the last read that failed did (see [`StatsReport::last_error`]).
    last_error: Mutex<String>,
    latencies_us: Mutex<Vec<u32>>,
    latency_next: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        add(c, 1);
    }

    pub fn add_to(c: &AtomicU64, n: u64) {
        add(c, n);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        add(c, n);
    }

    /// Sets a gauge.
    pub fn set(c: &AtomicU64, n: u64) {
        c.store(n, Ordering::Relaxed);
    }

    /// Says what became of the profile.
    pub fn set_profile(&self, state: impl Into<String>) {
        *self.profile.lock().expect("stats lock") = state.into();
    }

    /// Says where the streamed profile came from.
    pub fn set_profile_source(&self, source: &'static str) {
        *self.profile_source.lock().expect("stats lock") = source;
    }

    /// Records why a read failed.
    pub fn set_last_error(&self, why: impl Into<String>) {
        *self.last_error.lock().expect("stats lock") = why.into();
    }

    /// Records one batch of the profile's stream.
    pub fn record_batch(&self, chunks: u64, bytes: u64) {
        add(&self.chunks_fetched, chunks);
        add(&self.bytes_fetched, bytes);
        add(&self.profile_batches, 1);
        add(&self.profile_chunks_streamed, chunks);
        add(&self.profile_bytes_streamed, bytes);
    }

    /// Records the latency of one network fetch.
    pub fn record_fetch(&self, took: Duration, bytes: u64, prefetch: bool) {
        add(&self.chunks_fetched, 1);
        add(&self.bytes_fetched, bytes);
        if prefetch {
            add(&self.prefetched, 1);
        }
        let us = took.as_micros().min(u128::from(u32::MAX)) as u32;
        let slot = self.latency_next.fetch_add(1, Ordering::Relaxed) as usize % LATENCY_SAMPLES;
        let mut l = self.latencies_us.lock().expect("stats lock");
        if l.len() < LATENCY_SAMPLES {
            l.push(us);
        } else {
            l[slot] = us;
        }
    }

    /// A snapshot for `thaw stats`.
    pub fn report(&self) -> StatsReport {
        let mut l = self.latencies_us.lock().expect("stats lock").clone();
        l.sort_unstable();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() - 1) as f64 * p).round() as usize;
            f64::from(l[i]) / 1000.0
        };
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsReport {
            reads: g(&self.reads),
            read_bytes: g(&self.read_bytes),
            mem_hits: g(&self.mem_hits),
            disk_hits: g(&self.disk_hits),
            disk_slice_hits: g(&self.disk_slice_hits),
            joined: g(&self.joined),
            chunks_fetched: g(&self.chunks_fetched),
            bytes_fetched: g(&self.bytes_fetched),
            chunk_bytes_fetched: g(&self.chunk_bytes_fetched),
            prefetched: g(&self.prefetched),
            fetch_errors: g(&self.fetch_errors),
            digest_mismatches: g(&self.digest_mismatches),
            disk_corrupt: g(&self.disk_corrupt),
            disk_write_errors: g(&self.disk_write_errors),
            disk_evicted: g(&self.disk_evicted),
            mem_cache_bytes: g(&self.mem_cache_bytes),
            lookups: g(&self.lookups),
            opens: g(&self.opens),
            pushes: g(&self.pushes),
            pushed_bytes: g(&self.pushed_bytes),
            profile: self.profile.lock().expect("stats lock").clone(),
            profile_source: (*self.profile_source.lock().expect("stats lock")).to_owned(),
            last_error: self.last_error.lock().expect("stats lock").clone(),
            profile_chunks: g(&self.profile_chunks),
            profile_bytes: g(&self.profile_bytes),
            profile_batches: g(&self.profile_batches),
            profile_chunks_streamed: g(&self.profile_chunks_streamed),
            profile_bytes_streamed: g(&self.profile_bytes_streamed),
            profile_chunks_loaded: g(&self.profile_chunks_loaded),
            profile_fallbacks: g(&self.profile_fallbacks),
            profile_stream_ms: g(&self.profile_stream_us) as f64 / 1000.0,
            fetch_ms_p50: pct(0.5),
            fetch_ms_p90: pct(0.9),
            fetch_ms_p99: pct(0.99),
            fetch_ms_max: pct(1.0),
            pid: std::process::id(),
            peak_rss_bytes: peak_rss(),
            ..Default::default()
        }
    }
}

/// What `thaw stats --json` prints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StatsReport {
    pub image: String,
    pub manifest: String,
    /// The door the image is served through (`fuse`, `virtiofs`).
    pub transport: String,
    /// Where that door is: a mountpoint, a socket path.
    pub attached_at: String,
    pub image_bytes: u64,
    pub image_chunks: u64,
    /// The chunk server requests go to now, and how many times they moved
    /// on to another (`--server`) since the image was opened.
    #[serde(default)]
    pub server: String,
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub lookups: u64,
    #[serde(default)]
    pub opens: u64,
    pub reads: u64,
    pub read_bytes: u64,
    /// Bytes handed to the kernel's page cache ahead of reads (FUSE), and
    /// in how many messages: reads of them never reach the image.
    #[serde(default)]
    pub pushes: u64,
    #[serde(default)]
    pub pushed_bytes: u64,
    pub mem_hits: u64,
    pub disk_hits: u64,
    #[serde(default)]
    pub disk_slice_hits: u64,
    pub joined: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    #[serde(default)]
    pub chunk_bytes_fetched: u64,
    pub prefetched: u64,
    pub fetch_errors: u64,
    pub digest_mismatches: u64,
    pub disk_corrupt: u64,
    pub disk_write_errors: u64,
    pub disk_evicted: u64,
    pub mem_cache_bytes: u64,
    /// Why the last read that failed did (a chunk not on the server, one
    /// that did not match its digest, a server that did not answer within
    /// the fetch timeout); empty if none has failed. A restored VM that
    /// stopped on a read of its memory says why here.
    #[serde(default)]
    pub last_error: String,
    /// What became of the image's profile: `none` (none stored), `off`
    /// (`--no-profile`), `streaming`, `done`, `stopped: <why>` (the cache
    /// budget, a failed request), `refused: <why>` (damaged, or for another
    /// image), `unavailable: <why>` (it could not be fetched).
    pub profile: String,
    /// Where the streamed profile came from: `server` (the image's, recorded
    /// by `--record` anywhere), `local` (what the last attach on this host
    /// read, kept in the disk cache), or empty when none streams.
    #[serde(default)]
    pub profile_source: String,
    pub profile_chunks: u64,
    pub profile_bytes: u64,
    pub profile_batches: u64,
    pub profile_chunks_streamed: u64,
    pub profile_bytes_streamed: u64,
    pub profile_chunks_loaded: u64,
    pub profile_fallbacks: u64,
    /// How long the stream ran (until it ended, or so far).
    pub profile_stream_ms: f64,
    pub fetch_ms_p50: f64,
    pub fetch_ms_p90: f64,
    pub fetch_ms_p99: f64,
    pub fetch_ms_max: f64,
    /// The serving process's pid and peak resident memory.
    pub pid: u32,
    pub peak_rss_bytes: u64,
}

/// VmHWM of this process, from /proc.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}
