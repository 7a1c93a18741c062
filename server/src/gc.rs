//! Garbage collection: removes the chunks, manifests and profiles that no
//! tag reaches, without ever breaking an image that one does, while pushes
//! run and any number of servers front the store.
//!
//! A run:
//!
//! 1. writes the marker `gc/running` (manifest uploads check their chunks
//!    again while it exists, below);
//! 2. marks: the live manifests are those a tag names, the last `keep`
//!    versions of each tag (`tag-history/`), and every manifest stored
//!    within the grace period (pushed, perhaps not tagged yet); the live
//!    chunks are theirs;
//! 3. sweeps: moves every chunk, manifest and profile that is not live and
//!    older than the grace period to `trash/<run>/` (the same path below it),
//!    and deletes tag history beyond `keep` versions;
//! 4. lists the manifests again and brings back from this run's trash any
//!    chunk that one stored since the mark names;
//! 5. empties the trash of earlier runs older than the grace period, but
//!    brings back what is live now;
//! 6. removes the marker.
//!
//! Why no live image breaks: a push uploads chunks, then its manifest, then
//! its tag. Chunks and manifests younger than the grace period are never
//! swept, so a push that takes less than the grace period loses nothing. A
//! push that reuses an old chunk (the missing list said it was stored) and
//! uploads its manifest while a run sweeps that chunk is caught either by
//! step 4 (the manifest was stored before the second listing) or by the
//! upload itself: while the marker exists, a manifest upload checks its
//! chunks again after storing it and brings back from the trash what a run
//! moved there (`routes::manifests`). Only the trash of a run older than the
//! grace period is ever deleted, and what is live then is brought back.

use crate::layout::{self, CHUNKS, MANIFESTS, PROFILES, TAG_HISTORY, TRASH};
use crate::ServerError;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectMeta, ObjectStore};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thaw_format::{Digest, Manifest};

/// How to collect.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Objects younger than this are never removed, and trash is kept this
    /// long. Longer than any push takes.
    pub grace: Duration,
    /// Versions of each tag kept (the current one and the `keep - 1` before it; 0 counts as 1).
    pub keep: usize,
    /// Report what would go, remove nothing.
    pub dry_run: bool,
    /// Store requests at once.
    pub concurrency: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            keep: 1,
            dry_run: false,
            concurrency: 16,
        }
    }
}

/// What a run found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub tags: u64,
    /// Manifests kept: tagged, kept versions, or younger than the grace period.
    pub live_manifests: u64,
    pub live_chunks: u64,
    /// Objects scanned: chunks, manifests, profiles, tag history.
    pub scanned: u64,
    /// Removed (moved to the trash), or that would be in a dry run.
    pub chunks_removed: u64,
    pub manifests_removed: u64,
    pub profiles_removed: u64,
    pub history_removed: u64,
    /// Bytes of the removed chunks, manifests and profiles.
    pub bytes_removed: u64,
    /// Objects brought back from the trash because a manifest names them.
    pub restored: u64,
    /// Objects deleted for good from earlier runs' trash.
    pub trash_deleted: u64,
    pub seconds: f64,
}

/// Where the marker of a running collection lives.
fn marker_path() -> Path {
    Path::from_iter(["gc", "running"])
}

/// Runs one collection of `store` (see the module doc).
pub async fn gc(
    store: &Arc<dyn ObjectStore>,
    options: &GcOptions,
) -> Result<GcReport, ServerError> {
    let started = std::time::Instant::now();
    let now = SystemTime::now();
    let run = Run {
        store,
        options,
        cutoff: now - options.grace,
        id: format!(
            "{:012}",
            now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
        ),
    };
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    if !options.dry_run {
        run.put(&marker_path(), run.id.clone().into_bytes()).await?;
    }
    let swept = run.collect(&mut report).await;
    if !options.dry_run {
        // Left behind by a failed run, the marker only costs uploads a check.
        let _ = store.delete(&marker_path()).await;
    }
    swept?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

struct Run<'a> {
    store: &'a Arc<dyn ObjectStore>,
    options: &'a GcOptions,
    /// Objects modified before this are old enough to remove.
    cutoff: SystemTime,
    /// This run's name under `trash/`: its start, in seconds since the epoch.
    id: String,
}

