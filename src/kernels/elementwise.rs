//! `shaders/elementwise.wgsl`: ReLU forward and backward, the residual sum, gradient
//! accumulation, and uniform random fills (benchmark inputs made on the device).

use super::{ELEMENTWISE, Entry, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Op, Tensor};

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

/// `y = a + b` (a residual block's sum).
pub fn add_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<Launch> {
    add_forward_relu(gpu, a, b, y, false)
}

/// `y = a + b`, or with `relu` `y = relu(a + b)` (the ReLU after a residual block's sum, in the
/// same pass, bit for bit as `relu_forward` would write it).
pub fn add_forward_relu(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    y: &Tensor,
    relu: bool,
) -> Result<Launch> {
    const K: &str = "add_forward";
    for (name, t) in [("a", a), ("b", b), ("y", y)] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, a.shape())?;
    }
    let n = count_u32(K, a.numel())?;
    let mut bindings = vec![Bind::None; 9];
    bindings[0] = Bind::Uniform;
    bindings[6] = Bind::Read;
    bindings[7] = Bind::Read;
    bindings[8] = Bind::ReadWrite;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry: K,
        constants: &[("ADD_RELU", f64::from(u8::from(relu)))],
        bindings: &bindings,
    })?;
    gpu.launch(
        &kernel,
        format!("{K}{} {:?}", if relu { "+relu" } else { "" }, a.shape()),
        Some(bytemuck::bytes_of(&params(n))),
        &[a, b, y],
        elementwise_grid(gpu, n),
    )
}

/// `sum += x` (one more consumer's gradient of a tensor read by several layers).
pub fn accumulate(gpu: &Gpu, x: &Tensor, sum: &Tensor) -> Result<Launch> {
    const K: &str = "accumulate";
    for (name, t) in [("x", x), ("sum", sum)] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, x.shape())?;
    }
    let n = count_u32(K, x.numel())?;
    let mut bindings = vec![Bind::None; 11];
    bindings[0] = Bind::Uniform;
    bindings[9] = Bind::Read;
    bindings[10] = Bind::ReadWrite;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry: K,
        constants: &[],
        bindings: &bindings,
    })?;
    gpu.launch(
        &kernel,
        format!("{K} {:?}", x.shape()),
        Some(bytemuck::bytes_of(&params(n))),
        &[x, sum],
        elementwise_grid(gpu, n),
    )
}

/// `shaders/elementwise.wgsl`'s `fill_uniform` (its only tensor, y, at binding 11).
const FILL_UNIFORM: Entry = Entry {
    shader: &ELEMENTWISE,
    name: "fill_uniform",
    used: &[(11, Bind::ReadWrite)],
};

/// Fills `y` with values uniform in [`lo`, `hi`) from a hash of `seed` and each element's index
/// (`reference::elementwise::fill_uniform`): inputs made on the device, without generating them
/// on the host and uploading them (what a benchmark of large tensors would otherwise wait for).
pub fn fill_uniform(gpu: &Gpu, y: &Tensor, seed: u32, (lo, hi): (f32, f32)) -> Result<Op> {
    const K: &str = "fill_uniform";
    expect_dtype(K, "y", y, DType::F32)?;
    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
        return Err(crate::error::Error::shape(
            K,
            format!("range [{lo}, {hi}) is not a finite interval"),
        ));
    }
    let n = count_u32(K, y.numel())?;
    FILL_UNIFORM.launch(
        gpu,
        &[],
        format!("{K} {:?}", y.shape()),
        &[n, seed, lo.to_bits(), hi.to_bits()],
        &[y],
        elementwise_grid(gpu, n),
    )
}
