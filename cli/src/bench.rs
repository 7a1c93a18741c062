//! `thaw bench`: cold-start latency of an image beside what a user would
//! otherwise do, measured in one run.
//!
//! For each workload and each of N runs, with the page cache dropped first:
//! - **full pull**: `thaw export` to local disk, then the startup command;
//! - **lazy cold**: a fresh `thaw mount` with empty caches, then the command;
//! - **lazy warm**: a fresh `thaw mount` over the disk cache the cold run left;
//! - **local**: the command on a local copy (the floor);
//! - **peers** (casync, when installed) on the same data, command and link.
//!
//! Time to ready is from the start of the mode until the command exits. The
//! server is embedded; pulls go through a shaped link (`--link`) when asked, as
//! loopback makes a full pull look cheap. The machine's ceilings are measured
//! in the same run. Results print as a table and are written as JSON and an SVG
//! chart. `--suite mount` runs the mount's throughput and latency figures instead.

mod ceilings;
mod micro;
mod peers;
pub mod proxy;
mod report;
pub mod workload;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use thaw_client::{ImageRef, Remote};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Suite {
    /// Cold-start latency per mode (full pull, lazy cold, lazy warm, local, peers).
    Startup,
    /// Mount throughput and latency beside squashfuse and fetch+decompress.
    Mount,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum WorkloadArg {
    PythonEnv,
    Weights,
    Both,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "startup")]
    suite: Suite,
    /// Built-in workloads to run (ignored with --image or --dir).
    #[arg(long, value_enum, default_value = "both")]
    workload: WorkloadArg,
    /// An image on a running server, instead of a built-in workload.
    #[arg(long, conflicts_with = "dir")]
    image: Option<String>,
    /// A local directory to push and measure, instead of a built-in workload.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Startup command for --image/--dir; `{root}` and $THAW_ROOT name the image's root.
    #[arg(long)]
    run: Option<String>,
    /// Runs per mode; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Shape pulls: BANDWIDTH[,LATENCY], e.g. 1gbit,2ms.
    #[arg(long, value_parser = proxy::Link::parse)]
    link: Option<proxy::Link>,
    /// Scale of the built-in workloads (1.0: a 400 MiB python-env and 2 GiB of weights).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where generated data, stores and mounts live.
    #[arg(long, default_value = "/var/tmp/thaw-bench")]
    work_dir: PathBuf,
    /// Where results (JSON, SVG) are written.
    #[arg(long, default_value = "thaw-bench-results")]
    out: PathBuf,
    /// Skip the peers.
    #[arg(long)]
    no_peers: bool,
    /// Print the JSON result on stdout.
    #[arg(long)]
    json: bool,
}

/// One measurement.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub bytes_fetched: u64,
}

/// A mode's runs and their medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResult {
    pub mode: String,
    /// Set when the mode could not run (a peer not installed).
    pub skipped: Option<String>,
    pub samples: Vec<Sample>,
    pub median_seconds: f64,
    pub median_bytes_fetched: u64,
    pub vs_full_pull: f64,
    pub vs_local: f64,
}

/// One workload's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadResult {
    pub workload: String,
    pub image_bytes: u64,
    pub image_files: u64,
    pub stored_bytes: u64,
    pub read_bytes: u64,
    pub share_read: f64,
    pub modes: Vec<ModeResult>,
}

/// How the startup command runs.
#[derive(Clone)]
pub enum Startup {
    /// A built-in workload's read plan, run by `thaw bench-read`.
    Plan(PathBuf),
    /// A shell command.
    Shell(String),
}

