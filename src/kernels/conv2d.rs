//! `shaders/conv2d.wgsl`: conv2d forward, grad-input, grad-weight (split-K) and grad-bias as
//! implicit GEMMs. `GemmConv` is the fully specified problem the shader solves;
//! conv_transpose2d and matmul map onto it too.

use super::norm::BnForm;
use super::{CONV2D, expect_dtype, expect_shape, reduce};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Op, Tensor};
use crate::quant::Bits;

/// A 2-D convolution: PyTorch's `Conv2d` arguments and the input size. Pairs are (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Conv2dGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Conv2dGeom {
    /// A square `k`×`k` convolution of a square input, stride 1, no padding, dilation 1, one group;
    /// chain [`Self::stride`], [`Self::padding`], [`Self::groups`] to change those.
    pub fn square(batch: usize, cin: usize, hw: usize, cout: usize, k: usize) -> Self {
        Conv2dGeom {
            batch,
            cin,
            h: hw,
            w: hw,
            cout,
            kernel: (k, k),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    pub fn stride(self, s: usize) -> Self {
        Conv2dGeom {
            stride: (s, s),
            ..self
        }
    }

    pub fn padding(self, p: usize) -> Self {
        Conv2dGeom {
            padding: (p, p),
            ..self
        }
    }

    pub fn groups(self, g: usize) -> Self {
        Conv2dGeom { groups: g, ..self }
    }

    /// Output size: `floor((h + 2p − d(k−1) − 1) / s) + 1` per axis (0 if the kernel does not fit).
    pub fn out_hw(&self) -> (usize, usize) {
        let axis = |n: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            if n + 2 * p < span {
                0
            } else {
                (n + 2 * p - span) / s + 1
            }
        };
        (
            axis(
                self.h,
                self.kernel.0,
                self.stride.0,
                self.padding.0,
                self.dilation.0,
            ),
            axis(
                self.w,
                self.kernel.1,
                self.stride.1,
                self.padding.1,
                self.dilation.1,
            ),
        )
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.cin, self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        let (oh, ow) = self.out_hw();
        [self.batch, self.cout, oh, ow]
    }

    /// `(Cout, Cin/groups, KH, KW)`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.cout,
            self.cin / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> u64 {
        let (oh, ow) = self.out_hw();
        [
            self.batch,
            self.cout,
            oh,
            ow,
            self.cin / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
        .iter()
        .map(|&v| v as u64)
        .product()
    }

    pub fn validate(&self) -> Result<()> {
        let what = format!(
            "conv2d of a {}x{}x{} input to {} channels (kernel {:?}, stride {:?}, padding {:?}, dilation {:?}, groups {})",
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        );
        let positive = [
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if positive.contains(&0) {
            return Err(Error::shape(
                &what,
                "sizes, kernel, stride, dilation and groups must be at least 1",
            ));
        }
        if !self.cin.is_multiple_of(self.groups) || !self.cout.is_multiple_of(self.groups) {
            return Err(Error::shape(
                &what,
                "in and out channels must be divisible by groups",
            ));
        }
        let (oh, ow) = self.out_hw();
        if oh == 0 || ow == 0 {
            return Err(Error::shape(
                &what,
                "the kernel does not fit in the padded input: use a smaller kernel, more padding or less dilation",
            ));
        }
        Ok(())
    }

    pub(crate) fn gemm(&self) -> GemmConv {
        let (oh, ow) = self.out_hw();
        GemmConv {
            batch: self.batch,
            cin: self.cin,
            h: self.h,
            w: self.w,
            cout: self.cout,
            oh,
            ow,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        )
    }
}

/// Grad-input's epilogue: the layer input's DoReFa activation quantizer, applied as each dx is
/// written (the shader's `ACT_GRAD`), instead of a pass of its own over dx and x.
#[derive(Clone, Copy, Debug)]
pub struct ActGrad<'a> {
    /// The layer's float input x: dx is masked by its straight-through rule.
    pub x: &'a Tensor,
    pub bits: Bits,
    /// Also replace x by its quantized value (what grad-weight reads next).
    pub requantize: bool,
}

/// A layer input that is a BatchNorm's output (with its ReLU and channel shuffle, and the
/// layer's DoReFa input quantizer) formed where the GEMM loads it instead of stored (the
/// shader's `IN_BN`): the GEMM is given the BatchNorm's input in the input's place. Forward and
/// grad-weight load the quantized input; grad-input's [`ActGrad`] epilogue forms the float one
/// for its mask.
#[derive(Clone, Copy, Debug)]
pub struct InputBn<'a> {
    pub form: BnForm<'a>,
    /// The layer's input quantizer.
    pub bits: Bits,
}

/// A conv whose output feeds a BatchNorm whose backward (the input gradient) is applied where
/// grad-input and grad-weight load the conv's output gradient (the shader's `OUT_BN`): their dy
/// is then the conv's output, `dy` here the BatchNorm's output gradient, and `form.table` must
/// hold the BatchNorm's `dbeta`, `dgamma` and scale (its backward reduction writes them).
#[derive(Clone, Copy, Debug)]
pub struct OutputBn<'a> {
    pub form: BnForm<'a>,
    pub dy: &'a Tensor,
}

