//! Pooling geometry, and `shaders/pool.wgsl`: avg-pool (forward, backward) and channel shuffle.
//! Max-pool is [`super::maxpool`].

use super::{Entry, POOL, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &POOL,
        name,
        used,
    }
}

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

    pub(crate) fn validate(&self, kernel: &str) -> Result<()> {
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
    _pad: [u32; 2],
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
        _pad: [0; 2],
    }
}

pub(crate) fn check(kernel: &str, named: &[(&str, &Tensor, &[usize], DType)]) -> Result<()> {
    for (name, t, shape, dtype) in named {
        expect_dtype(kernel, name, t, *dtype)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(())
}

pub(crate) fn label(kernel: &str, g: &PoolGeom) -> String {
    format!(
        "{kernel} {:?} k{:?} s{:?} p{:?}",
        g.input_shape(),
        g.kernel,
        g.stride,
        g.padding
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
