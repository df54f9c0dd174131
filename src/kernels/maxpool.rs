//! `shaders/maxpool.wgsl`: max-pool forward and backward, with the layers around it fused (the
//! BatchNorm before it, the shuffle and activation quantizer after it). The layer's geometry is
//! pipeline constants: one pipeline per layer and direction.

use super::norm::BnForm;
use super::pool::{PoolGeom, check, label};
use super::{Entry, MAXPOOL, count_u32, elementwise_grid};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use crate::quant::Bits;
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &MAXPOOL,
        name,
        used,
    }
}

const FORWARD: Entry = entry("maxpool_forward", &[(1, R), (2, W), (7, R)]);
const BACKWARD: Entry = entry("maxpool_backward", &[(1, R), (4, R), (6, W), (7, R)]);
const BACKWARD_BANDED: Entry = entry(
    "maxpool_backward_banded",
    &[(1, R), (4, R), (6, W), (7, R), (8, W)],
);
/// maxpool.wgsl's WIN_CAP: the windows one workgroup of maxpool_backward_banded may cover.
const WIN_CAP: usize = 2048;
/// maxpool.wgsl's PACK_CAP: the planes one workgroup of maxpool_backward_banded may pack.
const PACK_CAP: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    planes: u32,
    _pad: [u32; 3],
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

