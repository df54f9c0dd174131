//! `shaders/bnfold.wgsl`: IAO's BatchNorm folded into the preceding conv during QAT (micronet's
//! `QuantBNFuseConv2d`, spec iao §3): batch statistics of the float conv's output and the
//! running update, the folded weight and bias, and the backward pieces through them.

use super::{BNFOLD, Entry, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    channels: u32,
    hw: u32,
    per_channel: u32,
    eps: f32,
    momentum: f32,
    pretrained: u32,
    has_bias: u32,
    accumulate: u32,
    opaque_zero: u32,
    count: u32,
    calib: u32,
}

use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &BNFOLD,
        name,
        used,
    }
}

const STATS: Entry = entry(
    "fold_stats",
    &[
        (1, R),
        (2, W),
        (3, W),
        (4, W),
        (5, W),
        (6, R),
        (7, R),
        (8, R),
        (9, W),
        (10, W),
        (25, W),
        (26, W),
    ],
);
const CALIB_OUT: Entry = entry("fold_calib_out", &[(20, W), (27, R), (28, R)]);
const CALIB_GRAD: Entry = entry("fold_calib_grad", &[(1, R), (20, W), (27, R), (29, W)]);
const MARK: Entry = entry("fold_mark", &[(5, W)]);
const RUNNING: Entry = entry(
    "fold_running",
    &[
        (2, W),
        (6, R),
        (7, R),
        (8, R),
        (9, W),
        (10, W),
        (23, R),
        (24, R),
    ],
);
const WEIGHT: Entry = entry("fold_weight", &[(11, R), (12, W), (13, R)]);
const BACKWARD_CHANNEL: Entry = entry(
    "fold_backward_channel",
    &[
        (8, R),
        (11, R),
        (13, R),
        (14, R),
        (15, R),
        (16, R),
        (17, W),
        (18, W),
        (19, W),
        (24, R),
        (27, R),
        (30, R),
    ],
);
const DY0: Entry = entry("fold_dy0", &[(20, W), (21, R)]);
const GRAD: Entry = entry("fold_grad", &[(13, R), (14, R), (22, W)]);

/// One folded conv + BatchNorm: its shapes and BatchNorm settings, and the per-channel buffers
/// its passes share (made once).
pub struct BnFold {
    pub channels: usize,
    /// The conv weight's shape `(Cout, Cin/g, kh, kw)`.
    pub w_shape: Vec<usize>,
    pub eps: f32,
    pub momentum: f32,
    /// Update the running statistics on the first call too (micronet's `--pretrained_model`).
    pub pretrained: bool,
    /// micronet's `bn_fuse_calib`: W_f from the running variance (after this step's update),
    /// the quantized conv rescaled by rho = √(σ²_r+ε)/√(σ²+ε) to the batch's.
    pub calib: bool,
    /// Per channel [mu, var]: the batch's (training) or the running ones (evaluation, QAFT).
    pub stats: Tensor,
    /// Per channel k = gamma / sqrt(var + eps), and the folded bias b_f.
    pub k: Tensor,
    pub bias_f: Tensor,
    /// W_f = W k.
    pub w_f: Tensor,
    /// Backward: db_f (the quantized conv's bias gradient) and dy0's coefficients.
    pub db_f: Tensor,
    pub dcoef: Tensor,
    /// bn_fuse_calib: k_w, rho and d rho per channel.
    pub k_w: Tensor,
    pub rho: Tensor,
    pub drho: Tensor,
}

/// The per-channel tensors a folded layer reads: gamma, beta, the conv bias (None: no bias),
/// and the running statistics and their flag.
pub struct FoldParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub flag: &'a Tensor,
}

