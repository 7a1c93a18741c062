//! The startup chart, answering the reader's question: how much longer than
//! starting from local disk does each way of getting the image take?
//!
//! Each bar is a mode's median time to ready as a multiple of local (local =
//! 1.0x), on a log axis, so a peer at 80x and thaw at 1.5x are both readable
//! in one picture (on a linear axis of seconds the slowest bar flattens every
//! other one to a sliver). Bars are labelled with the multiple and the
//! seconds. Drawn with plotters' SVG backend: text stays `<text>`, so no font
//! files are needed.

mod timeline;

use crate::startup::StartupReport;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
pub use timeline::draw_all as draw_timelines;

/// Each mode's color, the same in every group and in the legend.
const PALETTE: [(&str, RGBColor); 7] = [
    ("full pull", RGBColor(0xd6, 0x27, 0x28)),
    ("lazy cold", RGBColor(0x1f, 0x77, 0xb4)),
    ("lazy profiled", RGBColor(0x17, 0xbe, 0xcf)),
    ("lazy warm", RGBColor(0x2c, 0xa0, 0x2c)),
    ("local", RGBColor(0x7f, 0x7f, 0x7f)),
    ("casync", RGBColor(0xff, 0x7f, 0x0e)),
    ("nydus", RGBColor(0x94, 0x67, 0xbd)),
];

const SECONDS_GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);

fn color(mode: &str) -> RGBColor {
    PALETTE
        .iter()
        .find(|(m, _)| *m == mode)
        .map_or(BLACK, |(_, c)| *c)
}

/// One bar, placed: its x span and what it shows.
struct Bar<'a> {
    x: (f64, f64),
    mode: &'a str,
    ratio: f64,
    seconds: f64,
}

/// Workload `g` spans x in `g..g + 1`; its measured modes share 80% of it.
fn bars(report: &StartupReport) -> Vec<Bar<'_>> {
    let mut bars = Vec::new();
    for (g, w) in report.workloads.iter().enumerate() {
        let ran: Vec<_> = w.modes.iter().filter(|m| m.skipped.is_none()).collect();
        let width = 0.8 / ran.len().max(1) as f64;
        for (i, m) in ran.into_iter().enumerate() {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            bars.push(Bar {
                x: (x0 + width * 0.05, x0 + width * 0.95),
                mode: &m.mode,
                ratio: m.vs_local,
                seconds: m.median_seconds,
            });
        }
    }
    bars
}

