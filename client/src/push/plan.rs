//! Cutting walked files into chunks: units of work, hashing, and assembling
//! the chunk table and extents.
//!
//! A unit is what one worker reads and hashes at once: a fixed-size range of a
//! large file, a whole large file under content-defined chunking, or a pack of
//! small files that become one shared chunk. Each file is read once; a file
//! whose metadata changed between the walk and the end of hashing fails the
//! push ([`check_stamps`]), since its bytes may be torn.

use super::walk::{Stamp, Walked};
use crate::error::{ClientError, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use thaw_format::{is_zero, ChunkRef, Chunking, ChunkingMode, Digest, Extent, NodeKind};

/// One piece of work for a hashing worker.
#[derive(Debug, Clone)]
pub(crate) enum Unit {
    Range {
        file: u32,
        offset: u64,
        len: u64,
    },
    Cdc {
        file: u32,
    },
    /// Small files packed back to back.
    Pack {
        files: Vec<Packed>,
    },
}

/// A small file in a pack: node `file`, `size` bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Packed {
    file: u32,
    size: u64,
}

/// The pack being filled: its unit and the bytes in it so far.
#[derive(Debug, Clone, Copy)]
struct OpenPack {
    unit: usize,
    used: u64,
}

/// Where the bytes of node `file` come from, in order.
struct FileParts {
    file: u32,
    parts: Vec<Part>,
}

/// A manifest's chunk table and extents, assembled from hashed pieces.
pub(crate) struct Assembled {
    pub chunks: Vec<ChunkRef>,
    pub extents: Vec<Extent>,
}

/// A chunk found in a unit, `len` bytes long; `id` is `None` when they are
/// all zeros (a hole).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub id: Option<Digest>,
    pub len: u64,
}

/// How a file's bytes map onto units.
enum Part {
    /// All pieces of a unit, in order.
    Whole(usize),
    /// `len` bytes at `offset` inside a pack unit.
    InPack { unit: usize, offset: u64, len: u64 },
}

pub(crate) struct Plan {
    pub units: Vec<Unit>,
    files: Vec<FileParts>,
    /// `units[..leading_packs]` hold the small files a start reads, in the
    /// order it reads them; their chunks lead the chunk table.
    leading_packs: usize,
}

/// Packs small files back to back into units of at most the chunk size.
#[derive(Default)]
struct Packer {
    open: Option<OpenPack>,
}

impl Packer {
    /// Adds small file `file` of `size` bytes to the open pack, or to a new
    /// one when it does not fit; says where its bytes are.
    fn add(&mut self, units: &mut Vec<Unit>, file: u32, size: u64, chunk_size: u64) -> Part {
        let OpenPack { unit, used } = match self.open {
            Some(p) if p.used + size <= chunk_size => p,
            _ => {
                units.push(Unit::Pack { files: Vec::new() });
                OpenPack {
                    unit: units.len() - 1,
                    used: 0,
                }
            }
        };
        if let Unit::Pack { files: members } = &mut units[unit] {
            members.push(Packed { file, size });
        }
        self.open = Some(OpenPack {
            unit,
            used: used + size,
        });
        Part::InPack {
            unit,
            offset: used,
            len: size,
        }
    }
}

