//! Training configuration, with micronet's DoReFa `main.py` defaults; saved as `config.json` in
//! the run folder and compared on resume.

use crate::error::{Error, Result};
use crate::kernels::optim::OptimizerKind;
use crate::quant::{
    Activations, Bits, IaoOptions, Observer, Percentile, QLevel, QType, QuantConfig, Scheme,
    SchemeName, WbwtabOptions, Weights,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What to do when a step's loss or gradients are not finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NanPolicy {
    /// Stop with an error naming the step and the layer where the value first appeared.
    #[default]
    Stop,
    /// Undo the step (replaying the interval without it) and go on.
    SkipStep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    /// Adam with coupled L2 weight decay (torch.optim.Adam).
    #[default]
    Adam,
    /// SGD with momentum, optionally Nesterov.
    Sgd,
}

/// Everything that defines a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `nin_gc`, `nin`, or a model JSON file.
    pub model: String,
    /// CIFAR-10 binary folder; `None` uses the built-in synthetic dataset.
    pub data: Option<PathBuf>,
    /// Sizes of the synthetic training and test sets.
    pub synthetic_train: usize,
    pub synthetic_test: usize,
    /// Use only the first N training / test images.
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub w_bits: Bits,
    pub a_bits: Bits,
    pub quantize_first_layer: bool,
    /// The quantization scheme, and IAO's options (ignored by DoReFa).
    #[serde(default)]
    pub scheme: SchemeName,
    #[serde(default)]
    pub q_type: QType,
    #[serde(default)]
    pub q_level: QLevel,
    #[serde(default)]
    pub weight_observer: Observer,
    /// IAO: quantization-aware fine-tuning, every scale frozen (micronet's `--qaft`).
    #[serde(default)]
    pub qaft: bool,
    /// IAO: fold each conv's BatchNorm into it during QAT (micronet's `--bn_fuse`).
    #[serde(default)]
    pub bn_fuse: bool,
    /// IAO `bn_fuse`: the first step updates the loaded running statistics instead of replacing
    /// them with the batch's (micronet's `--pretrained_model`).
    #[serde(default)]
    pub pretrained_model: bool,
    /// IAO `bn_fuse`: fold the weight with the running variance and rescale the conv to the
    /// batch's (micronet's `--bn_fuse_calib`).
    #[serde(default)]
    pub bn_fuse_calib: bool,
    /// wbwtab: binary, ternary or float weights (micronet's `--W 2|3|32`).
    #[serde(default)]
    pub weights: Weights,
    /// wbwtab: binary or float activations (micronet's `--A 2|32`).
    #[serde(default)]
    pub activations: Activations,
    /// IAO: post-training quantization instead of training: `ptq_batches` + 1 training-mode
    /// forward passes calibrate the observers (histogram observer at `percentile`) and the
    /// BatchNorm statistics, then the test set is evaluated and the model saved.
    #[serde(default)]
    pub ptq: bool,
    #[serde(default = "default_ptq_batches")]
    pub ptq_batches: usize,
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Epochs 1..=epochs (micronet's `range(1, 300)` is 299).
    pub epochs: u32,
    /// Stop after this many optimizer steps in all.
    pub steps: Option<u64>,
    pub optimizer: OptimizerName,
    pub lr: f64,
    /// SGD only.
    pub momentum: f32,
    pub nesterov: bool,
    pub wd: f32,
    /// Epochs at whose start the learning rate is multiplied by `gamma`.
    pub milestones: Vec<u32>,
    pub gamma: f64,
    pub seed: u64,
    /// Initial weights (a state dict in safetensors).
    pub init: Option<PathBuf>,
    pub augment: bool,
    pub shuffle: bool,
    /// Read metrics back, log and check for NaN every this many steps.
    pub log_every: u64,
    pub nan_policy: NanPolicy,
    /// Also save resume state at a log boundary when this many minutes passed since the last save
    /// (0: at every log boundary).
    pub save_minutes: f64,
    /// Before training, time each quantized conv's GEMMs on cooperative matrices and on the
    /// fp32 kernels and run each on the faster ([`crate::tune`]); the choice is saved with the
    /// resume state and kept on resume. Only where the adapter has cooperative matrices.
    #[serde(default)]
    pub tune_kernels: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "nin_gc".into(),
            data: None,
            synthetic_train: crate::data::synthetic::TRAIN,
            synthetic_test: crate::data::synthetic::TEST,
            train_limit: None,
            test_limit: None,
            w_bits: Bits::new(8).expect("8"),
            a_bits: Bits::new(8).expect("8"),
            quantize_first_layer: false,
            scheme: SchemeName::Dorefa,
            q_type: QType::Symmetric,
            q_level: QLevel::Channel,
            weight_observer: Observer::MinMax,
            qaft: false,
            bn_fuse: false,
            pretrained_model: false,
            bn_fuse_calib: false,
            weights: Weights::Binary,
            activations: Activations::Binary,
            ptq: false,
            ptq_batches: default_ptq_batches(),
            percentile: default_percentile(),
            batch_size: 50,
            eval_batch_size: 256,
            epochs: 299,
            steps: None,
            optimizer: OptimizerName::Adam,
            lr: 0.01,
            momentum: 0.9,
            nesterov: false,
            wd: 1e-5,
            milestones: vec![80, 130, 180, 230, 280],
            gamma: 0.1,
            seed: 1,
            init: None,
            augment: true,
            shuffle: true,
            log_every: 100,
            nan_policy: NanPolicy::Stop,
            save_minutes: 10.0,
            tune_kernels: false,
        }
    }
}

