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

/// How an integer model's outputs compare with the fake-quant network it was exported from.
#[derive(Clone, Copy, Debug)]
pub struct Agreement {
    pub images: usize,
    /// Images whose top class is the same.
    pub same: usize,
    pub max_abs: f32,
    /// The largest |logit| of the network, for scale.
    pub largest: f32,
}

/// Runs integer model `model` and `net`'s fake-quant evaluation on the same random normalised
/// images (as many as `net` holds, uniform in −2.5..2.5, seeded): the export check of
/// micronet's `bn_fused_model_test.py`, which compares a folded model with the trained one.
pub fn agreement(gpu: &Gpu, net: &Network, model: &IntModel) -> Result<Agreement> {
    use crate::nn::Mode;
    let batch = net.capacity();
    let x = crate::rng::Rng::new(1).vec_uniform(
        batch * model.manifest.input.iter().product::<usize>(),
        -2.5,
        2.5,
    );
    let engine = IntEngine::new(gpu, model.clone(), batch)?;
    let got = engine.run(gpu, &x)?;
    let plan = net.plan(gpu, batch, Mode::Eval)?;
    net.write_batch(gpu, &plan, &x, &vec![0; batch])?;
    net.write_step(gpu, &Default::default())?;
    let output = net
        .output()
        .ok_or_else(|| Error::Invalid("the network has no output".into()))?;
    let out = output.view(0, &[got.len()])?;
    let want: Vec<f32> = gpu
        .run_and_read::<f32>("export check", plan.ops.ops(), &[&out])?
        .remove(0);
    let classes = model.manifest.classes.max(1);
    let same = got
        .chunks(classes)
        .zip(want.chunks(classes))
        .filter(|(g, w)| argmax(g) == argmax(w))
        .count();
    Ok(Agreement {
        images: batch,
        same,
        max_abs: got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs())),
        largest: want.iter().fold(0f32, |m, v| m.max(v.abs())),
    })
}
