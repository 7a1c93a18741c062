use super::*;

fn entry(seed: &[u8], reads: u16, ranges: &[(u32, u64, u32)]) -> ProfileEntry {
    ProfileEntry {
        id: Digest::of(seed),
        len: 1 << 20,
        at_ms: 10,
        reads,
        readahead: false,
        ranges: ranges
            .iter()
            .map(|&(node, offset, len)| FileRange { node, offset, len })
            .collect(),
    }
}

fn sample() -> Profile {
    Profile {
        manifest: Digest::of(b"manifest"),
        runs: 2,
        entries: vec![
            entry(b"a", 2, &[(3, 0, 4096), (4, 100, 10)]),
            ProfileEntry {
                readahead: true,
                at_ms: 250,
                ..entry(b"b", 0, &[])
            },
            entry(b"c", 1, &[(7, 1 << 20, 1 << 20)]),
        ],
    }
}

/// Re-seals `bytes` after an edit, so the checks behind the checksum run.
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - TRAILER_LEN;
    let sum = blake3::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(sum.as_bytes());
    bytes
}

#[test]
fn round_trip() {
    let p = sample();
    assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
    let empty = Profile {
        entries: vec![],
        ..sample()
    };
    assert_eq!(Profile::decode(&empty.encode()).unwrap(), empty);
}

#[test]
fn golden_profile_bytes() {
    let bytes = sample().encode();
    assert_eq!(bytes.len(), 64 + 3 * 48 + 3 * 16 + 32);
    assert_eq!(&bytes[..12], b"THAWPRF\0\x01\x00\x00\x00");
    // runs, entries, ranges; then the first entry's length, time, range
    // count, reads and flags; then the first range (node, length, offset).
    assert_eq!(bytes[48..60], [2, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]);
    assert_eq!(
        bytes[96..112],
        [0, 0, 16, 0, 10, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]
    );
    assert_eq!(bytes[64 + 48 + 46], 1, "b's readahead flag");
    assert_eq!(
        bytes[208..224],
        [3, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &blake3::hash(&bytes).to_hex()[..16],
        "25910272561b2b7a",
        "format changed: bump PROFILE_VERSION and update docs/format.md"
    );
}

#[test]
fn damage_is_refused() {
    let good = sample().encode();
    assert_eq!(
        Profile::decode(&good[..good.len() - 1]),
        Err(ProfileError::Checksum)
    );
    assert_eq!(Profile::decode(&good[..40]), Err(ProfileError::Length));
    assert_eq!(Profile::decode(b"THAWMNF\0"), Err(ProfileError::BadMagic));
    for i in 8..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 1;
        assert!(Profile::decode(&bad).is_err(), "flipped byte {i} accepted");
    }
    let mut v2 = good.clone();
    v2[8] = 2;
    assert_eq!(
        Profile::decode(&v2),
        Err(ProfileError::UnsupportedVersion(2))
    );
}

/// A change to an encoding.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn inconsistent_profiles_are_refused_even_when_sealed() {
    let good = sample().encode();
    let entry0 = HEADER_LEN;
    let cases: [(&str, Edit); 6] = [
        ("flags", Box::new(|b| b[10] = 1)),
        ("reserved", Box::new(|b| b[60] = 1)),
        (
            "no runs",
            Box::new(|b| b[48..52].copy_from_slice(&0u32.to_le_bytes())),
        ),
        (
            "read more often than recorded",
            Box::new(move |b| b[entry0 + 44..entry0 + 46].copy_from_slice(&3u16.to_le_bytes())),
        ),
        ("entry flags", Box::new(move |b| b[entry0 + 46] = 0x80)),
        (
            "range counts",
            Box::new(move |b| b[entry0 + 40..entry0 + 44].copy_from_slice(&1u32.to_le_bytes())),
        ),
    ];
    for (what, edit) in cases {
        let mut b = good.clone();
        edit(&mut b);
        assert!(Profile::decode(&resealed(b)).is_err(), "{what} accepted");
    }
    let mut twice = sample();
    twice.entries[2].id = twice.entries[0].id;
    assert!(matches!(
        Profile::decode(&twice.encode()),
        Err(ProfileError::Invalid(_))
    ));
    let mut long = sample();
    long.entries[0].ranges[0].len = (1 << 20) + 1;
    assert!(
        Profile::decode(&long.encode()).is_err(),
        "a range longer than its chunk"
    );
}

#[test]
fn the_working_set_is_what_half_the_runs_read() {
    let ids: Vec<_> = sample().working_set().map(|e| e.id).collect();
    // b was only fetched by readahead; c was read in one run of two.
    assert_eq!(ids, [Digest::of(b"a"), Digest::of(b"c")]);
    let three = Profile {
        runs: 3,
        ..sample()
    };
    let ids: Vec<_> = three.working_set().map(|e| e.id).collect();
    assert_eq!(ids, [Digest::of(b"a")]);
}

fn run(ids: &[&[u8]]) -> Profile {
    Profile {
        manifest: Digest::of(b"manifest"),
        runs: 1,
        entries: ids
            .iter()
            .enumerate()
            .map(|(i, id)| ProfileEntry {
                at_ms: i as u32 * 100,
                ..entry(id, 1, &[(i as u32, 0, 10)])
            })
            .collect(),
    }
}

#[test]
fn merging_keeps_the_order_most_runs_agree_on() {
    let a = run(&[b"x", b"y", b"z"]);
    let b = run(&[b"x", b"z", b"y"]);
    let c = run(&[b"x", b"y", b"w", b"z"]);
    let m = Profile::merge(&[a.clone(), b, c]).unwrap();
    assert_eq!(m.runs, 3);
    let order: Vec<_> = m.entries.iter().map(|e| e.id).collect();
    let d = |s: &[u8]| Digest::of(s);
    assert_eq!(order, [d(b"x"), d(b"y"), d(b"w"), d(b"z")]);
    let reads: Vec<_> = m.entries.iter().map(|e| e.reads).collect();
    assert_eq!(reads, [3, 3, 1, 3]);
    // w was read once in three runs: not in the working set.
    assert_eq!(m.working_set().count(), 3);
    // Merging one at a time gives the same counts.
    let again = Profile::merge(&[Profile::merge(&[a.clone(), a.clone()]).unwrap(), a]).unwrap();
    assert_eq!(again.runs, 3);
    assert!(again.entries.iter().all(|e| e.reads == 3));
    assert_eq!(Profile::decode(&m.encode()).unwrap(), m);
}

#[test]
fn merging_joins_ranges_and_refuses_other_images() {
    let mut a = run(&[b"x"]);
    a.entries[0].ranges = vec![FileRange {
        node: 5,
        offset: 0,
        len: 100,
    }];
    let mut b = a.clone();
    b.entries[0].ranges = vec![
        FileRange {
            node: 5,
            offset: 50,
            len: 100,
        },
        FileRange {
            node: 6,
            offset: 0,
            len: 1,
        },
    ];
    let m = Profile::merge(&[a.clone(), b]).unwrap();
    assert_eq!(
        m.entries[0].ranges,
        [
            FileRange {
                node: 5,
                offset: 0,
                len: 150
            },
            FileRange {
                node: 6,
                offset: 0,
                len: 1
            }
        ]
    );
    let other = Profile {
        manifest: Digest::of(b"another"),
        ..a.clone()
    };
    assert!(matches!(
        Profile::merge(&[a, other]),
        Err(ProfileError::OtherManifest { .. })
    ));
}
