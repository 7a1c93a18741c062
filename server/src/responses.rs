//! The response memory: room for the chunk frames that responses hold.
//!
//! A frame served by a `GET` or a batch read is held from the moment it is
//! read until the client's socket has taken it, whether the hot cache still
//! holds it or not. Each such frame takes room for its length in one budget
//! (`--response-memory`) before it is read, and gives it back when the
//! response drops it ([`ResponseMemory::hold`]), so many slow clients cannot
//! make the server hold more than the budget.
//!
//! Clients that stop reading would keep their room until the idle timeout
//! cuts them off, and everyone else would wait for it. So a read that waits
//! for room closes the connection whose response has been stalled longest,
//! once it has been stalled for [`STALL_MIN`]: a client that reads, even
//! slowly, keeps its connection.

use crate::connections::Registry;
use crate::metrics::Metrics;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a response must have been unable to write before it counts as
/// stalled and may be closed to make room.
pub(crate) const STALL_MIN: Duration = Duration::from_secs(1);

/// How long a read waits for room before it closes a stalled response; also
/// the shortest time between two such closes, so that waiting reads close
/// one stalled connection at a time rather than one each.
const RECLAIM_EVERY: Duration = Duration::from_millis(20);

pub(crate) struct ResponseMemory {
    /// KiB permits.
    room: Arc<Semaphore>,
    kib: usize,
    connections: Arc<Registry>,
    last_reclaim: Mutex<Option<Instant>>,
}

/// Room held for one frame; given back when dropped.
pub(crate) struct Room {
    _permit: OwnedSemaphorePermit,
}

/// A frame and the room it holds, for as long as any copy of it lives.
struct Held {
    frame: Bytes,
    _room: Room,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// A byte budget as KiB permits: at least one, at most `u32::MAX` (what a
/// semaphore hands out at a time). Response and body memory count room so.
pub(crate) fn kib_permits(bytes: u64) -> usize {
    (bytes >> 10).clamp(1, u32::MAX.into()) as usize
}

impl ResponseMemory {
    pub(crate) fn new(bytes: u64, connections: Arc<Registry>) -> ResponseMemory {
        let kib = kib_permits(bytes);
        ResponseMemory {
            room: Arc::new(Semaphore::new(kib)),
            kib,
            connections,
            last_reclaim: Mutex::new(None),
        }
    }

    /// Bytes of frames held by responses now.
    pub(crate) fn held(&self) -> u64 {
        (self.kib - self.room.available_permits()) as u64 * 1024
    }

    /// Room for a frame of `len` bytes, once there is some. A frame larger
    /// than the whole budget takes all of it.
    pub(crate) async fn room(&self, len: u64, metrics: &Metrics) -> Room {
        let kib = len.div_ceil(1024).clamp(1, self.kib as u64) as u32;
        if let Ok(permit) = self.room.clone().try_acquire_many_owned(kib) {
            return Room { _permit: permit };
        }
        loop {
            let wait = self.room.clone().acquire_many_owned(kib);
            match tokio::time::timeout(RECLAIM_EVERY, wait).await {
                Ok(permit) => {
                    return Room {
                        _permit: permit.expect("never closed"),
                    }
                }
                Err(_) => self.reclaim(metrics),
            }
        }
    }

    /// Closes the connection whose response has been stalled longest, if one
    /// has been for `STALL_MIN`, and no other read has closed one within
    /// `RECLAIM_EVERY`.
    fn reclaim(&self, metrics: &Metrics) {
        {
            let mut last = self.last_reclaim.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < RECLAIM_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        if self.connections.evict_stalled(STALL_MIN) {
            metrics.stalled_response_closed();
        }
    }

    /// `frame`, holding `room` until the last copy of what is returned is
    /// dropped (when the response has sent it, or is dropped).
    pub(crate) fn hold(frame: Bytes, room: Room) -> Bytes {
        Bytes::from_owner(Held { frame, _room: room })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_hold_their_room_until_every_copy_is_dropped() {
        let memory = ResponseMemory::new(8 << 10, Registry::new());
        let metrics = Metrics::default();
        let frame = Bytes::from(vec![7u8; 5000]);
        let room = memory.room(frame.len() as u64, &metrics).await;
        let held = ResponseMemory::hold(frame.clone(), room);
        assert_eq!(held, frame);
        assert_eq!(memory.held(), 5 << 10, "5,000 bytes take 5 KiB");
        let part = held.slice(10..20);
        drop(held);
        assert_eq!(memory.held(), 5 << 10, "a slice keeps the frame");
        drop(part);
        assert_eq!(memory.held(), 0);
    }

    #[tokio::test]
    async fn a_read_waits_for_room_and_a_frame_larger_than_the_budget_takes_it_all() {
        let memory = ResponseMemory::new(8 << 10, Registry::new());
        let metrics = Metrics::default();
        let big = memory.room(1 << 20, &metrics).await;
        assert_eq!(memory.held(), 8 << 10);
        let waiting = tokio::time::timeout(Duration::from_millis(100), memory.room(1, &metrics));
        assert!(
            waiting.await.is_err(),
            "no room while the big frame is held"
        );
        drop(big);
        let small = tokio::time::timeout(Duration::from_secs(5), memory.room(1, &metrics));
        small.await.expect("room once it is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_read_closes_the_longest_stalled_response() {
        let registry = Registry::new();
        let memory = ResponseMemory::new(4 << 10, registry.clone());
        let metrics = Metrics::default();
        let (slow, stalled) = (registry.open(), registry.open());
        stalled.conn().write_blocked();
        tokio::time::sleep(STALL_MIN / 2).await;
        slow.conn().write_blocked();
        let held = memory.room(4 << 10, &metrics).await;
        let evicted = stalled.conn().clone();
        let wait = tokio::spawn(async move {
            tokio::select! {
                _ = memory.room(1, &metrics) => "room",
                () = evicted.evicted() => "closed",
            }
        });
        tokio::time::sleep(STALL_MIN / 4).await;
        assert!(!wait.is_finished(), "nothing stalled for STALL_MIN yet");
        tokio::time::sleep(STALL_MIN).await;
        assert_eq!(wait.await.unwrap(), "closed", "the longest stalled goes");
        drop(held);
        drop(slow);
    }
}
