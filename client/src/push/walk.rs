//! Walks a directory tree, without following symlinks, into manifest nodes in
//! breadth-first order (the layout the manifest requires).

use crate::error::{ClientError, Result};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use thaw_format::{Node, NodeKind, Xattr};

/// What a file looked like when it was walked; a push fails if it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

impl Stamp {
    pub(crate) fn of(md: &Metadata) -> Stamp {
        Stamp {
            len: md.len(),
            mtime_ns: mtime_ns(md),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
        }
    }
}

/// The tree as nodes, with each node's path and, for regular files, its stamp.
pub(crate) struct Walked {
    pub nodes: Vec<Node>,
    pub xattrs: Vec<Xattr>,
    pub paths: Vec<PathBuf>,
    pub stamps: HashMap<u32, Stamp>,
}

fn mtime_ns(md: &Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

fn read_xattrs(path: &Path, out: &mut Vec<Xattr>) -> std::ops::Range<u32> {
    let start = out.len() as u32;
    // Filesystems without xattr support simply have none.
    if let Ok(names) = xattr::list(path) {
        let mut names: Vec<_> = names.collect();
        names.sort();
        for name in names {
            if let Ok(Some(value)) = xattr::get(path, &name) {
                out.push(Xattr {
                    name: name.as_bytes().to_vec(),
                    value,
                });
            }
        }
    }
    start..out.len() as u32
}

fn node_for(parent: u32, name: &[u8], md: &Metadata, path: &Path) -> Result<Node> {
    let ft = md.file_type();
    let (kind, size) = if ft.is_dir() {
        (NodeKind::Dir { children: 0..0 }, 0)
    } else if ft.is_file() {
        (NodeKind::File { extents: 0..0 }, md.len())
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| ClientError::io(path, e))?;
        let target = target.as_os_str().as_bytes().to_vec();
        let len = target.len() as u64;
        (NodeKind::Symlink { target }, len)
    } else if ft.is_char_device() {
        (NodeKind::CharDev { rdev: md.rdev() }, 0)
    } else if ft.is_block_device() {
        (NodeKind::BlockDev { rdev: md.rdev() }, 0)
    } else if ft.is_fifo() {
        (NodeKind::Fifo, 0)
    } else {
        (NodeKind::Socket, 0)
    };
    Ok(Node {
        parent,
        name: name.to_vec(),
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: mtime_ns(md),
        size,
        xattrs: 0..0,
    })
}

/// Walks `root` breadth-first. Children of each directory are sorted by name.
pub(crate) fn walk(root: &Path) -> Result<Walked> {
    let md = std::fs::symlink_metadata(root).map_err(|e| ClientError::io(root, e))?;
    if !md.is_dir() {
        return Err(ClientError::NotADirectory(root.to_path_buf()));
    }
    let mut w = Walked {
        nodes: Vec::new(),
        xattrs: Vec::new(),
        paths: Vec::new(),
        stamps: HashMap::new(),
    };
    let mut root_node = node_for(0, b"", &md, root)?;
    root_node.xattrs = read_xattrs(root, &mut w.xattrs);
    w.nodes.push(root_node);
    w.paths.push(root.to_path_buf());
    let mut first_link: HashMap<(u64, u64), u32> = HashMap::new();
    let mut i = 0;
    while i < w.nodes.len() {
        if w.nodes[i].is_dir() {
            let dir = w.paths[i].clone();
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| ClientError::io(&dir, e))? {
                let entry = entry.map_err(|e| ClientError::io(&dir, e))?;
                entries.push(entry.file_name());
            }
            entries.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let start = w.nodes.len() as u32;
            for name in entries {
                let path = dir.join(&name);
                let md = std::fs::symlink_metadata(&path).map_err(|e| ClientError::io(&path, e))?;
                let index = w.nodes.len() as u32;
                let mut node = node_for(i as u32, OsStr::as_bytes(&name), &md, &path)?;
                // Any non-directory may have several names; the first one seen is the target.
                if !md.is_dir() && md.nlink() > 1 {
                    if let Some(&target) = first_link.get(&(md.dev(), md.ino())) {
                        node.kind = NodeKind::Hardlink { target };
                    } else {
                        first_link.insert((md.dev(), md.ino()), index);
                    }
                }
                if matches!(node.kind, NodeKind::File { .. }) {
                    w.stamps.insert(index, Stamp::of(&md));
                }
                node.xattrs = read_xattrs(&path, &mut w.xattrs);
                w.nodes.push(node);
                w.paths.push(path);
            }
            w.nodes[i].kind = NodeKind::Dir {
                children: start..w.nodes.len() as u32,
            };
        }
        i += 1;
    }
    Ok(w)
}
