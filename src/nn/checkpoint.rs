//! Checkpoints: safetensors files holding the float latent weights under micronet's state-dict
//! names (`model.{i}.conv.weight`, `model.{i}.bn.running_var`, `...num_batches_tracked` as an
//! int64 scalar), so a micronet model converted to safetensors loads here and ours loads in
//! PyTorch (`model.load_state_dict(safetensors.torch.load_file(path))`). Loading is strict: a
//! missing, unexpected, misshapen or mistyped tensor is an error that names it.
//!
//! IAO quantizers are saved under micronet's keys (`{layer}.activation_quantizer.scale`,
//! `.zero_point`, `.eps`, `.quant_min_val`, `.quant_max_val`, `.observer.min_val`,
//! `.observer.max_val`, and the same for `weight_quantizer`; a QuantAdd's observers as
//! `{add}.observer_res.min_val` ... `{add}.observer_shortcut.max_val`). Whether an observer has seen
//! anything is not saved, as micronet keeps it out of its state dict: after a load, the first
//! training call takes the current range (a resume file keeps it, under `wgqat.iao_observed`).

use super::network::{IaoInfo, Network};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::iao::ROW_WORDS;
use crate::quant::iao::EPS;
use crate::util::atomic_write;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Tensor contents by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Bytes (integer model codes).
    U8(Vec<u8>),
}

/// A named tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Named {
    pub fn f32s(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn f32(name: impl Into<String>, shape: &[usize], v: Vec<f32>) -> Named {
        Named {
            name: name.into(),
            shape: shape.to_vec(),
            data: Data::F32(v),
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "F32",
            Data::I64(_) => "I64",
            Data::U8(_) => "U8",
        }
    }
}

