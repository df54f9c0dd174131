//! `shaders/reduce.wgsl`: deterministic per-channel sums (bias gradients, BN statistics).

use super::{REDUCE, count_u32, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Tensor, grid_1d};

/// `out[c] = Σ_{n,s} x[n, c, s]` for `x` of shape `(N, C, ...)` (everything after C is S).
pub fn channel_sum(gpu: &Gpu, x: &Tensor, out: &Tensor) -> Result<Launch> {
    const K: &str = "channel_sum";
    expect_dtype(K, "x", x, DType::F32)?;
    expect_dtype(K, "out", out, DType::F32)?;
    let shape = x.shape();
    if shape.len() < 2 {
        return Err(Error::shape(
            K,
            format!("x must be (N, C, ...), got {shape:?}"),
        ));
    }
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    expect_shape(K, "out", out, &[c])?;
    count_u32(K, x.numel())?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &REDUCE,
        entry: K,
        constants: &[],
        bindings: &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
    })?;
    let params = [n as u32, c as u32, s as u32, 0];
    gpu.launch(
        &kernel,
        format!("{K} {shape:?}"),
        Some(bytemuck::bytes_of(&params)),
        &[x, out],
        grid_1d(c as u32, gpu.limits.max_compute_workgroups_per_dimension),
    )
}

/// The elements of one workgroup of the split-K sums (reduce.wgsl's SLICE_COLS: four
/// invocations per element, each adding a run of consecutive slices in order).
const SLICE_COLS: u32 = 64;

fn slice_grid(gpu: &Gpu, elements: u32) -> [u32; 3] {
    grid_1d(
        elements.div_ceil(SLICE_COLS),
        gpu.limits.max_compute_workgroups_per_dimension,
    )
}

/// `out[i] = Σ_j slices[j, i]` for `slices` of shape `(S, out.len)`: four runs of consecutive
/// `j`, each summed in order, then added in a fixed order.
pub fn slice_sum(gpu: &Gpu, slices: &Tensor, out: &Tensor) -> Result<Launch> {
    const K: &str = "slice_sum";
    expect_dtype(K, "slices", slices, DType::F32)?;
    expect_dtype(K, "out", out, DType::F32)?;
    let len = out.numel();
    if len == 0 || !slices.numel().is_multiple_of(len) {
        return Err(Error::shape(
            K,
            format!(
                "slices {:?} are not whole copies of out {:?}",
                slices.shape(),
                out.shape()
            ),
        ));
    }
    let n = count_u32(K, slices.numel())?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &REDUCE,
        entry: K,
        constants: &[],
        bindings: &[
            Bind::Uniform,
            Bind::None,
            Bind::None,
            Bind::Read,
            Bind::ReadWrite,
        ],
    })?;
    let params = [len as u32, n / len as u32, 0, 0];
    gpu.launch(
        &kernel,
        format!("{K} {:?}", slices.shape()),
        Some(bytemuck::bytes_of(&params)),
        &[slices, out],
        slice_grid(gpu, len as u32),
    )
}

/// [`slice_sum`] of two sets in one launch: `out[i] = Σ_j slices[j, i]` and
/// `out2[i] = Σ_j slices2[j, i]`, both with the same number of slices.
pub fn slice_sum_pair(
    gpu: &Gpu,
    (slices, out): (&Tensor, &Tensor),
    (slices2, out2): (&Tensor, &Tensor),
) -> Result<Launch> {
    const K: &str = "slice_sum_pair";
    for (name, t) in [
        ("slices", slices),
        ("out", out),
        ("slices2", slices2),
        ("out2", out2),
    ] {
        expect_dtype(K, name, t, DType::F32)?;
    }
    let (len, len2) = (out.numel(), out2.numel());
    let count = slices.numel() / len.max(1);
    if len == 0 || len2 == 0 || slices.numel() != count * len || slices2.numel() != count * len2 {
        return Err(Error::shape(
            K,
            format!(
                "slices {:?} and {:?} are not the same number of whole copies of out {:?} and {:?}",
                slices.shape(),
                slices2.shape(),
                out.shape(),
                out2.shape()
            ),
        ));
    }
    count_u32(K, slices.numel())?;
    count_u32(K, slices2.numel())?;
    let total = count_u32(K, len + len2)?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &REDUCE,
        entry: K,
        constants: &[],
        bindings: &[
            Bind::Uniform,
            Bind::None,
            Bind::None,
            Bind::Read,
            Bind::ReadWrite,
            Bind::None,
            Bind::None,
            Bind::Read,
            Bind::ReadWrite,
        ],
    })?;
    let params = [len as u32, count as u32, len2 as u32, 0];
    gpu.launch(
        &kernel,
        format!("{K} {:?}", slices.shape()),
        Some(bytemuck::bytes_of(&params)),
        &[slices, out, slices2, out2],
        slice_grid(gpu, total),
    )
}

/// Sets `flags[slot]` to 1 when any element of `x` is NaN or infinite (leaves it otherwise).
pub fn nonfinite_check(gpu: &Gpu, x: &Tensor, flags: &Tensor, slot: usize) -> Result<Launch> {
    const K: &str = "nonfinite_check";
    expect_dtype(K, "x", x, DType::F32)?;
    expect_dtype(K, "flags", flags, DType::U32)?;
    if slot >= flags.numel() {
        return Err(Error::shape(
            K,
            format!("slot {slot} of {} flags", flags.numel()),
        ));
    }
    let n = count_u32(K, x.numel())?;
    let kernel = gpu.kernel(&KernelSpec {
        shader: &REDUCE,
        entry: K,
        constants: &[],
        bindings: &[
            Bind::Uniform,
            Bind::None,
            Bind::None,
            Bind::None,
            Bind::None,
            Bind::Read,
            Bind::ReadWrite,
        ],
    })?;
    let params = [n, slot as u32, 0, 0];
    gpu.launch(
        &kernel,
        format!("{K} {:?}", x.shape()),
        Some(bytemuck::bytes_of(&params)),
        &[x, flags],
        super::elementwise_grid(gpu, n.div_ceil(16)),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_slice_sums_grid_matches_their_workgroups_elements() {
        let cols = super::SLICE_COLS;
        assert!(
            super::REDUCE
                .source
                .contains("const SLICE_COLS: u32 = 256u / SLICE_RUNS;")
        );
        assert!(super::REDUCE.source.contains("const SLICE_RUNS: u32 = 4u;"));
        assert_eq!(cols, 256 / 4);
    }
}
