//! The report's main comparisons drawn as SVG charts, written beside `docs/capacity.md` and linked
//! from it: operators would rather look than read a table.
//!
//! The charts are drawn from the same [`Report`] the templates fill in, never from the raw files,
//! so a chart cannot show a figure the text does not. SVG (plotters' SVG backend, no fonts or bitmap
//! encoders) keeps them small, diffable and readable on any viewer; the text is left to the
//! viewer's sans-serif font.

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::sections::{ChartLink, Report};

const SIZE: (u32, u32) = (860, 420);
const FONT: &str = "sans-serif";
/// One colour per series, in order, readable on white and apart from each other.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// One drawn chart: its name (the file becomes `<report stem>-<name>.svg`), title and SVG text.
pub struct Chart {
    pub name: &'static str,
    pub title: String,
    pub svg: String,
}

impl Chart {
    /// The link the report shows for this chart, when the report's file stem is `stem`.
    pub fn link(&self, stem: &str) -> ChartLink {
        ChartLink {
            file: self.file_name(stem),
            title: self.title.clone(),
        }
    }

    pub fn file_name(&self, stem: &str) -> String {
        format!("{stem}-{}.svg", self.name)
    }
}

/// Every chart of the report.
pub fn draw_all(report: &Report) -> Result<Vec<Chart>> {
    Ok(vec![
        batch_sizes(report)?,
        commit_records(report)?,
        end_to_end(report)?,
        stage_costs(report)?,
    ])
}

/// A labelled horizontal bar.
struct Bar {
    label: String,
    value: f64,
}

