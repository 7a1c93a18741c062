//! The HTTP API, driven over real TCP against in-memory and directory stores.

mod common;

use common::{assert_error, manifest_of, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use thaw_format::{frame, Digest};
use thaw_server::{open_store, run, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

async fn chunk_round_trip(server: &Server) {
    let data = b"hello chunk ".repeat(1000);
    let (id, status) = server.put_chunk(&data).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, again) = server.put_chunk(&data).await;
    assert_eq!(again, StatusCode::OK, "a second upload is idempotent");

    let response = server.get(&format!("/v1/chunks/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(
        headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(headers["etag"].to_str().unwrap(), format!("\"{id}\""));
    let body = response.bytes().await.unwrap();
    assert_eq!(
        body.as_ref(),
        frame::encode(&data, 3),
        "the frame is served as uploaded"
    );
    assert_eq!(frame::decode_verified(&body, &id).unwrap(), data);

    let head = server
        .request(Method::HEAD, &format!("/v1/chunks/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        body.len().to_string()
    );
    assert_eq!(head.headers()["etag"], headers["etag"]);

    let absent = Digest::of(b"absent");
    assert_error(
        server.get(&format!("/v1/chunks/{absent}")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let head = server
        .request(Method::HEAD, &format!("/v1/chunks/{absent}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn chunk_round_trip_in_memory() {
    let server = Server::memory().await;
    chunk_round_trip(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn chunk_round_trip_in_a_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&format!("file://{}", dir.path().join("store").display())).unwrap();
    // No hot cache: every read goes to the directory.
    let server = Server::start(
        store,
        ServerConfig {
            cache_mem: 0,
            ..ServerConfig::default()
        },
    )
    .await;
    chunk_round_trip(&server).await;
    let id = Digest::of(&b"hello chunk ".repeat(1000)).to_hex();
    let stored = dir.path().join("store/chunks").join(&id[..2]).join(&id);
    assert!(
        stored.is_file(),
        "chunk laid out as chunks/<2 hex>/<64 hex>"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_uploads_are_refused_and_not_stored() {
    let server = Server::memory().await;
    let claimed = Digest::of(b"what the client claims");
    let path = format!("/v1/chunks/{claimed}");
    let response = server
        .send(Method::PUT, &path, frame::encode(b"something else", 3))
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "digest_mismatch").await;
    assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;

    let response = server
        .send(Method::PUT, &path, b"not a frame at all".to_vec())
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_frame").await;
    let mut truncated = frame::encode(&[9u8; 5000], 3);
    truncated.truncate(truncated.len() - 1);
    let response = server.send(Method::PUT, &path, truncated).await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_frame").await;
    assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;

    // There are no empty chunks: empty files and zeros are holes.
    let empty = [b'T', b'H', b'C', b'K', 1, 0, 0, 0, 0, 0, 0, 0];
    let path = format!("/v1/chunks/{}", Digest::of(b""));
    let response = server.send(Method::PUT, &path, empty.to_vec()).await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_frame").await;
    assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;
    server.stop().await;
}

#[tokio::test]
async fn missing_lists_unstored_ids_in_request_order() {
    let server = Server::memory().await;
    let (stored, _) = server.put_chunk(b"stored").await;
    let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
    let body = json!({ "ids": [b, stored, a, b] });
    let response = server.post_json("/v1/chunks/missing", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(
        reply,
        json!({ "missing": [b.to_string(), a.to_string(), b.to_string()] })
    );

    let reply: Value = server
        .post_json("/v1/chunks/missing", &json!({ "ids": [] }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply, json!({ "missing": [] }));
    server.stop().await;
}

/// Parses a batch response for `ids` into (id, frame if found) records.
fn parse_batch(body: &[u8], ids: &[Digest]) -> Vec<(Digest, Option<Vec<u8>>)> {
    thaw_format::wire::parse_batch(body, ids)
        .expect("a well-formed batch response")
        .into_iter()
        .map(|r| (r.id, r.frame.map(<[u8]>::to_vec)))
        .collect()
}

#[tokio::test]
async fn batch_reads_found_and_missing_ids_in_order() {
    let server = Server::memory().await;
    let (x, _) = server.put_chunk(b"chunk x").await;
    let (y, _) = server.put_chunk(&[7u8; 100_000]).await;
    let absent = Digest::of(b"absent");
    let served_before = server.metric("thaw_chunks_served_total").await;

    let response = server
        .post_json("/v1/chunks/batch", &json!({ "ids": [x, absent, y, x] }))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let records = parse_batch(&response.bytes().await.unwrap(), &[x, absent, y, x]);
    assert_eq!(
        records[0].1.as_deref(),
        Some(&frame::encode(b"chunk x", 3)[..])
    );
    assert_eq!(records[1].1, None);
    assert_eq!(
        frame::decode_verified(records[2].1.as_ref().unwrap(), &y).unwrap(),
        [7u8; 100_000]
    );

    let served_after = server.metric("thaw_chunks_served_total").await;
    assert_eq!(
        served_after - served_before,
        3,
        "each found record counts as a chunk served"
    );
    server.stop().await;
}

async fn manifest_needs_its_chunks(server: &Server) {
    let data = b"file contents".repeat(100);
    let (bytes, digest) = manifest_of(&data);
    let path = format!("/v1/manifests/{digest}");

    let body = assert_error(
        server.send(Method::PUT, &path, bytes.clone()).await,
        StatusCode::CONFLICT,
        "missing_chunks",
    )
    .await;
    assert_eq!(body["missing"], json!([Digest::of(&data).to_string()]));
    assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;

    server.put_chunk(&data).await;
    assert_eq!(
        server
            .send(Method::PUT, &path, bytes.clone())
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        server
            .send(Method::PUT, &path, bytes.clone())
            .await
            .status(),
        StatusCode::OK
    );

    let response = server.get(&path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), bytes);
    let head = server.request(Method::HEAD, &path).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        bytes.len().to_string()
    );

    let other = Digest::of(b"other");
    let response = server
        .send(Method::PUT, &format!("/v1/manifests/{other}"), bytes)
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "digest_mismatch").await;
    let junk = b"junk".to_vec();
    let response = server
        .send(
            Method::PUT,
            &format!("/v1/manifests/{}", Digest::of(&junk)),
            junk,
        )
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_manifest").await;
}

#[tokio::test]
async fn manifest_needs_its_chunks_in_memory() {
    let server = Server::memory().await;
    manifest_needs_its_chunks(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn manifest_needs_its_chunks_in_a_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        ServerConfig::default(),
    )
    .await;
    manifest_needs_its_chunks(&server).await;
    server.stop().await;
}

async fn tags_point_at_stored_manifests(server: &Server) {
    let data = b"tagged".to_vec();
    let (bytes, digest) = manifest_of(&data);
    let response = server
        .send(Method::PUT, "/v1/tags/py/3.12", digest.to_string())
        .await;
    assert_error(response, StatusCode::CONFLICT, "unknown_manifest").await;

    server.put_chunk(&data).await;
    server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), bytes)
        .await;
    for tag in ["3.12", "3.11", "latest"] {
        let response = server
            .send(
                Method::PUT,
                &format!("/v1/tags/py/{tag}"),
                format!(" {digest}\n"),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{tag}");
    }
    let response = server.get("/v1/tags/py/3.12").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.text().await.unwrap(), digest.to_string());
    assert_error(
        server.get("/v1/tags/py/3.13").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let list: Value = server.get("/v1/tags/py").await.json().await.unwrap();
    let d = digest.to_string();
    let expected = json!({ "name": "py", "tags": [
        { "tag": "3.11", "manifest": d }, { "tag": "3.12", "manifest": d }, { "tag": "latest", "manifest": d },
    ]});
    assert_eq!(list, expected);
    let empty: Value = server.get("/v1/tags/nothing").await.json().await.unwrap();
    assert_eq!(empty, json!({ "name": "nothing", "tags": [] }));

    for bad in [
        "/v1/tags/py/.hidden",
        "/v1/tags/-py/x",
        "/v1/tags/py/a%2Fb",
        "/v1/tags/py/a%20b",
    ] {
        assert_error(
            server.send(Method::PUT, bad, d.clone()).await,
            StatusCode::BAD_REQUEST,
            "bad_name",
        )
        .await;
    }
    let response = server
        .send(Method::PUT, "/v1/tags/py/x", "sha256:abc")
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_id").await;
}

#[tokio::test]
async fn tags_point_at_stored_manifests_in_memory() {
    let server = Server::memory().await;
    tags_point_at_stored_manifests(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn tags_point_at_stored_manifests_in_a_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        ServerConfig::default(),
    )
    .await;
    tags_point_at_stored_manifests(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn tokens_are_enforced() {
    let config = ServerConfig {
        push_token: Some("push-secret".into()),
        pull_token: Some("pull-secret".into()),
        ..ServerConfig::default()
    };
    let mut server = Server::start(open_store("memory://").unwrap(), config).await;
    let data = b"guarded";
    let id = Digest::of(data);
    let chunk = format!("/v1/chunks/{id}");

    let health = server.get("/v1/health").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({ "status": "ok" })
    );
    let response = server
        .send(Method::PUT, &chunk, frame::encode(data, 3))
        .await;
    let refused = assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert!(refused["message"].as_str().unwrap().contains("Bearer"));
    assert_error(
        server.get(&chunk).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_error(
        server.get("/metrics").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    server.with_token(Some("pull-secret"));
    assert_error(server.get(&chunk).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(
        server.put_chunk(data).await.1,
        StatusCode::UNAUTHORIZED,
        "the pull token cannot push"
    );
    let response = server
        .post_json("/v1/chunks/missing", &json!({ "ids": [id] }))
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        server
            .post_json("/v1/chunks/batch", &json!({ "ids": [id] }))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(server.get("/metrics").await.status(), StatusCode::OK);

    server.with_token(Some("pull-secreT"));
    assert_eq!(server.get(&chunk).await.status(), StatusCode::UNAUTHORIZED);

    server.with_token(Some("push-secret"));
    assert_eq!(server.put_chunk(data).await.1, StatusCode::CREATED);
    assert_eq!(
        server.get(&chunk).await.status(),
        StatusCode::OK,
        "the push token also pulls"
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_requests_get_413() {
    let config = ServerConfig {
        max_body: 1024,
        ..ServerConfig::default()
    };
    let server = Server::start(open_store("memory://").unwrap(), config).await;
    let digest = Digest::of(b"x");
    let response = server
        .send(
            Method::PUT,
            &format!("/v1/manifests/{digest}"),
            vec![0u8; 4096],
        )
        .await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    let response = server
        .send(Method::PUT, "/v1/tags/a/b", vec![b' '; 2048])
        .await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    let ids = vec![digest; 1025];
    let response = server
        .post_json("/v1/chunks/batch", &json!({ "ids": ids }))
        .await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    let ids = vec![digest; 100_001];
    let response = server
        .post_json("/v1/chunks/missing", &json!({ "ids": ids }))
        .await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_400_json() {
    let server = Server::memory().await;
    for bad in [
        "nope",
        "blake3:abc",
        &format!("blake3:{}", "A".repeat(64)),
        "sha256:00",
    ] {
        assert_error(
            server.get(&format!("/v1/chunks/{bad}")).await,
            StatusCode::BAD_REQUEST,
            "bad_id",
        )
        .await;
    }
    let response = server
        .send(Method::PUT, "/v1/manifests/blake3:zz", b"x".to_vec())
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_id").await;

    for body in ["{", "[]", "{\"ids\": 5}", "{\"ids\": [1]}", ""] {
        let response = server
            .request(Method::POST, "/v1/chunks/missing")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "bad_json").await;
    }
    let response = server
        .post_json("/v1/chunks/batch", &json!({ "ids": ["blake3:00"] }))
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_id").await;

    assert_error(
        server.get("/v2/whatever").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let response = server
        .send(
            Method::DELETE,
            &format!("/v1/chunks/{}", Digest::of(b"x")),
            "",
        )
        .await;
    assert_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    assert_eq!(
        server.get("/v1/health").await.status(),
        StatusCode::OK,
        "still serving"
    );
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_bytes_and_cache() {
    let server = Server::memory().await;
    let (id, _) = server.put_chunk(b"metered").await;
    let frame_len = frame::encode(b"metered", 3).len() as u64;
    let chunk = format!("/v1/chunks/{id}");
    server.request(Method::HEAD, &chunk).send().await.unwrap();
    let served = server.metric("thaw_chunks_served_total").await;
    assert_eq!(served, 0, "HEAD does not serve a chunk");
    let out_before = server.metric("thaw_http_bytes_out_total").await;

    server.get(&chunk).await.bytes().await.unwrap();
    server.get(&chunk).await.bytes().await.unwrap();
    assert_eq!(server.metric("thaw_chunks_served_total").await, 2);
    assert_eq!(
        server.metric("thaw_hot_cache_hits_total").await,
        2,
        "uploads fill the hot cache"
    );
    assert_eq!(server.metric("thaw_hot_cache_bytes").await, frame_len);
    assert_eq!(server.metric("thaw_http_bytes_in_total").await, frame_len);
    // Two frames, plus the metrics text of the read above.
    assert!(server.metric("thaw_http_bytes_out_total").await >= out_before + 2 * frame_len);
    let route = "thaw_http_requests_total{route=\"/v1/chunks/{id}\",status=\"200\"}";
    assert_eq!(server.metric(route).await, 3, "one HEAD and two GETs");
    assert_eq!(
        server
            .metric("thaw_http_requests_total{route=\"/v1/chunks/{id}\",status=\"201\"}")
            .await,
        1
    );

    let absent = Digest::of(b"absent");
    server.get(&format!("/v1/chunks/{absent}")).await;
    assert_eq!(server.metric("thaw_hot_cache_misses_total").await, 1);
    server.get("/nowhere").await;
    assert_eq!(
        server
            .metric("thaw_http_requests_total{route=\"unmatched\",status=\"404\"}")
            .await,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn run_serves_a_directory_store_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("new/store");
    let config = ServerConfig {
        store_url: format!("file://{}", store_dir.display()),
        ..ServerConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, config, async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::new();
    let data = b"persisted".to_vec();
    let id = Digest::of(&data);
    let response = http
        .put(format!("{base}/v1/chunks/{id}"))
        .body(frame::encode(&data, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(store_dir
        .join("chunks")
        .join(&id.to_hex()[..2])
        .join(id.to_hex())
        .is_file());

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(
        http.get(format!("{base}/v1/health")).send().await.is_err(),
        "stopped serving"
    );

    // A new server over the same directory sees what the first stored.
    let store = open_store(&format!("file://{}", store_dir.display())).unwrap();
    let again = Server::start(store, ServerConfig::default()).await;
    assert_eq!(
        again.get(&format!("/v1/chunks/{id}")).await.status(),
        StatusCode::OK
    );
    again.stop().await;
}

#[test]
fn open_store_refuses_unknown_schemes() {
    let err = open_store("ftp://host/x").expect_err("ftp is not a store");
    assert!(err.to_string().contains("unsupported scheme"), "{err}");
    assert!(open_store("file://relative/path").is_err());
    assert!(open_store("memory://").is_ok());
}

#[tokio::test]
async fn oversized_chunk_upload_gets_413() {
    let server = Server::memory().await;
    let id = Digest::of(b"big");
    let body = vec![0u8; thaw_format::MAX_CHUNK_LEN + (1 << 20) + 1];
    let response = server
        .send(Method::PUT, &format!("/v1/chunks/{id}"), body)
        .await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "too_large").await;
    server.stop().await;
}

#[tokio::test]
async fn one_request_slot_still_serves_concurrent_clients() {
    let config = ServerConfig {
        max_concurrency: 1,
        max_uploads: 1,
        ..ServerConfig::default()
    };
    let server = Server::start(open_store("memory://").unwrap(), config).await;
    let data: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 1000]).collect();
    let uploads = data.iter().map(|d| server.put_chunk(d));
    for (_, status) in futures::future::join_all(uploads).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_slow_saturated_store_keeps_batch_and_missing_order() {
    use object_store::limit::LimitStore;
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    use std::time::Duration;

    // Later chunks are smaller, so they come back from the store first.
    let throttle = ThrottleConfig {
        wait_get_per_call: Duration::from_millis(2),
        wait_get_per_byte: Duration::from_micros(1),
        ..ThrottleConfig::default()
    };
    let store = LimitStore::new(ThrottledStore::new(InMemory::new(), throttle), 4);
    let config = ServerConfig {
        cache_mem: 0,
        ..ServerConfig::default()
    };
    let server = Server::start(Arc::new(store), config).await;
    let data: Vec<Vec<u8>> = (0..24u32)
        .map(|i| (0..(24 - i) * 97).map(|b| (b ^ i) as u8).collect())
        .collect();
    let mut ids = Vec::new();
    for (i, d) in data.iter().enumerate() {
        let (id, status) = server.put_chunk(d).await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(id);
        if i % 3 == 0 {
            ids.push(Digest::of(&[i as u8, 0xff]));
        }
    }

    let response = server
        .post_json("/v1/chunks/batch", &json!({ "ids": ids }))
        .await;
    let records = parse_batch(&response.bytes().await.unwrap(), &ids);
    for (id, frame) in &records {
        if let Some(frame) = frame {
            frame::decode_verified(frame, id).unwrap();
        }
    }
    let reply: Value = server
        .post_json("/v1/chunks/missing", &json!({ "ids": ids }))
        .await
        .json()
        .await
        .unwrap();
    let expected: Vec<String> = records
        .iter()
        .filter(|(_, f)| f.is_none())
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(reply["missing"], json!(expected));
    server.stop().await;
}
