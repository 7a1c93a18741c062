//! The on-disk chunk cache shared by every mount on a host.
//!
//! Entries hold verified chunk bytes uncompressed, so a warm read costs a file
//! read and a BLAKE3 check, no decompression. Each entry is a file
//! `v1/<2 hex>/<64 hex>` with a 64-byte header (layout in `docs/format.md`):
//!
//! ```text
//! 0  magic "THCE"   4 | 4 version u8 = 1 | 5 flags u8 = 0 | 6 reserved u16
//! 8  length u32 LE    | 12 chunk id (32 bytes) | 44 reserved (20 zero bytes)
//! 64 chunk bytes
//! ```
//!
//! Writes go to a temporary file and are renamed into place, so readers (other
//! mounts included) never see a partial entry. Every read is verified; a bad
//! entry is deleted and reported as corrupt, and the caller fetches the chunk
//! again. A failed write (a full disk) is counted and otherwise ignored: the
//! chunk is still served from memory and the network. The cache is bounded by
//! a byte budget with least-recently-used eviction: hits refresh an entry's
//! mtime, and eviction deletes the oldest entries until the cache is at 90% of
//! its budget. Each mount tracks the size it believes the cache has and
//! rescans the directory whenever it evicts, so several mounts sharing one
//! directory converge on the real size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use thaw_format::Digest;

const MAGIC: [u8; 4] = *b"THCE";
const VERSION: u8 = 1;
const HEADER: usize = 64;

/// The result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    Hit(bytes::Bytes),
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

fn encode_header(id: &Digest, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..44].copy_from_slice(&id.0);
    h
}

impl DiskCache {
    /// Opens (creating) the cache at `dir`. The current size is measured in the
    /// background so opening stays fast.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<std::sync::Arc<DiskCache>> {
        let root = dir.join("v1");
        std::fs::create_dir_all(root.join("tmp"))?;
        let cache = std::sync::Arc::new(DiskCache {
            root,
            budget,
            used: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
        });
        let c = cache.clone();
        std::thread::spawn(move || {
            let total: u64 = c.entries().iter().map(|e| e.1).sum();
            c.used.fetch_add(total, Ordering::Relaxed);
            if c.used.load(Ordering::Relaxed) > c.budget {
                c.evict();
            }
        });
        Ok(cache)
    }

    fn path(&self, id: &Digest) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Looks up and verifies chunk `id` of `len` bytes.
    pub fn get(&self, id: &Digest, len: u32) -> Lookup {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(_) => return Lookup::Miss,
        };
        let good = bytes.len() == HEADER + len as usize
            && bytes[..HEADER] == encode_header(id, len as usize)
            && Digest::of(&bytes[HEADER..]) == *id;
        if !good {
            tracing::warn!(chunk = %id, path = %path.display(), "corrupt disk cache entry removed; fetching again");
            if std::fs::remove_file(&path).is_ok() {
                self.used.fetch_sub(
                    (bytes.len() as u64).min(self.used.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
            return Lookup::Corrupt;
        }
        // Refresh the entry's age for LRU eviction; best effort.
        let _ = filetime::set_file_mtime(&path, filetime::FileTime::now());
        Lookup::Hit(bytes::Bytes::from(bytes).slice(HEADER..))
    }

    /// Stores verified chunk bytes. Returns how many entries eviction removed.
    pub fn put(&self, id: &Digest, data: &[u8]) -> std::io::Result<u64> {
        let path = self.path(id);
        if path.exists() {
            return Ok(0);
        }
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{:x}",
            id.to_hex(),
            std::process::id(),
            rand_u64()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode_header(id, data.len()))?;
            f.write_all(data)?;
            std::fs::create_dir_all(path.parent().expect("entry has a parent"))?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let used = self
            .used
            .fetch_add((HEADER + data.len()) as u64, Ordering::Relaxed)
            + (HEADER + data.len()) as u64;
        Ok(if used > self.budget { self.evict() } else { 0 })
    }

    /// Every entry with its size and mtime.
    fn entries(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for d in dirs.flatten() {
            if d.file_name().len() != 2 {
                continue;
            }
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(md) = f.metadata() {
                    out.push((
                        f.path(),
                        md.len(),
                        md.modified().unwrap_or(std::time::UNIX_EPOCH),
                    ));
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
        let mut entries = self.entries();
        entries.sort_by_key(|e| e.2);
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        let target = self.budget / 10 * 9;
        let mut removed = 0;
        for (path, len, _) in entries {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                removed += 1;
            }
        }
        self.used.store(total, Ordering::Relaxed);
        self.evicting.store(false, Ordering::Release);
        removed
    }

    /// Bytes this mount believes the cache holds.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
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

    #[test]
    fn hit_miss_corrupt_evict() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 3 * (HEADER as u64 + 1000)).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        let ids: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Miss));
        c.put(&ids[0], &chunks[0]).unwrap();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Hit(d) if d[..] == chunks[0][..]));
        // Flip one byte of the entry: detected and removed.
        let p = c.path(&ids[0]);
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER + 10] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(c.get(&ids[0], 1000), Lookup::Corrupt));
        assert!(!p.exists());
        // Over budget: the oldest entries go.
        for (i, id) in ids.iter().enumerate() {
            c.put(id, &chunks[i]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left: Vec<bool> = ids.iter().map(|id| c.path(id).exists()).collect();
        assert!(left.iter().filter(|x| **x).count() <= 3, "{left:?}");
        assert!(left[4], "the newest entry survives eviction");
        assert!(c.entries().iter().map(|e| e.1).sum::<u64>() <= 3 * (HEADER as u64 + 1000));
    }
}
