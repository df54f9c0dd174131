//! `shaders/iao.wgsl`: micronet's IAO fake quantizer (spec §1) on the GPU. An [`IaoQuantizer`]
//! records its observer update, forward and backward into a step; its state (per row: observer
//! range, scale, zero point; then whether anything was observed) is a tensor the caller keeps
//! (a network keeps them in its running-statistics arena, so that they are saved, restored and
//! snapshotted with the BatchNorm statistics).

use super::{Entry, IAO, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use crate::quant::iao::{Observer, Operand, Percentile, QType, Spec};

/// Elements of one row each workgroup of the extremes pass covers (`CHUNK` in the shader).
pub const CHUNK: usize = 4096;

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
    k: u32,
    _pad: [u32; 2],
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
const FORWARD_IN_PLACE: Entry = entry("iao_forward_in_place", &[(5, R), (6, W)]);
const UNION: Entry = entry("iao_union", &[(4, W), (9, R)]);
const ADD_FORWARD: Entry = entry("iao_add_forward", &[(1, R), (5, R), (6, W), (11, R)]);
const HIST_CLEAR: Entry = entry("iao_hist_clear", &[(12, W)]);
const HIST_HI: Entry = entry("iao_hist_hi", &[(1, R), (12, W)]);
const SELECT_HI: Entry = entry("iao_select_hi", &[(12, W), (13, W)]);
const HIST_LO: Entry = entry("iao_hist_lo", &[(1, R), (12, W), (13, W)]);
const SELECT_LO: Entry = entry("iao_select_lo", &[(4, W), (12, W), (13, W)]);
/// Bins of the histogram observer's radix select (`BINS` in the shader).
const BINS: usize = 65536;
const BACKWARD: Entry = entry("iao_backward", &[(1, R), (5, R), (7, R), (8, W)]);
const BACKWARD_IN_PLACE: Entry = entry("iao_backward_in_place", &[(1, R), (5, R), (8, W)]);
const BACKWARD_REQUANTIZE: Entry = entry("iao_backward_requantize", &[(5, R), (6, W), (8, W)]);
const BACKWARD_QUANTIZE: Entry = entry("iao_backward_quantize", &[(1, R), (5, R), (6, W), (8, W)]);

/// Where the second of QuantAdd's copied observer states starts: 256 bytes, the alignment of
/// a view's offset.
const PAIR_STRIDE: usize = 64;

/// Words of state per row: min, max, scale, zero point.
pub const ROW_WORDS: usize = 4;

/// One IAO quantizer: of a weight (per output channel or per tensor) or of activations (per
/// tensor, any batch up to the shape it was made for).
pub struct IaoQuantizer {
    pub spec: Spec,
    /// The full shape it quantizes (activations: at the largest batch).
    shape: Vec<usize>,
    rows: usize,
    partials: Tensor,
    /// A per-tensor activation quantizer's copies of two observers' states (QuantAdd's union).
    pair: Option<Tensor>,
    /// The histogram observer's counts and selection state.
    histogram: Option<(Tensor, Tensor)>,
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
        let pair = (rows == 1 && spec.operand == Operand::Activation)
            .then(|| {
                gpu.zeros(
                    &format!("{name} observed ranges"),
                    &[2 * PAIR_STRIDE],
                    DType::F32,
                )
            })
            .transpose()?;
        let histogram = match spec.histogram {
            Some(_) if rows > 1 => {
                return Err(Error::Invalid(format!(
                    "{name}: the histogram observer is per tensor"
                )));
            }
            Some(_) => Some((
                gpu.zeros(&format!("{name} |x| histogram"), &[BINS], DType::U32)?,
                gpu.zeros(&format!("{name} selection"), &[2], DType::U32)?,
            )),
            None => None,
        };
        Ok(IaoQuantizer {
            pair,
            histogram,
            spec,
            shape: shape.to_vec(),
            rows,
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

    /// Elements of the state: rows × [min, max, scale, zp], then `observed`.
    pub fn state_len(&self) -> usize {
        self.rows * ROW_WORDS + 1
    }

    /// A fresh quantizer's state, as micronet makes one: range 0, scale 1, zero point 0, nothing
    /// observed.
    pub fn initial_state(&self) -> Vec<f32> {
        let mut s = vec![0.0f32; self.state_len()];
        for r in 0..self.rows {
            s[r * ROW_WORDS + 2] = 1.0;
        }
        s
    }

    fn check_state(&self, kernel: &str, state: &Tensor) -> Result<()> {
        expect_dtype(kernel, "state", state, DType::F32)?;
        expect_shape(kernel, "state", state, &[self.state_len()])
    }

    /// Elements of `x` and the rows they span; `x` must be the quantizer's shape, or (per-tensor
    /// quantizers) any shape with the same trailing dimensions and a batch no larger.
    fn extent(&self, kernel: &str, state: &Tensor, x: &Tensor) -> Result<(u32, u32)> {
        self.check_state(kernel, state)?;
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
            k: 0,
            _pad: [0; 2],
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
    pub fn observe(&self, gpu: &Gpu, state: &Tensor, x: &Tensor) -> Result<Vec<Op>> {
        let (n, row_len) = self.extent("iao_observe", state, x)?;
        if let (Some(pct), Some((hist, sel))) = (self.spec.histogram, &self.histogram) {
            return self.observe_histogram(gpu, state, x, pct, hist, sel, n);
        }
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
                &[&self.partials, state],
                [1, 1, 1],
            )?,
        ])
    }

    /// Where the layer that produces this quantizer's input may write the input's extremes in
    /// place of [`Self::observe`]'s own pass (`norm::apply_extremes`; then
    /// [`Self::observe_produced`]): a per-tensor quantizer whose observer takes extremes (not
    /// the histogram).
    pub fn produced_extremes(&self) -> Option<&Tensor> {
        (self.rows == 1 && self.histogram.is_none()).then_some(&self.partials)
    }

    /// [`Self::observe`] from the extremes of `x` its producer wrote into
    /// [`Self::produced_extremes`]: the update rule and the scale only.
    pub fn observe_produced(&self, gpu: &Gpu, state: &Tensor, x: &Tensor) -> Result<Op> {
        const K: &str = "iao_observe";
        let (n, row_len) = self.extent(K, state, x)?;
        let Some(partials) = self.produced_extremes() else {
            return Err(Error::shape(
                K,
                "only a per-tensor extremes observer takes its producer's extremes",
            ));
        };
        OBSERVE.launch(
            gpu,
            &[],
            format!("{} (extremes by its producer)", self.label(K, x)),
            &self.params(n, row_len),
            &[partials, state],
            [1, 1, 1],
        )
    }

    /// Scale and zero point from the range in the state (after the range was loaded or merged).
    pub fn update_qparams(&self, gpu: &Gpu, state: &Tensor) -> Result<Op> {
        self.check_state("iao_qparams", state)?;
        let p = self.params(0, 0);
        QPARAMS.launch(
            gpu,
            &[],
            format!("iao_qparams {}{}", self.q_letter(), self.spec.bits),
            &p,
            &[state],
            [1, 1, 1],
        )
    }

    /// `y = (clamp(R(x/s − zp), qmin, qmax) + zp)·s` with the current scale and zero point.
    pub fn forward(&self, gpu: &Gpu, state: &Tensor, x: &Tensor, y: &Tensor) -> Result<Op> {
        self.elementwise(gpu, &FORWARD, (state, x), &[("y", y)], &[x, state, y])
    }

    /// [`Self::forward`] over `x` itself.
    pub fn forward_in_place(&self, gpu: &Gpu, state: &Tensor, x: &Tensor) -> Result<Op> {
        self.elementwise(gpu, &FORWARD_IN_PLACE, (state, x), &[], &[state, x])
    }

    /// `dx = fl32(fl32(dy·s)/s)` where the clamp and the clip-STE let it pass, else 0.
    pub fn backward(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        x: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<Op> {
        let like_x = [("dy", dy), ("dx", dx)];
        self.elementwise(gpu, &BACKWARD, (state, x), &like_x, &[x, state, dy, dx])
    }

    /// [`Self::backward`] in place: `d` holds dL/dy and becomes dL/dx.
    pub fn backward_in_place(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        x: &Tensor,
        d: &Tensor,
    ) -> Result<Op> {
        let entry = &BACKWARD_IN_PLACE;
        self.elementwise(gpu, entry, (state, x), &[("d", d)], &[x, state, d])
    }

    /// [`Self::backward_in_place`], then `x` quantized where it lies ([`Self::forward_in_place`]),
    /// in one pass: the same bits as the two.
    pub fn backward_requantize(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        x: &Tensor,
        d: &Tensor,
    ) -> Result<Op> {
        let entry = &BACKWARD_REQUANTIZE;
        self.elementwise(gpu, entry, (state, x), &[("d", d)], &[state, x, d])
    }

    /// [`Self::backward_in_place`], then `x` quantized into `y` ([`Self::forward`]), in one
    /// pass: the same bits as the two.
    pub fn backward_quantize(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        x: &Tensor,
        d: &Tensor,
        y: &Tensor,
    ) -> Result<Op> {
        let like_x = [("d", d), ("y", y)];
        self.elementwise(
            gpu,
            &BACKWARD_QUANTIZE,
            (state, x),
            &like_x,
            &[x, state, y, d],
        )
    }

    /// One of the elementwise kernels over `x` (one invocation per element): the state and
    /// `x` checked against this quantizer, the `like_x` tensors against `x`, then `bound`
    /// bound in the entry's binding order.
    fn elementwise(
        &self,
        gpu: &Gpu,
        entry: &Entry,
        (state, x): (&Tensor, &Tensor),
        like_x: &[(&str, &Tensor)],
        bound: &[&Tensor],
    ) -> Result<Op> {
        let k = entry.name;
        let (n, row_len) = self.extent(k, state, x)?;
        for (name, t) in like_x {
            expect_dtype(k, name, t, DType::F32)?;
            expect_shape(k, name, t, x.shape())?;
        }
        entry.launch(
            gpu,
            &[],
            self.label(k, x),
            &self.params(n, row_len),
            bound,
            elementwise_grid(gpu, n),
        )
    }

    /// QuantAdd: this per-tensor activation quantizer's range becomes the union of two
    /// observers' ranges (`a` and `b`: states of per-tensor quantizers that observed the
    /// summands; copied first, since they share the running arena with `state`).
    pub fn union(&self, gpu: &Gpu, state: &Tensor, a: &Tensor, b: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "iao_union";
        for (name, t) in [("state", state), ("a", a), ("b", b)] {
            expect_dtype(K, name, t, DType::F32)?;
            expect_shape(K, name, t, &[ROW_WORDS + 1])?;
        }
        let Some(pair) = &self.pair else {
            return Err(Error::shape(
                K,
                "only a per-tensor activation quantizer takes a union",
            ));
        };
        let words = ROW_WORDS + 1;
        Ok(vec![
            Op::Copy {
                src: a.clone(),
                dst: pair.view(0, &[words])?,
            },
            Op::Copy {
                src: b.clone(),
                dst: pair.view(PAIR_STRIDE, &[words])?,
            },
            UNION.launch(
                gpu,
                &[],
                format!("{K} a{}", self.spec.bits),
                &self.params(0, 0),
                &[state, pair],
                [1, 1, 1],
            )?,
        ])
    }

    /// QuantAdd's sum `y = Q(a) + Q(b)`, one scale for both (a per-tensor quantizer).
    pub fn add_forward(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Op> {
        const K: &str = "iao_add_forward";
        let (n, row_len) = self.extent(K, state, a)?;
        for (name, t) in [("b", b), ("y", y)] {
            expect_dtype(K, name, t, DType::F32)?;
            expect_shape(K, name, t, a.shape())?;
        }
        ADD_FORWARD.launch(
            gpu,
            &[],
            self.label(K, a),
            &self.params(n, row_len),
            &[a, state, y, b],
            elementwise_grid(gpu, n),
        )
    }

    /// PTQ's observer: the k-th smallest |x| (two radix passes over the float's bit pattern:
    /// the high 16 bits, then the low 16 among values with those), then the range update and
    /// scale.
    #[allow(clippy::too_many_arguments)]
    fn observe_histogram(
        &self,
        gpu: &Gpu,
        state: &Tensor,
        x: &Tensor,
        pct: Percentile,
        hist: &Tensor,
        sel: &Tensor,
        n: u32,
    ) -> Result<Vec<Op>> {
        const K: &str = "iao_observe histogram";
        let k = pct.k(n as usize).ok_or_else(|| {
            Error::shape(
                K,
                format!(
                    "percentile {} of {n} values selects none (k = int(percentile * n) = 0): use a larger batch or percentile",
                    pct.0
                ),
            )
        })?;
        let p = Params {
            k: k as u32,
            ..self.params(n, n)
        };
        let clear = || {
            HIST_CLEAR.launch(
                gpu,
                &[],
                self.label("iao_hist_clear", x),
                &p,
                &[hist],
                elementwise_grid(gpu, BINS as u32),
            )
        };
        Ok(vec![
            clear()?,
            HIST_HI.launch(
                gpu,
                &[],
                self.label("iao_hist_hi", x),
                &p,
                &[x, hist],
                elementwise_grid(gpu, n),
            )?,
            SELECT_HI.launch(
                gpu,
                &[],
                self.label("iao_select_hi", x),
                &p,
                &[hist, sel],
                [1, 1, 1],
            )?,
            clear()?,
            HIST_LO.launch(
                gpu,
                &[],
                self.label("iao_hist_lo", x),
                &p,
                &[x, hist, sel],
                elementwise_grid(gpu, n),
            )?,
            SELECT_LO.launch(
                gpu,
                &[],
                self.label("iao_select_lo", x),
                &p,
                &[state, hist, sel],
                [1, 1, 1],
            )?,
        ])
    }
}
