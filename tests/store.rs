//! The store end to end: a real `thaw serve` process over a temporary
//! `file://` store, driven by the `thaw` binary (push, export, inspect), and by
//! raw HTTP where a test must send what the client never would.
//!
//! Every test has its own directory and its own server. Trees are compared by
//! walking both without following symlinks (`thaw_testkit::compare`): type,
//! mode, owner, link count, size, mtime in ns, device numbers, symlink target,
//! content digest, xattrs, and which names share an inode.

use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use thaw_testkit::tree::{chmod, is_root, mknod, set_mtime_ns, set_xattr, write};
use thaw_testkit::{
    assert_same_tree, finish_within, noise, s, spawn_thaw, thaw, thaw_bin, thaw_json, thaw_within,
    wait_for_chunks, Server,
};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Building trees

/// A tree with every kind of entry and edge case push and export must keep.
fn build_edge_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let at = |rel: &str| root.join(rel);

    // Empty things.
    write(&at("empty"), b"");
    fs::create_dir(at("empty-dir")).unwrap();
    fs::create_dir_all(at("nested-empty/a/b/c")).unwrap();

    // A large file, and sizes around the pack threshold and chunk boundaries.
    write(&at("big.bin"), &noise(1, 100 * MIB));
    for (name, len) in [
        ("sizes/one-byte", 1),
        ("sizes/packed-127k", 127 << 10),
        ("sizes/threshold-128k", 128 << 10),
        ("sizes/chunk-1m", MIB),
        ("sizes/chunk-1m-plus-1", MIB + 1),
        ("sizes/three-chunks-minus-1", 3 * MIB - 1),
    ] {
        write(&at(name), &noise(len as u64, len));
    }
    write(
        &at("sizes/text-2m"),
        &"line of text\n".repeat(160_000).into_bytes(),
    );

    // Zeros: a file that is all hole, one half hole, and a sparse file.
    write(&at("zeros/all-zero-3m"), &vec![0; 3 * MIB]);
    let mut half = noise(7, 2 * MIB);
    half[..MIB].fill(0);
    write(&at("zeros/half-zero"), &half);
    let sparse = File::create(at("zeros/sparse")).unwrap();
    sparse.set_len(64 * MIB as u64).unwrap();
    sparse
        .write_all_at(&noise(8, MIB), 20 * MIB as u64)
        .unwrap();
    sparse.write_all_at(b"tail", 64 * MIB as u64 - 4).unwrap();
    drop(sparse);

    // 10k small files in ten directories, text-like, some empty.
    for i in 0..10_000usize {
        let body = format!("file {i}: some text\n").repeat(i % 37);
        write(
            &at(&format!("many/d{}/f{i:05}.txt", i / 1000)),
            body.as_bytes(),
        );
    }

    // Names.
    for name in [
        "with space",
        "  leading and trailing  ",
        "héllo wörld ✓",
        "日本語のファイル名",
        "emoji 🦀.rs",
        "new\nline",
        "back\\slash",
        "-dash",
        ".hidden",
        "colon:semi;quote'\"",
        &"n".repeat(255),
    ] {
        write(&at("names").join(name), name.as_bytes());
    }
    let not_utf8 = at("names").join(OsStr::from_bytes(b"bytes-\xff\xfe-not-utf8"));
    write(&not_utf8, b"not utf-8");
    fs::create_dir(at("names/dir with space ü")).unwrap();
    write(&at("names/dir with space ü/inner file"), b"inner");

    // Deep nesting: 40 levels.
    let mut deep = at("deep");
    for level in 0..40 {
        deep = deep.join(format!("level-{level:02}"));
    }
    write(&deep.join("leaf.txt"), b"at the bottom");

    // Symlinks: relative, absolute, to a directory, dangling, long, unicode.
    fs::create_dir(at("links")).unwrap();
    symlink("../big.bin", at("links/to-big")).unwrap();
    symlink("/etc/hostname", at("links/absolute")).unwrap();
    symlink("../deep", at("links/to-dir")).unwrap();
    symlink("does/not/exist", at("links/dangling")).unwrap();
    symlink("x/".repeat(500), at("links/long-dangling")).unwrap();
    symlink("../names/héllo wörld ✓", at("links/unicode")).unwrap();
    symlink("self-loop", at("links/self-loop")).unwrap();

    // Hardlinks: three names for a packed file (one in another directory),
    // two for an empty file, two for the 100 MB file.
    write(&at("hard/a"), &noise(5, 5000));
    fs::hard_link(at("hard/a"), at("hard/b")).unwrap();
    fs::create_dir(at("hard/sub")).unwrap();
    fs::hard_link(at("hard/a"), at("hard/sub/c")).unwrap();
    write(&at("hard/empty-1"), b"");
    fs::hard_link(at("hard/empty-1"), at("hard/empty-2")).unwrap();
    fs::hard_link(at("big.bin"), at("hard/big-link")).unwrap();

    // Special files.
    fs::create_dir(at("special")).unwrap();
    mknod(&at("special/fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    // Non-regular entries can have several names too.
    fs::hard_link(at("special/fifo"), at("special/fifo-link")).unwrap();
    fs::hard_link(at("links/to-big"), at("special/symlink-link")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(at("special/socket")).unwrap());
    if is_root() {
        let devs = [
            (
                "special/char-1-3",
                libc::S_IFCHR | 0o644,
                libc::makedev(1, 3),
            ),
            (
                "special/block-7-0",
                libc::S_IFBLK | 0o600,
                libc::makedev(7, 0),
            ),
        ];
        for (name, mode, dev) in devs {
            if let Err(e) = mknod(&at(name), mode, dev) {
                eprintln!("NOTE: not testing device node {name}: mknod failed here ({e})");
            }
        }
    }

    // Modes and owners.
    write(&at("modes/0751"), b"x");
    chmod(&at("modes/0751"), 0o751);
    write(&at("modes/0000"), b"nobody may read this but root");
    chmod(&at("modes/0000"), 0o000);
    write(&at("modes/setgid-file"), b"g");
    chmod(&at("modes/setgid-file"), 0o2755);
    fs::create_dir(at("modes/sticky-dir")).unwrap();
    chmod(&at("modes/sticky-dir"), 0o1777);
    fs::create_dir(at("modes/setgid-dir")).unwrap();
    chmod(&at("modes/setgid-dir"), 0o2775);
    write(
        &at("modes/read-only-dir/inside"),
        b"inside a 0555 directory",
    );
    chmod(&at("modes/read-only-dir"), 0o555);
    if is_root() {
        write(&at("owners/setuid-1234"), b"u");
        std::os::unix::fs::chown(at("owners/setuid-1234"), Some(1234), Some(5678)).unwrap();
        chmod(&at("owners/setuid-1234"), 0o4750); // after chown, which clears it
        symlink("setuid-1234", at("owners/link-1234")).unwrap();
        std::os::unix::fs::lchown(at("owners/link-1234"), Some(1234), Some(5678)).unwrap();
        fs::create_dir(at("owners/dir-4321")).unwrap();
        std::os::unix::fs::chown(at("owners/dir-4321"), Some(4321), Some(8765)).unwrap();
    } else {
        eprintln!("NOTE: not root: ownership and setuid are not tested");
    }

    // Extended attributes.
    set_xattr(root, "user.root", b"top");
    write(&at("xattrs/file"), b"has xattrs");
    set_xattr(&at("xattrs/file"), "user.mime_type", b"text/plain");
    set_xattr(&at("xattrs/file"), "user.empty", b"");
    let binary: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    set_xattr(&at("xattrs/file"), "user.binary", &binary);
    if is_root() {
        set_xattr(&at("xattrs/file"), "trusted.thaw", b"root only");
        // user.* xattrs are not allowed on symlinks; trusted.* are.
        set_xattr(&at("links/dangling"), "trusted.link", b"on a symlink");
    }
    fs::create_dir(at("xattrs/dir")).unwrap();
    set_xattr(&at("xattrs/dir"), "user.dir", b"d");
    set_xattr(&at("big.bin"), "user.big", b"on a hardlinked file");

    // Mtimes to the nanosecond, set last: before 1970, far ahead, odd ns, on a
    // symlink and on directories.
    set_mtime_ns(&at("sizes/one-byte"), -1_500_000_000);
    set_mtime_ns(&at("sizes/chunk-1m"), 4_102_444_800_999_999_999);
    set_mtime_ns(&at("names/with space"), 1_234_567_890_123_456_789);
    set_mtime_ns(&at("links/dangling"), 1_000_000_000_000_000_001);
    set_mtime_ns(&at("empty-dir"), 1_111_111_111_111_111_111);
    let mut deep = at("deep");
    for level in 0..40 {
        deep = deep.join(format!("level-{level:02}"));
        set_mtime_ns(&deep, 1_500_000_000_000_000_000 + level);
    }
    set_mtime_ns(root, 1_600_000_000_000_000_007);
}

// ---------------------------------------------------------------------------
// Running thaw and talking to the server

/// A fresh directory with a server over `<dir>/store`.
fn setup() -> (TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("store"));
    (tmp, server)
}

