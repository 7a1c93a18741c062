//! The on-disk cache shared by every mount and backend on a host: verified
//! chunks and the manifests they belong to, within one byte budget.
//!
//! Layout under the cache directory (byte layouts in `docs/format.md`):
//!
//! ```text
//! v3/chunks/<2 hex>/<64 hex>   chunk bytes, their outboard, a 64-byte trailer
//! v3/manifests/<64 hex>        a manifest's encoding (named by its digest)
//! v3/profiles/<64 hex>         what the last attach on this host read from
//!                              that manifest's image (a profile's encoding)
//! v3/tmp/                      writes in progress
//! ```
//!
//! Chunk entries hold the uncompressed bytes at offset 0 and their header at
//! the end, so an entry's data is page-aligned in its file and can be mapped
//! as it is (guest memory restored from a snapshot wants exactly that); the
//! trailer repeats the chunk id and length, so an entry is checked against its
//! name before its bytes are hashed. Between the two sits the chunk's
//! outboard ([`thaw_format::outboard`]): a small read is answered by reading
//! and hashing only the 16 KiB groups it covers. A warm read costs one read
//! and a BLAKE3 check, no decompression.
//!
//! Writes go to a temporary file and are renamed into place, so readers (other
//! processes included) never see a partial entry. Every read is verified; a
//! bad entry is deleted and reported as corrupt, and the caller fetches again.
//! A failed write (a full disk) is an error the caller counts; the chunk is
//! still served from memory and the network. Eviction is least recently used
//! by mtime (hits refresh it) down to 90% of the budget, over chunks,
//! manifests and profiles alike. Each process tracks the size it believes the cache has and
//! rescans whenever it evicts, so processes sharing one directory converge on
//! the real size. A cache of an older layout (`v1/`) is removed when a cache
//! is opened: its entries cannot be read by this version.

use bytes::Bytes;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use thaw_format::{outboard, Digest, MAX_CHUNK_LEN};

const MAGIC: [u8; 4] = *b"THCE";
const VERSION: u8 = 3;
/// Length of a chunk entry's trailer.
pub const TRAILER: usize = 64;
const LAYOUT_DIR: &str = "v3";
/// Layouts this version cannot read, removed when a cache is opened.
const OLD_LAYOUT_DIRS: [&str; 2] = ["v1", "v2"];
/// Eviction passes at most per call (see [`DiskCache::evict`]).
const EVICT_PASSES: usize = 4;
/// Largest manifest the cache keeps.
const MANIFEST_MAX: u64 = crate::remote::MANIFEST_MAX as u64;

/// The result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    Hit(Bytes),
    Miss,
    /// The entry existed but failed verification; it has been removed.
    Corrupt,
}

/// A disk cache directory with a byte budget.
#[derive(Debug)]
pub struct DiskCache {
    root: PathBuf,
    budget: u64,
    used: AtomicU64,
    evicting: AtomicBool,
}

/// The trailer of a chunk entry of `len` bytes named `id`.
pub fn encode_trailer(id: &Digest, len: usize) -> [u8; TRAILER] {
    debug_assert!(len <= MAX_CHUNK_LEN);
    let mut h = [0u8; TRAILER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..44].copy_from_slice(&id.0);
    h
}