impl Run<'_> {
    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<(), ServerError> {
        self.store
            .put(path, bytes.into())
            .await
            .map(drop)
            .map_err(ServerError::store_read(path))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ServerError> {
        let prefix = Path::from(prefix);
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(ServerError::store_read(&prefix))
    }

    fn old(&self, meta: &ObjectMeta) -> bool {
        SystemTime::from(meta.last_modified) < self.cutoff
    }

    async fn collect(&self, report: &mut GcReport) -> Result<(), ServerError> {
        // Mark.
        let (roots, stale_history) = self.roots(report).await?;
        let manifests = self.list(MANIFESTS).await?;
        let listed: HashSet<Path> = manifests.iter().map(|m| m.location.clone()).collect();
        let mut live = HashSet::new();
        let mut dead_manifests = Vec::new();
        for meta in manifests {
            match layout::named_digest(&meta.location) {
                Some(d) if roots.contains(&d) || !self.old(&meta) => {
                    live.insert(d);
                }
                _ => dead_manifests.push(meta),
            }
        }
        report.live_manifests = live.len() as u64;
        let live_chunks = self.chunks_of(live.iter().copied()).await?;
        report.live_chunks = live_chunks.len() as u64;

        // Sweep.
        let chunks = self.list(CHUNKS).await?;
        let profiles = self.list(PROFILES).await?;
        report.scanned += (chunks.len() + profiles.len() + listed.len()) as u64;
        let dead_chunks: Vec<ObjectMeta> = chunks
            .into_iter()
            .filter(|m| self.old(m))
            .filter(|m| {
                layout::named_digest(&m.location).is_none_or(|id| !live_chunks.contains(&id))
            })
            .collect();
        let dead_profiles: Vec<ObjectMeta> = profiles
            .into_iter()
            .filter(|m| self.old(m))
            .filter(|m| layout::named_digest(&m.location).is_none_or(|d| !live.contains(&d)))
            .collect();
        report.chunks_removed = dead_chunks.len() as u64;
        report.manifests_removed = dead_manifests.len() as u64;
        report.profiles_removed = dead_profiles.len() as u64;
        report.history_removed = stale_history.len() as u64;
        report.bytes_removed = [&dead_chunks, &dead_manifests, &dead_profiles]
            .iter()
            .flat_map(|v| v.iter())
            .map(|m| m.size)
            .sum();
        if self.options.dry_run {
            return Ok(());
        }
        for meta in dead_manifests
            .iter()
            .chain(&dead_profiles)
            .chain(&dead_chunks)
        {
            self.trash(&meta.location).await?;
        }
        for path in &stale_history {
            self.delete(path).await?;
        }

        // Manifests stored or tagged since the mark bring back what they
        // name (and are brought back themselves, if this run took them).
        let (roots_now, _) = self.roots(&mut GcReport::default()).await?;
        let mut since: HashSet<Digest> = self
            .list(MANIFESTS)
            .await?
            .iter()
            .filter(|m| !listed.contains(&m.location))
            .filter_map(|m| layout::named_digest(&m.location))
            .collect();
        since.extend(roots_now.difference(&live));
        let mut named_since = HashSet::new();
        for digest in &since {
            let back = bring_back(&**self.store, digest)
                .await
                .map_err(ServerError::store_read(&layout::manifest_path(digest)))?;
            report.restored += back.restored;
            named_since.extend(back.chunks);
        }

        // Earlier runs' trash: gone for good once old enough, unless live.
        live.extend(since);
        for meta in self.list(TRASH).await? {
            let parts: Vec<PathPart> = meta.location.parts().collect();
            let Some(run) = parts.get(1).map(|p| p.as_ref().to_owned()) else {
                continue;
            };
            if run == self.id || !self.run_is_old(&run) {
                continue;
            }
            let original = Path::from_iter(parts[2..].iter().cloned());
            let is_chunk = parts.get(2).is_some_and(|p| p.as_ref() == CHUNKS);
            let wanted = layout::named_digest(&original).is_some_and(|d| match is_chunk {
                true => live_chunks.contains(&d) || named_since.contains(&d),
                false => live.contains(&d),
            });
            if wanted {
                self.untrash(&meta.location, &original).await?;
                report.restored += 1;
            } else {
                self.delete(&meta.location).await?;
                report.trash_deleted += 1;
            }
        }
        Ok(())
    }

    /// The manifests every tag and kept version names, and the tag history
    /// beyond `keep` versions that is old enough to delete.
    async fn roots(
        &self,
        report: &mut GcReport,
    ) -> Result<(HashSet<Digest>, Vec<Path>), ServerError> {
        let mut roots = HashSet::new();
        let tags = self.list("tags").await?;
        report.tags = tags.len() as u64;
        report.scanned += tags.len() as u64;
        for meta in &tags {
            if let Some(d) = self.read_digest(&meta.location).await? {
                roots.insert(d);
            }
        }
        // tag-history/<name>/<tag>/<time>: newest first per tag.
        let mut versions: HashMap<(String, String), BTreeMap<String, ObjectMeta>> = HashMap::new();
        let history = self.list(TAG_HISTORY).await?;
        report.scanned += history.len() as u64;
        for meta in history {
            let parts: Vec<String> = meta
                .location
                .parts()
                .map(|p| p.as_ref().to_owned())
                .collect();
            if let [_, name, tag, at] = &parts[..] {
                versions
                    .entry((name.clone(), tag.clone()))
                    .or_default()
                    .insert(at.clone(), meta);
            }
        }
        let mut stale = Vec::new();
        for (_, by_time) in versions {
            for (i, meta) in by_time.into_values().rev().enumerate() {
                if i < self.options.keep.max(1) {
                    if let Some(d) = self.read_digest(&meta.location).await? {
                        roots.insert(d);
                    }
                } else if self.old(&meta) {
                    stale.push(meta.location);
                }
            }
        }
        Ok((roots, stale))
    }

    async fn read_digest(&self, path: &Path) -> Result<Option<Digest>, ServerError> {
        let bytes = layout::get(&**self.store, path)
            .await
            .map_err(ServerError::store_read(path))?;
        Ok(bytes.and_then(|b| layout::parse_tag_object(&b)))
    }

    /// Every chunk the stored manifests `digests` name. A manifest that is
    /// gone or damaged names none (fsck reports damage).
    async fn chunks_of(
        &self,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<HashSet<Digest>, ServerError> {
        let store = &**self.store;
        let mut reads = futures::stream::iter(digests)
            .map(|d| async move {
                let path = layout::manifest_path(&d);
                let bytes = layout::get(store, &path)
                    .await
                    .map_err(ServerError::store_read(&path))?;
                Ok::<_, ServerError>(bytes.and_then(|b| Manifest::decode_verified(&b, &d).ok()))
            })
            .buffer_unordered(self.options.concurrency.max(1));
        let mut chunks = HashSet::new();
        while let Some(manifest) = reads.next().await {
            if let Some(m) = manifest? {
                chunks.extend(m.chunks.iter().map(|c| c.id));
            }
        }
        Ok(chunks)
    }

    fn run_is_old(&self, run: &str) -> bool {
        let Ok(secs) = run.parse::<u64>() else {
            return false;
        };
        UNIX_EPOCH + Duration::from_secs(secs) < self.cutoff
    }

    async fn trash(&self, path: &Path) -> Result<(), ServerError> {
        match self.store.rename(path, &trash_path(&self.id, path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ServerError::store_read(path)(e)),
        }
    }

    async fn untrash(&self, trashed: &Path, path: &Path) -> Result<(), ServerError> {
        match self.store.rename(trashed, path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ServerError::store_read(path)(e)),
        }
    }

    async fn delete(&self, path: &Path) -> Result<(), ServerError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ServerError::store_read(path)(e)),
        }
    }
}