fn push(dir: &Path, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["push", s(dir), reference];
    args.extend_from_slice(extra);
    thaw_json(&args)
}

fn export(reference: &str, dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["export", reference, s(dir)];
    args.extend_from_slice(extra);
    thaw_json(&args)
}

/// Pushes a tree of one small file, `src/file`, as `name_tag`; returns `src`.
fn push_one_small_file(tmp: &TempDir, server: &Server, name_tag: &str) -> PathBuf {
    let src = tmp.path().join("src");
    write(&src.join("file"), b"data");
    push(&src, &server.reference(name_tag), &[]);
    src
}

/// Exports `reference` into `out` and asserts it is the same tree as `source`.
fn assert_exports_as(reference: &str, out: &Path, source: &Path) {
    export(reference, out, &[]);
    assert_same_tree(source, out);
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

fn text(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
        .to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `thaw ARGS` fails and its error mentions `needle`; returns stderr.
fn thaw_fails(args: &[&str], needle: &str) -> String {
    let out = thaw(args);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "thaw {args:?} succeeded but should fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "thaw {args:?}: error does not mention {needle:?}:\n{err}"
    );
    err
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The manifest digest a tag points at, or `None` on 404.
fn tag_of(server: &Server, name: &str, tag: &str) -> Option<String> {
    let resp = http()
        .get(format!("{}/v1/tags/{name}/{tag}", server.url()))
        .send()
        .unwrap();
    match resp.status().as_u16() {
        200 => Some(resp.text().unwrap()),
        404 => None,
        other => panic!("GET tag {name}/{tag}: {other}"),
    }
}

/// Status and JSON error body of a refused request.
fn refused(resp: reqwest::blocking::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.text().unwrap();
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("{status} without a JSON error body: {body:?}"));
    (status, json)
}

/// The chunk files of a store, checked: each is named by its id under its
/// two-hex-digit directory, and each raw (uncompressed) frame hashes to its
/// name. Returns the ids and the number of staging files the store's atomic
/// writes left behind (never served: they do not have a chunk's name).
fn stored_chunks(store: &Path) -> (BTreeSet<String>, usize) {
    let mut ids = BTreeSet::new();
    let mut staging = 0;
    let Ok(dirs) = fs::read_dir(store.join("chunks")) else {
        return (ids, 0);
    };
    for dir in dirs {
        let dir = dir.unwrap();
        let prefix = dir.file_name().into_string().unwrap();
        for file in fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap();
            let name = file.file_name().into_string().unwrap();
            if name.contains('#') {
                staging += 1;
                continue;
            }
            assert!(
                name.len() == 64
                    && name.bytes().all(|b| b.is_ascii_hexdigit())
                    && name.starts_with(&prefix),
                "unexpected file chunks/{prefix}/{name}"
            );
            let frame = fs::read(file.path()).unwrap();
            assert!(
                frame.len() >= 12 && frame[..5] == *b"THCK\x01",
                "chunks/{prefix}/{name} is not a chunk frame"
            );
            let len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
            if frame[5] == 0 {
                assert_eq!(frame.len(), 12 + len, "raw frame {name} has a torn payload");
                assert_eq!(
                    blake3::hash(&frame[12..]).to_hex().as_str(),
                    name,
                    "raw frame {name} does not hash to its name"
                );
            }
            ids.insert(name);
        }
    }
    (ids, staging)
}

