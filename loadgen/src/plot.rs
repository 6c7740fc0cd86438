//! `--plot FILE.svg`: what happened over time (top) and the latency distribution
//! (bottom), drawn with plotters' SVG backend (no fonts or system libraries needed).
//!
//! The top panel depends on the scenario ([`panel`]): connections for `connect`;
//! connections plus every storm round's drop and reconnects (from the round's own
//! per-device histogram, so a round shorter than the 250 ms sampling still shows); probes
//! and failures per second for `churn`; messages sent and delivered per second for `push`
//! and `fanout`. The latency histogram has a logarithmic axis, so the tail is visible, with
//! p50, p99 and max marked.

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Histogram;

/// One sample of the run's cumulative counters, `t` seconds after the start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Point {
    pub t: f64,
    pub live: f64,
    pub failed: f64,
    /// Initial attempts (or probes) that ended.
    pub settled: f64,
    /// Messages sent (pushes or publishes).
    pub sent: f64,
    /// Distinct messages delivered.
    pub delivered: f64,
}

/// One storm round as the plot shows it.
#[derive(Clone, Debug, Default)]
pub struct RoundMark {
    pub round: u32,
    /// When the drop was ordered (seconds since the start).
    pub dropped_at: f64,
    /// Devices back so far, cumulative: one step per histogram bucket of drop-to-back
    /// times, so every reconnect is in it (to the histogram's 1/64 resolution).
    pub back: Vec<(f64, f64)>,
    /// When the last device was back, if all were.
    pub all_back_at: Option<f64>,
}

/// A line of the top panel.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// The top panel: a title, a y axis and its lines, and labelled vertical marks.
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    pub marks: Vec<(f64, String)>,
}

/// Per-second rate of a cumulative counter between consecutive samples.
fn rate(timeline: &[Point], value: impl Fn(&Point) -> f64) -> Vec<(f64, f64)> {
    timeline
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            (
                w[1].t,
                (value(&w[1]) - value(&w[0])).max(0.0) / (w[1].t - w[0].t),
            )
        })
        .collect()
}

fn line(name: &str, color: RGBColor, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_string(),
        color,
        points,
    }
}

/// The top panel for scenario `command`.
pub fn panel(command: &str, timeline: &[Point], rounds: &[RoundMark]) -> Panel {
    let cum = |f: fn(&Point) -> f64| timeline.iter().map(|p| (p.t, f(p))).collect();
    match command {
        "churn" => Panel {
            title: "churn: probes per second".into(),
            y_desc: "per second".into(),
            series: vec![
                line("probes/s", BLUE, rate(timeline, |p| p.settled)),
                line("failures/s", RED, rate(timeline, |p| p.failed)),
            ],
            marks: Vec::new(),
        },
        "push" | "fanout" => Panel {
            title: format!("{command}: messages per second"),
            y_desc: "messages per second".into(),
            series: vec![
                line("sent/s", BLUE, rate(timeline, |p| p.sent)),
                line("delivered/s", GREEN, rate(timeline, |p| p.delivered)),
            ],
            marks: Vec::new(),
        },
        _ => {
            let mut series = vec![
                line("live", BLUE, cum(|p| p.live)),
                line("failed", RED, cum(|p| p.failed)),
            ];
            let mut marks = Vec::new();
            for r in rounds {
                series.push(line(
                    &format!("round {} back", r.round),
                    GREEN,
                    r.back.clone(),
                ));
                marks.push((r.dropped_at, format!("round {} drop", r.round)));
                if let Some(t) = r.all_back_at {
                    marks.push((t, format!("round {} all back", r.round)));
                }
            }
            Panel {
                title: format!("{command}: connections over time"),
                y_desc: "connections".into(),
                series,
                marks,
            }
        }
    }
}

