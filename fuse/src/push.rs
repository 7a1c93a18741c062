//! Page cache push: bytes of the image that are in memory go into the
//! kernel's page cache before anything reads them, so a read or a page fault
//! on them is answered by the kernel alone, with no request to this process.
//!
//! A profile's stream (or a local one from the disk cache) brings a start's
//! working set into memory ahead of the start; without this, each of the
//! start's reads would still be a round trip through `/dev/fuse` and a copy
//! while the program waits. With it, the copy is made here, on another core,
//! while the program runs.
//!
//! The kernel only takes bytes for an inode it holds (`FUSE_NOTIFY_STORE`
//! answers ENOENT otherwise), so the pusher keeps the lookup count of every
//! regular file the kernel was given (lookups and `readdirplus` entries, less
//! forgets) and pushes:
//! - a file's bytes in memory when the kernel first holds it, and
//! - a chunk's bytes, when it enters memory, to the files the kernel holds.
//!
//! The kernel instantiates an inode when the lookup's reply reaches the
//! process that asked, which may be just after the pusher hears of it: a
//! push answered ENOENT is tried again a moment later, a few times.
//! Pushes are blocks whole (a partial block would not be taken as read), and
//! a push the kernel refuses for another reason turns pushing off for the
//! mount: reads still work, they just ask.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thaw_client::image::fs::ImageFs;

/// `FUSE_NOTIFY_STORE`, sent in the error field of an unsolicited message.
const FUSE_NOTIFY_STORE: i32 = 4;
/// `fuse_out_header` then `fuse_notify_store_out`.
const STORE_HEADER: usize = 16 + 24;
/// Tries of a push the kernel answered ENOENT to, and the first wait
/// between them, doubled at each: a program that looked a file up usually
/// reads it within 100 µs of the reply, and the kernel makes the inode just
/// before; the entries of a listing take longer (the kernel makes them one
/// by one after the reply), about 10 ms in all.
const TRIES: u8 = 10;
const RETRY_AFTER: Duration = Duration::from_micros(20);
/// A message is cut once it holds this many pieces (below `IOV_MAX`) or bytes.
const MAX_PIECES: usize = 256;
const MAX_MESSAGE: u64 = 64 << 20;

enum Event {
    /// The kernel was given this inode once more (by a lookup: a program
    /// is about to open it; or in a listing).
    Known(u64),
    /// The kernel forgot this many lookups of the inode.
    Forgotten(u64, u64),
    /// This chunk entered memory.
    Resident(u32),
}

/// Events for the pusher: a file just looked up goes before the bulk of
/// chunks arriving for files the kernel holds, since a program is about to
/// read it.
#[derive(Default)]
struct Queue {
    events: Mutex<Queued>,
    ready: Condvar,
}

#[derive(Default)]
struct Queued {
    urgent: VecDeque<Event>,
    later: VecDeque<Event>,
    closed: bool,
}

impl Queue {
    fn send(&self, event: Event, urgent: bool) {
        let mut q = self.events.lock().expect("push queue lock");
        if q.closed {
            return;
        }
        if urgent {
            q.urgent.push_back(event);
        } else {
            q.later.push_back(event);
        }
        self.ready.notify_one();
    }

    /// The next event, waiting up to `wait`; `Err` once closed.
    fn next(&self, wait: Duration) -> Result<Option<Event>, ()> {
        let mut q = self.events.lock().expect("push queue lock");
        if q.urgent.is_empty() && q.later.is_empty() && !q.closed {
            q = self.ready.wait_timeout(q, wait).expect("push queue lock").0;
        }
        match q.urgent.pop_front().or_else(|| q.later.pop_front()) {
            Some(e) => Ok(Some(e)),
            None if q.closed => Err(()),
            None => Ok(None),
        }
    }
}

/// Sends a mount's bytes in memory to the kernel's page cache.
pub(crate) struct Pusher {
    queue: Arc<Queue>,
}

impl Pusher {
    /// Starts pushing to the kernel over `dev` (the mount's `/dev/fuse`).
    pub(crate) fn start(fs: Arc<ImageFs>, dev: OwnedFd) -> std::io::Result<Pusher> {
        let queue = Arc::new(Queue::default());
        let hook = queue.clone();
        fs.on_resident(move |chunk| hook.send(Event::Resident(chunk), false));
        let page = page_size();
        let q = queue.clone();
        std::thread::Builder::new()
            .name("thaw-push".into())
            .spawn(move || {
                // Retries are microseconds apart: no timer slack for them.
                // SAFETY: PR_SET_TIMERSLACK takes a value and changes only
                // this thread.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
                Worker::new(fs, dev, page).run(&q)
            })?;
        Ok(Pusher { queue })
    }

