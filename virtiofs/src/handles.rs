//! The handles the guest holds open: the backend's only state beyond the
//! image, so the one thing a snapshot must carry (as a
//! [`DeviceState`]). A read through a handle this backend never gave out (nor
//! took over from a snapshot) is refused with EBADF, as the guest's kernel
//! would refuse a closed file descriptor.

use std::collections::HashMap;
use std::sync::Mutex;
use thaw_format::device_state::{DeviceState, HandleKind, OpenHandle};
use thaw_format::Digest;

#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, (u64, HandleKind)>,
}

/// Open handles; numbers are never reused within an image's life, across
/// snapshots included.
#[derive(Debug)]
pub(crate) struct Handles {
    table: Mutex<Table>,
}

impl Handles {
    pub fn new() -> Handles {
        Handles {
            table: Mutex::new(Table {
                next: 1,
                open: HashMap::new(),
            }),
        }
    }

    pub fn open(&self, ino: u64, kind: HandleKind) -> u64 {
        let mut t = self.table.lock().expect("handle table");
        let h = t.next;
        t.next += 1;
        t.open.insert(h, (ino, kind));
        h
    }

    /// Whether `handle` is open on `ino` as `kind`.
    pub fn check(&self, handle: u64, ino: u64, kind: HandleKind) -> bool {
        let t = self.table.lock().expect("handle table");
        t.open.get(&handle) == Some(&(ino, kind))
    }

    pub fn release(&self, handle: u64) {
        self.table
            .lock()
            .expect("handle table")
            .open
            .remove(&handle);
    }

    /// The state to hand over for image `manifest`.
    pub fn save(&self, manifest: Digest) -> DeviceState {
        let t = self.table.lock().expect("handle table");
        let mut handles: Vec<OpenHandle> = t
            .open
            .iter()
            .map(|(&handle, &(ino, kind))| OpenHandle { handle, ino, kind })
            .collect();
        handles.sort_by_key(|h| h.handle);
        DeviceState {
            manifest,
            next_handle: t.next,
            handles,
        }
    }

    /// Takes over the handles of `state` (already checked to be this image's).
    pub fn load(&self, state: &DeviceState) {
        let mut t = self.table.lock().expect("handle table");
        t.next = state.next_handle.max(1);
        t.open = state
            .handles
            .iter()
            .map(|h| (h.handle, (h.ino, h.kind)))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_survive_a_save_and_load() {
        let a = Handles::new();
        let f = a.open(5, HandleKind::File);
        let d = a.open(1, HandleKind::Dir);
        let gone = a.open(6, HandleKind::File);
        a.release(gone);
        let state = a.save(Digest::of(b"m"));
        let b = Handles::new();
        assert!(!b.check(f, 5, HandleKind::File));
        b.load(&state);
        assert!(b.check(f, 5, HandleKind::File));
        assert!(b.check(d, 1, HandleKind::Dir));
        assert!(!b.check(gone, 6, HandleKind::File));
        assert!(
            !b.check(f, 6, HandleKind::File),
            "a handle is bound to its inode"
        );
        assert!(b.open(7, HandleKind::File) > gone, "numbers are not reused");
    }
}