/// Renders `startup.svg`.
pub fn startup(report: &StartupReport) -> Result<String> {
    let mut svg = String::new();
    draw(report, &mut svg).map_err(|e| anyhow!("cannot draw the chart: {e}"))?;
    Ok(svg)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw(report: &StartupReport, svg: &mut String) -> DrawResult {
    let bars = bars(report);
    let finite = || {
        bars.iter()
            .map(|b| b.ratio)
            .filter(|r| r.is_finite() && *r > 0.0)
    };
    // Room below local's 1.0x for its bar, and above the tallest for its labels.
    let lo = finite().fold(0.5f64, f64::min) / 1.5;
    let hi = finite().fold(2.0f64, f64::max) * 3.0;
    let groups = report.workloads.len().max(1) as f64;
    let root = SVGBackend::with_string(svg, (960, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "thaw cold start: time to ready as a multiple of local (median), link {}",
        report.link
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 21))
        .margin(14)
        .x_label_area_size(60)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..groups, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .y_desc("time to ready, x local (log scale)")
        .y_label_formatter(&|y| format!("{y}x"))
        .draw()?;
    chart.draw_series(bars.iter().map(|b| {
        let top = b.ratio.max(lo);
        Rectangle::new([(b.x.0, lo), (b.x.1, top)], color(b.mode).filled())
    }))?;
    label_bars(&mut chart, &bars, lo)?;
    // Workload names under their groups, then the legend in one row below.
    let (left, axis) = chart.backend_coord(&(0.0, lo));
    let below = TextStyle::from(("sans-serif", 17)).pos(Pos::new(HPos::Center, VPos::Top));
    for (g, w) in report.workloads.iter().enumerate() {
        let (x, _) = chart.backend_coord(&(g as f64 + 0.5, lo));
        root.draw(&Text::new(w.workload.clone(), (x, axis + 8), below.clone()))?;
    }
    legend(&root, &bars, (left, axis + 34))
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// Above each bar its multiple of local, and above that its seconds.
fn label_bars(chart: &mut Chart<'_, '_>, bars: &[Bar<'_>], lo: f64) -> DrawResult {
    let above =
        |size| TextStyle::from(("sans-serif", size)).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().map(|b| {
        let at = ((b.x.0 + b.x.1) / 2.0, b.ratio.max(lo));
        let seconds = above(13).color(&SECONDS_GREY);
        EmptyElement::at(at)
            + Text::new(format!("{:.1}x", b.ratio), (0, -2), above(15))
            + Text::new(format!("{:.2}s", b.seconds), (0, -17), seconds)
    }))?;
    Ok(())
}

/// One swatch and name per mode that has a bar, left to right from `at`.
fn legend(root: &Area<'_>, bars: &[Bar<'_>], at: (i32, i32)) -> DrawResult {
    let mut modes: Vec<&str> = Vec::new();
    for b in bars {
        if !modes.contains(&b.mode) {
            modes.push(b.mode);
        }
    }
    let style = TextStyle::from(("sans-serif", 15)).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, mode) in modes.into_iter().enumerate() {
        let (x, y) = (at.0 + 20 + 120 * i as i32, at.1);
        root.draw(&Rectangle::new(
            [(x, y - 6), (x + 12, y + 6)],
            color(mode).filled(),
        ))?;
        root.draw(&Text::new(mode.to_string(), (x + 18, y), style.clone()))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::{ModeResult, Sample, WorkloadResult};

    fn mode(name: &str, seconds: f64, local: f64) -> ModeResult {
        let mut m = ModeResult::from_samples(
            name,
            vec![Sample {
                seconds,
                bytes_fetched: 0,
            }],
        );
        m.vs_local = seconds / local;
        m
    }

    #[test]
    fn a_slow_peer_leaves_every_other_bar_readable() {
        let modes = vec![
            mode("full pull", 6.0, 0.5),
            mode("lazy cold", 0.9, 0.5),
            mode("lazy warm", 0.6, 0.5),
            mode("local", 0.5, 0.5),
            mode("casync", 42.0, 0.5),
            ModeResult::skipped("nydus", "not installed"),
        ];
        let workload = WorkloadResult {
            workload: "python-env".into(),
            image_bytes: 1,
            image_files: 1,
            stored_bytes: 1,
            read_bytes: 1,
            share_read: 1.0,
            modes,
        };
        let report = StartupReport::new(None, true, Default::default(), vec![workload]);
        let svg = startup(&report).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for label in [
            "84.0x",
            "12.0x",
            "1.8x",
            "1.2x",
            "1.0x",
            "0.90s",
            "python-env",
        ] {
            assert!(svg.contains(label), "no {label} in the chart");
        }
        assert!(
            !svg.contains("nydus"),
            "a skipped mode has no bar or legend entry"
        );
        // Heights on a log axis: local's bar is at least a tenth of casync's.
        let heights = rect_heights(&svg);
        let (min, max) = heights
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), h| (a.min(*h), b.max(*h)));
        assert!(min * 10.0 > max, "bar heights {heights:?}");
    }

    /// Heights of the filled bars (the legend's swatches are 12 px high).
    fn rect_heights(svg: &str) -> Vec<f64> {
        svg.split("<rect")
            .skip(1)
            .filter_map(|r| {
                let h: f64 = r
                    .split("height=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse()
                    .ok()?;
                (r.contains("fill=\"#") && h > 20.0 && h < 400.0).then_some(h)
            })
            .collect()
    }
}