/// The BatchNorms whose work a conv's GEMMs do where they load: the one whose output is the
/// conv's input, and the one after it whose backward forms the conv's output gradient.
/// `input_sums`: grad-input also forms the sums of the input BatchNorm's backward reduction (see
/// [`Fused::bn_sums`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct AroundBn<'a> {
    pub input: Option<InputBn<'a>>,
    pub output: Option<OutputBn<'a>>,
    pub input_sums: Option<&'a Tensor>,
}

/// What a GEMM does besides multiplying: grad-input's activation-quantizer epilogue, the
/// BatchNorms around it, forward's partial statistics for the BatchNorm after it (`(tiles, 2,
/// Cout)`: see [`forward_bn_partials`]) and grad-input's sums for the backward of the
/// BatchNorm before it (`bn_sums`, `(tiles, 2, Cin)`: per column tile and channel, the sum of
/// the BatchNorm's output gradient dx after its ReLU mask, and of that times x̂; see
/// [`grad_input_bn_sums`]), which its `norm::backward_merge` adds up instead of reducing dx.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused<'a> {
    pub act: Option<ActGrad<'a>>,
    pub input_bn: Option<InputBn<'a>>,
    pub output_bn: Option<OutputBn<'a>>,
    pub bn_stats: Option<&'a Tensor>,
    pub bn_sums: Option<&'a Tensor>,
}

