//! [`GemmConv`], the problem `conv2d.wgsl` solves, and its launch: pipeline constants,
//! bindings, grid, and grad-weight's split-K with its ordered sums.

use super::fused::{AroundBn, Fused};
use super::tile::{BK, Tile};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Op, Tensor};
use crate::kernels::{CONV2D, reduce};

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

/// The shader's bindings, in order (see conv2d.wgsl).
const BINDINGS: [Bind; 16] = [
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
    Bind::ReadWriteVec4,
    Bind::Read,
];

/// The tile and vector forms as a launch's label shows them (`bench kernels` and error
/// messages say what ran).
fn describe_tile(tile: Tile, (vec_a, vec_b, vec_out): (u32, u32, bool)) -> String {
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
    let stores = if vec_out { ", vec4 out" } else { "" };
    format!(" tile {}x{}{packed}{vec4}{stores}", tile.bm, tile.bn)
}

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
        self.check_32_bit_indexing((gn, gk), &[a_src, b_src, out], &label)?;
        let tile = self.tile(gpu, mode);
        fused.check(self, mode, out, gn.div_ceil(tile.bn), &label)?;
        let vector = if gpu.vector_loads() {
            let (a, b) = self.vector_loads(mode);
            (a, b, self.vector_stores(mode))
        } else {
            (0, 0, false)
        };
        let constants =
            self.constants(gpu, mode, tile, (bias.is_some(), bias_grad), vector, &fused);
        let kernel = gpu.kernel(&KernelSpec {
            shader: &CONV2D,
            entry: "main",
            constants: &constants,
            bindings: &BINDINGS,
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
        let (no_x, no_bn, no_stats, no_plus) = (
            placeholder("no quantized input")?,
            placeholder("no BatchNorm table")?,
            placeholder("no BatchNorm statistics")?,
            placeholder("no gradient to add")?,
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
        gpu.launch(
            &kernel,
            format!("{label}{}{}", fused.describe(), describe_tile(tile, vector)),
            Some(bytemuck::bytes_of(
                &self.params((gn, gk), (k_chunk, splits)),
            )),
            &[
                a_src,
                b_src,
                bias,
                out,
                bias_out,
                act_x,
                bn_table,
                bn_part,
                out_dy,
                out_bn,
                a_src,
                b_src,
                out_dy,
                out,
                fused.dx_plus.unwrap_or(&no_plus),
            ],
            grid,
        )
    }

    /// Refuses a GEMM of `gn` columns and depth `gk` whose sizes or tensors do not fit the
    /// shader's 32-bit indices.
    fn check_32_bit_indexing(
        &self,
        (gn, gk): (usize, usize),
        tensors: &[&Tensor],
        label: &str,
    ) -> Result<()> {
        let too_big = |v: usize| u32::try_from(v).is_err();
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
        if dims.iter().any(|&v| too_big(v)) || tensors.iter().any(|t| too_big(t.numel())) {
            return Err(Error::shape(
                label,
                "tensor too large to index with 32 bits: use a smaller batch size",
            ));
        }
        Ok(())
    }

    /// The pipeline constants of `mode`'s GEMM with `tile`: `(has_bias, bias_grad)`, the
    /// vector forms `(VEC_A, VEC_B)`, the fused work, and the geometry where pipelines are
    /// specialised to it.
    fn constants(
        &self,
        gpu: &Gpu,
        mode: Mode,
        tile: Tile,
        (has_bias, bias_grad): (bool, bool),
        (vec_a, vec_b, vec_out): (u32, u32, bool),
        fused: &Fused<'_>,
    ) -> Vec<(&'static str, f64)> {
        let c = |v: usize| v as f64;
        let flag = |on: bool| f64::from(u8::from(on));
        let mut constants = vec![
            ("MODE", mode as u32 as f64),
            ("HAS_BIAS", flag(has_bias && !bias_grad)),
            ("BIAS_GRAD", flag(bias_grad)),
            ("BM", c(tile.bm)),
            ("BN", c(tile.bn)),
            ("GP", c(tile.gp)),
            ("RG", c(tile.rg)),
            ("KH", c(self.kernel.0)),
            ("KW", c(self.kernel.1)),
            ("SPECIALIZED", flag(gpu.specialized_gemms())),
            ("VEC_A", f64::from(vec_a)),
            ("VEC_B", f64::from(vec_b)),
            ("VEC_OUT", flag(vec_out)),
        ];
        constants.extend(fused.constants());
        if gpu.specialized_gemms() {
            constants.extend(self.geometry_constants());
        }
        constants
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

    /// Whether the shader stores `mode`'s outputs as vec4s (`VEC_OUT`; see conv2d.wgsl): where
    /// every quad of four columns lies in one 16-byte-aligned vec4 of the output, as it does when
    /// the output's rows (one image's pixels: an output image in forward, an input image in
    /// grad-input; a weight row in grad-weight) hold a multiple of 4 elements, since columns
    /// are tiled in quads from 0 and tensors start 256-byte aligned.
    pub(crate) fn vector_stores(&self, mode: Mode) -> bool {
        let (_, n, _) = self.dims(mode);
        match mode {
            Mode::Forward => self.oh * self.ow,
            Mode::GradInput => self.h * self.w,
            Mode::GradWeight => n,
        }
        .is_multiple_of(4)
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
        let fused = Fused::on_load(bn);
        self.split_k_ops(gpu, (dw, db), splits, scratch, |out, bias| {
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
        })
    }

    /// Grad-weight into `dw` (and `db`) by `gemm`, which writes `splits` partial sums into the
    /// tensors it is given (or, with one split, `dw` and `db` themselves), then their ordered
    /// sums. The partial sums go into `scratch` when it is large enough, else into a buffer of
    /// their own.
    pub(crate) fn split_k_ops(
        &self,
        gpu: &Gpu,
        (dw, db): (&Tensor, Option<&Tensor>),
        splits: usize,
        scratch: Option<&Tensor>,
        gemm: impl Fn(&Tensor, Option<&Tensor>) -> Result<Op>,
    ) -> Result<Vec<Op>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv2d::Conv2dGeom;

    #[test]
    fn split_k_counts_do_not_depend_on_the_device() {
        // nin_gc's second conv at batch 50: M = N = 128 per group, 2 groups, K = 51,200.
        let g = Conv2dGeom::square(50, 256, 32, 256, 1).groups(2).gemm();
        assert_eq!(g.default_splits(), 100);
        let k = g.dims(Mode::GradWeight).2;
        assert!(k / g.default_splits() >= MIN_CHUNK);
    }

    #[test]
    fn outputs_are_stored_as_vec4s_where_their_rows_hold_a_multiple_of_four() {
        // 32x32 images in forward and grad-input; grad-weight's rows hold 3 * 5 * 5 = 75.
        let g = Conv2dGeom::square(1, 3, 32, 8, 5).padding(2).gemm();
        assert!(g.vector_stores(Mode::Forward) && g.vector_stores(Mode::GradInput));
        assert!(!g.vector_stores(Mode::GradWeight));
        // 9x9 input images, 5x5 output ones; grad-weight's rows 4 * 3 * 3 = 36.
        let g = Conv2dGeom::square(2, 8, 9, 6, 3)
            .stride(2)
            .padding(1)
            .groups(2)
            .gemm();
        assert!(!g.vector_stores(Mode::Forward) && !g.vector_stores(Mode::GradInput));
        assert!(g.vector_stores(Mode::GradWeight));
        // Every NIN-GC layer's images are 32x32, 16x16 or 8x8.
        let g = Conv2dGeom::square(50, 512, 8, 1024, 3)
            .padding(1)
            .groups(32)
            .gemm();
        assert!(
            [Mode::Forward, Mode::GradInput, Mode::GradWeight].map(|m| g.vector_stores(m))
                == [true; 3]
        );
    }
}
