//! Facts derived from the manifest once, when an image is opened, so every
//! operation after that is a lookup: link counts, block counts, where each
//! extent starts in its file, and which chunks hold packed small files.

use thaw_format::{Manifest, NodeKind};

pub(crate) struct Layout {
    /// Link count of each node (directories: 2 + subdirectories).
    pub nlink: Vec<u32>,
    /// 512-byte blocks of data of each node (holes excluded).
    pub blocks: Vec<u64>,
    /// File offset of each extent (parallel to `Manifest::extents`).
    pub extent_starts: Vec<u64>,
    /// Whether each chunk holds packed small files.
    pub packed: Vec<bool>,
}

impl Layout {
    pub(crate) fn of(m: &Manifest) -> Layout {
        let n = m.nodes.len();
        let mut l = Layout {
            nlink: vec![1; n],
            blocks: vec![0; n],
            extent_starts: vec![0; m.extents.len()],
            packed: vec![false; m.chunks.len()],
        };
        let pack_threshold = m.pack_threshold();
        for (i, node) in m.nodes.iter().enumerate() {
            match &node.kind {
                NodeKind::Dir { children } => {
                    let subdirs = m.nodes[children.start as usize..children.end as usize]
                        .iter()
                        .filter(|c| c.is_dir())
                        .count();
                    l.nlink[i] = 2 + subdirs as u32;
                }
                NodeKind::Hardlink { target } => l.nlink[*target as usize] += 1,
                NodeKind::File { extents } => {
                    let mut at = 0;
                    for e in extents.start..extents.end {
                        l.extent_starts[e as usize] = at;
                        let ext = &m.extents[e as usize];
                        at += ext.len;
                        if let Some(c) = ext.chunk {
                            l.blocks[i] += ext.len.div_ceil(512);
                            if node.size < pack_threshold {
                                l.packed[c as usize] = true;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}