impl BnFold {
    pub fn new(
        gpu: &Gpu,
        name: &str,
        w_shape: &[usize],
        (eps, momentum): (f32, f32),
        pretrained: bool,
        calib: bool,
    ) -> Result<BnFold> {
        let c = w_shape[0];
        let z =
            |what: &str, shape: &[usize]| gpu.zeros(&format!("{name} {what}"), shape, DType::F32);
        Ok(BnFold {
            channels: c,
            w_shape: w_shape.to_vec(),
            eps,
            momentum,
            pretrained,
            calib,
            stats: z("folded statistics", &[2 * c])?,
            k: z("fold scale", &[c])?,
            bias_f: z("folded bias", &[c])?,
            w_f: z("folded weight", w_shape)?,
            db_f: z("folded bias gradient", &[c])?,
            dcoef: z("statistics gradient", &[2 * c])?,
            k_w: z("fold scale of the weight (calib)", &[c])?,
            rho: z("output rescale (calib)", &[c])?,
            drho: z("output rescale gradient (calib)", &[c])?,
        })
    }

    fn k_per_channel(&self) -> usize {
        self.w_shape[1..].iter().product()
    }

    fn params(&self, p: &FoldParams, y0_shape: Option<&[usize]>) -> Params {
        let (hw, count) = match y0_shape {
            Some(s) => {
                let hw: usize = s[2..].iter().product();
                (hw, s[0] * hw)
            }
            None => (0, 0),
        };
        Params {
            channels: self.channels as u32,
            hw: hw as u32,
            per_channel: self.k_per_channel() as u32,
            eps: self.eps,
            momentum: self.momentum,
            pretrained: u32::from(self.pretrained),
            has_bias: u32::from(p.bias.is_some()),
            count: count as u32,
            calib: u32::from(self.calib),
            ..Params::default()
        }
    }

    /// Training: the batch statistics of `y0` (the float conv's output), the running update
    /// (the first call copies unless pretrained), k and b_f.
    pub fn stats(&self, gpu: &Gpu, p: &FoldParams, y0: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "fold_stats";
        expect_dtype(K, "y0", y0, DType::F32)?;
        let shape = y0.shape();
        if shape.len() != 4 || shape[1] != self.channels {
            return Err(crate::error::Error::shape(
                K,
                format!("y0 must be (N, {}, H, W), got {shape:?}", self.channels),
            ));
        }
        let params = self.params(p, Some(shape));
        let bias = p.bias.unwrap_or(p.gamma);
        Ok(vec![
            STATS.launch(
                gpu,
                &[],
                format!("{K} {shape:?}"),
                &params,
                &[
                    y0,
                    &self.stats,
                    p.running_mean,
                    p.running_var,
                    p.flag,
                    p.gamma,
                    p.beta,
                    bias,
                    &self.k,
                    &self.bias_f,
                    &self.k_w,
                    &self.rho,
                ],
                [self.channels as u32, 1, 1],
            )?,
            MARK.launch(
                gpu,
                &[],
                format!("fold_mark {shape:?}"),
                &params,
                &[p.flag],
                [1, 1, 1],
            )?,
        ])
    }

    /// Evaluation or QAFT: k, b_f and the statistics from the running ones.
    pub fn running(&self, gpu: &Gpu, p: &FoldParams) -> Result<Op> {
        let params = self.params(p, None);
        RUNNING.launch(
            gpu,
            &[],
            format!("fold_running [{}]", self.channels),
            &params,
            &[
                &self.stats,
                p.gamma,
                p.beta,
                p.bias.unwrap_or(p.gamma),
                &self.k,
                &self.bias_f,
                p.running_mean,
                p.running_var,
            ],
            elementwise_grid(gpu, self.channels as u32),
        )
    }

    /// The k W_f is folded with: the batch's, or (training with `calib`) the running one's.
    fn k_weight(&self, training: bool) -> &Tensor {
        if self.calib && training {
            &self.k_w
        } else {
            &self.k
        }
    }

    /// W_f = W k (`training`: this step's k, which `calib` takes from the running variance).
    pub fn weight(&self, gpu: &Gpu, p: &FoldParams, w: &Tensor, training: bool) -> Result<Op> {
        const K: &str = "fold_weight";
        expect_shape(K, "w", w, &self.w_shape)?;
        let n = count_u32(K, w.numel())?;
        WEIGHT.launch(
            gpu,
            &[],
            format!("{K} {:?}", self.w_shape),
            &Params {
                n,
                ..self.params(p, None)
            },
            &[w, &self.w_f, self.k_weight(training)],
            elementwise_grid(gpu, n),
        )
    }

