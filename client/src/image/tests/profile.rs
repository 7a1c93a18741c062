//! Profiles in the core: what a recording holds, and that a replay streams
//! it in batches ahead of the reads, never ahead of a reader, within the
//! cache budget, and fails safe.

use super::*;
use crate::image::profile::StreamPolicy;
use thaw_format::Profile;

/// A tree of one large file and many small (packed) ones.
fn tree() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![("big.bin".to_owned(), noise(20, 6 * MIB))];
    for i in 0..300 {
        files.push((format!("pkg/mod{i:03}.py"), noise(200 + i, 12_000)));
    }
    files
}

fn refs(files: &[(String, Vec<u8>)]) -> Vec<(&str, Vec<u8>)> {
    files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect()
}

fn quiet() -> ImageOptions {
    ImageOptions {
        readahead_max: 0,
        ..opts()
    }
}

impl TestImage {
    /// Another attach of the same image over the same source, with a fresh
    /// disk cache (cold) or this one's (warm).
    fn attach(&self, o: &ImageOptions, warm: bool) -> (Arc<ImageFs>, Option<tempfile::TempDir>) {
        let (dir, fresh) = if warm {
            (self._cache.path().to_path_buf(), None)
        } else {
            let d = tempfile::tempdir().unwrap();
            (d.path().to_path_buf(), Some(d))
        };
        let disk = DiskCache::open(&dir, 1 << 30).unwrap();
        let fs = build_fs(self.m.clone(), self.source.clone(), Some(disk), o);
        (Arc::new(fs), fresh)
    }

    async fn read_all(&self, fs: &ImageFs, name: &str, len: usize) -> Vec<u8> {
        fs.read(self.ino(name), 0, len as u32)
            .await
            .unwrap()
            .to_vec()
    }

    /// A recording of reads of `names` (whole files), in order.
    async fn record(&self, files: &[(String, Vec<u8>)], names: &[&str]) -> Profile {
        let (fs, _cache) = self.attach(
            &ImageOptions {
                record: true,
                ..quiet()
            },
            false,
        );
        for name in names {
            let data = &files.iter().find(|(p, _)| p == name).unwrap().1;
            assert_eq!(&self.read_all(&fs, name, data.len()).await, data);
        }
        fs.recording(self.m.digest()).unwrap()
    }
}

