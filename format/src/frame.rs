//! Chunk frames: how a chunk travels and rests.
//!
//! ```text
//! 0  magic             4 bytes  "THCK"
//! 4  version           u8       1
//! 5  flags             u8       bit 0: payload is zstd; bit 1: payload is
//!                               LZ4 blocks (not both); bit 2: sealed;
//!                               other bits refused
//! 6  reserved          u16      0
//! 8  uncompressed len  u32 LE   1 ..= MAX_CHUNK_LEN
//! 12 payload
//! n-32 seal            32 bytes only if sealed: BLAKE3 keyed by the chunk
//!                               id, of every byte before it
//! ```
//! A seal lets a store's copy of a frame be checked without inflating it
//! ([`verify_stored`]): a server checks a frame's content against its id once,
//! when it is uploaded (seal included), and afterwards that the bytes it reads
//! back are the ones it checked. Keying by the id ties the frame to its name,
//! so a frame stored under another chunk's name fails. Compressed frames are
//! sealed; a raw frame is not (hashing its payload is the full check anyway).
//! The key is public: a seal catches damage and misplacement, not a frame
//! forged in the store, which the server would serve and every reader would
//! refuse. Readers of frames from a server ignore the seal: they check the
//! content against the id.
//! A chunk that does not shrink is stored raw. A zstd payload is one zstd
//! frame per [`SEGMENT_LEN`] bytes of the chunk, one after another (any zstd
//! decoder reads such a concatenation as the whole chunk); an LZ4 payload is
//! one LZ4 block per segment, each after its compressed length (u32 LE). In
//! both, a reader waiting for a chunk inflates its segments on several cores.
//! LZ4 (high-compression blocks) inflates about four times as fast as zstd
//! for 10-20% more bytes: what a reader waits for on a fast network is the
//! inflating, not the bytes.
//! Decoding bounds the uncompressed length before it allocates and checks that
//! the payload inflates to exactly that length; [`decode_verified`] also
//! checks the BLAKE3 digest, and [`verify`] checks it without keeping the
//! decoded bytes.

use crate::Digest;
use std::io::Read;

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"THCK";
/// Frame version written and read by this crate.
pub const FRAME_VERSION: u8 = 1;
/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// The largest chunk a frame may hold (uncompressed), 16 MiB.
pub const MAX_CHUNK_LEN: usize = 16 << 20;
const FLAG_ZSTD: u8 = 1;
const FLAG_LZ4: u8 = 2;
const FLAG_SEALED: u8 = 4;
/// Length of a sealed frame's seal.
pub const SEAL_LEN: usize = 32;
/// Uncompressed bytes per zstd frame of a payload: the unit a reader
/// inflates in parallel. (A payload of one frame, as earlier versions wrote
/// for every chunk, is read the same way.)
pub const SEGMENT_LEN: usize = 256 << 10;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("chunk frame too short ({0} bytes)")]
    Truncated(usize),
    #[error("not a chunk frame (bad magic)")]
    BadMagic,
    #[error("unsupported chunk frame version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown chunk frame flags {0:#x}")]
    UnknownFlags(u8),
    #[error("chunk frame reserved bytes are not zero")]
    ReservedBytes,
    #[error("chunk frame declares an empty chunk (chunks are 1 byte or more)")]
    Empty,
    #[error("chunk of {0} bytes exceeds the {MAX_CHUNK_LEN}-byte limit")]
    TooLarge(usize),
    #[error("chunk payload does not decode to its declared {expected} bytes")]
    LengthMismatch { expected: usize },
    #[error("chunk digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("chunk frame seal does not match its bytes and id")]
    SealMismatch,
}

/// How a frame's payload is compressed, and at what level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// zstd at a level (1..=22; 3 is zstd's default).
    Zstd(i32),
    /// LZ4 high-compression blocks at a level (3..=12).
    Lz4(i32),
}

impl Codec {
    /// The default codec: LZ4, for readers that wait on inflating.
    pub const DEFAULT: Codec = Codec::Lz4(4);
}