    /// bn_fuse_calib's output: `y = y·rho + b_f` in place over the quantized conv's `y`.
    pub fn calib_out(&self, gpu: &Gpu, p: &FoldParams, y: &Tensor) -> Result<Op> {
        const K: &str = "fold_calib_out";
        let n = count_u32(K, y.numel())?;
        CALIB_OUT.launch(
            gpu,
            &[],
            format!("{K} {:?}", y.shape()),
            &Params {
                n,
                ..self.params(p, Some(y.shape()))
            },
            &[y, &self.rho, &self.bias_f],
            elementwise_grid(gpu, n),
        )
    }

    /// bn_fuse_calib's backward through rho: d rho = Σ dy·c (`c`, the quantized conv without
    /// bias), then `dy` scaled by rho in place.
    pub fn calib_grad(&self, gpu: &Gpu, p: &FoldParams, c: &Tensor, dy: &Tensor) -> Result<Op> {
        CALIB_GRAD.launch(
            gpu,
            &[],
            format!("fold_calib_grad {:?}", c.shape()),
            &self.params(p, Some(c.shape())),
            &[c, dy, &self.rho, &self.drho],
            [self.channels as u32, 1, 1],
        )
    }

    /// `(dgamma, dbeta)` (into the gradient arena's views) and dy0's coefficients, from dW_f
    /// and db_f.
    pub fn backward_channel(
        &self,
        gpu: &Gpu,
        p: &FoldParams,
        w: &Tensor,
        dw_f: &Tensor,
        y0_shape: &[usize],
        (dgamma, dbeta): (&Tensor, &Tensor),
    ) -> Result<Op> {
        const K: &str = "fold_backward_channel";
        expect_shape(K, "dw_f", dw_f, &self.w_shape)?;
        BACKWARD_CHANNEL.launch(
            gpu,
            &[],
            format!("{K} {:?}", self.w_shape),
            &self.params(p, Some(y0_shape)),
            &[
                p.bias.unwrap_or(p.gamma),
                w,
                &self.k,
                dw_f,
                &self.db_f,
                &self.stats,
                dgamma,
                dbeta,
                &self.dcoef,
                p.running_var,
                &self.rho,
                &self.drho,
            ],
            [self.channels as u32, 1, 1],
        )
    }

    /// dy0 = a + b·y0 over `y0` in place.
    pub fn dy0(&self, gpu: &Gpu, p: &FoldParams, y0: &Tensor) -> Result<Op> {
        const K: &str = "fold_dy0";
        let n = count_u32(K, y0.numel())?;
        DY0.launch(
            gpu,
            &[],
            format!("{K} {:?}", y0.shape()),
            &Params {
                n,
                ..self.params(p, Some(y0.shape()))
            },
            &[y0, &self.dcoef],
            grid_1d(
                n.div_ceil(256),
                gpu.limits.max_compute_workgroups_per_dimension,
            ),
        )
    }

    /// `grad (+)= g·k` per output channel: the weight's (g = dW_f, k as W_f was folded in
    /// `training`) or the bias's (g = db_f, the batch's or the running k).
    pub fn grad(
        &self,
        gpu: &Gpu,
        g: &Tensor,
        grad: &Tensor,
        (accumulate, training): (bool, bool),
    ) -> Result<Op> {
        const K: &str = "fold_grad";
        expect_shape(K, "grad", grad, g.shape())?;
        let n = count_u32(K, g.numel())?;
        GRAD.launch(
            gpu,
            &[],
            format!("{K} {:?}", g.shape()),
            &Params {
                n,
                per_channel: (g.numel() / self.channels) as u32,
                channels: self.channels as u32,
                accumulate: u32::from(accumulate),
                ..Params::default()
            },
            &[
                if g.shape() == self.w_shape.as_slice() {
                    self.k_weight(training)
                } else {
                    &self.k
                },
                g,
                grad,
            ],
            elementwise_grid(gpu, n),
        )
    }
}
