//! Reference Linear in f64: `y = x·wᵀ + b`, `x: (B, I)`, `w: (O, I)`.

use crate::kernels::matmul::LinearGeom;

pub fn forward(g: &LinearGeom, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (bn, i, o) = (g.batch, g.in_features, g.out_features);
    let mut y = vec![0.0; bn * o];
    for r in 0..bn {
        for c in 0..o {
            let dot: f64 = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum();
            y[r * o + c] = dot + bias.map_or(0.0, |b| b[c]);
        }
    }
    y
}

/// `dx = dy·w`.
pub fn grad_input(g: &LinearGeom, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let (bn, i, o) = (g.batch, g.in_features, g.out_features);
    let mut dx = vec![0.0; bn * i];
    for r in 0..bn {
        for k in 0..i {
            dx[r * i + k] = (0..o).map(|c| dy[r * o + c] * w[c * i + k]).sum();
        }
    }
    dx
}

/// `dw = dyᵀ·x`.
pub fn grad_weight(g: &LinearGeom, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let (bn, i, o) = (g.batch, g.in_features, g.out_features);
    let mut dw = vec![0.0; o * i];
    for c in 0..o {
        for k in 0..i {
            dw[c * i + k] = (0..bn).map(|r| dy[r * o + c] * x[r * i + k]).sum();
        }
    }
    dw
}

pub fn grad_bias(g: &LinearGeom, dy: &[f64]) -> Vec<f64> {
    let o = g.out_features;
    (0..o)
        .map(|c| (0..g.batch).map(|r| dy[r * o + c]).sum())
        .collect()
}