/// Writes tensors and string metadata to a safetensors file, atomically.
pub fn write(path: &Path, tensors: &[Named], meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            let (b, d) = match &t.data {
                Data::F32(v) => (bytemuck::cast_slice::<f32, u8>(v).to_vec(), Dtype::F32),
                Data::I64(v) => (bytemuck::cast_slice::<i64, u8>(v).to_vec(), Dtype::I64),
                Data::U8(v) => (v.clone(), Dtype::U8),
            };
            (t.name.clone(), b, d, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, d, s)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| Error::file(path, e.to_string()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let out = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    atomic_write(path, &out)
}

/// Reads every tensor (F32, I64 or U8) and the metadata of a safetensors file.
pub fn read(path: &Path) -> Result<(Vec<Named>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let not_st = |e: safetensors::SafeTensorError| {
        Error::file(
            path,
            format!(
                "not a readable safetensors file ({e}): is it complete, and a safetensors checkpoint?"
            ),
        )
    };
    let st = SafeTensors::deserialize(&bytes).map_err(not_st)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(not_st)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => Data::F32(bytemuck::pod_collect_to_vec(view.data())),
            Dtype::I64 => Data::I64(bytemuck::pod_collect_to_vec(view.data())),
            Dtype::U8 => Data::U8(view.data().to_vec()),
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "{name} has dtype {other:?}; wgqat checkpoints hold F32 (and I64 counters)"
                    ),
                ));
            }
        };
        out.push(Named {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

impl Network {
    /// The model's state in PyTorch's state-dict order: per layer its parameters, then (BN) the
    /// running statistics and `num_batches_tracked`.
    pub fn state_dict(&self, gpu: &Gpu) -> Result<Vec<Named>> {
        let params = self.params.unpack(&gpu.read_f32(&self.param_arena)?);
        let running = self.running.unpack(&gpu.read_f32(&self.running_arena)?);
        let mut out = Vec::new();
        let bns = self.batchnorm_names();
        let mut layer_names: Vec<String> = Vec::new();
        for e in self.params.entries() {
            let layer = e
                .name
                .rsplit_once('.')
                .map_or(e.name.as_str(), |(l, _)| l)
                .to_string();
            if !layer_names.contains(&layer) {
                layer_names.push(layer);
            }
        }
        for layer in layer_names {
            for (e, v) in self.params.entries().iter().zip(&params) {
                if e.name.rsplit_once('.').map(|(l, _)| l) == Some(layer.as_str()) {
                    out.push(Named::f32(e.name.clone(), &e.shape, v.clone()));
                }
            }
            if let Some(k) = bns.iter().position(|b| *b == layer) {
                for suffix in ["running_mean", "running_var"] {
                    let name = format!("{layer}.{suffix}");
                    let i = self.running.index_of(&name).expect("running stat");
                    out.push(Named::f32(
                        name,
                        &self.running.entries()[i].shape,
                        running[i].clone(),
                    ));
                }
                out.push(Named {
                    name: format!("{layer}.num_batches_tracked"),
                    shape: vec![],
                    data: Data::I64(vec![self.batches_tracked[k]]),
                });
            }
        }
        for f in self.folds() {
            for (i, suffix) in [
                (f.running_mean, "running_mean"),
                (f.running_var, "running_var"),
            ] {
                out.push(Named::f32(
                    format!("{}.{suffix}", f.conv),
                    &self.running.entries()[i].shape,
                    running[i].clone(),
                ));
            }
        }
        for q in self.iao_quantizers() {
            out.extend(iao_keys(&q, &running[q.entry]));
        }
        Ok(out)
    }

    /// Whether each IAO quantizer has observed anything and each fold has set its running
    /// statistics (1) or not (0), in [`Network::observed_flags`] order: what a resume file adds
    /// to the state dict.
    pub fn iao_observed(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let running = self.running.unpack(&gpu.read_f32(&self.running_arena)?);
        Ok(self
            .observed_flags()
            .iter()
            .map(|&(e, k)| running[e][k])
            .collect())
    }

    /// Restores [`Network::iao_observed`] (after a load, which clears it).
    pub fn set_iao_observed(&self, gpu: &Gpu, flags: &[f32]) -> Result<()> {
        let places = self.observed_flags();
        if flags.len() != places.len() {
            return Err(Error::Invalid(format!(
                "{} observer flags for {} quantizers and folds",
                flags.len(),
                places.len()
            )));
        }
        let mut running = self.running.unpack(&gpu.read_f32(&self.running_arena)?);
        for (&(e, k), &f) in places.iter().zip(flags) {
            running[e][k] = f;
        }
        gpu.write(&self.running_arena, &self.running.pack(&running))
    }

    /// Saves the state to `path` (atomically), with `meta` strings.
    pub fn save(&self, gpu: &Gpu, path: &Path, mut meta: HashMap<String, String>) -> Result<()> {
        meta.insert("format".into(), "pt".into());
        meta.insert("model".into(), self.spec.name.clone());
        write(path, &self.state_dict(gpu)?, meta)
    }

    /// Loads a state dict saved by wgqat or converted from PyTorch; every tensor must be present
    /// with the model's shape, and nothing else may be there.
    pub fn load(&mut self, gpu: &Gpu, path: &Path) -> Result<()> {
        let (tensors, _) = read(path)?;
        self.load_named(gpu, path, tensors)
    }

    /// [`Network::load`] from tensors already in memory (`path` names their origin in errors).
    pub fn load_named(&mut self, gpu: &Gpu, path: &Path, tensors: Vec<Named>) -> Result<()> {
        let mut by_name: HashMap<String, Named> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let folds = self.folds();
        // A checkpoint without folds (float, DoReFa, IAO without bn_fuse) starts each fold from
        // its BatchNorm, as micronet's prepare() copies it into QuantBNFuseConv2d.
        for f in &folds {
            if by_name.contains_key(&format!("{}.gamma", f.conv)) {
                continue;
            }
            for (from, to) in [
                ("weight", "gamma"),
                ("bias", "beta"),
                ("running_mean", "running_mean"),
                ("running_var", "running_var"),
            ] {
                if let Some(mut t) = by_name.remove(&format!("{}.{from}", f.bn)) {
                    t.name = format!("{}.{to}", f.conv);
                    by_name.insert(t.name.clone(), t);
                }
            }
            by_name.remove(&format!("{}.num_batches_tracked", f.bn));
        }
        let model = if self.spec.name.is_empty() {
            "this".to_string()
        } else {
            self.spec.name.clone()
        };
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = by_name.remove(name).ok_or_else(|| {
                Error::file(path, format!("has no tensor {name} (shape {shape:?}): is it a checkpoint of the {model} model?"))
            })?;
            if t.shape != shape {
                return Err(Error::file(
                    path,
                    format!(
                        "{name} has shape {:?}, but the {model} model needs {shape:?}",
                        t.shape
                    ),
                ));
            }
            match t.data {
                Data::F32(v) => {
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(Error::file(
                            path,
                            format!("{name} holds NaN or infinite values"),
                        ));
                    }
                    Ok(v)
                }
                _ => Err(Error::file(
                    path,
                    format!("{name} has dtype {}, expected F32", t.dtype_name()),
                )),
            }
        };
        let params: Vec<Vec<f32>> = self
            .params
            .entries()
            .iter()
            .map(|e| take(&e.name, &e.shape))
            .collect::<Result<_>>()?;
        let iao = self.iao_quantizers();
        // IAO states are read from their keys below; fold flags start cleared.
        let is_iao =
            |i: usize| iao.iter().any(|q| q.entry == i) || folds.iter().any(|f| f.flag == i);
        let mut running: Vec<Vec<f32>> = self
            .running
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if is_iao(i) {
                    Ok(Vec::new())
                } else {
                    take(&e.name, &e.shape)
                }
            })
            .collect::<Result<_>>()?;
        // A checkpoint without any quantizer state (a float or DoReFa model) starts every IAO
        // quantizer afresh, as micronet loads float weights before prepare().
        let has_iao = iao.iter().any(|q| {
            let key = if q.observer_only { "min_val" } else { "scale" };
            by_name.contains_key(&format!("{}.{key}", q.prefix))
        });
        for f in &folds {
            running[f.flag] = vec![0.0];
        }
        for q in &iao {
            running[q.entry] = if has_iao {
                iao_state(q, path, &mut by_name)?
            } else {
                q.initial.clone()
            };
        }
        let mut tracked = Vec::new();
        for bn in self.batchnorm_names() {
            let name = format!("{bn}.num_batches_tracked");
            let t = by_name.remove(&name).ok_or_else(|| {
                Error::file(path, format!("has no tensor {name} (an int64 scalar)"))
            })?;
            match t.data {
                Data::I64(v) if v.len() == 1 => tracked.push(v[0]),
                _ => {
                    return Err(Error::file(
                        path,
                        format!(
                            "{name} must be an int64 scalar, got {} {:?}",
                            t.dtype_name(),
                            t.shape
                        ),
                    ));
                }
            }
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(Error::file(
                path,
                format!("has a tensor {extra} that the {model} model does not have"),
            ));
        }
        for name in self.quantized_layers() {
            let i = self
                .params
                .index_of(&format!("{name}.weight"))
                .expect("weight");
            if params[i].iter().all(|&v| v == 0.0) {
                return Err(Error::file(
                    path,
                    format!(
                        "{name}.weight is all zeros: DoReFa weight quantization divides by max|tanh(W)|, which is 0; train from an initialised model"
                    ),
                ));
            }
        }
        for name in self.wbwtab_layers() {
            let i = self
                .params
                .index_of(&format!("{name}.weight"))
                .expect("weight");
            let per = self.params.entries()[i].numel() / self.params.entries()[i].shape[0];
            if let Some(o) = params[i]
                .chunks(per)
                .position(|c| c.iter().all(|&v| v == 0.0))
            {
                return Err(Error::file(
                    path,
                    format!(
                        "{name}.weight has an all-zero output channel ({o}): its binary or ternary scale α would be 0 (ternary: 0/0); train from an initialised model"
                    ),
                ));
            }
        }
        gpu.write(&self.param_arena, &self.params.pack(&params))?;
        gpu.write(&self.running_arena, &self.running.pack(&running))?;
        self.batches_tracked = tracked;
        Ok(())
    }
}