/// Waits until the profile's stream has ended; returns how.
async fn streamed(fs: &ImageFs) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = fs.stats.report().profile;
        if state != "streaming" {
            return state;
        }
        assert!(Instant::now() < deadline, "the stream did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_lists_chunks_in_the_order_first_read_with_their_files() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let (fs, _cache) = t.attach(
        &ImageOptions {
            record: true,
            ..quiet()
        },
        false,
    );
    let big = t.ino("big.bin");
    fs.read(big, 3 * MIB as u64 + 10, 100).await.unwrap();
    t.read_all(&fs, "pkg/mod150.py", 12_000).await;
    fs.read(big, 0, 4096).await.unwrap();
    fs.read(big, 4096, 4096).await.unwrap();
    fs.read(big, 3 * MIB as u64, 10).await.unwrap();
    let p = fs.recording(t.m.digest()).unwrap();
    let ids: Vec<_> = p.entries.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        [
            t.chunk_of("big.bin", 3 * MIB as u64),
            t.chunk_of("pkg/mod150.py", 0),
            t.chunk_of("big.bin", 0)
        ]
    );
    assert!(p.entries.iter().all(|e| e.reads == 1 && !e.readahead));
    let node = |name: &str| (t.ino(name) - 1) as u32;
    let r = &p.entries[2].ranges;
    assert_eq!(r.len(), 1, "back-to-back reads are one range: {r:?}");
    assert_eq!(
        (r[0].node, r[0].offset, r[0].len),
        (node("big.bin"), 0, 8192)
    );
    let r = &p.entries[0].ranges;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].offset, r[0].len), (3 * MIB as u64, 110));
    let r = &p.entries[1].ranges;
    assert_eq!(
        (r[0].node, r[0].offset, r[0].len),
        (node("pkg/mod150.py"), 0, 12_000)
    );
    p.check_against(&t.m.digest(), &t.m).unwrap();
    assert_eq!(Profile::decode(&p.encode()).unwrap(), p);

    // With readahead on, what readahead fetched before any read is marked.
    let (fs, _cache) = t.attach(
        &ImageOptions {
            record: true,
            ..opts()
        },
        false,
    );
    fs.read(big, 0, 1).await.unwrap();
    let p = fs.recording(t.m.digest()).unwrap();
    assert!(p.entries[0].reads == 1 && !p.entries[0].readahead);
    assert!(
        p.entries[1..].iter().any(|e| e.readahead && e.reads == 0),
        "the rest of the small file was fetched by readahead: {:?}",
        p.entries
    );
    assert_eq!(p.working_set().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_streams_the_working_set_in_batches_before_it_is_read() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let names = ["pkg/mod200.py", "big.bin", "pkg/mod010.py", "pkg/mod299.py"];
    let p = t.record(&files, &names).await;
    let plan: Vec<_> = p.working_set().map(|e| e.id).collect();
    assert!(plan.len() >= 8, "{} chunks", plan.len());
    let before = t.source.request_count();

    let (fs, _cache) = t.attach(&quiet(), false);
    fs.start_replay(&p, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&fs).await, "done");
    let batches = t.source.batches();
    let sent: Vec<_> = batches.iter().flatten().copied().collect();
    assert_eq!(sent, plan, "every chunk once, in the order read");
    assert!(
        batches.len() < plan.len() / 2,
        "{} requests for {} chunks",
        batches.len(),
        plan.len()
    );
    assert_eq!(t.source.request_count(), before + plan.len());
    let s = fs.stats.report();
    assert_eq!(s.profile_chunks, plan.len() as u64);
    assert_eq!(s.profile_chunks_streamed, plan.len() as u64);
    assert_eq!(s.profile_batches, batches.len() as u64);
    assert_eq!(s.chunks_fetched, plan.len() as u64);

    // The start's reads find everything fetched.
    let asked = t.source.request_count();
    for name in names {
        let data = &files.iter().find(|(p, _)| p == name).unwrap().1;
        assert_eq!(&t.read_all(&fs, name, data.len()).await, data);
    }
    assert_eq!(t.source.request_count(), asked, "no read had to fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_miss_goes_ahead_of_the_stream() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["big.bin"]).await;
    let chunks: Vec<_> = p.working_set().map(|e| e.id).collect();
    assert_eq!(chunks.len(), 6);
    // One chunk a batch, one batch at a time; the first is held.
    let policy = StreamPolicy {
        batch_bytes: MIB as u64,
        first_batch_bytes: MIB as u64,
        in_flight: 1,
        ..StreamPolicy::default()
    };
    t.source.hold(chunks[0]);
    let (fs, _cache) = t.attach(&quiet(), false);
    fs.start_replay(&p, 1 << 30, policy);
    while t.source.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A read of the last chunk does not wait for the stream.
    let big = t.ino("big.bin");
    let got = tokio::time::timeout(Duration::from_secs(5), fs.read(big, 5 * MIB as u64, 10))
        .await
        .expect("a reader is not stuck behind the stream")
        .unwrap();
    assert_eq!(got[..], files[0].1[5 * MIB..5 * MIB + 10]);
    assert_eq!(t.source.batches().len(), 1, "the stream is still held");
    // A read of the chunk on the wire joins its batch.
    let joined = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.read(big, 7, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.source.release();
    assert_eq!(joined.await.unwrap().unwrap()[..], files[0].1[7..10]);
    assert_eq!(streamed(&fs).await, "done");
    assert_eq!(
        t.source.requests_for(&chunks[0]),
        2,
        "recorded, then one batch"
    );
    assert_eq!(
        t.source.requests_for(&chunks[5]),
        2,
        "recorded, then the reader: the stream skipped it"
    );
    assert_eq!(fs.stats.report().profile_chunks_streamed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stream_leaves_waiting_readers_to_fetch_alone() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["big.bin"]).await;
    let chunks: Vec<_> = p.working_set().map(|e| e.id).collect();
    let o = ImageOptions {
        fetch_timeout: Duration::from_millis(400),
        ..quiet()
    };
    t.source.hold(chunks[0]);
    t.source.fail_batches(true);
    let (fs, _cache) = t.attach(&o, false);
    fs.start_replay(&p, 1 << 30, StreamPolicy::default());
    while t.source.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let big = t.ino("big.bin");
    let reader = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.read(big, 0, 10).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.source.release();
    let got = reader.await.unwrap().expect("the reader fetched alone");
    assert_eq!(got[..], files[0].1[..10]);
    let state = streamed(&fs).await;
    assert!(state.starts_with("stopped: "), "{state}");
    let s = fs.stats.report();
    assert_eq!(s.profile_fallbacks, 1);
    assert_eq!(s.profile_chunks_streamed, 0);
    // Nothing else was fetched: chunks no one waited for are left for later.
    assert_eq!(s.chunks_fetched, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_in_a_batch_is_refused_and_the_rest_is_served() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["big.bin"]).await;
    let bad = t.chunk_of("big.bin", 2 * MIB as u64);
    t.source.corrupt(&bad);
    let (fs, _cache) = t.attach(&quiet(), false);
    fs.start_replay(&p, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&fs).await, "done");
    assert_eq!(fs.stats.report().digest_mismatches, 1);
    let big = t.ino("big.bin");
    let e = fs.read(big, 2 * MIB as u64, 10).await.unwrap_err();
    assert!(
        matches!(e, FsError::Fetch(FetchError::Corrupt(c)) if c == bad),
        "{e:?}"
    );
    let got = fs.read(big, 3 * MIB as u64, 10).await.unwrap();
    assert_eq!(got[..], files[0].1[3 * MIB..3 * MIB + 10]);
    assert_eq!(
        t.source
            .requests_for(&t.chunk_of("big.bin", 3 * MIB as u64)),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_stops_at_the_cache_budget() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["big.bin"]).await;
    let (fs, _cache) = t.attach(&quiet(), false);
    fs.start_replay(&p, 2 * MIB as u64 + 1, StreamPolicy::default());
    assert_eq!(streamed(&fs).await, "stopped: cache budget");
    assert_eq!(fs.stats.report().profile_chunks_streamed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_replay_loads_the_disk_cache_instead_of_fetching() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["pkg/mod001.py", "big.bin"]).await;
    let n = p.working_set().count() as u64;
    let (cold, _) = t.attach(&quiet(), true);
    cold.start_replay(&p, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&cold).await, "done");
    let settle = cold.clone();
    tokio::task::spawn_blocking(move || settle.flush())
        .await
        .unwrap();
    let asked = t.source.request_count();
    let (warm, _) = t.attach(&quiet(), true);
    warm.start_replay(&p, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&warm).await, "done");
    assert_eq!(t.source.request_count(), asked, "nothing fetched");
    let s = warm.stats.report();
    assert_eq!((s.profile_chunks_loaded, s.disk_hits), (n, n));

    // What it loads from disk stays within three quarters of the memory
    // cache (a chunk loaded past that would push out one loaded before it
    // was read); the rest is left for the readers to load.
    let small = ImageOptions {
        cache_mem: 2 * MIB as u64,
        ..quiet()
    };
    let (warm, _) = t.attach(&small, true);
    warm.start_replay(&p, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&warm).await, "done");
    let s = warm.stats.report();
    assert_eq!(s.profile_chunks_loaded, 1, "{s:?}");
    assert_eq!(t.source.request_count(), asked, "nothing fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_carried_to_the_next_version_streams_what_its_start_will_read() {
    let v1 = tree();
    let t1 = image(&refs(&v1), quiet()).await;
    let p1 = t1.record(&v1, &["big.bin", "pkg/mod299.py"]).await;
    // The next version changes the large file's tail and adds a module
    // (packed after the last one).
    let mut v2 = v1.clone();
    v2[0].1[5 * MIB..].fill(7);
    v2.push(("pkg/new.py".into(), noise(9, 5000)));
    let t2 = image(&refs(&v2), quiet()).await;
    let p2 = p1.carry_to(&t1.m, &t2.m, t2.m.digest());
    p2.check_against(&t2.m.digest(), &t2.m).unwrap();
    let shared: Vec<_> = p1
        .working_set()
        .map(|e| e.id)
        .filter(|id| t2.m.chunks.iter().any(|c| c.id == *id))
        .collect();
    assert_eq!(
        shared.len(),
        p1.working_set().count() - 2,
        "the tail and the pack moved"
    );
    // Carried: the chunks of the new version that hold what the old start
    // read, in the same order, whether shared or changed.
    let mut holding: Vec<_> = (0..6)
        .map(|k| t2.chunk_of("big.bin", (k * MIB) as u64))
        .collect();
    holding.push(t2.chunk_of("pkg/mod299.py", 0));
    assert_eq!(p2.working_set().map(|e| e.id).collect::<Vec<_>>(), holding);
    let e = &p2.entries[0];
    assert_eq!(t2.m.path(e.ranges[0].node), b"big.bin");
    let last = &p2.entries[6].ranges[0];
    assert_eq!(t2.m.path(last.node), b"pkg/mod299.py");
    assert_eq!((last.offset, last.len), (0, 12_000));

    let (fs, _cache) = t2.attach(&quiet(), false);
    fs.start_replay(&p2, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&fs).await, "done");
    let sent: Vec<_> = t2.source.batches().into_iter().flatten().collect();
    assert_eq!(sent, holding);
    // The profile itself, replayed on the new version, skips what it lacks.
    let (fs, _cache) = t2.attach(&quiet(), false);
    fs.start_replay(&p1, 1 << 30, StreamPolicy::default());
    assert_eq!(streamed(&fs).await, "done");
    assert_eq!(fs.stats.report().profile_chunks, shared.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_foreign_profile_is_refused_and_the_image_still_reads() {
    let files = tree();
    let t = image(&refs(&files), quiet()).await;
    let p = t.record(&files, &["big.bin"]).await;
    let digest = t.m.digest();
    let mut damaged = p.encode();
    damaged[70] ^= 1;
    let foreign = Profile {
        manifest: Digest::of(b"another image"),
        ..p.clone()
    }
    .encode();
    for (bytes, why) in [
        (damaged, "checksum"),
        (foreign, "is for manifest"),
        (b"junk".to_vec(), "bad magic"),
    ] {
        let (fs, _cache) = t.attach(&quiet(), false);
        super::super::replay(
            &fs,
            &digest,
            Some(Ok(Some(bytes.into()))),
            None,
            1 << 30,
            StreamPolicy::default(),
        );
        let state = fs.stats.report().profile;
        assert!(
            state.starts_with("refused: ") && state.contains(why),
            "{state}"
        );
        let got = fs.read(t.ino("big.bin"), 0, 10).await.unwrap();
        assert_eq!(got[..], files[0].1[..10]);
        assert_eq!(fs.stats.report().profile_batches, 0);
    }
    let (fs, _cache) = t.attach(&quiet(), false);
    super::super::replay(
        &fs,
        &digest,
        Some(Ok(Some(p.encode().into()))),
        None,
        1 << 30,
        StreamPolicy::default(),
    );
    assert_eq!(streamed(&fs).await, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_does_not_hold_up_an_attach_for_its_profile() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a"), b"cached").unwrap();
    let server = crate::testing::TestServer::start().await;
    let (r, remote) = server.image("down:v1");
    let pushed = crate::push::push(src.path(), &r, &remote, &Default::default())
        .await
        .unwrap();
    let by_digest =
        crate::ImageRef::parse(&format!("{}/down@{}", server.addr, pushed.manifest)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = ImageOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        ..ImageOptions::default()
    };
    let image = super::super::open(&by_digest, remote.clone(), &o)
        .await
        .unwrap();
    assert_eq!(image.fs.stats.report().profile, "none");
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The manifest is cached and the profile gets one short try.
    let started = Instant::now();
    let image = super::super::open(&by_digest, remote, &o).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let state = image.fs.stats.report().profile;
    assert!(state.starts_with("unavailable: "), "{state}");
}
