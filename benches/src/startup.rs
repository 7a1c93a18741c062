//! The startup suite: cold-start latency of an image beside what a user
//! would otherwise do, measured in one run.
//!
//! For each workload and each of N runs, with the page cache dropped first:
//! - **full pull**: export to local disk, then the startup;
//! - **lazy cold**: a fresh `thaw mount` with empty caches and no profile,
//!   then the startup;
//! - **lazy profiled**: the same, streaming the profile of the startup
//!   recorded once before the runs (`thaw mount --record`);
//! - **lazy warm**: a fresh `thaw mount` over the disk cache the cold run
//!   left, streaming from it the local profile that run kept (what it read);
//! - **local**: the startup on a local copy (the floor);
//! - **peers** (casync, nydus, when installed) on the same data, startup and link.
//!
//! Time to ready is from the start of the mode until the startup is done. The
//! server is embedded; pulls go through a shaped link when asked, as loopback
//! makes a full pull look cheap. The machine's ceilings are measured in the
//! same run. A built-in workload's startup replays its read plan in this
//! process; a user's startup is a shell command.

mod modes;
mod report;

pub use report::{ModeResult, Sample, StartupReport, WorkloadResult};

use crate::link::{self, Link};
use crate::thaw::{self, EmbeddedServer, ThawBin};
use crate::workload::{self, Plan, Sizes, Workload};
use crate::{ceilings, sys};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio::runtime::Runtime;

/// How to run the startup suite.
#[derive(Debug, Clone)]
pub struct StartupConfig {
    /// The `thaw` binary whose mounts are measured.
    pub thaw_bin: PathBuf,
    pub images: Images,
    /// Runs per mode; medians are reported.
    pub runs: usize,
    /// Shape pulls (and peers' fetches) through this link.
    pub link: Option<Link>,
    /// Where generated data, stores and mounts live.
    pub work_dir: PathBuf,
    /// The peers to measure too, when installed.
    pub peers: Peers,
    /// Push a directory twice, measuring the second version: the first
    /// push's start is recorded, and the second push packs the files it
    /// read together, in read order (`--dir`, `--pip`).
    pub packed: bool,
    /// Where each lazy mode's last mount writes its timeline, drawn as
    /// `timeline-<mode>.svg` beside it (the last workload's).
    pub timelines: Option<PathBuf>,
}

/// Which peers the startup suite measures beside thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peers {
    pub casync: bool,
    pub nydus: bool,
}

impl Peers {
    pub const NONE: Peers = Peers {
        casync: false,
        nydus: false,
    };
}

/// What the suite measures.
#[derive(Debug, Clone)]
pub enum Images {
    /// Built-in workloads, generated at a scale.
    Builtin {
        workloads: Vec<Workload>,
        scale: f64,
    },
    /// A local directory, pushed to the embedded server.
    Dir { dir: PathBuf, startup: String },
    /// An image on a running server (`HOST:PORT/NAME:TAG`, an IP address).
    Remote { reference: String, startup: String },
}

/// How a startup runs against an image's root.
pub enum Startup {
    /// A built-in workload's read plan, replayed in this process on a thread.
    Plan(Plan),
    /// A shell command run in the root; `{root}` and `$THAW_ROOT` name it.
    Shell(String),
}

impl Startup {
    /// Runs the startup against `root` and waits for it to succeed.
    pub fn run(&self, root: &Path) -> Result<()> {
        match self {
            Startup::Plan(plan) => std::thread::scope(|s| {
                s.spawn(|| plan.execute(root).map(drop))
                    .join()
                    .map_err(|_| anyhow!("the startup reads panicked"))?
            }),
            Startup::Shell(command) => shell(command, root),
        }
    }
}

fn shell(command: &str, root: &Path) -> Result<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(command.replace("{root}", &root.display().to_string()))
        .current_dir(root)
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

/// One image to measure, before it is pushed or copied.
struct Image {
    name: String,
    /// A local tree to push, or `None` for a remote reference (`name`).
    dir: Option<PathBuf>,
    startup: Startup,
    read_bytes: u64,
}

/// What every mode of one workload needs.
pub struct Target {
    pub thaw: ThawBin,
    /// Reference through the (possibly shaped) pull path.
    pub pull_ref: String,
    /// A local copy of the tree.
    pub local: PathBuf,
    pub startup: Startup,
    pub link: Option<Link>,
    /// See [`StartupConfig::timelines`].
    pub timelines: Option<PathBuf>,
}

/// Runs the suite; progress goes to stderr.
pub fn run(cfg: &StartupConfig) -> Result<StartupReport> {
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("cannot create {}", cfg.work_dir.display()))?;
    let page_cache_dropped = sys::drop_caches_or_warn();
    let rt = Runtime::new().context("cannot start the async runtime")?;
    let server = EmbeddedServer::start(&rt, &cfg.work_dir.join("store"))?;
    let mut workloads = Vec::new();
    let mut sample = Vec::new();
    for image in images(cfg)? {
        let (target, result) = prepare(cfg, &rt, &server, image)?;
        if sample.is_empty() {
            sample = ceilings::sample_bytes(&target.local, 64 << 20);
        }
        workloads.push(measure(cfg, &rt, &target, result)?);
    }
    if let Some(dir) = &cfg.timelines {
        for svg in crate::chart::draw_timelines(dir)? {
            eprintln!("thaw bench: drew {}", svg.display());
        }
    }
    eprintln!("thaw bench: measuring ceilings");
    let ceilings = rt.block_on(ceilings::measure(&sample, cfg.link))?;
    Ok(StartupReport::new(
        cfg.link,
        page_cache_dropped,
        ceilings,
        workloads,
    ))
}

