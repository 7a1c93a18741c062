//! What the server knows of each open connection: its phase, which sets the
//! timeout it is under, and whether one of its requests is being handled,
//! which protects it from eviction. The [`Registry`] holds every open
//! connection so that the accept loop can evict one at the cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No byte of a request yet: since the connection opened (`first`) or
    /// since its last response.
    Waiting { since: Instant, first: bool },
    /// Part of a request head has arrived.
    Head { since: Instant },
    /// A request is being served: its head has arrived and its response is
    /// not finished. Its body has its own timeout, and a response the client
    /// stops reading is cut by the socket's write timeout.
    Request,
}

/// The timeouts of the phases between requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From a connection's opening, or the first byte of a later request, to
    /// the end of the request head.
    pub(crate) header: Duration,
    /// From a response to the first byte of the next request.
    pub(crate) idle: Duration,
}

impl Phase {
    /// When this phase times out, and what to log then.
    fn deadline(self, timeouts: &Timeouts) -> Option<(Instant, &'static str)> {
        match self {
            Phase::Waiting { since, first: true } | Phase::Head { since } => {
                Some((since + timeouts.header, "request head not received in time"))
            }
            Phase::Waiting { since, .. } => Some((since + timeouts.idle, "idle")),
            Phase::Request => None,
        }
    }
}

/// One open connection.
pub(crate) struct Conn {
    phase: watch::Sender<Phase>,
    /// Requests started and not yet answered in full.
    requests: AtomicUsize,
    /// Requests being handled under a permit.
    handling: AtomicUsize,
    /// Whether a request of it has been handled since it opened.
    served: AtomicBool,
    /// When a request of it was last handled (or it opened), in nanoseconds
    /// after the registry's epoch: the eviction order.
    last_handled: AtomicU64,
    epoch: Instant,
    /// Until its socket has first been read dry or a request of it has
    /// started, a new connection cannot be evicted: at the cap, where
    /// connections come and go fast, each gets the chance to show a whole
    /// request before it is judged idle.
    fresh: AtomicBool,
    /// Since when a write of its response has been blocked (nanoseconds
    /// after the epoch, plus one), or 0 when none is.
    write_blocked_since: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
}

impl Conn {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Bytes arrived: a waiting connection has started a request head.
    pub(crate) fn bytes_arrived(&self) {
        self.phase.send_if_modified(|phase| match *phase {
            Phase::Waiting { .. } => {
                *phase = Phase::Head {
                    since: Instant::now(),
                };
                true
            }
            _ => false,
        });
    }

    /// A read found nothing more to read: what the client sent at once has
    /// been taken (and a whole request in it started).
    pub(crate) fn read_dry(&self) {
        self.fresh.store(false, Ordering::Relaxed);
    }

    /// A write found the socket full: the client has not taken what was
    /// sent. Kept from the first such write until one makes progress.
    pub(crate) fn write_blocked(&self) {
        let now = self.now() + 1;
        let _ =
            self.write_blocked_since
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A write made progress.
    pub(crate) fn write_unblocked(&self) {
        self.write_blocked_since.store(0, Ordering::Relaxed);
    }

    /// A request head has arrived; the request lasts until the guard (kept
    /// with its response body) is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InRequest {
        self.requests.fetch_add(1, Ordering::Relaxed);
        // The server may read no more until the request is handled.
        self.fresh.store(false, Ordering::Relaxed);
        self.phase.send_replace(Phase::Request);
        InRequest(self.clone())
    }

    /// A request of this connection is handled under a permit until the
    /// guard is dropped; meanwhile the connection is not evicted.
    pub(crate) fn handling(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::Relaxed);
        Handling(self.clone())
    }

    /// Resolves when the connection has outstayed its phase.
    pub(crate) async fn expired(&self, timeouts: &Timeouts) -> &'static str {
        let mut phases = self.phase.subscribe();
        loop {
            let deadline = phases.borrow_and_update().deadline(timeouts);
            match deadline {
                Some((at, why)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => return why,
                    _ = phases.changed() => {}
                },
                // The sender lives in `self`: `changed` cannot fail.
                None => {
                    let _ = phases.changed().await;
                }
            }
        }
    }

    /// Resolves when the accept loop picks this connection to make room.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// A request in progress (see [`Conn::request_started`]).
pub(crate) struct InRequest(Arc<Conn>);

impl Drop for InRequest {
    fn drop(&mut self) {
        if self.0.requests.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.phase.send_replace(Phase::Waiting {
                since: Instant::now(),
                first: false,
            });
        }
    }
}

