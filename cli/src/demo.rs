//! `thaw demo`: the whole path on an embedded default, with no setup.
//!
//! Starts a server on a temporary local store, generates an image (a Python
//! environment's worth of small files and a weights-like file), pushes it,
//! mounts it, reads what a starting program would (a few modules and a few
//! tensors), and reports how much was fetched against the image size and how
//! long each step took. Everything lives in a temporary directory and is
//! removed at the end.

use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;
use thaw_client::image::ImageOptions;
use thaw_client::push::PushOptions;
use thaw_client::{ImageRef, Remote};

#[derive(Args)]
pub struct DemoArgs {
    /// Size of the generated weights file.
    #[arg(long, default_value = "256M", value_parser = crate::cmd::parse_bytes)]
    weights: u64,
    /// Number of small files in the generated environment.
    #[arg(long, default_value_t = 3000)]
    files: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Deterministic filler: text-like for sources, noise for weights.
fn fill(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words: [&[u8]; 8] = [
        b"import ", b"def ", b"return ", b"self", b"(x, y)", b" = ", b"\n    ", b"numpy",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if text {
            out.extend_from_slice(words[(x % 8) as usize]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn generate(dir: &Path, files: usize, weights: u64) -> Result<()> {
    for i in 0..files {
        let pkg = dir.join(format!("site-packages/pkg{:02}", i % 40));
        std::fs::create_dir_all(&pkg)?;
        let len = 512 + (i * 7919) % 16384;
        std::fs::write(pkg.join(format!("module{i}.py")), fill(i as u64, len, true))?;
    }
    let mut f = std::fs::File::create(dir.join("model.safetensors"))?;
    let mut written = 0u64;
    while written < weights {
        let n = (weights - written).min(8 << 20);
        f.write_all(&fill(written, n as usize, false))?;
        written += n;
    }
    Ok(())
}

pub fn run(a: DemoArgs, rt: tokio::runtime::Runtime) -> Result<()> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (src, mnt) = (tmp.path().join("src"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&mnt)?;
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };

    let t = Instant::now();
    generate(&src, a.files, a.weights)?;
    say(format!(
        "generated {} small files and a {} weights file in {:.2}s",
        a.files,
        crate::cmd::human(a.weights),
        t.elapsed().as_secs_f64()
    ));

    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = thaw_server::ServerConfig {
        store_url: format!("file://{}", tmp.path().join("store").display()),
        ..Default::default()
    };
    let server = rt.spawn(thaw_server::run(listener, config, async {
        let _ = stop_rx.await;
    }));
    say(format!("server listening on {addr} with a local store"));

    let r = ImageRef::parse(&format!("{addr}/demo:latest"))?;
    let remote = Remote::for_ref(&r, None)?;
    let t = Instant::now();
    let pushed = rt.block_on(thaw_client::push::push(
        &src,
        &r,
        &remote,
        &PushOptions::default(),
    ))?;
    let push_s = t.elapsed().as_secs_f64();
    say(format!(
        "pushed {} files, {} in {} chunks ({} sent) in {push_s:.2}s",
        pushed.files,
        crate::cmd::human(pushed.bytes),
        pushed.chunks,
        crate::cmd::human(pushed.bytes_uploaded)
    ));

    let opts = ImageOptions {
        cache_dir: Some(tmp.path().join("cache")),
        ..Default::default()
    };
    let t = Instant::now();
    let image = std::sync::Arc::new(rt.block_on(thaw_client::image::open(&r, remote, &opts))?);
    let session = thaw_fuse::Session::mount(
        image.clone(),
        &mnt,
        &Default::default(),
        rt.handle().clone(),
    )?;
    let mount_ms = t.elapsed().as_secs_f64() * 1000.0;
    say(format!(
        "mounted at {} in {mount_ms:.1} ms (manifest only)",
        mnt.display()
    ));

    // What a starting program reads: one package's modules, a few tensors.
    let t = Instant::now();
    let first = std::fs::File::open(mnt.join("model.safetensors"))?;
    let mut byte = [0u8; 1];
    first.read_exact_at(&mut byte, 0)?;
    let first_byte_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut read = 0u64;
    let pkg = mnt.join("site-packages/pkg07");
    for e in std::fs::read_dir(&pkg)? {
        read += std::fs::read(e?.path())?.len() as u64;
    }
    let mut buf = vec![0u8; 4 << 20];
    for k in [1u64, 5, 9] {
        let off = (a.weights / 10 * k).min(a.weights.saturating_sub(buf.len() as u64));
        first.read_exact_at(&mut buf, off)?;
        read += buf.len() as u64;
    }
    let read_ms = t.elapsed().as_secs_f64() * 1000.0;
    let s = image.fs.stats.report();
    let image_bytes = pushed.bytes;
    let pct = s.bytes_fetched as f64 * 100.0 / (pushed.bytes_uploaded.max(1)) as f64;
    say(format!(
        "first byte of the weights in {first_byte_ms:.2} ms"
    ));
    say(format!(
        "read {} in {read_ms:.1} ms: fetched {} chunks, {} of the {} image ({pct:.1}% of its stored bytes)",
        crate::cmd::human(read),
        s.chunks_fetched,
        crate::cmd::human(s.bytes_fetched),
        crate::cmd::human(image_bytes)
    ));
    drop(first);
    drop(session);
    let _ = stop_tx.send(());
    rt.block_on(server)??;
    say("unmounted, stopped the server, removed the temporary files".into());
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "image_bytes": image_bytes, "files": pushed.files, "chunks": pushed.chunks,
                "push_seconds": push_s, "mount_ms": mount_ms, "first_byte_ms": first_byte_ms,
                "read_bytes": read, "read_ms": read_ms, "chunks_fetched": s.chunks_fetched,
                "bytes_fetched": s.bytes_fetched, "stored_bytes": pushed.bytes_uploaded,
            })
        );
    }
    Ok(())
}
