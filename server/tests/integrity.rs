//! What the server checks about what it holds: the chunk lengths a manifest
//! gives, frames that rot in the store (quarantined when read, replaced by a
//! re-upload), manifests that rot (replaced by a re-upload), fsck, and the
//! size of the missing-chunks answer.

mod common;

use common::{assert_error, manifest_naming, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use thaw_format::{frame, ChunkRef, Digest};
use thaw_server::{fsck, open_store, FsckOptions, ServerConfig};
use thaw_testkit::noise;

/// A server without a hot cache over a directory store, and that directory.
async fn directory_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path().to_str().unwrap()).unwrap();
    let config = ServerConfig {
        cache_mem: 0,
        ..ServerConfig::default()
    };
    (Server::start(store, config).await, dir)
}

fn chunk_file(store: &Path, id: &Digest) -> PathBuf {
    let hex = id.to_hex();
    store.join("chunks").join(&hex[..2]).join(&hex)
}

fn quarantined_chunk_file(store: &Path, id: &Digest) -> PathBuf {
    let hex = id.to_hex();
    store.join("quarantine/chunks").join(&hex[..2]).join(&hex)
}

/// Flips the bits of the byte at `at` of a stored object, as a bad disk would.
fn flip_byte(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test]
async fn a_manifest_misstating_a_chunk_length_is_refused() {
    let server = Server::memory().await;
    let (id, _) = server.put_chunk(b"hello world").await;
    for wrong in [1000, 5] {
        let (bytes, digest) = manifest_naming(&[ChunkRef { id, len: wrong }]);
        let path = format!("/v1/manifests/{digest}");
        let response = server.send(Method::PUT, &path, bytes).await;
        let body = assert_error(response, StatusCode::BAD_REQUEST, "bad_manifest").await;
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(&id.to_string()), "{message}");
        assert!(message.contains(&format!("{wrong} bytes")), "{message}");
        assert!(message.contains("11 bytes"), "{message}");
        assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    let (bytes, digest) = manifest_naming(&[ChunkRef { id, len: 11 }]);
    let response = server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), bytes)
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test]
async fn the_missing_chunks_answer_is_bounded() {
    let server = Server::memory().await;
    let (stored, _) = server.put_chunk(b"stored").await;
    let absent = |i: u32| ChunkRef {
        id: Digest::of(&i.to_le_bytes()),
        len: 4,
    };
    let mut chunks = vec![ChunkRef { id: stored, len: 6 }];
    chunks.extend((0..5000).map(absent));
    let (bytes, digest) = manifest_naming(&chunks);
    let response = server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), bytes)
        .await;
    let body = assert_error(response, StatusCode::CONFLICT, "missing_chunks").await;
    let listed: Vec<String> = chunks[1..1001].iter().map(|c| c.id.to_string()).collect();
    assert_eq!(body["missing"], json!(listed), "the first 1,000, in order");
    assert_eq!(body["truncated"], true);

    let (bytes, digest) = manifest_naming(&[chunks[0], absent(1), absent(2)]);
    let response = server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), bytes)
        .await;
    let body = assert_error(response, StatusCode::CONFLICT, "missing_chunks").await;
    let listed = [absent(1).id.to_string(), absent(2).id.to_string()];
    assert_eq!(body["missing"], json!(listed));
    assert_eq!(body.get("truncated"), None, "a whole list is not truncated");
    server.stop().await;
}

