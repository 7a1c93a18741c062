//! How file bytes are cut into chunks.
//!
//! Fixed-size chunking (the default, 1 MiB) cuts at multiples of the chunk size,
//! so a byte's chunk is found by division and a page fault maps to one chunk.
//! Content-defined chunking (FastCDC 2020) cuts where the content says, so an
//! insertion early in a file does not shift every later chunk; use it for data
//! whose bytes move between versions. Chunks that are all zeros are recorded as
//! holes, never stored. Files smaller than [`Chunking::pack_threshold`] are packed
//! together, in tree order, into shared chunks (see the client's push).

/// Smallest allowed chunk size, 64 KiB.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest allowed chunk size, 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// How file bytes are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkingMode {
    Fixed,
    Cdc,
}

/// Chunking parameters, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub mode: ChunkingMode,
    chunk_size: u32,
}

impl Chunking {
    /// `chunk_size` must be a power of two from 64 KiB to 16 MiB.
    pub fn new(mode: ChunkingMode, chunk_size: u32) -> Result<Self, String> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(format!(
                "chunk size {chunk_size} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            ));
        }
        Ok(Chunking { mode, chunk_size })
    }

    /// The nominal chunk size (the exact size of every full fixed chunk).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Files strictly smaller than this are packed with their neighbours:
    /// an eighth of the chunk size (128 KiB for 1 MiB chunks).
    pub fn pack_threshold(&self) -> u64 {
        pack_threshold(self.chunk_size)
    }

    /// FastCDC bounds used for `ChunkingMode::Cdc`: the average is the chunk
    /// size capped at 4 MiB (FastCDC's limit), the minimum a quarter of it, the
    /// maximum four times it capped at 16 MiB.
    pub fn cdc_bounds(&self) -> CdcBounds {
        let avg = self.chunk_size.min(4 << 20);
        CdcBounds {
            min: avg / 4,
            avg,
            max: (avg * 4).min(MAX_CHUNK_SIZE),
        }
    }
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            mode: ChunkingMode::Fixed,
            chunk_size: 1 << 20,
        }
    }
}

/// Chunk size bounds of content-defined chunking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcBounds {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// One content-defined chunk of a stream: its offset and bytes.
#[derive(Debug)]
pub struct CdcChunk {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Content-defined chunks of `data`, as ranges covering it.
pub fn cdc_chunks(data: &[u8], chunking: &Chunking) -> Vec<std::ops::Range<usize>> {
    if data.is_empty() {
        return Vec::new();
    }
    let b = chunking.cdc_bounds();
    fastcdc::v2020::FastCDC::new(data, b.min, b.avg, b.max)
        .map(|c| c.offset..c.offset + c.length)
        .collect()
}

/// Content-defined chunks of a stream, read incrementally so a large file
/// never has to be in memory at once.
pub fn cdc_stream<R: std::io::Read>(
    reader: R,
    chunking: &Chunking,
) -> impl Iterator<Item = std::io::Result<CdcChunk>> {
    let b = chunking.cdc_bounds();
    fastcdc::v2020::StreamCDC::new(reader, b.min, b.avg, b.max).map(|r| match r {
        Ok(c) => Ok(CdcChunk {
            offset: c.offset,
            data: c.data,
        }),
        Err(fastcdc::v2020::Error::IoError(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    })
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.len() / 8 * 8;
    data[..words]
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && data[words..].iter().all(|&b| b == 0)
}

/// The pack threshold for images cut into `chunk_size` chunks (see
/// [`Chunking::pack_threshold`]).
pub(crate) fn pack_threshold(chunk_size: u32) -> u64 {
    u64::from(chunk_size / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(Chunking::new(ChunkingMode::Fixed, 1 << 20).is_ok());
        assert!(Chunking::new(ChunkingMode::Fixed, 64 << 10).is_ok());
        assert!(Chunking::new(ChunkingMode::Fixed, 16 << 20).is_ok());
        assert!(Chunking::new(ChunkingMode::Fixed, 32 << 10).is_err());
        assert!(Chunking::new(ChunkingMode::Fixed, 32 << 20).is_err());
        assert!(Chunking::new(ChunkingMode::Fixed, 3 << 20).is_err());
    }

    #[test]
    fn cdc_covers_and_resyncs() {
        let c = Chunking::new(ChunkingMode::Cdc, 64 << 10).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut data: Vec<u8> = (0..2_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let a = cdc_chunks(&data, &c);
        assert_eq!(a.iter().map(|x| x.len()).sum::<usize>(), data.len());
        data.insert(1000, 42);
        let b = cdc_chunks(&data, &c);
        let tail_a: Vec<usize> = a.iter().rev().take(3).map(|x| x.len()).collect();
        let tail_b: Vec<usize> = b.iter().rev().take(3).map(|x| x.len()).collect();
        assert_eq!(
            tail_a, tail_b,
            "an insertion must not move later cut points"
        );
        let streamed: Vec<usize> = cdc_stream(&data[..], &c)
            .map(|r| r.unwrap().data.len())
            .collect();
        assert_eq!(streamed, b.iter().map(|x| x.len()).collect::<Vec<_>>());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1001]));
        let mut v = vec![0u8; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        v[1000] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
