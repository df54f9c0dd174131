//! Reference conv_transpose2d in f64, from PyTorch's definition (a scatter): input pixel
//! `x[n, ci, iy, ix]` adds `x · w[ci, co, ky, kx]` to `y[n, g·Cout/G + co, iy·s − p + ky·d, ...]`
//! with g = ci / (Cin/G). Written independently of the convolution it is the adjoint of.

use crate::kernels::conv_transpose2d::ConvTranspose2dGeom;

/// Calls `f(x_index, w_index, y_index)` for every multiply of the forward pass.
pub fn for_each_tap(g: &ConvTranspose2dGeom, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = g.out_hw();
    let (cig, cog) = (g.cin / g.groups, g.cout / g.groups);
    let (kh, kw) = g.kernel;
    for n in 0..g.batch {
        for ci in 0..g.cin {
            let grp = ci / cig;
            for iy in 0..g.h {
                for ix in 0..g.w {
                    let xi = ((n * g.cin + ci) * g.h + iy) * g.w + ix;
                    for co in 0..cog {
                        for ky in 0..kh {
                            let oy = (iy * g.stride.0 + ky * g.dilation.0) as isize
                                - g.padding.0 as isize;
                            if oy < 0 || oy >= oh as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ox = (ix * g.stride.1 + kx * g.dilation.1) as isize
                                    - g.padding.1 as isize;
                                if ox < 0 || ox >= ow as isize {
                                    continue;
                                }
                                let wi = ((ci * cog + co) * kh + ky) * kw + kx;
                                let yi = ((n * g.cout + grp * cog + co) * oh + oy as usize) * ow
                                    + ox as usize;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn forward(g: &ConvTranspose2dGeom, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let [_, c, oh, ow] = g.output_shape();
    let mut y = vec![0.0; g.batch * c * oh * ow];
    if let Some(b) = bias {
        for (i, v) in y.iter_mut().enumerate() {
            *v = b[(i / (oh * ow)) % c];
        }
    }
    for_each_tap(g, |xi, wi, yi| y[yi] += x[xi] * w[wi]);
    y
}

pub fn grad_input(g: &ConvTranspose2dGeom, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; g.input_shape().iter().product()];
    for_each_tap(g, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
    dx
}

pub fn grad_weight(g: &ConvTranspose2dGeom, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let mut dw = vec![0.0; g.weight_shape().iter().product()];
    for_each_tap(g, |xi, wi, yi| dw[wi] += x[xi] * dy[yi]);
    dw
}

pub fn grad_bias(g: &ConvTranspose2dGeom, dy: &[f64]) -> Vec<f64> {
    let [_, c, oh, ow] = g.output_shape();
    let mut db = vec![0.0; c];
    for (i, v) in dy.iter().enumerate() {
        db[(i / (oh * ow)) % c] += v;
    }
    db
}