/// The pipeline constants of a max-pool layer: its geometry, what is fused around it, and the
/// table to bind (a placeholder without a BatchNorm).
fn layer(
    gpu: &Gpu,
    kernel: &str,
    g: &PoolGeom,
    ep: MaxPoolEpilogue,
    input_bn: Option<BnForm<'_>>,
) -> Result<(Vec<(&'static str, f64)>, Tensor)> {
    g.validate(kernel)?;
    if ep.shuffle == 0 || !g.c.is_multiple_of(ep.shuffle) {
        return Err(Error::shape(
            kernel,
            format!("cannot shuffle {} channels in {} groups", g.c, ep.shuffle),
        ));
    }
    let (oh, ow) = g.out_hw();
    let mut c: Vec<(&'static str, f64)> = vec![
        ("H", g.h as f64),
        ("W", g.w as f64),
        ("OH", oh as f64),
        ("OW", ow as f64),
        ("KH", g.kernel.0 as f64),
        ("KW", g.kernel.1 as f64),
        ("SH", g.stride.0 as f64),
        ("SW", g.stride.1 as f64),
        ("PH", g.padding.0 as f64),
        ("PW", g.padding.1 as f64),
        ("C", g.c as f64),
        ("OUT_SHUFFLE", ep.shuffle as f64),
    ];
    if let Some(b) = ep.quantize.filter(|b| !b.is_float()) {
        c.push(("QUANTIZE", 1.0));
        c.push(("ACT_LEVELS", f64::from(b.levels() as f32)));
        c.push(("ACT_INV_LEVELS", f64::from(b.inv_levels())));
    }
    let Some(bn) = input_bn else {
        return Ok((c, gpu.zeros("no BatchNorm table", &[1], DType::F32)?));
    };
    bn.check(kernel, g.c)?;
    c.push(("IN_BN", 1.0));
    c.push(("IN_ACT", f64::from(bn.act.code())));
    c.push(("IN_SHUFFLE", bn.shuffle as f64));
    Ok((c, bn.table.clone()))
}

fn params(g: &PoolGeom) -> Params {
    Params {
        planes: (g.n * g.c) as u32,
        _pad: [0; 3],
    }
}

fn describe(kernel: &str, g: &PoolGeom, ep: MaxPoolEpilogue, input_bn: Option<BnForm>) -> String {
    let through = if input_bn.is_some() {
        " through bn"
    } else {
        ""
    };
    label(&format!("{kernel}{}{through}", ep.describe()), g)
}

/// `y` = window maxima.
pub fn maxpool_forward(gpu: &Gpu, g: &PoolGeom, x: &Tensor, y: &Tensor) -> Result<Op> {
    maxpool_forward_fused(gpu, g, x, y, MaxPoolEpilogue::default(), None)
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
    let (constants, table) = layer(gpu, K, g, ep, input_bn)?;
    let (i, o) = (g.input_shape(), g.output_shape());
    check(K, &[("x", x, &i, DType::F32), ("y", y, &o, DType::F32)])?;
    FORWARD.launch(
        gpu,
        &constants,
        describe(K, g, ep, input_bn),
        &params(g),
        &[x, y, &table],
        elementwise_grid(gpu, y.numel() as u32),
    )
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
/// Each workgroup finds the maxima of the windows over a band of rows once
/// (`maxpool_backward_banded`); rows too wide for that fall back to finding them per element.
pub fn maxpool_backward_shuffled(
    gpu: &Gpu,
    g: &PoolGeom,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    shuffle: usize,
    input_bn: Option<BnForm<'_>>,
) -> Result<Op> {
    maxpool_backward_with_sums(gpu, g, (x, dy, dx), shuffle, input_bn, None)
}

/// [`maxpool_backward_shuffled`] that, given `bn_sums`, also forms the sums of the backward of
/// the BatchNorm `input_bn` forms (whose output gradient is `dx`): `(tiles, 2, C)` for
/// [`bn_sum_tiles`] tiles (a plane's band each), which `norm::backward_merge` adds up instead
/// of that BatchNorm reducing its input and `dx`. Only where [`bn_sum_tiles`] has them.
pub fn maxpool_backward_with_sums(
    gpu: &Gpu,
    g: &PoolGeom,
    (x, dy, dx): (&Tensor, &Tensor, &Tensor),
    shuffle: usize,
    input_bn: Option<BnForm<'_>>,
    bn_sums: Option<&Tensor>,
) -> Result<Op> {
    const K: &str = "maxpool_backward";
    let ep = MaxPoolEpilogue {
        shuffle,
        quantize: None,
    };
    let (mut constants, table) = layer(gpu, K, g, ep, input_bn)?;
    let (i, o) = (g.input_shape(), g.output_shape());
    check(
        K,
        &[
            ("x", x, &i, DType::F32),
            ("dy", dy, &o, DType::F32),
            ("dx", dx, &i, DType::F32),
        ],
    )?;
    let mut label = describe(K, g, ep, input_bn);
    if let Some(sums) = bn_sums {
        let Some(tiles) = bn_sum_tiles(g).filter(|_| input_bn.is_some()) else {
            return Err(Error::shape(
                K,
                "only the banded backward through a BatchNorm forms that BatchNorm's sums",
            ));
        };
        if sums.numel() < 2 * tiles * g.c {
            return Err(Error::shape(
                K,
                format!(
                    "{} floats for BatchNorm backward sums, {} needed",
                    sums.numel(),
                    2 * tiles * g.c
                ),
            ));
        }
        constants.push(("BN_SUMS", 1.0));
        label += " +bn sums";
    }
    let Some(band_rows) = backward_band_rows(g) else {
        let grid = elementwise_grid(gpu, dx.numel() as u32);
        let tensors = [x, dy, dx, &table];
        return BACKWARD.launch(gpu, &constants, label, &params(g), &tensors, grid);
    };
    let no_sums = gpu.zeros("no BatchNorm sums", &[1], DType::F32)?;
    let tensors = [x, dy, dx, &table, bn_sums.unwrap_or(&no_sums)];
    let bands = g.h.div_ceil(band_rows);
    let plane_pack = backward_plane_pack(g, bands);
    constants.extend([
        ("BAND_ROWS", band_rows as f64),
        ("BANDS", bands as f64),
        ("PLANE_PACK", plane_pack as f64),
    ]);
    let workgroups = count_u32(K, (g.n * g.c).div_ceil(plane_pack) * bands)?;
    let grid = grid_1d(workgroups, gpu.limits.max_compute_workgroups_per_dimension);
    BACKWARD_BANDED.launch(gpu, &constants, label, &params(g), &tensors, grid)
}

/// The output windows along one axis that contain input index `i`, as lib/window.wgsl's
/// `window_range`: `lo..hi`, empty where floor mode leaves `i` out.
fn window_range(i: usize, k: usize, s: usize, pad: usize, n_out: usize) -> (usize, usize) {
    let top = i + pad;
    let hi = (top / s).min(n_out - 1);
    let lo = if top + 1 > k {
        (top + 1 - k).div_ceil(s)
    } else {
        0
    };
    (lo, hi + 1)
}

/// Input rows per band of `maxpool_backward_banded`: the most for which the windows covering
/// every band fit its `WIN_CAP`; `None` where not even one row's do (very wide rows).
fn backward_band_rows(g: &PoolGeom) -> Option<usize> {
    let (oh, ow) = g.out_hw();
    let rows = |i: usize| window_range(i, g.kernel.0, g.stride.0, g.padding.0, oh);
    let fits = |r: usize| {
        (0..g.h).step_by(r).all(|iy0| {
            let (lo, _) = rows(iy0);
            let (_, hi) = rows((iy0 + r).min(g.h) - 1);
            hi.saturating_sub(lo) * ow <= WIN_CAP
        })
    };
    (1..=g.h).rev().find(|&r| fits(r))
}

/// Whole planes per workgroup of `maxpool_backward_banded` where a plane is one band: as many
/// as bring it to about 8 input elements per invocation, within `WIN_CAP` windows and
/// `PACK_CAP` planes, rounded down to a power of two.
fn backward_plane_pack(g: &PoolGeom, bands: usize) -> usize {
    if bands > 1 {
        return 1;
    }
    let (oh, ow) = g.out_hw();
    let pack = (WIN_CAP / (oh * ow))
        .min(2048 / (g.h * g.w))
        .clamp(1, PACK_CAP);
    // A power of two: the workgroup's invocations split evenly between the planes.
    1 << pack.ilog2()
}

/// The tiles (a band of one plane each, per channel: batch × bands) of the BatchNorm backward
/// sums the backward can form through a BatchNorm ([`maxpool_backward_with_sums`]); `None`
/// where rows are too wide for bands.
pub fn bn_sum_tiles(g: &PoolGeom) -> Option<usize> {
    backward_band_rows(g).map(|rows| g.n * g.h.div_ceil(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, w: usize, k: usize, s: usize, p: usize) -> PoolGeom {
        PoolGeom {
            n: 1,
            c: 1,
            h,
            w,
            kernel: (k, k),
            stride: (s, s),
            padding: (p, p),
        }
    }

    /// The windows covering each band, counted one by one as the backward visits them.
    fn windows_per_band(g: &PoolGeom, rows: usize) -> Vec<usize> {
        let (oh, ow) = g.out_hw();
        (0..g.h)
            .step_by(rows)
            .map(|iy0| {
                let covering = (0..oh).filter(|&oy| {
                    let top = (oy * g.stride.0) as isize - g.padding.0 as isize;
                    let bottom = top + g.kernel.0 as isize;
                    top < (iy0 + rows).min(g.h) as isize && bottom > iy0 as isize
                });
                covering.count() * ow
            })
            .collect()
    }

    #[test]
    fn backward_bands_are_as_tall_as_the_window_buffer_allows() {
        // NIN's pools: a whole plane per band, several planes per workgroup.
        for (g, pack) in [
            (geom(32, 32, 3, 2, 1), 2),
            (geom(16, 16, 2, 2, 0), 8),
            // 5 planes would fit: rounded down to a power of two.
            (geom(20, 20, 2, 2, 0), 4),
        ] {
            assert_eq!(backward_band_rows(&g), Some(g.h));
            assert_eq!(backward_plane_pack(&g, 1), pack);
        }
        for g in [
            geom(300, 70, 3, 2, 1),
            geom(1000, 100, 2, 3, 0),
            geom(999, 600, 3, 1, 1),
            geom(5, 2000, 3, 2, 1),
        ] {
            let rows = backward_band_rows(&g).expect("a band fits");
            let bands = windows_per_band(&g, rows);
            assert!(bands.iter().all(|&n| n <= WIN_CAP), "{g:?}: {bands:?}");
            let taller = windows_per_band(&g, rows + 1);
            assert!(rows == g.h || taller.iter().any(|&n| n > WIN_CAP), "{g:?}");
        }
        // One window row is 2,100 windows: no band fits.
        assert_eq!(backward_band_rows(&geom(3, 4200, 3, 2, 1)), None);
    }
}