/// A raw (uncompressed) chunk frame, built from the layout in `docs/format.md`.
fn raw_frame(data: &[u8]) -> Vec<u8> {
    let mut f = b"THCK".to_vec();
    f.extend_from_slice(&[1, 0, 0, 0]);
    f.extend_from_slice(&(data.len() as u32).to_le_bytes());
    f.extend_from_slice(data);
    f
}

fn id_of(data: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(data).to_hex())
}

/// `thaw push ... --json` as a child process.
fn spawn_push(dir: &Path, reference: &str, extra: &[&str]) -> Child {
    let mut args = vec!["push", s(dir), reference, "--json"];
    args.extend_from_slice(extra);
    spawn_thaw(&args)
}

fn parse_json(out: &Output) -> Value {
    assert!(out.status.success(), "thaw failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("thaw printed JSON")
}

// ---------------------------------------------------------------------------
// Round trips

#[test]
fn push_then_export_reproduces_every_kind_of_entry() {
    let (tmp, server) = setup();
    let src = tmp.path().join("src");
    build_edge_tree(&src);
    let reference = server.reference("edge:v1");

    let pushed = push(&src, &reference, &[]);
    let out = tmp.path().join("out");
    let exported = export(&reference, &out, &[]);
    assert_eq!(exported["manifest"], pushed["manifest"]);
    assert!(
        server.metric("thaw_chunks_served_total") >= num(&exported, "chunks_fetched") as f64,
        "the server counted fewer chunk frames than the export fetched"
    );
    let entries = assert_same_tree(&src, &out);
    assert!(entries > 10_100, "only {entries} entries compared");

    // Hardlinks come back as one inode with the same link count.
    let a = fs::metadata(out.join("hard/a")).unwrap();
    let c = fs::metadata(out.join("hard/sub/c")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (c.ino(), 3));
    // Holes stay holes: the 64 MiB sparse file holds about 2 MiB of blocks,
    // the all-zero file none.
    let sparse = fs::metadata(out.join("zeros/sparse")).unwrap();
    assert_eq!(sparse.len(), 64 * MIB as u64);
    assert!(
        sparse.blocks() * 512 <= 4 * MIB as u64,
        "sparse file exported with {} blocks",
        sparse.blocks()
    );
    let zeros = fs::metadata(out.join("zeros/all-zero-3m")).unwrap();
    assert!(
        zeros.blocks() * 512 < 64 << 10,
        "all-zero file exported dense"
    );

    // The digest form of a reference names the same image.
    let by_digest = format!(
        "{}/edge@{}",
        server.addr(),
        pushed["manifest"].as_str().unwrap()
    );
    let summary = thaw_json(&["inspect", &by_digest]);
    assert_eq!(summary["manifest"], pushed["manifest"]);
    assert_eq!(num(&summary, "files"), num(&pushed, "files"));
    assert!(num(&summary, "hole_bytes") >= (60 + 3) * MIB as u64);
    assert!(num(&pushed, "files") > 10_000);
    assert!(num(&pushed, "bytes") > 100 * MIB as u64);
}

#[test]
fn unchanged_repush_uploads_nothing_and_one_changed_byte_uploads_one_chunk() {
    let (tmp, server) = setup();
    let src = tmp.path().join("src");
    write(&src.join("big.bin"), &noise(11, 100 * MIB));
    for i in 0..200 {
        write(&src.join(format!("small/{i}")), format!("{i}").as_bytes());
    }
    fs::hard_link(src.join("small/1"), src.join("small-link")).unwrap();
    symlink("big.bin", src.join("link")).unwrap();

    let first = push(&src, &server.reference("img:v1"), &[]);
    assert!(num(&first, "chunks_uploaded") >= 100);
    let (stored, _) = stored_chunks(&server.store);
    assert_eq!(stored.len() as u64, num(&first, "chunks"));

    for tag in ["img:v1", "img:v2"] {
        let again = push(&src, &server.reference(tag), &[]);
        assert_eq!(
            again["manifest"], first["manifest"],
            "same tree, same manifest"
        );
        assert_eq!(num(&again, "chunks_uploaded"), 0, "{again}");
        assert_eq!(num(&again, "bytes_uploaded"), 0, "{again}");
    }
    assert_eq!(stored_chunks(&server.store).0, stored);

    // New metadata only: a new manifest, no chunk.
    set_mtime_ns(&src.join("small/7"), 42);
    let touched = push(&src, &server.reference("img:touched"), &[]);
    assert_ne!(touched["manifest"], first["manifest"]);
    assert_eq!(num(&touched, "chunks_uploaded"), 0);

    // One byte in the middle of the 100 MB file: one chunk.
    let big = fs::OpenOptions::new()
        .write(true)
        .open(src.join("big.bin"))
        .unwrap();
    big.write_all_at(&[0x5a], 50_000_000).unwrap();
    drop(big);
    let changed = push(&src, &server.reference("img:v3"), &[]);
    assert_eq!(num(&changed, "chunks_uploaded"), 1, "{changed}");
    let sent = num(&changed, "bytes_uploaded");
    assert!(sent > 0 && sent <= MIB as u64 + 64, "{changed}");
    assert_eq!(stored_chunks(&server.store).0.len(), stored.len() + 1);

    assert_exports_as(&server.reference("img:v3"), &tmp.path().join("out"), &src);
}

#[test]
fn content_defined_chunking_round_trips_and_resyncs_after_an_insertion() {
    let (tmp, server) = setup();
    let model = noise(21, 24 * MIB);
    let tree = |dir: &Path, model: &[u8]| {
        write(&dir.join("model.bin"), model);
        write(
            &dir.join("config.json"),
            br#"{"layers": 12, "hidden": 768}"#,
        );
        write(
            &dir.join("vocab.txt"),
            &"token\n".repeat(100_000).into_bytes(),
        );
        write(&dir.join("empty"), b"");
        symlink("model.bin", dir.join("weights")).unwrap();
    };
    let v1 = tmp.path().join("v1");
    tree(&v1, &model);
    let mut shifted = model[..4096].to_vec();
    shifted.extend_from_slice(&noise(22, 100));
    shifted.extend_from_slice(&model[4096..]);
    let v2 = tmp.path().join("v2");
    tree(&v2, &shifted);

    let cdc = ["--chunking", "cdc"];
    let first = push(&v1, &server.reference("model:v1"), &cdc);
    assert!(
        num(&first, "chunks") >= 10,
        "24 MiB should make many chunks: {first}"
    );
    assert_exports_as(&server.reference("model:v1"), &tmp.path().join("out1"), &v1);

    let second = push(&v2, &server.reference("model:v2"), &cdc);
    assert!(
        num(&second, "chunks_uploaded") <= 3,
        "100 bytes inserted near the start re-uploaded {} of {} chunks",
        num(&second, "chunks_uploaded"),
        num(&second, "chunks")
    );
    assert_exports_as(&server.reference("model:v2"), &tmp.path().join("out2"), &v2);

    // Fixed-size chunks (here 64 KiB, zstd level 1) round-trip too, but the
    // same insertion shifts every chunk after it.
    let fixed = ["--chunk-size", "65536", "--codec", "zstd", "--level", "1"];
    push(&v1, &server.reference("model:f1"), &fixed);
    let f2 = push(&v2, &server.reference("model:f2"), &fixed);
    assert!(
        num(&f2, "chunks_uploaded") * 10 >= num(&f2, "chunks") * 9,
        "{f2}"
    );
    assert_exports_as(&server.reference("model:f2"), &tmp.path().join("out3"), &v2);
}

// ---------------------------------------------------------------------------
// What the server refuses

#[test]
fn chunk_with_wrong_digest_is_refused_and_not_stored() {
    let (_tmp, server) = setup();
    let client = http();
    let chunk_url = |id: &str| format!("{}/v1/chunks/{id}", server.url());
    let data = b"the bytes the uploader really sends".repeat(100);
    let claimed = id_of(b"the bytes it claims to send");

    let resp = client
        .put(chunk_url(&claimed))
        .body(raw_frame(&data))
        .send()
        .unwrap();
    let (status, err) = refused(resp);
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("digest_mismatch"))
    );
    for id in [&claimed, &id_of(&data)] {
        let get = client.get(chunk_url(id)).send().unwrap();
        assert_eq!(
            get.status().as_u16(),
            404,
            "{id} readable after a refused upload"
        );
        let head = client.head(chunk_url(id)).send().unwrap();
        assert_eq!(head.status().as_u16(), 404);
    }
    let hex = &claimed["blake3:".len()..];
    assert!(!server
        .store
        .join(format!("chunks/{}/{hex}", &hex[..2]))
        .exists());
    assert_eq!(stored_chunks(&server.store), (BTreeSet::new(), 0));

    // Frames that do not decode: bad magic, a payload shorter than declared,
    // and a "zstd" payload that is not zstd.
    let good_id = id_of(&data);
    let mut bad_magic = raw_frame(&data);
    bad_magic[..4].copy_from_slice(b"NOPE");
    let mut short = raw_frame(&data);
    short.truncate(short.len() - 1);
    let mut not_zstd = raw_frame(&data);
    not_zstd[5] = 1;
    for frame in [bad_magic, short, not_zstd] {
        let resp = client.put(chunk_url(&good_id)).body(frame).send().unwrap();
        let (status, err) = refused(resp);
        assert_eq!((status, err["error"].as_str()), (400, Some("bad_frame")));
    }
    assert_eq!(stored_chunks(&server.store), (BTreeSet::new(), 0));

    // The honest upload is stored, once, and read back as sent.
    let put = |frame: Vec<u8>| {
        client
            .put(chunk_url(&good_id))
            .body(frame)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(put(raw_frame(&data)), 201);
    assert_eq!(put(raw_frame(&data)), 200);
    let back = client.get(chunk_url(&good_id)).send().unwrap();
    assert_eq!(back.status().as_u16(), 200);
    assert_eq!(back.bytes().unwrap().as_ref(), raw_frame(&data).as_slice());
    assert_eq!(stored_chunks(&server.store).0.len(), 1);
}

