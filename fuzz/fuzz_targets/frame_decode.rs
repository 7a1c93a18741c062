//! Chunk frame decoding: never a panic or an allocation beyond the declared
//! (bounded) length, and a decoded frame's bytes hash to the id that
//! `decode_verified` accepts; checking a stored frame (its seal) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::{frame, Digest, MAX_CHUNK_LEN};

fuzz_target!(|data: &[u8]| {
    // A stored frame's check never panics, sealed or not.
    let _ = frame::verify_stored(data, &Digest::of(b"id"));
    if let Ok(bytes) = frame::decode(data) {
        assert!(bytes.len() <= MAX_CHUNK_LEN);
        assert_eq!(frame::declared_len(data).unwrap(), bytes.len());
        let id = Digest::of(&bytes);
        assert_eq!(frame::decode_verified(data, &id).unwrap(), bytes);
        assert!(frame::decode_verified(data, &Digest::of(b"another")).is_err() || bytes == b"another");
    }
});
