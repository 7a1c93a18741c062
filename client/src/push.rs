//! `thaw push DIR REF`: turn a directory into an image on a chunk server.
//!
//! 1. Walk the tree breadth-first without following symlinks ([`walk`]).
//! 2. Cut files into units ([`plan`]); all-zero chunks become holes, small
//!    files share packed chunks. When the previous version (or
//!    `--profile-from`) has a working-set profile, the small files its start
//!    read are packed first, together and in read order.
//! 3. One pipeline, each file read once: worker threads (one per core) read
//!    and hash units; as chunks come out, the server is asked in batches which
//!    it lacks, and those are compressed on all cores and uploaded with bounded
//!    concurrency and retries while hashing goes on. Memory is bounded: a
//!    chunk waits for a slot before it is read on.
//! 4. Check that no file changed since the walk (its bytes may be torn: the
//!    push fails rather than record them).
//! 5. Upload the manifest (the server refuses it unless every chunk is stored),
//!    carry the working-set profile of the image the tag named so far to it
//!    (the chunks the two share: [`crate::profile::carry`]), then set the
//!    tag. The tag moves last, so an interrupted push leaves the old tag and a
//!    usable store.

mod plan;
mod walk;

use crate::error::{ClientError, Result};
use crate::profile::Profiled;
use crate::reference::ImageRef;
use crate::remote::Remote;
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use thaw_format::{frame, node_path, Chunking, Digest, Manifest, NodeKind};

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub chunking: Chunking,
    /// How chunk frames are compressed.
    pub codec: frame::Codec,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Show progress bars (on a terminal).
    pub progress: bool,
    /// The image whose profile lays out this push (the small files its start
    /// read are packed first, in read order) and is carried to it; `None`:
    /// the image the tag names now, if it has a profile.
    pub profile_from: Option<ImageRef>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            chunking: Chunking::default(),
            codec: frame::Codec::DEFAULT,
            concurrency: 16,
            progress: false,
            profile_from: None,
        }
    }
}

/// What a push did (`thaw push --json` prints this).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub manifest: Digest,
    /// Regular files (hardlinks count once).
    pub files: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Unique chunks the image refers to.
    pub chunks: u64,
    pub chunks_uploaded: u64,
    /// Frame bytes sent.
    pub bytes_uploaded: u64,
    pub manifest_bytes: u64,
    /// Working-set chunks of the previous version's profile carried to this
    /// one (0 when there was none to carry).
    pub profile_carried: u64,
    pub hash_seconds: f64,
    pub upload_seconds: f64,
    pub seconds: f64,
}

fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// A hashed piece of a unit, with its bytes, on its way to the uploader.
struct Hashed {
    piece: plan::Piece,
    data: Vec<u8>,
}

thread_local! {
    static ENCODER: std::cell::RefCell<Option<(frame::Codec, frame::Encoder)>> = const { std::cell::RefCell::new(None) };
}

/// Encodes chunk `id` with this thread's reusable compression context.
fn encode(data: &[u8], id: &Digest, codec: frame::Codec) -> Vec<u8> {
    ENCODER.with(|e| {
        let mut e = e.borrow_mut();
        if e.as_ref().map(|(c, _)| *c) != Some(codec) {
            *e = Some((codec, frame::Encoder::with_codec(codec)));
        }
        e.as_mut().expect("set above").1.encode_for(data, id)
    })
}

/// Runs the hashing workers: one thread per core takes units in order and
/// sends their pieces down `tx`. Returns when every unit is hashed or one fails.
fn hash_units(
    w: &walk::Walked,
    p: &plan::Plan,
    chunking: &Chunking,
    tx: tokio::sync::mpsc::Sender<Hashed>,
    progress: &ProgressBar,
) -> Result<Vec<Vec<plan::Piece>>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let results = std::sync::Mutex::new(vec![Vec::new(); p.units.len()]);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let unit = next.fetch_add(1, Ordering::Relaxed);
                        let Some(u) = p.units.get(unit) else {
                            return Ok(());
                        };
                        let mut pieces = Vec::new();
                        plan::hash_unit(w, u, chunking, &mut |piece, data| {
                            progress.inc(piece.len);
                            pieces.push(piece);
                            if piece.id.is_some() {
                                // The receiver only goes away when the push failed.
                                tx.blocking_send(Hashed { piece, data })
                                    .map_err(|_| ClientError::Aborted)?;
                            }
                            Ok(())
                        })?;
                        results.lock().expect("results lock")[unit] = pieces;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("hashing thread panicked"))
    })?;
    Ok(results.into_inner().expect("results lock"))
}

/// Waits for one piece (while the channel is `open`), then takes whatever
/// else is ready, up to a batch. Returns whether the channel is still open.
async fn next_batch(
    rx: &mut tokio::sync::mpsc::Receiver<Hashed>,
    batch: &mut Vec<Hashed>,
    mut open: bool,
) -> bool {
    const BATCH: usize = 256;
    if open && batch.is_empty() {
        match rx.recv().await {
            Some(h) => batch.push(h),
            None => open = false,
        }
    }
    while open && batch.len() < BATCH {
        match rx.try_recv() {
            Ok(h) => batch.push(h),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
        }
    }
    open
}