impl Fused<'_> {
    /// Checks that `mode`'s GEMM of `g`, writing `out` in `tiles` column tiles, can do these.
    pub(crate) fn check(
        &self,
        g: &GemmConv,
        mode: Mode,
        out: &Tensor,
        tiles: usize,
        label: &str,
    ) -> Result<()> {
        let refuse = |why: &str| Err(Error::shape(label, why));
        if self.act.is_some() && mode != Mode::GradInput {
            return refuse("only grad-input applies an input quantizer");
        }
        if let Some(a) = self.act {
            expect_dtype(label, "x", a.x, DType::F32)?;
            if a.x.numel() != out.numel() {
                return refuse("the input x is not the size of dx");
            }
        }
        if let Some(bn) = self.input_bn {
            if mode == Mode::GradInput && self.act.is_none_or(|a| a.requantize) {
                return refuse(
                    "grad-input forms a BatchNorm's output only for its quantizer's mask (an ActGrad without requantize)",
                );
            }
            bn.form.check(label, g.cin)?;
        }
        if let Some(bn) = self.output_bn {
            if mode == Mode::Forward {
                return refuse("only the backward GEMMs apply the next BatchNorm's backward");
            }
            bn.form.check(label, g.cout)?;
            if bn.dy.numel() != g.batch * g.cout * g.oh * g.ow {
                return refuse(
                    "the BatchNorm's output gradient is not the size of the conv's output",
                );
            }
        }
        if let Some(t) = self.bn_sums {
            if mode != Mode::GradInput || self.input_bn.is_none() {
                return refuse(
                    "only grad-input forms a BatchNorm's backward sums, of the BatchNorm it forms its input from",
                );
            }
            let need = 2 * tiles * g.cin;
            if t.numel() < need {
                return Err(Error::shape(
                    label,
                    format!(
                        "{} floats for BatchNorm backward sums, {need} needed",
                        t.numel()
                    ),
                ));
            }
        }
        if let Some(t) = self.bn_stats {
            if mode != Mode::Forward {
                return refuse("only the forward GEMM forms BatchNorm statistics");
            }
            let need = 2 * tiles * g.cout;
            if t.numel() < need {
                return Err(Error::shape(
                    label,
                    format!(
                        "{} floats for BatchNorm partial statistics, {need} needed",
                        t.numel()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The shader's constants that switch these on.
    fn constants(&self) -> Vec<(&'static str, f64)> {
        let flag = |on: bool| f64::from(u8::from(on));
        let (input, output) = (self.input_bn, self.output_bn);
        // The quantizer's levels: grad-input's epilogue's, or the input's formed on load.
        let levels = self.act.map(|a| a.bits).or(input.map(|b| b.bits));
        vec![
            (
                "ACT_GRAD",
                self.act
                    .map_or(0.0, |a| if a.requantize { 2.0 } else { 1.0 }),
            ),
            ("ACT_LEVELS", levels.map_or(1.0, |b| f64::from(b.levels()))),
            (
                "ACT_INV_LEVELS",
                levels.map_or(1.0, |b| f64::from(b.inv_levels())),
            ),
            ("IN_BN", flag(input.is_some())),
            ("IN_RELU", flag(input.is_some_and(|b| b.form.relu))),
            ("IN_SHUFFLE", input.map_or(1, |b| b.form.shuffle) as f64),
            ("IN_QUANT", flag(input.is_some_and(|b| !b.bits.is_float()))),
            ("BN_STATS", flag(self.bn_stats.is_some())),
            ("BN_SUMS", flag(self.bn_sums.is_some())),
            ("OUT_BN", flag(output.is_some())),
            ("OUT_RELU", flag(output.is_some_and(|b| b.form.relu))),
            ("OUT_SHUFFLE", output.map_or(1, |b| b.form.shuffle) as f64),
        ]
    }

    /// What a launch's label says of these.
    pub(crate) fn describe(&self) -> String {
        let mut s = String::new();
        for (on, what) in [
            (self.input_bn.is_some(), " through bn"),
            (self.bn_stats.is_some(), " +bn stats"),
            (self.bn_sums.is_some(), " +bn sums"),
            (self.output_bn.is_some(), " +bn backward"),
        ] {
            if on {
                s.push_str(what);
            }
        }
        s
    }
}

/// Which GEMM of a convolution (the shader's `MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Forward = 0,
    GradInput = 1,
    GradWeight = 2,
}

/// The problem the shader solves: a conv2d whose input is `(batch, cin, h, w)` and output
/// `(batch, cout, oh, ow)`, both given explicitly so that a transposed convolution's output
/// padding can be expressed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmConv {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub oh: usize,
    pub ow: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    gn: u32,
    gk: u32,
    k_chunk: u32,
    splits: u32,
    // The geometry, read when the pipeline is not specialised to it.
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    oh: u32,
    ow: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    groups: u32,
    _pad: [u32; 2],
}

/// K steps of the shader's tiles.
const BK: usize = 8;

/// A workgroup tile of the shader: `bm` rows × `bn` columns, 8 × 16 outputs per thread. The rows
/// are one group's GEMM, or (group packing) `gp` groups' of `rg` rows each stacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub bn: usize,
    /// Groups stacked in the tile (1: the rows of one group).
    pub gp: usize,
    /// Rows of each group slot (`bm` with one group).
    pub rg: usize,
}

/// Tile heights the shader is built for (multiples of 16; the two row quads of a thread are
/// `bm / 2` apart).
const TILE_ROWS: [usize; 7] = [16, 32, 64, 96, 128, 160, 192];

/// The height a packed tile aims for, and the most rows a group may have to be packed.
const PACK_ROWS: usize = 128;
const PACK_MAX_GROUP_ROWS: usize = 64;

impl Tile {
    fn single(bm: usize, bn: usize) -> Tile {
        Tile {
            bm,
            bn,
            gp: 1,
            rg: bm,
        }
    }

    pub fn threads(&self) -> usize {
        (self.bm / 8) * (self.bn / 16)
    }

    /// Workgroup memory: two K tiles of A (transposed, rows padded by 4 floats) and of B (one
    /// per group slot).
    pub fn shared_bytes(&self) -> usize {
        2 * BK * (self.bm + 4 + self.gp * self.bn) * 4
    }

    /// The tile for a GEMM of `m` rows and `n` columns on any device: the shortest height that
    /// covers `m` in one tile (so layers of 10, 32, 96, 160 or 192 channels compute no padding
    /// rows), 128 rows beyond 192; 64 columns when `n` is that small, else 128.
    pub fn nominal(m: usize, n: usize) -> Tile {
        Tile::single(
            TILE_ROWS.iter().copied().find(|&r| r >= m).unwrap_or(128),
            if n <= 64 { 64 } else { 128 },
        )
    }

    /// The packed tile for `groups` GEMMs of `m` rows: where a group has few rows (at most 64,
    /// a multiple of 8) and there are several, as many groups as make 128 rows.
    pub fn packed(m: usize, n: usize, groups: usize) -> Option<Tile> {
        if groups < 2 || m > PACK_MAX_GROUP_ROWS || !m.is_multiple_of(8) {
            return None;
        }
        let gp = (PACK_ROWS / m).min(groups);
        Some(Tile {
            bm: gp * m,
            gp,
            rg: m,
            ..Tile::nominal(m, n)
        })
    }

    /// [`Self::packed`] where it applies and fits the device's workgroup limits (narrower, then
    /// with fewer groups, as needed), else [`Self::nominal`] with its height reduced until it
    /// fits.
    pub fn choose(m: usize, n: usize, groups: usize, limits: &wgpu::Limits) -> Tile {
        let fits = |t: &Tile| {
            t.threads() <= limits.max_compute_invocations_per_workgroup as usize
                && t.threads() <= limits.max_compute_workgroup_size_x as usize
                && t.shared_bytes() <= limits.max_compute_workgroup_storage_size as usize
        };
        if let Some(mut t) = Tile::packed(m, n, groups) {
            while t.gp >= 2 {
                if fits(&t) {
                    return t;
                }
                if t.bn > 32 {
                    t.bn /= 2;
                } else {
                    t.gp /= 2;
                    t.bm = t.gp * t.rg;
                }
            }
        }
        let mut t = Tile::nominal(m, n);
        while !fits(&t) && t.bm > TILE_ROWS[0] {
            t.bm = TILE_ROWS
                .iter()
                .rev()
                .copied()
                .find(|&r| r < t.bm)
                .unwrap_or(16);
            t.rg = t.bm;
        }
        t
    }
}

/// Where the bias gradient's split-K partial sums start in a scratch holding `weight_partials`
/// first: the next 256-byte boundary, so that they can be bound on their own.
fn bias_partials_offset(weight_partials: usize) -> usize {
    weight_partials.next_multiple_of(64)
}

/// Grad-weight aims for at least this many workgroups, about two waves of a large GPU's
/// resident 128-thread workgroups, splitting K into chunks of at least `MIN_CHUNK` and keeping
/// the partial sums within `MAX_PARTIALS` floats (16 MiB).
const TARGET_WORKGROUPS: usize = 1024;
const MIN_CHUNK: usize = 512;
const MAX_PARTIALS: usize = 1 << 22;

impl GemmConv {
    /// `(M, N, K)` of one group's GEMM.
    pub fn dims(&self, mode: Mode) -> (usize, usize, usize) {
        let (cig, cog) = (self.cin / self.groups, self.cout / self.groups);
        let khw = self.kernel.0 * self.kernel.1;
        match mode {
            Mode::Forward => (cog, self.batch * self.oh * self.ow, cig * khw),
            Mode::GradInput => (cig, self.batch * self.h * self.w, cog * khw),
            Mode::GradWeight => (cog, cig * khw, self.batch * self.oh * self.ow),
        }
    }

    /// The tile `mode`'s GEMM runs with on `gpu`.
    pub fn tile(&self, gpu: &Gpu, mode: Mode) -> Tile {
        let (m, n, _) = self.dims(mode);
        Tile::choose(m, n, self.groups, &gpu.limits)
    }

    /// The split-K count grad-weight uses by default.
    pub fn default_splits(&self) -> usize {
        let (m, n, k) = self.dims(Mode::GradWeight);
        // Counted in nominal tiles: the split count, and so the summation order, is the same on
        // every device.
        let t = Tile::nominal(m, n);
        let tiles = m.div_ceil(t.bm) * n.div_ceil(t.bn) * self.groups;
        let most = k
            .div_ceil(MIN_CHUNK)
            .min(MAX_PARTIALS / (m * n * self.groups).max(1));
        TARGET_WORKGROUPS.div_ceil(tiles).clamp(1, most.max(1))
    }

    /// Launches one GEMM. `out` gets the result (for grad-weight with `splits > 1`: the
    /// `(splits, Cout, Cin/g·KH·KW)` partial sums). `bias` is the forward's bias, or
    /// grad-weight's bias gradient (the row sums of A: `(splits, Cout)` partial sums).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        gpu: &Gpu,
        mode: Mode,
        a_src: &Tensor,
        b_src: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
        splits: usize,
        label: String,
    ) -> Result<Launch> {
        let none = Fused::default();
        self.launch_with(gpu, mode, (a_src, b_src), bias, out, splits, none, label)
    }

    /// [`Self::launch`] with `fused`: grad-input's `act` (the layer input's quantizer applied
    /// as dx is written), and the BatchNorms' work done on load (conv2d only: with `input_bn`
    /// the layer input is the BatchNorm's input, `b_src` in forward and grad-weight, `act.x` in
    /// grad-input; with `output_bn`, dy is the conv's output) and forward's `bn_stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_with(
        &self,
        gpu: &Gpu,
        mode: Mode,
        (a_src, b_src): (&Tensor, &Tensor),
        bias: Option<&Tensor>,
        out: &Tensor,
        splits: usize,
        fused: Fused<'_>,
        label: String,
    ) -> Result<Launch> {
        let bias_grad = mode == Mode::GradWeight && bias.is_some();
        let (gm, gn, gk) = self.dims(mode);
        let (k_chunk, splits) = if mode == Mode::GradWeight {
            let chunk = gk.div_ceil(splits.max(1)).next_multiple_of(BK);
            (chunk, gk.div_ceil(chunk))
        } else {
            (gk, 1)
        };
        let dims = [
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.oh,
            self.ow,
            self.groups,
            gn,
            gk + BK,
        ];
        let too_big = |v: usize| u32::try_from(v).is_err();
        if dims.iter().any(|&v| too_big(v))
            || [a_src.numel(), b_src.numel(), out.numel()]
                .iter()
                .any(|&v| too_big(v))
        {
            return Err(Error::shape(
                &label,
                "tensor too large to index with 32 bits: use a smaller batch size",
            ));
        }
        let tile = self.tile(gpu, mode);
        fused.check(self, mode, out, gn.div_ceil(tile.bn), &label)?;
        let c = |v: usize| v as f64;
        let (vec_a, vec_b) = if gpu.vector_loads() {
            self.vector_loads(mode)
        } else {
            (0, 0)
        };
        let mut constants = vec![
            ("MODE", mode as u32 as f64),
            (
                "HAS_BIAS",
                f64::from(u8::from(bias.is_some() && !bias_grad)),
            ),
            ("BIAS_GRAD", f64::from(u8::from(bias_grad))),
            ("BM", c(tile.bm)),
            ("BN", c(tile.bn)),
            ("GP", c(tile.gp)),
            ("RG", c(tile.rg)),
            ("KH", c(self.kernel.0)),
            ("KW", c(self.kernel.1)),
            ("SPECIALIZED", f64::from(u8::from(gpu.specialized_gemms()))),
            ("VEC_A", f64::from(vec_a)),
            ("VEC_B", f64::from(vec_b)),
        ];
        constants.extend(fused.constants());
        if gpu.specialized_gemms() {
            constants.extend(self.geometry_constants());
        }
        let kernel = gpu.kernel(&KernelSpec {
            shader: &CONV2D,
            entry: "main",
            constants: &constants,
            bindings: &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
                Bind::ReadWrite,
                Bind::ReadWrite,
                Bind::ReadVec4,
                Bind::ReadWrite,
                Bind::Read,
                Bind::ReadVec4,
                Bind::ReadVec4,
                Bind::ReadVec4,
                Bind::ReadVec4,
            ],
        })?;
        // The optional bindings must exist even when unused: a placeholder of one float each
        // (buffers of their own, so that none aliases a written one).
        let placeholder = |what: &str| gpu.zeros(what, &[1], DType::F32);
        let (none, none_out) = (placeholder("no bias")?, placeholder("no bias gradient")?);
        let (bias, bias_out) = match (bias, bias_grad) {
            (Some(b), false) => (b, &none_out),
            (Some(b), true) => (&none, b),
            (None, _) => (&none, &none_out),
        };
        let (no_x, no_bn, no_stats) = (
            placeholder("no quantized input")?,
            placeholder("no BatchNorm table")?,
            placeholder("no BatchNorm statistics")?,
        );
        let act_x = fused.act.map_or(&no_x, |a| a.x);
        let bn_table = fused.input_bn.map_or(&no_bn, |b| b.form.table);
        let bn_part = fused.bn_stats.or(fused.bn_sums).unwrap_or(&no_stats);
        let (out_dy, out_bn) = fused
            .output_bn
            .map_or((&no_bn, &no_bn), |b| (b.dy, b.form.table));
        let grid = [
            gn.div_ceil(tile.bn) as u32,
            gm.div_ceil(tile.rg) as u32,
            (self.groups.div_ceil(tile.gp) * splits) as u32,
        ];
        // The tile in the label: `bench kernels` and error messages show what ran.
        let packed = match tile.gp {
            1 => String::new(),
            gp => format!(", {gp} groups of {}", tile.rg),
        };
        let vec4 = match (vec_a, vec_b) {
            (0, 0) => String::new(),
            (a, b) => {
                let form = |v: u32, quads: &str| match v {
                    1 => quads.to_string(),
                    2 => "blocks".to_string(),
                    _ => "scalar".to_string(),
                };
                format!(", vec4 A {} B {}", form(a, "rows"), form(b, "columns"))
            }
        };
        gpu.launch(
            &kernel,
            format!(
                "{label}{} tile {}x{}{packed}{vec4}",
                fused.describe(),
                tile.bm,
                tile.bn
            ),
            Some(bytemuck::bytes_of(
                &self.params((gn, gk), (k_chunk, splits)),
            )),
            &[
                a_src, b_src, bias, out, bias_out, act_x, bn_table, bn_part, out_dy, out_bn, a_src,
                b_src, out_dy,
            ],
            grid,
        )
    }

    /// The uniforms of one GEMM (`gn` columns, depth `gk`, split in chunks of `k_chunk`).
    fn params(&self, (gn, gk): (usize, usize), (k_chunk, splits): (usize, usize)) -> Params {
        let u = |v: usize| v as u32;
        Params {
            batch: u(self.batch),
            gn: u(gn),
            gk: u(gk),
            k_chunk: u(k_chunk),
            splits: u(splits),
            cin: u(self.cin),
            h: u(self.h),
            w: u(self.w),
            cout: u(self.cout),
            oh: u(self.oh),
            ow: u(self.ow),
            sh: u(self.stride.0),
            sw: u(self.stride.1),
            ph: u(self.padding.0),
            pw: u(self.padding.1),
            dh: u(self.dilation.0),
            dw: u(self.dilation.1),
            groups: u(self.groups),
            _pad: [0; 2],
        }
    }

    /// The shader's vector-load forms (`VEC_A`, `VEC_B`; see conv2d.wgsl) for `mode`: where four
    /// tile elements lie in one 16-byte-aligned vec4 of their source in every tile. Tensors
    /// start 256-byte aligned, the tiles' rows and columns at multiples of 4 and their K steps
    /// at multiples of 8, so alignment follows from the shape: a weight row of a multiple of 4
    /// (forward), a 1x1 weight with a multiple of 4 input channels per group (grad-input), an
    /// image of a multiple of 4 pixels (grad-weight's dy, and a pointwise conv's input and
    /// output).
    pub(crate) fn vector_loads(&self, mode: Mode) -> (u32, u32) {
        let (cig, khw) = (self.cin / self.groups, self.kernel.0 * self.kernel.1);
        let pointwise = self.kernel == (1, 1)
            && self.stride == (1, 1)
            && self.padding == (0, 0)
            && (self.oh, self.ow) == (self.h, self.w);
        let pixels4 = (self.oh * self.ow).is_multiple_of(4);
        let b = u32::from(pointwise && pixels4);
        match mode {
            Mode::Forward => (2 * u32::from((cig * khw).is_multiple_of(4)), b),
            Mode::GradInput => (u32::from(khw == 1 && cig.is_multiple_of(4)), b),
            Mode::GradWeight => (2 * u32::from(pixels4), 2 * b),
        }
    }

    /// The geometry as pipeline constants (specialised pipelines; the kernel size is separate).
    pub(crate) fn geometry_constants(&self) -> [(&'static str, f64); 13] {
        let c = |v: usize| v as f64;
        [
            ("CIN", c(self.cin)),
            ("H", c(self.h)),
            ("W", c(self.w)),
            ("COUT", c(self.cout)),
            ("OH", c(self.oh)),
            ("OW", c(self.ow)),
            ("SH", c(self.stride.0)),
            ("SW", c(self.stride.1)),
            ("PH", c(self.padding.0)),
            ("PW", c(self.padding.1)),
            ("DH", c(self.dilation.0)),
            ("DW", c(self.dilation.1)),
            ("GROUPS", c(self.groups)),
        ]
    }

    /// The split count grad-weight really uses when asked for `splits` (chunks are whole tiles).
    fn effective_splits(&self, splits: usize) -> usize {
        let (_, _, gk) = self.dims(Mode::GradWeight);
        let chunk = gk.div_ceil(splits.max(1)).next_multiple_of(BK);
        gk.div_ceil(chunk)
    }

    /// Elements of partial-sum scratch grad-weight needs with the default split-K (0: none),
    /// `with_bias`: for the bias gradient's too.
    pub fn grad_weight_scratch_len(&self, with_bias: bool) -> usize {
        let splits = self.effective_splits(self.default_splits());
        let (m, n, _) = self.dims(Mode::GradWeight);
        if splits <= 1 {
            0
        } else if with_bias {
            bias_partials_offset(splits * m * n * self.groups) + splits * self.cout
        } else {
            splits * m * n * self.groups
        }
    }

    /// Grad-weight into `dw` (and, given `db`, the bias gradient: the row sums of `a_src`,
    /// which must be dy), in one GEMM, or split-K partial GEMMs and their ordered sums. The
    /// partial sums go into `scratch` when it is given and large enough (a network shares one
    /// across its layers, since their backward passes run one after another), else into a
    /// buffer of their own.
    #[allow(clippy::too_many_arguments)]
    pub fn grad_weight_ops(
        &self,
        gpu: &Gpu,
        (a_src, b_src): (&Tensor, &Tensor),
        (dw, db): (&Tensor, Option<&Tensor>),
        splits: usize,
        scratch: Option<&Tensor>,
        bn: AroundBn<'_>,
        label: String,
    ) -> Result<Vec<Op>> {
        let splits = self.effective_splits(splits);
        let fused = Fused {
            act: None,
            input_bn: bn.input,
            output_bn: bn.output,
            ..Fused::default()
        };
        let gemm = |out: &Tensor, bias: Option<&Tensor>| {
            self.launch_with(
                gpu,
                Mode::GradWeight,
                (a_src, b_src),
                bias,
                out,
                splits,
                fused,
                label.clone(),
            )
            .map(Op::Dispatch)
        };
        if splits <= 1 {
            return Ok(vec![gemm(dw, db)?]);
        }
        let shape = [splits, dw.numel()];
        let bias_at = bias_partials_offset(splits * dw.numel());
        let need = match db {
            Some(_) => bias_at + splits * self.cout,
            None => splits * dw.numel(),
        };
        let scratch = match scratch {
            Some(s) if s.numel() >= need => s.clone(),
            _ => gpu.empty("grad-weight partial sums", &[need], DType::F32)?,
        };
        let partial = scratch.view(0, &shape)?;
        let flat = dw.reshape(&[dw.numel()])?;
        Ok(match db {
            None => vec![
                gemm(&partial, None)?,
                Op::Dispatch(reduce::slice_sum(gpu, &partial, &flat)?),
            ],
            Some(db) => {
                let bias_partial = scratch.view(bias_at, &[splits, self.cout])?;
                vec![
                    gemm(&partial, Some(&bias_partial))?,
                    Op::Dispatch(reduce::slice_sum_pair(
                        gpu,
                        (&partial, &flat),
                        (&bias_partial, db),
                    )?),
                ]
            }
        })
    }
}