/// Encodes frames with one reusable compression context (cheaper than a new
/// context per chunk when pushing thousands of chunks).
pub struct Encoder {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    /// A zstd encoder at `level`.
    pub fn new(level: i32) -> Encoder {
        Encoder::with_codec(Codec::Zstd(level))
    }

    pub fn with_codec(codec: Codec) -> Encoder {
        let zstd = match codec {
            Codec::Zstd(level) => {
                Some(zstd::bulk::Compressor::new(level).expect("valid zstd level"))
            }
            Codec::Lz4(_) => None,
        };
        Encoder { codec, zstd }
    }

    /// Encodes `data` as a frame, compressed (and sealed) when that makes it
    /// smaller.
    ///
    /// # Panics
    /// If `data` is empty or longer than [`MAX_CHUNK_LEN`]: chunkers never
    /// produce such chunks (empty files and zeros are holes, not chunks).
    pub fn encode(&mut self, data: &[u8]) -> Vec<u8> {
        self.encode_for(data, &Digest::of(data))
    }

    /// [`Encoder::encode`] for a caller that has hashed `data` already: `id`
    /// must be its digest (the seal is keyed by it).
    pub fn encode_for(&mut self, data: &[u8], id: &Digest) -> Vec<u8> {
        assert!(
            !data.is_empty() && data.len() <= MAX_CHUNK_LEN,
            "chunk empty or larger than MAX_CHUNK_LEN"
        );
        let (flag, bound) = match self.codec {
            Codec::Zstd(_) => (
                FLAG_ZSTD,
                data.chunks(SEGMENT_LEN)
                    .map(|s| zstd::zstd_safe::compress_bound(s.len()))
                    .sum(),
            ),
            Codec::Lz4(_) => (
                FLAG_LZ4,
                data.chunks(SEGMENT_LEN)
                    .map(|s| 4 + lz4::block::compress_bound(s.len()).unwrap_or(2 * s.len()))
                    .sum::<usize>(),
            ),
        };
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + bound);
        out.extend_from_slice(&FRAME_MAGIC);
        out.push(FRAME_VERSION);
        out.push(flag);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.resize(FRAME_HEADER_LEN + bound, 0);
        let mut end = FRAME_HEADER_LEN;
        for segment in data.chunks(SEGMENT_LEN) {
            let written = match (self.codec, &mut self.zstd) {
                (Codec::Zstd(_), Some(z)) => z.compress_to_buffer(segment, &mut out[end..]),
                (Codec::Lz4(level), _) => {
                    let mode = Some(lz4::block::CompressionMode::HIGHCOMPRESSION(level));
                    lz4::block::compress_to_buffer(segment, mode, false, &mut out[end + 4..]).map(
                        |n| {
                            out[end..end + 4].copy_from_slice(&(n as u32).to_le_bytes());
                            n + 4
                        },
                    )
                }
                (Codec::Zstd(_), None) => unreachable!("a zstd encoder has its context"),
            };
            match written {
                Ok(n) => end += n,
                Err(_) => {
                    end = usize::MAX;
                    break;
                }
            }
        }
        if end.saturating_add(SEAL_LEN) < FRAME_HEADER_LEN + data.len() {
            out.truncate(end);
            out[5] |= FLAG_SEALED;
            let seal = blake3::keyed_hash(&id.0, &out);
            out.extend_from_slice(seal.as_bytes());
        } else {
            out[5] = 0;
            out.truncate(FRAME_HEADER_LEN);
            out.extend_from_slice(data);
        }
        out
    }
}

/// Encodes `data` as a frame at `level` (see [`Encoder::encode`]).
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    Encoder::new(level).encode(data)
}

/// The longest frame a chunk of `len` bytes can have: the header, zstd's
/// worst case (`ZSTD_COMPRESSBOUND`) and a seal. Clients bound the answers
/// they read by it.
pub fn max_frame_len(len: usize) -> usize {
    let small = if len < (128 << 10) {
        ((128 << 10) - len) >> 11
    } else {
        0
    };
    FRAME_HEADER_LEN + len + (len >> 8) + small + SEAL_LEN
}

