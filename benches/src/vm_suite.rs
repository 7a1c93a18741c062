//! The VM suite: restoring a QEMU memory snapshot from a thaw mount, per
//! chunk size of the memory image, beside a restore from the snapshot on
//! local disk.
//!
//! A template guest (TCG) fills 64 MiB of its memory with random "weights"
//! and is snapshotted once (`thaw-vmm`); the snapshot is pushed with fixed
//! chunks of 256 KiB, 512 KiB, 1 MiB and 2 MiB. Each is restored with an
//! empty cache (a real `thaw mount`), and the guest then hashes its weights,
//! touching every page of them: the time to restore, the time to that first
//! full pass over the working set, and what was fetched. A page fault wants
//! small chunks, throughput large ones; this says where the balance is.

use crate::thaw::{self, EmbeddedServer, MountFlags, ThawBin};
use anyhow::{bail, Context, Result};
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
const MEMORY_MIB: u32 = 512;
const WEIGHTS_MIB: u32 = 64;

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct VmSuiteConfig {
    pub thaw_bin: PathBuf,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreResult {
    /// `local` (the snapshot directory) or the chunk size, in KiB.
    pub source: String,
    /// Mount (thaw only), QEMU start and device state load, in ms.
    pub restore_ms: f64,
    /// The guest hashing its 64 MiB working set after the restore, in s.
    pub touch_s: f64,
    pub chunks_fetched: Option<u64>,
    pub chunk_bytes_fetched: Option<u64>,
    /// Bytes stored for the snapshot (zero chunks and holes are not).
    pub stored_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub memory_mib: u32,
    pub working_set_mib: u32,
    pub snapshot_s: f64,
    pub results: Vec<RestoreResult>,
}

/// The template: make the working set, say so, wait; after the restore,
/// touch all of it.
const SCRIPT: &str = r#"
dd if=/dev/urandom of=/tmp/weights bs=1M count=64 2>/dev/null
echo "ready $(md5sum < /tmp/weights)"
read go
time -f 'touch %e' sh -c 'md5sum < /tmp/weights' 2>&1 | sed 's/  -$//; s/^/after /'
"#;

fn console(dir: &Path) -> Result<Console> {
    let path = qemu::console_socket(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(&path) {
            Ok(s) => return Ok(Console::start(s)?),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn line(c: &mut Console, prefix: &str) -> Result<String> {
    match c.wait_line(WAIT, |l| l.starts_with(prefix)) {
        Waited::Line(_, l) => Ok(l),
        other => bail!("no {prefix:?} from the guest ({other:?}):\n{}", c.tail(20)),
    }
}

/// Resumes a restored guest, lets it touch its working set, checks it.
fn touch(dir: &Path, expected: &str) -> Result<f64> {
    let mut c = console(dir)?;
    c.write_line("go")?;
    let after = line(&mut c, "after ")?;
    let touch = line(&mut c, "after touch ")?;
    if after.trim_start_matches("after ").trim() != expected {
        bail!("the restored guest's memory differs: {after} (expected {expected})");
    }
    touch
        .trim_start_matches("after touch ")
        .trim()
        .parse()
        .context("the guest's time")
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
        Initramfs::for_guest(&kit, &GuestConfig::new(SCRIPT))?.to_cpio(),
    )?;

    eprintln!("booting the template");
    let template = work.join("template");
    let spec = VmSpec::qemu("tcg", MEMORY_MIB, 1, "console=ttyS0 quiet panic=-1", true);
    qemu::run(&template, &kit.kernel, Some(&initrd), &spec)?;
    let mut c = console(&template)?;
    let ready = line(&mut c, "ready ")?;
    let expected = ready
        .trim_start_matches("ready ")
        .trim_end_matches(" -")
        .trim()
        .to_string();
    let snapshot_s = qemu::snapshot(&template)?.as_secs_f64();
    drop(c);
    let image = qemu::image_dir(&template);

    let mut results = Vec::new();
    eprintln!("restoring from local disk");
    let local = work.join("local");
    let t = Instant::now();
    qemu::restore(&local, &image, false)?;
    let restore_ms = t.elapsed().as_secs_f64() * 1000.0;
    let touch_s = touch(&local, &expected);
    let _ = qemu::quit(&local);
    results.push(RestoreResult {
        source: "local".into(),
        restore_ms,
        touch_s: touch_s?,
        chunks_fetched: None,
        chunk_bytes_fetched: None,
        stored_bytes: None,
    });

    let rt = tokio::runtime::Runtime::new()?;
    let thaw_bin = ThawBin(cfg.thaw_bin.clone());
    // Each chunk size with the mount's defaults (thaw readahead on
    // sequential reads, 1 MiB kernel readahead), and 256 KiB without
    // readahead: page faults are not sequential reads.
    let quiet = MountFlags {
        readahead: Some(0),
        kernel_readahead: Some(128 << 10),
    };
    let runs = [
        (256u32, MountFlags::default(), ""),
        (512, MountFlags::default(), ""),
        (1024, MountFlags::default(), ""),
        (2048, MountFlags::default(), ""),
        (256, quiet, ", no readahead"),
    ];
    for (i, (kib, flags, label)) in runs.into_iter().enumerate() {
        let server = EmbeddedServer::start(&rt, &work.join(format!("store{i}")))?;
        let reference = server.reference(&format!("vm:{kib}k"));
        let pushed = thaw::push_chunked(&rt, &image, &reference, kib << 10)?;
        eprintln!("restoring from thaw, {kib} KiB chunks{label}");
        let dir = work.join(format!("restore{i}"));
        let mp = qemu::image_dir(&dir);
        let t = Instant::now();
        thaw_bin.mount(&reference, &mp, &work.join(format!("cache{i}")), flags)?;
        let restored = qemu::restore(&dir, &mp, false);
        let restore_ms = t.elapsed().as_secs_f64() * 1000.0;
        let touched = restored
            .map_err(anyhow::Error::from)
            .and_then(|_| touch(&dir, &expected));
        let stats = thaw::mount_stats(&mp);
        let _ = qemu::quit(&dir);
        thaw_bin.umount(&mp);
        let stats = stats?;
        results.push(RestoreResult {
            source: format!("{kib} KiB{label}"),
            restore_ms,
            touch_s: touched?,
            chunks_fetched: Some(stats.chunks_fetched),
            chunk_bytes_fetched: Some(stats.chunk_bytes_fetched),
            stored_bytes: Some(pushed.bytes_uploaded),
        });
        server.stop(&rt)?;
    }
    let _ = qemu::quit(&template);
    Ok(VmReport {
        memory_mib: MEMORY_MIB,
        working_set_mib: WEIGHTS_MIB,
        snapshot_s,
        results,
    })
}

impl fmt::Display for VmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "QEMU (TCG) memory snapshot restore: {} MiB guest, {} MiB working set touched after resume; snapshot {:.2} s",
            self.memory_mib, self.working_set_mib, self.snapshot_s
        )?;
        writeln!(
            f,
            "{:<24} {:>11} {:>9} {:>8} {:>13} {:>10}",
            "source", "restore ms", "touch s", "chunks", "fetched MiB", "stored MiB"
        )?;
        let mib = |b: Option<u64>| {
            b.map_or("-".into(), |b| {
                format!("{:.1}", b as f64 / (1 << 20) as f64)
            })
        };
        for r in &self.results {
            writeln!(
                f,
                "{:<24} {:>11.0} {:>9.2} {:>8} {:>13} {:>10}",
                r.source,
                r.restore_ms,
                r.touch_s,
                r.chunks_fetched.map_or("-".into(), |c| c.to_string()),
                mib(r.chunk_bytes_fetched),
                mib(r.stored_bytes)
            )?;
        }
        Ok(())
    }
}