/// An IAO quantizer's state as micronet's state-dict entries.
fn iao_keys(q: &IaoInfo, state: &[f32]) -> Vec<Named> {
    let col = |k: usize| -> Vec<f32> { (0..q.rows).map(|r| state[r * ROW_WORDS + k]).collect() };
    let p = &q.prefix;
    if q.observer_only {
        return vec![
            Named::f32(format!("{p}.min_val"), &q.key_shape, col(0)),
            Named::f32(format!("{p}.max_val"), &q.key_shape, col(1)),
        ];
    }
    vec![
        Named::f32(format!("{p}.scale"), &q.key_shape, col(2)),
        Named::f32(format!("{p}.zero_point"), &q.key_shape, col(3)),
        Named::f32(format!("{p}.eps"), &[], vec![EPS]),
        Named::f32(format!("{p}.quant_min_val"), &[], vec![q.code_range.0]),
        Named::f32(format!("{p}.quant_max_val"), &[], vec![q.code_range.1]),
        Named::f32(format!("{p}.observer.min_val"), &q.key_shape, col(0)),
        Named::f32(format!("{p}.observer.max_val"), &q.key_shape, col(1)),
    ]
}

/// An IAO quantizer's state from micronet's state-dict entries (taken out of `by_name`),
/// `observed` cleared. The code range and eps must be this quantizer's: another bit width or
/// q_type would reinterpret the codes.
fn iao_state(q: &IaoInfo, path: &Path, by_name: &mut HashMap<String, Named>) -> Result<Vec<f32>> {
    let mut take = |suffix: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let name = format!("{}.{suffix}", q.prefix);
        let t = by_name.remove(&name).ok_or_else(|| {
            Error::file(path, format!("has no tensor {name} (shape {shape:?}), though it holds other IAO quantizer state"))
        })?;
        match t.data {
            Data::F32(v) if t.shape == shape && v.iter().all(|x| x.is_finite()) => Ok(v),
            Data::F32(_) if t.shape == shape => Err(Error::file(
                path,
                format!("{name} holds NaN or infinite values"),
            )),
            _ => Err(Error::file(
                path,
                format!(
                    "{name} must be F32 of shape {shape:?}, got {} {:?}",
                    t.dtype_name(),
                    t.shape
                ),
            )),
        }
    };
    if q.observer_only {
        let (lo, hi) = (
            take("min_val", &q.key_shape)?,
            take("max_val", &q.key_shape)?,
        );
        let mut state = q.initial.clone();
        for r in 0..q.rows {
            (state[r * ROW_WORDS], state[r * ROW_WORDS + 1]) = (lo[r], hi[r]);
        }
        return Ok(state);
    }
    let scale = take("scale", &q.key_shape)?;
    let zp = take("zero_point", &q.key_shape)?;
    let lo = take("observer.min_val", &q.key_shape)?;
    let hi = take("observer.max_val", &q.key_shape)?;
    for (suffix, want) in [
        ("eps", EPS),
        ("quant_min_val", q.code_range.0),
        ("quant_max_val", q.code_range.1),
    ] {
        let got = take(suffix, &[])?[0];
        if got != want {
            return Err(Error::file(
                path,
                format!(
                    "{}.{suffix} is {got}, but this run's quantizer has {want}: the checkpoint was trained with other bits or another q_type; use its settings",
                    q.prefix
                ),
            ));
        }
    }
    if let Some(s) = scale.iter().find(|&&s| s <= 0.0) {
        return Err(Error::file(
            path,
            format!("{}.scale holds {s}; a scale must be positive", q.prefix),
        ));
    }
    let mut state: Vec<f32> = (0..q.rows)
        .flat_map(|r| [lo[r], hi[r], scale[r], zp[r]])
        .collect();
    state.push(0.0);
    Ok(state)
}