fn check(geom: &Conv2dGeom, kernel: &str, named: &[(&str, &Tensor, &[usize])]) -> Result<String> {
    geom.validate()?;
    for (name, t, shape) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(format!("{kernel} {}", geom.describe()))
}

/// `y = conv2d(x, w) + bias`.
pub fn forward(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<Op> {
    forward_with(gpu, geom, x, w, bias, y, None, None)
}

/// [`forward`] whose input is formed from a BatchNorm's where it is loaded (`input_bn`: `x`
/// is then the BatchNorm's input), and which forms the partial statistics of the BatchNorm
/// after it (`bn_stats`, at least [`forward_bn_partials`] floats; merged by
/// `norm::stats_merge` with [`forward_tile_columns`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    input_bn: Option<InputBn<'_>>,
    bn_stats: Option<&Tensor>,
) -> Result<Op> {
    const K: &str = "conv2d.forward";
    let label = check(
        geom,
        K,
        &[
            ("x", x, &geom.input_shape()),
            ("w", w, &geom.weight_shape()),
            ("y", y, &geom.output_shape()),
        ],
    )?;
    if let Some(b) = bias {
        check(geom, K, &[("bias", b, &[geom.cout])])?;
    }
    let fused = Fused {
        input_bn,
        bn_stats,
        ..Fused::default()
    };
    Ok(Op::Dispatch(geom.gemm().launch_with(
        gpu,
        Mode::Forward,
        (w, x),
        bias,
        y,
        1,
        fused,
        label,
    )?))
}