/// micronet's `--ptq_batch` 200.
fn default_ptq_batches() -> usize {
    200
}

/// micronet's main.py `--percentile` 0.999999 (its prepare()'s own default is 0.9999).
fn default_percentile() -> f64 {
    0.999999
}

fn non_negative(v: f32) -> bool {
    v.is_finite() && v >= 0.0
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err(Error::Invalid(
                "batch size 0: use a batch size of at least 1".into(),
            ));
        }
        if self.epochs == 0 {
            return Err(Error::Invalid(
                "`epochs` 0: train for at least 1 epoch".into(),
            ));
        }
        if self.steps == Some(0) {
            return Err(Error::Invalid("`steps` 0: take at least 1 step".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Invalid(format!(
                "`lr` {}: use a positive learning rate",
                self.lr
            )));
        }
        if !non_negative(self.wd) || !non_negative(self.momentum) {
            return Err(Error::Invalid(
                "`wd` and `momentum` must be finite and non-negative".into(),
            ));
        }
        if !(self.gamma.is_finite() && self.gamma > 0.0) {
            return Err(Error::Invalid("`gamma` must be positive".into()));
        }
        if self.nesterov && (self.optimizer != OptimizerName::Sgd || self.momentum == 0.0) {
            return Err(Error::Invalid(
                "`nesterov` needs `optimizer` sgd and a `momentum` above 0".into(),
            ));
        }
        if !(self.save_minutes.is_finite() && self.save_minutes >= 0.0) {
            return Err(Error::Invalid(
                "`save_minutes` must be 0 (save at every metrics line) or more".into(),
            ));
        }
        if self.log_every == 0 {
            return Err(Error::Invalid(
                "`log_every` 0: log at least every step".into(),
            ));
        }
        if self.scheme != SchemeName::Iao
            && (self.ptq
                || self.qaft
                || self.bn_fuse
                || self.pretrained_model
                || self.bn_fuse_calib)
        {
            return Err(Error::Invalid(
                "`ptq`, `qaft`, `bn_fuse` and `pretrained_model` are IAO's: add `scheme` iao"
                    .into(),
            ));
        }
        if self.scheme != SchemeName::Wbwtab
            && (self.weights != Weights::Binary || self.activations != Activations::Binary)
        {
            return Err(Error::Invalid(
                "`weights` and `activations` are wbwtab's: add `scheme` wbwtab".into(),
            ));
        }
        if self.scheme == SchemeName::Wbwtab && self.quantize_first_layer {
            return Err(Error::Invalid(
                "`quantize_first_layer` is DoReFa's: wbwtab keeps the first and last conv float; leave it out".into(),
            ));
        }
        if self.bn_fuse_calib && !self.bn_fuse {
            return Err(Error::Invalid(
                "`bn_fuse_calib` is a variant of `bn_fuse`: add `bn_fuse`".into(),
            ));
        }
        if self.pretrained_model && !self.bn_fuse {
            return Err(Error::Invalid(
                "`pretrained_model` says how `bn_fuse` starts its running statistics: add `bn_fuse`".into(),
            ));
        }
        if self.ptq && self.qaft {
            return Err(Error::Invalid(
                "`ptq` calibrates and `qaft` fine-tunes: run them one after the other".into(),
            ));
        }
        if !(self.percentile > 0.0 && self.percentile <= 1.0) {
            return Err(Error::Invalid(format!(
                "`percentile` {}: use a fraction in (0, 1], e.g. 0.999999",
                self.percentile
            )));
        }
        if self.ptq_batches == 0 {
            return Err(Error::Invalid(
                "`ptq_batches` 0: calibrate on at least 1 batch".into(),
            ));
        }
        if self.scheme == SchemeName::Iao && self.quantize_first_layer {
            return Err(Error::Invalid(
                "`quantize_first_layer` is DoReFa's: IAO quantizes every layer, the first included; leave it out".into(),
            ));
        }
        if self.data.is_none() && (self.synthetic_train == 0 || self.synthetic_test == 0) {
            return Err(Error::Invalid(
                "the synthetic dataset needs at least one training and one test image".into(),
            ));
        }
        Ok(())
    }

    /// How the network is quantized: the one place a run's settings become a [`QuantConfig`].
    pub fn quant(&self) -> QuantConfig {
        QuantConfig {
            w_bits: self.w_bits,
            a_bits: self.a_bits,
            quantize_first_layer: self.quantize_first_layer,
            scheme: match self.scheme {
                SchemeName::Dorefa => Scheme::Dorefa,
                SchemeName::Iao => Scheme::Iao(IaoOptions {
                    q_type: self.q_type,
                    q_level: self.q_level,
                    weight_observer: self.weight_observer,
                    qaft: self.qaft,
                    ptq: self.ptq.then_some(Percentile(self.percentile)),
                    bn_fuse: self.bn_fuse,
                    pretrained_model: self.pretrained_model,
                    bn_fuse_calib: self.bn_fuse_calib,
                }),
                SchemeName::Wbwtab => Scheme::Wbwtab(WbwtabOptions {
                    weights: self.weights,
                    activations: self.activations,
                }),
            },
        }
    }

    /// Sets the scheme and its options (the inverse of [`TrainConfig::quant`]'s).
    pub fn set_scheme(&mut self, scheme: Scheme) {
        self.scheme = scheme.name();
        if let Scheme::Iao(o) = scheme {
            (self.q_type, self.q_level, self.weight_observer) =
                (o.q_type, o.q_level, o.weight_observer);
            (
                self.qaft,
                self.bn_fuse,
                self.pretrained_model,
                self.bn_fuse_calib,
            ) = (o.qaft, o.bn_fuse, o.pretrained_model, o.bn_fuse_calib);
            self.ptq = o.ptq.is_some();
            if let Some(p) = o.ptq {
                self.percentile = p.0;
            }
        }
        if let Scheme::Wbwtab(o) = scheme {
            (self.weights, self.activations) = (o.weights, o.activations);
        }
    }

    /// Learning rate during `epoch` (from 1): `lr · gamma^(milestones ≤ epoch)`, micronet's
    /// schedule as a function of the epoch so that resuming replays it.
    pub fn lr_at(&self, epoch: u32) -> f64 {
        let passed = self.milestones.iter().filter(|&&m| m <= epoch).count();
        self.lr * self.gamma.powi(passed as i32)
    }

    pub fn optimizer_kind(&self) -> OptimizerKind {
        match self.optimizer {
            OptimizerName::Adam => OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.wd,
            },
            OptimizerName::Sgd => OptimizerKind::Sgd {
                momentum: self.momentum,
                dampening: 0.0,
                nesterov: self.nesterov,
                weight_decay: self.wd,
            },
        }
    }

    /// The settings a resumed run must share with the original (all but the length of training).
    pub fn differences_from(&self, saved: &TrainConfig) -> Vec<String> {
        let mine = serde_json::to_value(self).unwrap_or_default();
        let theirs = serde_json::to_value(saved).unwrap_or_default();
        let (Some(a), Some(b)) = (mine.as_object(), theirs.as_object()) else {
            return vec![];
        };
        a.iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "epochs" | "steps" | "log_every" | "nan_policy" | "save_minutes"
                )
            })
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k} is {v} here but {} in the run",
                    b.get(k).cloned().unwrap_or_default()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_follows_micronet() {
        let c = TrainConfig::default();
        assert_eq!(c.lr_at(1), 0.01);
        assert_eq!(c.lr_at(79), 0.01);
        assert!((c.lr_at(80) - 1e-3).abs() < 1e-15);
        assert!((c.lr_at(299) - 1e-7).abs() < 1e-18);
    }

    #[test]
    fn resume_differences_ignore_length_only() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            epochs: 5,
            steps: Some(3),
            ..a.clone()
        };
        assert!(a.differences_from(&b).is_empty());
        let c = TrainConfig {
            lr: 0.1,
            ..a.clone()
        };
        assert_eq!(a.differences_from(&c).len(), 1);
    }
}
