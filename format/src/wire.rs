//! What the chunk server and its clients must agree on beyond frames and
//! manifests: the batch read record, the request limits, and the rule for
//! image names and tags.
//!
//! Both sides compile this one module, so a limit raised on the server cannot
//! leave clients sending requests it refuses, and a record parsed by the
//! client is the record the server wrote. The byte layout of a batch record is
//! in `docs/format.md`:
//!
//! ```text
//! 0  chunk id   32 bytes (raw BLAKE3)
//! 32 status     u8       0 = found, 1 = not found
//! 33 length     u32 LE   frame length (0 when not found)
//! 37 frame      `length` bytes
//! ```

use crate::frame::{FRAME_HEADER_LEN, MAX_CHUNK_LEN};
use crate::Digest;

/// Most ids in one `POST /v1/chunks/missing`.
pub const MISSING_MAX_IDS: usize = 100_000;
/// Most ids in one `POST /v1/chunks/batch`.
pub const BATCH_MAX_IDS: usize = 1024;
/// Largest tag body (a digest and some room).
pub const TAG_BODY_MAX: usize = 1024;
/// Largest profile body: the largest profile there can be.
pub const PROFILE_BODY_MAX: usize = crate::profile::PROFILE_MAX_LEN;
/// Largest stored frame: the largest chunk plus room for zstd's worst case
/// (the encoder stores incompressible chunks raw anyway).
pub const FRAME_MAX: usize = MAX_CHUNK_LEN + (1 << 20);

/// Room for the JSON of an id list of `n` ids: a quoted 71-character id and
/// a separator each (80 leaves room for whitespace), plus the envelope.
pub const fn id_list_body_max(n: usize) -> usize {
    n * 80 + 4096
}

/// Length of a batch record's header.
pub const RECORD_HEADER_LEN: usize = 37;
const FOUND: u8 = 0;
const NOT_FOUND: u8 = 1;

/// The header of one batch record; the frame (if found) follows it.
pub fn encode_record_header(id: &Digest, frame_len: Option<usize>) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..32].copy_from_slice(&id.0);
    match frame_len {
        Some(len) => {
            h[32] = FOUND;
            // Frames are bounded by FRAME_MAX, far below 4 GiB.
            h[33..37].copy_from_slice(&(len as u32).to_le_bytes());
        }
        None => h[32] = NOT_FOUND,
    }
    h
}

/// One record of a batch response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord<'a> {
    pub id: Digest,
    /// The frame, or `None` when the server does not store the chunk.
    pub frame: Option<&'a [u8]>,
}

/// Why a batch response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch response truncated at byte {0}")]
    Truncated(usize),
    #[error("batch record at byte {at} has unknown status {status}")]
    BadStatus { at: usize, status: u8 },
    #[error("batch record at byte {at} declares a {len}-byte frame, more than a frame can be")]
    TooLarge { at: usize, len: usize },
    #[error("batch record {index} is for {got}, expected {expected}")]
    WrongId {
        index: usize,
        expected: Digest,
        got: Digest,
    },
    #[error("batch response has {got} records for {expected} ids")]
    WrongCount { expected: usize, got: usize },
}

/// Parses a whole batch response and checks it answers `ids`, in order.
pub fn parse_batch<'a>(body: &'a [u8], ids: &[Digest]) -> Result<Vec<BatchRecord<'a>>, BatchError> {
    let mut out = Vec::with_capacity(ids.len().min(BATCH_MAX_IDS));
    let mut pos = 0usize;
    while pos < body.len() {
        let head = body
            .get(pos..pos + RECORD_HEADER_LEN)
            .ok_or(BatchError::Truncated(pos))?;
        let id = Digest(head[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(head[33..37].try_into().expect("4 bytes")) as usize;
        let frame = match head[32] {
            FOUND if len > FRAME_MAX => return Err(BatchError::TooLarge { at: pos, len }),
            FOUND if len < FRAME_HEADER_LEN => return Err(BatchError::Truncated(pos)),
            FOUND => {
                let start = pos + RECORD_HEADER_LEN;
                Some(
                    body.get(start..start + len)
                        .ok_or(BatchError::Truncated(start))?,
                )
            }
            NOT_FOUND => None,
            status => return Err(BatchError::BadStatus { at: pos, status }),
        };
        let index = out.len();
        match ids.get(index) {
            Some(expected) if *expected != id => {
                return Err(BatchError::WrongId {
                    index,
                    expected: *expected,
                    got: id,
                })
            }
            Some(_) => {}
            None => {
                return Err(BatchError::WrongCount {
                    expected: ids.len(),
                    got: index + 1,
                })
            }
        }
        pos += RECORD_HEADER_LEN + frame.map_or(0, <[u8]>::len);
        out.push(BatchRecord { id, frame });
    }
    if out.len() != ids.len() {
        return Err(BatchError::WrongCount {
            expected: ids.len(),
            got: out.len(),
        });
    }
    Ok(out)
}

/// Image names and tags: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`. They become
/// object paths on the server, so nothing else (no `/`, no `..`) is allowed.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn record(id: &Digest, frame: Option<&[u8]>) -> Vec<u8> {
        let mut v = encode_record_header(id, frame.map(<[u8]>::len)).to_vec();
        v.extend_from_slice(frame.unwrap_or_default());
        v
    }

    #[test]
    fn records_round_trip_in_order() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let fa = frame::encode(b"a", 3);
        let mut body = record(&a, Some(&fa));
        body.extend(record(&b, None));
        body.extend(record(&a, Some(&fa)));
        let got = parse_batch(&body, &[a, b, a]).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].frame, Some(&fa[..]));
        assert_eq!(got[1], BatchRecord { id: b, frame: None });
        assert!(matches!(
            parse_batch(&body, &[a, a, a]),
            Err(BatchError::WrongId { index: 1, .. })
        ));
        assert!(matches!(
            parse_batch(&body, &[a, b]),
            Err(BatchError::WrongCount { .. })
        ));
        assert!(matches!(
            parse_batch(&body[..body.len() - 1], &[a, b, a]),
            Err(BatchError::Truncated(_))
        ));
    }

    #[test]
    fn golden_record_header() {
        let id = Digest([7; 32]);
        let h = encode_record_header(&id, Some(0x0102_0304));
        assert_eq!(
            h[32..],
            [0, 4, 3, 2, 1],
            "format changed: bump the API version"
        );
        assert_eq!(encode_record_header(&id, None)[32..], [1, 0, 0, 0, 0]);
    }

    #[test]
    fn hostile_records_are_refused() {
        let id = Digest([1; 32]);
        let mut h = encode_record_header(&id, Some(0)).to_vec();
        h[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_batch(&h, &[id]),
            Err(BatchError::TooLarge { .. })
        ));
        h[32] = 9;
        assert!(matches!(
            parse_batch(&h, &[id]),
            Err(BatchError::BadStatus { status: 9, .. })
        ));
    }

    #[test]
    fn names() {
        for ok in ["py-env", "a", "v1.2_rc-3", &"x".repeat(128)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
