//! Where things live in the object store, and the few store calls the
//! handlers share.
//!
//! ```text
//! chunks/<first 2 hex>/<64 hex>   a chunk frame, exactly as uploaded
//! manifests/<64 hex>              a manifest's encoding
//! tags/<name>/<tag>               the text `blake3:<64 hex>` of a manifest
//! ```
//! The two-digit fan-out keeps directories of a file store small. Nothing
//! else is stored, so any number of servers can front the same bucket.

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectStore;
use thaw_format::Digest;

pub(crate) fn chunk_path(id: &Digest) -> Path {
    let hex = id.to_hex();
    Path::from_iter(["chunks", &hex[..2], &hex])
}

pub(crate) fn manifest_path(digest: &Digest) -> Path {
    Path::from_iter(["manifests", &digest.to_hex()])
}

/// `name` and `tag` must have passed [`valid_name`].
pub(crate) fn tag_path(name: &str, tag: &str) -> Path {
    Path::from_iter(["tags", name, tag])
}

pub(crate) fn tag_prefix(name: &str) -> Path {
    Path::from_iter(["tags", name])
}

pub(crate) use thaw_format::wire::valid_name;

/// The object at `path`, or `None` if there is none.
pub(crate) async fn get(
    store: &dyn ObjectStore,
    path: &Path,
) -> object_store::Result<Option<Bytes>> {
    match store.get(path).await {
        Ok(result) => result.bytes().await.map(Some),
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
        assert_eq!(tag_path("py", "3.12").as_ref(), "tags/py/3.12");
    }
}
