use super::*;
use proptest::prelude::*;

fn dir(parent: u32, name: &str, children: Range<u32>) -> Node {
    Node {
        parent,
        name: name.as_bytes().to_vec(),
        kind: NodeKind::Dir { children },
        mode: 0o40755,
        uid: 0,
        gid: 0,
        mtime_ns: 1_700_000_000_123_456_789,
        size: 0,
        xattrs: 0..0,
    }
}

/// A non-directory node; its mode's type bits follow its kind (hardlinks
/// here always name regular files).
fn node(parent: u32, name: &str, kind: NodeKind, size: u64) -> Node {
    let mode = match kind {
        NodeKind::Symlink { .. } => 0o120777,
        NodeKind::CharDev { .. } => 0o20600,
        NodeKind::Fifo => 0o10644,
        _ => 0o100644,
    };
    Node {
        kind,
        size,
        mode,
        ..dir(parent, name, 0..0)
    }
}

/// root/{a (dir), b (file, 2 extents), c -> b (hardlink), d -> "b" (symlink)}, a/{x (fifo)}
fn sample() -> Manifest {
    let id = Digest::of(b"chunk");
    Manifest {
        chunk_size: 1 << 20,
        chunks: vec![ChunkRef { id, len: 5 }],
        nodes: vec![
            dir(0, "", 1..5),
            dir(0, "a", 5..6),
            Node {
                xattrs: 0..1,
                ..node(0, "b", NodeKind::File { extents: 0..2 }, 4096 + 3)
            },
            node(0, "c", NodeKind::Hardlink { target: 2 }, 4099),
            node(
                0,
                "d",
                NodeKind::Symlink {
                    target: b"b".to_vec(),
                },
                1,
            ),
            node(1, "x", NodeKind::Fifo, 0),
        ],
        extents: vec![
            Extent {
                chunk: None,
                offset: 0,
                len: 4096,
            },
            Extent {
                chunk: Some(0),
                offset: 1,
                len: 3,
            },
        ],
        xattrs: vec![Xattr {
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
        }],
    }
}

#[test]
fn golden_manifest_bytes() {
    // The fixture predates the check of mode type bits: its symlink and fifo
    // were written with a regular file's mode. Encoding does not validate,
    // and these bytes must not move.
    let mut golden = sample();
    golden.nodes[4].mode = 0o100644;
    golden.nodes[5].mode = 0o100644;
    let bytes = golden.encode();
    // format changed: bump MANIFEST_VERSION if this digest has to change.
    assert_eq!(bytes.len(), 64 + 40 + 6 * 64 + 2 * 16 + 16 + 13);
    assert_eq!(&bytes[..12], b"THAWMNF\0\x01\x00\x00\x00");
    assert_eq!(
        Digest::of(&bytes).to_string(),
        GOLDEN_DIGEST,
        "format changed: bump the version (MANIFEST_VERSION) and update docs/format.md"
    );
}

const GOLDEN_DIGEST: &str =
    "blake3:8396138720b76ffda47da55c674ec81c7b5d193208369b6577bab8e46c30bb20";

#[test]
fn round_trip_and_queries() {
    let m = sample();
    m.validate().unwrap();
    let bytes = m.encode();
    let d = Manifest::decode_verified(&bytes, &Digest::of(&bytes)).unwrap();
    assert_eq!(d, m);
    assert_eq!(d.lookup(ROOT, b"b"), Some(2));
    assert_eq!(d.lookup(ROOT, b"zz"), None);
    assert_eq!(d.lookup(1, b"x"), Some(5));
    assert_eq!(d.path(5), b"a/x");
    assert_eq!(d.file_extents(3).len(), 2);
    assert_eq!(d.logical_bytes(), 4099);
    assert!(Manifest::decode_verified(&bytes, &Digest::of(b"x")).is_err());
}

