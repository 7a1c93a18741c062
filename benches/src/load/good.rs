//! The well-behaved side of the load: clients that each keep one HTTP/1.1
//! connection alive and send their next request as soon as the last one is
//! answered (a closed loop), and a prober that asks `/v1/health` on a fresh
//! connection, as a load balancer does.
//!
//! Clients use hyper's connection-level client (one connection, no pool) and
//! check each answer's status and length, not its hash, so that the machine's
//! two cores go to the server rather than to the load.

use super::Target;
use axum::body::Body;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thaw_testkit::data::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longer than any answer should take; a request past it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the prober waits for a health answer before it counts a failure.
pub(super) const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a good client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `GET /v1/chunks/{id}`: 75% of requests, 80% of them from the hot set.
    Chunk,
    /// `POST /v1/chunks/batch` of 4-16 ids: 15%.
    Batch,
    /// `GET /v1/tags/{name}/{tag}`: 10%.
    Tag,
}

impl Kind {
    pub(super) const ALL: [Kind; 3] = [Kind::Chunk, Kind::Batch, Kind::Tag];

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Chunk => "chunk GET",
            Kind::Batch => "batch POST",
            Kind::Tag => "tag GET",
        }
    }
}

/// What a set of clients saw.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Latencies of answered requests, in microseconds, by [`Kind::ALL`] index.
    pub(super) latencies_us: [Vec<u32>; 3],
    pub(super) errors: u64,
    /// Error messages and how often each came (the first few kinds).
    pub(super) error_samples: BTreeMap<String, u64>,
    pub(super) bytes: u64,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < 8 || self.error_samples.contains_key(&what) {
            *self.error_samples.entry(what).or_default() += 1;
        }
    }

    pub(super) fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.latencies_us.iter_mut().zip(other.latencies_us) {
            mine.extend(theirs);
        }
        self.errors += other.errors;
        for (what, n) in other.error_samples {
            if self.error_samples.len() < 8 || self.error_samples.contains_key(&what) {
                *self.error_samples.entry(what).or_default() += n;
            }
        }
        self.bytes += other.bytes;
    }
}

/// A request and the body length its answer must have.
struct Planned {
    kind: Kind,
    request: Request<Body>,
    expected_len: u64,
}

impl Target {
    fn chunk<'a>(&'a self, rng: &mut Rng) -> &'a super::Chunk {
        match rng.chance(80) {
            true => &self.chunks[rng.below(self.hot)],
            false => &self.chunks[rng.below(self.chunks.len())],
        }
    }

    fn plan(&self, rng: &mut Rng) -> Planned {
        let get = |path: &str| {
            Request::get(path)
                .header("host", "thaw")
                .body(Body::empty())
                .expect("a valid request")
        };
        match rng.below(100) {
            0..75 => {
                let chunk = self.chunk(rng);
                Planned {
                    kind: Kind::Chunk,
                    request: get(&chunk.path),
                    expected_len: chunk.frame_len,
                }
            }
            75..90 => {
                let chunks: Vec<_> = (0..4 + rng.below(13)).map(|_| self.chunk(rng)).collect();
                let ids: Vec<String> = chunks.iter().map(|c| format!("\"{}\"", c.id)).collect();
                let body = format!("{{\"ids\":[{}]}}", ids.join(","));
                let request = Request::post("/v1/chunks/batch")
                    .header("host", "thaw")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .expect("a valid request");
                let records = chunks
                    .iter()
                    .map(|c| thaw_format::wire::RECORD_HEADER_LEN as u64 + c.frame_len);
                Planned {
                    kind: Kind::Batch,
                    request,
                    expected_len: records.sum(),
                }
            }
            _ => Planned {
                kind: Kind::Tag,
                request: get(&self.tag_path),
                expected_len: self.tag_len,
            },
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Body>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one request and reads its whole answer; returns the body length.
async fn exchange(sender: &mut SendRequest<Body>, planned: Planned) -> Result<u64, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let response = sender
        .send_request(planned.request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut len = 0u64;
    while let Some(frame) =
        std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx))
            .await
    {
        let frame = frame.map_err(|e| format!("body cut off: {e}"))?;
        len += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    if status != StatusCode::OK {
        return Err(format!("{} answered {status}", planned.kind.name()));
    }
    if len != planned.expected_len {
        return Err(format!(
            "{} answered {len} bytes, not {}",
            planned.kind.name(),
            planned.expected_len
        ));
    }
    Ok(len)
}

/// One client: requests back to back on one keep-alive connection until
/// `end`, reconnecting after an error.
pub(super) async fn client(target: Arc<Target>, seed: u64, end: Instant) -> Tally {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let mut connection = None;
    while Instant::now() < end {
        let sender = match &mut connection {
            Some(sender) => sender,
            None => match connect(target.addr).await {
                Ok(sender) => connection.insert(sender),
                Err(e) => {
                    tally.error(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let planned = target.plan(&mut rng);
        let kind = planned.kind;
        let start = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(sender, planned)).await {
            Ok(Ok(bytes)) => {
                let us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
                tally.latencies_us[kind as usize].push(us);
                tally.bytes += bytes;
            }
            Ok(Err(e)) => {
                tally.error(e);
                connection = None;
            }
            Err(_) => {
                tally.error(format!("{} took over {REQUEST_TIMEOUT:?}", kind.name()));
                connection = None;
            }
        }
    }
    tally
}

/// What the health prober saw.
#[derive(Debug, Default)]
pub(super) struct Health {
    pub(super) latencies_us: Vec<u32>,
    pub(super) failures: Vec<String>,
}

/// Asks `/v1/health` on a fresh connection every `every` until `end`.
pub(super) async fn health_prober(addr: SocketAddr, every: Duration, end: Instant) -> Health {
    let mut health = Health::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let start = Instant::now();
        match tokio::time::timeout(HEALTH_TIMEOUT, probe(addr)).await {
            Ok(Ok(())) => health
                .latencies_us
                .push(start.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Ok(Err(e)) => health.failures.push(e),
            Err(_) => health
                .failures
                .push(format!("no answer in {HEALTH_TIMEOUT:?}")),
        }
    }
    health
}

async fn probe(addr: SocketAddr) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(b"GET /v1/health HTTP/1.1\r\nhost: thaw\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    match answer.starts_with(b"HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!(
            "answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        )),
    }
}