/// Throughput against batch size: the sink with no commit record at each measured batch size, and
/// beside it the commit records and the whole-run rates at their batch sizes.
fn batch_sizes(report: &Report) -> Result<Chart> {
    let title = "Rows per second against rows per batch".to_owned();
    let plain: Vec<(f64, f64)> = report
        .sink
        .plain
        .iter()
        .map(|m| (m.size as f64, m.rate))
        .collect();
    let ledger = |m: &super::sections::Measure| vec![(m.size as f64, m.rate)];
    let mut marks: Vec<(String, Vec<(f64, f64)>)> = vec![
        (
            "sink, SQS dedupe ledger on".into(),
            ledger(&report.sink.ledger),
        ),
        (
            "sink, ledger on, producer keys".into(),
            ledger(&report.sink.producer_ledger),
        ),
    ];
    for k in &report.kinesis.sink {
        marks.push((
            format!("sink, Kinesis checkpoints over {} shards", k.shards),
            vec![(k.measure.elements, k.measure.rate)],
        ));
    }
    let e = &report.end_to_end;
    let batch = report.kinesis.pipeline_batch_rows as f64;
    marks.push((
        "whole pipeline, memory source".into(),
        vec![(batch, e.pipeline.rate)],
    ));
    marks.push((
        "PostgreSQL's own COPY ceiling".into(),
        vec![(batch, e.ceiling.rate)],
    ));
    let xs = plain
        .iter()
        .chain(marks.iter().flat_map(|(_, p)| p.iter()))
        .map(|p| p.0);
    let (x_min, x_max) = bounds(xs);
    let y_max = plain
        .iter()
        .chain(marks.iter().flat_map(|(_, p)| p.iter()))
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let svg = draw(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(&title, (FONT, 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(80)
            .build_cartesian_2d((x_min / 1.5..x_max * 1.5).log_scale(), 0.0..y_max * 1.15)?;
        chart
            .configure_mesh()
            .x_desc("rows per batch (log scale)")
            .y_desc("rows/s")
            .x_label_formatter(&|x| thousands(*x))
            .y_label_formatter(&|y| thousands(*y))
            .label_style((FONT, 13))
            .draw()?;
        let colour = COLOURS[0];
        chart
            .draw_series(LineSeries::new(
                plain.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label("sink, no commit record (files)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart.draw_series(plain.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        for (i, (label, points)) in marks.iter().enumerate() {
            let colour = COLOURS[(i + 1) % COLOURS.len()];
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&p| TriangleMarker::new(p, 7, colour.filled())),
                )?
                .label(label.as_str())
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, colour.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        Ok(())
    })?;
    Ok(Chart {
        name: "batch-size",
        title,
        svg,
    })
}

/// The sink at one batch size with each commit record: none, the SQS ledger, Kinesis checkpoints.
fn commit_records(report: &Report) -> Result<Chart> {
    let rows = report.sink.ledger.size;
    let title = format!(
        "The sink at {} rows per batch, by commit record",
        thousands(rows as f64)
    );
    let mut bars = Vec::new();
    if let Some(plain) = report.sink.plain.iter().find(|m| m.size == rows) {
        bars.push(Bar {
            label: "ledger off (files)".into(),
            value: plain.rate,
        });
    }
    bars.push(Bar {
        label: "SQS dedupe ledger on".into(),
        value: report.sink.ledger.rate,
    });
    if report.sink.producer_ledger.size == rows {
        bars.push(Bar {
            label: "ledger on, producer keys".into(),
            value: report.sink.producer_ledger.rate,
        });
    }
    for k in report
        .kinesis
        .sink
        .iter()
        .filter(|k| k.measure.elements == rows as f64)
    {
        bars.push(Bar {
            label: format!("Kinesis checkpoints, {} shards", k.shards),
            value: k.measure.rate,
        });
    }
    let svg = horizontal_bars(&title, "rows/s", &bars)?;
    Ok(Chart {
        name: "commit-records",
        title,
        svg,
    })
}

/// The whole pipeline, with and without Kinesis checkpoints, beside PostgreSQL's own loading
/// speed and the release binary against `psql \copy`.
fn end_to_end(report: &Report) -> Result<Chart> {
    let title = "End to end, messages or rows per second".to_owned();
    let e = &report.end_to_end;
    let mut bars = vec![Bar {
        label: "pipeline, memory source".into(),
        value: e.pipeline.rate,
    }];
    for k in &report.kinesis.pipeline {
        bars.push(Bar {
            label: format!("pipeline, Kinesis checkpoints, {} shards", k.shards),
            value: k.measure.rate,
        });
    }
    let large = &report.memory.large;
    bars.extend([
        Bar {
            label: "PostgreSQL binary COPY ceiling".into(),
            value: e.ceiling.rate,
        },
        Bar {
            label: "release binary, file, default config".into(),
            value: large.row_rate,
        },
        Bar {
            label: "psql \\copy of the same rows".into(),
            value: large.psql_rate,
        },
    ]);
    let svg = horizontal_bars(&title, "per second", &bars)?;
    Ok(Chart {
        name: "end-to-end",
        title,
        svg,
    })
}

/// What a message costs in each of sluice's own stages, and in the whole binary.
fn stage_costs(report: &Report) -> Result<Chart> {
    let title = "CPU per message, nanoseconds".to_owned();
    let s = &report.stages;
    let slowest_encode = s
        .encodes
        .iter()
        .map(|m| m.ns_per_element)
        .fold(0.0, f64::max);
    let bars = vec![
        Bar {
            label: "parse/validate".into(),
            value: s.parse.ns_per_element,
        },
        Bar {
            label: "mask/transform, HMAC-SHA256".into(),
            value: s.hmac.ns_per_element,
        },
        Bar {
            label: "COPY encoding".into(),
            value: slowest_encode,
        },
        Bar {
            label: "four channel hops".into(),
            value: s.cpu_ns_with_hops - s.cpu_ns,
        },
        Bar {
            label: "the whole binary on a file".into(),
            value: report.memory.cpu_us_per_message * 1000.0,
        },
    ];
    let svg = horizontal_bars(&title, "ns per message", &bars)?;
    Ok(Chart {
        name: "stage-costs",
        title,
        svg,
    })
}

/// Bars from the left, one per row, each labelled on the axis and with its value at its end.
fn horizontal_bars(title: &str, unit: &str, bars: &[Bar]) -> Result<String> {
    let x_max = bars.iter().map(|b| b.value).fold(0.0, f64::max) * 1.25;
    let n = bars.len();
    let height = 90 + 44 * n as u32;
    draw_sized((SIZE.0, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(270)
            .build_cartesian_2d(
                0.0..x_max.max(1.0),
                // Integer ranges are inclusive: n rows are 0 to n - 1.
                (0..n.saturating_sub(1)).into_segmented(),
            )?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(unit)
            .x_labels(6)
            .x_label_formatter(&|x| thousands(*x))
            .y_labels(n)
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) => bars
                    .get(n - 1 - *i)
                    .map(|b| b.label.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .label_style((FONT, 13))
            .draw()?;
        // The first bar on top.
        chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
            let row = n - 1 - i;
            let mut rect = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (bar.value, SegmentValue::Exact(row + 1)),
                ],
                COLOURS[i % COLOURS.len()].filled(),
            );
            rect.set_margin(8, 8, 0, 0);
            rect
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
            Text::new(
                format!(" {}", thousands(bar.value)),
                (bar.value, SegmentValue::CenterOf(n - 1 - i)),
                (FONT, 13)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))?;
        Ok(())
    })
}

type Area<'a, 'b> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error + 'static>>;

/// Draws on a white canvas of the default size and returns the SVG text.
fn draw(paint: impl FnOnce(&Area<'_, '_>) -> DrawResult) -> Result<String> {
    draw_sized(SIZE, paint)
}

fn draw_sized(size: (u32, u32), paint: impl FnOnce(&Area<'_, '_>) -> DrawResult) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("drawing a chart: {e}"))?;
        paint(&root).map_err(|e| anyhow!("drawing a chart: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("drawing a chart: {e}"))?;
    }
    Ok(svg)
}

/// The smallest and largest of `values` (1 and 1 when there are none).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if min.is_finite() {
        (min, max)
    } else {
        (1.0, 1.0)
    }
}

/// An axis or bar value as the report writes numbers: thousands grouped, no decimals.
fn thousands(x: f64) -> String {
    super::format::grouped(x, 0)
}
