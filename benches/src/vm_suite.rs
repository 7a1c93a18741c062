//! The VM suite: restoring a QEMU memory snapshot from a thaw mount, per
//! chunk size of the memory image, beside a restore from the snapshot on
//! local disk and one from a full copy (the snapshot pulled whole with
//! `thaw export`, then restored from local disk).
//!
//! A template guest (TCG; 512 MiB by default, `--vm-memory`) fills 64 MiB
//! of its memory (`--vm-weights`) with random "weights",
//! starts a small agent on its serial port and is snapshotted once
//! (`thaw-vmm`); the snapshot is pushed with fixed chunks of 256 KiB,
//! 512 KiB, 1 MiB and 2 MiB (`--vm-chunk-sizes`). Each is restored with an
//! empty cache (a real `thaw mount`, no readahead), the first size also warm
//! (its disk cache), from a full copy and by a claim from a pool; then the agent answers a ping and hashes its weights,
//! touching every page of them. Reported: the time to the first answer, the
//! time of that pass over the working set, and what was fetched. A page
//! fault wants small chunks, throughput large ones; this says where the
//! balance is. With `--link`, pulls and mounts go through the link emulator.

use crate::link::{self, Link};
use crate::thaw::{self, EmbeddedServer, MountFlags, ThawBin};
use anyhow::{bail, Result};
use serde::Serialize;
use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thaw_testkit::guest::console::{Console, Waited};
use thaw_testkit::guest::initramfs::Initramfs;
use thaw_testkit::guest::{GuestConfig, GuestKit};
use thaw_vmm::{qemu, VmSpec};

const WAIT: Duration = Duration::from_secs(600);

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct VmSuiteConfig {
    pub thaw_bin: PathBuf,
    pub work_dir: PathBuf,
    /// The guest's memory.
    pub memory_mib: u32,
    /// What its agent fills with random bytes and touches after a restore.
    pub weights_mib: u32,
    /// Chunk sizes of the memory image to restore from, in KiB.
    pub chunk_kib: Vec<u32>,
    /// Pulls and mounts through this link.
    pub link: Option<Link>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreResult {
    /// Where the memory came from.
    pub source: String,
    /// From the restore's start (mount, QEMU, state; or the claim) to the
    /// VM running, in ms.
    pub resumed_ms: f64,
    /// From the restore's start to the guest's agent answering its first
    /// command, in ms.
    pub first_answer_ms: f64,
    /// The guest hashing its working set after that, in s.
    pub touch_s: f64,
    pub chunks_fetched: Option<u64>,
    pub chunk_bytes_fetched: Option<u64>,
    /// Bytes stored for the snapshot (zero chunks and holes are not).
    pub stored_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub link: String,
    pub memory_mib: u32,
    pub working_set_mib: u32,
    pub snapshot_s: f64,
    pub results: Vec<RestoreResult>,
}

/// The template's agent: makes the working set, then answers `ping` and,
/// for `touch`, hashes the working set (every page of it).
const SCRIPT: &str = r#"
dd if=/dev/urandom of=/tmp/weights bs=1M count=WEIGHTS_MIB 2>/dev/null
echo "ready $(md5sum < /tmp/weights | cut -c1-32)"
while read cmd; do
  case "$cmd" in
    ping) echo pong ;;
    touch) time -f 'touched %e' sh -c 'echo "hash $(md5sum < /tmp/weights | cut -c1-32)"' 2>&1 ;;
  esac
done
"#;

