//! The chunk servers one [`Remote`](super::Remote) may ask, and which one it
//! asks first.
//!
//! Every server in the list fronts the same store, so any of them gives the
//! same answer. The reference's own server comes first, then each
//! `--server`. A request starts at the server in use; when that server fails
//! in a way another may not (see [`fails_over`]) the request moves on to the
//! next, and the first one that answers becomes the server in use, so later
//! requests go straight to it instead of knocking on a dead one each time.
//! There is no going back on a timer: the client stays where it is until that
//! server fails too. A server that failed cools down for [`COOL_DOWN`]: while
//! it does it is tried after every other server, so it is asked again only
//! when all the others fail, and once it has cooled down, in its turn.

use crate::error::{ClientError, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server that failed is tried after all the others.
pub const COOL_DOWN: Duration = Duration::from_secs(10);

/// Whether a failed request should be tried on the next server: connection
/// errors, timeouts, 5xx, and 408 and 429 (that server is slow or busy, the
/// next may not be). Every other answer (404, 401, a refused manifest) is the
/// store's answer, which every server would give alike.
pub fn fails_over(e: &ClientError) -> bool {
    e.is_transient()
}

/// The servers of one remote, shared by its clones.
#[derive(Debug)]
pub(crate) struct Servers {
    /// Base URLs, without a trailing slash, in the order given.
    bases: Vec<String>,
    in_use: AtomicUsize,
    failovers: AtomicU64,
    /// When each server last failed, while it cools down.
    failed_at: Mutex<Vec<Option<Instant>>>,
}

impl Servers {
    /// `bases` must not be empty.
    pub fn new(bases: Vec<String>) -> Servers {
        assert!(!bases.is_empty(), "a remote has at least one server");
        let n = bases.len();
        Servers {
            bases,
            in_use: AtomicUsize::new(0),
            failovers: AtomicU64::new(0),
            failed_at: Mutex::new(vec![None; n]),
        }
    }

    pub fn count(&self) -> usize {
        self.bases.len()
    }

    pub fn base(&self, i: usize) -> &str {
        &self.bases[i]
    }

    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// The server requests start at.
    pub fn in_use(&self) -> &str {
        &self.bases[self.in_use.load(Ordering::Relaxed)]
    }

    /// How many times requests moved to another server.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// The order in which a request made at `now` tries the servers: from the
    /// one in use, round the list, those cooling down last.
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.bases.len();
        let start = self.in_use.load(Ordering::Relaxed);
        let failed_at = self.failed_at.lock().expect("servers lock");
        let cooling = |i: usize| failed_at[i].is_some_and(|t| now < t + COOL_DOWN);
        let round = (0..n).map(|k| (start + k) % n);
        let (mut order, last): (Vec<usize>, Vec<usize>) = round.partition(|&i| !cooling(i));
        order.extend(last);
        order
    }

    /// Notes that server `i` failed at `now`; true if it was not already
    /// cooling down (the first to see it fail says so).
    pub fn failed(&self, i: usize, now: Instant) -> bool {
        let mut failed_at = self.failed_at.lock().expect("servers lock");
        let was_cooling = failed_at[i].is_some_and(|t| now < t + COOL_DOWN);
        failed_at[i] = Some(now);
        !was_cooling
    }

    /// Notes that server `i` answered a request that started at server
    /// `first`: it becomes the one in use, unless another request has moved
    /// on already.
    pub fn answered(&self, i: usize, first: usize) {
        self.failed_at.lock().expect("servers lock")[i] = None;
        if i != first
            && self
                .in_use
                .compare_exchange(first, i, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(server = self.bases[i], "now using chunk server");
        }
    }
}

/// The base URL of `--server` `s`: `HOST:PORT` takes `scheme`, the
/// reference's; `http://HOST:PORT` and `https://HOST:PORT` are kept.
pub(crate) fn server_url(s: &str, scheme: &str) -> Result<String> {
    let bad = || ClientError::BadServer(s.to_owned());
    let (scheme, host) = crate::reference::split_scheme(s, scheme).ok_or_else(bad)?;
    let host = host.strip_suffix('/').unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok(format!("{scheme}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Servers {
        Servers::new(vec![
            "http://a:1".into(),
            "http://b:2".into(),
            "http://c:3".into(),
        ])
    }

    #[test]
    fn requests_start_at_the_reference_then_go_round() {
        let s = three();
        assert_eq!(s.order(Instant::now()), [0, 1, 2]);
        assert_eq!(s.in_use(), "http://a:1");
    }

    #[test]
    fn the_server_that_answered_is_kept_and_counted_once() {
        let s = three();
        let now = Instant::now();
        assert!(s.failed(0, now));
        assert!(!s.failed(0, now), "the second to see it fail says nothing");
        // Two requests started at server 0 and both got through on server 1.
        s.answered(1, 0);
        s.answered(1, 0);
        assert_eq!(s.in_use(), "http://b:2");
        assert_eq!(s.failovers(), 1);
        // The dead one goes last while it cools down.
        assert_eq!(s.order(now), [1, 2, 0]);
        // A late answer from a request that started at 0 does not move back.
        s.answered(0, 0);
        assert_eq!(s.in_use(), "http://b:2");
    }

    #[test]
    fn a_failed_server_is_tried_in_turn_after_it_cools_down() {
        let s = three();
        let now = Instant::now();
        s.failed(0, now);
        s.failed(1, now);
        assert_eq!(s.order(now), [2, 0, 1]);
        let later = now + COOL_DOWN;
        assert_eq!(s.order(later), [0, 1, 2]);
        // An answer clears the mark at once.
        let s = three();
        s.failed(1, now);
        s.answered(1, 1);
        assert_eq!(s.order(now), [0, 1, 2]);
        assert_eq!(s.failovers(), 0);
    }

    #[test]
    fn server_urls_take_the_references_scheme() {
        assert_eq!(server_url("h:1", "https").unwrap(), "https://h:1");
        assert_eq!(server_url("http://h:1/", "https").unwrap(), "http://h:1");
        for bad in ["", "ftp://h:1", "h:1/x", "http://", "a b:1"] {
            assert!(server_url(bad, "http").is_err(), "{bad:?}");
        }
    }
}
