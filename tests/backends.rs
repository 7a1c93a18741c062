//! One behaviour suite for every store backend, as `object_store` runs one
//! conformance suite for each of its stores: a real `thaw serve` over a
//! directory (`file`), over memory (`memory`), and over a three-node Garage
//! cluster on loopback (`s3`; SKIP where Garage is not installed). Each
//! behaviour is a function; `suite!` makes a test of it per backend.

use std::path::Path;
use thaw_testkit::garage::Garage;
use thaw_testkit::tree::write;
use thaw_testkit::{assert_same_tree, noise, s, thaw, thaw_ok, Mount, Server};

/// Where a backend's store is, and how a server reaches it.
struct Backend {
    tmp: tempfile::TempDir,
    url: String,
    env: Vec<(String, String)>,
    _garage: Option<Garage>,
}

/// Each backend's constructor takes the test's name (the S3 one says SKIP
/// with it where Garage is missing).
impl Backend {
    fn file(_test: &str) -> Option<Backend> {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("file://{}", tmp.path().join("store").display());
        Some(Backend {
            tmp,
            url,
            env: Vec::new(),
            _garage: None,
        })
    }

    fn memory(_test: &str) -> Option<Backend> {
        Some(Backend {
            tmp: tempfile::tempdir().unwrap(),
            url: "memory://".into(),
            env: Vec::new(),
            _garage: None,
        })
    }

    fn s3(test: &str) -> Option<Backend> {
        let garage = Garage::start(test)?;
        Some(Backend {
            tmp: tempfile::tempdir().unwrap(),
            url: format!("{}/suite", garage.bucket_url),
            env: garage.env.clone(),
            _garage: Some(garage),
        })
    }

    fn server(&self, extra: &[&str]) -> Server {
        Server::start_url(&self.url, &self.env, extra)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.tmp.path().join(name)
    }
}

/// A small tree: a file of its own data, a shared one, a small one.
fn tree(dir: &Path, seed: u64) {
    write(&dir.join("big.bin"), &noise(seed, 3 << 20));
    write(&dir.join("lib/shared.bin"), &noise(7, 1 << 20));
    write(
        &dir.join("lib/small.txt"),
        format!("tree {seed}").as_bytes(),
    );
}

fn push_and_export_round_trip(b: &Backend) {
    let server = b.server(&[]);
    let src = b.path("src");
    tree(&src, 1);
    let r = server.reference("app:v1");
    thaw_ok(&["push", s(&src), &r]);
    let out = b.path("out");
    thaw_ok(&["export", &r, s(&out)]);
    assert_same_tree(&src, &out);
}

