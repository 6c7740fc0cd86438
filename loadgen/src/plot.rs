//! `--plot FILE.svg`: connections over time (top) and the latency distribution (bottom),
//! drawn with plotters' SVG backend (no fonts or system libraries needed).

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Histogram;

/// One point of the timeline: seconds since start, live connections, failures so far.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub t: f64,
    pub live: f64,
    pub failed: f64,
}

pub fn draw(
    path: &Path,
    title: &str,
    timeline: &[Point],
    latency: &Histogram,
    latency_label: &str,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(380);

    // Connections over time.
    let t_max = timeline.last().map_or(1.0, |p| p.t).max(1.0);
    let y_max = timeline
        .iter()
        .map(|p| p.live.max(p.failed))
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{title}: connections over time"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("connections")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            timeline.iter().map(|p| (p.t, p.live)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("live")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            timeline.iter().map(|p| (p.t, p.failed)),
            RED.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("failed")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;

    // Latency distribution: up to 60 equal bins from 0 to the p99.9 (the tail beyond
    // it goes in the last bin, so one outlier does not squash the picture).
    let ms = |us: u64| us as f64 / 1000.0;
    let hi = latency.percentile(99.9).map_or(1.0, ms).max(0.001);
    let bins = 60usize;
    let width = hi / bins as f64;
    let mut counts = vec![0u64; bins];
    for (lo, up, c) in latency.buckets() {
        let mid = (ms(lo) + ms(up)) / 2.0;
        let b = ((mid / width) as usize).min(bins - 1);
        counts[b] += c;
    }
    let c_max = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.05;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!("{latency_label} ({} samples)", latency.count()),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..hi, 0.0..c_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .y_desc("count")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(b, &c)| {
                    let x0 = b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], BLUE.mix(0.6).filled())
                }),
        )
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_both_charts() {
        let path = std::env::temp_dir().join(format!("loadgen-plot-{}.svg", std::process::id()));
        let timeline: Vec<Point> = (0..20)
            .map(|i| Point {
                t: i as f64 * 0.25,
                live: (i * 10) as f64,
                failed: 0.0,
            })
            .collect();
        let mut h = Histogram::new();
        for v in 0..1000 {
            h.record(500 + v * 3);
        }
        draw(&path, "connect", &timeline, &h, "CONNACK latency").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("connections over time"));
        assert!(svg.contains("CONNACK latency (1000 samples)"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.matches("<rect").count() > 10);
    }
}
