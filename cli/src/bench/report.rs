//! Printing results: a table on stdout (or JSON with --json), and a JSON file
//! and an SVG chart in the output directory.

use super::ceilings::Ceilings;
use super::proxy::Link;
use super::WorkloadResult;
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

fn mbps(b: f64) -> String {
    format!("{:.0} MB/s", b / 1e6)
}

/// Reports the startup suite.
pub fn startup(
    out: &Path,
    results: &[WorkloadResult],
    c: &Ceilings,
    link: Option<Link>,
    dropped: bool,
    json: bool,
) -> Result<()> {
    let doc = serde_json::json!({
        "suite": "startup",
        "link": link.map(|l| l.to_string()).unwrap_or_else(|| "loopback".into()),
        "page_cache_dropped": dropped,
        "ceilings": c,
        "workloads": results,
    });
    std::fs::write(out.join("startup.json"), serde_json::to_vec_pretty(&doc)?)?;
    std::fs::write(out.join("startup.svg"), chart(results, link))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let link_s = link
        .map(|l| l.to_string())
        .unwrap_or_else(|| "loopback, unshaped".into());
    println!("\nthaw bench: cold start, link {link_s}, medians");
    println!(
        "ceilings: loopback {}{}, zstd-3 decompress {} (1 core), BLAKE3 {} (1 core)",
        mbps(c.loopback_bytes_per_sec),
        c.link_bytes_per_sec
            .map(|b| format!(", shaped link {}", mbps(b)))
            .unwrap_or_default(),
        mbps(c.zstd_decompress_bytes_per_sec),
        mbps(c.blake3_bytes_per_sec)
    );
    for w in results {
        println!(
            "\n{}: {} files, {} ({} stored); startup reads {} ({:.1}% of the image)",
            w.workload,
            w.image_files,
            crate::cmd::human(w.image_bytes),
            crate::cmd::human(w.stored_bytes),
            crate::cmd::human(w.read_bytes),
            w.share_read * 100.0
        );
        println!(
            "  {:<10} {:>10} {:>12} {:>12} {:>10}",
            "mode", "ready (s)", "fetched", "vs full pull", "vs local"
        );
        for m in &w.modes {
            match &m.skipped {
                Some(why) => println!("  {:<10} skipped: {why}", m.mode),
                None => println!(
                    "  {:<10} {:>10.3} {:>12} {:>11.2}x {:>9.2}x",
                    m.mode,
                    m.median_seconds,
                    crate::cmd::human(m.median_bytes_fetched),
                    m.vs_full_pull,
                    m.vs_local
                ),
            }
        }
    }
    println!(
        "\nwritten: {}, {}",
        out.join("startup.json").display(),
        out.join("startup.svg").display()
    );
    Ok(())
}

/// Grouped bars: one group per workload, one bar per mode (median seconds).
fn chart(results: &[WorkloadResult], link: Option<Link>) -> String {
    const COLORS: [&str; 6] = [
        "#d62728", "#1f77b4", "#2ca02c", "#7f7f7f", "#ff7f0e", "#9467bd",
    ];
    let (w, h, left, top, bottom) = (900.0, 420.0, 70.0, 50.0, 80.0);
    let max = results
        .iter()
        .flat_map(|r| r.modes.iter().map(|m| m.median_seconds))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / results.len().max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let title = format!(
        "thaw cold start (median seconds to ready), link: {}",
        link.map(|l| l.to_string())
            .unwrap_or_else(|| "loopback".into())
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="25" font-size="15">{title}</text>"#
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.2}</text>"##,
            w - 20.0,
            left - 5.0,
            y + 4.0
        );
    }
    for (g, r) in results.iter().enumerate() {
        let modes: Vec<_> = r.modes.iter().filter(|m| m.skipped.is_none()).collect();
        let bar_w = group_w * 0.8 / modes.len().max(1) as f64;
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        for (i, m) in modes.iter().enumerate() {
            let bh = plot_h * m.median_seconds / max;
            let (x, y) = (x0 + i as f64 * bar_w, top + plot_h - bh);
            let color = COLORS[i % COLORS.len()];
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"><title>{}: {:.3}s</title></rect>"#,
                bar_w * 0.9,
                m.mode,
                m.median_seconds
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.2}</text>"#,
                x + bar_w * 0.45,
                y - 3.0,
                m.median_seconds
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            x0 + group_w * 0.4,
            h - bottom + 20.0,
            r.workload
        );
    }
    if let Some(r) = results.first() {
        for (i, m) in r.modes.iter().filter(|m| m.skipped.is_none()).enumerate() {
            let x = left + i as f64 * 130.0;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                h - 30.0,
                COLORS[i % COLORS.len()],
                x + 16.0,
                h - 20.0,
                m.mode
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
