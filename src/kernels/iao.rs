//! `shaders/iao.wgsl`: micronet's IAO fake quantizer (spec §1) on the GPU. A [`IaoQuantizer`]
//! owns its state (per row: observer range, scale, zero point; and whether anything was observed)
//! and records its observer update, forward and backward into a step.

use super::{Entry, IAO, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use crate::quant::iao::{Observer, Operand, QType, Spec};

/// Elements of one row each workgroup of the extremes pass covers (`CHUNK` in the shader).
const CHUNK: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    rows: u32,
    row_len: u32,
    blocks: u32,
    qmin: f32,
    qmax: f32,
    asymmetric: u32,
    moving_average: u32,
    opaque_zero: u32,
    _pad: [u32; 3],
}

use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &IAO,
        name,
        used,
    }
}

const EXTREMES_PARTIAL: Entry = entry("iao_extremes_partial", &[(1, R), (2, W)]);
const OBSERVE: Entry = entry("iao_observe", &[(3, R), (4, W)]);
const QPARAMS: Entry = entry("iao_qparams", &[(4, W)]);
const FORWARD: Entry = entry("iao_forward", &[(1, R), (5, R), (6, W)]);
const BACKWARD: Entry = entry("iao_backward", &[(1, R), (5, R), (7, R), (8, W)]);
const BACKWARD_IN_PLACE: Entry = entry("iao_backward_in_place", &[(1, R), (5, R), (8, W)]);

/// Words of state per row: min, max, scale, zero point.
pub const ROW_WORDS: usize = 4;

/// One IAO quantizer: of a weight (per output channel or per tensor) or of activations (per
/// tensor, any batch up to the shape it was made for).
pub struct IaoQuantizer {
    pub spec: Spec,
    /// The full shape it quantizes (activations: at the largest batch).
    shape: Vec<usize>,
    rows: usize,
    /// rows × [min, max, scale, zp], then `observed` (0 or 1).
    state: Tensor,
    partials: Tensor,
}

impl IaoQuantizer {
    /// A fresh quantizer as micronet makes one: range 0, scale 1, zero point 0, nothing observed.
    /// `per_channel`: one range per element of the first dimension.
    pub fn new(gpu: &Gpu, name: &str, spec: Spec, shape: &[usize]) -> Result<Self> {
        if spec.bits.is_float() {
            return Err(Error::Invalid(format!(
                "{name}: an IAO quantizer needs 2 to 16 bits (32 bits is no quantizer)"
            )));
        }
        let n: usize = shape.iter().product();
        let rows = if spec.per_channel { shape[0] } else { 1 };
        let blocks = (n / rows).div_ceil(CHUNK).max(1);
        let mut init = vec![0.0f32; rows * ROW_WORDS + 1];
        for r in 0..rows {
            init[r * ROW_WORDS + 2] = 1.0;
        }
        Ok(IaoQuantizer {
            spec,
            shape: shape.to_vec(),
            rows,
            state: gpu.upload_f32(&format!("{name} IAO state"), &[init.len()], &init)?,
            partials: gpu.zeros(
                &format!("{name} IAO extremes"),
                &[rows * blocks * 2],
                DType::F32,
            )?,
        })
    }

    /// The integer code range.
    pub fn code_range(&self) -> (f32, f32) {
        self.spec.code_range()
    }

    /// Ranges (one per output channel, or one).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The state tensor: rows × [min, max, scale, zp], then `observed`.
    pub fn state(&self) -> &Tensor {
        &self.state
    }

    /// Elements of `x` and the rows they span; `x` must be the quantizer's shape, or (per-tensor
    /// quantizers) any shape with the same trailing dimensions and a batch no larger.
    fn extent(&self, kernel: &str, x: &Tensor) -> Result<(u32, u32)> {
        expect_dtype(kernel, "x", x, DType::F32)?;
        let fits = if self.rows == 1 {
            x.shape().len() == self.shape.len()
                && x.shape()[1..] == self.shape[1..]
                && x.shape()[0] <= self.shape[0]
        } else {
            x.shape() == self.shape.as_slice()
        };
        if !fits {
            return Err(Error::shape(
                kernel,
                format!(
                    "x has shape {:?}, the quantizer was made for {:?}",
                    x.shape(),
                    self.shape
                ),
            ));
        }
        let n = count_u32(kernel, x.numel())?;
        Ok((n, n / self.rows as u32))
    }

