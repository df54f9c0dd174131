//! `shaders/elementwise.wgsl`: ReLU forward and backward.

use super::{ELEMENTWISE, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Tensor};

fn params(n: u32) -> [u32; 4] {
    [n, 0, 0, 0]
}

/// `y = max(x, 0)`.
pub fn relu_forward(gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Launch> {
    const K: &str = "relu_forward";
    expect_dtype(K, "x", x, DType::F32)?;
    expect_shape(K, "y", y, x.shape())?;
    expect_dtype(K, "y", y, DType::F32)?;
    let n = count_u32(K, x.numel())?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry: K,
        constants: &[],
        bindings: &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
    })?;
    gpu.launch(
        &kernel,
        format!("{K} {:?}", x.shape()),
        Some(bytemuck::bytes_of(&params(n))),
        &[x, y],
        elementwise_grid(gpu, n),
    )
}

/// `dx = dy · 1[y > 0]`, from the forward output `y`.
pub fn relu_backward(gpu: &Gpu, y: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<Launch> {
    const K: &str = "relu_backward";
    for (name, t) in [("y", y), ("dy", dy), ("dx", dx)] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, y.shape())?;
    }
    let n = count_u32(K, y.numel())?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry: K,
        constants: &[],
        bindings: &[
            Bind::Uniform,
            Bind::None,
            Bind::None,
            Bind::Read,
            Bind::Read,
            Bind::ReadWrite,
        ],
    })?;
    gpu.launch(
        &kernel,
        format!("{K} {:?}", y.shape()),
        Some(bytemuck::bytes_of(&params(n))),
        &[y, dy, dx],
        elementwise_grid(gpu, n),
    )
}
