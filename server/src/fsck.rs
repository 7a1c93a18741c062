//! `fsck`: checks every chunk and manifest of a store against its name.
//!
//! An object under `chunks/` must sit where its name puts it and decode to
//! bytes that hash to that name; an object under `manifests/` must hash to
//! its name and decode to a valid manifest. What fails is reported and, if
//! asked, moved to quarantine (`layout.rs`), where the server no longer sees
//! it, so that an uploader sends it again. Manifests that name chunks that are
//! not stored (or no longer are, once bad ones are quarantined) are reported
//! too: their images need a re-push. Chunks are checked first, so that the
//! manifests can be checked against the set of good chunks.

use crate::layout::{self, CHUNKS, MANIFESTS};
use crate::ServerError;
use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use std::collections::HashSet;
use std::sync::Arc;
use thaw_format::{frame, Digest, Manifest};

/// How to check a store.
#[derive(Debug, Clone)]
pub struct FsckOptions {
    /// Move what fails to quarantine, instead of only reporting it.
    pub quarantine: bool,
    /// Objects read and checked at once.
    pub concurrency: usize,
}

impl Default for FsckOptions {
    fn default() -> Self {
        FsckOptions {
            quarantine: false,
            concurrency: 8,
        }
    }
}

/// What a check found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FsckReport {
    /// Chunk objects checked.
    pub chunks: u64,
    /// Manifest objects checked.
    pub manifests: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Objects that do not match their names.
    pub bad: Vec<BadObject>,
    /// Good manifests that name chunks that are not stored, or not good.
    pub incomplete_manifests: Vec<IncompleteManifest>,
}

impl FsckReport {
    /// Nothing bad and nothing incomplete.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.incomplete_manifests.is_empty()
    }
}

/// A stored object that does not match its name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadObject {
    /// Its path in the store.
    pub path: String,
    pub reason: String,
    /// Whether it was moved to quarantine.
    pub quarantined: bool,
}

/// A manifest whose image needs a re-push.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IncompleteManifest {
    pub manifest: Digest,
    /// How many of its chunks are not stored, or not good.
    pub missing_chunks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chunk,
    Manifest,
}

/// What one object turned out to be.
enum Verdict {
    GoodChunk(Digest),
    GoodManifest {
        digest: Digest,
        missing_chunks: u64,
    },
    Bad(String),
    /// Removed since it was listed (by a server quarantining it, say).
    Gone,
}

/// Checks every chunk and manifest of `store` (see the module doc), calling
/// `progress` with the report so far after each object.
pub async fn fsck(
    store: &Arc<dyn ObjectStore>,
    options: &FsckOptions,
    progress: &(dyn Fn(&FsckReport) + Sync),
) -> Result<FsckReport, ServerError> {
    let mut checker = Checker {
        store,
        options,
        progress,
        report: FsckReport::default(),
        good_chunks: HashSet::new(),
    };
    checker.check_all(Kind::Chunk, &Arc::default()).await?;
    let good_chunks = Arc::new(std::mem::take(&mut checker.good_chunks));
    checker.check_all(Kind::Manifest, &good_chunks).await?;
    Ok(checker.report)
}

/// One run of [`fsck`].
struct Checker<'a> {
    store: &'a Arc<dyn ObjectStore>,
    options: &'a FsckOptions,
    progress: &'a (dyn Fn(&FsckReport) + Sync),
    report: FsckReport,
    /// The good chunks found so far.
    good_chunks: HashSet<Digest>,
}

impl Checker<'_> {
    /// Checks every object of `kind`; manifests against `good_chunks`.
    async fn check_all(
        &mut self,
        kind: Kind,
        good_chunks: &Arc<HashSet<Digest>>,
    ) -> Result<(), ServerError> {
        let prefix = &Path::from(match kind {
            Kind::Chunk => CHUNKS,
            Kind::Manifest => MANIFESTS,
        });
        let store = self.store;
        let mut checks = store
            .list(Some(prefix))
            .map(|listed| async move {
                let meta = listed.map_err(ServerError::store_read(prefix))?;
                let verdict = check(store, kind, &meta.location, good_chunks)
                    .await
                    .map_err(ServerError::store_read(&meta.location))?;
                Ok::<_, ServerError>((meta, verdict))
            })
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(checked) = checks.next().await {
            let (meta, verdict) = checked?;
            let report = &mut self.report;
            match kind {
                Kind::Chunk => report.chunks += 1,
                Kind::Manifest => report.manifests += 1,
            }
            report.bytes += meta.size;
            match verdict {
                Verdict::GoodChunk(id) => {
                    self.good_chunks.insert(id);
                }
                Verdict::GoodManifest {
                    digest,
                    missing_chunks,
                } if missing_chunks > 0 => report.incomplete_manifests.push(IncompleteManifest {
                    manifest: digest,
                    missing_chunks,
                }),
                Verdict::GoodManifest { .. } | Verdict::Gone => {}
                Verdict::Bad(reason) => {
                    let quarantined = self.options.quarantine;
                    if quarantined {
                        layout::quarantine(&**store, &meta.location)
                            .await
                            .map_err(ServerError::store_read(&meta.location))?;
                    }
                    report.bad.push(BadObject {
                        path: meta.location.to_string(),
                        reason,
                        quarantined,
                    });
                }
            }
            (self.progress)(report);
        }
        Ok(())
    }
}

/// Reads the object at `path` and checks it against its name.
async fn check(
    store: &Arc<dyn ObjectStore>,
    kind: Kind,
    path: &Path,
    good_chunks: &Arc<HashSet<Digest>>,
) -> object_store::Result<Verdict> {
    let named = layout::named_digest(path);
    let expected = named.map(|digest| match kind {
        Kind::Chunk => layout::chunk_path(&digest),
        Kind::Manifest => layout::manifest_path(&digest),
    });
    let Some(digest) = named.filter(|_| expected.as_ref() == Some(path)) else {
        return Ok(Verdict::Bad("not where a name puts it".into()));
    };
    let bytes = match layout::get(&**store, path).await? {
        Some(bytes) => bytes,
        None => return Ok(Verdict::Gone),
    };
    let good_chunks = good_chunks.clone();
    let verdict = tokio::task::spawn_blocking(move || match kind {
        Kind::Chunk => match frame::verify_all(&bytes, &digest) {
            Ok(_) => Verdict::GoodChunk(digest),
            Err(e) => Verdict::Bad(e.to_string()),
        },
        Kind::Manifest => match Manifest::decode_verified(&bytes, &digest) {
            Ok(manifest) => Verdict::GoodManifest {
                digest,
                missing_chunks: manifest
                    .chunks
                    .iter()
                    .filter(|c| !good_chunks.contains(&c.id))
                    .count() as u64,
            },
            Err(e) => Verdict::Bad(e.to_string()),
        },
    });
    Ok(verdict
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
}
