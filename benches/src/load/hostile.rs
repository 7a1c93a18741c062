//! The hostile side of the load: clients that hold what a server gives
//! them for as long as it lets them, each reconnecting as soon as it is cut
//! off, so that the pressure lasts the whole run.

use super::Target;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use thaw_format::Digest;
use thaw_testkit::data::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pause between the bytes of a trickle.
const TRICKLE: Duration = Duration::from_millis(250);
/// Pause between the attempts of a client whose requests end quickly.
const PAUSE: Duration = Duration::from_millis(200);
/// What a trickled or stopped upload declares: a large chunk frame.
const UPLOAD_LEN: usize = 1 << 20;
/// Ids a never-reading batch client asks for.
const BATCH_IDS: usize = 64;

/// A kind of hostile client.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Hostile {
    /// A request head one byte at a time, never finished.
    SlowHeaders,
    /// A chunk upload of 1 MiB, its body one byte at a time.
    SlowUpload,
    /// Connects and sends nothing.
    HalfOpen,
    /// Declares a body over the limit (a 1 TiB chunk, a 200 MiB manifest)
    /// and sends junk.
    OversizedLength,
    /// A 1 MiB chunk upload that stops one byte short.
    ShortBody,
    /// Asks for 64 chunks, mostly not in the hot cache, and never reads.
    BatchNeverRead,
}

impl Hostile {
    pub const ALL: [Hostile; 6] = [
        Hostile::SlowHeaders,
        Hostile::SlowUpload,
        Hostile::HalfOpen,
        Hostile::OversizedLength,
        Hostile::ShortBody,
        Hostile::BatchNeverRead,
    ];

    /// A short name, for tables.
    pub fn name(self) -> &'static str {
        match self {
            Hostile::SlowHeaders => "slowloris",
            Hostile::SlowUpload => "slow PUT",
            Hostile::HalfOpen => "half-open",
            Hostile::OversizedLength => "oversized",
            Hostile::ShortBody => "short body",
            Hostile::BatchNeverRead => "no-read batch",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Hostile::SlowHeaders => "slowloris: a request head, one byte every 250 ms",
            Hostile::SlowUpload => "1 MiB chunk PUT, body one byte every 250 ms",
            Hostile::HalfOpen => "connects, sends nothing",
            Hostile::OversizedLength => "Content-Length of 1 TiB (chunk) or 200 MiB (manifest)",
            Hostile::ShortBody => "1 MiB chunk PUT that stops one byte short",
            Hostile::BatchNeverRead => "batch of 64 cold chunks, never reads the answer",
        }
    }
}

/// What the clients of one kind did and were told.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HostileTally {
    pub clients: usize,
    /// Connections opened over the run.
    pub connections: u64,
    /// Statuses the server answered with, and how often.
    pub answers: BTreeMap<u16, u64>,
    /// Connections the server closed before answering.
    pub cut_off: u64,
}

impl HostileTally {
    pub(super) fn merge(&mut self, other: HostileTally) {
        self.clients += other.clients;
        self.connections += other.connections;
        for (status, n) in other.answers {
            *self.answers.entry(status).or_default() += n;
        }
        self.cut_off += other.cut_off;
    }
}

/// How one attempt ended.
enum Ended {
    Answered(u16),
    CutOff,
    /// The run ended first.
    Held,
}

/// One hostile client of `kind` until `end`.
pub(super) async fn client(
    kind: Hostile,
    target: Arc<Target>,
    seed: u64,
    end: Instant,
) -> HostileTally {
    let mut rng = Rng::new(seed);
    let mut tally = HostileTally {
        clients: 1,
        ..Default::default()
    };
    while Instant::now() < end {
        let Ok(tcp) = TcpStream::connect(target.addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tally.connections += 1;
        let attempt = attempt(kind, tcp, &target, &mut rng, end);
        match tokio::time::timeout_at(end, attempt)
            .await
            .unwrap_or(Ended::Held)
        {
            Ended::Answered(status) => {
                *tally.answers.entry(status).or_default() += 1;
                tokio::time::sleep(PAUSE).await;
            }
            Ended::CutOff => tally.cut_off += 1,
            Ended::Held => {}
        }
    }
    tally
}

fn put_head(path: &str, len: u64) -> String {
    format!("PUT {path} HTTP/1.1\r\nhost: thaw\r\ncontent-length: {len}\r\n\r\n")
}

/// A chunk path that names nothing stored.
fn fresh_chunk_path(rng: &mut Rng) -> String {
    format!("/v1/chunks/{}", Digest::of(&rng.next_u64().to_le_bytes()))
}

async fn attempt(
    kind: Hostile,
    mut tcp: TcpStream,
    target: &Target,
    rng: &mut Rng,
    end: Instant,
) -> Ended {
    match kind {
        Hostile::SlowHeaders => {
            let head = b"GET /v1/health HTTP/1.1\r\nhost: slowly\r\n";
            let pad = b"x-slow: 1\r\n";
            for byte in head.iter().chain(pad.iter().cycle()) {
                if tcp.write_all(&[*byte]).await.is_err() {
                    return Ended::CutOff;
                }
                tokio::time::sleep(TRICKLE).await;
            }
            unreachable!("the head never ends")
        }
        Hostile::SlowUpload => {
            let head = put_head(&fresh_chunk_path(rng), UPLOAD_LEN as u64);
            if tcp.write_all(head.as_bytes()).await.is_err() {
                return Ended::CutOff;
            }
            loop {
                if tcp.write_all(b"x").await.is_err() {
                    return Ended::CutOff;
                }
                tokio::time::sleep(TRICKLE).await;
            }
        }
        Hostile::HalfOpen => {
            let _ = tcp.read(&mut [0u8; 1]).await;
            Ended::CutOff
        }
        Hostile::OversizedLength => {
            let head = match rng.chance(50) {
                true => put_head(&fresh_chunk_path(rng), 1 << 40),
                false => put_head(&format!("/v1/manifests/{}", Digest::of(b"m")), 200 << 20),
            };
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(&[b'x'; 64 << 10]).await;
            status(&mut tcp).await
        }
        Hostile::ShortBody => {
            let head = put_head(&fresh_chunk_path(rng), UPLOAD_LEN as u64);
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(&vec![b'x'; UPLOAD_LEN - 1]).await;
            status(&mut tcp).await
        }
        Hostile::BatchNeverRead => {
            let ids: Vec<String> = (0..BATCH_IDS)
                .map(|_| {
                    let cold = target.hot + rng.below(target.chunks.len() - target.hot);
                    format!("\"{}\"", target.chunks[cold].id)
                })
                .collect();
            let body = format!("{{\"ids\":[{}]}}", ids.join(","));
            let head = format!(
                "POST /v1/chunks/batch HTTP/1.1\r\nhost: thaw\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            if tcp
                .write_all(format!("{head}{body}").as_bytes())
                .await
                .is_err()
            {
                return Ended::CutOff;
            }
            tokio::time::sleep_until(end).await;
            Ended::Held
        }
    }
}

/// The status of the answer on `tcp`, or `CutOff` if it closes first.
async fn status(tcp: &mut TcpStream) -> Ended {
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return Ended::CutOff,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    match line.split(' ').nth(1).and_then(|s| s.parse().ok()) {
        Some(status) => Ended::Answered(status),
        None => Ended::CutOff,
    }
}
