//! Profiles on the chunk server: fetching an image's profile, saving a
//! recording (merged into what is stored), carrying a profile to the next
//! version of an image (whose push also packs the small files the profile
//! read together, in read order), and summing one up for people.
//!
//! A profile is stored per manifest (`PUT /v1/profiles/{digest}`) and
//! replaced by each save, so recordings accumulate: each save merges the new
//! recording into the stored profile (`Profile::merge`). Two recorders saving
//! the same image at the same moment can lose one recording (the later write
//! wins); the profile stays valid either way.

use crate::error::{ClientError, Result};
use crate::reference::ImageRef;
use crate::remote::Remote;
use bytes::Bytes;
use std::collections::HashSet;
use thaw_format::{Digest, Manifest, Profile};

/// The profile stored for manifest `digest`, decoded and checked to name it.
pub async fn fetch(remote: &Remote, digest: &Digest) -> Result<Option<Profile>> {
    let Some(bytes) = remote.profile(digest).await? else {
        return Ok(None);
    };
    Ok(Some(decode_for(&bytes, digest)?))
}

/// Decodes a profile fetched for manifest `digest`; one that names another
/// manifest is refused.
pub fn decode_for(bytes: &[u8], digest: &Digest) -> Result<Profile> {
    let p = Profile::decode(bytes)?;
    if p.manifest != *digest {
        return Err(thaw_format::ProfileError::OtherManifest {
            expected: *digest,
            got: p.manifest,
        }
        .into());
    }
    Ok(p)
}

/// Merges `recorded` into the profile stored for its manifest (if any, and
/// intact) and uploads the result; returns what was uploaded.
pub async fn save(remote: &Remote, recorded: Profile) -> Result<Profile> {
    let digest = recorded.manifest;
    let merged = match fetch(remote, &digest).await {
        Ok(Some(stored)) => Profile::merge(&[stored, recorded])?,
        Ok(None) => recorded,
        Err(ClientError::Profile(e)) => {
            tracing::warn!(%digest, "the stored profile is unusable and is replaced: {e}");
            recorded
        }
        Err(e) => return Err(e),
    };
    remote
        .put_profile(&digest, Bytes::from(merged.encode()))
        .await?;
    Ok(merged)
}

/// An image with a profile: the previous version of an image being pushed.
#[derive(Debug, Clone)]
pub struct Profiled {
    pub digest: Digest,
    pub manifest: Manifest,
    pub profile: Profile,
}

/// The image `r` names and its profile, if it has both.
pub async fn profiled(remote: &Remote, r: &ImageRef) -> Result<Option<Profiled>> {
    let digest = match remote.resolve(r).await {
        Ok(digest) => digest,
        Err(ClientError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(profile) = fetch(remote, &digest).await? else {
        return Ok(None);
    };
    let manifest = remote.manifest(&digest).await?.manifest;
    Ok(Some(Profiled {
        digest,
        manifest,
        profile,
    }))
}

/// Gives manifest `new` (named `new_digest`), unless it has a profile
/// already, the profile of `old` carried over (`Profile::carry_to`: the
/// chunks of `new` that hold what `old`'s start read, in that order).
/// Returns the carried profile, if one was uploaded.
pub async fn carry(
    remote: &Remote,
    old: &Profiled,
    new: &Manifest,
    new_digest: &Digest,
) -> Result<Option<Profile>> {
    if old.digest == *new_digest || remote.profile(new_digest).await?.is_some() {
        return Ok(None);
    }
    let carried = old.profile.carry_to(&old.manifest, new, *new_digest);
    if carried.working_set().next().is_none() {
        return Ok(None);
    }
    remote
        .put_profile(new_digest, Bytes::from(carried.encode()))
        .await?;
    Ok(Some(carried))
}

/// A profile in numbers (`thaw inspect`, `thaw profile record`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileSummary {
    /// Recordings merged.
    pub runs: u32,
    /// Chunks listed, and their uncompressed bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// The working set a replay streams: chunks read in at least half of the runs.
    pub working_set_chunks: u64,
    pub working_set_bytes: u64,
    /// Chunks readahead fetched that no read asked for.
    pub readahead_only: u64,
    /// Files read, and the bytes read from them.
    pub files: u64,
    pub read_bytes: u64,
    /// When the last chunk of the working set was first touched, in ms from the start.
    pub last_touch_ms: u32,
}

impl ProfileSummary {
    pub fn of(p: &Profile) -> ProfileSummary {
        let ws: Vec<_> = p.working_set().collect();
        let ranges = || p.entries.iter().flat_map(|e| &e.ranges);
        ProfileSummary {
            runs: p.runs,
            chunks: p.entries.len() as u64,
            bytes: p.entries.iter().map(|e| u64::from(e.len)).sum(),
            working_set_chunks: ws.len() as u64,
            working_set_bytes: ws.iter().map(|e| u64::from(e.len)).sum(),
            readahead_only: p.entries.iter().filter(|e| e.reads == 0).count() as u64,
            files: ranges().map(|r| r.node).collect::<HashSet<_>>().len() as u64,
            read_bytes: ranges().map(|r| u64::from(r.len)).sum(),
            last_touch_ms: ws.iter().map(|e| e.at_ms).max().unwrap_or(0),
        }
    }
}
