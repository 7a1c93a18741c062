//! HTTP client for the chunk server API (`docs/api.md`).
//!
//! One `reqwest::Client` per [`Remote`] keeps HTTP/1.1 keep-alive connections
//! pooled, so concurrent fetches reuse warm connections. A remote may know
//! several servers over one store ([`servers`]): each attempt tries them in
//! turn, from the one in use, until one answers. Transient failures
//! (connection refused, timeouts, 5xx) move on to the next server, and once
//! every server has failed they are retried with exponential backoff until
//! the [`RetryPolicy`]'s deadline; client errors (4xx) are returned at once.
//! Every response body is read with a cap that follows from what it can hold
//! (a frame, a manifest, a batch of known chunks), so a broken or hostile
//! server cannot grow a client without bound.

pub mod servers;

use crate::error::{ClientError, Result};
use crate::reference::{ImageRef, Selector};
use bytes::Bytes;
use servers::Servers;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thaw_format::wire::{
    self, BATCH_MAX_IDS, FRAME_MAX, MISSING_MAX_IDS, PROFILE_BODY_MAX, RECORD_HEADER_LEN,
};
use thaw_format::{Digest, Manifest};

/// How long and how often to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(50),
        }
    }
}

/// A manifest as fetched: verified against its digest, with its encoding.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub manifest: Manifest,
    pub bytes: Bytes,
}

/// A chunk server, or several over one store.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Shared by clones, so all of them know which server answers.
    servers: Arc<Servers>,
    token: Option<String>,
    http: reqwest::Client,
    /// The extra CAs the client trusts (`with_ca_pem`), kept to rebuild it.
    ca_pem: Option<Arc<[u8]>>,
    pub retry: RetryPolicy,
    /// Longest one request to one server may take before it counts as failed
    /// (and the next server is tried).
    pub request_timeout: Duration,
}

/// Most ids one `missing` request carries: a tenth of what the server takes,
/// so answers come back while hashing goes on.
const MISSING_BATCH: usize = MISSING_MAX_IDS / 10;
/// Most ids one batch read carries.
pub const READ_BATCH: usize = BATCH_MAX_IDS;
/// Largest manifest a client accepts (the server's default upload limit).
pub const MANIFEST_MAX: usize = 256 << 20;
/// Largest tag answer (a digest and a newline, with room).
const TAG_MAX: usize = wire::TAG_BODY_MAX;

/// A client for `bases`. The system's CA roots are loaded only when one of
/// them is `https://`: loading them reads every file of the system's
/// certificate directory, which on a cold page cache was most of a `thaw
/// mount` (28 of 44 ms) of an `http://` image.
fn http_client(ca_pem: Option<&[u8]>, bases: &[String]) -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .tls_built_in_root_certs(any_tls(bases));
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)? {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
}

/// Whether any of `bases` is an `https://` server.
fn any_tls(bases: &[String]) -> bool {
    bases.iter().any(|b| b.starts_with("https://"))
}

fn unreachable(base: &str, source: reqwest::Error) -> ClientError {
    ClientError::Unreachable {
        url: base.to_owned(),
        source,
    }
}

impl Remote {
    pub fn new(base: &str, token: Option<String>) -> Result<Remote> {
        let bases = vec![base.trim_end_matches('/').to_owned()];
        let http = http_client(None, &bases).map_err(|source| unreachable(base, source))?;
        Ok(Remote {
            servers: Arc::new(Servers::new(bases)),
            token,
            http,
            ca_pem: None,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(120),
        })
    }

    pub fn for_ref(r: &ImageRef, token: Option<String>) -> Result<Remote> {
        Remote::new(&r.server, token)
    }

    /// Adds servers over the same store, tried in order after those known:
    /// `HOST:PORT` (with the first server's scheme) or `http[s]://HOST:PORT`.
    /// The token and the trusted CAs are the same for all.
    pub fn with_servers(mut self, more: &[impl AsRef<str>]) -> Result<Remote> {
        let first = self.servers.base(0);
        let scheme = first.split_once("://").map_or("http", |(s, _)| s);
        let mut bases = self.servers.bases().to_vec();
        for s in more {
            let url = servers::server_url(s.as_ref(), scheme)?;
            if !bases.contains(&url) {
                bases.push(url);
            }
        }
        if !any_tls(self.servers.bases()) && any_tls(&bases) {
            self.http = http_client(self.ca_pem.as_deref(), &bases)
                .map_err(|source| unreachable(first, source))?;
        }
        self.servers = Arc::new(Servers::new(bases));
        Ok(self)
    }

