//! The state every handler shares: the store, the hot cache, the metrics.

use crate::cache::HotCache;
use crate::metrics::Metrics;
use object_store::ObjectStore;
use std::sync::Arc;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) cache: HotCache,
    pub(crate) metrics: Metrics,
}

pub(crate) type Shared = Arc<AppState>;
