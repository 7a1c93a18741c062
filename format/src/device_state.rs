//! The state a virtio-fs backend hands over when its VM is snapshotted or
//! migrated, and a fresh backend takes on the restoring side.
//!
//! Inode numbers are derived from the manifest, so the same image gives the
//! same inodes in every process: the state is only which image is served and
//! which handles the guest holds open. Restoring a state onto a different
//! image would hand the guest's open files someone else's bytes, so it names
//! the manifest by digest and is refused for any other. The encoding (layout
//! in `docs/format.md`) ends with a BLAKE3 digest of everything before it, so
//! a truncated or damaged state is refused rather than half-applied.

use crate::sealed::{seal, unseal, Reader, Unsealed, TRAILER_LEN};
use crate::Digest;

/// `THAWVFS\0`: the first bytes of every device state.
pub const DEVICE_STATE_MAGIC: [u8; 8] = *b"THAWVFS\0";
pub const DEVICE_STATE_VERSION: u16 = 1;
/// More open handles than this is not a state a guest can have made.
pub const DEVICE_STATE_MAX_HANDLES: usize = 1 << 20;

const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 32 + 8 + 4 + 4;
const HANDLE_LEN: usize = 8 + 8 + 1 + 7;

/// What a handle was opened as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleKind {
    File = 1,
    Dir = 2,
}

/// One handle the guest holds open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHandle {
    pub handle: u64,
    pub ino: u64,
    pub kind: HandleKind,
}

/// The handed-over state of a virtio-fs backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The manifest of the image being served.
    pub manifest: Digest,
    /// The next handle number to give out (never reused).
    pub next_handle: u64,
    pub handles: Vec<OpenHandle>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    #[error("not a thaw virtio-fs device state (bad magic)")]
    BadMagic,
    #[error("device state version {0} is not supported (this build reads version {DEVICE_STATE_VERSION})")]
    UnsupportedVersion(u16),
    #[error("device state is truncated or has trailing bytes")]
    Length,
    #[error("device state is damaged (checksum mismatch)")]
    Checksum,
    #[error("device state has non-zero reserved bytes")]
    Reserved,
    #[error("device state holds {0} handles, more than {DEVICE_STATE_MAX_HANDLES}")]
    TooManyHandles(u64),
    #[error("device state has an unknown handle kind {0}")]
    Kind(u8),
    #[error("device state names handle {0} twice, or a handle not below its next handle")]
    Handle(u64),
}

impl DeviceState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.handles.len() * HANDLE_LEN + TRAILER_LEN);
        out.extend_from_slice(&DEVICE_STATE_MAGIC);
        out.extend_from_slice(&DEVICE_STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&0u32.to_le_bytes()); // reserved
        out.extend_from_slice(&self.manifest.0);
        out.extend_from_slice(&self.next_handle.to_le_bytes());
        out.extend_from_slice(&(self.handles.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // reserved
        for h in &self.handles {
            out.extend_from_slice(&h.handle.to_le_bytes());
            out.extend_from_slice(&h.ino.to_le_bytes());
            out.push(h.kind as u8);
            out.extend_from_slice(&[0; 7]);
        }
        seal(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceState, DeviceStateError> {
        let body =
            unseal(bytes, &DEVICE_STATE_MAGIC, HEADER_LEN, DEVICE_STATE_VERSION).map_err(|e| {
                match e {
                    Unsealed::BadMagic => DeviceStateError::BadMagic,
                    Unsealed::Length => DeviceStateError::Length,
                    Unsealed::Version(v) => DeviceStateError::UnsupportedVersion(v),
                    Unsealed::Checksum => DeviceStateError::Checksum,
                }
            })?;
        let mut r = Reader(body);
        if r.u16() != 0 || r.u32() != 0 {
            return Err(DeviceStateError::Reserved);
        }
        let manifest = Digest(r.take::<32>());
        let next_handle = r.u64();
        let count = u64::from(r.u32());
        if r.u32() != 0 {
            return Err(DeviceStateError::Reserved);
        }
        if count > DEVICE_STATE_MAX_HANDLES as u64 {
            return Err(DeviceStateError::TooManyHandles(count));
        }
        if r.0.len() as u64 != count * HANDLE_LEN as u64 {
            return Err(DeviceStateError::Length);
        }
        let mut handles = Vec::with_capacity(count as usize);
        let mut seen = std::collections::HashSet::with_capacity(count as usize);
        for _ in 0..count {
            let handle = r.u64();
            let ino = r.u64();
            let kind = match r.take::<1>()[0] {
                1 => HandleKind::File,
                2 => HandleKind::Dir,
                k => return Err(DeviceStateError::Kind(k)),
            };
            if r.take::<7>() != [0; 7] {
                return Err(DeviceStateError::Reserved);
            }
            if handle >= next_handle || !seen.insert(handle) {
                return Err(DeviceStateError::Handle(handle));
            }
            handles.push(OpenHandle { handle, ino, kind });
        }
        Ok(DeviceState {
            manifest,
            next_handle,
            handles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        DeviceState {
            manifest: Digest::of(b"manifest"),
            next_handle: 7,
            handles: vec![
                OpenHandle {
                    handle: 3,
                    ino: 12,
                    kind: HandleKind::File,
                },
                OpenHandle {
                    handle: 6,
                    ino: 1,
                    kind: HandleKind::Dir,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(DeviceState::decode(&s.encode()).unwrap(), s);
        let empty = DeviceState {
            handles: vec![],
            ..sample()
        };
        assert_eq!(DeviceState::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn golden_device_state_bytes() {
        let digest = blake3::hash(&sample().encode()).to_hex();
        assert_eq!(
            &digest[..16],
            "26099555c10dfe19",
            "format changed: bump DEVICE_STATE_VERSION and update docs/format.md"
        );
    }

    #[test]
    fn damage_is_refused() {
        let good = sample().encode();
        assert_eq!(
            DeviceState::decode(&good[..good.len() - 1]),
            Err(DeviceStateError::Checksum)
        );
        assert_eq!(
            DeviceState::decode(&good[..20]),
            Err(DeviceStateError::Length)
        );
        assert_eq!(
            DeviceState::decode(b"nope"),
            Err(DeviceStateError::BadMagic)
        );
        for i in 8..good.len() - TRAILER_LEN {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(
                DeviceState::decode(&bad).is_err(),
                "flipped byte {i} accepted"
            );
        }
        let mut v2 = good.clone();
        v2[8] = 2;
        assert_eq!(
            DeviceState::decode(&v2),
            Err(DeviceStateError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn inconsistent_handles_are_refused() {
        let mut s = sample();
        s.handles[1].handle = 3;
        assert_eq!(
            DeviceState::decode(&s.encode()),
            Err(DeviceStateError::Handle(3))
        );
        let mut s = sample();
        s.next_handle = 5;
        assert_eq!(
            DeviceState::decode(&s.encode()),
            Err(DeviceStateError::Handle(6))
        );
    }
}
