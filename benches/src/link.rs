//! A shaped link: a TCP proxy that adds latency and limits bandwidth.
//!
//! `netem` is not always available, and `tc tbf` alone cannot add delay, so
//! the link is emulated in user space. Each direction is one shared link: a
//! packet leaves when the link has serialized the packets before it (bandwidth,
//! shared by all connections, as on a real NIC) and arrives `latency` later
//! (propagation), so a sender that keeps data in flight still gets the full
//! bandwidth, as over a real long link.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Bandwidth in bytes per second (0 = unlimited) and one-way latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub bytes_per_sec: f64,
    pub latency: Duration,
}

impl Link {
    /// Parses `1gbit,2ms`, `100mbit`, `500mbit,10ms`, `2ms`.
    pub fn parse(s: &str) -> Result<Link, String> {
        let mut link = Link {
            bytes_per_sec: 0.0,
            latency: Duration::ZERO,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = part.to_ascii_lowercase();
            let num = |suffix: &str| {
                lower
                    .strip_suffix(suffix)
                    .and_then(|n| n.trim().parse::<f64>().ok())
            };
            if let Some(ms) = num("ms") {
                link.latency = Duration::from_secs_f64(ms / 1000.0);
            } else if let Some(us) = num("us") {
                link.latency = Duration::from_secs_f64(us / 1e6);
            } else if let Some(g) = num("gbit") {
                link.bytes_per_sec = g * 1e9 / 8.0;
            } else if let Some(m) = num("mbit") {
                link.bytes_per_sec = m * 1e6 / 8.0;
            } else {
                return Err(format!("bad link {s:?}: use e.g. 1gbit,2ms or 100mbit"));
            }
        }
        Ok(link)
    }
}

/// How a run's link reads in reports: the link, or "loopback" when unshaped.
pub fn describe(link: Option<Link>) -> String {
    link.map_or_else(|| "loopback".into(), |l| l.to_string())
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.bytes_per_sec > 0.0 {
            write!(f, "{:.0} Mbit/s", self.bytes_per_sec * 8.0 / 1e6)?;
        } else {
            write!(f, "unlimited")?;
        }
        write!(f, ", {:.1} ms one way", self.latency.as_secs_f64() * 1000.0)
    }
}

/// When each direction's link is next free.
struct Wire {
    link: Link,
    free_at: Mutex<Instant>,
}

impl Wire {
    /// When `n` bytes handed over now arrive at the other end.
    fn arrival(&self, n: usize) -> Instant {
        let now = Instant::now();
        let mut free = self.free_at.lock().expect("wire lock");
        let start = (*free).max(now);
        let serialize = if self.link.bytes_per_sec > 0.0 {
            Duration::from_secs_f64(n as f64 / self.link.bytes_per_sec)
        } else {
            Duration::ZERO
        };
        *free = start + serialize;
        *free + self.link.latency
    }
}

/// The address that reaches `upstream` through `link`: a new proxy, or
/// `upstream` itself when the link is not shaped.
pub async fn through(link: Option<Link>, upstream: SocketAddr) -> std::io::Result<SocketAddr> {
    match link {
        Some(link) => proxy(upstream, link).await,
        None => Ok(upstream),
    }
}

/// Starts a proxy to `upstream` on a free loopback port; returns its address.
pub async fn proxy(upstream: SocketAddr, link: Link) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let up = Arc::new(Wire {
        link,
        free_at: Mutex::new(Instant::now()),
    });
    let down = Arc::new(Wire {
        link,
        free_at: Mutex::new(Instant::now()),
    });
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pump(cr, sw, up), pump(sr, cw, down));
            });
        }
    });
    Ok(addr)
}

/// Moves bytes from `r` to `w` through `wire`: a reader task stamps each
/// packet with its arrival time; a writer task delivers it then.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    wire: Arc<Wire>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Packets of at most 16 KiB, so a large read does not hold the wire as one burst.
                for piece in buf[..n].chunks(16 << 10) {
                    let at = wire.arrival(piece.len());
                    if tx.send((at, piece.to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links() {
        let l = Link::parse("1gbit,2ms").unwrap();
        assert_eq!(l.bytes_per_sec, 125e6);
        assert_eq!(l.latency, Duration::from_millis(2));
        assert_eq!(Link::parse("100mbit").unwrap().bytes_per_sec, 12.5e6);
        assert!(Link::parse("fast").is_err());
    }

    #[tokio::test]
    async fn shapes_bandwidth_and_latency() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let data = vec![7u8; 2_500_000];
            s.write_all(&data).await.unwrap();
        });
        let link = Link {
            bytes_per_sec: 25e6,
            latency: Duration::from_millis(20),
        };
        let addr = proxy(echo_addr, link).await.unwrap();
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let took = t.elapsed();
        assert_eq!(got.len(), 2_500_000);
        // 2.5 MB at 25 MB/s is 100 ms, plus 20 ms latency.
        assert!(took >= Duration::from_millis(110), "{took:?}");
    }
}