/// Columns (of batch·OH·OW) per partial statistic the forward forms for a BatchNorm on `gpu`.
pub fn forward_tile_columns(gpu: &Gpu, geom: &Conv2dGeom) -> usize {
    geom.gemm().tile(gpu, Mode::Forward).bn
}

/// The column tiles (of batch·H·W) whose backward sums grad-input forms for the BatchNorm
/// before on `gpu`: `norm::backward_merge`'s tile count.
pub fn grad_input_bn_sum_tiles(gpu: &Gpu, geom: &Conv2dGeom) -> usize {
    let columns = geom.gemm().tile(gpu, Mode::GradInput).bn;
    (geom.batch * geom.h * geom.w).div_ceil(columns)
}

/// Floats of grad-input's BatchNorm backward sums on any device: the narrowest tile (32
/// columns) makes the most.
pub fn grad_input_bn_sums(geom: &Conv2dGeom) -> usize {
    2 * (geom.batch * geom.h * geom.w).div_ceil(32) * geom.cin
}

/// Floats of the forward's partial BatchNorm statistics on any device: the narrowest tile
/// (32 columns) makes the most.
pub fn forward_bn_partials(geom: &Conv2dGeom) -> usize {
    let (oh, ow) = geom.out_hw();
    2 * (geom.batch * oh * ow).div_ceil(32) * geom.cout
}

