//! Staging files that a crashed server left in a directory store.
//!
//! object_store's local store writes each object to a staging file next to
//! it, `<path>#<n>`, and renames it into place. A server killed in between
//! leaves the staging file behind: listings skip it and no write reuses it,
//! so it would stay forever. A server removes, when it starts, the staging
//! files last written before it started. A staging file of another server
//! writing to the same directory at that instant would go too; its write
//! then fails, and the client retries it.

use std::io;
use std::path::Path;
use std::time::SystemTime;

/// Whether `name` is a staging file's: `<name>#<digits>`. Names in the store
/// layout never hold a `#`.
fn is_staging(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(object, n)| {
        !object.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Removes the staging files under `dir` last modified before `cutoff`, and
/// returns how many it removed. Symbolic links are not followed.
pub(crate) fn sweep(dir: &Path, cutoff: SystemTime) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            removed += sweep(&entry.path(), cutoff)?;
        } else if kind.is_file()
            && entry.file_name().to_str().is_some_and(is_staging)
            && entry.metadata()?.modified()? < cutoff
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // Renamed into place or removed by another process meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names() {
        let hex = "ab".repeat(32);
        assert!(is_staging(&format!("{hex}#1")));
        assert!(is_staging("3.12#27"));
        for not in [hex.as_str(), "#1", "a#", "a#1x", "a#-1"] {
            assert!(!is_staging(not), "{not}");
        }
    }

    #[test]
    fn removes_only_old_staging_files() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = dir.path().join("chunks/ab");
        std::fs::create_dir_all(&chunks).unwrap();
        let old = chunks.join("abcd#1");
        let fresh = chunks.join("abcd#2");
        let object = chunks.join("abcd");
        for file in [&old, &fresh, &object] {
            std::fs::write(file, b"x").unwrap();
        }
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for file in [&old, &object] {
            let f = std::fs::File::options().write(true).open(file).unwrap();
            f.set_modified(hour_ago).unwrap();
        }
        let cutoff = SystemTime::now() - Duration::from_secs(60);
        assert_eq!(sweep(dir.path(), cutoff).unwrap(), 1);
        assert!(!old.exists());
        assert!(fresh.exists(), "a write in progress is left alone");
        assert!(object.exists());
    }
}