    fn params(&self, n: u32, row_len: u32) -> Params {
        let (qmin, qmax) = self.code_range();
        Params {
            n,
            rows: self.rows as u32,
            row_len,
            blocks: (row_len as usize).div_ceil(CHUNK).max(1) as u32,
            qmin,
            qmax,
            asymmetric: u32::from(self.spec.q_type == QType::Asymmetric),
            moving_average: u32::from(self.spec.observer == Observer::MovingAverage),
            opaque_zero: 0,
            _pad: [0; 3],
        }
    }

    fn label(&self, kernel: &str, x: &Tensor) -> String {
        format!(
            "{kernel} {}{} {:?}",
            self.q_letter(),
            self.spec.bits,
            x.shape()
        )
    }

    fn q_letter(&self) -> &'static str {
        match (self.spec.operand, self.rows > 1) {
            (Operand::Weight, true) => "wc",
            (Operand::Weight, false) => "w",
            (Operand::Activation, _) => "a",
        }
    }

    /// The observer takes `x` (extremes per row, then the update rule, the first call copying),
    /// and scale and zero point follow: micronet's training-mode call before quantizing.
    pub fn observe(&self, gpu: &Gpu, x: &Tensor) -> Result<Vec<Op>> {
        let (n, row_len) = self.extent("iao_observe", x)?;
        let p = self.params(n, row_len);
        let groups = self.rows as u32 * p.blocks;
        Ok(vec![
            EXTREMES_PARTIAL.launch(
                gpu,
                &[],
                self.label("iao_extremes_partial", x),
                &p,
                &[x, &self.partials],
                grid_1d(groups, gpu.limits.max_compute_workgroups_per_dimension),
            )?,
            OBSERVE.launch(
                gpu,
                &[],
                self.label("iao_observe", x),
                &p,
                &[&self.partials, &self.state],
                [1, 1, 1],
            )?,
        ])
    }

    /// Scale and zero point from the range in the state (after the range was loaded or merged).
    pub fn update_qparams(&self, gpu: &Gpu) -> Result<Op> {
        let p = self.params(0, 0);
        QPARAMS.launch(
            gpu,
            &[],
            format!("iao_qparams {}{}", self.q_letter(), self.spec.bits),
            &p,
            &[&self.state],
            [1, 1, 1],
        )
    }

    /// `y = (clamp(R(x/s − zp), qmin, qmax) + zp)·s` with the current scale and zero point.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Op> {
        const K: &str = "iao_forward";
        let (n, row_len) = self.extent(K, x)?;
        expect_dtype(K, "y", y, DType::F32)?;
        expect_shape(K, "y", y, x.shape())?;
        FORWARD.launch(
            gpu,
            &[],
            self.label(K, x),
            &self.params(n, row_len),
            &[x, &self.state, y],
            elementwise_grid(gpu, n),
        )
    }

    /// `dx = fl32(fl32(dy·s)/s)` where the clamp and the clip-STE let it pass, else 0.
    pub fn backward(&self, gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<Op> {
        const K: &str = "iao_backward";
        let (n, row_len) = self.extent(K, x)?;
        for (name, t) in [("dy", dy), ("dx", dx)] {
            expect_dtype(K, name, t, DType::F32)?;
            expect_shape(K, name, t, x.shape())?;
        }
        BACKWARD.launch(
            gpu,
            &[],
            self.label(K, x),
            &self.params(n, row_len),
            &[x, &self.state, dy, dx],
            elementwise_grid(gpu, n),
        )
    }

    /// [`Self::backward`] in place: `d` holds dL/dy and becomes dL/dx.
    pub fn backward_in_place(&self, gpu: &Gpu, x: &Tensor, d: &Tensor) -> Result<Op> {
        const K: &str = "iao_backward_in_place";
        let (n, row_len) = self.extent(K, x)?;
        expect_dtype(K, "d", d, DType::F32)?;
        expect_shape(K, "d", d, x.shape())?;
        BACKWARD_IN_PLACE.launch(
            gpu,
            &[],
            self.label(K, x),
            &self.params(n, row_len),
            &[x, &self.state, d],
            elementwise_grid(gpu, n),
        )
    }
}