impl DiskCache {
    /// Opens (creating) the cache at `dir`. The current size is measured in the
    /// background so opening stays fast.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Arc<DiskCache>> {
        let root = dir.join(LAYOUT_DIR);
        for sub in ["tmp", "chunks", "manifests", "profiles"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let cache = Arc::new(DiskCache {
            root,
            budget,
            used: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
        });
        let (c, dir) = (cache.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            for old in OLD_LAYOUT_DIRS.map(|d| dir.join(d)) {
                if old.is_dir() {
                    let _ = std::fs::remove_dir_all(&old);
                }
            }
            let total: u64 = c.entries().iter().map(|e| e.len).sum();
            c.used.fetch_add(total, Ordering::Relaxed);
            if c.used.load(Ordering::Relaxed) > c.budget {
                c.evict();
            }
        });
        Ok(cache)
    }

    fn chunk_path(&self, id: &Digest) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("manifests").join(digest.to_hex())
    }

    fn profile_path(&self, manifest: &Digest) -> PathBuf {
        self.root.join("profiles").join(manifest.to_hex())
    }

    /// Looks up and verifies chunk `id` of `len` bytes.
    pub fn get(&self, id: &Digest, len: u32) -> Lookup {
        let path = self.chunk_path(id);
        let Some(bytes) = read_exact_file(&path, entry_len(len)) else {
            return Lookup::Miss;
        };
        let good = match bytes {
            Ok(b) => {
                let trailer = &b[b.len() - TRAILER..];
                let data = &b[..len as usize];
                let good = trailer == encode_trailer(id, len as usize) && Digest::of(data) == *id;
                good.then_some(b)
            }
            Err(_) => None,
        };
        let Some(bytes) = good else {
            return self.corrupt(id, &path);
        };
        touch(&path);
        Lookup::Hit(Bytes::from(bytes).slice(..len as usize))
    }

    /// Looks up bytes `range` of chunk `id` of `len` bytes, reading and
    /// verifying only the groups of the chunk that cover them (the whole
    /// chunk if it is too small to have an outboard).
    pub fn get_slice(&self, id: &Digest, len: u32, range: Range<usize>) -> Lookup {
        let len_usize = len as usize;
        if range.start > range.end || range.end > len_usize {
            return Lookup::Miss;
        }
        if outboard::groups(len_usize) == 0 || range.is_empty() {
            return match self.get(id, len) {
                Lookup::Hit(b) => Lookup::Hit(b.slice(range)),
                other => other,
            };
        }
        let path = self.chunk_path(id);
        let Ok(f) = std::fs::File::open(&path) else {
            return Lookup::Miss;
        };
        let cover = outboard::covering(len_usize, range.clone());
        let read = || -> std::io::Result<Option<Vec<u8>>> {
            use std::os::unix::fs::FileExt;
            if f.metadata()?.len() != entry_len(len) {
                return Ok(None);
            }
            let mut tail = vec![0u8; (entry_len(len) - u64::from(len)) as usize];
            f.read_exact_at(&mut tail, u64::from(len))?;
            let (ob, trailer) = tail.split_at(tail.len() - TRAILER);
            if trailer != encode_trailer(id, len_usize) {
                return Ok(None);
            }
            let mut bytes = vec![0u8; cover.len()];
            f.read_exact_at(&mut bytes, cover.start as u64)?;
            Ok(outboard::verify_slice(id, len_usize, ob, cover.start, &bytes).then_some(bytes))
        };
        let Ok(Some(bytes)) = read() else {
            return self.corrupt(id, &path);
        };
        touch(&path);
        let from = range.start - cover.start;
        Lookup::Hit(Bytes::from(bytes).slice(from..from + range.len()))
    }

    fn corrupt(&self, id: &Digest, path: &Path) -> Lookup {
        tracing::warn!(chunk = %id, path = %path.display(), "corrupt disk cache entry removed; fetching again");
        self.remove(path);
        Lookup::Corrupt
    }

    /// Whether an entry of the right size for chunk `id` of `len` bytes is
    /// there (not verified: [`DiskCache::get`] does that when it is read).
    pub fn contains(&self, id: &Digest, len: u32) -> bool {
        std::fs::metadata(self.chunk_path(id)).is_ok_and(|m| m.len() == entry_len(len))
    }

    /// Stores verified chunk bytes. Returns how many entries eviction removed.
    pub fn put(&self, id: &Digest, data: &[u8]) -> std::io::Result<u64> {
        self.put_verified(id, data, &outboard::outboard(data))
    }

    /// Stores verified chunk bytes with the outboard their check computed
    /// ([`outboard::check`]).
    pub fn put_verified(&self, id: &Digest, data: &[u8], outboard: &[u8]) -> std::io::Result<u64> {
        if data.len() > MAX_CHUNK_LEN {
            return Err(std::io::Error::other("chunk too large for the cache"));
        }
        if outboard.len() != outboard::groups(data.len()) * outboard::CV_LEN {
            return Err(std::io::Error::other("outboard of the wrong size"));
        }
        self.write(
            &self.chunk_path(id),
            &[data, outboard, &encode_trailer(id, data.len())],
        )
    }

    /// A cached manifest's encoding, if there; the caller verifies it against
    /// its digest and calls [`DiskCache::remove_manifest`] if it does not match.
    pub fn get_manifest(&self, digest: &Digest) -> Option<Bytes> {
        self.get_whole(&self.manifest_path(digest), MANIFEST_MAX)
    }

    /// A whole entry of at most `max` bytes (a larger one is removed).
    fn get_whole(&self, path: &Path, max: u64) -> Option<Bytes> {
        let len = std::fs::metadata(path).ok()?.len();
        if len > max {
            self.remove(path);
            return None;
        }
        let bytes = read_exact_file(path, len)?.ok()?;
        touch(path);
        Some(Bytes::from(bytes))
    }

    pub fn put_manifest(&self, digest: &Digest, bytes: &[u8]) -> std::io::Result<u64> {
        self.write(&self.manifest_path(digest), &[bytes])
    }

    pub fn remove_manifest(&self, digest: &Digest) {
        self.remove(&self.manifest_path(digest));
    }

    /// The local profile kept for manifest `digest`, if there; the caller
    /// checks it names that manifest and calls [`DiskCache::remove_profile`]
    /// if it does not decode.
    pub fn get_profile(&self, manifest: &Digest) -> Option<Bytes> {
        let max = thaw_format::profile::PROFILE_MAX_LEN as u64;
        self.get_whole(&self.profile_path(manifest), max)
    }

    /// Keeps `bytes` as the local profile of manifest `digest`, replacing
    /// the one there.
    pub fn put_profile(&self, manifest: &Digest, bytes: &[u8]) -> std::io::Result<u64> {
        self.write_entry(&self.profile_path(manifest), &[bytes], Replace::Yes)
    }

    pub fn remove_profile(&self, manifest: &Digest) {
        self.remove(&self.profile_path(manifest));
    }

    /// Writes `parts` to `path` through a temporary file, unless it exists.
    fn write(&self, path: &Path, parts: &[&[u8]]) -> std::io::Result<u64> {
        self.write_entry(path, parts, Replace::No)
    }

    /// Writes `parts` to `path` through a temporary file renamed into place:
    /// readers see the old entry or the new one, never none or a part.
    fn write_entry(&self, path: &Path, parts: &[&[u8]], replace: Replace) -> std::io::Result<u64> {
        let old = std::fs::symlink_metadata(path).ok().map(|m| m.len());
        if old.is_some() && replace == Replace::No {
            return Ok(0);
        }
        let name = path
            .file_name()
            .expect("entries have names")
            .to_string_lossy();
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{name}.{}.{:x}", std::process::id(), rand_u64()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            for p in parts {
                f.write_all(p)?;
            }
            std::fs::create_dir_all(path.parent().expect("entry has a parent"))?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let replaced = old.unwrap_or(0);
        let used = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some((u + len).saturating_sub(replaced))
            })
            .map_or(0, |u| (u + len).saturating_sub(replaced));
        Ok(if used > self.budget { self.evict() } else { 0 })
    }

    fn remove(&self, path: &Path) {
        let len = std::fs::symlink_metadata(path).map_or(0, |m| m.len());
        if std::fs::remove_file(path).is_ok() {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(len))
                });
        }
    }

    /// Every entry: chunks, manifests and profiles.
    fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.join("manifests"), self.root.join("profiles")];
        if let Ok(rd) = std::fs::read_dir(self.root.join("chunks")) {
            dirs.extend(rd.flatten().map(|d| d.path()));
        }
        for dir in dirs {
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(md) = f.metadata() {
                    out.push(Entry {
                        path: f.path(),
                        len: md.len(),
                        used_at: md.modified().unwrap_or(std::time::UNIX_EPOCH),
                    });
                }
            }
        }
        out
    }

    /// Deletes the least recently used entries until the cache is at 90% of its budget.
    pub fn evict(&self) -> u64 {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return 0;
        }
        let target = self.budget / 10 * 9;
        let mut removed = 0;
        // Writes that land while a pass runs skip evicting (this one is);
        // what they add is kept in the count, and another pass runs if they
        // took it over the budget again.
        for _ in 0..EVICT_PASSES {
            let before = self.used.load(Ordering::Relaxed);
            let mut entries = self.entries();
            entries.sort_by_key(|e| e.used_at);
            let mut total: u64 = entries.iter().map(|e| e.len).sum();
            for e in entries {
                if total <= target {
                    break;
                }
                if std::fs::remove_file(&e.path).is_ok() {
                    total -= e.len;
                    removed += 1;
                }
            }
            let added = self.used.load(Ordering::Relaxed).saturating_sub(before);
            self.used.store(total + added, Ordering::Relaxed);
            if total + added <= self.budget {
                break;
            }
        }
        self.evicting.store(false, Ordering::Release);
        removed
    }

    /// Bytes this process believes the cache holds.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Whether a write replaces an entry that is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    Yes,
    No,
}