#[test]
fn manifest_with_missing_chunks_is_refused_with_409() {
    let (tmp, mut server) = setup();
    let src = tmp.path().join("src");
    for i in 0..3u64 {
        write(&src.join(format!("file-{i}")), &noise(30 + i, 2 * MIB));
    }
    let pushed = push(&src, &server.reference("img:v1"), &[]);
    let digest = text(&pushed, "manifest");
    let client = http();
    let manifest_url = format!("{}/v1/manifests/{digest}", server.url());
    let manifest = client.get(&manifest_url).send().unwrap().bytes().unwrap();

    // Take one chunk and the manifest away behind the server's back. The
    // restart empties the server's hot cache, which would still hold them.
    let (ids, _) = stored_chunks(&server.store);
    assert_eq!(ids.len(), 6);
    let victim = ids.iter().nth(3).unwrap().clone();
    let victim_path = server
        .store
        .join(format!("chunks/{}/{victim}", &victim[..2]));
    let frame = fs::read(&victim_path).unwrap();
    fs::remove_file(&victim_path).unwrap();
    let manifest_path = server
        .store
        .join("manifests")
        .join(&digest["blake3:".len()..]);
    fs::remove_file(&manifest_path).unwrap();
    server.restart();

    let resp = client
        .put(&manifest_url)
        .body(manifest.clone())
        .send()
        .unwrap();
    let (status, err) = refused(resp);
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"], "missing_chunks");
    assert_eq!(
        err["missing"],
        serde_json::json!([format!("blake3:{victim}")])
    );
    assert!(!manifest_path.exists(), "a refused manifest was stored");
    assert_eq!(client.get(&manifest_url).send().unwrap().status(), 404);
    let tag = client
        .put(format!("{}/v1/tags/img/v2", server.url()))
        .body(digest.clone())
        .send()
        .unwrap();
    assert_eq!(refused(tag).1["error"], "unknown_manifest");

    // Once the chunk is back, the same bytes are accepted.
    let chunk = client
        .put(format!("{}/v1/chunks/blake3:{victim}", server.url()))
        .body(frame)
        .send()
        .unwrap();
    assert_eq!(chunk.status(), 201);
    let again = client.put(&manifest_url).body(manifest).send().unwrap();
    assert_eq!(again.status(), 201);
    assert_exports_as(&server.reference("img:v1"), &tmp.path().join("out"), &src);
}

