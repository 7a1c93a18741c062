//! The timeline chart: where a lazy start's time went. One lane per kind of
//! event a mount's timeline holds (`thaw mount --timeline`), time across:
//! the reads that reached the mount and how long each waited, the chunks
//! fetched for them, ahead of them, loaded from the disk cache, the batches
//! of a profile's stream, and the pushes of bytes into the page cache. Each
//! event is a bar from its start to its end, stacked in a lane's rows where
//! they overlap; each lane says how many events and bytes it holds.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
struct Written {
    events: Vec<Event>,
    #[serde(default)]
    dropped: u64,
}

#[derive(Debug, Deserialize)]
struct Event {
    kind: String,
    at_us: u64,
    dur_us: u64,
    #[serde(default)]
    bytes: u64,
}

/// The lanes, top to bottom: the kind, its name, its color.
const LANES: [(&str, &str, RGBColor); 6] = [
    ("read", "reads (wait)", RGBColor(0xd6, 0x27, 0x28)),
    ("fetch", "demand fetches", RGBColor(0x1f, 0x77, 0xb4)),
    ("prefetch", "readahead", RGBColor(0xff, 0x7f, 0x0e)),
    ("batch", "stream batches", RGBColor(0x17, 0xbe, 0xcf)),
    ("disk_load", "disk loads", RGBColor(0x2c, 0xa0, 0x2c)),
    ("push", "page cache pushes", RGBColor(0x94, 0x67, 0xbd)),
];

/// Rows per lane: overlapping events beyond them share the last row.
const ROWS: usize = 16;

/// Draws `timeline-*.svg` beside every `timeline-*.json` in `dir`.
pub fn draw_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut drawn = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(drawn);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("timeline-") && name.ends_with(".json")) {
            continue;
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let written: Written = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a timeline", path.display()))?;
        let title = name
            .trim_start_matches("timeline-")
            .trim_end_matches(".json")
            .replace('-', " ");
        let svg = path.with_extension("svg");
        std::fs::write(&svg, draw(&written, &title)?)?;
        drawn.push(svg);
    }
    drawn.sort();
    Ok(drawn)
}

/// Bars `(row, start ms, end ms)` of one lane's events, each in the first
/// row free at its start.
fn stack(events: &[&Event]) -> Vec<(usize, f64, f64)> {
    let mut ends = [f64::MIN; ROWS];
    let mut sorted: Vec<&&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.at_us);
    sorted
        .into_iter()
        .map(|e| {
            let (start, end) = (
                e.at_us as f64 / 1000.0,
                (e.at_us + e.dur_us) as f64 / 1000.0,
            );
            let row = ends.iter().position(|&x| x <= start).unwrap_or(ROWS - 1);
            ends[row] = end;
            (row, start, end)
        })
        .collect()
}

fn draw(w: &Written, title: &str) -> Result<String> {
    let mut svg = String::new();
    paint(w, title, &mut svg).map_err(|e| anyhow!("cannot draw the timeline: {e}"))?;
    Ok(svg)
}

fn paint(w: &Written, title: &str, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let end_ms = w
        .events
        .iter()
        .map(|e| (e.at_us + e.dur_us) as f64 / 1000.0)
        .fold(1.0f64, f64::max);
    let height = (LANES.len() * (ROWS + 2)) as f64;
    let root = SVGBackend::with_string(svg, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let dropped = match w.dropped {
        0 => String::new(),
        n => format!(" ({n} events past the bound left out)"),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("thaw {title}: what the mount did, by time{dropped}"),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(300)
        .build_cartesian_2d(0f64..end_ms * 1.02, 0f64..height)?;
    let lane_top = |lane: usize| height - (lane * (ROWS + 2)) as f64;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .label_style(("sans-serif", 14))
        .x_desc("ms since the mount began")
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (lane, (kind, name, color)) in LANES.iter().enumerate() {
        let events: Vec<&Event> = w.events.iter().filter(|e| e.kind == *kind).collect();
        let top = lane_top(lane);
        let bytes: u64 = events.iter().map(|e| e.bytes).sum();
        let mut label = format!(
            "{name}: {}, {:.1} MiB",
            events.len(),
            bytes as f64 / 1048576.0
        );
        if *kind == "read" {
            let waited: u64 = events.iter().map(|e| e.dur_us).sum();
            label += &format!(", {:.0} ms in all", waited as f64 / 1000.0);
        }
        let (x, y) = chart.backend_coord(&(0.0, top - (ROWS as f64) / 2.0));
        root.draw(&Text::new(
            label,
            (x - 292, y - 8),
            ("sans-serif", 15).into_font().color(color),
        ))?;
        // A bar at least 0.2% of the axis wide, so an instant still shows.
        let min_width = end_ms / 500.0;
        chart.draw_series(stack(&events).into_iter().map(|(row, start, end)| {
            let y1 = top - 1.0 - row as f64;
            Rectangle::new(
                [(start, y1), (end.max(start + min_width), y1 - 0.8)],
                color.filled(),
            )
        }))?;
        let sep = top - ROWS as f64 - 1.5;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, sep), (end_ms * 1.02, sep)],
            RGBColor(0xdd, 0xdd, 0xdd),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_events_take_separate_rows_and_a_drawing_names_every_lane() {
        let ev = |kind: &str, at_us, dur_us| Event {
            kind: kind.into(),
            at_us,
            dur_us,
            bytes: 1 << 20,
        };
        let reads = [
            ev("read", 0, 1000),
            ev("read", 500, 1000),
            ev("read", 1200, 10),
        ];
        let rows: Vec<usize> = stack(&reads.iter().collect::<Vec<_>>())
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(rows, [0, 1, 0]);
        let w = Written {
            events: vec![
                ev("read", 0, 1000),
                ev("batch", 100, 3000),
                ev("push", 3100, 0),
            ],
            dropped: 0,
        };
        let svg = draw(&w, "lazy profiled").unwrap();
        for (_, name, _) in LANES {
            assert!(svg.contains(name), "{name}");
        }
        assert!(svg.contains("stream batches: 1, 1.0 MiB"));
        assert!(svg.contains("reads (wait): 1, 1.0 MiB, 1 ms in all"));
        assert!(svg.contains("<rect"));
    }
}
