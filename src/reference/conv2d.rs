//! Reference conv2d in f64, straight from the definition
//! `y[n,co,oy,ox] = b[co] + Σ_{ci,ky,kx} x[n, g·Cin/G + ci, oy·s − p + ky·d, ox·s − p + kx·d] · w[co,ci,ky,kx]`
//! with g = co / (Cout/G). Every direction visits the same (x, w, y) index triples.

use crate::kernels::conv2d::Conv2dGeom;

/// Calls `f(x_index, w_index, y_index)` for every multiply of the forward pass.
pub fn for_each_tap(g: &Conv2dGeom, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = g.out_hw();
    let (cig, cog) = (g.cin / g.groups, g.cout / g.groups);
    let (kh, kw) = g.kernel;
    for n in 0..g.batch {
        for co in 0..g.cout {
            let grp = co / cog;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * g.cout + co) * oh + oy) * ow + ox;
                    for ci in 0..cig {
                        for ky in 0..kh {
                            let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize
                                - g.padding.0 as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * g.stride.1 + kx * g.dilation.1) as isize
                                    - g.padding.1 as isize;
                                if ix < 0 || ix >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.cin + grp * cig + ci) * g.h + iy as usize) * g.w
                                    + ix as usize;
                                let wi = ((co * cig + ci) * kh + ky) * kw + kx;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn forward(g: &Conv2dGeom, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
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

pub fn grad_input(g: &Conv2dGeom, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; g.input_shape().iter().product()];
    for_each_tap(g, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
    dx
}

pub fn grad_weight(g: &Conv2dGeom, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let mut dw = vec![0.0; g.weight_shape().iter().product()];
    for_each_tap(g, |xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
    dw
}

pub fn grad_bias(g: &Conv2dGeom, dy: &[f64]) -> Vec<f64> {
    let [_, c, oh, ow] = g.output_shape();
    let mut db = vec![0.0; c];
    for (i, v) in dy.iter().enumerate() {
        db[(i / (oh * ow)) % c] += v;
    }
    db
}