/// Splits the walked files into units. The small files in `read_first`
/// (node indices, the order a start reads them) are packed first, together
/// and in that order; the other small files follow in tree order, in packs
/// of their own, so files a start does not read do not dilute its packs.
pub(crate) fn plan(w: &Walked, chunking: &Chunking, read_first: &[u32]) -> Plan {
    let cs = u64::from(chunking.chunk_size());
    let small = |i: u32| {
        let n = &w.nodes[i as usize];
        matches!(n.kind, NodeKind::File { .. }) && n.size > 0 && n.size < chunking.pack_threshold()
    };
    let mut units = Vec::new();
    let mut files = Vec::new();
    let mut packer = Packer::default();
    let mut placed: HashMap<u32, Part> = HashMap::new();
    for &i in read_first {
        if (i as usize) < w.nodes.len() && small(i) && !placed.contains_key(&i) {
            let part = packer.add(&mut units, i, w.nodes[i as usize].size, cs);
            placed.insert(i, part);
        }
    }
    let leading_packs = units.len();
    packer = Packer::default();
    for (i, node) in w.nodes.iter().enumerate() {
        if !matches!(node.kind, NodeKind::File { .. }) {
            continue;
        }
        let (i, size) = (i as u32, node.size);
        if size == 0 {
            files.push(FileParts {
                file: i,
                parts: Vec::new(),
            });
        } else if small(i) {
            let part = match placed.remove(&i) {
                Some(part) => part,
                None => packer.add(&mut units, i, size, cs),
            };
            files.push(FileParts {
                file: i,
                parts: vec![part],
            });
        } else if chunking.mode == ChunkingMode::Cdc {
            files.push(FileParts {
                file: i,
                parts: vec![Part::Whole(units.len())],
            });
            units.push(Unit::Cdc { file: i });
        } else {
            let mut parts = Vec::new();
            for offset in (0..size).step_by(cs as usize) {
                parts.push(Part::Whole(units.len()));
                units.push(Unit::Range {
                    file: i,
                    offset,
                    len: cs.min(size - offset),
                });
            }
            files.push(FileParts { file: i, parts });
        }
    }
    Plan {
        units,
        files,
        leading_packs,
    }
}

fn open(w: &Walked, file: u32) -> Result<File> {
    let path = &w.paths[file as usize];
    File::open(path).map_err(|e| ClientError::io(path, e))
}

fn read_at(w: &Walked, f: &File, file: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
    f.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ClientError::Changed {
            path: w.paths[file as usize].clone(),
        },
        _ => ClientError::io(&w.paths[file as usize], e),
    })
}

/// Reads `len` bytes at `offset` of a unit's data.
pub(crate) fn read_unit(w: &Walked, unit: &Unit, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    match unit {
        Unit::Range {
            file, offset: base, ..
        } => read_at(w, &open(w, *file)?, *file, base + offset, &mut buf)?,
        Unit::Cdc { file } => read_at(w, &open(w, *file)?, *file, offset, &mut buf)?,
        Unit::Pack { files } => {
            let mut at = 0usize;
            for p in files {
                let end = at + p.size as usize;
                read_at(w, &open(w, p.file)?, p.file, 0, &mut buf[at..end])?;
                at = end;
            }
        }
    }
    Ok(buf)
}

/// Whether `[offset, offset + len)` of `f` is entirely a hole, by
/// `SEEK_DATA`: the next data at or after `offset` starts past the range (or
/// there is none). Any doubt (a filesystem without `SEEK_DATA`) says no.
fn in_hole(f: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own; it only moves the file offset,
    // which positioned reads do not use.
    let next = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
}

fn piece(data: &[u8]) -> Piece {
    let id = (!is_zero(data)).then(|| Digest::of(data));
    Piece {
        id,
        len: data.len() as u64,
    }
}

/// Reads and hashes one unit, handing each piece and its bytes to `emit` in order.
pub(crate) fn hash_unit(
    w: &Walked,
    unit: &Unit,
    chunking: &Chunking,
    emit: &mut dyn FnMut(Piece, Vec<u8>) -> Result<()>,
) -> Result<()> {
    match unit {
        Unit::Range { file, offset, len } => {
            if in_hole(&open(w, *file)?, *offset, *len) {
                // Never read: a sparse file's holes cost a seek, not a read of zeros.
                return emit(
                    Piece {
                        id: None,
                        len: *len,
                    },
                    Vec::new(),
                );
            }
            let data = read_unit(w, unit, 0, *len)?;
            emit(piece(&data), data)
        }
        Unit::Pack { files } => {
            let data = read_unit(w, unit, 0, files.iter().map(|f| f.size).sum())?;
            emit(piece(&data), data)
        }
        Unit::Cdc { file } => {
            let path = &w.paths[*file as usize];
            let f = std::io::BufReader::with_capacity(1 << 20, open(w, *file)?);
            let mut total = 0;
            for c in thaw_format::cdc_stream(f, chunking) {
                let data = c.map_err(|e| ClientError::io(path, e))?.data;
                total += data.len() as u64;
                emit(piece(&data), data)?;
            }
            if total != w.nodes[*file as usize].size {
                return Err(ClientError::Changed { path: path.clone() });
            }
            Ok(())
        }
    }
}

