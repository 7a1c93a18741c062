//! The load suite: a real `thaw serve` process under about a thousand
//! well-behaved clients with hostile ones mixed in, and what that costs it.
//!
//! The server runs over a directory store holding one pushed image (chunks
//! of 1 MiB, 256 KiB and packed small files, a few hundred MiB, more than
//! its hot cache) with a small hot cache, body memory and response memory,
//! so that its memory bound is easy to read: RSS should stay under the
//! three budgets plus a constant. Two phases:
//!
//! 1. the ceiling: a few clients, nothing hostile, the most this server
//!    answers on this machine;
//! 2. the load: `clients` closed-loop clients on keep-alive connections
//!    (chunk GETs, batch reads, tag GETs; [`good`]), `hostile` clients of
//!    each [`Hostile`] kind, and a health probe every 100 ms on a fresh
//!    connection, for `seconds`.
//!
//! Reported: requests per second and latency of the good requests against
//! the ceiling, their errors, the health probes, what the hostile clients
//! were told, the server's RSS (sampled, and its high-water mark) against
//! its budgets, and the CPU each side used: the load runs on the same
//! machine as the server, so both share its cores.

mod good;
pub mod hostile;
mod report;

pub use hostile::{Hostile, HostileTally};
pub use report::{Figures, HealthFigures, KindFigures, LoadReport, Memory, ServerSetup};

use crate::{sys, thaw};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thaw_testkit::data::{noise, PythonEnv, Rng};
use thaw_testkit::Server;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How to run the load suite.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The `thaw` binary whose server is measured.
    pub thaw_bin: PathBuf,
    /// Where generated data and the store live.
    pub work_dir: PathBuf,
    /// Length of the load phase.
    pub seconds: f64,
    /// Well-behaved clients in the load phase.
    pub clients: usize,
    /// Hostile clients of each kind.
    pub hostile: usize,
    /// The kinds of hostile clients.
    pub hostile_kinds: Vec<Hostile>,
    /// The server's connection cap (`--max-connections`).
    pub max_connections: usize,
    /// The server's hot cache (`--cache-mem`).
    pub cache_mem: u64,
    /// The server's body memory (`--body-memory`).
    pub body_memory: u64,
    /// The server's response memory (`--response-memory`).
    pub response_memory: u64,
}

/// Clients of the ceiling phase: enough to keep both cores busy.
const CEILING_CLIENTS: usize = 32;
const CEILING_SECONDS: f64 = 5.0;
const HEALTH_EVERY: Duration = Duration::from_millis(100);
/// How long clients may take to finish their last request after the end.
const WIND_DOWN: Duration = Duration::from_secs(40);
const TAG: &str = "load:latest";

/// A chunk the clients ask for.
pub(crate) struct Chunk {
    /// `/v1/chunks/blake3:<hex>`
    path: String,
    /// `blake3:<hex>`
    id: String,
    frame_len: u64,
}

/// What the clients of a run share: where the server is and what it holds.
pub(crate) struct Target {
    addr: SocketAddr,
    /// Shuffled; the first `hot` of them are asked for most.
    chunks: Vec<Chunk>,
    hot: usize,
    tag_path: String,
    tag_len: u64,
}

/// Runs the suite; progress goes to stderr.
pub fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    let open_files = sys::raise_open_files(1 << 16).context("cannot raise RLIMIT_NOFILE")?;
    let needed = cfg.clients + cfg.hostile * cfg.hostile_kinds.len() + 256;
    if open_files < needed as u64 {
        bail!(
            "the open-file limit is {open_files}; this load needs about {needed} (raise ulimit -n)"
        );
    }
    let work = cfg.work_dir.join("load");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let data = generate(&cfg.work_dir.join("data/load"))?;
    let setup = ServerSetup::new(cfg);
    let flags = setup.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start_bin(&cfg.thaw_bin, &work.join("store"), &flags);
    let pid = server.pid().context("the server is running")?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    eprintln!("thaw bench: pushing the image");
    let pushed = thaw::push(&rt, &data, &server.reference(TAG))?;
    let target = Arc::new(Target::new(&server, &pushed.manifest.to_string())?);
    let idle_rss = sys::proc_status_bytes(pid, "VmRSS").unwrap_or(0);

    eprintln!("thaw bench: ceiling, {CEILING_CLIENTS} clients for {CEILING_SECONDS} s");
    let (ceiling, _, _) = rt.block_on(phase(&target, CEILING_CLIENTS, (0, &[]), CEILING_SECONDS));

    eprintln!(
        "thaw bench: load, {} clients and {} hostile for {} s",
        cfg.clients,
        cfg.hostile * cfg.hostile_kinds.len(),
        cfg.seconds
    );
    let sampler = RssSampler::start(pid);
    let (server_cpu, own_cpu) = (sys::proc_cpu(pid).unwrap_or_default(), sys::own_cpu());
    let (load, health, hostile) = rt.block_on(phase(
        &target,
        cfg.clients,
        (cfg.hostile, &cfg.hostile_kinds),
        cfg.seconds,
    ));
    let cpu = report::Cpu {
        server_seconds: (sys::proc_cpu(pid).unwrap_or_default() - server_cpu).as_secs_f64(),
        load_seconds: (sys::own_cpu() - own_cpu).as_secs_f64(),
        wall_seconds: load.seconds,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let peak_rss = sampler.stop();
    let memory = Memory::new(
        &setup,
        idle_rss,
        peak_rss,
        sys::proc_status_bytes(pid, "VmHWM").unwrap_or(0),
        sys::proc_status_bytes(pid, "VmRSS").unwrap_or(0),
    );
    let metric = |name: &str| server.metric(name) as u64;
    let counters = report::ServerCounters {
        connections_evicted: metric("thaw_connections_evicted_total"),
        connections_timed_out: metric("thaw_connections_timed_out_total"),
        stalled_responses_closed: metric("thaw_stalled_responses_closed_total"),
        connections_open_at_end: metric("thaw_connections_open"),
        hot_cache_bytes_at_end: metric("thaw_hot_cache_bytes"),
        request_body_bytes_at_end: metric("thaw_request_body_bytes"),
    };
    Ok(LoadReport::new(
        setup, ceiling, load, health, hostile, memory, cpu, counters, open_files,
    ))
}

