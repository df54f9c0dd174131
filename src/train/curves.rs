//! `curves.png`: loss and accuracy against epoch, training and test, redrawn after every epoch.

use crate::error::{Error, Result};
use crate::util::atomic_write;
use plotters::prelude::*;
use std::path::Path;

/// Per-epoch numbers for the curves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochPoint {
    pub epoch: u32,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
}

const FONT: &str = "wgqat-sans";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// A named, coloured line of (epoch, value) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel(
    area: &Panel,
    title: &str,
    y_label: &str,
    series: &[Series],
    x_max: f64,
) -> std::result::Result<(), String> {
    let ys = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .filter(|v| v.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), if hi > lo { hi * 1.05 } else { lo + 1.0 })
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(1.0..x_max.max(2.0), lo..hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, colour, points) in series {
        let c = *colour;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied().filter(|p| p.1.is_finite()),
                c.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws the curves into `path` (atomically).
pub fn draw(path: &Path, points: &[EpochPoint], title: &str) -> Result<()> {
    register_font();
    let (w, h) = (1000u32, 420u32);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), String> {
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let (left, right) = root.split_horizontally(w / 2);
            let x_max = points.iter().map(|p| p.epoch as f64).fold(1.0, f64::max);
            let pts = |f: fn(&EpochPoint) -> f64| {
                points
                    .iter()
                    .map(|p| (p.epoch as f64, f(p)))
                    .collect::<Vec<_>>()
            };
            panel(
                &left,
                &format!("{title}: loss"),
                "loss",
                &[
                    ("train", BLUE, pts(|p| p.train_loss)),
                    ("test", RED, pts(|p| p.test_loss)),
                ],
                x_max,
            )?;
            panel(
                &right,
                &format!("{title}: accuracy"),
                "accuracy %",
                &[
                    ("train", BLUE, pts(|p| p.train_acc)),
                    ("test", RED, pts(|p| p.test_acc)),
                ],
                x_max,
            )?;
            root.present().map_err(|e| e.to_string())
        };
        draw().map_err(|e| Error::file(path, format!("cannot draw the curves: {e}")))?;
    }
    let mut png = Vec::new();
    {
        let enc = image::codecs::png::PngEncoder::new(&mut png);
        image::ImageEncoder::write_image(enc, &pixels, w, h, image::ColorType::Rgb8)
            .map_err(|e| Error::file(path, format!("cannot encode the curves: {e}")))?;
    }
    atomic_write(path, &png)
}
