//! Garbage collection against a served store: what no tag reaches goes,
//! what one reaches stays, kept versions and the grace period protect what
//! they should, a manifest uploaded while a collection swept its chunk
//! brings it back, and the hot cache never vouches for a removed chunk.

mod common;

use common::{assert_error, manifest_naming, Server};
use object_store::path::Path;
use object_store::ObjectStore;
use reqwest::{Method, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use thaw_format::{ChunkRef, Digest};
use thaw_server::{gc, open_store, GcOptions, ServerConfig};

fn chunk_ref(data: &[u8]) -> ChunkRef {
    ChunkRef {
        id: Digest::of(data),
        len: data.len() as u32,
    }
}

/// Uploads the chunks `data`, a manifest of them, and tags it `img:tag`.
async fn push(server: &Server, data: &[&[u8]], tag: Option<&str>) -> Digest {
    for d in data {
        let (_, status) = server.put_chunk(d).await;
        assert!(status.is_success(), "{status}");
    }
    let refs: Vec<ChunkRef> = data.iter().map(|d| chunk_ref(d)).collect();
    let (bytes, digest) = manifest_naming(&refs);
    let put = server
        .request(Method::PUT, &format!("/v1/manifests/{digest}"))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    if let Some(tag) = tag {
        let put = server
            .request(Method::PUT, &format!("/v1/tags/img/{tag}"))
            .body(digest.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK);
    }
    digest
}

async fn stored(store: &Arc<dyn ObjectStore>, path: &str) -> bool {
    store.head(&Path::from(path)).await.is_ok()
}

fn chunk_path(data: &[u8]) -> String {
    let hex = Digest::of(data).to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

fn now(keep: usize) -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        keep,
        ..GcOptions::default()
    }
}