/// A cache entry as eviction sees it.
struct Entry {
    path: PathBuf,
    len: u64,
    used_at: std::time::SystemTime,
}

/// The size of the entry of a chunk of `len` bytes.
fn entry_len(len: u32) -> u64 {
    (len as usize + outboard::groups(len as usize) * outboard::CV_LEN + TRAILER) as u64
}

/// Reads a file that must be exactly `len` bytes: `None` if it is missing,
/// an error if it has another size (never reading more than `len`).
fn read_exact_file(path: &Path, len: u64) -> Option<std::io::Result<Vec<u8>>> {
    let mut f = std::fs::File::open(path).ok()?;
    Some((|| {
        if f.metadata()?.len() != len {
            return Err(std::io::Error::other("entry has the wrong size"));
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    })())
}

/// Refreshes an entry's age for LRU eviction; best effort.
fn touch(path: &Path) {
    let _ = filetime::set_file_mtime(path, filetime::FileTime::now());
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: u64 = TRAILER as u64 + 1000;

    #[test]
    fn hit_miss_corrupt_evict() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 3 * ENTRY).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        let ids: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Miss));
        c.put(&ids[0], &chunks[0]).unwrap();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Hit(d) if d[..] == chunks[0][..]));
        // Flip one byte of the entry: detected and removed.
        let p = c.chunk_path(&ids[0]);
        let mut b = std::fs::read(&p).unwrap();
        b[10] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Corrupt));
        assert!(!p.exists());
        // A lookup with another length than the entry's is corrupt, not a short read.
        c.put(&ids[1], &chunks[1]).unwrap();
        assert!(matches!(c.get(&ids[1], 999), Lookup::Corrupt));
        // Over budget: the oldest entries go.
        for (i, id) in ids.iter().enumerate() {
            c.put(id, &chunks[i]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left: Vec<bool> = ids.iter().map(|id| c.chunk_path(id).exists()).collect();
        assert!(left.iter().filter(|x| **x).count() <= 3, "{left:?}");
        assert!(left[4], "the newest entry survives eviction");
        assert!(c.entries().iter().map(|e| e.len).sum::<u64>() <= 3 * ENTRY);
    }

    #[test]
    fn chunk_data_is_page_aligned_with_the_trailer_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let data = vec![9u8; 8192];
        let id = Digest::of(&data);
        c.put(&id, &data).unwrap();
        let raw = std::fs::read(c.chunk_path(&id)).unwrap();
        assert_eq!(raw[..8192], data[..], "data starts at offset 0");
        let t = &raw[8192..];
        assert_eq!(
            (&t[..4], t[4], &t[8..12], &t[12..44]),
            (&b"THCE"[..], 3u8, &8192u32.to_le_bytes()[..], &id.0[..]),
            "format changed: bump the version"
        );
    }

    #[test]
    fn a_slice_is_read_and_verified_alone_and_damage_to_it_or_the_outboard_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 30).unwrap();
        let g = outboard::GROUP_LEN;
        let data: Vec<u8> = (0..5 * g + 300).map(|i| (i % 251) as u8).collect();
        let (id, len) = (Digest::of(&data), data.len() as u32);
        assert!(matches!(c.get_slice(&id, len, 10..20), Lookup::Miss));
        c.put(&id, &data).unwrap();
        let p = c.chunk_path(&id);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(raw.len(), data.len() + 6 * outboard::CV_LEN + TRAILER);
        assert_eq!(
            raw[data.len()..data.len() + 6 * 32],
            outboard::outboard(&data)[..]
        );
        for r in [
            0..1,
            g - 1..g + 1,
            2 * g + 7..2 * g + 4103,
            5 * g..5 * g + 300,
            0..data.len(),
        ] {
            assert!(
                matches!(c.get_slice(&id, len, r.clone()), Lookup::Hit(b) if b[..] == data[r.clone()]),
                "{r:?}"
            );
        }
        assert!(matches!(c.get(&id, len), Lookup::Hit(b) if b[..] == data[..]));

        // A damaged byte outside the slice's groups does not matter to it;
        // inside them, the entry is corrupt and goes.
        let damage = |at: usize| {
            let mut b = std::fs::read(&p).unwrap();
            b[at] ^= 1;
            std::fs::write(&p, b).unwrap();
        };
        damage(4 * g + 1);
        assert!(matches!(c.get_slice(&id, len, 10..20), Lookup::Hit(b) if b[..] == data[10..20]));
        assert!(matches!(
            c.get_slice(&id, len, 4 * g..4 * g + 2),
            Lookup::Corrupt
        ));
        assert!(!p.exists());
        // So does one whose outboard is damaged.
        c.put(&id, &data).unwrap();
        damage(data.len() + 3 * outboard::CV_LEN + 5);
        assert!(matches!(c.get_slice(&id, len, 10..20), Lookup::Corrupt));
        assert!(!p.exists());
        // A slice of a chunk too small for an outboard reads it whole.
        let small = vec![7u8; 1000];
        let sid = Digest::of(&small);
        c.put(&sid, &small).unwrap();
        assert!(matches!(c.get_slice(&sid, 1000, 5..9), Lookup::Hit(b) if b[..] == small[5..9]));
    }

    #[test]
    fn manifests_share_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 2 * ENTRY).unwrap();
        let m = vec![1u8; 1000];
        let d = Digest::of(&m);
        c.put_manifest(&d, &m).unwrap();
        assert_eq!(c.get_manifest(&d).as_deref(), Some(&m[..]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        for i in 0..3u8 {
            let data = vec![i; 1000];
            c.put(&Digest::of(&data), &data).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            c.get_manifest(&d).is_none(),
            "the oldest entry, a manifest, was evicted"
        );
    }
}
