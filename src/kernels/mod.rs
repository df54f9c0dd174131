//! Typed launch functions, one module per shader file. Each checks shapes and element types
//! before anything reaches the GPU, then returns a [`Launch`](crate::gpu::Launch) to record.

pub mod bnfold;
pub mod conv2d;
pub mod conv_coop;
pub mod conv_transpose2d;
pub mod elementwise;
pub mod iao;
pub mod loss;
pub mod matmul;
pub mod maxpool;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod quant;
pub mod reduce;
pub mod wbwtab;

use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Op, Shader, Tensor, grid_1d};

macro_rules! shader {
    ($file:literal, $trusted:literal) => {
        Shader {
            name: $file,
            source: include_str!(concat!("../../shaders/", $file)),
            trusted: $trusted,
        }
    };
    // With helper files from `shaders/lib/` prepended (WGSL has no includes).
    ($file:literal, $trusted:literal, $($lib:literal),+) => {
        Shader {
            name: $file,
            source: concat!(
                $(include_str!(concat!("../../shaders/lib/", $lib)),)+
                include_str!(concat!("../../shaders/", $file))
            ),
            trusted: $trusted,
        }
    };
}

pub static ELEMENTWISE: Shader = shader!("elementwise.wgsl", true, "bn.wgsl");
pub static REDUCE: Shader = shader!("reduce.wgsl", true);
pub static QUANT: Shader = shader!("quant.wgsl", true, "division.wgsl", "act.wgsl");
pub static IAO: Shader = shader!("iao.wgsl", true, "division.wgsl", "iao_q.wgsl");
pub static BNFOLD: Shader = shader!("bnfold.wgsl", true);
pub static WBWTAB: Shader = shader!("wbwtab.wgsl", true, "bn.wgsl");
// The kernel, then its tile staging (after it: naga 30 fails on a function that uses an
// override declared further down).
pub static CONV2D: Shader = Shader {
    name: "conv2d.wgsl",
    source: concat!(
        include_str!("../../shaders/lib/act.wgsl"),
        include_str!("../../shaders/lib/bn.wgsl"),
        include_str!("../../shaders/conv2d.wgsl"),
        include_str!("../../shaders/lib/conv2d_loads.wgsl"),
    ),
    trusted: true,
};
pub static NORM: Shader = shader!(
    "norm.wgsl",
    true,
    "act.wgsl",
    "bn.wgsl",
    "division.wgsl",
    "iao_q.wgsl"
);
pub static POOL: Shader = shader!("pool.wgsl", true, "window.wgsl");
pub static MAXPOOL: Shader = shader!("maxpool.wgsl", true, "act.wgsl", "bn.wgsl", "window.wgsl");
// Checked: it indexes logits by labels, which come from the data.
pub static LOSS: Shader = shader!("loss.wgsl", false);
pub static OPTIM: Shader = shader!("optim.wgsl", true);
pub static INTINFER: Shader = shader!("intinfer.wgsl", true, "division.wgsl");

// Cooperative matrices: Vulkan only (wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX), used where the
// adapter has them; `conv_coop::emulated_shader` gives their portable emulations.
// (Its helpers follow it: its `enable` directives must come first.)
pub static CONV_COOP: Shader = Shader {
    name: "conv_coop.wgsl",
    source: concat!(
        include_str!("../../shaders/conv_coop.wgsl"),
        include_str!("../../shaders/lib/coop_conv.wgsl"),
        include_str!("../../shaders/lib/act.wgsl"),
        include_str!("../../shaders/lib/bn.wgsl"),
    ),
    trusted: true,
};

pub static CONV_COOP_GW: Shader = Shader {
    name: "conv_coop_gw.wgsl",
    source: concat!(
        include_str!("../../shaders/conv_coop_gw.wgsl"),
        include_str!("../../shaders/lib/coop_conv.wgsl"),
        include_str!("../../shaders/lib/coop_backward.wgsl"),
        include_str!("../../shaders/lib/act.wgsl"),
        include_str!("../../shaders/lib/bn.wgsl"),
    ),
    trusted: true,
};

pub static CONV_COOP_GI: Shader = Shader {
    name: "conv_coop_gi.wgsl",
    source: concat!(
        include_str!("../../shaders/conv_coop_gi.wgsl"),
        include_str!("../../shaders/lib/coop_conv.wgsl"),
        include_str!("../../shaders/lib/coop_backward.wgsl"),
        include_str!("../../shaders/lib/act.wgsl"),
        include_str!("../../shaders/lib/bn.wgsl"),
    ),
    trusted: true,
};

/// Shaders only a Vulkan adapter with cooperative matrices compiles (the portability test
/// translates them to SPIR-V, and their emulations to every backend).
pub static SHADERS_COOP: &[&Shader] = &[&CONV_COOP, &CONV_COOP_GW, &CONV_COOP_GI];

/// Every shader file, embedded in the binary (the portability test translates each one).
pub static SHADERS: &[&Shader] = &[
    &ELEMENTWISE,
    &REDUCE,
    &QUANT,
    &IAO,
    &BNFOLD,
    &WBWTAB,
    &CONV2D,
    &NORM,
    &POOL,
    &MAXPOOL,
    &LOSS,
    &OPTIM,
    &INTINFER,
];

/// Fails unless `t` has element type `dtype`.
pub(crate) fn expect_dtype(kernel: &str, name: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::shape(
            kernel,
            format!("{name} must be {dtype:?}, got {:?}", t.dtype()),
        ));
    }
    Ok(())
}

/// Fails unless `t` has exactly `shape`.
pub(crate) fn expect_shape(kernel: &str, name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(
            kernel,
            format!("{name} must have shape {shape:?}, got {:?}", t.shape()),
        ));
    }
    Ok(())
}

/// An element count as the `u32` shaders index with.
pub(crate) fn count_u32(kernel: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::shape(
            kernel,
            format!(
                "{n} elements is more than a shader can index (2^32 - 1): use a smaller batch size"
            ),
        )
    })
}

/// The grid for one thread per element with 256-thread workgroups.
pub(crate) fn elementwise_grid(gpu: &Gpu, n: u32) -> [u32; 3] {
    grid_1d(
        n.div_ceil(256),
        gpu.limits.max_compute_workgroups_per_dimension,
    )
}

/// An entry point of a shader and the binding numbers it uses besides the parameter uniform at 0,
/// in the order its tensors are passed (ascending binding numbers: tensors bind in that order).
pub(crate) struct Entry {
    pub shader: &'static Shader,
    pub name: &'static str,
    pub used: &'static [(usize, Bind)],
}

impl Entry {
    /// Binding layout: the uniform at 0, then the used binding numbers.
    fn layout(&self) -> Vec<Bind> {
        let len = self.used.iter().map(|(i, _)| i + 1).max().unwrap_or(1);
        let mut v = vec![Bind::None; len];
        v[0] = Bind::Uniform;
        for &(i, b) in self.used {
            v[i] = b;
        }
        v
    }

    /// Compiles (once) and binds this entry point with `params` and `tensors`.
    pub fn launch<P: bytemuck::Pod>(
        &self,
        gpu: &Gpu,
        constants: &[(&str, f64)],
        label: String,
        params: &P,
        tensors: &[&Tensor],
        workgroups: [u32; 3],
    ) -> Result<Op> {
        let kernel = gpu.kernel(&KernelSpec {
            shader: self.shader,
            entry: self.name,
            constants,
            bindings: &self.layout(),
        })?;
        Ok(Op::Dispatch(gpu.launch(
            &kernel,
            label,
            Some(bytemuck::bytes_of(params)),
            tensors,
            workgroups,
        )?))
    }
}
