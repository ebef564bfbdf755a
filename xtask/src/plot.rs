//! The benchmark's plot: two line charts (value against N services, log
//! scale), one series per datapath, as SVG.

use std::path::Path;

use plotters::prelude::*;

/// (title, [(series name, [(services, value)])]) for each side.
pub type Chart = (&'static str, Vec<(String, Vec<(f64, f64)>)>);

pub struct Charts {
    pub left: Chart,
    pub right: Chart,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
    RGBColor(230, 120, 0),
    RGBColor(200, 30, 30),
    RGBColor(30, 90, 200),
    RGBColor(20, 160, 60),
];

fn draw(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, chart: &Chart) -> anyhow::Result<()> {
    let (title, series) = chart;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let y_max = points.map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut c = ChartBuilder::on(area)
        .caption(*title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..x_max).log_scale(), 0f64..y_max)?;
    c.configure_mesh().x_desc("services").draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

pub fn write_svg(path: &Path, charts: &Charts) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    draw(&left, &charts.left)?;
    draw(&right, &charts.right)?;
    root.present()?;
    Ok(())
}
