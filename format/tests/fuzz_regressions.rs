//! Inputs the fuzz targets (`fuzz/`) once found problems with, kept so each
//! stays fixed. Every manifest input must either be refused or decode to a
//! manifest that encodes back to exactly the same bytes (one encoding per
//! manifest, so one digest per tree).

use thaw_format::Manifest;

fn check_manifest(name: &str) {
    let path = format!(
        "{}/tests/fuzz-regressions/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap();
    if let Ok(m) = Manifest::decode(&bytes) {
        assert_eq!(
            m.encode(),
            bytes,
            "{name}: decodes but does not re-encode to itself"
        );
    }
}

/// A hardlink node with a non-zero `b` field (unused for hardlinks) decoded
/// and re-encoded with zero: two encodings, two digests, one tree.
#[test]
fn manifest_unused_field() {
    check_manifest("manifest-unused-field.bin");
}

/// A name placed elsewhere in the string table than the encoder puts it
/// decoded fine and re-encoded differently: the decoder now accepts only the
/// encoder's layout.
#[test]
fn manifest_string_layout() {
    check_manifest("manifest-string-layout.bin");
}

/// A node outside every directory whose parent index points past the nodes
/// made validation index out of bounds (a panic) before it reported the orphan.
#[test]
fn manifest_orphan_parent() {
    check_manifest("manifest-orphan-parent.bin");
}

/// An extent whose offset plus length overflows u64: a panic in debug builds,
/// and in release a wrapped sum that passed the "extent overruns its chunk"
/// check.
#[test]
fn manifest_extent_overflow() {
    check_manifest("manifest-extent-overflow.bin");
}
