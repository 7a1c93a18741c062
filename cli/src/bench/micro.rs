//! `thaw bench --suite mount`: the mount's own figures beside their ceilings.
//!
//! Cold and warm sequential throughput (compressible and incompressible data),
//! 4 KiB random read latency cold and warm, time to first byte, time to mount a
//! 10k-file image, and the mount process's peak memory, beside the same data
//! read through squashfuse from local disk and fetched and decompressed
//! without FUSE.

use super::{ceilings, median, mount, umount, BenchArgs};
use anyhow::{Context, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;
use thaw_client::{ImageRef, Remote};
use thaw_format::frame;

fn read_seq(path: &Path) -> Result<f64> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

fn random_latencies(path: &Path, offsets: &[u64]) -> Result<(f64, f64)> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::new();
    for &o in offsets {
        let t = Instant::now();
        f.read_exact_at(&mut buf, o)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    Ok((p(0.5), p(0.99)))
}

fn gen_file(path: &Path, len: usize, compressible: bool) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut plan = super::workload::Plan::default();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    if compressible {
        super::workload::python_env(&tmp, len as u64, &mut plan)?;
        // Concatenate the generated environment into one file.
        let mut out = std::fs::File::create(path)?;
        let mut stack = vec![tmp.clone()];
        while let Some(d) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&d)?.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                } else {
                    std::io::copy(&mut std::fs::File::open(e.path())?, &mut out)?;
                }
            }
        }
    } else {
        super::workload::weights(&tmp, len as u64, &mut plan)?;
        std::fs::rename(tmp.join("model.safetensors"), path)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Fetches and decompresses every chunk of `file` with `concurrency` requests in flight.
async fn fetch_decompress(r: &ImageRef, file: &str, concurrency: usize) -> Result<f64> {
    use futures::StreamExt;
    let remote = Remote::for_ref(r, None)?;
    let m = remote.image(r).await?.manifest;
    let node = m
        .lookup(thaw_format::ROOT, file.as_bytes())
        .context("file in image")?;
    let ids: Vec<_> = m
        .file_extents(node)
        .iter()
        .filter_map(|e| e.chunk)
        .map(|c| m.chunks[c as usize].id)
        .collect();
    let t = Instant::now();
    let total: usize = futures::stream::iter(ids)
        .map(|id| {
            let remote = remote.clone();
            async move {
                let f = remote.chunk(&id).await?;
                let d =
                    tokio::task::spawn_blocking(move || frame::decode_verified(&f, &id)).await??;
                Ok::<_, anyhow::Error>(d.len())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .sum::<Result<usize>>()?;
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

pub fn run(a: &BenchArgs, rt: &tokio::runtime::Runtime) -> Result<()> {
    let ra = std::env::var("THAW_BENCH_KERNEL_READAHEAD").unwrap_or_else(|_| "1M".into());
    let extra: Vec<&str> = vec!["--kernel-readahead", &ra];
    let work = a.work_dir.join("mount-suite");
    let data = a.work_dir.join("data/mount-suite");
    std::fs::create_dir_all(&data)?;
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let size = ((512.0 * a.scale) as usize).max(16) << 20;
    let src = data.join(format!("files-{size}"));
    std::fs::create_dir_all(&src)?;
    eprintln!(
        "thaw bench: generating {} compressible + {} incompressible",
        crate::cmd::human(size as u64),
        crate::cmd::human(size as u64)
    );
    gen_file(&src.join("compressible.bin"), size, true)?;
    gen_file(&src.join("incompressible.bin"), size, false)?;
    let small = data.join("10k-files");
    if !small.exists() {
        for i in 0..10_000 {
            let d = small.join(format!("d{:03}", i / 100));
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join(format!("f{i}.py")), format!("x = {i}\n"))?;
        }
    }

    let (server, _stop) = super::embedded_server(rt, &work.join("store"))?;
    let push = |dir: &Path, tag: &str| -> Result<String> {
        let r = ImageRef::parse(&format!("{server}/{tag}"))?;
        rt.block_on(thaw_client::push::push(
            dir,
            &r,
            &Remote::for_ref(&r, None)?,
            &Default::default(),
        ))?;
        Ok(r.to_string())
    };
    eprintln!("thaw bench: pushing");
    let files_ref = push(&src, "files:latest")?;
    let small_ref = push(&small, "small:latest")?;
    let (mp, cache) = (work.join("mnt"), work.join("cache"));

    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        out.insert(k.into(), v);
    };
    // Ceilings: squashfuse over local disk, and fetch+decompress without FUSE.
    let ra_bytes = crate::cmd::parse_bytes(&ra).map_err(anyhow::Error::msg)?;
    let squash =
        ceilings::Squash::mount(&src, &work.join("files.sqfs"), &work.join("sqfs"), ra_bytes)?;
    let r = ImageRef::parse(&files_ref)?;
    for (name, file) in [
        ("compressible", "compressible.bin"),
        ("incompressible", "incompressible.bin"),
    ] {
        eprintln!("thaw bench: sequential reads of {name} data");
        // The ceiling is the best of three reads: squashfuse is single-threaded and noisy.
        let sq = match &squash {
            Some(s) => {
                let mut best = 0.0f64;
                for _ in 0..3 {
                    ceilings::drop_caches();
                    best = best.max(read_seq(&s.mountpoint.join(file))?);
                }
                Some(best)
            }
            None => None,
        };
        let fd = rt.block_on(fetch_decompress(&r, file, 8))?;
        let _ = std::fs::remove_dir_all(&cache);
        mount(&files_ref, &mp, &cache, &extra)?;
        ceilings::drop_caches();
        let cold = read_seq(&mp.join(file))?;
        let stats = thaw_fuse::query_stats(&mp)?;
        umount(&mp);
        mount(&files_ref, &mp, &cache, &extra)?;
        ceilings::drop_caches();
        let warm = read_seq(&mp.join(file))?;
        umount(&mp);
        put(
            name,
            serde_json::json!({
                "cold_bytes_per_sec": cold, "warm_bytes_per_sec": warm,
                "squashfuse_bytes_per_sec": sq, "fetch_decompress_bytes_per_sec": fd,
                "cold_vs_squashfuse": sq.map(|s| cold / s), "warm_vs_squashfuse": sq.map(|s| warm / s),
                "cold_vs_fetch_decompress": cold / fd,
                "mount_peak_rss_bytes": stats.peak_rss_bytes,
            }),
        );
    }
    drop(squash);

    eprintln!("thaw bench: random 4 KiB reads");
    let mut x = 0x1234_5678u64;
    let offsets: Vec<u64> = (0..200)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size as u64 - 4096)) & !4095
        })
        .collect();
    let cold_cache = work.join("cache-random");
    mount(&files_ref, &mp, &cold_cache, &["--readahead", "0"])?;
    ceilings::drop_caches();
    let (c50, c99) = random_latencies(&mp.join("incompressible.bin"), &offsets)?;
    umount(&mp);
    mount(&files_ref, &mp, &cache, &[])?;
    ceilings::drop_caches();
    let (w50, w99) = random_latencies(&mp.join("incompressible.bin"), &offsets)?;
    umount(&mp);
    put(
        "random_4k_ms",
        serde_json::json!({"cold_p50": c50, "cold_p99": c99, "warm_p50": w50, "warm_p99": w99}),
    );

    eprintln!("thaw bench: first byte and mount time");
    let mut first = Vec::new();
    let mut mount_ms = Vec::new();
    for i in 0..5 {
        let c = work.join(format!("cache-first-{i}"));
        mount(&files_ref, &mp, &c, &[])?;
        ceilings::drop_caches();
        let t = Instant::now();
        let f = std::fs::File::open(mp.join("incompressible.bin"))?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0)?;
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(f);
        umount(&mp);
        let t = Instant::now();
        mount(&small_ref, &mp, &c, &[])?;
        mount_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        umount(&mp);
    }
    put("first_byte_ms", serde_json::json!(median(&mut first)));
    put(
        "mount_10k_files_ms",
        serde_json::json!(median(&mut mount_ms)),
    );
    put("mem_cache_budget_bytes", serde_json::json!(256u64 << 20));
    let doc = serde_json::Value::Object(out);
    std::fs::write(a.out.join("mount.json"), serde_json::to_vec_pretty(&doc)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print(&doc);
    Ok(())
}

