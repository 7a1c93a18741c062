//! Slow, idle and greedy clients: the timeouts, the connection cap, body
//! limits enforced before and while a body arrives, and shutdown that does
//! not wait for a stalled upload. Driven over raw TCP where a well-behaved
//! HTTP client cannot misbehave enough. (Hundreds of slow clients at once
//! are in `tests/hardening.rs`, against a real `thaw serve`.)

mod common;

use common::Server;
use reqwest::StatusCode;
use std::time::Duration;
use thaw_format::Digest;
use thaw_server::{open_store, run, ServerConfig};
use thaw_testkit::noise;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Long enough for any answer on a busy machine, short against a hang.
const PATIENCE: Duration = Duration::from_secs(10);

async fn start(config: ServerConfig) -> Server {
    Server::start(open_store("memory://").unwrap(), config).await
}

/// Reads until the server closes the connection; `None` if it has not
/// closed it within [`PATIENCE`].
async fn read_to_close(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let read_all = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.ok()?;
    Some(got)
}

/// The status line of the first response on `tcp`, read within [`PATIENCE`].
async fn status_line(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let read_line = async {
        while !got.ends_with(b"\r\n") {
            if tcp.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            got.push(byte[0]);
        }
    };
    tokio::time::timeout(PATIENCE, read_line)
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&got).trim_end().to_owned()
}

fn put_head(path: &str, content_length: usize) -> String {
    format!("PUT {path} HTTP/1.1\r\nhost: thaw\r\ncontent-length: {content_length}\r\n\r\n")
}

