//! `thaw profile record`: record what a start of an image reads, cold, and
//! merge it into the image's profile on the server.
//!
//! Each run mounts the image in this process over an empty, temporary cache
//! with no profile streaming (so what is recorded is what the start itself
//! asks for), runs the start in the mount with its root in `$THAW_ROOT` (as
//! `thaw bench --run` does), and unmounts. The runs are merged with each
//! other and with the stored profile, and the result is uploaded.

use crate::cmd::{human, parse_bytes, print_json, remote_for, ClientArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use thaw_client::image::ImageOptions;
use thaw_client::profile::ProfileSummary;
use thaw_client::reference::Selector;
use thaw_client::ImageRef;
use thaw_format::Profile;

#[derive(Args)]
pub struct ProfileArgs {
    #[command(subcommand)]
    command: ProfileCommand,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Mount an image cold, run a start in it, and merge what it read into the image's profile.
    Record(RecordArgs),
}

#[derive(Args)]
struct RecordArgs {
    /// [http://]HOST:PORT/NAME:TAG or HOST:PORT/NAME@blake3:<hex>
    reference: String,
    /// The start to record, run by `sh -c` in the mount's root; `{root}` and
    /// $THAW_ROOT name that root.
    #[arg(long)]
    run: String,
    /// Recordings to make, each on a fresh cold mount; they are merged.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Largest readahead window, as for `thaw mount`.
    #[arg(long, default_value = "16M", value_parser = parse_bytes)]
    readahead: u64,
    #[command(flatten)]
    client: ClientArgs,
}

/// What `thaw profile record --json` prints.
#[derive(serde::Serialize)]
struct Recorded {
    manifest: String,
    /// Seconds each run's start took.
    seconds: Vec<f64>,
    /// The profile as saved (merged with what was stored).
    profile: ProfileSummary,
}

pub fn run(a: ProfileArgs) -> Result<()> {
    match a.command {
        ProfileCommand::Record(a) => record(a),
    }
}

fn record(a: RecordArgs) -> Result<()> {
    let r = ImageRef::parse(&a.reference)?;
    let remote = remote_for(&r, &a.client)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let digest = rt.block_on(remote.resolve(&r))?;
    // Every run records the same manifest, even if the tag moves meanwhile.
    let pinned = ImageRef {
        selector: Selector::Digest(digest),
        ..r.clone()
    };
    let work = tempfile::Builder::new()
        .prefix("thaw-profile-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let (mut recordings, mut seconds) = (Vec::new(), Vec::new());
    for i in 0..a.runs.max(1) {
        let opts = ImageOptions {
            cache_dir: Some(work.path().join(format!("cache{i}"))),
            readahead_max: a.readahead,
            replay: thaw_client::image::Replay::Off,
            record: true,
            ..Default::default()
        };
        let image = rt
            .block_on(thaw_client::image::open(&pinned, remote.clone(), &opts))
            .with_context(|| format!("cannot open {r}"))?;
        let image = Arc::new(image);
        let root = work.path().join(format!("root{i}"));
        std::fs::create_dir(&root)?;
        let fuse = thaw_fuse::FuseOptions::default();
        let session = thaw_fuse::Session::mount(image.clone(), &root, &fuse, rt.handle().clone())?;
        let started = Instant::now();
        let ran = start(&a.run, &root);
        seconds.push(started.elapsed().as_secs_f64());
        session.unmount();
        ran.with_context(|| format!("run {} of the start failed: nothing saved", i + 1))?;
        let p = image.fs.recording(digest).expect("opened to record");
        if !a.client.json {
            let s = ProfileSummary::of(&p);
            println!(
                "run {}: {:.2}s, read {} chunks ({}) of {} files",
                i + 1,
                seconds[i],
                s.working_set_chunks,
                human(s.working_set_bytes),
                s.files
            );
        }
        recordings.push(p);
    }
    let merged = Profile::merge(&recordings)?;
    if merged.working_set().next().is_none() {
        bail!("`{}` read nothing from the image: nothing saved", a.run);
    }
    let saved = rt
        .block_on(thaw_client::profile::save(&remote, merged))
        .with_context(|| format!("cannot save the profile of {r}"))?;
    let summary = ProfileSummary::of(&saved);
    if a.client.json {
        return print_json(&Recorded {
            manifest: digest.to_string(),
            seconds,
            profile: summary,
        });
    }
    println!("saved the profile of {r} ({digest})");
    print_summary(&summary);
    Ok(())
}

/// The lines `thaw inspect` and `thaw profile record` print for a profile.
pub fn print_summary(s: &ProfileSummary) {
    println!(
        "profile   {} runs: working set {} chunks ({}), {} files read ({}), last needed at {} ms",
        s.runs,
        s.working_set_chunks,
        human(s.working_set_bytes),
        s.files,
        human(s.read_bytes),
        s.last_touch_ms
    );
    let others = s.chunks - s.working_set_chunks;
    if others > 0 {
        println!(
            "          {others} more chunks read in fewer than half the runs or only by readahead ({} of them)",
            s.readahead_only
        );
    }
}

/// Runs `command` with `sh -c` in `root` (its output on stderr) and waits
/// for it to succeed.
fn start(command: &str, root: &Path) -> Result<()> {
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(command.replace("{root}", &root.display().to_string()))
        .current_dir(root)
        .env("THAW_ROOT", root)
        .stdout(Stdio::from(stderr))
        .status()
        .context("cannot run sh")?;
    if !status.success() {
        bail!("`{command}` ended with {status}");
    }
    Ok(())
}
