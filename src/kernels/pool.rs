//! `shaders/pool.wgsl`: max-pool and avg-pool (forward, backward) and channel shuffle.

use super::norm::BnForm;
use super::{Entry, POOL, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use crate::quant::Bits;
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &POOL,
        name,
        used,
    }
}

const MAX_FORWARD: Entry = entry("maxpool_forward", &[(1, R), (2, W), (7, R)]);
const MAX_BACKWARD: Entry = entry("maxpool_backward", &[(1, R), (4, R), (6, W), (7, R)]);
const AVG_FORWARD: Entry = entry("avgpool_forward", &[(1, R), (2, W)]);
const AVG_BACKWARD: Entry = entry("avgpool_backward", &[(4, R), (6, W)]);
const SHUFFLE: Entry = entry("channel_shuffle", &[(1, R), (2, W)]);

/// A pooling window over `(N, C, H, W)`: floor mode; padding at most half the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl PoolGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        let axis = |n: usize, k: usize, s: usize, p: usize| {
            if n + 2 * p < k {
                0
            } else {
                (n + 2 * p - k) / s + 1
            }
        };
        (
            axis(self.h, self.kernel.0, self.stride.0, self.padding.0),
            axis(self.w, self.kernel.1, self.stride.1, self.padding.1),
        )
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        let (oh, ow) = self.out_hw();
        [self.n, self.c, oh, ow]
    }

    fn validate(&self, kernel: &str) -> Result<()> {
        let (oh, ow) = self.out_hw();
        let bad = [
            self.n,
            self.c,
            self.h,
            self.w,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
        ]
        .contains(&0)
            || 2 * self.padding.0 > self.kernel.0
            || 2 * self.padding.1 > self.kernel.1
            || oh == 0
            || ow == 0;
        if bad {
            return Err(Error::shape(kernel, format!("invalid pooling {self:?}")));
        }
        count_u32(kernel, self.n * self.c * self.h * self.w)?;
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    c: u32,
    groups: u32,
    inverse: u32,
    quantize: u32,
    levels_f: f32,
    inv_levels: f32,
    in_bn: u32,
    in_relu: u32,
    in_shuffle: u32,
    _pad: u32,
}

fn params(g: &PoolGeom) -> Params {
    let (oh, ow) = g.out_hw();
    Params {
        planes: (g.n * g.c) as u32,
        h: g.h as u32,
        w: g.w as u32,
        oh: oh as u32,
        ow: ow as u32,
        kh: g.kernel.0 as u32,
        kw: g.kernel.1 as u32,
        sh: g.stride.0 as u32,
        sw: g.stride.1 as u32,
        ph: g.padding.0 as u32,
        pw: g.padding.1 as u32,
        c: g.c as u32,
        groups: 1,
        inverse: 0,
        quantize: 0,
        levels_f: 1.0,
        inv_levels: 1.0,
        in_bn: 0,
        in_relu: 0,
        in_shuffle: 1,
        _pad: 0,
    }
}

fn check(kernel: &str, named: &[(&str, &Tensor, &[usize], DType)]) -> Result<()> {
    for (name, t, shape, dtype) in named {
        expect_dtype(kernel, name, t, *dtype)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(())
}

fn label(kernel: &str, g: &PoolGeom) -> String {
    format!(
        "{kernel} {:?} k{:?} s{:?} p{:?}",
        g.input_shape(),
        g.kernel,
        g.stride,
        g.padding
    )
}

/// `y` = window maxima.
pub fn maxpool_forward(gpu: &Gpu, g: &PoolGeom, x: &Tensor, y: &Tensor) -> Result<Op> {
    maxpool_forward_fused(gpu, g, x, y, MaxPoolEpilogue::default(), None)
}

/// What a max-pool applies to its output as it writes it (the layers after it, fused): a
/// channel shuffle in `shuffle` groups (1: none) and the next layer's DoReFa activation
/// quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolEpilogue {
    pub shuffle: usize,
    pub quantize: Option<Bits>,
}

impl Default for MaxPoolEpilogue {
    fn default() -> Self {
        MaxPoolEpilogue {
            shuffle: 1,
            quantize: None,
        }
    }
}

impl MaxPoolEpilogue {
    fn params(&self, kernel: &str, g: &PoolGeom) -> Result<Params> {
        if self.shuffle == 0 || !g.c.is_multiple_of(self.shuffle) {
            return Err(Error::shape(
                kernel,
                format!("cannot shuffle {} channels in {} groups", g.c, self.shuffle),
            ));
        }
        let (quantize, levels_f, inv_levels) = match self.quantize {
            Some(b) if !b.is_float() => (1, b.levels() as f32, b.inv_levels()),
            _ => (0, 1.0, 1.0),
        };
        Ok(Params {
            groups: self.shuffle as u32,
            quantize,
            levels_f,
            inv_levels,
            ..params(g)
        })
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        if self.shuffle > 1 {
            s += &format!("+shuffle{}", self.shuffle);
        }
        if let Some(b) = self.quantize.filter(|b| !b.is_float()) {
            s += &format!("+a{b}");
        }
        s
    }
}

