//! The SVG charts of the benchmarks' distributions: one row per case and metric, every
//! sample as a dot on a logarithmic time axis (start-up times span microseconds of
//! namespaces to tens of seconds of an emulated kernel boot), the min-max range as a line
//! and the median as a bar. [`svg`] draws `hearth bench startup`'s report; [`rows_svg`]
//! any rows.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::report::{CaseStatus, StartupReport};

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("cannot draw the chart: {0}")]
    Draw(String),
}

/// One row of the chart: samples in milliseconds.
pub struct Row {
    pub label: String,
    pub samples: Vec<f64>,
    pub median: f64,
}

fn rows(report: &StartupReport) -> Vec<Row> {
    let mut rows = Vec::new();
    for case in report
        .cases
        .iter()
        .filter(|c| c.status == CaseStatus::Ok && !c.samples.is_empty())
    {
        let boots: Vec<f64> = case.samples.iter().filter_map(|s| s.boot_ms).collect();
        if let Some(summary) = case.boot_ms {
            rows.push(Row {
                label: format!("{} (boot)", case.id.name()),
                samples: boots,
                median: summary.median,
            });
        }
        if let Some(summary) = case.ready_ms {
            rows.push(Row {
                label: format!("{} (ready)", case.id.name()),
                samples: case.samples.iter().filter_map(|s| s.ready_ms).collect(),
                median: summary.median,
            });
        }
        if let Some(summary) = case.wall_ms {
            rows.push(Row {
                label: format!("{} (exit)", case.id.name()),
                samples: case.samples.iter().map(|s| s.wall_ms).collect(),
                median: summary.median,
            });
        }
    }
    rows
}

/// The start-up chart as an SVG document.
pub fn svg(report: &StartupReport) -> Result<String, ChartError> {
    let failed: Vec<&str> = report
        .cases
        .iter()
        .filter(|c| c.status != CaseStatus::Ok)
        .map(|c| c.id.name())
        .collect();
    let caption = if failed.is_empty() {
        "hearth bench startup".to_owned()
    } else {
        format!("hearth bench startup (no result: {})", failed.join(", "))
    };
    rows_svg(&caption, "time from spawn (log scale)", &rows(report))
}

/// A chart of `rows`, top to bottom, as an SVG document.
pub fn rows_svg(caption: &str, x_desc: &str, rows: &[Row]) -> Result<String, ChartError> {
    let mut text = String::new();
    let height = 120 + 36 * rows.len().max(1) as u32;
    {
        let root = SVGBackend::with_string(&mut text, (960, height)).into_drawing_area();
        draw(&root, rows, caption, x_desc).map_err(|e| ChartError::Draw(e.to_string()))?;
        root.present()
            .map_err(|e| ChartError::Draw(e.to_string()))?;
    }
    Ok(text)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    rows: &[Row],
    caption: &str,
    x_desc: &str,
) -> DrawResult {
    root.fill(&WHITE)?;
    let all = rows.iter().flat_map(|r| r.samples.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        ((lo / 2.0).max(0.001), hi * 2.0)
    } else {
        (1.0, 1000.0)
    };
    // Segment k (counting from the bottom) holds row `last - k`, so the first row is on top.
    let last = rows.len().saturating_sub(1) as i32;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d((lo..hi).log_scale(), (0..last).into_segmented())?;
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(k) => usize::try_from(last - k)
            .ok()
            .and_then(|i| rows.get(i))
            .map_or(String::new(), |r| r.label.clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .y_labels(rows.len().max(1))
        .y_label_formatter(&label)
        .x_label_formatter(&|ms| super::report::format_ms(*ms))
        .x_desc(x_desc)
        .disable_y_mesh()
        .draw()?;

    for (i, row) in rows.iter().enumerate() {
        let y = SegmentValue::CenterOf(last - i as i32);
        let color = Palette99::pick(i).to_rgba();
        let (min, max) = row
            .samples
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(min, y.clone()), (max, y.clone())],
            color.stroke_width(1),
        )))?;
        chart.draw_series(
            row.samples
                .iter()
                .map(|&v| Circle::new((v, y.clone()), 4, color.mix(0.6).filled())),
        )?;
        let median = EmptyElement::at((row.median, y.clone()))
            + PathElement::new(vec![(0, -11), (0, 11)], BLACK.stroke_width(2))
            + Text::new(
                super::report::format_ms(row.median),
                (3, -22),
                ("sans-serif", 11).into_font().color(&BLACK),
            );
        chart.draw_series(std::iter::once(median))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::example_report;

    #[test]
    fn svg_is_a_document_with_every_row() {
        let text = svg(&example_report()).unwrap();
        assert!(text.trim_start().starts_with("<svg"), "{}", &text[..100]);
        assert!(text.trim_end().ends_with("</svg>"));
        assert!(text.contains("hearth-tiny (boot)"));
        assert!(text.contains("hearth-tiny (exit)"));
        assert!(text.contains("unshare (exit)"));
        assert!(text.contains("no result: crun, firecracker-tiny"));
    }

    #[test]
    fn empty_report_still_draws() {
        let mut report = example_report();
        report.cases.clear();
        assert!(svg(&report).unwrap().contains("</svg>"));
    }
}
