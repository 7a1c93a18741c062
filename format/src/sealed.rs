//! Structures sealed with a BLAKE3 trailer (the device state, the profile):
//! an 8-byte magic, a `u16` version, fixed-size fields, then the BLAKE3 of
//! every byte before it, so a truncated or damaged encoding is refused
//! before any field is trusted. [`Reader`] reads the fields once the length
//! is checked.

/// Why a sealed encoding failed its outer checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsealed {
    BadMagic,
    /// Shorter than its header and trailer.
    Length,
    Version(u16),
    Checksum,
}

/// Length of the seal.
pub(crate) const TRAILER_LEN: usize = 32;

/// Appends the seal: the BLAKE3 of everything in `out`.
pub(crate) fn seal(out: &mut Vec<u8>) {
    let sum = blake3::hash(out);
    out.extend_from_slice(sum.as_bytes());
}

/// The fields after the magic and version of a sealed encoding of at least
/// `header_len` bytes before its trailer, once its magic, version and seal
/// are checked.
pub(crate) fn unseal<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    header_len: usize,
    version: u16,
) -> Result<&'a [u8], Unsealed> {
    if bytes.len() < 8 || bytes[..8] != *magic {
        return Err(Unsealed::BadMagic);
    }
    if bytes.len() < header_len + TRAILER_LEN {
        return Err(Unsealed::Length);
    }
    let found = u16::from_le_bytes([bytes[8], bytes[9]]);
    if found != version {
        return Err(Unsealed::Version(found));
    }
    let (body, sum) = bytes.split_at(bytes.len() - TRAILER_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(Unsealed::Checksum);
    }
    Ok(&body[10..])
}

/// Reads fixed-size little-endian fields from a buffer whose length was
/// checked first.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    /// The next `N` bytes; the caller checked that they are there.
    pub(crate) fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split at N")
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}