/// One phase: `clients` good clients, `hostile.0` of each hostile kind in
/// `hostile.1` and the health prober, for `seconds`.
async fn phase(
    target: &Arc<Target>,
    clients: usize,
    hostile: (usize, &[Hostile]),
    seconds: f64,
) -> (Figures, HealthFigures, BTreeMap<Hostile, HostileTally>) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut attackers = JoinSet::new();
    for (k, &kind) in hostile.1.iter().enumerate() {
        for i in 0..hostile.0 {
            let seed = (k * 1_000_000 + i) as u64;
            let attacker = hostile::client(kind, target.clone(), seed, end);
            attackers.spawn(async move { (kind, attacker.await) });
        }
    }
    let prober = tokio::spawn(good::health_prober(target.addr, HEALTH_EVERY, end));
    let mut goods = JoinSet::new();
    for i in 0..clients {
        goods.spawn(good::client(target.clone(), i as u64, end));
    }
    let mut tally = good::Tally::default();
    let mut stuck = 0;
    let wind_down = end + WIND_DOWN;
    while !goods.is_empty() {
        match tokio::time::timeout_at(wind_down, goods.join_next()).await {
            Ok(Some(Ok(t))) => tally.merge(t),
            Ok(Some(Err(e))) => panic!("a load client panicked: {e}"),
            Ok(None) => break,
            Err(_) => {
                stuck = goods.len();
                goods.shutdown().await;
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let health = prober.await.expect("the prober does not panic");
    let mut by_kind: BTreeMap<Hostile, HostileTally> = BTreeMap::new();
    while let Some(joined) = attackers.join_next().await {
        let (kind, t) = joined.expect("a hostile client does not panic");
        by_kind.entry(kind).or_default().merge(t);
    }
    let figures = Figures::new(clients, wall, tally, stuck);
    (figures, HealthFigures::new(health), by_kind)
}

impl Target {
    /// The chunks of `server`'s store (from its directory), shuffled, the
    /// first fifth hot; and the tag the image was pushed under.
    fn new(server: &Server, manifest: &str) -> Result<Target> {
        let mut chunks = Vec::new();
        for fan in std::fs::read_dir(server.store.join("chunks"))? {
            for file in std::fs::read_dir(fan?.path())? {
                let file = file?;
                let hex = file.file_name().to_string_lossy().into_owned();
                chunks.push(Chunk {
                    path: format!("/v1/chunks/blake3:{hex}"),
                    id: format!("blake3:{hex}"),
                    frame_len: file.metadata()?.len(),
                });
            }
        }
        if chunks.len() < 10 {
            bail!("the store holds only {} chunks", chunks.len());
        }
        chunks.sort_by(|a, b| a.id.cmp(&b.id));
        let mut rng = Rng::new(0x10AD);
        for i in (1..chunks.len()).rev() {
            chunks.swap(i, rng.below(i + 1));
        }
        let (name, tag) = TAG.split_once(':').expect("NAME:TAG");
        Ok(Target {
            addr: server.addr().parse()?,
            hot: chunks.len() / 5,
            chunks,
            tag_path: format!("/v1/tags/{name}/{tag}"),
            tag_len: manifest.len() as u64,
        })
    }
}

/// Writes the image the suite serves (once; later runs reuse it): 160 files
/// of 1 MiB and 128 of 256 KiB of noise, and 24 MiB of a Python
/// environment (small modules packed together, compressible libraries).
fn generate(dir: &Path) -> Result<PathBuf> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir.join("image"));
    }
    let image = dir.join("image");
    let _ = std::fs::remove_dir_all(&image);
    eprintln!("thaw bench: generating the load image");
    let write = |rel: PathBuf, data: &[u8]| -> Result<()> {
        let path = image.join(rel);
        std::fs::create_dir_all(path.parent().expect("a file has a parent"))?;
        std::fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))
    };
    for i in 0..160u64 {
        write(format!("weights/{i:03}.bin").into(), &noise(i, 1 << 20))?;
    }
    for i in 0..128u64 {
        write(
            format!("blobs/{i:03}.bin").into(),
            &noise(1000 + i, 256 << 10),
        )?;
    }
    let mut bytes = 0;
    for file in PythonEnv::new(0x10AD) {
        if bytes >= 24 << 20 {
            break;
        }
        bytes += file.data.len();
        write(file.path, &file.data)?;
    }
    std::fs::write(&done, b"")?;
    Ok(image)
}

/// Samples a process's VmRSS every 50 ms on a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(Ordering::Relaxed) {
                peak = peak.max(sys::proc_status_bytes(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; returns the largest VmRSS seen.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler does not panic")
    }
}
