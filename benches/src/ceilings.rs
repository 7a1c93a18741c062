//! The machine's ceilings, measured in the same run as the figures they bound:
//! loopback TCP bandwidth, LZ4 and zstd decompression, BLAKE3, and sequential reads
//! through a local FUSE filesystem (squashfuse over a squashfs of the same data).

use crate::link::{self, Link};
use crate::{sys, thaw};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Measured ceilings, in bytes per second.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Ceilings {
    pub loopback_bytes_per_sec: f64,
    pub link_bytes_per_sec: Option<f64>,
    pub zstd_decompress_bytes_per_sec: f64,
    /// LZ4 as chunk frames have it (high compression, level 4; 256 KiB blocks).
    pub lz4_decompress_bytes_per_sec: f64,
    pub blake3_bytes_per_sec: f64,
}

/// One TCP stream of `bytes` into a sink on loopback, optionally through a
/// shaped link, timed until the sink has everything.
pub async fn tcp_bandwidth(link: Option<Link>, bytes: usize) -> Result<f64> {
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        s.write_all(b"k").await?;
        Ok::<_, std::io::Error>(total)
    });
    let target = link::through(link, sink_addr).await?;
    let t = Instant::now();
    let mut c = tokio::net::TcpStream::connect(target).await?;
    let buf = vec![0x5au8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&buf).await?;
        sent += buf.len();
    }
    c.shutdown().await?;
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).await?;
    let secs = t.elapsed().as_secs_f64();
    let got = reader.await??;
    if got != sent {
        bail!("bandwidth probe lost bytes");
    }
    Ok(sent as f64 / secs)
}

/// Measures every ceiling. `sample` is representative data for zstd and BLAKE3.
pub async fn measure(sample: &[u8], link: Option<Link>) -> Result<Ceilings> {
    let loopback = tcp_bandwidth(None, 1 << 30).await?;
    let link_bw = match link {
        Some(l) => {
            let probe = if l.bytes_per_sec > 0.0 {
                (l.bytes_per_sec as usize).clamp(16 << 20, 256 << 20)
            } else {
                1 << 30
            };
            Some(tcp_bandwidth(Some(l), probe).await?)
        }
        None => None,
    };
    let frames: Vec<Vec<u8>> = sample
        .chunks(1 << 20)
        .map(|c| zstd::bulk::compress(c, 3).expect("zstd"))
        .collect();
    let t = Instant::now();
    for f in &frames {
        std::hint::black_box(zstd::bulk::decompress(f, 1 << 20).expect("zstd"));
    }
    let zstd = sample.len() as f64 / t.elapsed().as_secs_f64();
    let mode = Some(lz4::block::CompressionMode::HIGHCOMPRESSION(4));
    let blocks: Vec<(Vec<u8>, i32)> = sample
        .chunks(256 << 10)
        .map(|c| {
            (
                lz4::block::compress(c, mode, false).expect("lz4"),
                c.len() as i32,
            )
        })
        .collect();
    let t = Instant::now();
    for (b, len) in &blocks {
        std::hint::black_box(lz4::block::decompress(b, Some(*len)).expect("lz4"));
    }
    let lz4 = sample.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for c in sample.chunks(1 << 20) {
        std::hint::black_box(blake3::hash(c));
    }
    let b3 = sample.len() as f64 / t.elapsed().as_secs_f64();
    Ok(Ceilings {
        loopback_bytes_per_sec: loopback,
        link_bytes_per_sec: link_bw,
        zstd_decompress_bytes_per_sec: zstd,
        lz4_decompress_bytes_per_sec: lz4,
        blake3_bytes_per_sec: b3,
    })
}

/// A squashfs of `dir` mounted with squashfuse: the local-FUSE ceiling.
pub struct Squash {
    pub mountpoint: PathBuf,
}

impl Squash {
    /// Builds `image` from `dir` (zstd, as thaw's frames) and mounts it; `None`
    /// when squashfs-tools or squashfuse are not installed.
    pub fn mount(
        dir: &Path,
        image: &Path,
        mountpoint: &Path,
        readahead: u64,
    ) -> Result<Option<Squash>> {
        if !sys::installed("mksquashfs") || !sys::installed("squashfuse") {
            return Ok(None);
        }
        if !image.exists() {
            let st = Command::new("mksquashfs")
                .arg(dir)
                .arg(image)
                .args([
                    "-comp",
                    "zstd",
                    "-b",
                    "1M",
                    "-noappend",
                    "-quiet",
                    "-no-progress",
                ])
                .status()
                .context("mksquashfs")?;
            if !st.success() {
                bail!("mksquashfs failed");
            }
        }
        std::fs::create_dir_all(mountpoint)?;
        let st = Command::new("squashfuse")
            .arg(image)
            .arg(mountpoint)
            .status()
            .context("squashfuse")?;
        if !st.success() {
            bail!("squashfuse failed");
        }
        // The same kernel readahead as the thaw mount it is compared with.
        if readahead > 0 {
            thaw::set_readahead(mountpoint, readahead);
        }
        Ok(Some(Squash {
            mountpoint: mountpoint.to_path_buf(),
        }))
    }
}

impl Drop for Squash {
    fn drop(&mut self) {
        let _ = thaw::unmount(&self.mountpoint);
    }
}

/// Up to `max` bytes of the files under `dir`: representative data for the
/// zstd and BLAKE3 ceilings.
pub fn sample_bytes(dir: &Path, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(f) = std::fs::File::open(e.path()) {
                    let want = (max - out.len()) as u64;
                    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, want), &mut out);
                }
            }
            if out.len() >= max {
                return out;
            }
        }
    }
    out
}