/// A request handled under a permit (see [`Conn::handling`]).
pub(crate) struct Handling(Arc<Conn>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.last_handled.store(self.0.now(), Ordering::Relaxed);
        self.0.served.store(true, Ordering::Relaxed);
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every open connection.
pub(crate) struct Registry {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Registry {
    pub(crate) fn new() -> Arc<Registry> {
        Arc::new(Registry {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // Inserts and removals cannot leave the map inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection that just opened, until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> Registered {
        let conn = Arc::new(Conn {
            phase: watch::Sender::new(Phase::Waiting {
                since: Instant::now(),
                first: true,
            }),
            requests: AtomicUsize::new(0),
            handling: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            last_handled: AtomicU64::new(self.epoch.elapsed().as_nanos() as u64),
            epoch: self.epoch,
            fresh: AtomicBool::new(true),
            write_blocked_since: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        Registered {
            registry: self.clone(),
            id,
            conn,
        }
    }

    /// Asks a connection not handling a request now to close, in this order:
    ///
    /// 1. without a request in progress and never served (a head trickling
    ///    in, a client that sends nothing): the oldest first;
    /// 2. without a request in progress (kept alive between requests): the
    ///    one that has gone longest without a request handled;
    /// 3. with a request waiting for a permit or for its client to read:
    ///    those never served first, then as in 2.
    ///
    /// So under overload connections that trickle or send nothing make room
    /// for each other, and clients that work keep theirs, however fast new
    /// connections come. A connection not yet read dry is spared (see
    /// `fresh`). False if there is none.
    pub(crate) fn evict_oldest(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .filter(|c| c.handling.load(Ordering::Relaxed) == 0)
            .filter(|c| !c.fresh.load(Ordering::Relaxed))
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .min_by_key(|c| {
                (
                    c.requests.load(Ordering::Relaxed) > 0,
                    c.served.load(Ordering::Relaxed),
                    c.last_handled.load(Ordering::Relaxed),
                )
            });
        victim.is_some_and(|conn| conn.ask_to_close())
    }

    /// Asks the connection whose response has been unable to write for
    /// longest to close, if that has lasted `min` (see `responses`). False
    /// if there is none.
    pub(crate) fn evict_stalled(&self, min: Duration) -> bool {
        let open = self.lock();
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        let min = min.as_nanos() as u64;
        let victim = open
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .filter_map(|c| {
                let since = c.write_blocked_since.load(Ordering::Relaxed);
                (since != 0 && now.saturating_sub(since) >= min).then_some((since, c))
            })
            .min_by_key(|(since, _)| *since);
        victim.is_some_and(|(_, conn)| conn.ask_to_close())
    }
}

impl Conn {
    /// Marks this connection evicted and wakes its task, which closes it.
    fn ask_to_close(&self) -> bool {
        self.evicted.store(true, Ordering::Relaxed);
        self.evict.notify_one();
        true
    }
}

/// An open connection in the registry; dropping it removes it.
pub(crate) struct Registered {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
}

impl Registered {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn phases_set_the_timeout() {
        let timeouts = Timeouts {
            header: Duration::from_secs(5),
            idle: Duration::from_secs(60),
        };
        let registry = Registry::new();
        let registered = registry.open();
        let conn = registered.conn();
        conn.read_dry();
        let start = Instant::now();
        assert_eq!(
            conn.expired(&timeouts).await,
            "request head not received in time"
        );
        assert_eq!(start.elapsed(), timeouts.header, "a new connection");

        let request = conn.request_started();
        let expired = tokio::time::timeout(Duration::from_secs(3600), conn.expired(&timeouts));
        assert!(expired.await.is_err(), "no timeout during a request");
        drop(request);
        let start = Instant::now();
        assert_eq!(conn.expired(&timeouts).await, "idle");
        assert_eq!(start.elapsed(), timeouts.idle, "kept alive");

        conn.bytes_arrived();
        let start = Instant::now();
        conn.expired(&timeouts).await;
        assert_eq!(start.elapsed(), timeouts.header, "a request head started");
    }

    #[tokio::test]
    async fn eviction_spares_connections_being_handled() {
        let registry = Registry::new();
        let (old, busy, new) = (registry.open(), registry.open(), registry.open());
        for r in [&old, &busy, &new] {
            r.conn().read_dry();
        }
        let _handling = busy.conn().handling();
        // `busy` opened before `new`, and `old` before both.
        assert!(registry.evict_oldest());
        tokio::time::timeout(Duration::from_secs(1), old.conn().evicted())
            .await
            .expect("the oldest idle connection goes first");
        assert!(registry.evict_oldest());
        tokio::time::timeout(Duration::from_secs(1), new.conn().evicted())
            .await
            .expect("then the next one not being handled");
        assert!(!registry.evict_oldest(), "the busy one is never picked");
    }

    #[tokio::test]
    async fn eviction_order_follows_what_connections_do() {
        let registry = Registry::new();
        let queued = registry.open();
        let _request = queued.conn().request_started();
        let kept_alive = registry.open();
        drop(kept_alive.conn().handling());
        tokio::time::sleep(Duration::from_millis(2)).await;
        // The newest two: nothing handled, nothing asked.
        let (silent, newer_silent) = (registry.open(), registry.open());
        for r in [&queued, &kept_alive, &silent, &newer_silent] {
            r.conn().read_dry();
        }
        for (expected, why) in [
            (&silent, "the oldest of those that never sent a request"),
            (&newer_silent, "then the next of those"),
            (&kept_alive, "then a connection kept alive between requests"),
            (&queued, "then one whose request waits"),
        ] {
            assert!(registry.evict_oldest());
            tokio::time::timeout(Duration::from_secs(1), expected.conn().evicted())
                .await
                .expect(why);
        }
        assert!(!registry.evict_oldest());
    }

    #[tokio::test]
    async fn a_connection_is_spared_until_it_is_read_dry() {
        let registry = Registry::new();
        let new = registry.open();
        assert!(
            !registry.evict_oldest(),
            "what it sent at once is read first"
        );
        new.conn().read_dry();
        assert!(registry.evict_oldest());
        tokio::time::timeout(Duration::from_secs(1), new.conn().evicted())
            .await
            .expect("then it can go");
    }
}
