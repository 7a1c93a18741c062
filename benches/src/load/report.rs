//! The load suite's results: what `--json` prints and `load.json` holds, and
//! the table a reader sees.

use super::good::{Health, Kind, Tally};
use super::{Hostile, HostileTally, LoadConfig};
use anyhow::Result;
use indicatif::HumanBytes;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// How the measured server was configured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerSetup {
    pub cache_mem: u64,
    pub body_memory: u64,
    pub response_memory: u64,
    pub max_connections: usize,
    /// The rest are `thaw serve`'s defaults.
    pub max_concurrency: usize,
    pub max_uploads: usize,
    pub header_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub body_timeout_secs: u64,
}

impl ServerSetup {
    pub(super) fn new(cfg: &LoadConfig) -> ServerSetup {
        let defaults = thaw_server::ServerConfig::default();
        ServerSetup {
            cache_mem: cfg.cache_mem,
            body_memory: cfg.body_memory,
            response_memory: cfg.response_memory,
            max_connections: cfg.max_connections,
            max_concurrency: defaults.max_concurrency,
            max_uploads: defaults.max_uploads,
            header_timeout_secs: defaults.header_timeout.as_secs(),
            idle_timeout_secs: defaults.idle_timeout.as_secs(),
            body_timeout_secs: defaults.body_timeout.as_secs(),
        }
    }

    /// The `thaw serve` flags that set it up.
    pub(super) fn flags(&self) -> Vec<String> {
        vec![
            "--cache-mem".into(),
            self.cache_mem.to_string(),
            "--body-memory".into(),
            self.body_memory.to_string(),
            "--response-memory".into(),
            self.response_memory.to_string(),
            "--max-connections".into(),
            self.max_connections.to_string(),
        ]
    }

    /// What the server may hold by configuration: its hot cache, its body
    /// memory and its response memory.
    pub fn budget(&self) -> u64 {
        self.cache_mem + self.body_memory + self.response_memory
    }
}

/// Percentile `q` (0 to 1) of sorted microseconds, in ms.
fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    match sorted_us.len() {
        0 => 0.0,
        n => sorted_us[((n - 1) as f64 * q).round() as usize] as f64 / 1000.0,
    }
}

/// The good requests of one kind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindFigures {
    pub kind: &'static str,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The good requests of one phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub clients: usize,
    /// From the start until the last client finished its last request.
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub by_kind: Vec<KindFigures>,
    pub errors: u64,
    /// Error messages and their counts (the first few kinds).
    pub error_samples: BTreeMap<String, u64>,
    /// Clients still waiting for an answer long after the end.
    pub stuck_clients: usize,
}

impl Figures {
    pub(super) fn new(clients: usize, seconds: f64, mut tally: Tally, stuck: usize) -> Figures {
        let mut all: Vec<u32> = tally.latencies_us.iter().flatten().copied().collect();
        all.sort_unstable();
        let by_kind = Kind::ALL
            .iter()
            .zip(tally.latencies_us.iter_mut())
            .map(|(kind, lat)| {
                lat.sort_unstable();
                KindFigures {
                    kind: kind.name(),
                    requests: lat.len() as u64,
                    p50_ms: percentile_ms(lat, 0.5),
                    p99_ms: percentile_ms(lat, 0.99),
                }
            })
            .collect();
        Figures {
            clients,
            seconds,
            requests: all.len() as u64,
            requests_per_sec: all.len() as f64 / seconds,
            bytes_per_sec: tally.bytes as f64 / seconds,
            p50_ms: percentile_ms(&all, 0.5),
            p99_ms: percentile_ms(&all, 0.99),
            max_ms: percentile_ms(&all, 1.0),
            by_kind,
            errors: tally.errors,
            error_samples: tally.error_samples,
            stuck_clients: stuck,
        }
    }
}

/// The health probes of the load phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthFigures {
    pub probes: usize,
    pub failures: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first few failures.
    pub failure_samples: Vec<String>,
}