/// Compresses one chunk (on a CPU permit) and uploads it; returns the frame's length.
async fn compress_and_upload(
    h: Hashed,
    cpu: &Arc<tokio::sync::Semaphore>,
    remote: &Remote,
    codec: frame::Codec,
) -> Result<u64> {
    let id = h.piece.id.expect("only chunks are uploaded");
    let permit = cpu.clone().acquire_owned().await.expect("semaphore open");
    let frame = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        Bytes::from(encode(&h.data, &id, codec))
    })
    .await
    .expect("compression task panicked");
    let len = frame.len() as u64;
    remote.put_chunk(&id, frame).await?;
    Ok(len)
}

/// What the uploads sent.
struct Uploaded {
    chunks: u64,
    /// Frame bytes.
    bytes: u64,
}

/// Uploads what the server lacks, as hashed pieces arrive.
async fn upload_missing(
    mut rx: tokio::sync::mpsc::Receiver<Hashed>,
    remote: &Remote,
    opts: &PushOptions,
) -> Result<Uploaded> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Bounds chunks held in memory between hashing and the end of their upload.
    let slots = Arc::new(tokio::sync::Semaphore::new(
        opts.concurrency.max(1) + 2 * cores,
    ));
    let cpu = Arc::new(tokio::sync::Semaphore::new(cores));
    let sent = Arc::new(AtomicU64::new(0));
    let mut seen: std::collections::HashSet<Digest> = std::collections::HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut uploaded = 0u64;
    let mut batch: Vec<Hashed> = Vec::new();
    let mut open = true;
    while open || !batch.is_empty() {
        open = next_batch(&mut rx, &mut batch, open).await;
        batch.retain(|h| seen.insert(h.piece.id.expect("only chunks are sent")));
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<Digest> = batch.iter().map(|h| h.piece.id.expect("chunk")).collect();
        let missing: std::collections::HashSet<Digest> =
            remote.missing(&ids).await?.into_iter().collect();
        for h in batch.drain(..) {
            let id = h.piece.id.expect("chunk");
            if !missing.contains(&id) {
                continue;
            }
            uploaded += 1;
            let slot = slots.clone().acquire_owned().await.expect("semaphore open");
            let (cpu, sent, remote, codec) =
                (cpu.clone(), sent.clone(), remote.clone(), opts.codec);
            tasks.spawn(async move {
                let _slot = slot;
                let len = compress_and_upload(h, &cpu, &remote, codec).await?;
                sent.fetch_add(len, Ordering::Relaxed);
                Ok::<_, ClientError>(())
            });
            // Surface failures early instead of after the whole tree is read.
            while let Some(done) = tasks.try_join_next() {
                done.expect("upload task panicked")?;
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("upload task panicked")?;
    }
    Ok(Uploaded {
        chunks: uploaded,
        bytes: sent.load(Ordering::Relaxed),
    })
}

/// The regular files among `nodes`.
fn files(nodes: &[thaw_format::Node]) -> impl Iterator<Item = &thaw_format::Node> {
    nodes
        .iter()
        .filter(|n| matches!(n.kind, NodeKind::File { .. }))
}

/// A manifest as uploaded.
struct Published {
    digest: Digest,
    /// Length of its encoding.
    bytes: u64,
    profile_carried: u64,
}

/// Uploads the manifest (the server refuses it unless every chunk is
/// stored), carries the previous version's profile to it, then moves the tag.
async fn publish(
    m: &Manifest,
    r: &ImageRef,
    tag: &str,
    remote: &Remote,
    previous: Option<&Profiled>,
) -> Result<Published> {
    m.validate()?;
    let bytes = Bytes::from(m.encode());
    let digest = Digest::of(&bytes);
    remote.put_manifest(&digest, bytes.clone()).await?;
    let profile_carried = match previous {
        Some(prev) => carry_profile(prev, m, &digest, remote).await,
        None => 0,
    };
    remote.put_tag(&r.name, tag, &digest).await?;
    Ok(Published {
        digest,
        bytes: bytes.len() as u64,
        profile_carried,
    })
}

/// The image whose profile lays out this push: `--profile-from`, or the
/// image the tag names now. Only a named one that cannot be had fails the
/// push; otherwise the push goes on without a profile.
async fn previous_profile(
    r: &ImageRef,
    opts: &PushOptions,
    remote: &Remote,
) -> Result<Option<Profiled>> {
    match &opts.profile_from {
        Some(from) => {
            let found = crate::profile::profiled(remote, from).await?;
            found
                .ok_or_else(|| ClientError::NotFound {
                    what: format!("a profile of {from}"),
                })
                .map(Some)
        }
        None => Ok(crate::profile::profiled(remote, r)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "cannot look up the previous version's profile: {}",
                    crate::chain(&e)
                );
                None
            })),
    }
}