// ---------------------------------------------------------------------------
// Interrupted and concurrent pushes

/// A small first image and a large, unrelated second one.
fn two_versions(tmp: &Path) -> (PathBuf, PathBuf) {
    let v1 = tmp.join("v1");
    write(&v1.join("app.py"), b"print('v1')\n");
    write(&v1.join("lib.so"), &noise(40, 3 * MIB));
    let v2 = tmp.join("v2");
    write(&v2.join("app.py"), b"print('v2')\n");
    write(&v2.join("weights.bin"), &noise(41, 96 * MIB));
    (v1, v2)
}

/// A server whose `img:latest` is v1 of [`two_versions`], and a push of v2
/// under way that has stored a few chunks and is surely not done.
struct PushUnderWay {
    tmp: TempDir,
    server: Server,
    v1: PathBuf,
    v2: PathBuf,
    reference: String,
    /// The report of v1's push.
    first: Value,
    /// Chunks stored before v2's push started.
    before: usize,
    /// `thaw push` of v2, one upload at a time.
    child: Child,
}

fn push_under_way() -> PushUnderWay {
    let (tmp, server) = setup();
    let (v1, v2) = two_versions(tmp.path());
    let reference = server.reference("img:latest");
    let first = push(&v1, &reference, &[]);
    let before = stored_chunks(&server.store).0.len();
    // One upload at a time, so the push is surely still running after a few.
    let mut child = spawn_push(&v2, &reference, &["--concurrency", "1"]);
    let early = wait_for_chunks(&server.store, before + 3, &mut child);
    assert!(
        early.is_none(),
        "the push ended ({early:?}) before it could be interrupted"
    );
    PushUnderWay {
        tmp,
        server,
        v1,
        v2,
        reference,
        first,
        before,
        child,
    }
}

