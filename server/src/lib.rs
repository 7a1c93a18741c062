//! thaw's HTTP chunk server.
//!
//! The server is a thin, verifying front for an [`ObjectStore`]: a local
//! directory (`file://`), an S3-compatible bucket (`s3://`) or memory
//! (`memory://`, for tests). It accepts chunk frames and manifests only after
//! checking them against the digests that name them, accepts a manifest only
//! once every chunk it needs is stored with the length it gives, checks again
//! the frames it reads back from the store, by their seal when they have one
//! (quarantining what the store damaged), and serves everything as immutable objects. All state lives in the store
//! (layout in `layout.rs`), so any number of servers can front one bucket;
//! each keeps only a byte-bounded in-memory hot cache of chunk frames
//! (`cache.rs`) and its own counters (`metrics.rs`). The HTTP API is
//! specified in `docs/api.md` and implemented in `routes.rs`; connections,
//! with their timeouts and cap, are served by `connections.rs`.
//!
//! [`run`] opens a store and serves a listener until a shutdown future
//! resolves; [`serve`] does the same over a store the caller opened. [`router`]
//! builds the HTTP service alone, for callers that drive it themselves.
//! [`fsck`] checks every object of a store.

mod auth;
mod cache;
mod connections;
mod error;
mod fsck;
mod gc;
mod http;
mod layout;
mod metrics;
mod responses;
mod routes;
mod staging;
mod state;

pub use error::ServerError;
pub use fsck::{fsck, BadObject, FsckOptions, FsckReport, IncompleteManifest};
pub use gc::{gc, GcOptions, GcReport};

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
pub use object_store::ObjectStore;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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
    /// Bytes of request bodies held at once, across all requests: a body
    /// waits for room before it is read.
    pub body_memory: u64,
    /// Bytes of chunk frames, manifests and profiles held at once by
    /// responses being sent: a read waits for room before it reads, and
    /// closes the response stalled longest to make some.
    pub response_memory: u64,
    /// Reads (`GET`, `HEAD`, batch reads) handled at once; more wait for a slot.
    pub max_concurrency: usize,
    /// Uploads (`PUT`, the missing list) handled at once; more wait for a slot.
    pub max_uploads: usize,
    /// Connections open at once. At the cap, a new connection closes the one
    /// that has gone longest without a request handled (see `docs/api.md`).
    pub max_connections: usize,
    /// Time a client has to send a whole request head, from opening the
    /// connection or from the first byte of a later request.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request, and a
    /// response may wait for its client to read more of it.
    pub idle_timeout: Duration,
    /// Time a request body has to arrive, once the server reads it.
    pub body_timeout: Duration,
    /// On shutdown, time the requests in flight have to finish before their
    /// connections are closed.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with this certificate and key ([`tls_config`]); `None` serves plain HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            store_url: "memory://".to_owned(),
            cache_mem: 256 << 20,
            push_token: None,
            pull_token: None,
            max_body: 256 << 20,
            body_memory: 1 << 30,
            response_memory: 256 << 20,
            max_concurrency: 256,
            max_uploads: 64,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// A TLS configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, ServerError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| ServerError::Tls(format!("{what}: {e}"));
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cannot read the certificate chain", &e))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(
            "the certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| bad("cannot read the private key", &e))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("no TLS versions", &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("the certificate and key do not go together", &e))?;
    Ok(Arc::new(config))
}

/// Where a store URL points.
enum Location {
    Memory,
    Dir(PathBuf),
    S3(Url),
}

fn locate(url: &str) -> Result<Location, ServerError> {
    let bad = |reason: String| ServerError::BadStoreUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = match Url::parse(url) {
        Ok(parsed) => parsed,
        Err(url::ParseError::RelativeUrlWithoutBase) => return Ok(Location::Dir(url.into())),
        Err(e) => return Err(bad(e.to_string())),
    };
    match parsed.scheme() {
        "memory" => Ok(Location::Memory),
        "file" => parsed
            .to_file_path()
            .map(Location::Dir)
            .map_err(|()| bad("use file:///absolute/path".into())),
        "s3" | "s3a" => Ok(Location::S3(parsed)),
        other => Err(bad(format!(
            "unsupported scheme {other:?}: use file://, s3:// or memory://"
        ))),
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
    match locate(url)? {
        Location::Memory => Ok(Arc::new(InMemory::new())),
        Location::Dir(dir) => open_dir(&dir),
        Location::S3(parsed) => {
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
    routes::build(state::AppState::new(store, config), config)
}

/// Opens the store of `config` (removing, in a directory store, the staging
/// files a crashed server left) and serves `listener` until `shutdown`
/// resolves; see [`serve`].
pub async fn run(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let store = open_store(&config.store_url)?;
    if let Location::Dir(dir) = locate(&config.store_url)? {
        // In the background: a large store takes a while to walk, and only
        // files older than this instant go.
        let started = SystemTime::now();
        tokio::task::spawn_blocking(move || match staging::sweep(&dir, started) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(files = n, dir = %dir.display(), "removed staging files left by an earlier server")
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot remove old staging files")
            }
        });
    }
    tracing::info!(store = %config.store_url, "opened the store");
    serve(listener, store, config, shutdown).await
}

/// Serves `listener` over `store` until `shutdown` resolves; then stops
/// accepting connections, lets the requests in flight finish for
/// `config.shutdown_grace`, closes what is left and returns. Connections
/// are bounded by the timeouts and the cap of `config` (`docs/api.md`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn ObjectStore>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if config.push_token.is_none() && config.pull_token.is_some() {
        tracing::warn!("a pull token without a push token leaves uploads open to anyone");
    }
    let state = state::AppState::new(store, &config);
    let app = routes::build(state.clone(), &config);
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(%addr, "thaw server listening");
    connections::serve(listener, app, state, &config, shutdown).await;
    tracing::info!(%addr, "thaw server stopped");
    Ok(())
}