/// The walked files at the paths `prev`'s start read, in the order it read them.
fn read_order(prev: &Profiled, w: &walk::Walked) -> Vec<u32> {
    let files: HashMap<Vec<u8>, u32> = (0..w.nodes.len() as u32)
        .filter(|&i| matches!(w.nodes[i as usize].kind, NodeKind::File { .. }))
        .map(|i| (node_path(&w.nodes, i), i))
        .collect();
    prev.profile
        .files_in_read_order()
        .into_iter()
        .filter(|&n| (n as usize) < prev.manifest.nodes.len())
        .filter_map(|n| files.get(&prev.manifest.path(n)).copied())
        .collect()
}

/// Carries the profile of `prev` to `m`; returns the working-set chunks
/// carried. A failure only costs the new version its head start, so it is
/// logged, not returned.
async fn carry_profile(prev: &Profiled, m: &Manifest, digest: &Digest, remote: &Remote) -> u64 {
    match crate::profile::carry(remote, prev, m, digest).await {
        Ok(carried) => carried.map_or(0, |p| p.working_set().count() as u64),
        Err(e) => {
            tracing::warn!(from = %prev.digest, "cannot carry the previous version's profile: {}", crate::chain(&e));
            0
        }
    }
}

/// Pushes `dir` to the server and repository `r` names, and tags it.
pub async fn push(
    dir: &Path,
    r: &ImageRef,
    remote: &Remote,
    opts: &PushOptions,
) -> Result<PushReport> {
    match push_once(dir, r, remote, opts).await {
        // A garbage collection removed a chunk the missing list had called
        // stored before the manifest went up: once more, which uploads it.
        Err(ClientError::MissingChunks { missing }) => {
            tracing::warn!(
                chunks = missing.len(),
                "chunks went missing during the push (a garbage collection?): pushing again"
            );
            push_once(dir, r, remote, opts).await
        }
        done => done,
    }
}

async fn push_once(
    dir: &Path,
    r: &ImageRef,
    remote: &Remote,
    opts: &PushOptions,
) -> Result<PushReport> {
    let tag = r
        .tag()
        .ok_or_else(|| ClientError::TagRequired(r.to_string()))?
        .to_owned();
    let started = Instant::now();
    let previous = previous_profile(r, opts, remote).await?;
    let (d, chunking, prev) = (dir.to_path_buf(), opts.chunking, previous.clone());
    let (w, p) = tokio::task::spawn_blocking(move || {
        let w = walk::walk(&d)?;
        let read_first = prev.map_or_else(Vec::new, |prev| read_order(&prev, &w));
        let p = plan::plan(&w, &chunking, &read_first);
        Ok::<_, ClientError>((w, p))
    })
    .await
    .expect("walk task panicked")?;
    let total: u64 = files(&w.nodes).map(|n| n.size).sum();
    let pb = bar(opts.progress, total, "pushing");
    let (tx, rx) = tokio::sync::mpsc::channel::<Hashed>(8);
    let hashing = {
        let pb = pb.clone();
        tokio::task::spawn_blocking(move || {
            let pieces = hash_units(&w, &p, &chunking, tx, &pb);
            let hash_seconds = started.elapsed().as_secs_f64();
            (w, p, pieces, hash_seconds)
        })
    };
    let uploading = upload_missing(rx, remote, opts).await;
    let (mut w, p, pieces, hash_seconds) = hashing.await.expect("hashing task panicked");
    // An upload failure stops the hashing workers (their sends fail), so it is
    // the cause to report; a hashing failure ends the uploads cleanly.
    let uploaded = uploading?;
    let pieces = pieces?;
    pb.finish_and_clear();
    plan::check_stamps(&w)?;
    let assembled = plan::assemble(&mut w, &p, &pieces);
    let manifest = Manifest {
        chunk_size: opts.chunking.chunk_size(),
        chunks: assembled.chunks,
        nodes: w.nodes,
        extents: assembled.extents,
        xattrs: w.xattrs,
    };
    let published = publish(&manifest, r, &tag, remote, previous.as_ref()).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(PushReport {
        manifest: published.digest,
        files: files(&manifest.nodes).count() as u64,
        bytes: manifest.logical_bytes(),
        chunks: manifest.chunks.len() as u64,
        chunks_uploaded: uploaded.chunks,
        bytes_uploaded: uploaded.bytes,
        manifest_bytes: published.bytes,
        profile_carried: published.profile_carried,
        hash_seconds,
        upload_seconds: seconds - hash_seconds,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes this process has read through read(2) and friends.
    fn rchar() -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holes_of_a_sparse_file_are_seeked_over_not_read() {
        let src = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(src.path().join("disk.img")).unwrap();
        f.set_len(4 << 30).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"data at the end", (4 << 30) - 100).unwrap();
        let server = crate::testing::TestServer::start().await;
        let (r, remote) = server.image("sparse:v1");
        let before = rchar();
        let report = push(src.path(), &r, &remote, &PushOptions::default())
            .await
            .unwrap();
        let read = rchar() - before;
        assert_eq!(report.bytes, 4 << 30);
        assert_eq!(report.chunks, 1, "one chunk of data, the rest holes");
        assert!(read < 64 << 20, "read {read} bytes of a 4 GiB sparse file");
    }
}