/// [`maxpool_forward`] with `ep` applied to the output and, given `input_bn`, its input formed
/// from a BatchNorm's where it is read (`x` is then the BatchNorm's input).
pub fn maxpool_forward_fused(
    gpu: &Gpu,
    g: &PoolGeom,
    x: &Tensor,
    y: &Tensor,
    ep: MaxPoolEpilogue,
    input_bn: Option<BnForm<'_>>,
) -> Result<Op> {
    const K: &str = "maxpool_forward";
    g.validate(K)?;
    let (i, o) = (g.input_shape(), g.output_shape());
    check(K, &[("x", x, &i, DType::F32), ("y", y, &o, DType::F32)])?;
    let (p, table) = with_input_bn(gpu, K, g, ep.params(K, g)?, input_bn)?;
    MAX_FORWARD.launch(
        gpu,
        &[],
        label(&format!("{K}{}{}", ep.describe(), through(input_bn)), g),
        &p,
        &[x, y, &table],
        elementwise_grid(gpu, y.numel() as u32),
    )
}

/// `p` set to form the input from a BatchNorm's, and the table to bind (a placeholder without).
fn with_input_bn(
    gpu: &Gpu,
    kernel: &str,
    g: &PoolGeom,
    p: Params,
    input_bn: Option<BnForm<'_>>,
) -> Result<(Params, Tensor)> {
    let Some(bn) = input_bn else {
        return Ok((p, gpu.zeros("no BatchNorm table", &[1], DType::F32)?));
    };
    bn.check(kernel, g.c)?;
    let p = Params {
        in_bn: 1,
        in_relu: u32::from(bn.relu),
        in_shuffle: bn.shuffle as u32,
        ..p
    };
    Ok((p, bn.table.clone()))
}

fn through(input_bn: Option<BnForm<'_>>) -> &'static str {
    if input_bn.is_some() {
        " through bn"
    } else {
        ""
    }
}

/// `dx` = sum over windows of `dy` routed to each window's first maximum, found again in `x`
/// (the forward's input, unchanged): no index map is kept between the passes.
pub fn maxpool_backward(
    gpu: &Gpu,
    g: &PoolGeom,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<Op> {
    maxpool_backward_shuffled(gpu, g, x, dy, dx, 1, None)
}

/// [`maxpool_backward`] of a max-pool whose output was shuffled in `shuffle` groups: `dy` is the
/// shuffled output's gradient, read where the shuffle put each element. Given `input_bn`, the
/// input is formed from a BatchNorm's as the forward formed it (`x` is the BatchNorm's input).
pub fn maxpool_backward_shuffled(
    gpu: &Gpu,
    g: &PoolGeom,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    shuffle: usize,
    input_bn: Option<BnForm<'_>>,
) -> Result<Op> {
    const K: &str = "maxpool_backward";
    g.validate(K)?;
    let (i, o) = (g.input_shape(), g.output_shape());
    check(
        K,
        &[
            ("x", x, &i, DType::F32),
            ("dy", dy, &o, DType::F32),
            ("dx", dx, &i, DType::F32),
        ],
    )?;
    let ep = MaxPoolEpilogue {
        shuffle,
        quantize: None,
    };
    let (p, table) = with_input_bn(gpu, K, g, ep.params(K, g)?, input_bn)?;
    MAX_BACKWARD.launch(
        gpu,
        &[],
        label(&format!("{K}{}{}", ep.describe(), through(input_bn)), g),
        &p,
        &[x, dy, dx, &table],
        elementwise_grid(gpu, dx.numel() as u32),
    )
}

/// Window means, padding counted (divisor kh·kw).
pub fn avgpool_forward(gpu: &Gpu, g: &PoolGeom, x: &Tensor, y: &Tensor) -> Result<Op> {
    const K: &str = "avgpool_forward";
    g.validate(K)?;
    check(
        K,
        &[
            ("x", x, &g.input_shape(), DType::F32),
            ("y", y, &g.output_shape(), DType::F32),
        ],
    )?;
    AVG_FORWARD.launch(
        gpu,
        &[],
        label(K, g),
        &params(g),
        &[x, y],
        elementwise_grid(gpu, y.numel() as u32),
    )
}

pub fn avgpool_backward(gpu: &Gpu, g: &PoolGeom, dy: &Tensor, dx: &Tensor) -> Result<Op> {
    const K: &str = "avgpool_backward";
    g.validate(K)?;
    check(
        K,
        &[
            ("dy", dy, &g.output_shape(), DType::F32),
            ("dx", dx, &g.input_shape(), DType::F32),
        ],
    )?;
    AVG_BACKWARD.launch(
        gpu,
        &[],
        label(K, g),
        &params(g),
        &[dy, dx],
        elementwise_grid(gpu, dx.numel() as u32),
    )
}

/// micronet's channel shuffle of `(N, C, H, W)` in `groups`; `inverse` undoes it (the backward).
pub fn channel_shuffle(
    gpu: &Gpu,
    groups: usize,
    inverse: bool,
    x: &Tensor,
    y: &Tensor,
) -> Result<Op> {
    const K: &str = "channel_shuffle";
    let s = x.shape();
    if s.len() != 4 || groups == 0 || !s[1].is_multiple_of(groups) {
        return Err(Error::shape(
            K,
            format!("cannot shuffle {s:?} in {groups} groups"),
        ));
    }
    check(K, &[("x", x, s, DType::F32), ("y", y, s, DType::F32)])?;
    let g = PoolGeom {
        n: s[0],
        c: s[1],
        h: s[2],
        w: s[3],
        kernel: (1, 1),
        stride: (1, 1),
        padding: (0, 0),
    };
    g.validate(K)?;
    let p = Params {
        groups: groups as u32,
        inverse: inverse as u32,
        ..params(&g)
    };
    SHUFFLE.launch(
        gpu,
        &[],
        format!(
            "{K} {s:?} g{groups}{}",
            if inverse { " inverse" } else { "" }
        ),
        &p,
        &[x, y],
        elementwise_grid(gpu, x.numel() as u32),
    )
}
