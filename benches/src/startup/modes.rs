//! thaw's own modes, one sample at a time, and the runs of all modes of one
//! workload with their ratios to the full pull and to local. "lazy profiled"
//! streams the image's profile recorded once, on a cold mount, before the
//! runs (`--profile server`); "lazy cold" streams none (`--profile off`), as
//! a first start would; "lazy warm" streams the local profile the cold run
//! left in the disk cache (`--profile local`), as a second start on the same
//! host would when the image has no profile on the server.

use super::{ModeResult, Sample, Target};
use crate::thaw::{self, MountFlags, StatsReport};
use crate::{peers, sys};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FullPull,
    LazyCold,
    LazyProfiled,
    LazyWarm,
    Local,
}

/// In this order: "lazy warm" mounts over the cache "lazy cold" left.
const MODES: [Mode; 5] = [
    Mode::FullPull,
    Mode::LazyCold,
    Mode::LazyWarm,
    Mode::LazyProfiled,
    Mode::Local,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FullPull => "full pull",
            Mode::LazyCold => "lazy cold",
            Mode::LazyProfiled => "lazy profiled",
            Mode::LazyWarm => "lazy warm",
            Mode::Local => "local",
        }
    }

    /// One cold start in this mode, the page cache dropped first.
    fn sample(self, t: &Target, rt: &Runtime, work: &Path) -> Result<Sample> {
        match self {
            Mode::FullPull => full_pull(t, rt, work),
            Mode::LazyCold => lazy(t, work, Lazy::Cold),
            Mode::LazyProfiled => lazy(t, work, Lazy::Profiled),
            Mode::LazyWarm => lazy(t, work, Lazy::Warm),
            Mode::Local => {
                sys::drop_caches();
                let s = Instant::now();
                t.startup.run(&t.local)?;
                Ok(Sample::new(s, 0))
            }
        }
    }
}

fn full_pull(t: &Target, rt: &Runtime, work: &Path) -> Result<Sample> {
    let dest = work.join("pulled");
    let _ = std::fs::remove_dir_all(&dest);
    sys::drop_caches();
    let s = Instant::now();
    let report = thaw::export(rt, &t.pull_ref, &dest)?;
    t.startup.run(&dest)?;
    let sample = Sample::new(s, report.bytes_fetched);
    let _ = std::fs::remove_dir_all(&dest);
    Ok(sample)
}

/// How a lazy mode mounts: empty caches with or without the image's profile,
/// or over the disk cache the last cold run left (with its local profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lazy {
    Cold,
    Profiled,
    Warm,
}

fn lazy(t: &Target, work: &Path, how: Lazy) -> Result<Sample> {
    let (mp, cache) = (work.join("mnt"), work.join("cache"));
    if how != Lazy::Warm {
        let _ = std::fs::remove_dir_all(&cache);
    }
    let mode = match how {
        Lazy::Cold => Mode::LazyCold,
        Lazy::Profiled => Mode::LazyProfiled,
        Lazy::Warm => Mode::LazyWarm,
    };
    let flags = MountFlags {
        profile: Some(match how {
            Lazy::Cold => "off",
            Lazy::Profiled => "server",
            Lazy::Warm => "local",
        }),
        // Each run writes over the last: the last run's timeline stays.
        timeline: t
            .timelines
            .as_ref()
            .map(|dir| dir.join(format!("timeline-{}.json", mode.name().replace(' ', "-")))),
        ..MountFlags::default()
    };
    sys::drop_caches();
    let s = Instant::now();
    t.thaw.mount(&t.pull_ref, &mp, &cache, flags)?;
    let result = t.startup.run(&mp);
    let seconds = s.elapsed().as_secs_f64();
    let fetched = thaw::mount_stats(&mp).map_or(0, |s| s.bytes_fetched);
    t.thaw.umount(&mp);
    result?;
    Ok(Sample {
        seconds,
        bytes_fetched: fetched,
    })
}

/// Records the start's profile on a cold mount (`thaw mount --record`,
/// saved when it unmounts), for "lazy profiled" to stream; returns the
/// recording mount's counters (what the start read).
pub(super) fn record_profile(t: &Target, work: &Path) -> Result<StatsReport> {
    let (mp, cache) = (work.join("mnt"), work.join("record-cache"));
    let _ = std::fs::remove_dir_all(&cache);
    let flags = MountFlags {
        record: true,
        profile: Some("off"),
        ..MountFlags::default()
    };
    sys::drop_caches();
    t.thaw.mount(&t.pull_ref, &mp, &cache, flags)?;
    let result = t.startup.run(&mp);
    let stats = thaw::mount_stats(&mp);
    t.thaw.umount(&mp);
    let _ = std::fs::remove_dir_all(&cache);
    result?;
    stats
}

/// Every mode `runs` times (interleaved, so drift hits all alike), then the
/// peers, then each mode's ratios. Without a recorded profile (`profiled`
/// false), "lazy profiled" is skipped.
pub(super) fn run_all(
    t: &Target,
    rt: &Runtime,
    work: &Path,
    runs: usize,
    peers: super::Peers,
    profiled: Result<(), String>,
) -> Result<Vec<ModeResult>> {
    let skip = |m: &Mode| *m == Mode::LazyProfiled && profiled.is_err();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); MODES.len()];
    for i in 0..runs {
        eprintln!("  run {}/{runs}", i + 1);
        for (mode, samples) in MODES.iter().zip(&mut samples) {
            if !skip(mode) {
                samples.push(mode.sample(t, rt, work).context(mode.name())?);
            }
        }
    }
    let mut modes: Vec<ModeResult> = MODES
        .iter()
        .zip(samples)
        .map(|(m, s)| match (&profiled, skip(m)) {
            (Err(why), true) => ModeResult::skipped(m.name(), why),
            _ => ModeResult::from_samples(m.name(), s),
        })
        .collect();
    if peers.casync {
        modes.push(peers::casync(t, rt, work, runs).context("casync")?);
    }
    if peers.nydus {
        modes.push(peers::nydus(t, rt, work, runs).context("nydus")?);
    }
    let seconds_of = |name: &str| {
        let m = modes.iter().find(|m| m.mode == name);
        m.map_or(0.0, |m| m.median_seconds)
    };
    let (full, local) = (
        seconds_of(Mode::FullPull.name()),
        seconds_of(Mode::Local.name()),
    );
    for m in modes.iter_mut().filter(|m| m.skipped.is_none()) {
        m.vs_full_pull = m.median_seconds / full;
        m.vs_local = m.median_seconds / local;
    }
    Ok(modes)
}