/// `dx = dL/dx` from `dy` (a transposed convolution with `w`).
pub fn grad_input(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
) -> Result<Op> {
    let label = check(
        geom,
        "conv2d.grad_input",
        &[
            ("dy", dy, &geom.output_shape()),
            ("w", w, &geom.weight_shape()),
            ("dx", dx, &geom.input_shape()),
        ],
    )?;
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::GradInput,
        w,
        dy,
        None,
        dx,
        1,
        label,
    )?))
}

/// [`grad_input`] with the layer input's DoReFa quantizer in its epilogue (`act`: `dx` masked by
/// the float input `act.x` and, with `act.requantize`, `act.x` replaced by its quantized value)
/// and the BatchNorms around the conv: with `bn.input`, `act.x` is that BatchNorm's input and
/// the float input is formed from it; with `bn.output`, `dy` is the conv's output and its
/// gradient is formed through the BatchNorm after it.
pub fn grad_input_fused(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    act: Option<ActGrad<'_>>,
    bn: AroundBn<'_>,
) -> Result<Op> {
    let label = check(
        geom,
        "conv2d.grad_input",
        &[
            ("dy", dy, &geom.output_shape()),
            ("w", w, &geom.weight_shape()),
            ("dx", dx, &geom.input_shape()),
        ],
    )?;
    if let Some(a) = act {
        check(
            geom,
            "conv2d.grad_input",
            &[("x", a.x, &geom.input_shape())],
        )?;
    }
    Ok(Op::Dispatch(geom.gemm().launch_with(
        gpu,
        Mode::GradInput,
        (w, dy),
        None,
        dx,
        1,
        Fused {
            act,
            input_bn: bn.input,
            output_bn: bn.output,
            bn_stats: None,
            bn_sums: bn.input_sums,
        },
        label,
    )?))
}

