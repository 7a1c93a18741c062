//! Crash consistency: `thaw push` and `thaw serve` killed with SIGKILL at
//! random points of a push, round after round.
//!
//! Each round starts a server over a new directory store, pushes image v1
//! under `img:latest` to the end, then starts a push of v2 (more files and
//! larger ones, sharing v1's) under the same tag and, at a random moment (a
//! delay, or as soon as every chunk or the manifest is stored), kills one of:
//!
//! - the push;
//! - the server, restarted at once (the push may ride through on its retries);
//! - the server, restarted only once the push has failed, which it must do
//!   with a clear error, not hang.
//!
//! Then, with the server back (the store is read right after the kill, to
//! tell where in the push it landed):
//!
//! - no staging file (`<path>#<n>`) is left in the store;
//! - the tag resolves to v1 or v2, and exports as exactly that tree;
//! - `thaw fsck` re-hashes every stored object and finds each whole, and
//!   every stored manifest complete;
//! - a re-push of v2 uploads exactly the chunks the store lacks, moves the
//!   tag, and exports as v2.
//!
//! `THAW_CRASH_RUNS` rounds (default 4; `scripts/crash.sh` runs hundreds, in
//! release), with delays drawn from `THAW_CRASH_SEED` (random unless set,
//! and printed, so a failing run can be replayed).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};
use thaw_format::Manifest;
use thaw_testkit::tree::write;
use thaw_testkit::{
    assert_same_tree, finish_within, noise, s, spawn_thaw, thaw, thaw_json, PythonEnv, Rng, Server,
};

const MIB: usize = 1 << 20;
/// Rounds when `THAW_CRASH_RUNS` is not set: enough to see every kind of
/// kill once, few enough for every test run.
const DEFAULT_RUNS: usize = 4;
/// Longest a push may take to give up on a dead server.
const PUSH_GIVES_UP_WITHIN: Duration = Duration::from_secs(60);
/// Longest the store may take to settle after a kill: writes in flight
/// land, and a restarted server sweeps the staging files of the dead one.
const SETTLE_WITHIN: Duration = Duration::from_secs(15);
const TAG: &str = "img:latest";
/// A quarter of the default chunk size: more uploads per push, so more
/// places for a kill to land.
const CHUNK_SIZE: &str = "262144";

#[test]
fn killed_pushes_and_servers_leave_a_consistent_store() {
    let runs = env_number("THAW_CRASH_RUNS").unwrap_or(DEFAULT_RUNS as u64) as usize;
    let seed = env_number("THAW_CRASH_SEED").unwrap_or_else(random_seed);
    eprintln!("crash: {runs} rounds, THAW_CRASH_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let images = Images::build(dir.path());
    eprintln!(
        "crash: v1 {} files, v2 {} files, {} chunks ({} new); v2 pushes in {:.2}s",
        images.v1_files,
        images.v2_files,
        images.v2_chunks.len(),
        images.v2_chunks.difference(&images.v1_chunks).count(),
        images.v2_push.as_secs_f64()
    );
    let mut rng = Rng::new(seed);
    let mut tally: BTreeMap<(Kill, Phase), usize> = BTreeMap::new();
    for round in 0..runs {
        let kill = Kill::ALL[round % Kill::ALL.len()];
        let when = When::pick(&mut rng, images.v2_push);
        let work = dir.path().join(format!("round-{round}"));
        let outcome = crash_round(&images, &work, kill, when);
        eprintln!(
            "crash: round {}/{runs}: {kill} {when}: {outcome}",
            round + 1
        );
        *tally.entry((kill, outcome.phase)).or_default() += 1;
        std::fs::remove_dir_all(&work).unwrap();
    }
    eprintln!(
        "crash: {runs} rounds passed in {:.1}s; where the kills landed:",
        started.elapsed().as_secs_f64()
    );
    for ((kill, phase), n) in &tally {
        eprintln!("crash:   {n:>4}  {kill}, {phase}");
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// What a round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kill {
    Push,
    /// The server, restarted at once.
    ServerRestarted,
    /// The server, restarted once the push has given up.
    ServerUntilPushFails,
}

impl Kill {
    const ALL: [Kill; 3] = [
        Kill::Push,
        Kill::ServerRestarted,
        Kill::ServerUntilPushFails,
    ];
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kill::Push => "kill push",
            Kill::ServerRestarted => "kill server, restart at once",
            Kill::ServerUntilPushFails => "kill server, restart after the push fails",
        })
    }
}

