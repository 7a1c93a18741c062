//! Verifying a slice of a chunk on its own.
//!
//! A chunk id is the BLAKE3 hash of the chunk's bytes, and BLAKE3 is a tree
//! hash over 1 KiB leaves. Cut a chunk into groups of [`GROUP_LEN`] bytes (a
//! power of two of leaves, so every group is a whole subtree of the hash
//! tree) and keep each group's chaining value beside the bytes: the outboard.
//! A slice is then checked by hashing only the groups it covers, putting
//! their chaining values in place of the stored ones and merging all of them
//! up to the root. The root equals the chunk id only if the slice's bytes and
//! every stored value are the ones the chunk was hashed from, so a damaged
//! outboard is caught like damaged data.
//!
//! A chunk of one group or less has no outboard: its slices are verified by
//! hashing the whole chunk, which is then as cheap.

use crate::Digest;
use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use std::ops::Range;

/// Bytes per group: 16 BLAKE3 leaves.
pub const GROUP_LEN: usize = 16 * 1024;
/// Bytes of one stored chaining value.
pub const CV_LEN: usize = 32;

/// How many chaining values the outboard of a `len`-byte chunk holds.
pub fn groups(len: usize) -> usize {
    if len <= GROUP_LEN {
        0
    } else {
        len.div_ceil(GROUP_LEN)
    }
}

/// The outboard of `data`: its groups' chaining values, in order.
pub fn outboard(data: &[u8]) -> Vec<u8> {
    match groups(data.len()) {
        0 => Vec::new(),
        _ => group_cvs(data).concat(),
    }
}

/// The chaining value of each group of `data`, hashed on every core.
fn group_cvs(data: &[u8]) -> Vec<ChainingValue> {
    use rayon::prelude::*;
    data.par_chunks(GROUP_LEN)
        .enumerate()
        .map(|(i, group)| group_cv(i, group))
        .collect()
}

/// Checks that `data` hashes to `id` and gives its outboard; the digest it
/// has instead if it does not. A reader is waiting: a chunk of several
/// groups is hashed on every core, a group per task.
pub fn check(data: &[u8], id: &Digest) -> Result<Vec<u8>, Digest> {
    if groups(data.len()) == 0 {
        let actual = Digest::of(data);
        return if actual == *id {
            Ok(Vec::new())
        } else {
            Err(actual)
        };
    }
    let cvs = group_cvs(data);
    let actual = Digest(*root(&cvs).as_bytes());
    if actual != *id {
        return Err(actual);
    }
    Ok(cvs.concat())
}

/// The bytes to read to verify `range` of a `len`-byte chunk: the whole
/// groups that cover it (the whole chunk if it has no outboard).
pub fn covering(len: usize, range: Range<usize>) -> Range<usize> {
    if groups(len) == 0 {
        return 0..len;
    }
    let start = range.start / GROUP_LEN * GROUP_LEN;
    let end = (range.end.div_ceil(GROUP_LEN) * GROUP_LEN).min(len);
    start..end
}

/// Whether `bytes`, read at `at` (a [`covering`] range's start) of the
/// `len`-byte chunk `id` whose outboard is `outboard`, are the chunk's bytes.
pub fn verify_slice(id: &Digest, len: usize, outboard: &[u8], at: usize, bytes: &[u8]) -> bool {
    let n = groups(len);
    if n == 0 {
        return at == 0 && bytes.len() == len && Digest::of(bytes) == *id;
    }
    let end = at + bytes.len();
    if outboard.len() != n * CV_LEN || !at.is_multiple_of(GROUP_LEN) || end > len {
        return false;
    }
    if end != len && !end.is_multiple_of(GROUP_LEN) {
        return false;
    }
    let mut cvs: Vec<ChainingValue> = outboard
        .chunks_exact(CV_LEN)
        .map(|c| c.try_into().expect("CV_LEN bytes"))
        .collect();
    let first = at / GROUP_LEN;
    for (k, group) in bytes.chunks(GROUP_LEN).enumerate() {
        cvs[first + k] = group_cv(first + k, group);
    }
    Digest(*root(&cvs).as_bytes()) == *id
}

