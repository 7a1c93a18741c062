//! The batch read record: the first byte picks how many ids were asked for,
//! the next 32 each are the ids, the rest is the server's answer. Never a
//! panic; what parses answers exactly the ids asked, in order, with frames
//! inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::{wire, Digest};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < n * 32 {
        return;
    }
    let (raw_ids, body) = rest.split_at(n * 32);
    let ids: Vec<Digest> = raw_ids
        .chunks_exact(32)
        .map(|c| Digest(c.try_into().unwrap()))
        .collect();
    if let Ok(records) = wire::parse_batch(body, &ids) {
        assert_eq!(records.len(), ids.len());
        for (r, id) in records.iter().zip(&ids) {
            assert_eq!(r.id, *id);
            if let Some(f) = r.frame {
                assert!(f.len() <= wire::FRAME_MAX);
            }
        }
    }
});