/// The uncompressed length a frame declares, after checking its header.
pub fn declared_len(frame: &[u8]) -> Result<usize, FrameError> {
    if frame.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated(frame.len()));
    }
    if frame[0..4] != FRAME_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if frame[4] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion(frame[4]));
    }
    let flags = frame[5];
    if flags & !(FLAG_ZSTD | FLAG_LZ4 | FLAG_SEALED) != 0
        || flags & (FLAG_ZSTD | FLAG_LZ4) == FLAG_ZSTD | FLAG_LZ4
    {
        return Err(FrameError::UnknownFlags(flags));
    }
    if flags & FLAG_SEALED != 0 && frame.len() < FRAME_HEADER_LEN + SEAL_LEN {
        return Err(FrameError::Truncated(frame.len()));
    }
    if frame[6..8] != [0, 0] {
        return Err(FrameError::ReservedBytes);
    }
    let len = u32::from_le_bytes(frame[8..12].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_CHUNK_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// The payload of a frame whose header [`declared_len`] accepted, and its
/// codec flags (the seal left out).
fn payload(frame: &[u8]) -> (&[u8], u8) {
    let end = match frame[5] & FLAG_SEALED {
        0 => frame.len(),
        _ => frame.len() - SEAL_LEN,
    };
    (
        &frame[FRAME_HEADER_LEN..end],
        frame[5] & (FLAG_ZSTD | FLAG_LZ4),
    )
}

/// Checks a sealed frame's seal against its bytes and `id`; an unsealed
/// frame passes (there is nothing to check).
pub fn check_seal(frame: &[u8], id: &Digest) -> Result<(), FrameError> {
    declared_len(frame)?;
    if frame[5] & FLAG_SEALED == 0 {
        return Ok(());
    }
    let (body, seal) = frame.split_at(frame.len() - SEAL_LEN);
    match blake3::keyed_hash(&id.0, body).as_bytes() == seal {
        true => Ok(()),
        false => Err(FrameError::SealMismatch),
    }
}

/// Checks a frame in full, its content against `id` and its seal if it has
/// one: what a store checks before it accepts a frame, and `fsck` after.
pub fn verify_all(frame: &[u8], id: &Digest) -> Result<(), FrameError> {
    verify(frame, id)?;
    check_seal(frame, id)
}

/// Checks a frame read back from a store that accepted it only after
/// [`verify_all`]: a sealed frame by its seal alone (the
/// bytes are the ones checked, under the same name), without inflating; an
/// unsealed one in full.
pub fn verify_stored(frame: &[u8], id: &Digest) -> Result<(), FrameError> {
    match frame.get(5).is_some_and(|f| f & FLAG_SEALED != 0) {
        true => check_seal(frame, id),
        false => verify(frame, id),
    }
}

/// Decodes a frame into the chunk's bytes. Does not check the digest (nor
/// the seal).
pub fn decode(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = declared_len(frame)?;
    let (payload, codec) = payload(frame);
    match codec {
        FLAG_ZSTD => inflate(payload, len),
        FLAG_LZ4 => inflate_lz4(payload, len),
        _ if payload.len() != len => Err(FrameError::LengthMismatch { expected: len }),
        _ => Ok(payload.to_vec()),
    }
}

/// The LZ4 blocks of a payload that inflates to `len` bytes, each with the
/// size it inflates to: one per segment, each after its length.
fn lz4_segments(payload: &[u8], len: usize) -> Result<Vec<Segment<'_>>, FrameError> {
    let mismatch = || FrameError::LengthMismatch { expected: len };
    let mut out = Vec::with_capacity(len.div_ceil(SEGMENT_LEN));
    let (mut at, mut left) = (0usize, len);
    while left > 0 {
        let n = payload.get(at..at + 4).ok_or_else(mismatch)?;
        let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
        let block = payload.get(at + 4..at + 4 + n).ok_or_else(mismatch)?;
        let size = left.min(SEGMENT_LEN);
        out.push((block, size));
        (at, left) = (at + 4 + n, left - size);
    }
    if at != payload.len() {
        return Err(mismatch());
    }
    Ok(out)
}

