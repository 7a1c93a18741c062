//! Several real `thaw serve` processes over one directory store, and clients
//! that know them all (`--server`): servers killed (SIGKILL) during a mount's
//! reads and during a push, a server dead from the start, and all of them
//! dead.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use thaw_testkit::tree::write;
use thaw_testkit::{
    assert_eio_within, assert_same_tree, finish_within, noise, s, spawn_thaw, thaw, thaw_ok,
    thaw_within, wait_for_chunks, Mount, Server,
};

const MB: usize = 1 << 20;

/// Servers over one store, a scratch directory, and helpers for clients.
struct World {
    tmp: tempfile::TempDir,
    servers: Vec<Server>,
}

impl World {
    fn new(servers: usize) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let servers = (0..servers).map(|_| Server::start(&store)).collect();
        World { tmp, servers }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `--server ADDR` for every server but the first (whose address the
    /// references carry).
    fn more_servers(&self) -> Vec<String> {
        self.servers[1..]
            .iter()
            .flat_map(|s| ["--server".to_owned(), s.addr()])
            .collect()
    }

    /// Pushes `src` through server `via` as `name_tag`; returns the reference
    /// on the first server.
    fn push(&self, src: &Path, name_tag: &str, via: usize) -> String {
        thaw_ok(&["push", s(src), &self.servers[via].reference(name_tag)]);
        self.servers[0].reference(name_tag)
    }

    fn mount(&self, r: &str, name: &str, extra: &[&str]) -> Mount {
        let cache = self.path(&format!("cache-{name}"));
        let mut args = vec!["--cache-dir", s(&cache)];
        args.extend_from_slice(extra);
        let more = self.more_servers();
        args.extend(more.iter().map(String::as_str));
        Mount::new(r, &self.path(name), &args)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_mount_reads_every_byte_while_the_servers_it_uses_are_killed() {
    let mut w = World::new(3);
    let src = w.path("src");
    let big = noise(21, 48 * MB + 4321);
    let second = noise(22, 8 * MB);
    write(&src.join("big"), &big);
    write(&src.join("second"), &second);
    let r = w.push(&src, "big:v1", 0);
    let m = w.mount(&r, "mnt", &["--fetch-timeout", "20", "--cache-mem", "0"]);
    assert_eq!(m.stats()["server"], w.servers[0].url());

    // Read the large file; once 8 MiB are in, its server dies under the
    // reads and readahead still in flight.
    let path = m.dir.join("big");
    let (progress, started) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        let (mut at, mut told) = (0u64, false);
        loop {
            let n = f.read_at(&mut buf, at).unwrap();
            if n == 0 {
                return h.finalize();
            }
            h.update(&buf[..n]);
            at += n as u64;
            if !told && at >= 8 * MB as u64 {
                progress.send(()).unwrap();
                told = true;
            }
        }
    });
    started.recv_timeout(Duration::from_secs(60)).unwrap();
    w.servers[0].kill();
    assert_eq!(
        reader.join().expect("every read succeeded"),
        blake3::hash(&big),
        "the mount served wrong bytes"
    );
    let stats = m.stats();
    assert_eq!(stats["server"], w.servers[1].url(), "{stats}");
    assert_eq!(stats["failovers"], 1, "{stats}");
    assert_eq!(stats["digest_mismatches"], 0, "{stats}");

    // The one it moved to dies too: the last one serves, same mount.
    w.servers[1].kill();
    let got = blake3::Hasher::new()
        .update_reader(std::fs::File::open(m.dir.join("second")).unwrap())
        .unwrap()
        .finalize();
    assert_eq!(got, blake3::hash(&second));
    let stats = m.stats();
    assert_eq!(stats["server"], w.servers[2].url(), "{stats}");
    assert_eq!(stats["failovers"], 2, "{stats}");
}

#[test]
fn a_push_whose_server_is_killed_completes_through_another() {
    let mut w = World::new(3);
    let src = w.path("src");
    write(&src.join("data"), &noise(31, 24 * MB));
    for i in 0..50 {
        write(
            &src.join(format!("small/{i}")),
            format!("file {i}").as_bytes(),
        );
    }
    // Small chunks one at a time, so the push is surely under way when
    // its server dies.
    let mut args: Vec<String> = ["push", s(&src), &w.servers[0].reference("pushed:v1")]
        .map(str::to_owned)
        .into();
    args.extend(["--concurrency", "1", "--chunk-size", "65536", "--json"].map(str::to_owned));
    args.extend(w.more_servers());
    let mut child = spawn_thaw(&args);
    assert!(
        wait_for_chunks(&w.store(), 5, &mut child).is_none(),
        "the push ended before its server could be killed"
    );
    w.servers[0].kill();
    let out = finish_within(child, Duration::from_secs(120), "push");
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The first server took part (it stored chunks before it died), and
    // the second took the rest.
    let took_over = w.servers[1].metric("thaw_http_bytes_in_total");
    let uploaded = pushed["bytes_uploaded"].as_f64().unwrap();
    assert!(
        took_over > 0.0 && took_over < uploaded,
        "{took_over} of {uploaded} bytes went through the second server"
    );

    // The tag resolves, on a surviving server, to the whole image.
    let tag = reqwest::blocking::get(format!("{}/v1/tags/pushed/v1", w.servers[2].url()))
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(tag.trim(), pushed["manifest"].as_str().unwrap());
    let out = w.path("out");
    thaw_ok(&["export", &w.servers[2].reference("pushed:v1"), s(&out)]);
    assert_same_tree(&src, &out);
}

#[test]
fn export_fails_over_from_a_server_dead_from_the_start() {
    let mut w = World::new(2);
    let src = w.path("src");
    write(&src.join("a"), &noise(41, 5 * MB));
    write(&src.join("b/c"), b"small");
    let r = w.push(&src, "exp:v1", 1);
    w.servers[0].kill();
    let out = w.path("out");
    let mut args = vec!["export", &r, s(&out)];
    let more = w.more_servers();
    args.extend(more.iter().map(String::as_str));
    thaw_ok(&args);
    assert_same_tree(&src, &out);
    // Without the other server, the same export fails.
    let out = thaw(&["export", &r, s(&w.path("out2"))]);
    assert!(!out.status.success());
}

#[test]
fn every_server_dead_gives_a_clear_error_within_the_fetch_timeout() {
    let mut w = World::new(2);
    let src = w.path("src");
    let data = noise(51, 16 * MB);
    write(&src.join("data"), &data);
    let r = w.push(&src, "dead:v1", 0);
    let m = w.mount(&r, "mnt", &["--fetch-timeout", "3", "--readahead", "0"]);
    let f = std::fs::File::open(m.dir.join("data")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    for server in &mut w.servers {
        server.kill();
    }
    assert_eio_within(&f, 9 * MB as u64, &mut buf, Duration::from_secs(15));

    let mut args: Vec<String> = ["export", &r, s(&w.path("out"))].map(str::to_owned).into();
    args.extend(w.more_servers());
    let t = Instant::now();
    let out = thaw_within(&args, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "export took {:?}",
        t.elapsed()
    );
    let err = stderr(&out);
    assert!(
        err.contains("none of the 2 chunk servers answered")
            && w.servers.iter().all(|s| err.contains(&s.url())),
        "unclear error: {err}"
    );
}