    /// Trusts the certificate authorities in `pem` (a PEM bundle) for
    /// `https://` servers, beside the usual web roots: for a server whose
    /// certificate a private CA signed.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Remote> {
        self.http = http_client(Some(pem), self.servers.bases())
            .map_err(|source| ClientError::BadCertificate { source })?;
        self.ca_pem = Some(pem.into());
        Ok(self)
    }

    /// The server requests start at now.
    pub fn base(&self) -> &str {
        self.servers.in_use()
    }

    /// Every server, in the order given.
    pub fn servers(&self) -> &[String] {
        self.servers.bases()
    }

    /// How many times requests moved on to another server.
    pub fn failovers(&self) -> u64 {
        self.servers.failovers()
    }

    fn req(&self, base: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{base}{path}"))
            .timeout(self.request_timeout);
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// One attempt at `op`, on each server in turn from the one in use,
    /// until one answers (see [`servers::fails_over`]). With one server, its
    /// answer or error as it is.
    async fn on_any<'s, T, F, Fut>(&'s self, op: F) -> Result<T>
    where
        F: Fn(&'s str) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let servers = &*self.servers;
        if servers.count() == 1 {
            // Nothing to fail over to, so nothing to remember.
            return op(servers.base(0)).await;
        }
        let order = servers.order(Instant::now());
        let mut last = None;
        for &i in &order {
            match op(servers.base(i)).await {
                Err(e) if servers::fails_over(&e) => {
                    let first = servers.failed(i, Instant::now());
                    if servers.count() > 1 && first {
                        let e = crate::error::chain(&e);
                        tracing::warn!(server = servers.base(i), "chunk server failed: {e}");
                    }
                    last = Some(e);
                }
                answer => {
                    servers.answered(i, order[0]);
                    return answer;
                }
            }
        }
        let e = last.expect("a remote has at least one server");
        Err(ClientError::NoServerAnswered {
            servers: servers.bases().to_vec(),
            source: Box::new(e),
        })
    }

    /// Sends a request built by `build` for a server's base URL, on any
    /// server, retrying transient failures; for answers without a body.
    async fn send(
        &self,
        what: &str,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        self.retrying(what, || {
            self.on_any(|base| async {
                let resp = build(base).send().await.map_err(|e| unreachable(base, e))?;
                check(resp, what).await
            })
        })
        .await
    }

    /// Runs `op` until it succeeds, fails permanently, or the policy runs out.
    pub async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = self.retry.first_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    if attempt >= self.retry.attempts
                        || start.elapsed() + backoff > self.retry.deadline
                    {
                        if attempt == 1 {
                            return Err(e);
                        }
                        return Err(ClientError::GaveUp {
                            what: what.to_owned(),
                            attempts: attempt,
                            source: Box::new(e),
                        });
                    }
                    tracing::debug!(what, attempt, error = %e, "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Resolves a reference to a manifest digest.
    pub async fn resolve(&self, r: &ImageRef) -> Result<Digest> {
        match &r.selector {
            Selector::Digest(d) => Ok(*d),
            Selector::Tag(tag) => {
                let what = format!("tag {}:{}", r.name, tag);
                let path = format!("/v1/tags/{}/{}", r.name, tag);
                let body = self.get_bytes(&what, &path, TAG_MAX).await?;
                let text = String::from_utf8_lossy(&body);
                text.trim().parse().map_err(|_| ClientError::BadResponse {
                    what,
                    message: format!(
                        "not a digest: {:?}",
                        text.chars().take(80).collect::<String>()
                    ),
                })
            }
        }
    }

    /// Fetches a manifest's bytes and checks them against `digest`.
    pub async fn manifest(&self, digest: &Digest) -> Result<FetchedManifest> {
        let path = format!("/v1/manifests/{digest}");
        let what = format!("manifest {digest}");
        let bytes = self.get_bytes(&what, &path, MANIFEST_MAX).await?;
        let manifest = Manifest::decode_verified(&bytes, digest)?;
        Ok(FetchedManifest {
            digest: *digest,
            manifest,
            bytes,
        })
    }

    /// Resolves and fetches the image a reference names.
    pub async fn image(&self, r: &ImageRef) -> Result<FetchedManifest> {
        let digest = self.resolve(r).await?;
        self.manifest(&digest).await
    }

    async fn get_bytes(&self, what: &str, path: &str, max: usize) -> Result<Bytes> {
        self.retrying(what, || self.get_once(what, path, max)).await
    }

    /// One GET on each server until one answers, no retries, its body
    /// capped at `max` bytes.
    async fn get_once(&self, what: &str, path: &str, max: usize) -> Result<Bytes> {
        self.read_once(what, max, |base| self.req(base, reqwest::Method::GET, path))
            .await
    }

    /// One POST of `body` as JSON on each server until one answers, no
    /// retries, the answer capped at `max` bytes.
    async fn post_once(
        &self,
        what: &str,
        path: &str,
        body: &serde_json::Value,
        max: usize,
    ) -> Result<Bytes> {
        self.read_once(what, max, |base| {
            self.req(base, reqwest::Method::POST, path).json(body)
        })
        .await
    }

    /// The request `build` makes for a server's base URL, on each server
    /// until one answers, no retries, its body capped at `max` bytes.
    async fn read_once(
        &self,
        what: &str,
        max: usize,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Bytes> {
        self.on_any(|base| async {
            let resp = build(base).send().await.map_err(|e| unreachable(base, e))?;
            let resp = check(resp, what).await?;
            read_capped(base, resp, max, what).await
        })
        .await
    }

    /// The frame of one chunk (not yet verified), retried under the policy.
    pub async fn chunk(&self, id: &Digest) -> Result<Bytes> {
        self.get_bytes(
            &format!("chunk {id}"),
            &format!("/v1/chunks/{id}"),
            FRAME_MAX,
        )
        .await
    }

    /// The frame of one chunk (not yet verified), one attempt on each server:
    /// for callers that run their own retries and deadline.
    pub async fn chunk_once(&self, id: &Digest) -> Result<Bytes> {
        self.get_once(
            &format!("chunk {id}"),
            &format!("/v1/chunks/{id}"),
            FRAME_MAX,
        )
        .await
    }

    /// The stored frame length of one chunk, by HEAD.
    pub async fn chunk_stored_len(&self, id: &Digest) -> Result<u64> {
        let path = format!("/v1/chunks/{id}");
        let resp = self
            .send(&format!("chunk {id}"), |base| {
                self.req(base, reqwest::Method::HEAD, &path)
            })
            .await?;
        Ok(resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Frames of many chunks in one request, in order; `None` for chunks the
    /// server lacks. `frames_max` bounds the frames' total length (the
    /// caller knows the chunks' sizes); the answer is refused beyond it.
    pub async fn chunks(&self, ids: &[Digest], frames_max: usize) -> Result<Vec<Option<Bytes>>> {
        let what = format!("batch of {} chunks", ids.len());
        self.retrying(&what, || self.chunks_once(ids, frames_max))
            .await
    }

    /// [`Remote::chunks`], one attempt on each server: for callers that run
    /// their own retries and deadline.
    pub async fn chunks_once(
        &self,
        ids: &[Digest],
        frames_max: usize,
    ) -> Result<Vec<Option<Bytes>>> {
        let what = &format!("batch of {} chunks", ids.len());
        let max = frames_max.saturating_add(ids.len() * RECORD_HEADER_LEN);
        let body = serde_json::json!({ "ids": ids });
        let bytes = self.post_once(what, "/v1/chunks/batch", &body, max).await?;
        let records = wire::parse_batch(&bytes, ids).map_err(|e| ClientError::BadResponse {
            what: what.clone(),
            message: e.to_string(),
        })?;
        Ok(records
            .into_iter()
            .map(|r| r.frame.map(|f| bytes.slice_ref(f)))
            .collect())
    }

    /// The stored profile of manifest `digest` (not yet checked), if any.
    pub async fn profile(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let path = format!("/v1/profiles/{digest}");
        let what = format!("profile of manifest {digest}");
        match self.get_bytes(&what, &path, PROFILE_BODY_MAX).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ClientError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads the profile of manifest `digest`, replacing any stored one.
    pub async fn put_profile(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let path = format!("/v1/profiles/{digest}");
        self.send(&format!("upload of the profile of {digest}"), |base| {
            self.req(base, reqwest::Method::PUT, &path)
                .body(bytes.clone())
        })
        .await?;
        Ok(())
    }

    /// The ids among `ids` that the server does not store.
    pub async fn missing(&self, ids: &[Digest]) -> Result<Vec<Digest>> {
        #[derive(serde::Deserialize)]
        struct Missing {
            missing: Vec<Digest>,
        }
        let what = "missing-chunk query";
        let mut out = Vec::new();
        for batch in ids.chunks(MISSING_BATCH) {
            let body = serde_json::json!({ "ids": batch });
            let max = wire::id_list_body_max(batch.len());
            let answer = self
                .retrying(what, || {
                    self.post_once(what, "/v1/chunks/missing", &body, max)
                })
                .await?;
            let m: Missing =
                serde_json::from_slice(&answer).map_err(|e| ClientError::BadResponse {
                    what: what.to_owned(),
                    message: e.to_string(),
                })?;
            out.extend(m.missing);
        }
        Ok(out)
    }

    /// Uploads one frame.
    pub async fn put_chunk(&self, id: &Digest, frame: Bytes) -> Result<()> {
        let path = format!("/v1/chunks/{id}");
        self.send(&format!("upload of chunk {id}"), |base| {
            self.req(base, reqwest::Method::PUT, &path)
                .body(frame.clone())
        })
        .await?;
        Ok(())
    }

    /// Uploads a manifest, one attempt on each server; the server refuses it
    /// while chunks are missing.
    pub async fn put_manifest(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let path = &format!("/v1/manifests/{digest}");
        let what = &format!("upload of manifest {digest}");
        self.on_any(|base| {
            let bytes = bytes.clone();
            async move {
                let resp = self
                    .req(base, reqwest::Method::PUT, path)
                    .body(bytes)
                    .send()
                    .await
                    .map_err(|e| unreachable(base, e))?;
                if resp.status() == reqwest::StatusCode::CONFLICT {
                    #[derive(serde::Deserialize)]
                    struct Conflict {
                        #[serde(default)]
                        missing: Vec<Digest>,
                    }
                    let c: Conflict = resp.json().await.unwrap_or(Conflict {
                        missing: Vec::new(),
                    });
                    return Err(ClientError::MissingChunks { missing: c.missing });
                }
                check(resp, what).await?;
                Ok(())
            }
        })
        .await
    }

    /// Points `name:tag` at a manifest.
    pub async fn put_tag(&self, name: &str, tag: &str, digest: &Digest) -> Result<()> {
        let path = format!("/v1/tags/{name}/{tag}");
        let body = digest.to_string();
        self.send(&format!("tag {name}:{tag}"), |base| {
            self.req(base, reqwest::Method::PUT, &path)
                .body(body.clone())
        })
        .await?;
        Ok(())
    }
}

/// Reads a body of at most `max` bytes from server `base`; a longer one is
/// an error before more than `max` bytes are held.
async fn read_capped(
    base: &str,
    mut resp: reqwest::Response,
    max: usize,
    what: &str,
) -> Result<Bytes> {
    let too_long = |n: u64| ClientError::BadResponse {
        what: what.to_owned(),
        message: format!("a body of {n} bytes or more, above the {max}-byte limit"),
    };
    if let Some(n) = resp.content_length().filter(|&n| n > max as u64) {
        return Err(too_long(n));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| unreachable(base, e))? {
        if body.len() + piece.len() > max {
            return Err(too_long((body.len() + piece.len()) as u64));
        }
        body.extend_from_slice(&piece);
    }
    Ok(body.freeze())
}

/// Turns non-2xx answers into errors carrying the server's message.
async fn check(resp: reqwest::Response, what: &str) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(ClientError::NotFound {
            what: what.to_owned(),
        });
    }
    // Error bodies are short JSON; read at most 64 KiB of them.
    let mut resp = resp;
    let mut raw = Vec::new();
    while let Ok(Some(piece)) = resp.chunk().await {
        raw.extend_from_slice(&piece[..piece.len().min((64 << 10) - raw.len().min(64 << 10))]);
        if raw.len() >= 64 << 10 {
            break;
        }
    }
    let body = String::from_utf8_lossy(&raw);
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    let message = message.to_string();
    Err(ClientError::Status {
        status: status.as_u16(),
        what: what.to_owned(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with `head` and then streams
    /// zeros until the client goes away; returns its address.
    async fn endless(head: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf).await;
                    c.write_all(head.as_bytes()).await?;
                    let zeros = vec![0u8; 1 << 20];
                    loop {
                        c.write_all(&zeros).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        format!("http://{addr}")
    }

    /// A server that answers every request with `answer` and hangs up.
    async fn answering(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    /// An address nothing listens on.
    fn dead_server() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_fail_over_to_a_live_server_and_stay_there() {
        let live = crate::testing::TestServer::start().await;
        let dead = dead_server();
        let busy = answering("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let r = ImageRef::parse(&format!("{dead}/fo:v1")).unwrap();
        let mut remote = Remote::for_ref(&r, None)
            .unwrap()
            .with_servers(&[busy, live.addr.to_string()])
            .unwrap();
        remote.retry.attempts = 1;
        assert_eq!(remote.servers().len(), 3);
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"failed over").unwrap();
        let pushed = crate::push::push(src.path(), &r, &remote, &Default::default())
            .await
            .unwrap();
        assert_eq!(remote.resolve(&r).await.unwrap(), pushed.manifest);
        let live_url = format!("http://{}", live.addr);
        assert_eq!(remote.base(), live_url);
        assert_eq!(remote.failovers(), 1, "moved once, then stayed");
        // Clones share what was learnt.
        assert_eq!(remote.clone().base(), live_url);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_hangs_is_left_after_the_request_timeout() {
        let live = crate::testing::TestServer::start().await;
        let (r, direct) = live.image("slow:v1");
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"behind a hung server").unwrap();
        let pushed = crate::push::push(src.path(), &r, &direct, &Default::default())
            .await
            .unwrap();
        // Takes connections and never answers.
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut remote = Remote::new(&format!("http://{}", hung.local_addr().unwrap()), None)
            .unwrap()
            .with_servers(&[live.addr.to_string()])
            .unwrap();
        remote.retry.attempts = 1;
        remote.request_timeout = Duration::from_millis(300);
        let started = Instant::now();
        assert_eq!(remote.resolve(&r).await.unwrap(), pushed.manifest);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(remote.failovers(), 1);
        drop(hung);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_not_found_is_an_answer_and_does_not_fail_over() {
        let first = crate::testing::TestServer::start().await;
        let second = crate::testing::TestServer::start().await;
        let (r, only_second) = second.image("nf:v1");
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"only on the second store").unwrap();
        crate::push::push(src.path(), &r, &only_second, &Default::default())
            .await
            .unwrap();
        let remote = Remote::new(&format!("http://{}", first.addr), None)
            .unwrap()
            .with_servers(&[second.addr.to_string()])
            .unwrap();
        let e = remote.resolve(&r).await.unwrap_err();
        assert!(matches!(e, ClientError::NotFound { .. }), "{e:?}");
        assert_eq!(remote.failovers(), 0);
    }

    #[tokio::test]
    async fn when_every_server_fails_the_error_names_them_all() {
        let (a, b) = (dead_server(), dead_server());
        let mut remote = Remote::new(&format!("http://{a}"), None)
            .unwrap()
            .with_servers(&[b.as_str()])
            .unwrap();
        remote.retry.attempts = 1;
        let e = remote.chunk(&Digest::of(b"x")).await.unwrap_err();
        assert!(matches!(e, ClientError::NoServerAnswered { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.contains(&a) && message.contains(&b), "{message}");
    }

    #[tokio::test]
    async fn an_endless_body_is_refused_at_its_cap() {
        let id = Digest::of(b"x");
        for head in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n",
        ] {
            let remote = Remote::new(&endless(head).await, None).unwrap();
            let started = Instant::now();
            let e = remote.chunk_once(&id).await.unwrap_err();
            assert!(matches!(e, ClientError::BadResponse { .. }), "{e:?}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "stopped reading early"
            );
        }
    }

    /// A server with a certificate from a private CA: a client that trusts
    /// the CA pushes and resolves over https; one that does not is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_with_a_private_ca() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls =
            thaw_server::tls_config(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        let server = crate::testing::TestServer::start_with(thaw_server::ServerConfig {
            tls: Some(tls),
            ..Default::default()
        })
        .await;
        let base = format!("https://localhost:{}", server.addr.port());
        let r = ImageRef::parse(&format!("{base}/tls:v1")).unwrap();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"over TLS").unwrap();

        let trusting = Remote::new(&base, None)
            .unwrap()
            .with_ca_pem(cert.pem().as_bytes())
            .unwrap();
        let pushed = crate::push::push(src.path(), &r, &trusting, &Default::default())
            .await
            .unwrap();
        assert_eq!(trusting.resolve(&r).await.unwrap(), pushed.manifest);

        let mut stranger = Remote::new(&base, None).unwrap();
        stranger.retry.attempts = 1;
        let e = stranger.resolve(&r).await.unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        let mut plain =
            Remote::new(&format!("http://localhost:{}", server.addr.port()), None).unwrap();
        plain.retry.attempts = 1;
        assert!(
            plain.resolve(&r).await.is_err(),
            "plain HTTP to a TLS port fails"
        );
    }
}
