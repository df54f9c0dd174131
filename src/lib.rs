//! wgqat: quantization-aware training of neural networks on any GPU through wgpu.
//!
//! Layout: [`gpu`] owns the device, buffers, pipelines and step recording; [`kernels`] launches
//! the WGSL shaders in `shaders/`; [`reference`](mod@reference) holds the CPU oracle of every kernel.

pub mod bench;
pub mod capi;
pub mod data;
pub mod error;
pub mod fault;
pub mod gpu;
pub mod infer;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod selftest;
pub mod train;
pub mod tune;
pub mod util;

pub use error::{Error, Result};
pub use gpu::{DType, Gpu, GpuOptions, Tensor};
