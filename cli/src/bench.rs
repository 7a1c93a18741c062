//! `thaw bench` and `thaw demo`: flags for the benchmark lab (`thaw-bench`).
//! Each builds the lab's config, runs it, writes its files and prints its
//! report: the table, or the JSON with `--json`.

use crate::cmd::parse_bytes;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use thaw_bench::{
    demo, load, mount_suite, startup, virtiofs_suite, vm_suite, Images, Link, Workload,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Suite {
    /// Cold-start latency per mode (full pull, lazy cold, lazy warm, local, peers).
    Startup,
    /// Mount throughput and latency beside squashfuse and fetch+decompress.
    Mount,
    /// A `thaw serve` under ~1,000 clients with hostile ones: requests/s,
    /// latency, health checks, server memory against its budgets.
    Load,
    /// In-guest reads over `thaw virtiofs` beside virtiofsd (boots QEMU guests).
    Virtiofs,
    /// QEMU memory snapshots restored from thaw per chunk size, beside local disk.
    Vm,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum WorkloadArg {
    PythonEnv,
    Weights,
    /// python-env, weights, and one image holding both.
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
    #[arg(long, conflicts_with = "pip")]
    dir: Option<PathBuf>,
    /// A real Python environment instead of a built-in workload: these PyPI
    /// packages (space-separated pip requirements, e.g. 'numpy pandas
    /// pyarrow'), installed by pip once per machine under
    /// ~/.cache/thaw/bench-pip; the start imports them (or runs --run).
    #[arg(long, conflicts_with = "image")]
    pip: Option<String>,
    /// Startup command for --image/--dir; `{root}` and $THAW_ROOT name the image's root.
    #[arg(long)]
    run: Option<String>,
    /// Runs per mode; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Shape pulls: BANDWIDTH[,LATENCY], e.g. 1gbit,2ms.
    #[arg(long, value_parser = Link::parse)]
    link: Option<Link>,
    /// VM suite: the guest's memory (suffixes K, M, G).
    #[arg(long, default_value = "512M", value_parser = crate::cmd::parse_bytes)]
    vm_memory: u64,
    /// VM suite: what the guest fills with random bytes and touches after a restore.
    #[arg(long, default_value = "64M", value_parser = crate::cmd::parse_bytes)]
    vm_weights: u64,
    /// VM suite: chunk sizes of the memory image (the first also warm, full copy and pool).
    #[arg(long, value_delimiter = ',', default_value = "256K,512K,1M,2M", value_parser = crate::cmd::parse_bytes)]
    vm_chunk_sizes: Vec<u64>,
    /// Scale of the built-in workloads (1.0: a 400 MiB python-env and 2 GiB of weights).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where generated data, stores and mounts live.
    #[arg(long, default_value = "/var/tmp/thaw-bench")]
    work_dir: PathBuf,
    /// Where results (JSON, SVG) are written.
    #[arg(long, default_value = "thaw-bench-results")]
    out: PathBuf,
    /// The peers to measure beside thaw, when installed (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "casync,nydus"
    )]
    peers: Vec<PeerArg>,
    /// With --dir or --pip: record the start on a first push, then push again
    /// and measure that version, whose files the start reads are packed
    /// together in read order (what a build pipeline's next push does).
    #[arg(long, conflicts_with = "image")]
    packed: bool,
    /// Measure no peers.
    #[arg(long, conflicts_with = "peers")]
    no_peers: bool,
    /// Startup suite: each lazy mode's last mount keeps a timeline of its
    /// reads, fetches, loads, stream batches and pushes, written to --out as
    /// timeline-<mode>.json and drawn as timeline-<mode>.svg.
    #[arg(long)]
    timeline: bool,
    /// Load suite: seconds of load.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Load suite: well-behaved clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Load suite: hostile clients of each kind (six kinds).
    #[arg(long, default_value_t = 50)]
    hostile: usize,
    /// Load suite: the server's connection cap.
    #[arg(long, default_value_t = thaw_server::ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Print the JSON result on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let thaw_bin = std::env::current_exe().context("cannot find the thaw binary")?;
    if a.suite == Suite::Mount {
        // Not a flag: only for comparing kernel readahead settings.
        let readahead = std::env::var("THAW_BENCH_KERNEL_READAHEAD").unwrap_or("1M".into());
        let config = mount_suite::MountSuiteConfig {
            thaw_bin,
            scale: a.scale,
            work_dir: a.work_dir,
            kernel_readahead: parse_bytes(&readahead).map_err(anyhow::Error::msg)?,
        };
        let report = mount_suite::run(&config)?;
        report.write_files(&a.out)?;
        return print(&report, a.json);
    }
    if a.suite == Suite::Load {
        let config = load::LoadConfig {
            thaw_bin,
            work_dir: a.work_dir,
            seconds: a.seconds,
            clients: a.clients,
            hostile: a.hostile,
            hostile_kinds: hostile_kinds()?,
            max_connections: a.max_connections,
            cache_mem: 64 << 20,
            body_memory: 64 << 20,
            response_memory: 64 << 20,
        };
        let report = load::run(&config)?;
        let json = report.write_files(&a.out)?;
        print(&report, a.json)?;
        if !a.json {
            println!("\nwritten: {}", json.display());
        }
        return Ok(());
    }
    if a.suite == Suite::Vm {
        let config = vm_suite::VmSuiteConfig {
            thaw_bin,
            work_dir: a.work_dir,
            memory_mib: u32::try_from(a.vm_memory >> 20).context("--vm-memory too large")?,
            weights_mib: u32::try_from(a.vm_weights >> 20).context("--vm-weights too large")?,
            chunk_kib: a.vm_chunk_sizes.iter().map(|b| (b >> 10) as u32).collect(),
            link: a.link,
        };
        let report = vm_suite::run(&config)?;
        std::fs::create_dir_all(&a.out)?;
        let json = a.out.join("vm.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
        print(&report, a.json)?;
        if !a.json {
            println!("\nwritten: {}", json.display());
        }
        return Ok(());
    }
    if a.suite == Suite::Virtiofs {
        let config = virtiofs_suite::VirtiofsSuiteConfig {
            thaw_bin,
            scale: a.scale,
            env_dir: a.dir,
            runs: a.runs,
            work_dir: a.work_dir,
        };
        let report = virtiofs_suite::run(&config)?;
        std::fs::create_dir_all(&a.out)?;
        let json = a.out.join("virtiofs.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
        print(&report, a.json)?;
        if !a.json {
            println!("\nwritten: {}", json.display());
        }
        return Ok(());
    }
    let peers = peers(&a);
    if a.timeline {
        std::fs::create_dir_all(&a.out)?;
    }
    let config = startup::StartupConfig {
        thaw_bin,
        images: images(&a)?,
        runs: a.runs,
        link: a.link,
        work_dir: a.work_dir,
        peers,
        packed: a.packed,
        timelines: a.timeline.then(|| a.out.clone()),
    };
    let report = startup::run(&config)?;
    let [json, svg] = report.write_files(&a.out)?;
    print(&report, a.json)?;
    if !a.json {
        println!("\nwritten: {}, {}", json.display(), svg.display());
    }
    Ok(())
}

/// The hostile kinds of the load suite: all, or those `THAW_BENCH_LOAD_KINDS`
/// names (comma-separated, as in the JSON). Not a flag: only for telling
/// what each kind costs the server.
fn hostile_kinds() -> Result<Vec<load::Hostile>> {
    let Ok(names) = std::env::var("THAW_BENCH_LOAD_KINDS") else {
        return Ok(load::Hostile::ALL.to_vec());
    };
    names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|name| {
            serde_json::from_value(serde_json::Value::String(name.trim().to_owned()))
                .with_context(|| format!("THAW_BENCH_LOAD_KINDS: no hostile kind {name:?}"))
        })
        .collect()
}

fn images(a: &BenchArgs) -> Result<Images> {
    let startup = |flag: &str| {
        a.run
            .clone()
            .with_context(|| format!("{flag} needs --run 'COMMAND'"))
    };
    if let Some(pip) = &a.pip {
        let spec: Vec<String> = pip.split_whitespace().map(str::to_owned).collect();
        let cache = thaw_client::image::default_cache_dir().join("bench-pip");
        return Ok(Images::Dir {
            dir: thaw_bench::pip_env::install(&cache, &spec)?,
            startup: match &a.run {
                Some(run) => run.clone(),
                None => {
                    let python = thaw_bench::pip_env::interpreter()?;
                    thaw_bench::pip_env::import_command(&spec, &python)
                }
            },
        });
    }
    Ok(match (&a.image, &a.dir) {
        (Some(image), _) => Images::Remote {
            reference: image.clone(),
            startup: startup("--image")?,
        },
        (None, Some(dir)) => Images::Dir {
            dir: dir.clone(),
            startup: startup("--dir")?,
        },
        (None, None) => Images::Builtin {
            workloads: match a.workload {
                WorkloadArg::PythonEnv => vec![Workload::PythonEnv],
                WorkloadArg::Weights => vec![Workload::Weights],
                WorkloadArg::Both => vec![Workload::PythonEnv, Workload::Weights, Workload::Both],
            },
            scale: a.scale,
        },
    })
}

#[derive(Args)]
pub struct DemoArgs {
    /// Size of the generated weights file.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    weights: u64,
    /// Number of small files in the generated environment.
    #[arg(long, default_value_t = 3000)]
    files: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let report = demo::run(&demo::DemoConfig {
        weights: a.weights,
        files: a.files,
    })?;
    print(&report, a.json)
}

/// A report as its table, or as JSON.
fn print(report: &(impl serde::Serialize + std::fmt::Display), json: bool) -> Result<()> {
    match json {
        true => println!("{}", serde_json::to_string_pretty(report)?),
        false => print!("{report}"),
    }
    Ok(())
}

/// A peer the startup suite can measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PeerArg {
    Casync,
    Nydus,
}

fn peers(a: &BenchArgs) -> thaw_bench::Peers {
    if a.no_peers {
        return thaw_bench::Peers::NONE;
    }
    thaw_bench::Peers {
        casync: a.peers.contains(&PeerArg::Casync),
        nydus: a.peers.contains(&PeerArg::Nydus),
    }
}
