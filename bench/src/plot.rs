//! Grouped bar charts as PNG (plotters, DejaVu Sans from fonts-dejavu-core).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn ensure_font() -> anyhow::Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<bool> = OnceLock::new();
    if *DONE.get_or_init(|| {
        std::fs::read(FONT)
            .ok()
            .map(|bytes| {
                register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                    .is_ok()
            })
            .unwrap_or(false)
    }) {
        Ok(())
    } else {
        anyhow::bail!("no font at {FONT}: install fonts-dejavu-core (cargo xtask setup does)")
    }
}

/// Bars of `series` (name, one value per group) over `groups`, y labelled `unit`.
pub fn bars(
    path: &Path,
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max =
        series.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let n_groups = groups.len();
    let n_series = series.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n_groups as f64, 0f64..max)?;
    let labels = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_groups * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .draw()?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    let width = 0.8 / n_series as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = palette[s % palette.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, v)| {
                let x0 = g as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, *v)], color.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