/// When a round kills.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This long after the push of v2 started.
    After(Duration),
    /// As soon as every chunk of v2 is stored: the manifest is next.
    ChunksStored,
    /// As soon as the manifest of v2 is stored: the tag is next.
    ManifestStored,
}

impl When {
    /// Mostly a delay up to the time a whole push of v2 takes, so kills land
    /// anywhere in it; else at one of the two short windows at its end,
    /// which a delay seldom hits.
    fn pick(rng: &mut Rng, push: Duration) -> When {
        match rng.below(10) {
            0..6 => When::After(push.mul_f64(rng.below(1001) as f64 / 1000.0)),
            6..8 => When::ChunksStored,
            _ => When::ManifestStored,
        }
    }

    /// Waits for this moment of the push `child` makes into `store`, or for
    /// the push to end.
    fn wait(self, child: &mut Child, store: &Path, images: &Images) {
        let reached = || match self {
            When::After(_) => true,
            When::ChunksStored => images
                .v2_chunks
                .iter()
                .all(|hex| store.join("chunks").join(&hex[..2]).join(hex).is_file()),
            When::ManifestStored => manifest_file(store, &images.v2_manifest).is_file(),
        };
        if let When::After(delay) = self {
            std::thread::sleep(delay);
        }
        let start = Instant::now();
        while !reached() && child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < PUSH_GIVES_UP_WITHIN, "{self} never came");
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            When::After(delay) => write!(f, "after {} ms", delay.as_millis()),
            When::ChunksStored => f.write_str("once all chunks are stored"),
            When::ManifestStored => f.write_str("once the manifest is stored"),
        }
    }
}

/// How far the push of v2 had got when the kill came, as the store tells
/// right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Not one of v2's new chunks stored (walking, hashing, asking what is missing).
    BeforeUploads,
    UploadingChunks,
    /// Every chunk stored; the manifest or the tag not yet.
    ChunksStored,
    ManifestStored,
    /// The tag names v2: the push had finished, or finished after a restart.
    TagMoved,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::BeforeUploads => "before any new chunk was stored",
            Phase::UploadingChunks => "while chunks were uploaded",
            Phase::ChunksStored => "all chunks stored, no manifest",
            Phase::ManifestStored => "manifest stored, tag not moved",
            Phase::TagMoved => "tag moved to v2",
        })
    }
}

/// What a round saw.
struct Outcome {
    phase: Phase,
    /// v2's chunks not in v1 that were stored right after the kill.
    new_chunks_stored: usize,
    new_chunks: usize,
    /// How the push of v2 ended: `None` if it was killed.
    push: Option<Result<(), String>>,
    reuploaded: u64,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} new chunks stored at the kill, {}; push ",
            self.new_chunks_stored, self.new_chunks, self.phase
        )?;
        match &self.push {
            None => f.write_str("killed")?,
            Some(Ok(())) => f.write_str("succeeded")?,
            Some(Err(e)) => write!(f, "failed ({e})")?,
        }
        write!(f, "; re-push uploaded {} chunks", self.reuploaded)
    }
}

/// The two trees, and what a whole push of each stores.
struct Images {
    v1: PathBuf,
    v2: PathBuf,
    v1_files: usize,
    v2_files: usize,
    v1_manifest: String,
    v2_manifest: String,
    v1_chunks: BTreeSet<String>,
    v2_chunks: BTreeSet<String>,
    /// How long a push of v2 over v1 takes, uninterrupted.
    v2_push: Duration,
}

impl Images {
    /// v1: a small Python environment and a 3 MiB file of weights. v2: the
    /// same environment grown to hundreds of files with multi-MiB shared
    /// libraries, one module changed, and new weights. Then both pushed
    /// once, to learn their manifests and chunks and how long v2 takes.
    fn build(dir: &Path) -> Images {
        let (v1, v2) = (dir.join("v1"), dir.join("v2"));
        let mut env = PythonEnv::new(0xC0FF_EE01);
        let (mut v1_files, mut v2_files, mut bytes) = (0, 0, 0);
        while bytes < 32 * MIB {
            let file = env.next().expect("the environment never ends");
            if bytes < 4 * MIB {
                write(&v1.join(&file.path), &file.data);
                v1_files += 1;
            }
            write(&v2.join(&file.path), &file.data);
            v2_files += 1;
            bytes += file.data.len();
        }
        write(&v1.join("model/weights.bin"), &noise(1, 3 * MIB));
        write(&v2.join("model/weights.bin"), &noise(2, 6 * MIB));
        write(&v2.join("model/adapter.bin"), &noise(3, 2 * MIB + 12345));
        write(&v2.join("app.py"), b"print('v2')\n");
        write(&v1.join("app.py"), b"print('v1')\n");
        (v1_files, v2_files) = (v1_files + 2, v2_files + 3);

        let store = dir.join("calibration");
        let server = Server::start(&store);
        let reference = server.reference(TAG);
        let v1_manifest = text(&push(&v1, &reference), "manifest");
        let start = Instant::now();
        let v2_manifest = text(&push(&v2, &reference), "manifest");
        let v2_push = start.elapsed();
        drop(server);
        let images = Images {
            v1_chunks: chunks_of(&store, &v1_manifest),
            v2_chunks: chunks_of(&store, &v2_manifest),
            v1,
            v2,
            v1_files,
            v2_files,
            v1_manifest,
            v2_manifest,
            v2_push,
        };
        std::fs::remove_dir_all(&store).unwrap();
        images
    }

