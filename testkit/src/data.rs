//! Deterministic data: the same seed gives the same bytes on every machine, so
//! benchmark runs compare and tests need no fixtures.
//!
//! [`noise`] is incompressible (BLAKE3's output stream: fast even in a debug
//! build). [`Python`] writes what a Python environment holds, source files and
//! shared libraries, about 3-4x compressible under zstd level 3 as real ones
//! are; [`PythonEnv`] lays them out as packages.

mod python;

pub use python::{GeneratedFile, Python, PythonEnv};

/// SplitMix64: small, fast, reproducible, and any seed (0 too) is a good one.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// `len` incompressible bytes, the same for the same seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        assert_eq!(noise(3, 1000), noise(3, 1000));
        assert_ne!(noise(3, 1000), noise(4, 1000));
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a.below(10) < 10);
    }

    #[test]
    fn python_data_compresses_like_a_real_environment() {
        let mut py = Python::new(1);
        let source = py.source(256 << 10);
        let library = py.shared_library(1 << 20);
        assert_eq!((source.len(), library.len()), (256 << 10, 1 << 20));
        let ratio = |b: &[u8]| b.len() as f64 / zstd::bulk::compress(b, 3).unwrap().len() as f64;
        assert!(ratio(&source) > 3.0, "source ratio {}", ratio(&source));
        assert!(ratio(&library) > 1.5, "library ratio {}", ratio(&library));
        assert!(ratio(&noise(1, 1 << 20)) < 1.01);
    }
}
