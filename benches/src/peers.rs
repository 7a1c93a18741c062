//! Peers measured on the same data, startup and link as thaw: `casync mount`
//! over an HTTP chunk store, and Nydus (`nydusd` over a registry's blob
//! route). A peer that is not installed, or whose image cannot be built, is
//! reported as skipped, with how to install it.

mod http;

use crate::startup::{ModeResult, Sample, Target};
use crate::{sys, thaw};
use anyhow::{bail, Context, Result};
use http::StaticServer;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;
use tokio::runtime::Runtime;

/// Runs a peer's build step; `Err(skipped)` says why the peer cannot run.
fn build(mode: &str, cmd: &mut Command) -> Result<(), ModeResult> {
    let what = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(ModeResult::skipped(
            mode,
            &format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
        Err(e) => Err(ModeResult::skipped(
            mode,
            &format!("cannot run {what}: {e}"),
        )),
    }
}

/// One cold start: with the page cache dropped, `mount` starts the peer's
/// FUSE daemon at `mp`; once it is mounted the startup runs. Time to ready
/// includes whatever `mount` fetches first.
fn cold_start(t: &Target, mp: &Path, mount: impl FnOnce() -> Result<Child>) -> Result<Sample> {
    sys::drop_caches();
    let s = Instant::now();
    let mut child = mount()?;
    let result = sys::wait_mounted(mp, &mut child).and_then(|()| t.startup.run(mp));
    let sample = Sample::new(s, 0);
    let _ = thaw::unmount(mp);
    let _ = child.kill();
    let _ = child.wait();
    result.map(|()| sample)
}

/// casync: `casync make` into a chunk store served over HTTP with its index
/// (the index travels over the link too, as from a real server), then
/// `casync mount` of the index URL.
pub fn casync(t: &Target, rt: &Runtime, work: &Path, runs: usize) -> Result<ModeResult> {
    const MODE: &str = "casync";
    if !sys::installed("casync") {
        let why = "casync not installed (apt-get install casync)";
        return Ok(ModeResult::skipped(MODE, why));
    }
    let dir = work.join("casync");
    let (store, index, mp) = (dir.join("store"), dir.join("image.caidx"), dir.join("mnt"));
    std::fs::create_dir_all(&store)?;
    std::fs::create_dir_all(&mp)?;
    eprintln!("thaw bench: casync make");
    let mut make = Command::new("casync");
    make.arg("make")
        .arg(format!("--store={}", store.display()))
        .arg(&index)
        .arg(&t.local);
    if let Err(skipped) = build(MODE, &mut make) {
        return Ok(skipped);
    }
    let http = StaticServer::start(rt, &dir, t.link)?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(cold_start(t, &mp, || {
            Ok(Command::new("casync")
                .arg("mount")
                .arg(format!("--store=http://{}/store/", http.addr))
                .arg(format!("http://{}/image.caidx", http.addr))
                .arg(&mp)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?)
        })?);
    }
    Ok(ModeResult::from_samples(MODE, samples))
}

/// The repository nydusd's registry backend is pointed at.
const REPO: &str = "bench/image";
/// The bootstrap is served beside the blobs, under a name no blob has.
const BOOTSTRAP: &str = "b0075724b0075724b0075724b0075724b0075724b0075724b0075724b0075724";

/// Nydus: `nydus-image create` into a blob directory served as a registry's
/// blobs (`/v2/REPO/blobs/sha256:HEX`, through the same link); then each run
/// downloads the bootstrap (metadata) over the link, as thaw downloads its
/// manifest, and starts `nydusd` over FUSE with an empty blob cache.
pub fn nydus(t: &Target, rt: &Runtime, work: &Path, runs: usize) -> Result<ModeResult> {
    const MODE: &str = "nydus";
    if !sys::installed("nydusd") || !sys::installed("nydus-image") {
        let why = "nydusd not installed (apt-get install cmake; cargo install nydus-rs --locked)";
        return Ok(ModeResult::skipped(MODE, why));
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
    let mut create = Command::new("nydus-image");
    create
        .arg("create")
        .arg("--blob-dir")
        .arg(&blobs)
        .arg("--bootstrap")
        .arg(&boot)
        .args(["--compressor", "zstd", "--chunk-size", "0x100000"])
        .args(["--log-level", "warn"])
        .arg(&t.local);
    if let Err(skipped) = build(MODE, &mut create) {
        return Ok(skipped);
    }
    std::fs::copy(&boot, blobs.join(BOOTSTRAP))?;
    let registry = dir.join("registry");
    registry_layout(&blobs, &registry)?;
    let http = StaticServer::start(rt, &registry, t.link)?;
    let config = dir.join("nydusd.json");
    let backend = serde_json::json!({
        "scheme": "http", "host": http.addr.to_string(), "repo": REPO,
        "timeout": 30, "connect_timeout": 5, "retry_limit": 2
    });
    std::fs::write(&config, nydusd_config(backend, &cache))?;
    let log = dir.join("nydusd.log");
    let mut samples = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache)?;
        let sample = cold_start(t, &mp, || {
            let bytes = http.get(rt, &format!("/v2/{REPO}/blobs/sha256:{BOOTSTRAP}"))?;
            std::fs::write(&boot, bytes)?;
            Command::new("nydusd")
                .arg("--config")
                .arg(&config)
                .arg("--mountpoint")
                .arg(&mp)
                .arg("--bootstrap")
                .arg(&boot)
                .args(["--log-level", "warn", "--rlimit-nofile", "0"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("nydusd")
        });
        match sample {
            Ok(s) => samples.push(s),
            Err(e) => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!("nydus run failed: {e:#}\n{}", tail.join("\n"));
            }
        }
    }
    Ok(ModeResult::from_samples(MODE, samples))
}

/// Links every blob under `registry` where a registry serves it.
fn registry_layout(blobs: &Path, registry: &Path) -> Result<()> {
    let route = registry.join(format!("v2/{REPO}/blobs"));
    std::fs::create_dir_all(&route)?;
    for blob in std::fs::read_dir(blobs)? {
        let blob = blob?;
        let name = format!("sha256:{}", blob.file_name().to_string_lossy());
        std::fs::hard_link(blob.path(), route.join(name))?;
    }
    Ok(())
}

/// nydusd's configuration: the registry backend, a blob cache in `cache`, no
/// prefetch (thaw prefetches nothing at mount either).
fn nydusd_config(backend: serde_json::Value, cache: &Path) -> Vec<u8> {
    let config = serde_json::json!({
        "device": {
            "backend": {"type": "registry", "config": backend},
            "cache": {"type": "blobcache", "config": {"work_dir": cache.display().to_string()}}
        },
        "mode": "direct", "digest_validate": false, "iostats_files": false, "enable_xattr": true,
        "fs_prefetch": {"enable": false}
    });
    serde_json::to_vec_pretty(&config).expect("JSON values serialize")
}