#[tokio::test]
async fn a_corrupt_chunk_is_quarantined_and_a_reupload_repairs_it() {
    let (server, dir) = directory_server().await;
    let (a, b) = (noise(1, 5000), noise(2, 7000));
    let (id_a, _) = server.put_chunk(&a).await;
    let (id_b, _) = server.put_chunk(&b).await;
    flip_byte(&chunk_file(dir.path(), &id_a), 4000);
    flip_byte(&chunk_file(dir.path(), &id_b), 100);

    // Reads fail cleanly: not found, never the bad bytes.
    let path_a = format!("/v1/chunks/{id_a}");
    assert_error(
        server.get(&path_a).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let response = server
        .post_json("/v1/chunks/batch", &json!({ "ids": [id_b] }))
        .await;
    let body = response.bytes().await.unwrap();
    let records = thaw_format::wire::parse_batch(&body, &[id_b]).unwrap();
    assert_eq!(records[0].frame, None, "a bad frame is a record not found");
    for id in [id_a, id_b] {
        assert!(!chunk_file(dir.path(), &id).exists());
        assert!(quarantined_chunk_file(dir.path(), &id).is_file());
    }
    assert_eq!(server.metric("thaw_quarantined_total").await, 2);

    // So an uploader learns they are missing, and uploads them again.
    let reply: Value = server
        .post_json("/v1/chunks/missing", &json!({ "ids": [id_a, id_b] }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply, json!({ "missing": [id_a, id_b] }));
    assert_eq!(server.put_chunk(&a).await.1, StatusCode::CREATED);
    let response = server.get(&path_a).await;
    assert_eq!(response.status(), StatusCode::OK);
    let frame = response.bytes().await.unwrap();
    assert_eq!(frame::decode_verified(&frame, &id_a).unwrap(), a);
    server.stop().await;
}

/// Compressed frames are sealed: read back from the store, they are checked
/// by their seal, which is keyed by the chunk id, so a damaged frame and a
/// good frame under another chunk's name are both caught.
#[tokio::test]
async fn a_sealed_frame_read_back_is_checked_by_its_seal() {
    let (server, dir) = directory_server().await;
    let text = |seed: u8| -> Vec<u8> {
        (0..200_000u32)
            .map(|i| b"the quick brown fox "[(i as usize + seed as usize) % 20] ^ (i / 4000) as u8)
            .collect()
    };
    let (a, b, c) = (text(1), text(2), text(3));
    let mut ids = Vec::new();
    for data in [&a, &b, &c] {
        let (id, status) = server.put_chunk(data).await;
        assert_eq!(status, StatusCode::CREATED);
        let stored = std::fs::read(chunk_file(dir.path(), &id)).unwrap();
        assert_eq!(stored[5] & 4, 4, "a compressed frame is sealed");
        assert!(stored.len() < data.len() / 4);
        ids.push(id);
    }
    let (id_a, id_b, id_c) = (ids[0], ids[1], ids[2]);
    // Damage in the payload; c's good frame stored under b's name.
    let file_a = chunk_file(dir.path(), &id_a);
    let len_a = std::fs::metadata(&file_a).unwrap().len() as usize;
    flip_byte(&file_a, len_a / 2);
    std::fs::copy(chunk_file(dir.path(), &id_c), chunk_file(dir.path(), &id_b)).unwrap();
    for id in [id_a, id_b] {
        assert_error(
            server.get(&format!("/v1/chunks/{id}")).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
        assert!(quarantined_chunk_file(dir.path(), &id).is_file());
    }
    assert_eq!(server.metric("thaw_quarantined_total").await, 2);
    // c itself is untouched and served; re-uploads repair a and b.
    let served = |id: Digest| {
        let server = &server;
        async move {
            let got = server.get(&format!("/v1/chunks/{id}")).await;
            frame::decode_verified(&got.bytes().await.unwrap(), &id).unwrap()
        }
    };
    assert_eq!(served(id_c).await, c);
    for (id, data) in [(id_a, &a), (id_b, &b)] {
        assert_eq!(server.put_chunk(data).await.1, StatusCode::CREATED);
        assert_eq!(&served(id).await, data);
    }
    server.stop().await;
}

#[tokio::test]
async fn an_upload_rewrites_a_stored_chunk_that_fails_verification() {
    let (server, dir) = directory_server().await;
    let data = noise(3, 5000);
    let (id, _) = server.put_chunk(&data).await;
    let file = chunk_file(dir.path(), &id);
    flip_byte(&file, 2500);

    assert_eq!(
        server.put_chunk(&data).await.1,
        StatusCode::CREATED,
        "the upload replaces the bad frame"
    );
    assert_eq!(std::fs::read(&file).unwrap(), frame::encode(&data, 3));
    assert!(quarantined_chunk_file(dir.path(), &id).is_file());
    assert_eq!(
        server.put_chunk(&data).await.1,
        StatusCode::OK,
        "a good frame is kept"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_damaged_frame_header_makes_the_chunk_missing_not_the_manifest_wrong() {
    let (server, dir) = directory_server().await;
    let data = noise(4, 3000);
    let (id, _) = server.put_chunk(&data).await;
    // The frame now declares another length than the manifest gives.
    flip_byte(&chunk_file(dir.path(), &id), 9);
    let (bytes, digest) = manifest_naming(&[ChunkRef { id, len: 3000 }]);
    let path = format!("/v1/manifests/{digest}");
    let response = server.send(Method::PUT, &path, bytes.clone()).await;
    let body = assert_error(response, StatusCode::CONFLICT, "missing_chunks").await;
    assert_eq!(body["missing"], json!([id]));
    assert!(quarantined_chunk_file(dir.path(), &id).is_file());

    server.put_chunk(&data).await;
    let response = server.send(Method::PUT, &path, bytes).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test]
async fn an_upload_rewrites_a_stored_manifest_that_went_bad() {
    let (server, dir) = directory_server().await;
    let data = noise(5, 1000);
    let (id, _) = server.put_chunk(&data).await;
    let (bytes, digest) = manifest_naming(&[ChunkRef { id, len: 1000 }]);
    let path = format!("/v1/manifests/{digest}");
    server.send(Method::PUT, &path, bytes.clone()).await;
    let file = dir.path().join("manifests").join(digest.to_hex());
    flip_byte(&file, 70);

    let response = server.send(Method::PUT, &path, bytes.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    assert!(dir
        .path()
        .join("quarantine/manifests")
        .join(digest.to_hex())
        .is_file());
    let response = server.send(Method::PUT, &path, bytes).await;
    assert_eq!(response.status(), StatusCode::OK, "a good copy is kept");
    server.stop().await;
}

#[tokio::test]
async fn fsck_finds_and_quarantines_what_does_not_match_its_name() {
    let (server, dir) = directory_server().await;
    let (a, b) = (noise(6, 2000), noise(7, 3000));
    let (id_a, _) = server.put_chunk(&a).await;
    let (id_b, _) = server.put_chunk(&b).await;
    let chunks = [
        ChunkRef {
            id: id_a,
            len: 2000,
        },
        ChunkRef {
            id: id_b,
            len: 3000,
        },
    ];
    let (bytes, digest) = manifest_naming(&chunks);
    let response = server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), bytes)
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;

    flip_byte(&chunk_file(dir.path(), &id_a), 1500);
    let misplaced = dir.path().join("chunks/00").join(id_b.to_hex());
    std::fs::create_dir_all(misplaced.parent().unwrap()).unwrap();
    std::fs::copy(chunk_file(dir.path(), &id_b), &misplaced).unwrap();
    let junk = dir
        .path()
        .join("manifests")
        .join(Digest::of(b"junk").to_hex());
    std::fs::write(&junk, b"junk").unwrap();

    let store = open_store(dir.path().to_str().unwrap()).unwrap();
    let report = fsck(&store, &FsckOptions::default(), &|_| {})
        .await
        .unwrap();
    assert_eq!((report.chunks, report.manifests), (3, 2));
    let mut bad: Vec<_> = report.bad.iter().map(|b| b.path.as_str()).collect();
    bad.sort();
    let a_path = format!("chunks/{}/{}", &id_a.to_hex()[..2], id_a.to_hex());
    let misplaced_path = format!("chunks/00/{}", id_b.to_hex());
    let junk_path = format!("manifests/{}", Digest::of(b"junk").to_hex());
    let mut expected = [a_path.as_str(), misplaced_path.as_str(), junk_path.as_str()];
    expected.sort();
    assert_eq!(bad, expected);
    assert!(report
        .bad
        .iter()
        .all(|b| !b.quarantined && !b.reason.is_empty()));
    assert_eq!(report.incomplete_manifests.len(), 1);
    assert_eq!(report.incomplete_manifests[0].manifest, digest);
    assert_eq!(report.incomplete_manifests[0].missing_chunks, 1);
    assert!(chunk_file(dir.path(), &id_a).is_file(), "only reported");

    let quarantine = FsckOptions {
        quarantine: true,
        ..FsckOptions::default()
    };
    let report = fsck(&store, &quarantine, &|_| {}).await.unwrap();
    assert_eq!(report.bad.len(), 3);
    assert!(report.bad.iter().all(|b| b.quarantined));
    assert!(!chunk_file(dir.path(), &id_a).exists());
    assert!(quarantined_chunk_file(dir.path(), &id_a).is_file());
    assert!(!misplaced.exists() && !junk.exists());

    let report = fsck(&store, &FsckOptions::default(), &|_| {})
        .await
        .unwrap();
    assert!(report.bad.is_empty());
    assert_eq!(
        report.incomplete_manifests.len(),
        1,
        "a re-push is still due"
    );
    assert!(!report.is_clean());
}
