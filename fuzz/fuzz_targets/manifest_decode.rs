//! Manifest decoding and validation: never a panic, and whatever decodes
//! encodes back to the same bytes (one encoding per manifest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "a decoded manifest re-encodes to its bytes");
    }
});
