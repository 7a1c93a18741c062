//! virtio-fs device state decoding: never a panic, and what decodes encodes
//! back to the same bytes (one encoding per state). The input is tried as
//! is, and with a correct checksum appended so the fields behind the
//! checksum are explored too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::device_state::DeviceState;

fn check(bytes: &[u8]) {
    if let Ok(state) = DeviceState::decode(bytes) {
        assert_eq!(state.encode(), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(blake3::hash(data).as_bytes());
    check(&sealed);
});
