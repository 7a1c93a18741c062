//! thaw's HTTP chunk server.
//!
//! The server is a thin, verifying front for an [`ObjectStore`]: a local
//! directory (`file://`), an S3-compatible bucket (`s3://`) or memory
//! (`memory://`, for tests). It accepts chunk frames and manifests only after
//! checking them against the digests that name them, accepts a manifest only
//! once every chunk it needs is stored, and serves everything as immutable
//! objects. All state lives in the store (layout in `layout.rs`), so any number
//! of servers can front one bucket; each keeps only a byte-bounded in-memory
//! hot cache of chunk frames (`cache.rs`) and its own counters (`metrics.rs`).
//! The HTTP API is specified in `docs/api.md` and implemented in `routes.rs`.
//!
//! [`run`] serves a listener until a shutdown future resolves, then lets
//! requests in flight finish. [`router`] builds the same service for callers
//! (tests, embedders) that drive it themselves.

mod auth;
mod cache;
mod error;
mod http;
mod layout;
mod metrics;
mod routes;
mod state;

pub use error::ServerError;

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
pub use object_store::ObjectStore;
use std::future::Future;
use std::sync::Arc;
use url::Url;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where chunks, manifests and tags live: `file:///dir`, `s3://bucket/prefix`
    /// or `memory://`. See [`open_store`].
    pub store_url: String,
    /// Budget of the in-memory hot cache, in bytes of chunk frames (0 disables it).
    pub cache_mem: u64,
    /// Token required to write (`PUT`, `POST /v1/chunks/missing`); `None` leaves writes open.
    pub push_token: Option<String>,
    /// Token required to read; `None` leaves reads open. The push token also reads.
    pub pull_token: Option<String>,
    /// Largest manifest upload, in bytes.
    pub max_body: usize,
    /// Requests handled at once; more wait for a slot.
    pub max_concurrency: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            store_url: "memory://".to_owned(),
            cache_mem: 256 << 20,
            push_token: None,
            pull_token: None,
            max_body: 256 << 20,
            max_concurrency: 256,
        }
    }
}

/// Opens the object store named by `url`.
///
/// - `file:///abs/dir` (or a plain path): a local directory, created if missing.
/// - `s3://bucket[/prefix]`: S3 or an S3-compatible store, configured from the
///   `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
///   `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...).
/// - `memory://`: a new, empty in-memory store.
pub fn open_store(url: &str) -> Result<Arc<dyn ObjectStore>, ServerError> {
    let bad = |reason: String| ServerError::BadStoreUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = match Url::parse(url) {
        Ok(parsed) => parsed,
        Err(url::ParseError::RelativeUrlWithoutBase) => return open_dir(std::path::Path::new(url)),
        Err(e) => return Err(bad(e.to_string())),
    };
    match parsed.scheme() {
        "memory" => Ok(Arc::new(InMemory::new())),
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|()| bad("use file:///absolute/path".into()))?;
            open_dir(&dir)
        }
        "s3" | "s3a" => {
            let options = std::env::vars()
                .filter(|(key, _)| key.starts_with("AWS_"))
                .map(|(key, value)| (key.to_ascii_lowercase(), value));
            let store_error = |source| ServerError::Store {
                url: url.to_owned(),
                source,
            };
            let (store, prefix) =
                object_store::parse_url_opts(&parsed, options).map_err(store_error)?;
            if prefix.as_ref().is_empty() {
                Ok(Arc::from(store))
            } else {
                Ok(Arc::new(PrefixStore::new(store, prefix)))
            }
        }
        other => Err(bad(format!(
            "unsupported scheme {other:?}: use file://, s3:// or memory://"
        ))),
    }
}

fn open_dir(dir: &std::path::Path) -> Result<Arc<dyn ObjectStore>, ServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateStoreDir {
        path: dir.to_owned(),
        source,
    })?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|source| ServerError::Store {
        url: dir.display().to_string(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// The HTTP service over `store`, configured by `config` (its `store_url` is
/// not used).
pub fn router(store: Arc<dyn ObjectStore>, config: &ServerConfig) -> axum::Router {
    routes::build(store, config)
}

/// Opens the store of `config` and serves `listener` until `shutdown`
/// resolves; then stops accepting connections and returns once the requests
/// in flight have finished.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    use axum::serve::ListenerExt;

    let store = open_store(&config.store_url)?;
    if config.push_token.is_none() && config.pull_token.is_some() {
        tracing::warn!("a pull token without a push token leaves uploads open to anyone");
    }
    let app = router(store, &config);
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(%addr, store = %config.store_url, "thaw server listening");
    // Small responses (HEADs, missing lists) should not wait for Nagle.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServerError::Serve)?;
    tracing::info!(%addr, "thaw server stopped");
    Ok(())
}
