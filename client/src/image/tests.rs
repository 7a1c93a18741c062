//! The image core driven in-process: a real push to an in-process server cuts
//! the tree (so chunking and packing are the real ones), then the frames move
//! into a [`MemorySource`] that counts requests and misbehaves on demand, and
//! [`ImageFs`] reads through it with no server and no kernel.

use super::disk_cache::{DiskCache, Lookup};
use super::fetch::{FetchError, Priority};
use super::fs::{FsError, ImageFs};
use super::source::MemorySource;
use super::stats::Stats;
use super::{build_fs, ImageOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thaw_format::{Digest, Manifest, ROOT};
use thaw_testkit::noise;

mod profile;

const MIB: usize = 1 << 20;

/// An image of `files` (path, bytes), its manifest and its source.
struct TestImage {
    fs: Arc<ImageFs>,
    m: Manifest,
    source: Arc<MemorySource>,
    _cache: tempfile::TempDir,
}

/// Pushes `files` to an in-process server and returns the manifest and a
/// source holding every frame.
async fn pushed(files: &[(&str, Vec<u8>)]) -> (Manifest, Arc<MemorySource>) {
    let dir = tempfile::tempdir().unwrap();
    for (path, data) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let server = crate::testing::TestServer::start().await;
    let (r, remote) = server.image("test:v1");
    crate::push::push(dir.path(), &r, &remote, &Default::default())
        .await
        .unwrap();
    let m = remote.image(&r).await.unwrap().manifest;
    let source = Arc::new(MemorySource::new());
    for c in &m.chunks {
        source.insert(c.id, remote.chunk(&c.id).await.unwrap());
    }
    (m, source)
}

async fn image(files: &[(&str, Vec<u8>)], opts: ImageOptions) -> TestImage {
    let (m, source) = pushed(files).await;
    let cache = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(cache.path(), 1 << 30).unwrap();
    let fs = build_fs(m.clone(), source.clone(), Some(disk), &opts);
    TestImage {
        fs: Arc::new(fs),
        m,
        source,
        _cache: cache,
    }
}

fn opts() -> ImageOptions {
    ImageOptions {
        cache_dir: None,
        ..ImageOptions::default()
    }
}

impl TestImage {
    fn ino(&self, name: &str) -> u64 {
        let mut node = ROOT;
        for part in name.split('/') {
            node = self.m.lookup(node, part.as_bytes()).expect("in image");
        }
        u64::from(node) + 1
    }

    fn chunk_of(&self, name: &str, offset: u64) -> Digest {
        let node = (self.ino(name) - 1) as u32;
        let mut at = 0;
        for e in self.m.file_extents(node) {
            if offset < at + e.len {
                return self.m.chunks[e.chunk.expect("not a hole") as usize].id;
            }
            at += e.len;
        }
        panic!("offset past the end")
    }

    /// Waits until background fetches and cache writes are done.
    async fn settle(&self) {
        let fs = self.fs.clone();
        tokio::task::spawn_blocking(move || fs.flush())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_of_a_large_file_fetches_one_chunk() {
    let data = noise(1, 16 * MIB);
    let t = image(&[("big.bin", data.clone())], opts()).await;
    let got =
        t.fs.read(t.ino("big.bin"), 5 * MIB as u64 + 7, 1)
            .await
            .unwrap();
    assert_eq!(got[..], data[5 * MIB + 7..5 * MIB + 8]);
    t.settle().await;
    assert_eq!(t.source.requests(), [t.chunk_of("big.bin", 5 * MIB as u64)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_ahead_of_the_reader() {
    let data = noise(2, 16 * MIB);
    let t = image(&[("big.bin", data.clone())], opts()).await;
    let ino = t.ino("big.bin");
    let step = 128 << 10;
    let mut off = 0;
    while off < 3 * MIB + step {
        let got = t.fs.read(ino, off as u64, step as u32).await.unwrap();
        assert_eq!(got[..], data[off..off + step]);
        off += step;
    }
    t.settle().await;
    let ahead = t.chunk_of("big.bin", 4 * MIB as u64);
    assert_eq!(
        t.source.requests_for(&ahead),
        1,
        "chunk 4 fetched before it was read"
    );
    assert!(t.fs.stats.report().prefetched >= 1);
    // Each chunk was asked for once, however many reads touched it.
    let reqs = t.source.requests();
    let unique: std::collections::HashSet<_> = reqs.iter().collect();
    assert_eq!(unique.len(), reqs.len());

    // Without readahead nothing is fetched ahead.
    let t = image(
        &[("big.bin", data)],
        ImageOptions {
            readahead_max: 0,
            ..opts()
        },
    )
    .await;
    let mut off = 0;
    while off < 3 * MIB + step {
        t.fs.read(ino, off as u64, step as u32).await.unwrap();
        off += step;
    }
    t.settle().await;
    assert_eq!(t.source.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_is_fetched_whole_on_its_first_miss() {
    let data = noise(3, 4 * MIB);
    let t = image(&[("lib.so", data.clone())], opts()).await;
    let ino = t.ino("lib.so");
    t.fs.read(ino, 0, 1).await.unwrap();
    t.settle().await;
    assert_eq!(
        t.source.request_count(),
        4,
        "all four chunks fetched at the first miss"
    );
    let got = t.fs.read(ino, 3 * MIB as u64, 4096).await.unwrap();
    assert_eq!(got[..], data[3 * MIB..3 * MIB + 4096]);
    assert_eq!(t.source.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_miss_prefetches_the_next_pack() {
    let files: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("pkg/mod{i:03}.py"), noise(100 + i, 10_000)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let t = image(&refs, opts()).await;
    assert!(t.m.chunks.len() >= 3, "400 small files make several packs");
    let got = t.fs.read(t.ino("pkg/mod000.py"), 0, 10_000).await.unwrap();
    assert_eq!(got[..], files[0].1[..]);
    t.settle().await;
    let first = t.chunk_of("pkg/mod000.py", 0);
    let next = (0..400)
        .map(|i| t.chunk_of(&format!("pkg/mod{i:03}.py"), 0))
        .find(|c| *c != first)
        .unwrap();
    let mut reqs = t.source.requests();
    reqs.sort();
    let mut expected = vec![first, next];
    expected.sort();
    assert_eq!(reqs, expected, "this pack and the next in tree order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_share_one_fetch() {
    let data = noise(4, 2 * MIB);
    let t = image(
        &[("w.bin", data.clone())],
        ImageOptions {
            readahead_max: 0,
            ..opts()
        },
    )
    .await;
    let (ino, id) = (t.ino("w.bin"), t.chunk_of("w.bin", 0));
    t.source.hold(id);
    let readers: Vec<_> = (0..8u64)
        .map(|k| {
            let fs = t.fs.clone();
            tokio::spawn(async move { fs.read(ino, k * 1000, 100).await })
        })
        .collect();
    while t.source.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.source.release();
    for (k, r) in readers.into_iter().enumerate() {
        let got = r.await.unwrap().unwrap();
        assert_eq!(got[..], data[k * 1000..k * 1000 + 100]);
    }
    assert_eq!(t.source.request_count(), 1);
    assert!(t.fs.stats.report().joined >= 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_goes_ahead_of_queued_readahead() {
    let data = noise(5, 8 * MIB);
    // Four demand permits, one for readahead.
    let t = image(
        &[("w.bin", data.clone())],
        ImageOptions {
            concurrency: 4,
            ..opts()
        },
    )
    .await;
    let (a, b) = (t.chunk_of("w.bin", 0), t.chunk_of("w.bin", MIB as u64));
    let fetcher = t.fs.fetcher().clone();
    t.source.hold(a);
    fetcher.prefetch(0); // takes the one readahead permit
    while t.source.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fetcher.prefetch(1); // queued behind it
    while !fetcher.is_resident_or_pending(1) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(t.source.requests_for(&b), 0, "queued, not yet asked");
    let got = tokio::time::timeout(Duration::from_secs(10), fetcher.get(1, Priority::Demand))
        .await
        .expect("a reader is not stuck behind readahead")
        .unwrap();
    assert_eq!(got[..], data[MIB..2 * MIB]);
    assert!(
        fetcher.is_resident_or_pending(0),
        "the held readahead is still in flight"
    );
    t.source.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_is_an_error_and_nothing_is_cached() {
    let data = noise(6, 3 * MIB);
    let o = ImageOptions {
        readahead_max: 0,
        failure_memory: Duration::from_millis(300),
        ..opts()
    };
    let t = image(&[("w.bin", data)], o).await;
    let (ino, id) = (t.ino("w.bin"), t.chunk_of("w.bin", 0));
    t.source.corrupt(&id);
    let e = t.fs.read(ino, 0, 10).await.unwrap_err();
    assert!(
        matches!(e, FsError::Fetch(FetchError::Corrupt(c)) if c == id),
        "{e:?}"
    );
    // Remembered for a moment: the kernel's immediate retry does not refetch.
    assert!(t.fs.read(ino, 0, 10).await.is_err());
    assert_eq!(t.source.requests_for(&id), 1);
    // Not cached in memory or on disk: later reads fetch again, and fail again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(t.fs.read(ino, 0, 10).await.is_err());
    assert_eq!(t.source.requests_for(&id), 2);
    assert_eq!(t.fs.stats.report().digest_mismatches, 2);
    assert_eq!(
        t.fs.stats.report().last_error,
        format!("chunk {id} does not match its digest"),
        "the stats say why the read failed"
    );
    let cache = DiskCache::open(t._cache.path(), 1 << 30).unwrap();
    assert!(matches!(cache.get(&id, MIB as u32), Lookup::Miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_they_pass() {
    let data = noise(7, MIB);
    let t = image(&[("w.bin", data.clone())], opts()).await;
    t.source.fail_next(3);
    let got = t.fs.read(t.ino("w.bin"), 0, 4096).await.unwrap();
    assert_eq!(got[..], data[..4096]);
    assert_eq!(t.source.request_count(), 4);
    assert_eq!(t.fs.stats.report().fetch_errors, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_timeout_bounds_a_hung_server() {
    let t = image(
        &[("w.bin", noise(8, MIB))],
        ImageOptions {
            fetch_timeout: Duration::from_millis(500),
            failure_memory: Duration::from_secs(5),
            ..opts()
        },
    )
    .await;
    let ino = t.ino("w.bin");
    t.source.hold(t.chunk_of("w.bin", 0));
    let started = Instant::now();
    let e = t.fs.read(ino, 0, 10).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e, FsError::Fetch(FetchError::TimedOut { .. })),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(450),
        "gave up early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "not bounded by the timeout: {took:?}"
    );
    // The kernel's retry of the failed read answers at once, not after a second timeout.
    let started = Instant::now();
    assert!(t.fs.read(ino, 0, 10).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(400));
    t.source.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_overstates_a_chunk_is_an_error_not_a_panic() {
    let (mut m, source) = pushed(&[("a.txt", b"hello world".to_vec())]).await;
    m.chunks[0].len += 989;
    let fs = build_fs(m.clone(), source, None, &opts());
    let ino = u64::from(m.lookup(ROOT, b"a.txt").unwrap()) + 1;
    let e = fs.read(ino, 0, 11).await.unwrap_err();
    assert!(
        matches!(
            e,
            FsError::Fetch(FetchError::WrongLength {
                expected: 1000,
                actual: 11,
                ..
            })
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_fetches_in_flight() {
    let t = image(&[("w.bin", noise(9, 2 * MIB))], opts()).await;
    t.source.set_delay(Duration::from_millis(300));
    let id = t.chunk_of("w.bin", 0);
    t.fs.fetcher().prefetch(0);
    t.settle().await;
    let cache = DiskCache::open(t._cache.path(), 1 << 30).unwrap();
    assert!(
        matches!(cache.get(&id, MIB as u32), Lookup::Hit(_)),
        "a fetch in flight at exit reaches the disk cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_held_back_during_a_stream_reach_the_disk_when_it_ends_or_at_flush() {
    let t = image(&[("w.bin", noise(9, 2 * MIB))], opts()).await;
    let cache = DiskCache::open(t._cache.path(), 1 << 30).unwrap();
    let on_disk = |offset| cache.contains(&t.chunk_of("w.bin", offset), MIB as u32);
    let f = t.fs.fetcher();
    f.defer_disk_writes();
    f.get(0, Priority::Demand).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!on_disk(0), "written while held back");
    // The stream's end: new writes go at once, what was held stays held
    // (until the image is quiet), so it is bounded by what came meanwhile.
    f.stop_deferring();
    f.get(1, Priority::Demand).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !on_disk(MIB as u64) {
        assert!(
            Instant::now() < deadline,
            "a write after the stream was held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!on_disk(0), "held writes went before the image was quiet");
    f.write_deferred();
    t.settle().await;
    assert!(on_disk(0) && on_disk(MIB as u64));
    // A stream stopped by an unmount: flush writes what it held, also when
    // called outside the runtime (as at unmount).
    let t = image(&[("w.bin", noise(9, 2 * MIB))], opts()).await;
    let cache = DiskCache::open(t._cache.path(), 1 << 30).unwrap();
    t.fs.fetcher().defer_disk_writes();
    t.fs.fetcher().get(0, Priority::Demand).await.unwrap();
    let fs = t.fs.clone();
    std::thread::spawn(move || fs.flush()).join().unwrap();
    assert!(cache.contains(&t.chunk_of("w.bin", 0), MIB as u32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_writes_wait_for_a_quiet_image_or_the_longest_wait() {
    use super::fs::until_quiet;
    let stats = Arc::new(Stats::default());
    let busy = |for_ms: u64| {
        let stats = stats.clone();
        tokio::spawn(async move {
            for _ in 0..for_ms / 10 {
                Stats::inc(&stats.lookups);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let quiet = Duration::from_millis(100);
    // Busy for 300 ms: the wait ends once 100 ms have passed without a lookup.
    let started = Instant::now();
    let lookups = busy(300);
    until_quiet(&stats, quiet, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    lookups.await.unwrap();
    assert!(waited >= Duration::from_millis(380), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // Never quiet: the wait ends at its longest.
    let started = Instant::now();
    let lookups = busy(2000);
    until_quiet(&stats, quiet, Duration::from_millis(500)).await;
    let waited = started.elapsed();
    lookups.abort();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_runs_are_whole_blocks_of_chunks_in_memory_and_skip_files_being_read() {
    let big = noise(3, 3 * MIB + 1000);
    let t = image(&[("a.bin", big.clone()), ("b.bin", big.clone())], opts()).await;
    let (a, b) = (t.ino("a.bin"), t.ino("b.bin"));
    let f = t.fs.fetcher();
    // Nothing in memory: nothing to hand on.
    assert!(t.fs.resident_runs(a, None, 4096).is_empty());
    // The same bytes, so both files share chunks 0..=3; bring in the first
    // two and the tail.
    for c in [0, 1, 3] {
        f.get(c, Priority::Demand).await.unwrap();
    }
    let runs = t.fs.resident_runs(a, None, 4096);
    let flat = |runs: &[(u64, Vec<bytes::Bytes>)]| -> Vec<(u64, Vec<u8>)> {
        runs.iter()
            .map(|(at, pieces)| (*at, pieces.concat()))
            .collect()
    };
    // Two runs: the first two chunks, and the tail up to the file's end.
    assert_eq!(
        flat(&runs),
        vec![
            (0, big[..2 * MIB].to_vec()),
            (3 * MIB as u64, big[3 * MIB..].to_vec())
        ]
    );
    assert_eq!(t.fs.files_of_chunk(1), &[a, b]);
    // Once a read has reached a file, chunks arriving for it are left to
    // the kernel's readahead; another file still gets them.
    t.fs.read(a, 0, 4096).await.unwrap();
    f.get(2, Priority::Demand).await.unwrap();
    assert!(t.fs.resident_runs(a, Some(2), 4096).is_empty());
    assert_eq!(
        flat(&t.fs.resident_runs(b, Some(2), 4096)),
        vec![(2 * MIB as u64, big[2 * MIB..3 * MIB].to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_is_read_only() {
    let t = image(&[("a.txt", b"x".to_vec())], opts()).await;
    let ino = t.ino("a.txt");
    assert!(t.fs.open(ino, libc::O_RDONLY).unwrap().keep_cache);
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert!(matches!(t.fs.open(ino, flags), Err(FsError::ReadOnly)));
    }
    assert!(matches!(
        t.fs.access(ino, libc::W_OK),
        Err(FsError::ReadOnly)
    ));
    assert!(t.fs.access(ino, libc::R_OK).is_ok());
    assert!(matches!(
        t.fs.access(999, libc::R_OK),
        Err(FsError::NotFound)
    ));
    assert!(matches!(t.fs.modify(), Err(FsError::ReadOnly)));
}