#[test]
fn push_killed_half_way_keeps_the_old_tag_and_a_usable_store() {
    let mut w = push_under_way();
    w.child.kill().unwrap();
    let status = w.child.wait().unwrap();
    assert!(!status.success(), "killed push reported success");
    std::thread::sleep(Duration::from_millis(300)); // requests in flight settle

    assert_eq!(
        tag_of(&w.server, "img", "latest").as_deref(),
        Some(text(&w.first, "manifest").as_str()),
        "the tag moved to an image whose push never finished"
    );
    let (ids, staging) = stored_chunks(&w.server.store);
    assert_eq!(staging, 0, "partial chunk files left in the store");
    let salvaged = ids.len() - w.before;
    assert!((3..96).contains(&salvaged), "{salvaged} chunks stored");

    assert_exports_as(&w.reference, &w.tmp.path().join("out1"), &w.v1);

    // A complete push reuses what the killed one uploaded.
    let second = push(&w.v2, &w.reference, &[]);
    assert_eq!(
        num(&second, "chunks_uploaded") as usize,
        num(&second, "chunks") as usize - salvaged,
        "{second}"
    );
    assert_eq!(
        tag_of(&w.server, "img", "latest"),
        Some(text(&second, "manifest"))
    );
    assert_exports_as(&w.reference, &w.tmp.path().join("out2"), &w.v2);
}

#[test]
fn server_killed_mid_push_fails_the_push_and_keeps_the_old_tag() {
    let mut w = push_under_way();
    w.server.kill();
    let out = finish_within(w.child, Duration::from_secs(60), "push to a killed server");
    assert!(!out.status.success(), "push to a killed server succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the chunk server"),
        "unclear error: {err}"
    );

    w.server.restart();
    assert_eq!(
        tag_of(&w.server, "img", "latest"),
        Some(text(&w.first, "manifest"))
    );
    assert_exports_as(&w.reference, &w.tmp.path().join("out1"), &w.v1);
    let second = push(&w.v2, &w.reference, &[]);
    assert!(num(&second, "chunks_uploaded") < num(&second, "chunks"));
    assert_exports_as(&w.reference, &w.tmp.path().join("out2"), &w.v2);
    stored_chunks(&w.server.store); // every stored chunk is whole
}