/// Inflates one LZ4 block into `dst`, which it must fill exactly.
fn inflate_lz4_block(src: &[u8], dst: &mut [u8]) -> bool {
    let Ok(size) = i32::try_from(dst.len()) else {
        return false;
    };
    matches!(lz4::block::decompress_to_buffer(src, Some(size), dst), Ok(n) if n == dst.len())
}

/// Inflates an LZ4 payload of `len` bytes, its segments in parallel.
fn inflate_lz4(payload: &[u8], len: usize) -> Result<Vec<u8>, FrameError> {
    inflate_segments(lz4_segments(payload, len)?, len, inflate_lz4_block)
}

/// Inflates a zstd payload of `len` bytes: its segments in parallel when it
/// has several whose sizes its frames declare, else in one pass.
fn inflate(payload: &[u8], len: usize) -> Result<Vec<u8>, FrameError> {
    let mismatch = || FrameError::LengthMismatch { expected: len };
    let Some(segments) = segments(payload, len)? else {
        // Never more than `len` bytes are written: the bound is the capacity.
        let out = with_decompressor(|d| d.decompress(payload, len)).map_err(|_| mismatch())?;
        if out.len() != len {
            return Err(mismatch());
        }
        return Ok(out);
    };
    inflate_segments(
        segments,
        len,
        |src, dst| matches!(with_decompressor(|d| d.decompress_to_buffer(src, dst)), Ok(n) if n == dst.len()),
    )
}

/// Inflates `segments` (sizes summing to `len`) into one buffer, each with
/// `one`, which must fill its piece exactly; on every core when there are
/// several.
fn inflate_segments(
    segments: Vec<Segment<'_>>,
    len: usize,
    one: impl Fn(&[u8], &mut [u8]) -> bool + Sync,
) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; len];
    let mut pieces = Vec::with_capacity(segments.len());
    let mut rest = out.as_mut_slice();
    for (src, size) in segments {
        let (piece, tail) = rest.split_at_mut(size);
        pieces.push((src, piece));
        rest = tail;
    }
    use rayon::prelude::*;
    let all = if pieces.len() > 1 {
        pieces.into_par_iter().all(|(src, dst)| one(src, dst))
    } else {
        pieces.into_iter().all(|(src, dst)| one(src, dst))
    };
    if !all {
        return Err(FrameError::LengthMismatch { expected: len });
    }
    Ok(out)
}

thread_local! {
    /// Each thread's zstd context, made once and reused by every decode on it
    /// (as [`Encoder`] reuses one for encoding).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's zstd context.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        f(d)
    })
}

/// A zstd frame of a payload, and how many bytes it declares it inflates to.
type Segment<'a> = (&'a [u8], usize);

/// The zstd frames of a payload that inflates to `len` bytes, each with its
/// declared size, when there are several and every one declares its size;
/// `None` to inflate the payload in one pass.
fn segments(payload: &[u8], len: usize) -> Result<Option<Vec<Segment<'_>>>, FrameError> {
    let mismatch = || FrameError::LengthMismatch { expected: len };
    let mut out = Vec::new();
    let (mut at, mut total) = (0usize, 0usize);
    while at < payload.len() {
        let n =
            zstd::zstd_safe::find_frame_compressed_size(&payload[at..]).map_err(|_| mismatch())?;
        let frame = &payload[at..at + n];
        let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(frame) else {
            return Ok(None);
        };
        let size = usize::try_from(size).map_err(|_| mismatch())?;
        total = total
            .checked_add(size)
            .filter(|&t| t <= len)
            .ok_or_else(mismatch)?;
        out.push((frame, size));
        if out.len() > MAX_CHUNK_LEN / SEGMENT_LEN {
            // More frames than a writer makes: inflate in one pass.
            return Ok(None);
        }
        at += n;
    }
    if total != len {
        return Err(mismatch());
    }
    Ok((out.len() > 1).then_some(out))
}

