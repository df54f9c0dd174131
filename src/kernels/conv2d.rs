//! `shaders/conv2d.wgsl`: conv2d forward, grad-input, grad-weight (split-K) and grad-bias as
//! implicit GEMMs. `GemmConv` is the fully specified problem the shader solves;
//! conv_transpose2d and matmul map onto it too.

use super::{CONV2D, expect_dtype, expect_shape, reduce};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Launch, Op, Tensor};

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
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    oh: u32,
    ow: u32,
    groups: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    k_chunk: u32,
    splits: u32,
    gm: u32,
    gn: u32,
    gk: u32,
    _pad: u32,
}

/// Tile sizes of the shader: 64 columns, BM rows (see [`tile_rows`]), K steps of 16.
const TILE: usize = 64;
const BK: usize = 16;

/// The tile height for `m` rows: the smallest of 16, 32, 64 that covers them (64 beyond).
fn tile_rows(m: usize) -> usize {
    match m {
        0..=16 => 16,
        17..=32 => 32,
        _ => 64,
    }
}

/// Grad-weight aims for at least this many workgroups (the GPU's cores busy), splitting K into
/// chunks of at least `MIN_CHUNK`.
const TARGET_WORKGROUPS: usize = 1024;
const MIN_CHUNK: usize = 512;

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

    /// The split-K count grad-weight uses by default.
    pub fn default_splits(&self) -> usize {
        let (m, n, k) = self.dims(Mode::GradWeight);
        let tiles = m.div_ceil(tile_rows(m)) * n.div_ceil(TILE) * self.groups;
        TARGET_WORKGROUPS
            .div_ceil(tiles)
            .clamp(1, k.div_ceil(MIN_CHUNK).max(1))
    }

    /// Launches one GEMM. `out` gets the result (for grad-weight with `splits > 1`: the
    /// `(splits, Cout, Cin/g·KH·KW)` partial sums).
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
        let p = Params {
            batch: self.batch as u32,
            cin: self.cin as u32,
            h: self.h as u32,
            w: self.w as u32,
            cout: self.cout as u32,
            oh: self.oh as u32,
            ow: self.ow as u32,
            groups: self.groups as u32,
            sh: self.stride.0 as u32,
            sw: self.stride.1 as u32,
            ph: self.padding.0 as u32,
            pw: self.padding.1 as u32,
            dh: self.dilation.0 as u32,
            dw: self.dilation.1 as u32,
            k_chunk: k_chunk as u32,
            splits: splits as u32,
            gm: gm as u32,
            gn: gn as u32,
            gk: gk as u32,
            _pad: 0,
        };
        let kernel = gpu.kernel(&KernelSpec {
            shader: &CONV2D,
            entry: "main",
            constants: &[
                ("MODE", mode as u32 as f64),
                ("KH", self.kernel.0 as f64),
                ("KW", self.kernel.1 as f64),
                ("HAS_BIAS", f64::from(u8::from(bias.is_some()))),
                ("BM", tile_rows(gm) as f64),
            ],
            bindings: &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
            ],
        })?;
        // The bias binding must exist even when unused.
        let none;
        let bias = match bias {
            Some(b) => b,
            None => {
                none = gpu.zeros("no bias", &[1], DType::F32)?;
                &none
            }
        };
        let grid = [
            gn.div_ceil(TILE) as u32,
            gm.div_ceil(tile_rows(gm)) as u32,
            (self.groups * splits) as u32,
        ];
        gpu.launch(
            &kernel,
            label,
            Some(bytemuck::bytes_of(&p)),
            &[a_src, b_src, bias, out],
            grid,
        )
    }

    /// The split count grad-weight really uses when asked for `splits` (chunks are whole tiles).
    fn effective_splits(&self, splits: usize) -> usize {
        let (_, _, gk) = self.dims(Mode::GradWeight);
        let chunk = gk.div_ceil(splits.max(1)).next_multiple_of(BK);
        gk.div_ceil(chunk)
    }

    /// Elements of partial-sum scratch grad-weight needs with the default split-K (0: none).
    pub fn grad_weight_scratch_len(&self) -> usize {
        let splits = self.effective_splits(self.default_splits());
        let (m, n, _) = self.dims(Mode::GradWeight);
        if splits <= 1 {
            0
        } else {
            splits * m * n * self.groups
        }
    }

    /// Grad-weight into `dw`: one GEMM, or split-K partial GEMMs and their ordered sum. The
    /// partial sums go into `scratch` when it is given and large enough (a network shares one
    /// across its layers, since their backward passes run one after another), else into a
    /// buffer of their own.
    #[allow(clippy::too_many_arguments)]
    pub fn grad_weight_ops(
        &self,
        gpu: &Gpu,
        a_src: &Tensor,
        b_src: &Tensor,
        dw: &Tensor,
        splits: usize,
        scratch: Option<&Tensor>,
        label: String,
    ) -> Result<Vec<Op>> {
        let splits = self.effective_splits(splits);
        if splits <= 1 {
            return Ok(vec![Op::Dispatch(self.launch(
                gpu,
                Mode::GradWeight,
                a_src,
                b_src,
                None,
                dw,
                1,
                label,
            )?)]);
        }
        let shape = [splits, dw.numel()];
        let partial = match scratch {
            Some(s) if s.numel() >= splits * dw.numel() => s.view(0, &shape)?,
            _ => gpu.empty("grad-weight partial sums", &shape, DType::F32)?,
        };
        let gemm = self.launch(
            gpu,
            Mode::GradWeight,
            a_src,
            b_src,
            None,
            &partial,
            splits,
            label,
        )?;
        let flat = dw.reshape(&[dw.numel()])?;
        Ok(vec![
            Op::Dispatch(gemm),
            Op::Dispatch(reduce::slice_sum(gpu, &partial, &flat)?),
        ])
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
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::Forward,
        w,
        x,
        bias,
        y,
        1,
        label,
    )?))
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

fn grad_weight_with(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
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
    g.grad_weight_ops(gpu, dy, x, dw, splits, scratch, label)
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