    /// The tree the manifest `digest` was pushed from.
    fn tree_of(&self, digest: &str) -> &Path {
        match digest {
            d if d == self.v1_manifest => &self.v1,
            d if d == self.v2_manifest => &self.v2,
            other => panic!("the tag names {other}, neither v1 nor v2"),
        }
    }
}

/// One round (see the module doc); panics on any inconsistency.
fn crash_round(images: &Images, work: &Path, kill: Kill, when: When) -> Outcome {
    let store = work.join("store");
    let mut server = Server::start(&store);
    let reference = server.reference(TAG);
    let pushed = text(&push(&images.v1, &reference), "manifest");
    assert_eq!(pushed, images.v1_manifest, "v1 pushes as the same manifest");

    let mut child = spawn_push(&images.v2, &reference);
    when.wait(&mut child, &store, images);
    let (at_kill, ended) = match kill {
        Kill::Push => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            // An exit code: it ended before the signal came.
            let ended = out.status.code().map(|_| push_result(&out));
            (progress(&store, images), ended)
        }
        Kill::ServerRestarted => {
            server.kill();
            let at_kill = progress(&store, images);
            server.restart();
            let out = finish_within(child, PUSH_GIVES_UP_WITHIN, "push across a restart");
            (at_kill, Some(push_result(&out)))
        }
        Kill::ServerUntilPushFails => {
            server.kill();
            let at_kill = progress(&store, images);
            let out = finish_within(child, PUSH_GIVES_UP_WITHIN, "push to a dead server");
            server.restart();
            (at_kill, Some(push_result(&out)))
        }
    };
    if let Some(Err(e)) = &ended {
        assert!(
            e.contains("cannot reach the chunk server"),
            "a push cut off from its server fails with an unclear error: {e}"
        );
    }
    if kill == Kill::ServerUntilPushFails && at_kill.0 != Phase::TagMoved {
        // It may have had its answer to the tag's move just before the kill.
        assert!(
            matches!(ended, Some(Err(_))),
            "a push whose server died before the tag moved, and stayed dead, succeeded"
        );
    }

    let stored = settled_chunks(&store);
    let tag = tag_of(&server, TAG).expect("the tag resolves after a crash");
    if matches!(ended, Some(Ok(()))) {
        assert_eq!(
            tag, images.v2_manifest,
            "a push that succeeded moved the tag"
        );
    }
    let tree = images.tree_of(&tag);
    assert_same_tree(tree, &export(&server, &work.join("out-after-crash")));
    fsck_clean(&store);

    let lacking = images.v2_chunks.difference(&stored).count() as u64;
    let report = push(&images.v2, &reference);
    assert_eq!(text(&report, "manifest"), images.v2_manifest);
    let reuploaded = report["chunks_uploaded"].as_u64().unwrap();
    assert_eq!(
        reuploaded, lacking,
        "the re-push uploads exactly the chunks the store lacks"
    );
    assert_eq!(tag_of(&server, TAG).as_deref(), Some(&*images.v2_manifest));
    assert_same_tree(&images.v2, &export(&server, &work.join("out-after-repush")));
    Outcome {
        phase: at_kill.0,
        new_chunks_stored: at_kill.1,
        new_chunks: images.v2_chunks.difference(&images.v1_chunks).count(),
        push: ended,
        reuploaded,
    }
}