impl Startup {
    /// Runs the command against `root` and waits for it to succeed.
    pub fn run(&self, root: &Path) -> Result<()> {
        let mut cmd = match self {
            Startup::Plan(plan) => {
                let mut c = Command::new(std::env::current_exe()?);
                c.arg("bench-read").arg(plan).arg(root);
                c
            }
            Startup::Shell(s) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(s.replace("{root}", &root.display().to_string()))
                    .current_dir(root);
                c
            }
        };
        let out = cmd
            .env("THAW_ROOT", root)
            .output()
            .context("cannot start the startup command")?;
        if !out.status.success() {
            bail!(
                "startup command failed on {}: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// What every mode of one workload needs.
pub struct Target {
    /// Reference through the (possibly shaped) pull path.
    pub pull_ref: String,
    /// A local copy of the tree.
    pub local: PathBuf,
    pub startup: Startup,
    pub link: Option<proxy::Link>,
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn thaw_cmd() -> Result<Command> {
    Ok(Command::new(std::env::current_exe()?))
}

fn check(out: std::process::Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mounts `r` with `thaw mount` (a real background process) and returns when it answers.
pub fn mount(r: &str, mp: &Path, cache: &Path, extra: &[&str]) -> Result<()> {
    std::fs::create_dir_all(mp)?;
    let out = thaw_cmd()?
        .arg("mount")
        .arg(r)
        .arg(mp)
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .output()?;
    check(out, "thaw mount").map(|_| ())
}

/// Unmounts with `thaw umount`, which waits for the mount process to exit.
pub fn umount(mp: &Path) {
    if let Ok(mut c) = thaw_cmd() {
        let _ = c.arg("umount").arg(mp).output();
    }
}

fn sample_local(t: &Target) -> Result<Sample> {
    ceilings::drop_caches();
    let s = Instant::now();
    t.startup.run(&t.local)?;
    Ok(Sample {
        seconds: s.elapsed().as_secs_f64(),
        bytes_fetched: 0,
    })
}

fn sample_full_pull(t: &Target, rt: &tokio::runtime::Runtime, work: &Path) -> Result<Sample> {
    let dest = work.join("pulled");
    let _ = std::fs::remove_dir_all(&dest);
    ceilings::drop_caches();
    let s = Instant::now();
    let r = ImageRef::parse(&t.pull_ref)?;
    let remote = Remote::for_ref(&r, None)?;
    let report = rt.block_on(thaw_client::export::export(
        &r,
        &remote,
        &dest,
        &Default::default(),
    ))?;
    t.startup.run(&dest)?;
    let seconds = s.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dest);
    Ok(Sample {
        seconds,
        bytes_fetched: report.bytes_fetched,
    })
}

fn sample_lazy(t: &Target, work: &Path, cold: bool) -> Result<Sample> {
    let (mp, cache) = (work.join("mnt"), work.join("cache"));
    if cold {
        let _ = std::fs::remove_dir_all(&cache);
    }
    ceilings::drop_caches();
    let s = Instant::now();
    mount(&t.pull_ref, &mp, &cache, &[])?;
    let result = t.startup.run(&mp);
    let seconds = s.elapsed().as_secs_f64();
    let stats = thaw_fuse::query_stats(&mp);
    umount(&mp);
    result?;
    Ok(Sample {
        seconds,
        bytes_fetched: stats.map(|s| s.bytes_fetched).unwrap_or(0),
    })
}

/// Medians of a mode's samples (ratios are filled in once every mode ran).
fn summarize(mode: &str, samples: Vec<Sample>) -> ModeResult {
    let mut secs: Vec<f64> = samples.iter().map(|s| s.seconds).collect();
    let mut bytes: Vec<f64> = samples.iter().map(|s| s.bytes_fetched as f64).collect();
    ModeResult {
        mode: mode.into(),
        skipped: None,
        median_seconds: median(&mut secs),
        median_bytes_fetched: median(&mut bytes) as u64,
        samples,
        vs_full_pull: 0.0,
        vs_local: 0.0,
    }
}

fn run_modes(
    t: &Target,
    rt: &tokio::runtime::Runtime,
    work: &Path,
    runs: usize,
    peers: bool,
) -> Result<Vec<ModeResult>> {
    let mut samples: Vec<(&str, Vec<Sample>)> = vec![
        ("full pull", vec![]),
        ("lazy cold", vec![]),
        ("lazy warm", vec![]),
        ("local", vec![]),
    ];
    for i in 0..runs {
        eprintln!("  run {}/{runs}", i + 1);
        samples[0]
            .1
            .push(sample_full_pull(t, rt, work).context("full pull")?);
        samples[1]
            .1
            .push(sample_lazy(t, work, true).context("lazy cold")?);
        samples[2]
            .1
            .push(sample_lazy(t, work, false).context("lazy warm")?);
        samples[3].1.push(sample_local(t).context("local")?);
    }
    let mut modes: Vec<ModeResult> = samples.into_iter().map(|(m, s)| summarize(m, s)).collect();
    if peers {
        modes.push(peers::casync(t, rt, work, runs).context("casync")?);
        modes.push(peers::nydus(t, rt, work, runs).context("nydus")?);
    }
    let full = modes[0].median_seconds;
    let local = modes[3].median_seconds;
    for m in &mut modes {
        if m.skipped.is_none() {
            m.vs_full_pull = m.median_seconds / full;
            m.vs_local = m.median_seconds / local;
        }
    }
    Ok(modes)
}

/// Starts the embedded server on `store`; returns its address and a stopper.
fn embedded_server(
    rt: &tokio::runtime::Runtime,
    store: &Path,
) -> Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = thaw_server::ServerConfig {
        store_url: format!("file://{}", store.display()),
        ..Default::default()
    };
    rt.spawn(async move {
        if let Err(e) = thaw_server::run(listener, config, async {
            let _ = rx.await;
        })
        .await
        {
            eprintln!("thaw bench: embedded server failed: {e}");
        }
    });
    Ok((addr, tx))
}

pub fn run(a: BenchArgs, rt: tokio::runtime::Runtime) -> Result<()> {
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("cannot create {}", a.work_dir.display()))?;
    std::fs::create_dir_all(&a.out)?;
    let dropped = ceilings::drop_caches();
    if !dropped {
        eprintln!("thaw bench: WARNING: cannot drop the page cache (not root?): cold figures will be optimistic");
    }
    if a.suite == Suite::Mount {
        return micro::run(&a, &rt);
    }
    let (server, _stop) = embedded_server(&rt, &a.work_dir.join("store"))?;
    let mut results = Vec::new();
    let mut sample = Vec::new();
    let targets: Vec<(String, Option<PathBuf>, Startup, u64)> = if let Some(image) = &a.image {
        let cmd = a.run.clone().context("--image needs --run 'COMMAND'")?;
        vec![(image.clone(), None, Startup::Shell(cmd), 0)]
    } else if let Some(dir) = &a.dir {
        let cmd = a.run.clone().context("--dir needs --run 'COMMAND'")?;
        vec![(
            dir.display().to_string(),
            Some(dir.clone()),
            Startup::Shell(cmd),
            0,
        )]
    } else {
        let names: &[&str] = match a.workload {
            WorkloadArg::PythonEnv => &["python-env"],
            WorkloadArg::Weights => &["weights"],
            WorkloadArg::Both => &["python-env", "weights", "both"],
        };
        let mut v = Vec::new();
        for n in names {
            let env = (400.0 * a.scale * (1 << 20) as f64) as u64;
            let w = (2048.0 * a.scale * (1 << 20) as f64) as u64;
            eprintln!(
                "thaw bench: generating {n} ({} + {})",
                crate::cmd::human(env),
                crate::cmd::human(w)
            );
            let g = workload::generate(&a.work_dir.join("data"), n, env, w)?;
            v.push((
                n.to_string(),
                Some(g.dir),
                Startup::Plan(g.plan_path),
                g.read_bytes,
            ));
        }
        v
    };
    for (name, dir, startup, read_bytes) in targets {
        let work = a.work_dir.join("run");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        // Push (unshaped: that is the build pipeline's side), or pull a local copy.
        let (upstream, pull_name, local) = match &dir {
            Some(d) => {
                let tag = format!("{}/bench:latest", server);
                let r = ImageRef::parse(&tag)?;
                let remote = Remote::for_ref(&r, None)?;
                eprintln!("thaw bench: pushing {name}");
                rt.block_on(thaw_client::push::push(d, &r, &remote, &Default::default()))?;
                (server, "bench:latest".to_string(), d.clone())
            }
            None => {
                let r = ImageRef::parse(&name)?;
                let upstream = r
                    .server
                    .trim_start_matches("http://")
                    .parse()
                    .context("--image needs HOST:PORT with an IP address")?;
                let remote = Remote::for_ref(&r, None)?;
                let local = a.work_dir.join("local-copy");
                let _ = std::fs::remove_dir_all(&local);
                rt.block_on(thaw_client::export::export(
                    &r,
                    &remote,
                    &local,
                    &Default::default(),
                ))?;
                let sel = match &r.selector {
                    thaw_client::reference::Selector::Tag(t) => format!("{}:{t}", r.name),
                    thaw_client::reference::Selector::Digest(d) => format!("{}@{d}", r.name),
                };
                (upstream, sel, local)
            }
        };
        let pull_addr = match a.link {
            Some(l) => rt.block_on(proxy::start(upstream, l))?,
            None => upstream,
        };
        let pull_ref = format!("{pull_addr}/{pull_name}");
        let info = rt.block_on(async {
            let r = ImageRef::parse(&pull_ref)?;
            thaw_client::inspect::inspect(&r, &Remote::for_ref(&r, None)?).await
        })?;
        if sample.is_empty() {
            sample = sample_bytes(&local, 64 << 20);
        }
        let target = Target {
            pull_ref,
            local,
            startup,
            link: a.link,
        };
        eprintln!(
            "thaw bench: measuring {name} ({} in {} files)",
            crate::cmd::human(info.bytes),
            info.files
        );
        let modes = run_modes(&target, &rt, &work, a.runs.max(1), !a.no_peers)?;
        results.push(WorkloadResult {
            workload: name,
            image_bytes: info.bytes,
            image_files: info.files,
            stored_bytes: info.stored_bytes,
            read_bytes,
            share_read: if info.bytes > 0 {
                read_bytes as f64 / info.bytes as f64
            } else {
                0.0
            },
            modes,
        });
    }
    eprintln!("thaw bench: measuring ceilings");
    let ceil = rt.block_on(ceilings::measure(&sample, a.link))?;
    report::startup(&a.out, &results, &ceil, a.link, dropped, a.json)
}

/// Up to `max` bytes of the files under `dir`, for ceiling measurements.
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
                    let _ = std::io::Read::read_to_end(
                        &mut std::io::Read::take(f, (max - out.len()) as u64),
                        &mut out,
                    );
                }
            }
            if out.len() >= max {
                return out;
            }
        }
    }
    out
}
