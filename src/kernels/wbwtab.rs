//! `shaders/wbwtab.wgsl`: micronet's binary and ternary weight quantizers and the binary
//! activation (spec iao-wbwtab §6), forward and backward.

use super::{Entry, WBWTAB, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use crate::quant::wbwtab::Weights;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    per_channel: u32,
    cin: u32,
    spatial: u32,
    ternary: u32,
    _pad: [u32; 3],
}

use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &WBWTAB,
        name,
        used,
    }
}

const CENTRE: Entry = entry("bin_centre", &[(1, W)]);
const ALPHA: Entry = entry("wq_alpha", &[(2, W), (3, R)]);
const FORWARD: Entry = entry("wq_forward", &[(3, R), (4, R), (5, W)]);
const BACKWARD_SUM: Entry = entry("wq_backward_sum", &[(2, W), (3, R), (6, R)]);
const BACKWARD: Entry = entry("wq_backward", &[(3, R), (4, R), (6, R), (7, W)]);
const SIGN_FORWARD: Entry = entry("sign_forward", &[(8, R), (9, W)]);
const SIGN_BACKWARD: Entry = entry("sign_backward", &[(7, W), (8, R), (10, R)]);

/// A binary or ternary weight quantizer of one weight tensor `(Cout, Cin/g, kh, kw)` (or any
/// shape whose first dimension is the output channel): per channel [α, Δ, count, S].
pub struct WbwtabWeights {
    pub weights: Weights,
    shape: Vec<usize>,
    stats: Tensor,
}

impl WbwtabWeights {
    pub fn new(gpu: &Gpu, name: &str, weights: Weights, shape: &[usize]) -> Result<Self> {
        if weights == Weights::Float {
            return Err(Error::Invalid(format!(
                "{name}: float weights have no binary or ternary quantizer"
            )));
        }
        Ok(WbwtabWeights {
            weights,
            shape: shape.to_vec(),
            stats: gpu.zeros(
                &format!("{name} binary/ternary scales"),
                &[4 * shape[0]],
                DType::F32,
            )?,
        })
    }

    fn params(&self, kernel: &str) -> Result<Params> {
        let n = count_u32(kernel, self.shape.iter().product())?;
        let spatial: usize = self.shape.get(2..).map_or(1, |s| s.iter().product());
        Ok(Params {
            n,
            per_channel: n / self.shape[0] as u32,
            cin: self.shape.get(1).copied().unwrap_or(1) as u32,
            spatial: spatial as u32,
            ternary: u32::from(self.weights == Weights::Ternary),
            _pad: [0; 3],
        })
    }

    fn check(&self, kernel: &str, named: &[(&str, &Tensor)]) -> Result<()> {
        for (name, t) in named {
            expect_dtype(kernel, name, t, DType::F32)?;
            expect_shape(kernel, name, t, &self.shape)?;
        }
        Ok(())
    }

    /// Per channel [α, Δ, count, S] of the last forward and backward.
    pub fn stats(&self) -> &Tensor {
        &self.stats
    }

    /// `Ŵ` from `W`; binary weights first centre and clamp `W` itself (micronet edits the latent
    /// weights in place on every forward).
    pub fn forward(&self, gpu: &Gpu, w: &Tensor, w_hat: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "wbwtab_weight_forward";
        self.check(K, &[("w", w), ("w_hat", w_hat)])?;
        let p = self.params(K)?;
        let label = |k: &str| format!("{k} {:?} {:?}", self.weights, self.shape);
        let mut ops = Vec::new();
        if self.weights == Weights::Binary {
            let positions = p.n / p.cin;
            ops.push(CENTRE.launch(
                gpu,
                &[],
                label("bin_centre"),
                &p,
                &[w],
                elementwise_grid(gpu, positions),
            )?);
        }
        ops.push(ALPHA.launch(
            gpu,
            &[],
            label("wq_alpha"),
            &p,
            &[&self.stats, w],
            [self.shape[0] as u32, 1, 1],
        )?);
        ops.push(FORWARD.launch(
            gpu,
            &[],
            label("wq_forward"),
            &p,
            &[w, &self.stats, w_hat],
            elementwise_grid(gpu, p.n),
        )?);
        Ok(ops)
    }

    /// `dL/dW` from `g` = dL/dŴ (α's gradient included).
    pub fn backward(&self, gpu: &Gpu, w: &Tensor, g: &Tensor, dw: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "wbwtab_weight_backward";
        self.check(K, &[("w", w), ("g", g), ("dw", dw)])?;
        let p = self.params(K)?;
        let label = |k: &str| format!("{k} {:?} {:?}", self.weights, self.shape);
        Ok(vec![
            BACKWARD_SUM.launch(
                gpu,
                &[],
                label("wq_backward_sum"),
                &p,
                &[&self.stats, w, g],
                [self.shape[0] as u32, 1, 1],
            )?,
            BACKWARD.launch(
                gpu,
                &[],
                label("wq_backward"),
                &p,
                &[w, &self.stats, g, dw],
                elementwise_grid(gpu, p.n),
            )?,
        ])
    }
}

fn same_f32(kernel: &str, named: &[(&str, &Tensor)]) -> Result<u32> {
    let shape = named[0].1.shape();
    for (name, t) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    count_u32(kernel, named[0].1.numel())
}

/// The binary activation `y = B(x)` (sign with 0 → +1).
pub fn sign_forward(gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Op> {
    const K: &str = "sign_forward";
    let n = same_f32(K, &[("x", x), ("y", y)])?;
    let p = Params {
        n,
        ..Params::default()
    };
    SIGN_FORWARD.launch(
        gpu,
        &[],
        format!("{K} {:?}", x.shape()),
        &p,
        &[x, y],
        elementwise_grid(gpu, n),
    )
}

/// Its gradient: `dx = dy` where −1 < x < 1, else 0.
pub fn sign_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<Op> {
    const K: &str = "sign_backward";
    let n = same_f32(K, &[("x", x), ("dy", dy), ("dx", dx)])?;
    let p = Params {
        n,
        ..Params::default()
    };
    SIGN_BACKWARD.launch(
        gpu,
        &[],
        format!("{K} {:?}", x.shape()),
        &p,
        &[dx, x, dy],
        elementwise_grid(gpu, n),
    )
}
