//! Reference pooling and channel shuffle (f64), PyTorch semantics.

use crate::kernels::pool::PoolGeom;

/// Calls `f(output_index, input_index)` for every in-bounds input of every window, row-major.
fn for_each_window(g: &PoolGeom, mut f: impl FnMut(usize, Option<usize>)) {
    let (oh, ow) = g.out_hw();
    for plane in 0..g.n * g.c {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = (plane * oh + oy) * ow + ox;
                f(o, None);
                for ky in 0..g.kernel.0 {
                    let iy = (oy * g.stride.0 + ky) as isize - g.padding.0 as isize;
                    for kx in 0..g.kernel.1 {
                        let ix = (ox * g.stride.1 + kx) as isize - g.padding.1 as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            f(o, Some((plane * g.h + iy as usize) * g.w + ix as usize));
                        }
                    }
                }
            }
        }
    }
}

/// `(y, argmax as the flat input index)`; ties go to the first maximum.
pub fn maxpool_forward(g: &PoolGeom, x: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let n_out: usize = g.output_shape().iter().product();
    let mut y = vec![f64::NEG_INFINITY; n_out];
    let mut arg = vec![usize::MAX; n_out];
    for_each_window(g, |o, i| {
        let Some(i) = i else { return };
        if arg[o] == usize::MAX || x[i] > y[o] {
            y[o] = x[i];
            arg[o] = i;
        }
    });
    (y, arg)
}

pub fn maxpool_backward(g: &PoolGeom, dy: &[f64], argmax: &[usize]) -> Vec<f64> {
    let mut dx = vec![0.0; g.input_shape().iter().product()];
    for (o, &i) in argmax.iter().enumerate() {
        dx[i] += dy[o];
    }
    dx
}

pub fn avgpool_forward(g: &PoolGeom, x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; g.output_shape().iter().product()];
    let area = (g.kernel.0 * g.kernel.1) as f64;
    for_each_window(g, |o, i| {
        if let Some(i) = i {
            y[o] += x[i] / area;
        }
    });
    y
}

pub fn avgpool_backward(g: &PoolGeom, dy: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; g.input_shape().iter().product()];
    let area = (g.kernel.0 * g.kernel.1) as f64;
    for_each_window(g, |o, i| {
        if let Some(i) = i {
            dx[i] += dy[o] / area;
        }
    });
    dx
}

/// micronet: view (N, g, C/g, H, W), transpose 1 and 2, view back. `inverse` undoes it.
pub fn channel_shuffle(
    x: &[f64],
    (n, c, hw): (usize, usize, usize),
    groups: usize,
    inverse: bool,
) -> Vec<f64> {
    let per = c / groups;
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for a in 0..groups {
            for k in 0..per {
                // forward: out channel k*g + a <- in channel a*per + k
                let (out_c, in_c) = (k * groups + a, a * per + k);
                let (dst, src) = if inverse {
                    (in_c, out_c)
                } else {
                    (out_c, in_c)
                };
                for j in 0..hw {
                    y[(b * c + dst) * hw + j] = x[(b * c + src) * hw + j];
                }
            }
        }
    }
    y
}
