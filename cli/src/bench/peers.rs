//! Peers measured on the same data, command and link: `casync mount` over an
//! HTTP chunk store, and Nydus (`nydusd` over an HTTP backend). A peer that is
//! not installed is reported as skipped, with how to install it.

use super::{ModeResult, Sample, Target};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn installed(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn skipped(mode: &str, why: &str) -> ModeResult {
    eprintln!("thaw bench: SKIPPED {mode}: {why}");
    ModeResult {
        mode: mode.into(),
        skipped: Some(why.into()),
        samples: vec![],
        median_seconds: 0.0,
        median_bytes_fetched: 0,
        vs_full_pull: 0.0,
        vs_local: 0.0,
    }
}

/// A static HTTP server (Python's) over `dir`, reached through the target's link.
struct StaticHttp {
    child: Child,
    addr: std::net::SocketAddr,
}

impl StaticHttp {
    fn start(
        dir: &Path,
        rt: &tokio::runtime::Runtime,
        link: Option<super::proxy::Link>,
    ) -> Result<StaticHttp> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 -m http.server")?;
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(upstream).is_err() {
            if Instant::now() > deadline {
                bail!("static HTTP server did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = match link {
            Some(l) => rt.block_on(super::proxy::start(upstream, l))?,
            None => upstream,
        };
        Ok(StaticHttp { child, addr })
    }
}

impl Drop for StaticHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_mounted(mp: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(&mp.display().to_string()))
        {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("mount process exited with {st}");
        }
        if Instant::now() > deadline {
            bail!("mount did not appear");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// casync: `casync make` into a chunk store served over HTTP with its index,
/// then `casync mount` of the index URL.
pub fn casync(
    t: &Target,
    rt: &tokio::runtime::Runtime,
    work: &Path,
    runs: usize,
) -> Result<ModeResult> {
    if !installed("casync") {
        return Ok(skipped(
            "casync",
            "casync not installed (apt-get install casync)",
        ));
    }
    let dir = work.join("casync");
    let (store, index, mp) = (dir.join("store"), dir.join("image.caidx"), dir.join("mnt"));
    std::fs::create_dir_all(&store)?;
    std::fs::create_dir_all(&mp)?;
    eprintln!("thaw bench: casync make");
    let out = Command::new("casync")
        .arg("make")
        .arg(format!("--store={}", store.display()))
        .arg(&index)
        .arg(&t.local)
        .output()?;
    if !out.status.success() {
        return Ok(skipped(
            "casync",
            &format!(
                "casync make failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // The index travels over the link too, as it would from a real server.
    let http = StaticHttp::start(&dir, rt, t.link)?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        super::ceilings::drop_caches();
        let s = Instant::now();
        let mut child = Command::new("casync")
            .arg("mount")
            .arg(format!("--store=http://{}/store/", http.addr))
            .arg(format!("http://{}/image.caidx", http.addr))
            .arg(&mp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let result = wait_mounted(&mp, &mut child).and_then(|()| t.startup.run(&mp));
        let seconds = s.elapsed().as_secs_f64();
        super::umount(&mp);
        let _ = child.kill();
        let _ = child.wait();
        result?;
        samples.push(Sample {
            seconds,
            bytes_fetched: 0,
        });
    }
    Ok(super::summarize("casync", samples))
}

/// A minimal HTTP/1.1 server of a registry's blob route with Range support
/// (what nydusd's registry backend asks for), over `dir`.
async fn serve_blobs(listener: tokio::net::TcpListener, dir: std::path::PathBuf) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
    while let Ok((conn, _)) = listener.accept().await {
        let dir = dir.clone();
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            let mut conn = BufReader::new(conn);
            loop {
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line);
                }
                let mut parts = head
                    .first()
                    .map(|l| l.split_whitespace())
                    .into_iter()
                    .flatten();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let range = head.iter().find_map(|h| {
                    let (k, v) = h.split_once(':')?;
                    if !k.eq_ignore_ascii_case("range") {
                        return None;
                    }
                    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
                    Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()))
                });
                let name = path.rsplit("sha256:").next().unwrap_or("");
                let file = if name.bytes().all(|c| c.is_ascii_hexdigit()) && !name.is_empty() {
                    tokio::fs::File::open(dir.join(name)).await.ok()
                } else {
                    None
                };
                let out = conn.get_mut();
                let Some(mut file) = file else {
                    let _ = out
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    continue;
                };
                let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                let (start, end) = match range {
                    Some((a, b)) => (a.min(size), b.map_or(size, |b| (b + 1).min(size))),
                    None => (0, size),
                };
                let status = if range.is_some() {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{size}\r\ncontent-type: application/octet-stream\r\n\r\n",
                    end - start,
                    end.saturating_sub(1)
                );
                if out.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                if method == "HEAD" {
                    continue;
                }
                let mut body = vec![0u8; (end - start) as usize];
                if file.seek(std::io::SeekFrom::Start(start)).await.is_err()
                    || file.read_exact(&mut body).await.is_err()
                {
                    return;
                }
                if out.write_all(&body).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A plain HTTP/1.1 GET of `path` (the body), for fetching the bootstrap.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    c.shutdown().await?;
    let mut all = Vec::new();
    c.read_to_end(&mut all).await?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("bad HTTP response")?;
    if !all.starts_with(b"HTTP/1.1 200") {
        bail!("GET {path}: {}", String::from_utf8_lossy(&all[..split]));
    }
    Ok(all[split + 4..].to_vec())
}

/// Nydus: `nydus-image create` into a blob directory served as a registry's
/// blobs over HTTP (through the same link), then, each run, the bootstrap
/// (metadata) downloaded over the link, as thaw downloads its manifest, and
/// `nydusd` over FUSE with an empty blob cache.
pub fn nydus(
    t: &Target,
    rt: &tokio::runtime::Runtime,
    work: &Path,
    runs: usize,
) -> Result<ModeResult> {
    if !installed("nydusd") || !installed("nydus-image") {
        return Ok(skipped(
            "nydus",
            "nydusd not installed (apt-get install cmake; cargo install nydus-rs --locked)",
        ));
    }
    let dir = work.join("nydus");
    let (blobs, boot, mp, cache) = (
        dir.join("blobs"),
        dir.join("bootstrap"),
        dir.join("mnt"),
        dir.join("cache"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&blobs)?;
    std::fs::create_dir_all(&mp)?;
    eprintln!("thaw bench: nydus-image create");
    let out = Command::new("nydus-image")
        .arg("create")
        .arg("--blob-dir")
        .arg(&blobs)
        .arg("--bootstrap")
        .arg(&boot)
        .args([
            "--compressor",
            "zstd",
            "--chunk-size",
            "0x100000",
            "--log-level",
            "warn",
        ])
        .arg(&t.local)
        .output()?;
    if !out.status.success() {
        return Ok(skipped(
            "nydus",
            &format!(
                "nydus-image create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // The bootstrap is served next to the blobs, under a name no blob has.
    const BOOTSTRAP: &str = "b0075724b0075724b0075724b0075724b0075724b0075724b0075724b0075724";
    std::fs::copy(&boot, blobs.join(BOOTSTRAP))?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let upstream = listener.local_addr()?;
    rt.spawn(serve_blobs(listener, blobs.clone()));
    let addr = match t.link {
        Some(l) => rt.block_on(super::proxy::start(upstream, l))?,
        None => upstream,
    };
    let config = serde_json::json!({
        "device": {
            "backend": {"type": "registry", "config": {
                "scheme": "http", "host": addr.to_string(), "repo": "bench/image",
                "timeout": 30, "connect_timeout": 5, "retry_limit": 2
            }},
            "cache": {"type": "blobcache", "config": {"work_dir": cache.display().to_string()}}
        },
        "mode": "direct", "digest_validate": false, "iostats_files": false, "enable_xattr": true,
        "fs_prefetch": {"enable": false}
    });
    let cfg_path = dir.join("nydusd.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&config)?)?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache)?;
        let _ = std::fs::remove_file(&boot);
        super::ceilings::drop_caches();
        let s = Instant::now();
        let bytes = rt.block_on(http_get(
            addr,
            &format!("/v2/bench/image/blobs/sha256:{BOOTSTRAP}"),
        ))?;
        std::fs::write(&boot, bytes)?;
        let mut child = Command::new("nydusd")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--mountpoint")
            .arg(&mp)
            .arg("--bootstrap")
            .arg(&boot)
            .args(["--log-level", "warn", "--rlimit-nofile", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nydusd.log"))?)
            .spawn()
            .context("nydusd")?;
        let result = wait_mounted(&mp, &mut child).and_then(|()| t.startup.run(&mp));
        let seconds = s.elapsed().as_secs_f64();
        super::umount(&mp);
        let _ = child.kill();
        let _ = child.wait();
        if let Err(e) = result {
            let log = std::fs::read_to_string(dir.join("nydusd.log")).unwrap_or_default();
            bail!(
                "nydus run failed: {e:#}\n{}",
                log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
            );
        }
        samples.push(Sample {
            seconds,
            bytes_fetched: 0,
        });
    }
    Ok(super::summarize("nydus", samples))
}
