//! Evaluating a checkpoint on a test set: loss, accuracy and per-image predictions.

use super::config::TrainConfig;
use super::trainer::{fitting_eval_batch, load_test};
use crate::data::{self, Augment};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::kernels::loss::StepValues;
use crate::models;
use crate::nn::{Mode, Network};
use std::path::Path;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub images: usize,
    pub loss: f64,
    /// Percent.
    pub acc: f64,
    /// Predicted class of every test image (first maximum of the logits).
    pub predictions: Vec<u32>,
    /// Logits, `classes` per image.
    pub logits: Vec<f32>,
}

/// Evaluates `checkpoint` with the model, bits and data of `cfg` (its training fields unused).
pub fn evaluate(
    gpu: &Gpu,
    cfg: &TrainConfig,
    checkpoint: &Path,
    say: &dyn Fn(&str),
) -> Result<EvalResult> {
    let spec = models::load(&cfg.model)?;
    super::trainer::check_input(&spec)?;
    let test = load_test(cfg, say)?;
    let b = fitting_eval_batch(gpu, &spec, cfg.eval_batch_size, say)?;
    let quant = cfg.quant();
    let n = test.len();
    let mut net = Network::new(gpu, &spec, quant, b.min(n), false, 1)?;
    net.load(gpu, checkpoint)?;
    let full = net.plan(gpu, b.min(n), Mode::Eval)?;
    let part = if n % b != 0 && n > b {
        Some(net.plan(gpu, n % b, Mode::Eval)?)
    } else {
        None
    };
    let classes = spec.shapes()?.last().map_or(1, |s| s.iter().product());
    let (mut loss, mut correct, mut predictions) = (0.0, 0.0, Vec::with_capacity(n));
    let mut logits = Vec::with_capacity(n * classes);
    for k in 0..n.div_ceil(b) {
        let idx: Vec<usize> = (k * b..((k + 1) * b).min(n)).collect();
        let plan = if idx.len() == full.batch {
            &full
        } else {
            part.as_ref().expect("partial plan")
        };
        let (images, labels) =
            data::batch(&test, &idx, Augment::NONE, &mut crate::rng::Rng::new(0));
        net.write_batch(gpu, plan, &images, &labels)?;
        net.write_step(gpu, &StepValues::default())?;
        let out = net
            .output()
            .expect("planned")
            .view(0, &[idx.len() * classes])?;
        let read: Vec<Vec<f32>> =
            gpu.run_and_read("evaluation", plan.ops.ops(), &[&out, &net.metrics])?;
        for row in read[0].chunks(classes) {
            let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            predictions.push(row.iter().position(|&v| v == best).unwrap_or(0) as u32);
        }
        logits.extend_from_slice(&read[0]);
        loss += read[1][0] as f64 * idx.len() as f64;
        correct += read[1][1] as f64;
    }
    Ok(EvalResult {
        images: n,
        loss: loss / n as f64,
        acc: 100.0 * correct / n as f64,
        predictions,
        logits,
    })
}