pub fn draw(
    path: &Path,
    top: &Panel,
    latency: &Histogram,
    latency_label: &str,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (upper, lower) = root.split_vertically(380);
    draw_panel(&upper, top).map_err(|e| err(&e))?;
    draw_latency(&lower, latency, latency_label).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_panel(area: &Area, top: &Panel) -> DrawResult {
    let points = || top.series.iter().flat_map(|s| s.points.iter());
    let t_max = points()
        .map(|p| p.0)
        .chain(top.marks.iter().map(|m| m.0))
        .fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(&top.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(&top.y_desc)
        .draw()?;
    for s in &top.series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    for (t, label) in &top.marks {
        chart.draw_series(LineSeries::new(
            [(*t, 0.0), (*t, y_max)],
            BLACK.mix(0.5).stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (*t, y_max * 0.97),
            ("sans-serif", 12),
        )))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
}

/// Latency bins on a log axis: 60 equal steps of log10 between the smallest and the
/// largest latency recorded. Returns `(lo_ms, hi_ms, bins)` with `bins[i] = (x0, x1, n)`.
fn log_bins(latency: &Histogram) -> (f64, f64, Vec<(f64, f64, u64)>) {
    let ms = |us: u64| us as f64 / 1000.0;
    // A 0 µs sample cannot sit on a log axis: the axis starts at 1 µs.
    let lo = latency.min().map_or(0.001, ms).max(0.001);
    let hi = latency.max().map_or(1.0, ms).max(lo * 10.0);
    let n = 60usize;
    let step = (hi / lo).log10() / n as f64;
    let edge = |i: usize| lo * 10f64.powf(step * i as f64);
    let mut counts = vec![0u64; n];
    for (b_lo, b_up, c) in latency.buckets() {
        let mid = ((ms(b_lo) + ms(b_up)) / 2.0).max(lo);
        let i = (((mid / lo).log10() / step) as usize).min(n - 1);
        counts[i] += c;
    }
    let bins = counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (edge(i), edge(i + 1), c))
        .collect();
    (lo, hi, bins)
}

fn draw_latency(area: &Area, latency: &Histogram, label: &str) -> DrawResult {
    let (lo, hi, bins) = log_bins(latency);
    let c_max = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{label} ({} samples, log scale)", latency.count()),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi * 1.05).log_scale(), 0.0..c_max)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log)")
        .y_desc("count")
        .draw()?;
    chart.draw_series(
        bins.iter().filter(|b| b.2 > 0).map(|&(x0, x1, c)| {
            Rectangle::new([(x0, 0.0), (x1, c as f64)], BLUE.mix(0.6).filled())
        }),
    )?;
    let ms = |us: u64| us as f64 / 1000.0;
    let marks = [
        ("p50", latency.percentile(50.0), GREEN),
        ("p99", latency.percentile(99.0), RED),
        ("max", latency.max(), BLACK),
    ];
    for (name, value, color) in marks {
        let Some(us) = value else { continue };
        let x = ms(us).max(lo);
        chart
            .draw_series(LineSeries::new(
                [(x, 0.0), (x, c_max)],
                color.stroke_width(2),
            ))?
            .label(format!("{name} {:.3} ms", ms(us)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svg_of(top: &Panel, h: &Histogram, label: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("loadgen-plot-{}-{label}.svg", std::process::id()));
        draw(&path, top, h, label).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        svg
    }

    fn samples() -> Histogram {
        let mut h = Histogram::new();
        for v in 0..1000 {
            h.record(500 + v * 3);
        }
        h.record(250_000);
        h
    }

    #[test]
    fn draws_an_svg_with_both_charts_and_the_percentiles() {
        let timeline: Vec<Point> = (0..20)
            .map(|i| Point {
                t: i as f64 * 0.25,
                live: (i * 10) as f64,
                ..Point::default()
            })
            .collect();
        let svg = svg_of(&panel("connect", &timeline, &[]), &samples(), "CONNACK");
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("connections over time"));
        assert!(svg.contains("CONNACK (1001 samples, log scale)"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.matches("<rect").count() > 10);
        for mark in ["p50 ", "p99 ", "max 250.", "milliseconds (log)"] {
            assert!(svg.contains(mark), "{mark} missing");
        }
    }

    #[test]
    fn log_bins_keep_the_tail_apart() {
        // 1000 samples near 2 ms and one at 250 ms: on a linear axis of 60 bins up to
        // the max, the body fills one bin; on the log axis it spreads over several and
        // the outlier has a bin of its own at the far end.
        let (lo, hi, bins) = log_bins(&samples());
        assert!(lo > 0.4 && lo <= 0.5, "{lo}");
        assert!(hi >= 249.0, "{hi}");
        assert_eq!(bins.last().unwrap().2, 1);
        assert!(bins.iter().filter(|b| b.2 > 0).count() >= 5);
        assert_eq!(bins.iter().map(|b| b.2).sum::<u64>(), 1001);
        // And an empty histogram still gives a drawable axis.
        let (lo, hi, bins) = log_bins(&Histogram::new());
        assert!(lo > 0.0 && hi > lo && bins.iter().all(|b| b.2 == 0));
    }

    #[test]
    fn panels_plot_what_each_scenario_is_about() {
        let timeline: Vec<Point> = (0..5)
            .map(|i| Point {
                t: i as f64 * 0.5,
                settled: (i * 100) as f64,
                failed: (i * 10) as f64,
                sent: (i * 1000) as f64,
                delivered: (i * 900) as f64,
                ..Point::default()
            })
            .collect();
        let churn = panel("churn", &timeline, &[]);
        assert_eq!(churn.series[0].name, "probes/s");
        assert_eq!(churn.series[0].points[0], (0.5, 200.0));
        assert_eq!(churn.series[1].points[0], (0.5, 20.0));
        let fanout = panel("fanout", &timeline, &[]);
        assert_eq!(fanout.series[0].points[3], (2.0, 2000.0));
        assert_eq!(fanout.series[1].points[3], (2.0, 1800.0));

        // A storm round that is over within one sampling interval still shows: its
        // marks and its reconnect curve come from the round itself.
        let round = RoundMark {
            round: 1,
            dropped_at: 1.1,
            back: vec![(1.1, 0.0), (1.15, 150.0), (1.2, 200.0)],
            all_back_at: Some(1.2),
        };
        let storm = panel("storm", &timeline, &[round]);
        assert_eq!(storm.series[2].name, "round 1 back");
        assert_eq!(storm.series[2].points.last(), Some(&(1.2, 200.0)));
        let labels: Vec<&str> = storm.marks.iter().map(|m| m.1.as_str()).collect();
        assert_eq!(labels, ["round 1 drop", "round 1 all back"]);
        let svg = svg_of(&storm, &samples(), "storm");
        assert!(svg.contains("round 1 drop") && svg.contains("round 1 all back"));
    }
}