/// Checks that a frame decodes to bytes that hash to `id`, as
/// [`decode_verified`] does, without holding the decoded bytes: the payload
/// is hashed as it inflates, through a small buffer.
pub fn verify(frame: &[u8], id: &Digest) -> Result<(), FrameError> {
    let len = declared_len(frame)?;
    let (payload, codec) = payload(frame);
    let mut hasher = blake3::Hasher::new();
    if codec == FLAG_LZ4 {
        let mut buf = vec![0u8; len.min(SEGMENT_LEN)];
        for (src, size) in lz4_segments(payload, len)? {
            if !inflate_lz4_block(src, &mut buf[..size]) {
                return Err(FrameError::LengthMismatch { expected: len });
            }
            hasher.update(&buf[..size]);
        }
    } else if codec == 0 {
        if payload.len() != len {
            return Err(FrameError::LengthMismatch { expected: len });
        }
        hasher.update(payload);
    } else {
        let mismatch = |_| FrameError::LengthMismatch { expected: len };
        let mut inflate = zstd::stream::read::Decoder::with_buffer(payload).map_err(mismatch)?;
        let mut buf = [0u8; 64 << 10];
        let mut total = 0usize;
        loop {
            let n = inflate.read(&mut buf).map_err(mismatch)?;
            if n == 0 {
                break;
            }
            total += n;
            if total > len {
                return Err(FrameError::LengthMismatch { expected: len });
            }
            hasher.update(&buf[..n]);
        }
        if total != len {
            return Err(FrameError::LengthMismatch { expected: len });
        }
    }
    let actual = Digest::from(hasher.finalize());
    if actual != *id {
        return Err(FrameError::DigestMismatch {
            expected: *id,
            actual,
        });
    }
    Ok(())
}

/// Decodes a frame and checks that its bytes hash to `id`.
pub fn decode_verified(frame: &[u8], id: &Digest) -> Result<Vec<u8>, FrameError> {
    let data = decode(frame)?;
    // A reader is waiting: hash a large chunk on every core.
    let actual = match data.len() {
        n if n > SEGMENT_LEN => Digest::from(blake3::Hasher::new().update_rayon(&data).finalize()),
        _ => Digest::of(&data),
    };
    if actual != *id {
        return Err(FrameError::DigestMismatch {
            expected: *id,
            actual,
        });
    }
    Ok(data)
}