#[tokio::test]
async fn what_no_tag_reaches_goes_and_kept_versions_stay() {
    let store = open_store("memory://").unwrap();
    let server = Server::start(store.clone(), ServerConfig::default()).await;
    let (a, b, c) = (&b"only in v1"[..], &b"in both"[..], &b"only in v2"[..]);
    let v1 = push(&server, &[a, b], Some("t")).await;
    let v2 = push(&server, &[b, c], Some("t")).await;

    let dry = gc(
        &store,
        &GcOptions {
            dry_run: true,
            ..now(1)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.manifests_removed, dry.chunks_removed),
        (1, 1),
        "{dry:?}"
    );
    assert!(
        stored(&store, &chunk_path(a)).await,
        "a dry run removes nothing"
    );

    let kept = gc(&store, &now(2)).await.unwrap();
    assert_eq!(
        (kept.manifests_removed, kept.chunks_removed),
        (0, 0),
        "{kept:?}"
    );

    let report = gc(&store, &now(1)).await.unwrap();
    assert_eq!(report.manifests_removed, 1, "{report:?}");
    assert_eq!(report.chunks_removed, 1, "{report:?}");
    assert!(!stored(&store, &format!("manifests/{}", v1.to_hex())).await);
    assert!(!stored(&store, &chunk_path(a)).await, "v1's own chunk went");
    assert!(stored(&store, &format!("manifests/{}", v2.to_hex())).await);
    for kept in [b, c] {
        assert!(stored(&store, &chunk_path(kept)).await);
    }
    let tag = server.get("/v1/tags/img/t").await;
    assert_eq!(tag.text().await.unwrap(), v2.to_string());
    // The removed chunk is no longer claimed, though the hot cache holds it.
    let missing = server
        .post_json(
            "/v1/chunks/missing",
            &serde_json::json!({ "ids": [Digest::of(a)] }),
        )
        .await;
    let missing: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(missing["missing"][0], Digest::of(a).to_string());
    let head = server
        .request(Method::HEAD, &format!("/v1/chunks/{}", Digest::of(a)))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn an_untagged_push_within_the_grace_period_stays() {
    let store = open_store("memory://").unwrap();
    let server = Server::start(store.clone(), ServerConfig::default()).await;
    let data = &b"pushed, not tagged yet"[..];
    let digest = push(&server, &[data], None).await;
    let report = gc(&store, &GcOptions::default()).await.unwrap();
    assert_eq!(report.live_manifests, 1, "{report:?}");
    assert_eq!(report.chunks_removed, 0, "{report:?}");
    assert!(stored(&store, &format!("manifests/{}", digest.to_hex())).await);
    // Once the grace period is over, it goes.
    let report = gc(&store, &now(1)).await.unwrap();
    assert_eq!((report.manifests_removed, report.chunks_removed), (1, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_manifest_uploaded_while_a_collection_swept_its_chunk_brings_it_back() {
    let store = open_store("memory://").unwrap();
    let server = Server::start(store.clone(), ServerConfig::default()).await;
    let data = &b"old, untagged, about to be reused"[..];
    let (_, status) = server.put_chunk(data).await;
    assert!(status.is_success());
    // A collection has just moved the chunk to its trash, and still runs.
    let path = Path::from(chunk_path(data));
    let trashed = Path::from(format!("trash/000000000001/{}", chunk_path(data)));
    store.rename(&path, &trashed).await.unwrap();
    let (bytes, digest) = manifest_naming(&[chunk_ref(data)]);
    let upload = |bytes: Vec<u8>| {
        server
            .request(Method::PUT, &format!("/v1/manifests/{digest}"))
            .body(bytes)
            .send()
    };
    // With no collection running, the chunk is simply missing.
    assert_error(
        upload(bytes.clone()).await.unwrap(),
        StatusCode::CONFLICT,
        "missing_chunks",
    )
    .await;
    store
        .put(&Path::from("gc/running"), "000000000001".into())
        .await
        .unwrap();
    // The check before storing still finds it missing: the pusher uploads it.
    assert_error(
        upload(bytes.clone()).await.unwrap(),
        StatusCode::CONFLICT,
        "missing_chunks",
    )
    .await;
    store.rename(&trashed, &path).await.unwrap();
    assert_eq!(upload(bytes).await.unwrap().status(), StatusCode::CREATED);
    // The collection sweeps the chunk after the manifest's check: a tag set
    // on the manifest while it runs checks again and brings it back (the
    // manifest's own upload does the same after storing it).
    store.rename(&path, &trashed).await.unwrap();
    let tag = server
        .request(Method::PUT, "/v1/tags/img/t")
        .body(digest.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(tag.status(), StatusCode::OK);
    assert!(
        stored(&store, &chunk_path(data)).await,
        "the tag brought the chunk back from the trash"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_api_runs_a_collection_with_the_push_token() {
    let store = open_store("memory://").unwrap();
    let config = ServerConfig {
        push_token: Some("push".into()),
        ..ServerConfig::default()
    };
    let mut server = Server::start(store.clone(), config).await;
    let refused = server.request(Method::POST, "/v1/gc").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    server.with_token(Some("push"));
    push(&server, &[&b"unreachable"[..]], None).await;
    let answer = server
        .request(Method::POST, "/v1/gc?grace=0&dry_run=true")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let report: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["manifests_removed"], 1);
    assert!(stored(&store, &chunk_path(b"unreachable")).await);
    let answer = server
        .request(Method::POST, "/v1/gc?grace=0")
        .send()
        .await
        .unwrap();
    let report: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(report["chunks_removed"], 1, "{report}");
    assert!(!stored(&store, &chunk_path(b"unreachable")).await);
    server.stop().await;
}

#[tokio::test]
async fn trash_older_than_the_grace_period_is_deleted_unless_live() {
    let store = open_store("memory://").unwrap();
    let server = Server::start(store.clone(), ServerConfig::default()).await;
    let live = &b"tagged"[..];
    push(&server, &[live], Some("t")).await;
    let gone = &b"collected long ago"[..];
    // An old run's trash: one chunk no one names, one a tag names again.
    let trashed = |data| Path::from(format!("trash/000000000001/{}", chunk_path(data)));
    store.put(&trashed(gone), "x".into()).await.unwrap();
    store
        .rename(&Path::from(chunk_path(live)), &trashed(live))
        .await
        .unwrap();
    let report = gc(&store, &now(1)).await.unwrap();
    assert_eq!(report.trash_deleted, 1, "{report:?}");
    assert_eq!(report.restored, 1, "{report:?}");
    assert!(stored(&store, &chunk_path(live)).await);
    server.stop().await;
}
