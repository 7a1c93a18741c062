//! A real `thaw serve` under hostile or broken conditions: slow clients by
//! the hundred, an upload that stalls at shutdown, bytes that rot in the
//! store (found by `thaw fsck`, repaired by a re-push).

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thaw_format::{frame, Digest};
use thaw_testkit::{noise, thaw, thaw_json, Server};
use tokio::io::AsyncWriteExt;

/// Long enough for any answer on a busy machine, short against a hang.
const PATIENCE: Duration = Duration::from_secs(15);

fn put_head(path: &str, content_length: usize) -> String {
    format!("PUT {path} HTTP/1.1\r\nhost: thaw\r\ncontent-length: {content_length}\r\n\r\n")
}

/// A client that connects to `addr`, sends `head`, then `trickle` (over and
/// over) one byte every 200 ms, and connects again whenever it is cut off.
async fn trickle_forever(addr: String, head: Vec<u8>, trickle: &'static [u8]) {
    loop {
        let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if tcp.write_all(&head).await.is_err() {
            continue;
        }
        for byte in trickle.iter().cycle() {
            if tcp.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[test]
fn many_slow_connections_do_not_stop_reads_or_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--max-connections", "256"]);
    let data = b"read me under load".to_vec();
    let id = Digest::of(&data);
    let http = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let chunk_url = format!("{}/v1/chunks/{id}", server.url());
    let put = http.put(&chunk_url).body(frame::encode(&data, 3)).send();
    assert_eq!(put.unwrap().status(), reqwest::StatusCode::CREATED);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut attackers = tokio::task::JoinSet::new();
    // Request heads one byte at a time.
    let slow_head = b"GET /v1/health HTTP/1.1\r\nhost: slowly\r\n";
    for _ in 0..300 {
        let trickle = trickle_forever(server.addr(), Vec::new(), slow_head);
        attackers.spawn_on(trickle, rt.handle());
    }
    // Upload bodies one byte at a time, more than the server handles at once.
    for i in 0..260u32 {
        let path = format!("/v1/chunks/{}", Digest::of(&i.to_le_bytes()));
        let trickle = trickle_forever(server.addr(), put_head(&path, 1 << 20).into(), b"x");
        attackers.spawn_on(trickle, rt.handle());
    }
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..5 {
        let health = http.get(format!("{}/v1/health", server.url())).send();
        assert_eq!(health.unwrap().status(), reqwest::StatusCode::OK);
        let chunk = http.get(&chunk_url).send().unwrap();
        assert_eq!(chunk.status(), reqwest::StatusCode::OK);
        let body = chunk.bytes().unwrap();
        assert_eq!(frame::decode_verified(&body, &id).unwrap(), data);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(server.metric("thaw_connections_evicted_total") > 0.0);
    rt.block_on(attackers.shutdown());
}

#[test]
fn sigterm_with_a_stalled_upload_exits_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("store"));
    let mut tcp = std::net::TcpStream::connect(server.addr()).unwrap();
    let path = format!("/v1/chunks/{}", Digest::of(b"x"));
    tcp.write_all(put_head(&path, 1 << 20).as_bytes()).unwrap();
    tcp.write_all(b"and then nothing more").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (done, exited) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || done.send(server.terminate()));
    let status = exited
        .recv_timeout(PATIENCE)
        .expect("thaw serve still running after SIGTERM");
    assert!(status.success(), "{status}");
    eprintln!("exited {:.1}s after SIGTERM", start.elapsed().as_secs_f64());
}

/// The chunk files of a directory store, and the chunk each one holds.
fn stored_chunks(store: &Path) -> Vec<(PathBuf, Digest)> {
    let mut files = Vec::new();
    for fan in std::fs::read_dir(store.join("chunks")).unwrap() {
        for file in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let id = Digest::from_hex(path.file_name().unwrap().to_str().unwrap()).unwrap();
            files.push((path, id));
        }
    }
    files.sort();
    files
}

fn flip_byte(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

/// `thaw fsck ARGS --json`: whether it succeeded, and its report.
fn fsck(store: &Path, args: &[&str]) -> (bool, Value) {
    let url = format!("file://{}", store.display());
    let mut all = vec!["fsck", "--store", &url, "--json"];
    all.extend_from_slice(args);
    let out = thaw(&all);
    let report = serde_json::from_slice(&out.stdout).expect("fsck prints JSON");
    (out.status.success(), report)
}

fn bad_paths(report: &Value) -> Vec<String> {
    let mut paths: Vec<String> = report["bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["path"].as_str().unwrap().to_owned())
        .collect();
    paths.sort();
    paths
}

#[test]
fn rotten_chunks_are_found_by_fsck_and_repaired_by_a_repush() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // No hot cache: every read goes to the store, as after a restart.
    let server = Server::start_with(&store, &["--cache-mem", "0"]);
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a"), noise(1, 300 << 10)).unwrap();
    std::fs::write(tree.join("b"), noise(2, 300 << 10)).unwrap();
    let reference = server.reference("rot:1");
    let tree_arg = tree.to_str().unwrap();
    thaw_json(&["push", tree_arg, &reference]);

    let chunks = stored_chunks(&store);
    assert_eq!(chunks.len(), 2);
    for (file, _) in &chunks {
        flip_byte(file, 1000);
    }
    let relative = |file: &Path| {
        file.strip_prefix(&store)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let (a, b) = (&chunks[0], &chunks[1]);

    let (clean, report) = fsck(&store, &[]);
    assert!(!clean, "fsck fails on a bad store");
    assert_eq!(bad_paths(&report), [relative(&a.0), relative(&b.0)]);
    assert_eq!(report["incomplete_manifests"].as_array().unwrap().len(), 1);
    assert!(a.0.is_file(), "without --quarantine, fsck only reports");

    // A read of a rotten chunk fails cleanly, and the server sets it aside.
    let chunk_url = |id: &Digest| format!("{}/v1/chunks/{id}", server.url());
    let got = reqwest::blocking::get(chunk_url(&a.1)).unwrap();
    assert_eq!(got.status(), reqwest::StatusCode::NOT_FOUND);
    assert!(!a.0.exists());
    let (_, report) = fsck(&store, &["--quarantine"]);
    assert_eq!(bad_paths(&report), [relative(&b.0)]);
    assert_eq!(report["bad"][0]["quarantined"], true);

    let pushed = thaw_json(&["push", tree_arg, &reference]);
    assert_eq!(pushed["chunks_uploaded"], 2, "the re-push sends both again");
    for (_, id) in [a, b] {
        let got = reqwest::blocking::get(chunk_url(id)).unwrap();
        assert_eq!(got.status(), reqwest::StatusCode::OK);
        frame::decode_verified(&got.bytes().unwrap(), id).unwrap();
    }
    let (clean, report) = fsck(&store, &[]);
    assert!(clean, "{report}");
    assert_eq!(report["chunks"], 2);
}

#[test]
fn a_non_loopback_listener_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "secret").unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let out = thaw(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--store",
        &store,
        "--push-token-file",
        token.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
}