#[test]
fn rejects_invalid_trees() {
    type Mutation = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "dotdot name",
            Box::new(|m| m.nodes[1].name = b"..".to_vec()),
        ),
        (
            "slash name",
            Box::new(|m| m.nodes[1].name = b"a/b".to_vec()),
        ),
        ("unsorted", Box::new(|m| m.nodes.swap(3, 4))),
        ("size", Box::new(|m| m.nodes[2].size = 1)),
        ("overrun", Box::new(|m| m.extents[1].len = 9)),
        ("missing chunk", Box::new(|m| m.extents[1].chunk = Some(7))),
        (
            "hardlink to dir",
            Box::new(|m| m.nodes[3].kind = NodeKind::Hardlink { target: 1 }),
        ),
        (
            "cycle",
            Box::new(|m| m.nodes[1].kind = NodeKind::Dir { children: 0..1 }),
        ),
        (
            "orphan",
            Box::new(|m| m.nodes[1].kind = NodeKind::Dir { children: 5..5 }),
        ),
        ("xattrs", Box::new(|m| m.nodes[2].xattrs = 0..9)),
        ("root kind", Box::new(|m| m.nodes[0].kind = NodeKind::Fifo)),
        (
            "dir with a file mode",
            Box::new(|m| m.nodes[1].mode = 0o100755),
        ),
        (
            "file with a dir mode",
            Box::new(|m| m.nodes[2].mode = 0o40644),
        ),
        (
            "file without type bits",
            Box::new(|m| m.nodes[2].mode = 0o644),
        ),
        (
            "symlink with a file mode",
            Box::new(|m| m.nodes[4].mode = 0o100777),
        ),
        (
            "fifo with a socket mode",
            Box::new(|m| m.nodes[5].mode = 0o140644),
        ),
        (
            "hardlink of another type than its target",
            Box::new(|m| m.nodes[3].mode = 0o20644),
        ),
        ("empty xattr name", Box::new(|m| m.xattrs[0].name.clear())),
        (
            "NUL in an xattr name",
            Box::new(|m| m.xattrs[0].name = b"user.a\0b".to_vec()),
        ),
        (
            "long xattr name",
            Box::new(|m| m.xattrs[0].name = [b'x'; 256].to_vec()),
        ),
        (
            "large xattr value",
            Box::new(|m| m.xattrs[0].value = vec![0; (64 << 10) + 1]),
        ),
    ];
    for (what, mutate) in cases {
        let mut m = sample();
        mutate(&mut m);
        assert!(m.validate().is_err(), "{what} accepted");
        assert!(Manifest::decode(&m.encode()).is_err(), "{what} decoded");
    }
}

#[test]
fn rejects_malformed_bytes() {
    let good = sample().encode();
    for cut in [0, 10, 63, 64, 100, good.len() - 1] {
        assert!(
            Manifest::decode(&good[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        Manifest::decode(&long),
        Err(ManifestError::TrailingBytes(1))
    ));
    let mut bad = good.clone();
    bad[8] = 2;
    assert!(matches!(
        Manifest::decode(&bad),
        Err(ManifestError::UnsupportedVersion(2))
    ));
    let mut huge = good.clone();
    huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Manifest::decode(&huge),
        Err(ManifestError::Truncated(_))
    ));
    // Any single corrupted byte is refused or decodes to a valid manifest: never a panic.
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0xff;
        if let Ok(m) = Manifest::decode(&b) {
            m.validate().unwrap();
        }
    }
}

/// A random flat tree: files with random extents, symlinks and hardlinks.
fn arb_manifest() -> impl Strategy<Value = Manifest> {
    let entry = (
        0u8..4,
        proptest::collection::vec((any::<bool>(), 1u32..5000), 0..4),
        "[a-z0-9 ._é-]{1,12}",
    );
    (proptest::collection::vec(entry, 0..30), 1usize..4).prop_map(|(entries, n_chunks)| {
        let chunks: Vec<ChunkRef> = (0..n_chunks)
            .map(|i| ChunkRef {
                id: Digest::of(&[i as u8]),
                len: 5000,
            })
            .collect();
        let mut names: Vec<_> = entries.into_iter().map(|(k, e, n)| (n, k, e)).collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        names.dedup_by(|a, b| a.0 == b.0);
        names.retain(|n| n.0 != "." && n.0 != "..");
        let count = names.len() as u32;
        let mut m = Manifest {
            chunk_size: 1 << 16,
            chunks,
            nodes: vec![dir(0, "", 1..1 + count)],
            ..Default::default()
        };
        let mut first_file = None;
        for (name, kind, extents) in names {
            let i = m.nodes.len() as u32;
            let n = match (kind, first_file) {
                (1, _) => node(
                    0,
                    &name,
                    NodeKind::Symlink {
                        target: name.clone().into_bytes(),
                    },
                    name.len() as u64,
                ),
                (2, Some((t, size))) => node(0, &name, NodeKind::Hardlink { target: t }, size),
                (3, _) => node(
                    0,
                    &name,
                    NodeKind::CharDev {
                        rdev: u64::from(i) << 33 | 7,
                    },
                    0,
                ),
                _ => {
                    let start = m.extents.len() as u32;
                    let mut size = 0;
                    for (hole, len) in extents {
                        let chunk = (!hole).then_some(len % n_chunks as u32);
                        m.extents.push(Extent {
                            chunk,
                            offset: 0,
                            len: u64::from(len),
                        });
                        size += u64::from(len);
                    }
                    first_file.get_or_insert((i, size));
                    node(
                        0,
                        &name,
                        NodeKind::File {
                            extents: start..m.extents.len() as u32,
                        },
                        size,
                    )
                }
            };
            m.nodes.push(n);
        }
        m
    })
}

proptest! {
    #[test]
    fn manifest_round_trip(m in arb_manifest()) {
        m.validate().unwrap();
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }
}