impl HealthFigures {
    pub(super) fn new(mut health: Health) -> HealthFigures {
        health.latencies_us.sort_unstable();
        let lat = &health.latencies_us;
        HealthFigures {
            probes: lat.len() + health.failures.len(),
            failures: health.failures.len(),
            p50_ms: percentile_ms(lat, 0.5),
            p99_ms: percentile_ms(lat, 0.99),
            max_ms: percentile_ms(lat, 1.0),
            failure_samples: health.failures.into_iter().take(5).collect(),
        }
    }
}

/// The server's memory against what it is configured to hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Memory {
    /// Hot cache plus body memory.
    pub budget_bytes: u64,
    /// After the push, before any load.
    pub idle_rss_bytes: u64,
    /// The largest VmRSS sampled (every 50 ms) during the load.
    pub peak_rss_bytes: u64,
    /// VmHWM at the end: the largest RSS of the process's life, push included.
    pub hwm_bytes: u64,
    pub end_rss_bytes: u64,
    /// VmHWM less the budget: what the server held beyond its caches.
    pub hwm_over_budget_bytes: i64,
}

impl Memory {
    pub(super) fn new(setup: &ServerSetup, idle: u64, peak: u64, hwm: u64, end: u64) -> Memory {
        Memory {
            budget_bytes: setup.budget(),
            idle_rss_bytes: idle,
            peak_rss_bytes: peak,
            hwm_bytes: hwm,
            end_rss_bytes: end,
            hwm_over_budget_bytes: hwm as i64 - setup.budget() as i64,
        }
    }
}

/// CPU time each side used during the load phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cpu {
    pub server_seconds: f64,
    /// The load generator (this process): good and hostile clients.
    pub load_seconds: f64,
    pub wall_seconds: f64,
    pub cores: usize,
}

/// The server's own counters at the end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerCounters {
    pub connections_evicted: u64,
    pub connections_timed_out: u64,
    /// Connections closed because they stopped reading while others waited
    /// for response memory.
    pub stalled_responses_closed: u64,
    pub connections_open_at_end: u64,
    pub hot_cache_bytes_at_end: u64,
    pub request_body_bytes_at_end: u64,
}

/// The whole suite's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub server: ServerSetup,
    /// A few clients, nothing hostile: the most this server answers here.
    pub ceiling: Figures,
    pub load: Figures,
    /// Requests per second under load as a fraction of the ceiling.
    pub load_vs_ceiling: f64,
    pub health: HealthFigures,
    pub hostile: BTreeMap<Hostile, HostileTally>,
    pub memory: Memory,
    pub cpu: Cpu,
    pub counters: ServerCounters,
    pub open_files_limit: u64,
}

