//! Image reference parsing: never a panic; what parses has valid names and
//! prints back to a reference that parses to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_client::ImageRef;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = ImageRef::parse(s) {
        assert!(thaw_format::wire::valid_name(&r.name));
        if let Some(tag) = r.tag() {
            assert!(thaw_format::wire::valid_name(tag));
        }
        let again = ImageRef::parse(&r.to_string()).expect("a printed reference parses");
        assert_eq!(again, r);
    }
});