/// The images of the config, generating built-in workloads as needed.
fn images(cfg: &StartupConfig) -> Result<Vec<Image>> {
    Ok(match &cfg.images {
        Images::Remote { reference, startup } => vec![Image {
            name: reference.clone(),
            dir: None,
            startup: Startup::Shell(startup.clone()),
            read_bytes: 0,
        }],
        Images::Dir { dir, startup } => vec![Image {
            name: dir.display().to_string(),
            dir: Some(dir.clone()),
            startup: Startup::Shell(startup.clone()),
            read_bytes: 0,
        }],
        Images::Builtin { workloads, scale } => {
            let sizes = Sizes::at_scale(*scale);
            let mut v = Vec::new();
            for &w in workloads {
                eprintln!(
                    "thaw bench: generating {} ({} + {})",
                    w.name(),
                    indicatif::HumanBytes(sizes.env_bytes),
                    indicatif::HumanBytes(sizes.weight_bytes)
                );
                let g = workload::generate(&cfg.work_dir.join("data"), w, sizes)?;
                v.push(Image {
                    name: w.name().into(),
                    dir: Some(g.dir),
                    read_bytes: g.plan.read_bytes(),
                    startup: Startup::Plan(g.plan),
                });
            }
            v
        }
    })
}

/// What a directory is pushed as.
const PUSHED: &str = "bench:latest";

/// Pushes the image (unshaped: that is the build pipeline's side) or copies a
/// remote one locally, and puts the link in front of its server.
fn prepare(
    cfg: &StartupConfig,
    rt: &Runtime,
    server: &EmbeddedServer,
    image: Image,
) -> Result<(Target, WorkloadResult)> {
    let (upstream, local) = match &image.dir {
        Some(dir) => {
            eprintln!("thaw bench: pushing {}", image.name);
            thaw::push(rt, dir, &server.reference(PUSHED))?;
            let up = thaw::Upstream {
                addr: server.addr,
                image: PUSHED.into(),
            };
            (up, dir.clone())
        }
        None => {
            let local = cfg.work_dir.join("local-copy");
            let _ = std::fs::remove_dir_all(&local);
            thaw::export(rt, &image.name, &local)?;
            (thaw::upstream(&image.name)?, local)
        }
    };
    let pull_addr = rt.block_on(link::through(cfg.link, upstream.addr))?;
    let pull_ref = format!("{pull_addr}/{}", upstream.image);
    let target = Target {
        thaw: ThawBin(cfg.thaw_bin.clone()),
        pull_ref,
        local,
        startup: image.startup,
        link: cfg.link,
        timelines: cfg.timelines.clone(),
    };
    if let (true, Some(dir)) = (cfg.packed, &image.dir) {
        // As a build pipeline's next push would: the version measured has
        // the files the start reads packed together, in read order.
        eprintln!("  recording the start, then pushing again packed by what it read");
        let work = cfg.work_dir.join("pack");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        modes::record_profile(&target, &work).context("recording the start to pack by")?;
        let report = thaw::push(rt, dir, &server.reference(PUSHED))?;
        match report.chunks_uploaded {
            0 => eprintln!("  pushed again: no new chunks (packed by an earlier profile already)"),
            n => eprintln!(
                "  pushed again: {n} new chunks, {} chunks of the profile carried",
                report.profile_carried
            ),
        }
    }
    let info = thaw::inspect(rt, &target.pull_ref)?;
    let result = WorkloadResult::new(image.name, &info, image.read_bytes);
    Ok((target, result))
}

fn measure(
    cfg: &StartupConfig,
    rt: &Runtime,
    target: &Target,
    mut result: WorkloadResult,
) -> Result<WorkloadResult> {
    eprintln!(
        "thaw bench: measuring {} ({} in {} files)",
        result.workload,
        indicatif::HumanBytes(result.image_bytes),
        result.image_files
    );
    let work = cfg.work_dir.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!("  recording the start's profile");
    let recorded = modes::record_profile(target, &work).map_err(|e| format!("{e:#}"));
    let profiled = match &recorded {
        Ok(stats) => {
            if result.read_bytes == 0 {
                result.set_read_bytes(stats.read_bytes);
            }
            match thaw::inspect(rt, &target.pull_ref)?.profile {
                Some(_) => Ok(()),
                None => Err("the recorded profile was not saved (see the mount's log)".into()),
            }
        }
        Err(e) => Err(e.clone()),
    };
    result.modes = modes::run_all(target, rt, &work, cfg.runs.max(1), cfg.peers, profiled)?;
    Ok(result)
}
