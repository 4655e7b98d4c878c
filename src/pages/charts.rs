//! The report's charts, drawn as SVG by plotters (no JavaScript, no fonts on disk: the
//! SVG carries its text as text, sized by the browser).

use plotters::prelude::*;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 300;
const OPENS: RGBColor = RGBColor(37, 99, 235);
const CLICKS: RGBColor = RGBColor(217, 119, 6);
const UNSUBS: RGBColor = RGBColor(190, 18, 60);

/// One named line of a chart: its legend, its colour, its points.
type Series<X, Y> = (&'static str, RGBColor, Vec<(X, Y)>);

/// Why a chart could not be drawn (the page shows "chart unavailable" with it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChartError(String);

impl ChartError {
    fn of(e: impl std::fmt::Display) -> ChartError {
        ChartError(e.to_string())
    }
}

/// Draws each named series as a line with its points, and the legend.
fn lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: Vec<Series<X::ValueType, Y::ValueType>>,
) -> Result<(), ChartError>
where
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    for (name, color, points) in series {
        chart
            .draw_series(LineSeries::new(
                points.iter().cloned(),
                color.stroke_width(2),
            ))
            .map_err(ChartError::of)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(ChartError::of)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(ChartError::of)
}

/// Opens and clicks (people's) per hour: `points` are (hour since the epoch, opens,
/// clicks), in order.
pub fn timeline(points: &[(i64, i64, i64)]) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(ChartError::of)?;
        let (first, last) = match (points.first(), points.last()) {
            (Some(f), Some(l)) => (f.0, l.0.max(f.0 + 1)),
            _ => (0, 1),
        };
        let top = points
            .iter()
            .map(|p| p.1.max(p.2))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(first..last, 0i64..top + top / 10 + 1)
            .map_err(ChartError::of)?;
        chart
            .configure_mesh()
            .x_desc("hour (UTC)")
            .y_desc("per hour")
            .x_labels(6)
            .x_label_formatter(&|h| {
                chrono::DateTime::from_timestamp(h * 3600, 0)
                    .map(|t| t.format("%d %b %H:00").to_string())
                    .unwrap_or_default()
            })
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(ChartError::of)?;
        let opens = points.iter().map(|p| (p.0, p.1)).collect();
        let clicks = points.iter().map(|p| (p.0, p.2)).collect();
        lines(
            &mut chart,
            vec![("opens", OPENS, opens), ("clicks", CLICKS, clicks)],
        )?;
        root.present().map_err(ChartError::of)?;
    }
    Ok(svg)
}

/// The contact-pressure curve: people's unique click rate and unsubscribe rate (in %) per
/// touch bucket.
pub fn touches(rows: &[(String, f64, f64)]) -> Result<String, ChartError> {
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let at = |pick: fn(&(String, f64, f64)) -> f64| rows.iter().map(pick).collect();
    per_touch(
        &labels,
        vec![
            ("click rate", CLICKS, at(|r| r.1)),
            ("unsubscribe rate", UNSUBS, at(|r| r.2)),
        ],
        "% of delivered",
        0.5,
    )
}

/// Revenue per delivered message at each touch level, in `currency` (the report's
/// contact pressure in money).
pub fn revenue_by_touch(rows: &[(String, f64)], currency: &str) -> Result<String, ChartError> {
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let y = format!("revenue per delivered ({currency})");
    per_touch(
        &labels,
        vec![(
            "revenue per delivered",
            OPENS,
            rows.iter().map(|r| r.1).collect(),
        )],
        &y,
        0.01,
    )
}

/// Lines over the touch levels `labels`, the y axis from 0 to a little above the highest
/// point (at least `min_top`).
fn per_touch(
    labels: &[String],
    series: Vec<(&'static str, RGBColor, Vec<f64>)>,
    y_desc: &str,
    min_top: f64,
) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(ChartError::of)?;
        let top = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .fold(0.0f64, f64::max)
            .max(min_top);
        let n = labels.len().max(1) as i32;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(-1i32..n, 0f64..top * 1.15)
            .map_err(ChartError::of)?;
        chart
            .configure_mesh()
            .x_desc("marketing messages to the person in the last year (this one included)")
            .y_desc(y_desc)
            .x_labels(labels.len() + 2)
            .x_label_formatter(&|i| {
                usize::try_from(*i)
                    .ok()
                    .and_then(|i| labels.get(i).cloned())
                    .unwrap_or_default()
            })
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(ChartError::of)?;
        let series = series
            .into_iter()
            .map(|(name, colour, ys)| {
                let points = ys
                    .into_iter()
                    .enumerate()
                    .map(|(i, y)| (i as i32, y))
                    .collect();
                (name, colour, points)
            })
            .collect();
        lines(&mut chart, series)?;
        root.present().map_err(ChartError::of)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_legends() {
        let t = timeline(&[(490_000, 10, 2), (490_001, 4, 1)]).unwrap();
        assert!(t.starts_with("<svg") && t.contains("opens") && t.contains("clicks"));
        let empty = timeline(&[]).unwrap();
        assert!(empty.starts_with("<svg"));
        let r = revenue_by_touch(&[("1".into(), 4.99), ("2".into(), 3.1)], "EUR").unwrap();
        assert!(r.starts_with("<svg") && r.contains("revenue per delivered"));
        let c = touches(&[("1".into(), 4.0, 0.1), ("2".into(), 3.5, 0.2)]).unwrap();
        assert!(c.contains("unsubscribe rate") && c.contains("<text"));
    }
}