#[test]
fn overlapping_pushes_both_succeed() {
    let (tmp, server) = setup();
    // Two trees that share most of their bytes: a large file, and small files.
    let shared = noise(50, 40 * MIB);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for (dir, seed) in [(&a, 51), (&b, 52)] {
        write(&dir.join("shared.bin"), &shared);
        write(&dir.join("own.bin"), &noise(seed, 8 * MIB));
        for i in 0..500 {
            write(
                &dir.join(format!("py/m{i}.py")),
                format!("x = {i}\n").as_bytes(),
            );
        }
        write(&dir.join(format!("only-{seed}")), b"mine");
    }
    let pa = spawn_push(&a, &server.reference("img:a"), &[]);
    let pb = spawn_push(&b, &server.reference("img:b"), &[]);
    let ra = parse_json(&finish_within(pa, Duration::from_secs(120), "push a"));
    let rb = parse_json(&finish_within(pb, Duration::from_secs(120), "push b"));
    assert_eq!(tag_of(&server, "img", "a"), Some(text(&ra, "manifest")));
    assert_eq!(tag_of(&server, "img", "b"), Some(text(&rb, "manifest")));
    let listing: Value = http()
        .get(format!("{}/v1/tags/img", server.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        listing["tags"],
        serde_json::json!([
            {"tag": "a", "manifest": ra["manifest"]},
            {"tag": "b", "manifest": rb["manifest"]},
        ])
    );
    // Each shared chunk is stored once, whoever uploaded it.
    let (ids, staging) = stored_chunks(&server.store);
    assert_eq!(staging, 0);
    assert!(ids.len() < (num(&ra, "chunks") + num(&rb, "chunks")) as usize);

    for (tag, src) in [("img:a", &a), ("img:b", &b)] {
        let out = tmp.path().join(format!("out-{tag}"));
        export(&server.reference(tag), &out, &[]);
        assert_same_tree(src, &out);
    }
}

// ---------------------------------------------------------------------------
// Access control

#[test]
fn tokens_are_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let push_token = tmp.path().join("push-token");
    let pull_token = tmp.path().join("pull-token");
    fs::write(&push_token, "push-secret-1\n").unwrap();
    fs::write(&pull_token, "pull-secret-2\n").unwrap();
    let server = Server::start_with(
        &tmp.path().join("store"),
        &[
            "--push-token-file",
            s(&push_token),
            "--pull-token-file",
            s(&pull_token),
        ],
    );
    let src = tmp.path().join("src");
    write(&src.join("file"), b"guarded");
    let reference = server.reference("img:v1");
    let (push_flag, pull_flag) = (
        ["--token-file", s(&push_token)],
        ["--token-file", s(&pull_token)],
    );

    thaw_fails(&["push", s(&src), &reference], "401");
    thaw_fails(
        &["push", s(&src), &reference, pull_flag[0], pull_flag[1]],
        "401",
    );
    assert!(stored_chunks(&server.store).0.is_empty());
    push(&src, &reference, &push_flag);

    let out = tmp.path().join("out");
    thaw_fails(&["export", &reference, s(&out)], "401");
    thaw_fails(&["inspect", &reference], "401");
    export(&reference, &out, &pull_flag);
    assert_same_tree(&src, &out);
    // The push token may read too.
    export(&reference, &tmp.path().join("out-push"), &push_flag);

    let client = http();
    let resp = client
        .get(format!("{}/v1/tags/img/v1", server.url()))
        .send()
        .unwrap();
    let (status, err) = refused(resp);
    assert_eq!((status, err["error"].as_str()), (401, Some("unauthorized")));
    let resp = client
        .get(format!("{}/v1/tags/img/v1", server.url()))
        .bearer_auth("wrong")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    let health = client
        .get(format!("{}/v1/health", server.url()))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[test]
fn non_loopback_listen_needs_a_push_token_and_tls_or_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let args = ["serve", "--listen", "0.0.0.0:0", "--store", &store];
    let out = thaw_within(&args, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "listened on 0.0.0.0 without a push token"
    );
    assert!(
        stderr(&out).contains("--insecure"),
        "unclear error: {}",
        stderr(&out)
    );

    let token = tmp.path().join("token");
    fs::write(&token, "t0ken").unwrap();
    // A token alone is not enough: it would travel in cleartext.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    let with_tls = vec![
        "--push-token-file",
        s(&token),
        "--tls-cert",
        s(&cert_path),
        "--tls-key",
        s(&key_path),
    ];
    for extra in [vec!["--insecure"], with_tls] {
        let mut child = Command::new(thaw_bin())
            .args(args)
            .args(&extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            line.starts_with("thaw serve: listening on 0.0.0.0:"),
            "with {extra:?}: {line:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Bad input and failures

#[test]
fn bad_input_gets_a_clear_error() {
    let (tmp, server) = setup();
    let src = tmp.path().join("src");
    write(&src.join("file"), b"data");
    let addr = server.addr();
    for bad in [
        "img:v1".to_owned(),
        format!("{addr}/img"),
        format!("{addr}/img:"),
        format!("{addr}/../img:v1"),
        format!("{addr}/a/b:c"),
        format!("ftp://{addr}/img:v1"),
        format!("{addr}/img@blake3:00"),
        format!("{addr}/img:tag with space"),
    ] {
        thaw_fails(&["push", s(&src), &bad], "invalid image reference");
        thaw_fails(
            &["export", &bad, s(&tmp.path().join("x"))],
            "invalid image reference",
        );
    }
    let digest_ref = format!("{addr}/img@{}", id_of(b"x"));
    thaw_fails(&["push", s(&src), &digest_ref], "NAME:TAG");
    thaw_fails(
        &[
            "push",
            s(&tmp.path().join("nope")),
            &server.reference("img:v1"),
        ],
        "nope",
    );
    thaw_fails(
        &["push", s(&src.join("file")), &server.reference("img:v1")],
        "not a directory",
    );
    assert!(stored_chunks(&server.store).0.is_empty());

    push(&src, &server.reference("img:v1"), &[]);
    let busy = tmp.path().join("busy");
    write(&busy.join("keep-me"), b"mine");
    thaw_fails(
        &["export", &server.reference("img:v1"), s(&busy)],
        "not empty",
    );
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    assert_eq!(fs::read(busy.join("keep-me")).unwrap(), b"mine");

    let fresh = tmp.path().join("fresh");
    thaw_fails(
        &["export", &server.reference("img:nope"), s(&fresh)],
        "not found",
    );
    thaw_fails(
        &["export", &server.reference("other:v1"), s(&fresh)],
        "not found",
    );
    thaw_fails(&["inspect", &digest_ref], "not found");
    assert!(!fresh.exists(), "a failed export left {}", fresh.display());
}

#[test]
fn dead_server_gives_a_clear_error_not_a_hang() {
    let (tmp, mut server) = setup();
    let src = push_one_small_file(&tmp, &server, "img:v1");
    server.kill();
    let limit = Duration::from_secs(60);
    let out_dir = tmp.path().join("out");
    let reference = server.reference("img:v1");
    let runs = [
        vec!["push", s(&src), &reference],
        vec!["export", &reference, s(&out_dir)],
        vec!["inspect", &reference],
    ];
    for args in runs {
        let started = Instant::now();
        let out = thaw_within(&args, limit);
        assert!(
            !out.status.success(),
            "{args:?} succeeded against a dead server"
        );
        let err = stderr(&out);
        assert!(
            err.contains("cannot reach the chunk server") && err.contains(&server.addr()),
            "{args:?}: unclear error: {err}"
        );
        eprintln!("{} failed in {:?}", args[0], started.elapsed());
    }
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let (tmp, mut server) = setup();
    push_one_small_file(&tmp, &server, "img:v1");
    let status = server.terminate();
    assert!(
        status.success(),
        "thaw serve exited with {status} on SIGTERM"
    );
}

#[test]
fn a_file_changing_during_push_fails_the_push() {
    let (tmp, server) = setup();
    let src = tmp.path().join("src");
    const BLOCKS: u64 = 32;
    // Block `b` of generation `g`: its generation, then noise for (g, b).
    let block = |generation: u64, b: u64| {
        let mut data = noise(generation << 8 | b, MIB);
        data[..8].copy_from_slice(&generation.to_le_bytes());
        data
    };
    write(&src.join("other"), b"stable");
    let log = src.join("log.bin");
    let f = File::create(&log).unwrap();
    for b in 0..BLOCKS {
        f.write_all_at(&block(0, b), b * MIB as u64).unwrap();
    }

    // Rewrite the file in place, generation after generation, block by block:
    // any snapshot of it mixes two generations, so no push may succeed unless
    // it happened to read one whole generation.
    let stop = Arc::new(AtomicBool::new(false));
    let generations = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, generations) = (stop.clone(), generations.clone());
        std::thread::spawn(move || {
            let mut generation = 0;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                for b in 0..BLOCKS {
                    f.write_all_at(&block(generation, b), b * MIB as u64)
                        .unwrap();
                }
                generations.store(generation, Ordering::Relaxed);
            }
        })
    };
    while generations.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = generations.load(Ordering::Relaxed);

    let mut failures = 0;
    for attempt in 0..3 {
        let reference = server.reference(&format!("log:try{attempt}"));
        let out = thaw_within(
            &["push", s(&src), &reference, "--json"],
            Duration::from_secs(60),
        );
        if !out.status.success() {
            let err = stderr(&out);
            assert!(
                err.contains("changed") && err.contains("log.bin"),
                "push failed for another reason: {err}"
            );
            failures += 1;
            continue;
        }
        // A push that succeeded must have recorded one whole generation.
        let dest = tmp.path().join(format!("out{attempt}"));
        export(&reference, &dest, &[]);
        let data = fs::read(dest.join("log.bin")).unwrap();
        let generation = u64::from_le_bytes(data[..8].try_into().unwrap());
        for b in 0..BLOCKS {
            let at = (b as usize) * MIB;
            assert!(
                data[at..at + MIB] == block(generation, b)[..],
                "push succeeded with torn data: block {b} is not from generation {generation}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        generations.load(Ordering::Relaxed) > before,
        "the writer did not run during the pushes"
    );
    assert!(failures >= 1, "no push noticed the file changing");
}

#[test]
fn file_capabilities_survive_export() {
    if !is_root() {
        eprintln!("NOTE: not root: cannot set file capabilities, nothing tested");
        return;
    }
    let (tmp, server) = setup();
    let src = tmp.path().join("src");
    write(&src.join("ping"), b"#!/bin/true\n");
    // struct vfs_cap_data, revision 2: effective, permitted CAP_NET_RAW (13).
    let cap: Vec<u8> = [0x0200_0001u32, 1 << 13, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    set_xattr(&src.join("ping"), "security.capability", &cap);
    push(&src, &server.reference("caps:v1"), &[]);
    assert_exports_as(&server.reference("caps:v1"), &tmp.path().join("out"), &src);
}