/// Where a run puts the object at `path`.
fn trash_path(run: &str, path: &Path) -> Path {
    Path::from_iter(
        [PathPart::from(TRASH), PathPart::from(run)]
            .into_iter()
            .chain(path.parts()),
    )
}

/// The runs that have trash, listed once, when first needed.
#[derive(Default)]
struct TrashRuns(Option<Vec<String>>);

impl TrashRuns {
    async fn get(&mut self, store: &dyn ObjectStore) -> object_store::Result<&[String]> {
        if self.0.is_none() {
            let listed = store.list_with_delimiter(Some(&Path::from(TRASH))).await?;
            let ids = listed.common_prefixes.iter();
            self.0 = Some(
                ids.filter_map(|r| r.filename().map(str::to_owned))
                    .collect(),
            );
        }
        Ok(self.0.as_deref().unwrap_or_default())
    }
}

/// Brings back `path` from any run's trash; whether it was there.
async fn restore(
    store: &dyn ObjectStore,
    runs: &mut TrashRuns,
    path: &Path,
) -> object_store::Result<bool> {
    for id in runs.get(store).await? {
        match store.rename(&trash_path(id, path), path).await {
            Ok(()) => return Ok(true),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// What [`bring_back`] did.
#[derive(Debug, Default)]
pub(crate) struct BroughtBack {
    /// Objects brought back from the trash.
    pub(crate) restored: u64,
    /// Whether the manifest is stored now.
    pub(crate) manifest: bool,
    /// Chunks it names that are neither stored nor in any trash.
    pub(crate) missing: Vec<Digest>,
    /// Every chunk it names, once each.
    pub(crate) chunks: HashSet<Digest>,
}

/// Makes the image of manifest `digest` whole again if a collection moved
/// any of it to the trash: the manifest, then each chunk it names that is
/// not stored. Uploads of manifests and tags call it while a collection
/// runs, after they stored what they were given, and a collection calls it
/// for what was pushed or tagged while it swept.
pub(crate) async fn bring_back(
    store: &dyn ObjectStore,
    digest: &Digest,
) -> object_store::Result<BroughtBack> {
    let mut done = BroughtBack::default();
    let mut runs = TrashRuns::default();
    let path = layout::manifest_path(digest);
    if layout::size(store, &path).await?.is_none() {
        if !restore(store, &mut runs, &path).await? {
            return Ok(done);
        }
        done.restored += 1;
    }
    done.manifest = true;
    let Some(bytes) = layout::get(store, &path).await? else {
        done.manifest = false;
        return Ok(done);
    };
    let Ok(manifest) = Manifest::decode_verified(&bytes, digest) else {
        return Ok(done);
    };
    for chunk in manifest.chunks.iter() {
        if !done.chunks.insert(chunk.id) {
            continue;
        }
        let path = layout::chunk_path(&chunk.id);
        if layout::size(store, &path).await?.is_some() {
            continue;
        }
        if restore(store, &mut runs, &path).await? {
            done.restored += 1;
        } else {
            done.missing.push(chunk.id);
        }
    }
    Ok(done)
}

/// While a collection runs (its marker is stored), what [`bring_back`] did
/// for the image of `digest`; `None` when none runs. An upload of a
/// manifest or a tag calls it once it has stored what it was given.
pub(crate) async fn bring_back_if_running(
    store: &dyn ObjectStore,
    digest: &Digest,
) -> object_store::Result<Option<BroughtBack>> {
    if layout::size(store, &marker_path()).await?.is_none() {
        return Ok(None);
    }
    bring_back(store, digest).await.map(Some)
}