    /// The kernel was given regular file `ino`: by a lookup (`looked_up`),
    /// or as a listing's entry.
    pub(crate) fn known(&self, ino: u64, looked_up: bool) {
        self.queue.send(Event::Known(ino), looked_up);
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub(crate) fn forgotten(&self, ino: u64, n: u64) {
        self.queue.send(Event::Forgotten(ino, n), true);
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.queue.events.lock().expect("push queue lock").closed = true;
        self.queue.ready.notify_one();
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096).max(512)
}

/// How the kernel took a push.
enum Pushed {
    Taken,
    /// The kernel does not hold the inode (yet, or any more).
    NotHeld,
    Refused(std::io::Error),
}

struct Worker {
    fs: Arc<ImageFs>,
    dev: OwnedFd,
    page: u64,
    /// Lookup counts of the regular files the kernel holds.
    held: HashMap<u64, u64>,
    /// Files whose first push found them not yet held: when to try again, and tries left.
    retry: Vec<(Instant, u64, u8)>,
    on: bool,
}

impl Worker {
    fn new(fs: Arc<ImageFs>, dev: OwnedFd, page: u64) -> Worker {
        Worker {
            fs,
            dev,
            page,
            held: HashMap::new(),
            retry: Vec::new(),
            on: true,
        }
    }

    fn run(mut self, queue: &Queue) {
        loop {
            let wait = self
                .retry
                .iter()
                .map(|r| r.0.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            match queue.next(wait) {
                Ok(Some(event)) if self.on => self.handle(event),
                Ok(_) => {}
                Err(()) => return,
            }
            self.retry_due();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Known(ino) => {
                let n = self.held.entry(ino).or_insert(0);
                *n += 1;
                if *n == 1 {
                    self.push_file(ino, TRIES);
                }
            }
            Event::Forgotten(ino, n) => {
                if let Some(held) = self.held.get_mut(&ino) {
                    *held = held.saturating_sub(n);
                    if *held == 0 {
                        self.held.remove(&ino);
                    }
                }
            }
            Event::Resident(chunk) => {
                let fs = self.fs.clone();
                for &ino in fs.files_of_chunk(chunk) {
                    if self.held.contains_key(&ino) {
                        let runs = fs.resident_runs(ino, Some(chunk), self.page);
                        let retrying = self.retry.iter().any(|r| r.1 == ino);
                        if let (Pushed::NotHeld, false) = (self.push_runs(ino, runs), retrying) {
                            self.held.remove(&ino);
                        }
                    }
                }
            }
        }
    }

    /// Pushes every byte of `ino` in memory; if the kernel does not hold it
    /// yet, tries again later while `tries` last.
    fn push_file(&mut self, ino: u64, tries: u8) {
        let runs = self.fs.resident_runs(ino, None, self.page);
        if let Pushed::NotHeld = self.push_runs(ino, runs) {
            if tries > 1 && self.held.contains_key(&ino) {
                let wait = RETRY_AFTER * (1 << (TRIES - tries));
                self.retry.push((Instant::now() + wait, ino, tries - 1));
            } else {
                self.held.remove(&ino);
            }
        }
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let (due, later) = std::mem::take(&mut self.retry)
            .into_iter()
            .partition(|r| r.0 <= now);
        self.retry = later;
        for (_, ino, tries) in due {
            if self.on {
                self.push_file(ino, tries);
            }
        }
    }

    fn push_runs(&mut self, ino: u64, runs: Vec<(u64, Vec<bytes::Bytes>)>) -> Pushed {
        for (offset, pieces) in runs {
            // One message per run, split where a message has grown large
            // and the next piece starts on a block (a message must end on
            // one, but for the file's end).
            let (mut at, mut from, mut len) = (offset, 0, 0u64);
            for (k, p) in pieces.iter().enumerate() {
                len += p.len() as u64;
                let last = k + 1 == pieces.len();
                let full = k + 1 - from >= MAX_PIECES || len >= MAX_MESSAGE;
                if last || (full && (at + len) % self.page == 0) {
                    match self.store(ino, at, &pieces[from..=k], len) {
                        Pushed::Taken => self.fs.pushed(ino, at, len),
                        Pushed::NotHeld => return Pushed::NotHeld,
                        Pushed::Refused(e) => {
                            tracing::warn!(ino, "the kernel refused a page cache push ({e}); reads will ask instead");
                            self.on = false;
                            return Pushed::Refused(e);
                        }
                    }
                    (at, from, len) = (at + len, k + 1, 0);
                }
            }
        }
        Pushed::Taken
    }

    /// One `FUSE_NOTIFY_STORE` of `pieces` (`len` bytes) at `offset` of `ino`.
    fn store(&self, ino: u64, offset: u64, pieces: &[bytes::Bytes], len: u64) -> Pushed {
        let total = STORE_HEADER as u64 + len;
        let (Ok(total32), Ok(len32)) = (u32::try_from(total), u32::try_from(len)) else {
            return Pushed::Refused(std::io::Error::other("push too large"));
        };
        let mut header = [0u8; STORE_HEADER];
        header[0..4].copy_from_slice(&total32.to_ne_bytes());
        header[4..8].copy_from_slice(&FUSE_NOTIFY_STORE.to_ne_bytes());
        // unique = 0: a notification, not a reply
        header[16..24].copy_from_slice(&ino.to_ne_bytes());
        header[24..32].copy_from_slice(&offset.to_ne_bytes());
        header[32..36].copy_from_slice(&len32.to_ne_bytes());
        let mut iov = Vec::with_capacity(pieces.len() + 1);
        iov.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        iov.extend(pieces.iter().map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        }));
        // SAFETY: every iovec points into a buffer that outlives the call.
        let n = unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n >= 0 {
            return Pushed::Taken;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Pushed::NotHeld,
            _ => Pushed::Refused(e),
        }
    }
}
