//! Peers measured on the same data, startup and link as thaw: `casync mount`
//! over an HTTP chunk store, and Nydus (`nydusd` over a registry's blob
//! route). A peer that is not installed, or whose image cannot be built, is
//! reported as skipped, with how to install it.

mod http;

use crate::startup::{ModeResult, Sample, Target};
use crate::{sys, thaw};
use anyhow::{bail, Context, Result};
use http::StaticServer;
use std::path::{Path, PathBuf};
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
    let files = NydusFiles::new(&work.join("nydus"))?;
    eprintln!("thaw bench: nydus-image create");
    if let Err(skipped) = build(MODE, &mut files.create_command(&t.local)) {
        return Ok(skipped);
    }
    std::fs::copy(&files.bootstrap, files.blobs.join(BOOTSTRAP))?;
    registry_layout(&files.blobs, &files.registry)?;
    let http = StaticServer::start(rt, &files.registry, t.link)?;
    files.write_config(&http)?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&files.cache);
        std::fs::create_dir_all(&files.cache)?;
        let sample = cold_start(t, &files.mountpoint, || {
            let bootstrap = http.get(rt, &format!("/v2/{REPO}/blobs/sha256:{BOOTSTRAP}"))?;
            std::fs::write(&files.bootstrap, bootstrap)?;
            files.start_nydusd()
        });
        match sample {
            Ok(s) => samples.push(s),
            Err(e) => bail!("nydus run failed: {e:#}\n{}", files.log_tail()),
        }
    }
    Ok(ModeResult::from_samples(MODE, samples))
}

/// Where the nydus peer keeps its image, its mount and its logs.
struct NydusFiles {
    blobs: PathBuf,
    bootstrap: PathBuf,
    registry: PathBuf,
    mountpoint: PathBuf,
    cache: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl NydusFiles {
    /// Empties `dir` and lays out the files of a run in it.
    fn new(dir: &Path) -> Result<NydusFiles> {
        let _ = std::fs::remove_dir_all(dir);
        let files = NydusFiles {
            blobs: dir.join("blobs"),
            bootstrap: dir.join("bootstrap"),
            registry: dir.join("registry"),
            mountpoint: dir.join("mnt"),
            cache: dir.join("cache"),
            config: dir.join("nydusd.json"),
            log: dir.join("nydusd.log"),
        };
        std::fs::create_dir_all(&files.blobs)?;
        std::fs::create_dir_all(&files.mountpoint)?;
        Ok(files)
    }

    /// `nydus-image create` of `tree`: zstd, 1 MiB chunks, as thaw's defaults.
    fn create_command(&self, tree: &Path) -> Command {
        let mut create = Command::new("nydus-image");
        create
            .arg("create")
            .arg("--blob-dir")
            .arg(&self.blobs)
            .arg("--bootstrap")
            .arg(&self.bootstrap)
            .args(["--compressor", "zstd", "--chunk-size", "0x100000"])
            .args(["--log-level", "warn"])
            .arg(tree);
        create
    }

    /// nydusd's configuration: the registry backend at `http`, a blob cache,
    /// no prefetch (thaw prefetches nothing at mount either).
    fn write_config(&self, http: &StaticServer) -> Result<()> {
        let config = serde_json::json!({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": http.addr.to_string(), "repo": REPO,
                    "timeout": 30, "connect_timeout": 5, "retry_limit": 2
                }},
                "cache": {"type": "blobcache", "config": {"work_dir": self.cache}}
            },
            "mode": "direct", "digest_validate": false, "iostats_files": false,
            "enable_xattr": true, "fs_prefetch": {"enable": false}
        });
        std::fs::write(&self.config, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    fn start_nydusd(&self) -> Result<Child> {
        Command::new("nydusd")
            .arg("--config")
            .arg(&self.config)
            .arg("--mountpoint")
            .arg(&self.mountpoint)
            .arg("--bootstrap")
            .arg(&self.bootstrap)
            .args(["--log-level", "warn", "--rlimit-nofile", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log)?)
            .spawn()
            .context("cannot start nydusd")
    }

    /// The last ten lines of nydusd's log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What nydusd's registry backend asks for: a blob by digest, in ranges.
    #[test]
    fn registry_route_serves_blob_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, registry) = (dir.path().join("blobs"), dir.path().join("registry"));
        std::fs::create_dir_all(&blobs).unwrap();
        let blob: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        std::fs::write(blobs.join(BOOTSTRAP), &blob).unwrap();
        registry_layout(&blobs, &registry).unwrap();
        let rt = Runtime::new().unwrap();
        let http = StaticServer::start(&rt, &registry, None).unwrap();
        let path = format!("/v2/{REPO}/blobs/sha256:{BOOTSTRAP}");
        assert_eq!(http.get(&rt, &path).unwrap(), blob);
        let url = format!("http://{}{path}", http.addr);
        let resp = rt.block_on(async {
            let client = reqwest::Client::new();
            let resp = client
                .get(&url)
                .header("range", "bytes=1000-1999")
                .send()
                .await?;
            Ok::<_, reqwest::Error>((resp.status().as_u16(), resp.bytes().await?))
        });
        let (status, body) = resp.unwrap();
        assert_eq!((status, &body[..]), (206, &blob[1000..2000]));
        assert!(http
            .get(&rt, &format!("/v2/{REPO}/blobs/sha256:0000"))
            .is_err());
    }
}