#[tokio::test]
async fn an_oversized_declared_body_is_refused_before_it_is_sent() {
    let config = ServerConfig {
        max_body: 1 << 20,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let id = Digest::of(b"x");
    for path in [
        format!("/v1/chunks/{id}"),
        format!("/v1/manifests/{id}"),
        "/v1/tags/a/b".to_owned(),
    ] {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        tcp.write_all(put_head(&path, 1 << 30).as_bytes())
            .await
            .unwrap();
        assert_eq!(
            status_line(&mut tcp).await,
            "HTTP/1.1 413 Payload Too Large",
            "{path}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn bodies_held_at_once_stay_within_the_body_memory() {
    let config = ServerConfig {
        body_memory: 2 << 20,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    // Four manifest uploads, each stalled one byte short of its length.
    let mut uploads = JoinSet::new();
    for i in 0..4u8 {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        let path = format!("/v1/manifests/{}", Digest::of(&[i]));
        let len = 900 << 10;
        uploads.spawn(async move {
            tcp.write_all(put_head(&path, len).as_bytes())
                .await
                .unwrap();
            tcp.write_all(&vec![i; len - 1]).await.unwrap();
            std::future::pending::<()>().await;
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = server.metric("thaw_request_body_bytes").await;
    assert!(
        held >= 900 << 10,
        "{held} bytes held: the first upload is read"
    );
    assert!(held <= 2 << 20, "{held} bytes held, over the budget");
    uploads.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_batch_read_does_not_wait_for_body_memory_that_uploads_hold() {
    let config = ServerConfig {
        body_memory: 2 << 20,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let (id, _) = server.put_chunk(b"read me while uploads stall").await;
    // Two chunk uploads that send their heads and nothing more: their
    // declared lengths take the whole body memory.
    let mut uploads = JoinSet::new();
    for i in 0..2u8 {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        let path = format!("/v1/chunks/{}", Digest::of(&[i]));
        uploads.spawn(async move {
            tcp.write_all(put_head(&path, 1 << 20).as_bytes())
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
    }
    let start = std::time::Instant::now();
    while server.metric("thaw_request_body_bytes").await < 2 << 20 {
        assert!(
            start.elapsed() < PATIENCE,
            "the uploads did not take the room"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = serde_json::json!({ "ids": [id] });
    let batch = server.post_json("/v1/chunks/batch", &ids);
    let answer = tokio::time::timeout(PATIENCE, batch)
        .await
        .expect("a batch read answered while uploads hold the body memory");
    assert_eq!(answer.status(), StatusCode::OK);
    uploads.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn unfinished_request_heads_are_closed_after_the_header_timeout() {
    let config = ServerConfig {
        header_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut silent = TcpStream::connect(&server.addr).await.unwrap();
    let mut partial = TcpStream::connect(&server.addr).await.unwrap();
    partial
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: th")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut silent).await, Some(vec![]));
    assert_eq!(read_to_close(&mut partial).await, Some(vec![]));
    assert_eq!(server.metric("thaw_connections_timed_out_total").await, 2);
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let config = ServerConfig {
        idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.write_all(b"GET /v1/health HTTP/1.1\r\nhost: thaw\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut tcp).await.expect("closed once idle");
    assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_trickles_is_cut_off() {
    let config = ServerConfig {
        body_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let path = format!("/v1/chunks/{}", Digest::of(b"x"));
    tcp.write_all(put_head(&path, 1000).as_bytes())
        .await
        .unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let trickle = async {
        loop {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut answer = Vec::new();
    tokio::select! {
        () = trickle => panic!("the server closed without answering"),
        read = tokio::time::timeout(PATIENCE, async {
            while !answer.ends_with(b"}") && reader.read_buf(&mut answer).await.unwrap() > 0 {}
        }) => read.expect("an answer in time"),
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"timeout\""), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_holds_few_frames() {
    let config = ServerConfig {
        cache_mem: 0,
        idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let (id, _) = server.put_chunk(&noise(1, 1 << 20)).await;
    let ids = serde_json::json!({ "ids": vec![id; 1024] }).to_string();
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "POST /v1/chunks/batch HTTP/1.1\r\nhost: thaw\r\ncontent-length: {}\r\n\r\n",
        ids.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(ids.as_bytes()).await.unwrap();

    tokio::time::sleep(Duration::from_secs(3)).await;
    // What the server read ahead: the batch's window of frames, and what the
    // socket buffers hold, not the 1 GiB the answer would be.
    let read = server.metric("thaw_hot_cache_misses_total").await;
    assert!(
        read <= 64,
        "{read} frames read for a client that reads nothing"
    );
    let got = read_to_close(&mut tcp).await.expect("cut off");
    assert!(got.len() < 64 << 20, "{} bytes sent", got.len());
    server.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_the_oldest_idle_connection_makes_room() {
    let config = ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&server.addr).await.unwrap());
        // The order the server accepts them in.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let health = http.get(format!("{}/v1/health", server.base)).send();
    assert_eq!(health.await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        read_to_close(&mut idle[0]).await,
        Some(vec![]),
        "the oldest made room"
    );
    assert!(server.metric("thaw_connections_evicted_total").await >= 1);
    server.stop().await;
}

fn get_missing_chunk_head() -> String {
    let path = format!("/v1/chunks/{}", Digest::of(b"not stored"));
    format!("GET {path} HTTP/1.1\r\nhost: thaw\r\n\r\n")
}

#[tokio::test]
async fn at_the_connection_cap_a_queued_request_keeps_its_connection() {
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    // One read slot, and each read holds it for a second.
    let throttle = ThrottleConfig {
        wait_get_per_call: Duration::from_secs(1),
        ..ThrottleConfig::default()
    };
    let config = ServerConfig {
        max_connections: 3,
        max_concurrency: 1,
        // Past the test's patience: only an eviction closes a silent connection.
        header_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let store = ThrottledStore::new(InMemory::new(), throttle);
    let server = Server::start(std::sync::Arc::new(store), config).await;
    let mut reading = TcpStream::connect(&server.addr).await.unwrap();
    reading
        .write_all(get_missing_chunk_head().as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut queued = TcpStream::connect(&server.addr).await.unwrap();
    queued
        .write_all(get_missing_chunk_head().as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Newer than the queued request, and sending nothing.
    let mut silent = TcpStream::connect(&server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let http = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let health = http.get(format!("{}/v1/health", server.base)).send();
    assert_eq!(health.await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        read_to_close(&mut silent).await,
        Some(vec![]),
        "the connection without a request made room"
    );
    assert_eq!(status_line(&mut reading).await, "HTTP/1.1 404 Not Found");
    assert_eq!(
        status_line(&mut queued).await,
        "HTTP/1.1 404 Not Found",
        "the queued request was answered"
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_long_for_a_stalled_upload() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let mut server = start(config).await;
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let path = format!("/v1/chunks/{}", Digest::of(b"x"));
    tcp.write_all(put_head(&path, 1000).as_bytes())
        .await
        .unwrap();
    tcp.write_all(b"only this much").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.begin_stop();
    assert!(
        server.stopped_within(PATIENCE).await,
        "still waiting for the upload"
    );
    assert_eq!(read_to_close(&mut tcp).await, Some(vec![]));
}

#[tokio::test]
async fn staging_files_a_crash_left_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let hex = Digest::of(b"x").to_hex();
    let chunks = dir.path().join("chunks").join(&hex[..2]);
    std::fs::create_dir_all(&chunks).unwrap();
    let staged = chunks.join(format!("{hex}#1"));
    std::fs::write(&staged, b"half a frame").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let file = std::fs::File::options().write(true).open(&staged).unwrap();
    file.set_modified(an_hour_ago).unwrap();

    let config = ServerConfig {
        store_url: format!("file://{}", dir.path().display()),
        ..ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, config, async move {
        let _ = stopped.await;
    }));
    let swept = async {
        while staged.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, swept)
        .await
        .expect("the staging file is removed");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn clients_that_stop_reading_cannot_hold_the_response_memory() {
    let budget = 4u64 << 20;
    let config = ServerConfig {
        response_memory: budget,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut ids = Vec::new();
    for seed in 0..16 {
        let (id, status) = server.put_chunk(&noise(seed, 1 << 20)).await;
        assert!(status.is_success());
        ids.push(id);
    }
    // Clients that ask for 16 MiB each and read nothing, with small
    // receive buffers: the sockets fill, and their responses stall holding
    // the frames they are sending and those fetched ahead.
    let body = serde_json::to_vec(&serde_json::json!({ "ids": ids })).unwrap();
    let mut stalled = JoinSet::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(server.addr.parse().unwrap()).await.unwrap();
        let head = format!(
            "POST /v1/chunks/batch HTTP/1.1\r\nhost: thaw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let body = body.clone();
        stalled.spawn(async move {
            tcp.write_all(head.as_bytes()).await.unwrap();
            tcp.write_all(&body).await.unwrap();
            std::future::pending::<()>().await;
        });
    }
    let start = std::time::Instant::now();
    loop {
        let held = server.metric("thaw_response_bytes").await;
        assert!(held <= budget, "{held} bytes held, over the budget");
        if held >= budget / 2 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the stalled batches did not take the response memory ({held} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A well-behaved read gets room in seconds, not after the idle timeout
    // (60 s) has cut off the stalled clients.
    for id in &ids[..4] {
        let path = format!("/v1/chunks/{id}");
        let read = server.get(&path);
        let answer = tokio::time::timeout(PATIENCE, read)
            .await
            .expect("a read answered while stalled clients hold the response memory");
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.bytes().await.unwrap().len() as u64 >> 20, 1);
    }
    let closed = server.metric("thaw_stalled_responses_closed_total").await;
    assert!(closed >= 1, "no stalled response was closed");
    let held = server.metric("thaw_response_bytes").await;
    assert!(held <= budget, "{held} bytes held, over the budget");
    stalled.shutdown().await;
    server.stop().await;
}
