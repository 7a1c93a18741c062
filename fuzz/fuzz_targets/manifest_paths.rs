//! The paths an export and a mount derive from a manifest that passed
//! validation: every entry's path stays inside the tree (no empty, `.`, `..`
//! or `/`-bearing component, no NUL), and lookups find each entry by its name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_format::{Manifest, ROOT};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    for i in 1..m.nodes.len() as u32 {
        let path = m.path(i);
        assert!(!path.is_empty() && !path.starts_with(b"/"), "{path:?}");
        for part in path.split(|&b| b == b'/') {
            assert!(!part.is_empty() && part != b"." && part != b"..", "{path:?}");
            assert!(!part.contains(&0), "{path:?}");
        }
        let node = &m.nodes[i as usize];
        let parent = node.parent;
        assert_eq!(m.lookup(parent, &node.name), Some(i), "lookup finds {path:?}");
        let _ = m.file_extents(i);
        let _ = m.resolve(i);
    }
    let _ = m.children(ROOT);
});
