//! A timeline of what an attach did, for drawing where a start's time goes:
//! each read that reached the image and how long it waited, each chunk
//! fetched on demand or ahead and each one loaded from the disk cache, each
//! batch of a profile's stream, and each push of bytes into the kernel's
//! page cache. Off unless asked (`thaw mount --timeline FILE`); kept in
//! memory, bounded, and written as JSON when the attach ends.

use serde::Serialize;
use std::sync::Mutex;
use std::time::Instant;

/// Events kept at most; later ones are counted, not kept.
const MAX_EVENTS: usize = 1 << 20;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A read that reached the image (`node`, `bytes` asked), until answered.
    Read,
    /// A chunk fetched for a reader, from asking to verified bytes.
    Fetch,
    /// A chunk fetched ahead of readers (readahead).
    Prefetch,
    /// A chunk loaded from the disk cache into memory.
    DiskLoad,
    /// A batch request of a profile's stream (`chunks` of them, frame bytes).
    Batch,
    /// Bytes handed to the kernel's page cache for file `node`.
    Push,
}

/// One event, in microseconds since the attach began.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub kind: Kind,
    pub at_us: u64,
    pub dur_us: u64,
    #[serde(flatten)]
    pub what: What,
}

/// What a timeline holds when it is written.
#[derive(Debug, Serialize)]
pub struct Written<'a> {
    pub events: &'a [Event],
    /// Events left out past the bound.
    pub dropped: u64,
}

/// The events of one attach.
#[derive(Debug)]
pub struct Timeline {
    began: Instant,
    events: Mutex<(Vec<Event>, u64)>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            began: Instant::now(),
            events: Mutex::new((Vec::new(), 0)),
        }
    }

    /// Notes `kind`, begun at `began` and ending now.
    pub fn note(&self, kind: Kind, began: Instant, what: What) {
        let at_us = began.saturating_duration_since(self.began).as_micros() as u64;
        let dur_us = began.elapsed().as_micros() as u64;
        let event = Event {
            kind,
            at_us,
            dur_us,
            what,
        };
        let mut e = self.events.lock().expect("timeline lock");
        if e.0.len() < MAX_EVENTS {
            e.0.push(event);
        } else {
            e.1 += 1;
        }
    }

    /// Writes the events so far, in the order they ended, as JSON to `out`.
    /// (Taken out first, so reads noting events do not wait on the writing.)
    pub fn write_json(&self, out: impl std::io::Write) -> serde_json::Result<()> {
        let (events, dropped) = std::mem::take(&mut *self.events.lock().expect("timeline lock"));
        serde_json::to_writer(
            out,
            &Written {
                events: &events,
                dropped,
            },
        )
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

/// What an event concerns.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct What {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u32>,
    pub bytes: u64,
}
