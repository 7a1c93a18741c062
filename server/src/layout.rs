//! Where things live in the object store, and the few store calls the
//! handlers share.
//!
//! ```text
//! chunks/<first 2 hex>/<64 hex>   a chunk frame, exactly as uploaded
//! manifests/<64 hex>              a manifest's encoding
//! tags/<name>/<tag>               the text `blake3:<64 hex>` of a manifest
//! profiles/<64 hex>               the working-set profile of that manifest
//! tag-history/<name>/<tag>/<time> each manifest a tag was set to, by time
//! quarantine/<path>               an object that failed verification
//! trash/<run>/<path>              what a garbage collection removed (`gc`)
//! gc/running                      present while a collection runs
//! ```
//! The two-digit fan-out keeps directories of a file store small. Nothing
//! else is stored, so any number of servers can front the same bucket. An
//! object that does not match its name is moved under `quarantine/`, where
//! nothing reads it, so that it counts as missing and a re-upload replaces it.

use bytes::Bytes;
use object_store::path::{Path, PathPart};
use object_store::{GetResult, ObjectStore};
use thaw_format::Digest;

pub(crate) const CHUNKS: &str = "chunks";
pub(crate) const MANIFESTS: &str = "manifests";
pub(crate) const PROFILES: &str = "profiles";
pub(crate) const TAG_HISTORY: &str = "tag-history";
pub(crate) const TRASH: &str = "trash";
const QUARANTINE: &str = "quarantine";

pub(crate) fn chunk_path(id: &Digest) -> Path {
    let hex = id.to_hex();
    Path::from_iter([CHUNKS, &hex[..2], &hex])
}

pub(crate) fn manifest_path(digest: &Digest) -> Path {
    Path::from_iter([MANIFESTS, &digest.to_hex()])
}

/// The profile of the manifest `digest`.
pub(crate) fn profile_path(digest: &Digest) -> Path {
    Path::from_iter([PROFILES, &digest.to_hex()])
}

/// The digest an object's last path part names (`manifests/<hex>`,
/// `chunks/<ab>/<hex>`, `profiles/<hex>`).
pub(crate) fn named_digest(path: &Path) -> Option<Digest> {
    Digest::from_hex(path.filename()?).ok()
}

/// The manifest a stored tag object names, if it holds a digest at all.
pub(crate) fn parse_tag_object(bytes: &[u8]) -> Option<Digest> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// `name` and `tag` must have passed [`valid_name`].
pub(crate) fn tag_path(name: &str, tag: &str) -> Path {
    Path::from_iter(["tags", name, tag])
}

/// The history entry of setting `name:tag` at `at` (nanoseconds since the
/// epoch, zero-padded so that names sort by time).
pub(crate) fn tag_history_path(name: &str, tag: &str, at: u128) -> Path {
    Path::from_iter([TAG_HISTORY, name, tag, &format!("{at:024}")])
}

pub(crate) fn tag_prefix(name: &str) -> Path {
    Path::from_iter(["tags", name])
}

pub(crate) use thaw_format::wire::valid_name;

/// Where the object at `path` goes when it fails verification.
pub(crate) fn quarantine_path(path: &Path) -> Path {
    Path::from_iter(std::iter::once(PathPart::from(QUARANTINE)).chain(path.parts()))
}

/// Moves the object at `path` to [`quarantine_path`] (replacing an earlier
/// quarantined copy). An object already gone counts as moved: another
/// request got there first.
pub(crate) async fn quarantine(store: &dyn ObjectStore, path: &Path) -> object_store::Result<()> {
    match store.rename(path, &quarantine_path(path)).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        moved => moved,
    }
}

/// The object at `path`, or `None` if there is none.
pub(crate) async fn get(
    store: &dyn ObjectStore,
    path: &Path,
) -> object_store::Result<Option<Bytes>> {
    match open(store, path).await? {
        Some(object) => object.bytes().await.map(Some),
        None => Ok(None),
    }
}

/// The object at `path`, opened: its size is known (`meta.size`), its bytes
/// not read yet. `None` if there is none.
pub(crate) async fn open(
    store: &dyn ObjectStore,
    path: &Path,
) -> object_store::Result<Option<GetResult>> {
    match store.get(path).await {
        Ok(object) => Ok(Some(object)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The size of the object at `path`, or `None` if there is none.
pub(crate) async fn size(
    store: &dyn ObjectStore,
    path: &Path,
) -> object_store::Result<Option<u64>> {
    match store.head(path).await {
        Ok(meta) => Ok(Some(meta.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_layout() {
        let id = Digest::of(b"x");
        let hex = id.to_hex();
        assert_eq!(
            chunk_path(&id).as_ref(),
            format!("chunks/{}/{hex}", &hex[..2])
        );
        assert_eq!(manifest_path(&id).as_ref(), format!("manifests/{hex}"));
        assert_eq!(profile_path(&id).as_ref(), format!("profiles/{hex}"));
        assert_eq!(tag_path("py", "3.12").as_ref(), "tags/py/3.12");
        assert_eq!(
            quarantine_path(&chunk_path(&id)).as_ref(),
            format!("quarantine/chunks/{}/{hex}", &hex[..2])
        );
    }
}