fn group_cv(index: usize, group: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset((index * GROUP_LEN) as u64)
        .update(group)
        .finalize_non_root()
}

/// The root hash of two or more groups' chaining values. BLAKE3's tree puts
/// the largest power of two of leaves that leaves something on the right in
/// the left subtree; as groups are a power of two of leaves, that is the
/// largest power of two of groups below their count.
fn root(cvs: &[ChainingValue]) -> blake3::Hash {
    let left = split(cvs.len());
    merge_subtrees_root(&subtree(&cvs[..left]), &subtree(&cvs[left..]), Mode::Hash)
}

fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = split(cvs.len());
    merge_subtrees_non_root(&subtree(&cvs[..left]), &subtree(&cvs[left..]), Mode::Hash)
}

/// The largest power of two below `n` (n >= 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn every_slice_of_every_shape_verifies_against_the_chunk_id() {
        let lens = [
            0,
            1,
            GROUP_LEN,
            GROUP_LEN + 1,
            2 * GROUP_LEN,
            3 * GROUP_LEN - 5,
            5 * GROUP_LEN,
            (1 << 20) - 1,
            1 << 20,
            (4 << 20) + 123,
        ];
        for len in lens {
            let d = data(len);
            let id = Digest::of(&d);
            let ob = outboard(&d);
            assert_eq!(ob.len(), groups(len) * CV_LEN, "len {len}");
            assert_eq!(check(&d, &id), Ok(ob.clone()), "len {len}");
            let other = Digest::of(b"another chunk");
            assert_eq!(check(&d, &other), Err(id), "len {len}");
            let wanted = [
                0..len.min(1),
                len / 3..len / 2,
                len.saturating_sub(10)..len,
                0..len,
            ];
            for r in wanted {
                let c = covering(len, r.clone());
                assert!(
                    c.start <= r.start && r.end <= c.end,
                    "len {len} {r:?} {c:?}"
                );
                assert!(
                    verify_slice(&id, len, &ob, c.start, &d[c.clone()]),
                    "len {len} slice {c:?}"
                );
            }
        }
    }

    #[test]
    fn damaged_bytes_outboard_or_offsets_are_refused() {
        let len = 5 * GROUP_LEN + 77;
        let d = data(len);
        let id = Digest::of(&d);
        let ob = outboard(&d);
        let c = covering(len, 2 * GROUP_LEN + 5..2 * GROUP_LEN + 9);
        assert_eq!(c, 2 * GROUP_LEN..3 * GROUP_LEN);
        assert!(verify_slice(&id, len, &ob, c.start, &d[c.clone()]));

        let mut bad = d[c.clone()].to_vec();
        bad[100] ^= 1;
        assert!(!verify_slice(&id, len, &ob, c.start, &bad));
        // Any stored value of another group, damaged, is caught too.
        for g in [0, 1, 3, 5] {
            let mut ob2 = ob.clone();
            ob2[g * CV_LEN] ^= 1;
            assert!(
                !verify_slice(&id, len, &ob2, c.start, &d[c.clone()]),
                "group {g}"
            );
        }
        // The right bytes claimed at another offset, cut short, or beyond the end.
        assert!(!verify_slice(&id, len, &ob, GROUP_LEN, &d[c.clone()]));
        assert!(!verify_slice(
            &id,
            len,
            &ob,
            c.start,
            &d[c.start..c.end - 1]
        ));
        assert!(!verify_slice(
            &id,
            len,
            &ob,
            c.start + 1,
            &d[c.start + 1..c.end + 1]
        ));
        assert!(!verify_slice(&id, len, &ob[CV_LEN..], c.start, &d[c]));
        // A chunk without an outboard verifies only whole.
        let small = data(GROUP_LEN);
        let sid = Digest::of(&small);
        assert!(verify_slice(&sid, GROUP_LEN, &[], 0, &small));
        assert!(!verify_slice(&sid, GROUP_LEN, &[], 0, &small[..100]));
    }
}