/// Fails if any file changed since it was walked: its data may be torn.
pub(crate) fn check_stamps(w: &Walked) -> Result<()> {
    for (&file, stamp) in &w.stamps {
        let path = &w.paths[file as usize];
        let md = std::fs::symlink_metadata(path).map_err(|e| ClientError::io(path, e))?;
        if Stamp::of(&md) != *stamp {
            return Err(ClientError::Changed { path: path.clone() });
        }
    }
    Ok(())
}

/// Fills in file extents on the walked nodes and builds the deduplicated chunk table.
pub(crate) fn assemble(w: &mut Walked, plan: &Plan, pieces: &[Vec<Piece>]) -> Assembled {
    let mut chunks = Vec::new();
    let mut index: HashMap<Digest, u32> = HashMap::new();
    let mut chunk_of = |p: &Piece, chunks: &mut Vec<ChunkRef>| -> Option<u32> {
        let id = p.id?;
        Some(*index.entry(id).or_insert_with(|| {
            chunks.push(ChunkRef {
                id,
                len: p.len as u32,
            });
            chunks.len() as u32 - 1
        }))
    };
    // The packs a start reads first take the first chunk indices, in order.
    for unit in &pieces[..plan.leading_packs] {
        chunk_of(&unit[0], &mut chunks);
    }
    let mut extents: Vec<Extent> = Vec::new();
    for FileParts { file, parts } in &plan.files {
        let start = extents.len() as u32;
        // Adjacent holes of one file merge into one extent.
        let push = |e: Extent, extents: &mut Vec<Extent>| {
            let mergeable = extents.len() as u32 > start && e.chunk.is_none();
            match extents.last_mut() {
                Some(last) if mergeable && last.chunk.is_none() => last.len += e.len,
                _ => extents.push(e),
            }
        };
        for part in parts {
            match *part {
                Part::Whole(unit) => {
                    for p in &pieces[unit] {
                        let chunk = chunk_of(p, &mut chunks);
                        push(
                            Extent {
                                chunk,
                                offset: 0,
                                len: p.len,
                            },
                            &mut extents,
                        );
                    }
                }
                Part::InPack { unit, offset, len } => {
                    let p = &pieces[unit][0];
                    let chunk = chunk_of(p, &mut chunks);
                    let offset = if chunk.is_some() { offset as u32 } else { 0 };
                    push(Extent { chunk, offset, len }, &mut extents);
                }
            }
        }
        w.nodes[*file as usize].kind = NodeKind::File {
            extents: start..extents.len() as u32,
        };
    }
    Assembled { chunks, extents }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pack members of `unit`, by file name.
    fn members(w: &Walked, unit: &Unit) -> Vec<String> {
        match unit {
            Unit::Pack { files } => files
                .iter()
                .map(|p| String::from_utf8_lossy(&w.nodes[p.file as usize].name).into_owned())
                .collect(),
            _ => panic!("not a pack"),
        }
    }

    #[test]
    fn the_files_a_start_reads_are_packed_first_in_read_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c", "d", "e", "f"] {
            std::fs::write(dir.path().join(name), vec![1u8; 100 << 10]).unwrap();
        }
        let w = super::super::walk::walk(dir.path()).unwrap();
        let index = |name: &str| {
            let i = w.nodes.iter().position(|n| n.name == name.as_bytes());
            i.unwrap() as u32
        };
        let chunking = Chunking::default();
        let p = plan(&w, &chunking, &[]);
        let packs: Vec<_> = p.units.iter().map(|u| members(&w, u)).collect();
        assert_eq!(packs, [["a", "b", "c", "d", "e", "f"]]);
        assert_eq!(p.leading_packs, 0);
        let p = plan(
            &w,
            &chunking,
            &[index("f"), index("b"), index("e"), index("b")],
        );
        let packs: Vec<_> = p.units.iter().map(|u| members(&w, u)).collect();
        assert_eq!(packs, [vec!["f", "b", "e"], vec!["a", "c", "d"]]);
        assert_eq!(p.leading_packs, 1);
    }
}
