//! Integer inference and export: a trained network folded into inference form ([`fold`]), the
//! integer model file ([`model`]), the integer engine on the GPU ([`engine`]) and ONNX ([`onnx`];
//! IAO models in the QDQ form, [`qdq`]); [`int_model`] picks the integer form of a network's
//! scheme (DoReFa [`fold`], IAO [`iao`], wbwtab's XNOR [`xnor`]).

pub mod engine;
pub mod fold;
pub mod iao;
pub mod model;
pub mod onnx;
pub mod qdq;
pub mod xnor;

pub use engine::IntEngine;
pub use model::IntModel;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::Network;
use crate::quant::Scheme;
use std::path::Path;

/// The integer model of `net` (weights read from the GPU), by its scheme: DoReFa's codes and
/// folded BatchNorms, IAO's affine int8 codes, or wbwtab's bits and XNOR convs.
pub fn int_model(gpu: &Gpu, net: &Network) -> Result<IntModel> {
    match net.quant.scheme {
        Scheme::Dorefa => IntModel::from_folded(&fold::fold(gpu, net)?),
        Scheme::Iao(_) => iao::int_model(gpu, net),
        Scheme::Wbwtab(_) => xnor::int_model(gpu, net),
    }
}

/// An image file as a normalised NCHW image of `input` = (C, H, W): decoded (PNG, JPEG), made RGB,
/// resized to H×W (bilinear) when its size differs, then normalised with `mean` and `std` as in
/// training.
pub fn load_image(
    path: &Path,
    input: [usize; 3],
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Vec<f32>> {
    let img =
        image::open(path).map_err(|e| Error::file(path, format!("cannot read the image: {e}")))?;
    let [c, h, w] = input;
    if c != 3 {
        return Err(Error::Invalid(format!(
            "the model takes {c}-channel input; images are RGB"
        )));
    }
    let mut rgb = img.to_rgb8();
    if rgb.dimensions() != (w as u32, h as u32) {
        rgb = image::imageops::resize(
            &rgb,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
    }
    let mut out = vec![0.0f32; c * h * w];
    for (x, y, px) in rgb.enumerate_pixels() {
        for ch in 0..3 {
            out[(ch * h + y as usize) * w + x as usize] =
                (px[ch] as f32 / 255.0 - mean[ch]) / std[ch];
        }
    }
    Ok(out)
}

/// Softmax probabilities of one row of logits.
pub fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Index of the first maximum (as torch.argmax).
pub fn argmax(z: &[f32]) -> usize {
    z.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > z[b] { i } else { b })
}
