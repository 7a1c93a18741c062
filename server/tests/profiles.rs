//! Profiles over the HTTP API: attached to stored manifests, checked against
//! them, replaced by later uploads, guarded by the tokens.

mod common;

use common::{assert_error, manifest_of, Server};
use reqwest::{Method, StatusCode};
use thaw_format::{Digest, FileRange, Profile, ProfileEntry};
use thaw_server::{open_store, ServerConfig};

/// A profile of the one-file manifest of `data`: its one chunk, read whole.
fn profile_of(data: &[u8], manifest: Digest, runs: u32) -> Profile {
    Profile {
        manifest,
        runs,
        entries: vec![ProfileEntry {
            id: Digest::of(data),
            len: data.len() as u32,
            at_ms: 3,
            reads: 1,
            readahead: false,
            ranges: vec![FileRange {
                node: 1,
                offset: 0,
                len: data.len() as u32,
            }],
        }],
    }
}

async fn put_profile(server: &Server, digest: &Digest, body: Vec<u8>) -> reqwest::Response {
    server
        .send(Method::PUT, &format!("/v1/profiles/{digest}"), body)
        .await
}

async fn profiles_attach_to_stored_manifests(server: &Server) {
    let data = b"profiled chunk ".repeat(100);
    let (manifest, digest) = manifest_of(&data);
    let path = format!("/v1/profiles/{digest}");
    let one = profile_of(&data, digest, 1);
    let response = put_profile(server, &digest, one.encode()).await;
    assert_error(response, StatusCode::CONFLICT, "unknown_manifest").await;
    assert_error(server.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;

    server.put_chunk(&data).await;
    let stored = server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), manifest)
        .await;
    assert_eq!(stored.status(), StatusCode::CREATED);
    let response = put_profile(server, &digest, one.encode()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = put_profile(server, &digest, one.encode()).await;
    assert_eq!(response.status(), StatusCode::OK, "the same profile again");

    let response = server.get(&path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    let body = response.bytes().await.unwrap();
    assert_eq!(body.as_ref(), one.encode(), "served as uploaded");
    assert_eq!(
        headers["etag"].to_str().unwrap(),
        format!("\"{}\"", Digest::of(&body))
    );
    let head = server.request(Method::HEAD, &path).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        body.len().to_string()
    );

    // A later upload (more recordings merged) replaces it.
    let two = profile_of(&data, digest, 2);
    let response = put_profile(server, &digest, two.encode()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = server.get(&path).await.bytes().await.unwrap();
    assert_eq!(Profile::decode(&body).unwrap(), two);

    // What does not fit the manifest is refused, and nothing changes.
    let mut damaged = one.encode();
    damaged[80] ^= 1;
    let other = profile_of(&data, Digest::of(b"another manifest"), 1);
    let stranger = profile_of(b"a chunk of another image", digest, 1);
    let mut on_the_root = profile_of(&data, digest, 1);
    on_the_root.entries[0].ranges[0].node = 0;
    let mut past_the_end = profile_of(&data, digest, 1);
    past_the_end.entries[0].ranges[0].offset = 1;
    for (body, what) in [
        (b"junk".to_vec(), "junk"),
        (damaged, "a damaged profile"),
        (other.encode(), "a profile of another manifest"),
        (stranger.encode(), "a chunk the image lacks"),
        (on_the_root.encode(), "a range of a directory"),
        (past_the_end.encode(), "a range past the file's end"),
    ] {
        let response = put_profile(server, &digest, body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        assert_error(response, StatusCode::BAD_REQUEST, "bad_profile").await;
    }
    let body = server.get(&path).await.bytes().await.unwrap();
    assert_eq!(Profile::decode(&body).unwrap(), two);
    let response = server
        .send(Method::PUT, "/v1/profiles/blake3:nothex", one.encode())
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "bad_id").await;
}

#[tokio::test]
async fn profiles_attach_to_stored_manifests_in_memory() {
    let server = Server::memory().await;
    profiles_attach_to_stored_manifests(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn profiles_attach_to_stored_manifests_in_a_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        open_store(dir.path().to_str().unwrap()).unwrap(),
        ServerConfig::default(),
    )
    .await;
    profiles_attach_to_stored_manifests(&server).await;
    let (_, digest) = manifest_of(&b"profiled chunk ".repeat(100));
    let stored = dir.path().join("profiles").join(digest.to_hex());
    assert!(stored.is_file(), "laid out as profiles/<64 hex>");
    server.stop().await;
}

#[tokio::test]
async fn profiles_take_the_push_token_to_write_and_the_pull_token_to_read() {
    let config = ServerConfig {
        push_token: Some("push-secret".into()),
        pull_token: Some("pull-secret".into()),
        ..ServerConfig::default()
    };
    let mut server = Server::start(open_store("memory://").unwrap(), config).await;
    let data = b"guarded profile".to_vec();
    let (manifest, digest) = manifest_of(&data);
    let path = format!("/v1/profiles/{digest}");
    server.with_token(Some("push-secret"));
    server.put_chunk(&data).await;
    server
        .send(Method::PUT, &format!("/v1/manifests/{digest}"), manifest)
        .await;
    let body = profile_of(&data, digest, 1).encode();

    server.with_token(None);
    let response = put_profile(&server, &digest, body.clone()).await;
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    server.with_token(Some("pull-secret"));
    let response = put_profile(&server, &digest, body.clone()).await;
    assert_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    server.with_token(Some("push-secret"));
    let response = put_profile(&server, &digest, body).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    server.with_token(None);
    assert_error(
        server.get(&path).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    server.with_token(Some("pull-secret"));
    assert_eq!(server.get(&path).await.status(), StatusCode::OK);
    server.stop().await;
}
