//! `shaders/elementwise.wgsl`: ReLU forward and backward, the residual sum, gradient
//! accumulation, and uniform random fills (benchmark inputs made on the device).

use super::norm::{BnForm, BnShape};
use super::{ELEMENTWISE, Entry, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
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
    relu_backward_into(gpu, y, dy, (dx, None))
}

/// [`relu_backward`] writing its dx to `dx` and to `dx2` (two tensors whose gradient it is, as
/// a residual add's summands), in one pass instead of a copy after it.
pub fn relu_backward_pair(
    gpu: &Gpu,
    y: &Tensor,
    dy: &Tensor,
    (dx, dx2): (&Tensor, &Tensor),
) -> Result<Launch> {
    relu_backward_into(gpu, y, dy, (dx, Some(dx2)))
}

fn relu_backward_into(
    gpu: &Gpu,
    y: &Tensor,
    dy: &Tensor,
    (dx, dx2): (&Tensor, Option<&Tensor>),
) -> Result<Launch> {
    let k = if dx2.is_some() {
        "relu_backward_pair"
    } else {
        "relu_backward"
    };
    let mut tensors = vec![y, dy, dx];
    tensors.extend(dx2);
    for (name, t) in ["y", "dy", "dx", "dx2"].into_iter().zip(&tensors) {
        expect_dtype(k, name, t, DType::F32)?;
        expect_shape(k, name, t, y.shape())?;
    }
    // (Two writable bindings of one range would race; whole buffers apart is the simple rule.)
    if dx2.is_some_and(|d| d.same_buffer(dx)) {
        return Err(Error::shape(k, "the two gradients must lie in two buffers"));
    }
    let n = count_u32(k, y.numel())?;
    let mut bindings = vec![
        Bind::Uniform,
        Bind::None,
        Bind::None,
        Bind::Read,
        Bind::Read,
        Bind::ReadWrite,
    ];
    if dx2.is_some() {
        bindings.extend([Bind::None; 8]);
        bindings.push(Bind::ReadWrite);
    }
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry: k,
        constants: &[],
        bindings: &bindings,
    })?;
    gpu.launch(
        &kernel,
        format!("{k} {:?}", y.shape()),
        Some(bytemuck::bytes_of(&params(n))),
        &tensors,
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
    add_forward_formed(gpu, (a, None), (b, None), y, relu)
}

/// [`add_forward_relu`], where either summand may be a BatchNorm's output that is never stored:
/// `(x, Some(form))` is that BatchNorm's input and how to form its output (bit for bit as
/// `norm::apply` writes it, `shaders/lib/bn.wgsl`), an `(N, C, ...)` tensor; a shuffled output
/// is refused.
pub fn add_forward_formed(
    gpu: &Gpu,
    (a, a_bn): (&Tensor, Option<BnForm>),
    (b, b_bn): (&Tensor, Option<BnForm>),
    y: &Tensor,
    relu: bool,
) -> Result<Launch> {
    const K: &str = "add_forward";
    for (name, t) in [("a", a), ("b", b), ("y", y)] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, a.shape())?;
    }
    let n = count_u32(K, a.numel())?;
    // (Channel geometry only where a summand is formed: a flat sum takes any shape.)
    let (c, hw) = match (a_bn, b_bn) {
        (None, None) => (1, 1),
        _ => {
            let s = BnShape::of(a.shape())?;
            (s.c, s.s)
        }
    };
    let mut bindings = vec![Bind::None; 9];
    bindings[0] = Bind::Uniform;
    bindings[6] = Bind::Read;
    bindings[7] = Bind::Read;
    bindings[8] = Bind::ReadWrite;
    let mut tensors = vec![a, b, y];
    for form in [&a_bn, &b_bn].into_iter().flatten() {
        form.check(K, c)?;
        if form.shuffle != 1 {
            return Err(Error::shape(
                K,
                "a summand formed from a BatchNorm cannot take its channel shuffle here: store the shuffled output instead",
            ));
        }
    }
    // The entry with the tables binds both (a summand not formed binds the other's).
    let entry = match (a_bn, b_bn) {
        (None, None) => K,
        (Some(f), _) | (_, Some(f)) => {
            bindings.extend([Bind::None, Bind::None, Bind::None, Bind::Read, Bind::Read]);
            tensors.push(a_bn.unwrap_or(f).table);
            tensors.push(b_bn.unwrap_or(f).table);
            "add_forward_bn"
        }
    };
    let flag = |v: bool| f64::from(u8::from(v));
    let mut constants = vec![("ADD_RELU", flag(relu))];
    if entry != K {
        constants.extend([
            ("A_BN", flag(a_bn.is_some())),
            ("A_ACT", a_bn.map_or(0, |f| f.act.code()) as f64),
            ("B_BN", flag(b_bn.is_some())),
            ("B_ACT", b_bn.map_or(0, |f| f.act.code()) as f64),
            ("ADD_C", c as f64),
            ("ADD_HW", hw as f64),
        ]);
    }
    let kernel = gpu.kernel(&KernelSpec {
        shader: &ELEMENTWISE,
        entry,
        constants: &constants,
        bindings: &bindings,
    })?;
    let formed = match (a_bn.is_some(), b_bn.is_some()) {
        (false, false) => "",
        (true, false) => " first through bn",
        (false, true) => " second through bn",
        (true, true) => " both through bn",
    };
    gpu.launch(
        &kernel,
        format!(
            "{K}{}{formed} {:?}",
            if relu { "+relu" } else { "" },
            a.shape()
        ),
        Some(bytemuck::bytes_of(&params(n))),
        &tensors,
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
        return Err(Error::shape(
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
