//! What the server's integration tests share: a server on port 0 driven
//! over real TCP, error checks, and manifests to upload.
#![allow(dead_code)]

use object_store::ObjectStore;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::Arc;
use thaw_format::{frame, ChunkRef, Digest, Extent, Manifest, Node, NodeKind};
use thaw_server::{open_store, serve, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Server {
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub http: reqwest::Client,
    token: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `store` on a port of its own, as `thaw serve` does.
    pub async fn start(store: Arc<dyn ObjectStore>, config: ServerConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            serve(listener, store, config, shutdown).await.unwrap();
        });
        Server {
            base: format!("http://{addr}"),
            addr,
            http: reqwest::Client::new(),
            token: None,
            stop: Some(stop),
            task,
        }
    }

    pub async fn memory() -> Server {
        Server::start(open_store("memory://").unwrap(), ServerConfig::default()).await
    }

    /// Requests from now on send `token` (or none).
    pub fn with_token(&mut self, token: Option<&str>) -> &mut Self {
        self.token = token.map(str::to_owned);
        self
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.request(method, path).body(body).send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(Method::GET, path).send().await.unwrap()
    }

    pub async fn put_chunk(&self, data: &[u8]) -> (Digest, StatusCode) {
        let id = Digest::of(data);
        let status = self
            .send(
                Method::PUT,
                &format!("/v1/chunks/{id}"),
                frame::encode(data, 3),
            )
            .await
            .status();
        (id, status)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0, |v| v.parse().unwrap())
    }

    /// Asks the server to shut down, without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        self.task.await.unwrap();
    }

    /// Waits at most `limit` for the server to finish; false if it did not.
    pub async fn stopped_within(&mut self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, &mut self.task).await.is_ok()
    }
}

/// Asserts the status and the JSON error code of a refused request.
pub async fn assert_error(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty());
    body
}

/// A manifest of one file made of the chunk `data`.
pub fn manifest_of(data: &[u8]) -> (Vec<u8>, Digest) {
    manifest_naming(&[ChunkRef {
        id: Digest::of(data),
        len: data.len() as u32,
    }])
}

/// A manifest of one file made of `chunks`, each whole and at the length
/// given (which may be wrong: the server is the one to check it).
pub fn manifest_naming(chunks: &[ChunkRef]) -> (Vec<u8>, Digest) {
    let node = |name: &[u8], kind, mode, size| Node {
        parent: 0,
        name: name.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        size,
        xattrs: 0..0,
    };
    let extents: Vec<Extent> = (0..chunks.len() as u32)
        .map(|i| Extent {
            chunk: Some(i),
            offset: 0,
            len: u64::from(chunks[i as usize].len),
        })
        .collect();
    let size = extents.iter().map(|e| e.len).sum();
    let manifest = Manifest {
        chunk_size: 1 << 20,
        chunks: chunks.to_vec(),
        nodes: vec![
            node(b"", NodeKind::Dir { children: 1..2 }, 0o40755, 0),
            node(
                b"f",
                NodeKind::File {
                    extents: 0..extents.len() as u32,
                },
                0o100644,
                size,
            ),
        ],
        extents,
        xattrs: vec![],
    };
    let bytes = manifest.encode();
    let digest = Digest::of(&bytes);
    (bytes, digest)
}
