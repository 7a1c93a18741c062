//! Chunk frame decoding: never a panic or an allocation beyond the declared
//! (bounded) length, and a decoded frame's bytes hash to the id that
//! `decode_verified` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::{frame, Digest, MAX_CHUNK_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(bytes) = frame::decode(data) {
        assert!(bytes.len() <= MAX_CHUNK_LEN);
        assert_eq!(frame::declared_len(data).unwrap(), bytes.len());
        let id = Digest::of(&bytes);
        assert_eq!(frame::decode_verified(data, &id).unwrap(), bytes);
        assert!(frame::decode_verified(data, &Digest::of(b"another")).is_err() || bytes == b"another");
    }
});