/// `dw = dL/dw` (correlation of `x` with `dy`), with the default split-K; its partial sums go
/// into `scratch` when given (sized by `GemmConv::grad_weight_scratch_len`).
pub fn grad_weight(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_with(gpu, geom, x, dy, dw, None, scratch)
}

/// [`grad_weight`] with an explicit split-K count.
#[allow(clippy::too_many_arguments)]
pub fn grad_weight_split(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: usize,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_with(gpu, geom, x, dy, dw, Some(splits), scratch)
}

/// `dw` and `db = dL/dbias` in one pass over `dy` (the bias gradient is the row sums of
/// grad-weight's A = dy), with the default split-K or `splits`; the partial sums of both go into
/// `scratch` when given (sized by `GemmConv::grad_weight_scratch_len(true)`).
#[allow(clippy::too_many_arguments)]
pub fn grad_weight_and_bias(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    db: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    check(geom, "conv2d.grad_weight", &[("db", db, &[geom.cout])])?;
    grad_weight_inner(
        gpu,
        geom,
        x,
        dy,
        (dw, Some(db)),
        splits,
        scratch,
        AroundBn::default(),
    )
}

/// Grad-weight (and, given `db`, the bias gradient) with the default split-K, its input formed
/// from a BatchNorm's where it is loaded (`input_bn`: `x` is the BatchNorm's input).
pub fn grad_weight_fused(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, Option<&Tensor>),
    bn: AroundBn<'_>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    if let Some(db) = db {
        check(geom, "conv2d.grad_weight", &[("db", db, &[geom.cout])])?;
    }
    grad_weight_inner(gpu, geom, x, dy, (dw, db), None, scratch, bn)
}

