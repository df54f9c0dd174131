//! Binary and ternary networks as micronet's `compression/quantization/wbwtab` trains them
//! (`spec/micronet-iao-wbwtab.md` §6): the options, and the weight and activation quantizers'
//! forward and backward over one output channel, in f32 as PyTorch computes them. The GPU
//! kernels (`shaders/wbwtab.wgsl`) are tested against these, and these against the spec's
//! vectors.

use serde::{Deserialize, Serialize};

/// micronet's `--W`: 2 binary (±α), 3 ternary (−α, 0, +α), 32 float.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    #[default]
    Binary,
    Ternary,
    Float,
}

/// micronet's `--A`: 2 binary (sign, replacing the ReLUs between the first and last conv), 32
/// float (ReLU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    #[default]
    Binary,
    Float,
}

/// The wbwtab scheme's options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WbwtabOptions {
    pub weights: Weights,
    pub activations: Activations,
}

/// `B(v)`: sign with 0 → +1.
pub fn sign_pos(v: f32) -> f32 {
    if v < 0.0 { -1.0 } else { 1.0 }
}

/// `sgn(v)` with sgn(0) = 0 (torch.sign).
pub fn sgn(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Binary activation: `y = B(x)`.
pub fn act_forward(x: f32) -> f32 {
    sign_pos(x)
}

/// Its straight-through gradient: `g` where −1 < x < 1 (exclusive), else 0.
pub fn act_backward(x: f32, g: f32) -> f32 {
    if x > -1.0 && x < 1.0 { g } else { 0.0 }
}

/// Binary weights, step 1, on the latent weights in place: per output channel and kernel
/// position, subtract the mean over input channels, then clamp to [−1, 1]. `w` is one output
/// channel, `(cin, spatial)` row-major.
pub fn binary_centre(w: &mut [f32], cin: usize) {
    let spatial = w.len() / cin;
    for s in 0..spatial {
        let mut sum = 0.0f32;
        for c in 0..cin {
            sum += w[c * spatial + s];
        }
        let mean = sum / cin as f32;
        for c in 0..cin {
            let v = &mut w[c * spatial + s];
            *v = (*v - mean).clamp(-1.0, 1.0);
        }
    }
}

/// α of one output channel: mean |w| (binary).
pub fn binary_alpha(w: &[f32]) -> f32 {
    w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32
}

/// Binary weights of one (centred) output channel: `ŵ = B(w)·α`.
pub fn binary_forward(w: &[f32]) -> Vec<f32> {
    let a = binary_alpha(w);
    w.iter().map(|&v| sign_pos(v) * a).collect()
}

/// `dL/dw_j = α·G_j + sgn(w_j)/n · Σ_k G_k·B(w_k)` (α's own gradient included).
pub fn binary_backward(w: &[f32], g: &[f32]) -> Vec<f32> {
    let a = binary_alpha(w);
    let s: f32 = w.iter().zip(g).map(|(&v, &gk)| gk * sign_pos(v)).sum();
    let n = w.len() as f32;
    w.iter()
        .zip(g)
        .map(|(&v, &gj)| a * gj + sgn(v) / n * s)
        .collect()
}

/// Ternary threshold and α of one output channel: Δ = 0.7·mean|w|, α the mean |w| over
/// |w| > Δ (strictly), and how many those are. All zero: α = 0/0 (NaN), as micronet's.
pub fn ternary_params(w: &[f32]) -> (f32, f32, usize) {
    let delta = 0.7 * (w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32);
    let (sum, cnt) = w
        .iter()
        .filter(|v| v.abs() > delta)
        .fold((0.0f32, 0usize), |(s, c), v| (s + v.abs(), c + 1));
    (delta, sum / cnt as f32, cnt)
}

/// `t = sign(sign(w + Δ) + sign(w − Δ))`: +1 for w ≥ Δ, −1 for w ≤ −Δ, else 0.
pub fn ternary_code(v: f32, delta: f32) -> f32 {
    sgn(sgn(v + delta) + sgn(v - delta))
}

/// Ternary weights of one output channel: `ŵ = t·α`.
pub fn ternary_forward(w: &[f32]) -> Vec<f32> {
    let (delta, a, _) = ternary_params(w);
    w.iter().map(|&v| ternary_code(v, delta) * a).collect()
}

/// `dL/dw_j = α·G_j + sgn(w_j)·1[|w_j| > Δ]/cnt · Σ_k G_k·t_k`.
pub fn ternary_backward(w: &[f32], g: &[f32]) -> Vec<f32> {
    let (delta, a, cnt) = ternary_params(w);
    let s: f32 = w
        .iter()
        .zip(g)
        .map(|(&v, &gk)| gk * ternary_code(v, delta))
        .sum();
    w.iter()
        .zip(g)
        .map(|(&v, &gj)| {
            let inside = if v.abs() > delta { 1.0 } else { 0.0 };
            a * gj + sgn(v) * inside / cnt as f32 * s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The spec's test vectors (§6.1–§6.3), verified there against micronet on torch 2.11.
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn binary_activation_vector() {
        let x = [-1.5, -1.0, -0.999, -0.3, 0.0, 0.3, 0.999, 1.0, 2.0];
        let y: Vec<f32> = x.iter().map(|&v| act_forward(v)).collect();
        assert_eq!(y, [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let g: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| act_backward(v, (i + 1) as f32))
            .collect();
        assert_eq!(g, [0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0, 0.0]);
    }

    /// w (2,2,1,2) = [0.9, −0.2, 0.1, −1.6 | −0.3, 0.05, 0.5, 0], G = [1..8].
    const W: [f32; 8] = [0.9, -0.2, 0.1, -1.6, -0.3, 0.05, 0.5, 0.0];
    const G: [f32; 8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];

    #[test]
    fn binary_weight_vector() {
        let mut w = W;
        for o in 0..2 {
            binary_centre(&mut w[o * 4..o * 4 + 4], 2);
        }
        close(&w, &[0.4, 0.7, -0.4, -0.7, -0.4, 0.025, 0.4, -0.025]);
        close(
            &[binary_alpha(&w[..4]), binary_alpha(&w[4..])],
            &[0.55, 0.2125],
        );
        let y: Vec<f32> = (0..2)
            .flat_map(|o| binary_forward(&w[o * 4..o * 4 + 4]))
            .collect();
        close(
            &y,
            &[0.55, 0.55, -0.55, -0.55, -0.2125, 0.2125, 0.2125, -0.2125],
        );
        let d: Vec<f32> = (0..2)
            .flat_map(|o| binary_backward(&w[o * 4..o * 4 + 4], &G[o * 4..o * 4 + 4]))
            .collect();
        close(&d, &[-0.45, 0.1, 2.65, 3.2, 1.0625, 1.275, 1.4875, 1.7]);
    }

    #[test]
    fn ternary_weight_vectors() {
        let (d0, a0, _) = ternary_params(&W[..4]);
        let (d1, a1, _) = ternary_params(&W[4..]);
        close(&[d0, d1, a0, a1], &[0.49, 0.14875, 1.25, 0.4]);
        let y: Vec<f32> = (0..2)
            .flat_map(|o| ternary_forward(&W[o * 4..o * 4 + 4]))
            .collect();
        close(&y, &[1.25, 0.0, 0.0, -1.25, -0.4, 0.0, 0.4, 0.0]);
        let d: Vec<f32> = (0..2)
            .flat_map(|o| ternary_backward(&W[o * 4..o * 4 + 4], &G[o * 4..o * 4 + 4]))
            .collect();
        close(&d, &[-0.25, 2.5, 3.75, 6.5, 1.0, 2.4, 3.8, 3.2]);
        // The tie: Δ is exactly 0.4375, the tied elements get ±α but stay out of α's mean.
        let tie = [0.4375, -0.4375, 0.8125, 0.8125];
        assert_eq!(ternary_params(&tie).0, 0.4375);
        close(&ternary_forward(&tie), &[0.8125, -0.8125, 0.8125, 0.8125]);
        close(
            &ternary_backward(&tie, &[1.0; 4]),
            &[0.8125, 0.8125, 1.8125, 1.8125],
        );
        // All zero: 0/0.
        assert!(ternary_forward(&[0.0; 4]).iter().all(|v| v.is_nan()));
    }
}