/// How far the push of v2 has got, read from the store's directory: the
/// phase, and how many of v2's chunks that v1 lacks are stored.
fn progress(store: &Path, images: &Images) -> (Phase, usize) {
    let stored = stored_chunks(store);
    let new: Vec<&String> = images.v2_chunks.difference(&images.v1_chunks).collect();
    let new_stored = new.iter().filter(|id| stored.contains(**id)).count();
    let tag_file = store.join("tags").join(TAG.replace(':', "/"));
    let tag = std::fs::read_to_string(tag_file).unwrap_or_default();
    let phase = match () {
        _ if tag.trim() == images.v2_manifest => Phase::TagMoved,
        _ if manifest_file(store, &images.v2_manifest).is_file() => Phase::ManifestStored,
        _ if new_stored == new.len() => Phase::ChunksStored,
        _ if new_stored > 0 => Phase::UploadingChunks,
        _ => Phase::BeforeUploads,
    };
    (phase, new_stored)
}

fn text(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
        .to_owned()
}

fn push(dir: &Path, reference: &str) -> Value {
    thaw_json(&["push", s(dir), reference, "--chunk-size", CHUNK_SIZE])
}

/// `thaw push DIR REF --json` as a child process.
fn spawn_push(dir: &Path, reference: &str) -> Child {
    spawn_thaw(&[
        "push",
        s(dir),
        reference,
        "--json",
        "--chunk-size",
        CHUNK_SIZE,
    ])
}

/// Success, or the error a finished push printed.
fn push_result(out: &Output) -> Result<(), String> {
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// Exports the tag into `out` and returns `out`.
fn export(server: &Server, out: &Path) -> PathBuf {
    thaw_json(&["export", &server.reference(TAG), s(out)]);
    out.to_path_buf()
}

/// The manifest digest `name:tag` names on `server`, or `None` on 404.
fn tag_of(server: &Server, name_tag: &str) -> Option<String> {
    let (name, tag) = name_tag.split_once(':').unwrap();
    let resp = reqwest::blocking::get(format!("{}/v1/tags/{name}/{tag}", server.url()))
        .expect("GET the tag");
    match resp.status().as_u16() {
        200 => Some(resp.text().unwrap()),
        404 => None,
        other => panic!("GET tag {name_tag}: {other}"),
    }
}

fn manifest_file(store: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("blake3:").expect("a blake3 digest");
    store.join("manifests").join(hex)
}

/// The chunk ids (hex) of the stored manifest `digest`.
fn chunks_of(store: &Path, digest: &str) -> BTreeSet<String> {
    let bytes = std::fs::read(manifest_file(store, digest)).unwrap();
    let manifest = Manifest::decode(&bytes).expect("a stored manifest decodes");
    manifest.chunks.iter().map(|c| c.id.to_hex()).collect()
}

/// Every file under `dir` whose name is a staging file's: `<name>#<digits>`.
fn staging_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(staging_files(&path));
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('#'))
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            found.push(path);
        }
    }
    found
}

/// The chunk ids (hex) whose files are in the store.
fn stored_chunks(store: &Path) -> BTreeSet<String> {
    let Ok(fans) = std::fs::read_dir(store.join("chunks")) else {
        return BTreeSet::new();
    };
    fans.flat_map(|fan| std::fs::read_dir(fan.unwrap().path()).unwrap())
        .map(|file| file.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.contains('#'))
        .collect()
}

/// Waits until the store holds no staging file and its chunks have not
/// changed for a moment (writes in flight landed, the restarted server swept
/// what the dead one left); returns its chunks. Fails if that takes longer
/// than [`SETTLE_WITHIN`].
fn settled_chunks(store: &Path) -> BTreeSet<String> {
    let start = Instant::now();
    let mut last = (stored_chunks(store), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let staging = staging_files(store);
        let now = stored_chunks(store);
        if now != last.0 {
            last = (now, Instant::now());
        } else if staging.is_empty() && last.1.elapsed() > Duration::from_millis(300) {
            return last.0;
        }
        assert!(
            start.elapsed() < SETTLE_WITHIN,
            "the store did not settle in {SETTLE_WITHIN:?}; staging files left: {staging:?}"
        );
    }
}

/// `thaw fsck` re-hashes every object and finds none bad, no manifest incomplete.
fn fsck_clean(store: &Path) {
    let url = format!("file://{}", store.display());
    let out = thaw(&["fsck", "--store", &url, "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("fsck prints JSON");
    assert!(
        out.status.success()
            && report["bad"].as_array().is_some_and(Vec::is_empty)
            && report["incomplete_manifests"]
                .as_array()
                .is_some_and(Vec::is_empty),
        "fsck after a crash: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