fn console(dir: &Path) -> Result<Console> {
    let path = qemu::console_socket(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => return Ok(Console::start(s)?),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn line(c: &mut Console, prefix: &str) -> Result<String> {
    match c.wait_line(WAIT, |l| l.starts_with(prefix)) {
        Waited::Line(_, l) => Ok(l),
        other => bail!("no {prefix:?} from the guest ({other:?}):\n{}", c.tail(20)),
    }
}

/// What one restore took.
struct Measured {
    /// From `started` to the VM running (when [`agent`] is called).
    resumed_ms: f64,
    /// From `started` to the agent's first answer.
    first_ms: f64,
    /// The guest's pass over its working set.
    touch_s: f64,
}

/// Asks the resumed guest in `dir` for its first answer, then to touch its
/// working set; checks the hash. Called as soon as the VM runs.
fn agent(dir: &Path, started: Instant, expected: &str) -> Result<Measured> {
    let resumed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut c = console(dir)?;
    c.write_line("ping")?;
    line(&mut c, "pong")?;
    let first = started.elapsed().as_secs_f64() * 1000.0;
    c.write_line("touch")?;
    let hash = line(&mut c, "hash ")?;
    let touched = line(&mut c, "touched ")?;
    if hash.trim_start_matches("hash ") != expected {
        bail!("the restored guest's memory differs: {hash} (expected {expected})");
    }
    let touch_s = touched.trim_start_matches("touched ").trim().parse()?;
    Ok(Measured {
        resumed_ms,
        first_ms: first,
        touch_s,
    })
}

/// Runs the suite; progress goes to stderr.
pub fn run(cfg: &VmSuiteConfig) -> Result<VmReport> {
    let kit = GuestKit::find().map_err(|why| anyhow::anyhow!("cannot boot guests: {why}"))?;
    let work = cfg.work_dir.join("vm");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initrd");
    std::fs::write(
        &initrd,
        Initramfs::for_guest(
            &kit,
            &GuestConfig::new(&SCRIPT.replace("WEIGHTS_MIB", &cfg.weights_mib.to_string())),
        )?
        .to_cpio(),
    )?;

    eprintln!("booting the template");
    let template = work.join("template");
    let spec = VmSpec::qemu(
        "tcg",
        cfg.memory_mib,
        1,
        "console=ttyS0 quiet panic=-1",
        true,
    );
    qemu::run(&template, &kit.kernel, Some(&initrd), &spec)?;
    let mut c = console(&template)?;
    let expected = line(&mut c, "ready ")?
        .trim_start_matches("ready ")
        .trim()
        .to_string();
    let snapshot_s = qemu::snapshot(&template)?.as_secs_f64();
    drop(c);
    let image = qemu::image_dir(&template);

    let mut results = Vec::new();
    let mut row =
        |source: String, m: Measured, stats: Option<&thaw::StatsReport>, stored: Option<u64>| {
            results.push(RestoreResult {
                source,
                resumed_ms: m.resumed_ms,
                first_answer_ms: m.first_ms,
                touch_s: m.touch_s,
                chunks_fetched: stats.map(|s| s.chunks_fetched),
                chunk_bytes_fetched: stats.map(|s| s.chunk_bytes_fetched),
                stored_bytes: stored,
            })
        };

    eprintln!("restoring from local disk");
    let local = work.join("local");
    let t = Instant::now();
    qemu::restore(&local, &image, false)?;
    let measured = agent(&local, t, &expected);
    let _ = qemu::quit(&local);
    row("local snapshot directory".into(), measured?, None, None);

    let rt = tokio::runtime::Runtime::new()?;
    let thaw_bin = ThawBin(cfg.thaw_bin.clone());
    // Page faults are not sequential reads: restores mount without readahead.
    let flags = MountFlags {
        readahead: Some(0),
        kernel_readahead: Some(128 << 10),
        ..MountFlags::default()
    };
    for (i, &kib) in cfg.chunk_kib.iter().enumerate() {
        let server = EmbeddedServer::start(&rt, &work.join(format!("store{kib}")))?;
        let pushed = thaw::push_chunked(
            &rt,
            &image,
            &server.reference(&format!("vm:{kib}k")),
            kib << 10,
        )?;
        // Pulls and mounts reach the server through the link, if any.
        let pull_addr = rt.block_on(link::through(cfg.link, server.addr))?;
        let reference = format!("{pull_addr}/vm:{kib}k");
        if i == 0 {
            eprintln!("restoring from a full copy, {kib} KiB chunks");
            let copy = work.join("full-copy");
            let local = work.join("full");
            let t = Instant::now();
            thaw::export(&rt, &reference, &qemu::image_dir(&copy))?;
            let measured = qemu::restore(&local, &qemu::image_dir(&copy), false)
                .map_err(anyhow::Error::from)
                .and_then(|_| agent(&local, t, &expected));
            let _ = qemu::quit(&local);
            let measured = measured?;
            row(
                format!("full copy (thaw export, then local), {kib} KiB chunks"),
                measured,
                None,
                Some(pushed.bytes_uploaded),
            );
        }
        let cache = work.join(format!("cache{kib}"));
        // The first size: cold while recording the restore's profile, warm
        // (its disk cache), then cold again with a fresh cache, the profile
        // streamed. The others: cold, without a profile.
        let off = MountFlags {
            profile: Some("off"),
            ..flags.clone()
        };
        let passes = if i == 0 {
            let record = MountFlags {
                record: true,
                ..flags.clone()
            };
            let profiled = work.join(format!("cache{kib}-profiled"));
            vec![
                ("cold", cache.clone(), record),
                ("warm", cache, off),
                ("cold with a profile", profiled, flags.clone()),
            ]
        } else {
            vec![("cold", cache, off)]
        };
        for (pass, (label, cache, flags)) in passes.into_iter().enumerate() {
            eprintln!("restoring from thaw, {kib} KiB chunks, {label}");
            let dir = work.join(format!("restore{kib}-{pass}"));
            let mp = qemu::image_dir(&dir);
            let t = Instant::now();
            thaw_bin.mount(&reference, &mp, &cache, flags)?;
            let measured = qemu::restore(&dir, &mp, false)
                .map_err(anyhow::Error::from)
                .and_then(|_| agent(&dir, t, &expected));
            let stats = thaw::mount_stats(&mp);
            let _ = qemu::quit(&dir);
            thaw_bin.umount(&mp);
            let measured = measured?;
            let stats = stats?;
            row(
                format!("thaw {label}, {kib} KiB chunks"),
                measured,
                Some(&stats),
                Some(pushed.bytes_uploaded),
            );
        }
        if i == 0 {
            eprintln!("claiming from a pool of 2");
            let pool = work.join("pool");
            let mut child = std::process::Command::new(&cfg.thaw_bin)
                .args(["vm", "pool", &reference])
                .arg(&pool)
                .args(["--size", "2", "--cache-dir"])
                .arg(work.join("cache-pool"))
                .stderr(std::process::Stdio::null())
                .spawn()?;
            // Let the pool fill (two restores under emulation) before the
            // claim is timed.
            std::thread::sleep(Duration::from_secs(15));
            let t = Instant::now();
            let claimed = thaw_vmm::pool::claim(&pool);
            let measured = claimed
                .map_err(anyhow::Error::from)
                .and_then(|c| agent(&c.dir, t, &expected).map(|m| (c.dir, m)));
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            let (dir, measured) = measured?;
            let _ = qemu::quit(&dir);
            thaw_bin.umount(&qemu::image_dir(&pool));
            row(
                format!("pool claim, {kib} KiB chunks"),
                measured,
                None,
                None,
            );
        }
        server.stop(&rt)?;
    }
    let _ = qemu::quit(&template);
    Ok(VmReport {
        link: link::describe(cfg.link),
        memory_mib: cfg.memory_mib,
        working_set_mib: cfg.weights_mib,
        snapshot_s,
        results,
    })
}

impl fmt::Display for VmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "QEMU (TCG) memory snapshot restore ({}): {} MiB guest, {} MiB working set touched after resume; snapshot {:.2} s",
            self.link, self.memory_mib, self.working_set_mib, self.snapshot_s
        )?;
        writeln!(
            f,
            "{:<52} {:>10} {:>15} {:>9} {:>8} {:>13} {:>10}",
            "source",
            "resumed ms",
            "first answer ms",
            "touch s",
            "chunks",
            "fetched MiB",
            "stored MiB"
        )?;
        let mib = |b: Option<u64>| {
            b.map_or("-".into(), |b| {
                format!("{:.1}", b as f64 / (1 << 20) as f64)
            })
        };
        for r in &self.results {
            writeln!(
                f,
                "{:<52} {:>10.0} {:>15.0} {:>9.2} {:>8} {:>13} {:>10}",
                r.source,
                r.resumed_ms,
                r.first_answer_ms,
                r.touch_s,
                r.chunks_fetched.map_or("-".into(), |c| c.to_string()),
                mib(r.chunk_bytes_fetched),
                mib(r.stored_bytes)
            )?;
        }
        Ok(())
    }
}
