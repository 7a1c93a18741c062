//! Working-set profiles in the image core: recording what a start reads, and
//! streaming it at the next cold start.
//!
//! A real start is thousands of small reads in sequence, and on a cold
//! attach each miss waits a round trip while the program stands still. A
//! profile (`thaw_format::profile`) records the chunks a start touched, in
//! order ([`Recorder`], fed by every read and every readahead); replaying it
//! ([`stream`]) fetches those chunks in that order, many per request and
//! several requests at once, while the program is still starting, so its
//! reads find them fetched. Replay only changes *when* chunks are fetched:
//! they go through the same single-flight table, verification and caches as
//! any fetch, and a reader never waits behind the stream.

mod record;
mod replay;

pub(crate) use record::Recorder;
pub use replay::StreamPolicy;
pub(crate) use replay::{plan, stream};