fn grad_weight_with(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_inner(
        gpu,
        geom,
        x,
        dy,
        (dw, None),
        splits,
        scratch,
        AroundBn::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn grad_weight_inner(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, Option<&Tensor>),
    splits: Option<usize>,
    scratch: Option<&Tensor>,
    bn: AroundBn<'_>,
) -> Result<Vec<Op>> {
    let label = check(
        geom,
        "conv2d.grad_weight",
        &[
            ("x", x, &geom.input_shape()),
            ("dy", dy, &geom.output_shape()),
            ("dw", dw, &geom.weight_shape()),
        ],
    )?;
    let g = geom.gemm();
    let splits = splits.unwrap_or_else(|| g.default_splits());
    g.grad_weight_ops(gpu, (dy, x), (dw, db), splits, scratch, bn, label)
}

/// `db[c] = Σ_{n,y,x} dy[n, c, y, x]`.
pub fn grad_bias(gpu: &Gpu, geom: &Conv2dGeom, dy: &Tensor, db: &Tensor) -> Result<Op> {
    check(
        geom,
        "conv2d.grad_bias",
        &[("dy", dy, &geom.output_shape()), ("db", db, &[geom.cout])],
    )?;
    Ok(Op::Dispatch(reduce::channel_sum(gpu, dy, db)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_rows_without_padding_tiles_and_fit_the_device() {
        let big = wgpu::Limits {
            max_compute_workgroup_storage_size: 32 << 10,
            ..wgpu::Limits::default()
        };
        let rows = |m| Tile::choose(m, 1000, 1, &big).bm;
        assert_eq!(
            [1, 10, 32, 33, 96, 128, 150, 192, 256, 1000].map(rows),
            [16, 16, 32, 64, 96, 128, 160, 192, 128, 128]
        );
        assert_eq!(Tile::choose(128, 64, 1, &big).bn, 64);
        assert_eq!(Tile::choose(128, 65, 1, &big).bn, 128);
        // 128 x 128 needs 16,640 bytes: WebGPU's 16 KiB minimum gets 96 rows.
        assert_eq!(Tile::nominal(128, 1000).shared_bytes(), 16_640);
        let small = wgpu::Limits::default();
        let t = Tile::choose(128, 1000, 1, &small);
        assert_eq!((t.bm, t.bn), (96, 128));
        assert!(t.shared_bytes() <= 16 << 10 && t.threads() <= 256);
        // 192 rows x 128 columns is 192 threads; a device with 128 gets 128 rows.
        let few = wgpu::Limits {
            max_compute_invocations_per_workgroup: 128,
            ..big
        };
        assert_eq!(Tile::choose(190, 1000, 1, &few).bm, 128);
    }

    #[test]
    fn grouped_layers_with_few_rows_per_group_pack_groups_into_tall_tiles() {
        let limits = |kib: u32| wgpu::Limits {
            max_compute_workgroup_storage_size: kib << 10,
            ..wgpu::Limits::default()
        };
        let shape = |t: Tile| (t.gp, t.rg, t.bm, t.bn, t.threads());
        // NIN-GC's 3x3 layers: 32 output channels per group (forward, grad-weight), 16 input
        // channels (grad-input). 48 KiB (an NVIDIA GPU's): 4 groups x 32 rows x 128 columns.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(48))),
            (4, 32, 128, 128, 128)
        );
        assert_eq!(
            Tile::choose(32, 4096, 16, &limits(48)).shared_bytes(),
            41_216
        );
        // 32 KiB (lavapipe's): 64 columns.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(32))),
            (4, 32, 128, 64, 64)
        );
        assert_eq!(
            shape(Tile::choose(16, 4096, 32, &limits(48))),
            (8, 16, 128, 64, 64)
        );
        assert_eq!(
            shape(Tile::choose(16, 4096, 32, &limits(32))),
            (8, 16, 128, 32, 32)
        );
        // WebGPU's 16 KiB: fewer groups.
        assert_eq!(
            shape(Tile::choose(32, 4096, 16, &limits(16))),
            (2, 32, 64, 32, 16)
        );
        // Fewer groups than fit: all of them; 6 groups of 32 rows: slots of 4 (the last half
        // empty).
        assert_eq!(
            shape(Tile::choose(8, 4096, 3, &limits(48))),
            (3, 8, 24, 128, 24)
        );
        assert_eq!(Tile::choose(32, 4096, 6, &limits(48)).gp, 4);
        // Not packed: one group, rows not a multiple of 8, or many rows per group.
        for (m, groups) in [(32, 1), (12, 4), (128, 2)] {
            assert_eq!(Tile::choose(m, 4096, groups, &limits(48)).gp, 1);
        }
    }

    #[test]
    fn split_k_counts_do_not_depend_on_the_device() {
        // nin_gc's second conv at batch 50: M = N = 128 per group, 2 groups, K = 51,200.
        let g = Conv2dGeom::square(50, 256, 32, 256, 1).groups(2).gemm();
        assert_eq!(g.default_splits(), 100);
        let k = g.dims(Mode::GradWeight).2;
        assert!(k / g.default_splits() >= MIN_CHUNK);
    }
}