impl LoadReport {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        server: ServerSetup,
        ceiling: Figures,
        load: Figures,
        health: HealthFigures,
        hostile: BTreeMap<Hostile, HostileTally>,
        memory: Memory,
        cpu: Cpu,
        counters: ServerCounters,
        open_files_limit: u64,
    ) -> LoadReport {
        LoadReport {
            load_vs_ceiling: load.requests_per_sec
                / ceiling.requests_per_sec.max(f64::MIN_POSITIVE),
            server,
            ceiling,
            load,
            health,
            hostile,
            memory,
            cpu,
            counters,
            open_files_limit,
        }
    }

    /// Writes `load.json` into `out`; returns its path.
    pub fn write_files(&self, out: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(out)?;
        let path = out.join("load.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

fn mib(bytes: u64) -> String {
    HumanBytes(bytes).to_string()
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        writeln!(f, "\nthaw bench --suite load (loopback)")?;
        writeln!(
            f,
            "server: hot cache {}, body memory {}, response memory {}, {} connections, {} reads and {} uploads at once; timeouts: header {} s, idle {} s, body {} s",
            mib(s.cache_mem),
            mib(s.body_memory),
            mib(s.response_memory),
            s.max_connections,
            s.max_concurrency,
            s.max_uploads,
            s.header_timeout_secs,
            s.idle_timeout_secs,
            s.body_timeout_secs
        )?;
        writeln!(
            f,
            "\n{:<28} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8}",
            "good clients", "clients", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
        )?;
        for (name, p) in [
            ("ceiling (nothing hostile)", &self.ceiling),
            ("under load", &self.load),
        ] {
            writeln!(
                f,
                "{:<28} {:>8} {:>9} {:>10.0} {:>9.2} {:>9.2} {:>9.1} {:>8}",
                name,
                p.clients,
                p.requests,
                p.requests_per_sec,
                p.p50_ms,
                p.p99_ms,
                p.max_ms,
                p.errors
            )?;
        }
        for k in &self.load.by_kind {
            writeln!(
                f,
                "  {:<26} {:>8} {:>9} {:>10} {:>9.2} {:>9.2}",
                k.kind, "", k.requests, "", k.p50_ms, k.p99_ms
            )?;
        }
        writeln!(
            f,
            "under load: {:.0}% of the ceiling's requests per second, {}/s of chunk data",
            self.load_vs_ceiling * 100.0,
            mib(self.load.bytes_per_sec as u64)
        )?;
        for (what, n) in &self.load.error_samples {
            writeln!(f, "  error x{n}: {what}")?;
        }
        if self.load.stuck_clients > 0 {
            writeln!(
                f,
                "  {} clients never got their last answer",
                self.load.stuck_clients
            )?;
        }
        let h = &self.health;
        writeln!(
            f,
            "\nhealth checks (fresh connection every 100 ms): {} of {} answered, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            h.probes - h.failures,
            h.probes,
            h.p50_ms,
            h.p99_ms,
            h.max_ms
        )?;
        for failure in &h.failure_samples {
            writeln!(f, "  failed: {failure}")?;
        }
        writeln!(
            f,
            "\n{:<14} {:>7} {:>11} {:>8}  answers  what",
            "hostile", "clients", "connections", "cut off"
        )?;
        for (kind, t) in &self.hostile {
            let answers: Vec<String> = t.answers.iter().map(|(s, n)| format!("{s} x{n}")).collect();
            let answers = if answers.is_empty() {
                "-".to_owned()
            } else {
                answers.join(", ")
            };
            writeln!(
                f,
                "{:<14} {:>7} {:>11} {:>8}  {answers}  ({})",
                kind.name(),
                t.clients,
                t.connections,
                t.cut_off,
                kind.describe()
            )?;
        }
        let m = &self.memory;
        writeln!(
            f,
            "\nserver memory: budget {} (hot cache + body memory + response memory); RSS idle {}, peak sampled {}, high-water {} ({}{} against the budget), at the end {}",
            mib(m.budget_bytes),
            mib(m.idle_rss_bytes),
            mib(m.peak_rss_bytes),
            mib(m.hwm_bytes),
            if m.hwm_over_budget_bytes < 0 { "-" } else { "+" },
            mib(m.hwm_over_budget_bytes.unsigned_abs()),
            mib(m.end_rss_bytes)
        )?;
        let c = &self.counters;
        writeln!(
            f,
            "server counters: {} connections evicted at the cap, {} timed out, {} closed for stalling while others waited for response memory; {} open at the end",
            c.connections_evicted,
            c.connections_timed_out,
            c.stalled_responses_closed,
            c.connections_open_at_end
        )?;
        let cpu = &self.cpu;
        let machine = cpu.wall_seconds * cpu.cores as f64;
        writeln!(
            f,
            "CPU over {:.1} s on {} cores: server {:.1} s ({:.0}% of the machine), load generator {:.1} s ({:.0}%).\nThe load runs on the same machine as the server and competes with it for these cores.",
            cpu.wall_seconds,
            cpu.cores,
            cpu.server_seconds,
            cpu.server_seconds / machine * 100.0,
            cpu.load_seconds,
            cpu.load_seconds / machine * 100.0
        )
    }
}
