//! The startup chart, answering the reader's question: how much longer than
//! starting from local disk does each way of getting the image take?
//!
//! Each bar is a mode's median time to ready as a multiple of local (local =
//! 1.0x), on a log axis, so a peer at 80x and thaw at 1.5x are both readable
//! in one picture (on a linear axis of seconds the slowest bar flattens every
//! other one to a sliver). Bars are labelled with the multiple and the
//! seconds. Drawn with plotters' SVG backend: text stays `<text>`, so no font
//! files are needed.

use crate::startup::StartupReport;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Each mode's color, the same in every group and in the legend.
const PALETTE: [(&str, RGBColor); 6] = [
    ("full pull", RGBColor(0xd6, 0x27, 0x28)),
    ("lazy cold", RGBColor(0x1f, 0x77, 0xb4)),
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

fn draw(report: &StartupReport, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let bars = bars(report);
    let finite = || {
        bars.iter()
            .map(|b| b.ratio)
            .filter(|r| r.is_finite() && *r > 0.0)
    };
    let lo = finite().fold(0.5f64, f64::min) / 1.5;
    let hi = finite().fold(2.0f64, f64::max) * 4.0;
    let names: Vec<&str> = report
        .workloads
        .iter()
        .map(|w| w.workload.as_str())
        .collect();
    let root = SVGBackend::with_string(svg, (960, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "thaw cold start: time to ready as a multiple of local (median), link {}",
        report.link
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 21))
        .margin(14)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..names.len().max(1) as f64, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .y_desc("time to ready, x local (log scale)")
        .y_label_formatter(&|y| format!("{y}x"))
        .draw()?;
    let mut modes: Vec<&str> = Vec::new();
    for b in &bars {
        if !modes.contains(&b.mode) {
            modes.push(b.mode);
        }
    }
    for mode in modes {
        let c = color(mode);
        let rects = bars
            .iter()
            .filter(|b| b.mode == mode)
            .map(|b| Rectangle::new([(b.x.0, lo), (b.x.1, b.ratio.max(lo))], c.filled()));
        chart
            .draw_series(rects)?
            .label(mode)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    let above =
        |size: u32| TextStyle::from(("sans-serif", size)).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().map(|b| {
        let at = ((b.x.0 + b.x.1) / 2.0, b.ratio.max(lo));
        EmptyElement::at(at)
            + Text::new(format!("{:.1}x", b.ratio), (0, -2), above(15))
            + Text::new(
                format!("{:.2}s", b.seconds),
                (0, -17),
                above(13).color(&SECONDS_GREY),
            )
    }))?;
    // Workload names under their groups (the x axis has no numbers to show).
    let below = TextStyle::from(("sans-serif", 17)).pos(Pos::new(HPos::Center, VPos::Top));
    for (g, name) in names.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, lo));
        root.draw(&Text::new(name.to_string(), (x, y + 8), below.clone()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
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

    /// Heights of the filled bars (the legend's swatches are 10 px high).
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
                (r.contains("fill=\"#") && h > 11.0 && h < 400.0).then_some(h)
            })
            .collect()
    }
}