fn a_mount_reads_what_was_pushed(b: &Backend) {
    let server = b.server(&[]);
    let src = b.path("src");
    tree(&src, 2);
    let r = server.reference("app:v1");
    thaw_ok(&["push", s(&src), &r]);
    let cache = b.path("cache");
    let mount = Mount::new(&r, &b.path("mnt"), &["--cache-dir", s(&cache)]);
    let got = std::fs::read(b.path("mnt/big.bin")).unwrap();
    assert!(got == std::fs::read(src.join("big.bin")).unwrap());
    let stats = mount.stats();
    assert!(stats["chunks_fetched"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["digest_mismatches"], 0, "{stats}");
}

fn concurrent_pushes_of_one_tag_leave_one_whole_image(b: &Backend) {
    let server = b.server(&[]);
    let r = server.reference("app:latest");
    let sources: Vec<_> = (10..14)
        .map(|seed| {
            let src = b.path(&format!("src{seed}"));
            tree(&src, seed);
            src
        })
        .collect();
    std::thread::scope(|scope| {
        for src in &sources {
            let r = &r;
            scope.spawn(move || thaw_ok(&["push", s(src), r]));
        }
    });
    let out = b.path("out");
    thaw_ok(&["export", &r, s(&out)]);
    let got = std::fs::read(out.join("lib/small.txt")).unwrap();
    let seed: u64 = String::from_utf8(got).unwrap()["tree ".len()..]
        .parse()
        .unwrap();
    assert_same_tree(&b.path(&format!("src{seed}")), &out);
}

fn missing_chunks_are_answered_as_missing(b: &Backend) {
    let server = b.server(&[]);
    let absent = thaw_format::Digest::of(b"never pushed");
    let http = reqwest::blocking::Client::new();
    let get = http
        .get(format!("{}/v1/chunks/{absent}", server.url()))
        .send()
        .unwrap();
    assert_eq!(get.status(), 404);
    let missing: serde_json::Value = http
        .post(format!("{}/v1/chunks/missing", server.url()))
        .json(&serde_json::json!({ "ids": [absent] }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(missing["missing"][0], absent.to_string());
    let export = thaw(&[
        "export",
        &server.reference("nothing:here"),
        s(&b.path("out")),
    ]);
    assert!(!export.status.success());
}

fn writes_need_the_push_token(b: &Backend) {
    let token = b.path("token");
    std::fs::write(&token, "s3cret").unwrap();
    let server = b.server(&["--push-token-file", s(&token)]);
    let src = b.path("src");
    tree(&src, 3);
    let r = server.reference("app:v1");
    let refused = thaw(&["push", s(&src), &r]);
    assert!(!refused.status.success(), "a push without the token");
    thaw_ok(&["push", s(&src), &r, "--token-file", s(&token)]);
    let out = b.path("out");
    thaw_ok(&["export", &r, s(&out)]);
    assert_same_tree(&src, &out);
}

fn a_collection_keeps_what_tags_reach(b: &Backend) {
    let server = b.server(&[]);
    let r = server.reference("app:latest");
    let (v1, v2) = (b.path("v1"), b.path("v2"));
    tree(&v1, 20);
    tree(&v2, 21);
    thaw_ok(&["push", s(&v1), &r]);
    thaw_ok(&["push", s(&v2), &r]);
    let report: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!("{}/v1/gc?grace=0", server.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(report["manifests_removed"], 1, "{report}");
    assert!(report["chunks_removed"].as_u64().unwrap() >= 1, "{report}");
    let out = b.path("out");
    thaw_ok(&["export", &r, s(&out)]);
    assert_same_tree(&v2, &out);
}

fn two_servers_over_one_store_give_the_same_answers(b: &Backend) {
    let (one, two) = (b.server(&[]), b.server(&[]));
    let src = b.path("src");
    tree(&src, 30);
    thaw_ok(&["push", s(&src), &one.reference("app:v1")]);
    let http = reqwest::blocking::Client::new();
    let tag = |server: &Server| {
        http.get(format!("{}/v1/tags/app/v1", server.url()))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    assert_eq!(tag(&one), tag(&two));
    let out = b.path("out");
    thaw_ok(&["export", &two.reference("app:v1"), s(&out)]);
    assert_same_tree(&src, &out);
}

macro_rules! suite {
    ($backend:ident: $($check:ident),* $(,)?) => {
        mod $backend {
            $(
                #[test]
                fn $check() {
                    let test = concat!("backends::", stringify!($backend), "::", stringify!($check));
                    if let Some(b) = super::Backend::$backend(test) {
                        super::$check(&b);
                    }
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($backend:ident),*) => {
        $(
            suite!($backend:
                push_and_export_round_trip,
                a_mount_reads_what_was_pushed,
                concurrent_pushes_of_one_tag_leave_one_whole_image,
                missing_chunks_are_answered_as_missing,
                writes_need_the_push_token,
                a_collection_keeps_what_tags_reach,
            );
        )*
    };
}

every_backend!(file, memory, s3);

// Stores that outlive a process: a memory store lives in one server.
#[test]
fn file_two_servers_over_one_store_give_the_same_answers() {
    let test = "backends::file_two_servers_over_one_store_give_the_same_answers";
    two_servers_over_one_store_give_the_same_answers(&Backend::file(test).unwrap());
}

#[test]
fn s3_two_servers_over_one_store_give_the_same_answers() {
    let test = "backends::s3_two_servers_over_one_store_give_the_same_answers";
    if let Some(b) = Backend::s3(test) {
        two_servers_over_one_store_give_the_same_answers(&b);
    }
}