fn print(d: &serde_json::Value) {
    let mb = |v: &serde_json::Value| {
        v.as_f64()
            .map(|b| format!("{:.0} MB/s", b / 1e6))
            .unwrap_or_else(|| "n/a".into())
    };
    let ratio = |v: &serde_json::Value| {
        v.as_f64()
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_else(|| "n/a".into())
    };
    println!("\nthaw bench --suite mount (loopback)");
    println!(
        "{:<15} {:>11} {:>11} {:>12} {:>14} {:>9} {:>9} {:>10}",
        "data", "cold", "warm", "squashfuse", "fetch+decomp", "cold/sq", "warm/sq", "peak RSS"
    );
    for k in ["compressible", "incompressible"] {
        let v = &d[k];
        println!(
            "{:<15} {:>11} {:>11} {:>12} {:>14} {:>9} {:>9} {:>10}",
            k,
            mb(&v["cold_bytes_per_sec"]),
            mb(&v["warm_bytes_per_sec"]),
            mb(&v["squashfuse_bytes_per_sec"]),
            mb(&v["fetch_decompress_bytes_per_sec"]),
            ratio(&v["cold_vs_squashfuse"]),
            ratio(&v["warm_vs_squashfuse"]),
            crate::cmd::human(v["mount_peak_rss_bytes"].as_u64().unwrap_or(0)),
        );
    }
    let r = &d["random_4k_ms"];
    println!(
        "random 4 KiB reads: cold p50 {:.2} ms, p99 {:.2} ms; warm p50 {:.3} ms, p99 {:.3} ms",
        r["cold_p50"].as_f64().unwrap_or(0.0),
        r["cold_p99"].as_f64().unwrap_or(0.0),
        r["warm_p50"].as_f64().unwrap_or(0.0),
        r["warm_p99"].as_f64().unwrap_or(0.0)
    );
    println!(
        "first byte {:.2} ms; `thaw mount` of a 10k-file image {:.1} ms (whole command)",
        d["first_byte_ms"].as_f64().unwrap_or(0.0),
        d["mount_10k_files_ms"].as_f64().unwrap_or(0.0)
    );
}
