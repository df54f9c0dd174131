//! Reference optimizer steps (f64), as torch.optim computes them.

/// One Adam step with coupled L2 at step `t` (from 1), updating `p`, `m`, `v` in place.
#[allow(clippy::too_many_arguments)]
pub fn adam(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    t: u32,
    lr: f64,
    (b1, b2, eps, wd): (f64, f64, f64, f64),
) {
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    for i in 0..p.len() {
        let g = g[i] + wd * p[i];
        m[i] += (1.0 - b1) * (g - m[i]);
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
    }
}

/// One SGD step at step `t` (from 1); `buf` is the momentum buffer.
#[allow(clippy::too_many_arguments)]
pub fn sgd(
    p: &mut [f64],
    g: &[f64],
    buf: &mut [f64],
    t: u32,
    lr: f64,
    (momentum, dampening, nesterov, wd): (f64, f64, bool, f64),
) {
    for i in 0..p.len() {
        let mut d = g[i] + wd * p[i];
        if momentum != 0.0 {
            buf[i] = if t == 1 {
                d
            } else {
                momentum * buf[i] + (1.0 - dampening) * d
            };
            d = if nesterov {
                d + momentum * buf[i]
            } else {
                buf[i]
            };
        }
        p[i] -= lr * d;
    }
}