/// Decodes a frame and checks that its bytes hash to `id`, giving the
/// chunk's [`outboard`](crate::outboard) too: the check computes it on the
/// way, so a cache that keeps it pays no second pass.
pub fn decode_verified_with_outboard(
    frame: &[u8],
    id: &Digest,
) -> Result<(Vec<u8>, Vec<u8>), FrameError> {
    let data = decode(frame)?;
    match crate::outboard::check(&data, id) {
        Ok(outboard) => Ok((data, outboard)),
        Err(actual) => Err(FrameError::DigestMismatch {
            expected: *id,
            actual,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_fit_their_bound() {
        for len in [1usize, 100, 4096, 200_000] {
            let noise: Vec<u8> = (0..len as u64)
                .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect();
            let f = zstd::bulk::compress(&noise, 19).unwrap();
            assert!(FRAME_HEADER_LEN + f.len() <= max_frame_len(len), "{len}");
            assert!(encode(&noise, 3).len() <= max_frame_len(len));
        }
    }

    #[test]
    fn lz4_payloads_are_one_block_per_segment_and_damage_is_refused() {
        let data: Vec<u8> = (0..(SEGMENT_LEN * 4 + 1000) as u64)
            .map(|i| ((i / 7) % 251) as u8 ^ (i.wrapping_mul(0x9E37_79B9) >> 60) as u8)
            .collect();
        let id = Digest::of(&data);
        let f = Encoder::with_codec(Codec::DEFAULT).encode(&data);
        assert_eq!(f[5], FLAG_LZ4 | FLAG_SEALED, "compressible data is LZ4");
        assert!(f.len() < data.len() / 2);
        let blocks = lz4_segments(payload(&f).0, data.len()).unwrap();
        assert_eq!(blocks.len(), 5);
        assert_eq!(blocks[4].1, 1000);
        // Each block inflates alone to its segment.
        for (k, &(src, size)) in blocks.iter().enumerate() {
            let mut one = vec![0u8; size];
            assert!(inflate_lz4_block(src, &mut one));
            assert!(one[..] == data[k * SEGMENT_LEN..k * SEGMENT_LEN + size]);
        }
        assert!(decode_verified(&f, &id).unwrap() == data);
        verify(&f, &id).unwrap();
        // A block cut short, a length past the payload, trailing bytes, a
        // wrong declared length and both codec flags are refused.
        let mut cut = f.clone();
        cut.truncate(f.len() - 10);
        assert!(matches!(
            decode(&cut),
            Err(FrameError::LengthMismatch { .. })
        ));
        assert!(verify(&cut, &id).is_err());
        let mut long = f.clone();
        long[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&long),
            Err(FrameError::LengthMismatch { .. })
        ));
        let mut trailing = f.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(FrameError::LengthMismatch { .. })
        ));
        let mut short = f.clone();
        short[8..12].copy_from_slice(&((data.len() - 1) as u32).to_le_bytes());
        assert!(decode(&short).is_err());
        let mut both = f.clone();
        both[5] = FLAG_ZSTD | FLAG_LZ4;
        assert!(matches!(decode(&both), Err(FrameError::UnknownFlags(3))));
        // Damage inside a block never passes as the chunk.
        for at in [FRAME_HEADER_LEN + 40, f.len() / 2, f.len() - SEAL_LEN - 3] {
            let mut bad = f.clone();
            bad[at] ^= 0x5a;
            assert!(decode_verified(&bad, &id).is_err(), "damage at {at}");
        }
        // Incompressible chunks stay raw.
        let mut noise = vec![0u8; 100_000];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        assert_eq!(Encoder::with_codec(Codec::DEFAULT).encode(&noise)[5], 0);
    }

    #[test]
    fn golden_frame_bytes() {
        // format changed: bump FRAME_VERSION if this test has to change.
        let f = encode(b"abc", 3);
        assert_eq!(
            f,
            [b'T', b'H', b'C', b'K', 1, 0, 0, 0, 3, 0, 0, 0, b'a', b'b', b'c']
        );
        let z = encode(&[7u8; 4096], 3);
        assert_eq!(&z[..12], &[b'T', b'H', b'C', b'K', 1, 5, 0, 0, 0, 16, 0, 0]);
        assert!(z.len() < 100);
        let l = Encoder::with_codec(Codec::Lz4(4)).encode(&[7u8; 4096]);
        assert_eq!(&l[..12], &[b'T', b'H', b'C', b'K', 1, 6, 0, 0, 0, 16, 0, 0]);
        let block = u32::from_le_bytes(l[12..16].try_into().unwrap()) as usize;
        assert_eq!(l.len(), 16 + block + SEAL_LEN);
        // The seal: BLAKE3 keyed by the chunk id, of every byte before it.
        let id = Digest::of(&[7u8; 4096]);
        let (body, seal) = l.split_at(l.len() - SEAL_LEN);
        assert_eq!(seal, blake3::keyed_hash(&id.0, body).as_bytes());
    }

    #[test]
    fn rejects_bad_frames() {
        let good = encode(&[1u8; 10_000], 3);
        assert!(matches!(decode(&good[..5]), Err(FrameError::Truncated(5))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(FrameError::BadMagic)));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            decode(&bad),
            Err(FrameError::UnsupportedVersion(9))
        ));
        let mut bad = good.clone();
        bad[5] = 0x81;
        assert!(matches!(decode(&bad), Err(FrameError::UnknownFlags(_))));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(FrameError::TooLarge(_))));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&9_999u32.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(FrameError::LengthMismatch { .. })
        ));
        let other = Digest::of(b"other");
        assert!(matches!(
            decode_verified(&good, &other),
            Err(FrameError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn large_chunks_are_segments_that_inflate_alone_or_together() {
        let data: Vec<u8> = (0..(SEGMENT_LEN * 4 + 1000) as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as u8)
            .collect();
        let id = Digest::of(&data);
        let f = encode(&data, 3);
        let payload = payload(&f).0;
        let found = segments(payload, data.len())
            .unwrap()
            .expect("several frames");
        assert_eq!(found.len(), 5);
        assert!(found[..4].iter().all(|&(_, size)| size == SEGMENT_LEN));
        assert_eq!(decode_verified(&f, &id).unwrap(), data);
        verify(&f, &id).unwrap();
        // Any zstd decoder reads the concatenation as the whole chunk (as
        // clients before segments did), and a one-frame payload (as pushes
        // before segments wrote) still decodes.
        assert_eq!(zstd::bulk::decompress(payload, data.len()).unwrap(), data);
        let mut old = f[..FRAME_HEADER_LEN].to_vec();
        old[5] = FLAG_ZSTD;
        old.extend(zstd::bulk::compress(&data, 3).unwrap());
        assert!(segments(&old[FRAME_HEADER_LEN..], data.len())
            .unwrap()
            .is_none());
        assert_eq!(decode_verified(&old, &id).unwrap(), data);
        // A segment that inflates to other bytes, or a frame cut short, is
        // refused, whichever segment it is.
        for at in [payload.len() / 3, payload.len() - 3] {
            let mut bad = f.clone();
            bad[FRAME_HEADER_LEN + at] ^= 0x55;
            assert!(decode_verified(&bad, &id).is_err(), "flip at {at}");
        }
        assert!(decode(&f[..f.len() - 1]).is_err());
        let mut long = f.clone();
        long[8..12].copy_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode(&long),
            Err(FrameError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn reserved_bytes_have_their_own_error() {
        let mut bad = encode(b"abc", 3);
        bad[6] = 1;
        let err = decode(&bad).unwrap_err();
        assert!(matches!(err, FrameError::ReservedBytes), "{err}");
        assert!(!err.to_string().contains("flags"), "{err}");
        bad[6] = 0;
        bad[7] = 0x80;
        assert!(matches!(decode(&bad), Err(FrameError::ReservedBytes)));
    }

    #[test]
    fn empty_chunks_are_refused() {
        let empty = [b'T', b'H', b'C', b'K', 1, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(declared_len(&empty), Err(FrameError::Empty)));
        assert!(matches!(decode(&empty), Err(FrameError::Empty)));
    }

    #[test]
    fn verify_agrees_with_decoding() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let id = Digest::of(&data);
        for level in [3, 19] {
            let good = encode(&data, level);
            verify(&good, &id).unwrap();
            let mut flipped = good.clone();
            let last = flipped.len() - SEAL_LEN - 1;
            flipped[last] ^= 1;
            assert!(verify(&flipped, &id).is_err());
            assert!(matches!(
                verify(&good, &Digest::of(b"other")),
                Err(FrameError::DigestMismatch { .. })
            ));
            let mut short = good.clone();
            short[8..12].copy_from_slice(&299_999u32.to_le_bytes());
            assert!(matches!(
                verify(&short, &id),
                Err(FrameError::LengthMismatch { .. })
            ));
        }
        let raw = encode(b"abc", 3);
        verify(&raw, &Digest::of(b"abc")).unwrap();
        assert!(verify(&raw[..14], &Digest::of(b"abc")).is_err());
    }

    #[test]
    fn a_stored_frame_is_checked_by_its_seal_alone_and_an_unsealed_one_in_full() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let id = Digest::of(&data);
        for codec in [Codec::Zstd(3), Codec::Lz4(4)] {
            let good = Encoder::with_codec(codec).encode_for(&data, &id);
            assert_eq!(good, Encoder::with_codec(codec).encode(&data));
            verify_stored(&good, &id).unwrap();
            verify_all(&good, &id).unwrap();
            // Any byte changed, the header's included, breaks the seal.
            for at in [5, 9, FRAME_HEADER_LEN + 7, good.len() / 2, good.len() - 1] {
                let mut bad = good.clone();
                bad[at] ^= 0x10;
                assert!(
                    verify_stored(&bad, &id).is_err(),
                    "{codec:?} damage at {at}"
                );
                assert!(verify_all(&bad, &id).is_err(), "{codec:?} damage at {at}");
            }
            // The right frame under another chunk's name fails too.
            let other = Digest::of(b"another chunk");
            assert!(matches!(
                verify_stored(&good, &other),
                Err(FrameError::SealMismatch)
            ));
            // A seal cut off: too short, or the payload no longer parses.
            assert!(verify_stored(&good[..FRAME_HEADER_LEN + 10], &id).is_err());
        }
        // Unsealed frames (raw ones; compressed ones from before seals) are
        // checked in full.
        let raw = encode(b"abc", 3);
        verify_stored(&raw, &Digest::of(b"abc")).unwrap();
        assert!(verify_stored(&raw, &Digest::of(b"abd")).is_err());
        let mut old = encode(&data, 3);
        old.truncate(old.len() - SEAL_LEN);
        old[5] &= !FLAG_SEALED;
        assert_eq!(decode_verified(&old, &id).unwrap(), data);
        verify_stored(&old, &id).unwrap();
        let mut old_bad = old.clone();
        old_bad[FRAME_HEADER_LEN + 100] ^= 1;
        assert!(verify_stored(&old_bad, &id).is_err());
    }

    proptest! {
        #[test]
        fn verify_accepts_exactly_what_decoding_accepts(data in proptest::collection::vec(any::<u8>(), 1..5000), zeros in 0usize..5000, flip in any::<prop::sample::Index>()) {
            // Zeros make the frame zstd; without them it is mostly raw.
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            let id = Digest::of(&data);
            let mut f = encode(&data, 3);
            prop_assert!(verify(&f, &id).is_ok());
            prop_assert!(verify_stored(&f, &id).is_ok());
            let at = flip.index(f.len());
            f[at] ^= 0x5a;
            prop_assert_eq!(verify(&f, &id).is_ok(), decode_verified(&f, &id).is_ok());
            // Any damage fails a stored frame's check (seal or content),
            // and the full check of an upload.
            prop_assert!(verify_stored(&f, &id).is_err());
            prop_assert!(verify_all(&f, &id).is_err());
        }

        #[test]
        fn frame_round_trip(data in proptest::collection::vec(any::<u8>(), 1..20_000), level in 1i32..6, zeros in 0usize..50_000) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            let id = Digest::of(&data);
            let f = encode(&data, level);
            prop_assert_eq!(decode_verified(&f, &id).unwrap(), data.clone());
            let f = Encoder::with_codec(Codec::Lz4(level + 2)).encode(&data);
            prop_assert_eq!(decode_verified(&f, &id).unwrap(), data);
        }

        #[test]
        fn lz4_verify_accepts_exactly_what_decoding_accepts(data in proptest::collection::vec(any::<u8>(), 1..3000), zeros in 0usize..600_000, flip in any::<prop::sample::Index>()) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            let id = Digest::of(&data);
            let mut f = Encoder::with_codec(Codec::DEFAULT).encode(&data);
            prop_assert!(verify(&f, &id).is_ok());
            prop_assert!(verify_stored(&f, &id).is_ok());
            let at = flip.index(f.len());
            f[at] ^= 0x5a;
            prop_assert_eq!(verify(&f, &id).is_ok(), decode_verified(&f, &id).is_ok());
            // Any damage fails a stored frame's check (seal or content),
            // and the full check of an upload.
            prop_assert!(verify_stored(&f, &id).is_err());
            prop_assert!(verify_all(&f, &id).is_err());
        }
    }
}
