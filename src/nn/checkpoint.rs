//! Checkpoints: safetensors files holding the float latent weights under micronet's state-dict
//! names (`model.{i}.conv.weight`, `model.{i}.bn.running_var`, `...num_batches_tracked` as an
//! int64 scalar), so a micronet model converted to safetensors loads here and ours loads in
//! PyTorch (`model.load_state_dict(safetensors.torch.load_file(path))`). Loading is strict: a
//! missing, unexpected, misshapen or mistyped tensor is an error that names it.

use super::network::Network;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
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
        Ok(out)
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
        let running: Vec<Vec<f32>> = self
            .running
            .entries()
            .iter()
            .map(|e| take(&e.name, &e.shape))
            .collect::<Result<_>>()?;
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
        gpu.write(&self.param_arena, &self.params.pack(&params))?;
        gpu.write(&self.running_arena, &self.running.pack(&running))?;
        self.batches_tracked = tracked;
        Ok(())
    }
}
