//! The HTTP server peers fetch from: a directory served by tower-http's
//! `ServeDir` (Range, HEAD and conditional requests, as real servers answer
//! them) on axum, reached through the run's link like thaw's own server.

use crate::link::{self, Link};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use tokio::runtime::Runtime;
use tower_http::services::ServeDir;

/// A static file server over a directory; stops on drop.
pub struct StaticServer {
    /// Where clients connect: the link's end when the run is shaped.
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl StaticServer {
    pub fn start(rt: &Runtime, dir: &Path, link: Option<Link>) -> Result<StaticServer> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let upstream = listener.local_addr()?;
        let app = axum::Router::new().fallback_service(ServeDir::new(dir));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            let served = axum::serve(listener, app).with_graceful_shutdown(shutdown);
            if let Err(e) = served.await {
                eprintln!("thaw bench: peer HTTP server failed: {e}");
            }
        });
        let addr = rt.block_on(link::through(link, upstream))?;
        Ok(StaticServer { addr, _stop: stop })
    }

    /// GETs `path` (with its leading `/`) and returns the body.
    pub fn get(&self, rt: &Runtime, path: &str) -> Result<Vec<u8>> {
        let url = format!("http://{}{path}", self.addr);
        rt.block_on(async {
            let resp = reqwest::get(&url).await?.error_for_status()?;
            Ok::<_, reqwest::Error>(resp.bytes().await?.to_vec())
        })
        .with_context(|| format!("GET {url}"))
    }
}
