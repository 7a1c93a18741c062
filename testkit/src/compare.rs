//! Asserting that two trees are the same in everything push records: walked
//! without following symlinks, each entry's type, mode, owner, link count,
//! size, mtime in ns, device numbers, symlink target, content digest and
//! xattrs, and which names share an inode. Used for export (a copy on disk)
//! and for mounts (the same tree through FUSE).

use crate::tree::xattrs;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Asserts that two trees are the same; returns the number of entries.
pub fn assert_same_tree(source: &Path, copy: &Path) -> usize {
    let (a, b) = (snapshot(source), snapshot(copy));
    let keys: BTreeSet<&Vec<u8>> = a.entries.keys().chain(b.entries.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.entries.get(*k) != b.entries.get(*k))
        .map(|k| {
            format!(
                "{:?}\n  source: {:?}\n  copy:   {:?}",
                String::from_utf8_lossy(k),
                a.entries.get(k),
                b.entries.get(k)
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} entries differ between {} and {} (first 10):\n{}",
        diffs.len(),
        a.entries.len(),
        source.display(),
        copy.display(),
        diffs[..diffs.len().min(10)].join("\n")
    );
    assert_eq!(a.links, b.links, "hardlink groups differ");
    a.entries.len()
}

/// Bytes shown as escaped ASCII in failure messages.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    /// In octal.
    mode: String,
    uid: u32,
    gid: u32,
    nlink: u64,
    /// Not compared for directories (a filesystem detail).
    size: Option<u64>,
    mtime_ns: i128,
    rdev: u64,
    target: Option<Bytes>,
    blake3: Option<String>,
    xattrs: Vec<(Bytes, Bytes)>,
}

struct Snapshot {
    /// By path relative to the root, which is ".".
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Names that share an inode, for inodes with more than one name.
    links: BTreeSet<Vec<Vec<u8>>>,
}

fn snapshot(root: &Path) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut todo = vec![(root.to_path_buf(), b".".to_vec())];
    while let Some((path, rel)) = todo.pop() {
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        if md.is_dir() {
            for child in fs::read_dir(&path).expect("read_dir") {
                let name = child.expect("directory entry").file_name();
                let mut r = rel.clone();
                r.push(b'/');
                r.extend_from_slice(name.as_bytes());
                todo.push((path.join(&name), r));
            }
        } else if md.nlink() > 1 {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        entries.insert(rel, entry(&path, &md));
    }
    let links = inodes
        .into_values()
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    Snapshot { entries, links }
}

fn entry(path: &Path, md: &fs::Metadata) -> Entry {
    let ft = md.file_type();
    Entry {
        kind: kind(ft),
        mode: format!("{:o}", md.mode()),
        uid: md.uid(),
        gid: md.gid(),
        nlink: md.nlink(),
        size: (!ft.is_dir()).then(|| md.size()),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        rdev: md.rdev(),
        target: ft.is_symlink().then(|| {
            Bytes(
                fs::read_link(path)
                    .expect("readlink")
                    .into_os_string()
                    .into_vec(),
            )
        }),
        blake3: ft.is_file().then(|| hash_file(path)),
        xattrs: xattrs(path)
            .into_iter()
            .map(|(n, v)| (Bytes(n), Bytes(v)))
            .collect(),
    }
}

fn kind(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else {
        "block"
    }
}

fn hash_file(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    let f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    h.update_reader(f).expect("read");
    h.finalize().to_hex().to_string()
}
