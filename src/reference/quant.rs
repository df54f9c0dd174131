//! Reference of `shaders/quant.wgsl`: the spec's GPU-faithful formulas in exact f32 steps (Rust
//! never fuses multiply-add), the closed-form backward in f64, and the straight-through surrogates
//! in f64 for finite-difference checks.

use crate::quant::Bits;

/// Activation code `k = floor(fl32(clamp(fl32(0.1 x), 0, 1) · n) + 0.5)`.
pub fn act_code(x: f32, bits: Bits) -> f32 {
    let c = (x * 0.1f32).clamp(0.0, 1.0);
    (c * bits.levels() as f32 + 0.5).floor()
}

/// Activation quantizer forward (NaN kept; 32 bits: identity).
pub fn act_forward(x: &[f32], bits: Bits) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            if bits.is_float() || v.is_nan() {
                v
            } else {
                act_code(v, bits) * bits.inv_levels()
            }
        })
        .collect()
}

/// Activation quantizer backward: `0.1 · dy` where `0 <= fl32(0.1 x) <= 1`.
pub fn act_backward(x: &[f32], dy: &[f32], bits: Bits) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&x, &g)| {
            if bits.is_float() {
                return g;
            }
            let c = x * 0.1f32;
            if (0.0..=1.0).contains(&c) {
                0.1f32 * g
            } else {
                0.0
            }
        })
        .collect()
}

/// [`act_backward`] of a quantized layer applied to an f64 gradient (a reference GEMM's), the
/// mask taken from the f32 input as the kernels take it.
pub fn act_backward_f64(x: &[f32], dy: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .map(|(&x, &g)| {
            if (0.0..=1.0).contains(&(x * 0.1f32)) {
                0.1 * g
            } else {
                0.0
            }
        })
        .collect()
}

/// `max |t|` over the tensor.
pub fn absmax(t: &[f32]) -> f32 {
    t.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Weight code `k` of `t` given `m` (`u = 0.5` when `m = 0`, wgqat's definition).
pub fn weight_code(t: f32, m: f32, bits: Bits) -> f32 {
    let u = if m > 0.0 { (t * 0.5) / m + 0.5 } else { 0.5 };
    (u * bits.levels() as f32 + 0.5).floor()
}

/// `Ŵ = 2 · (k · fl32(1/n)) − 1`.
pub fn weight_value_of_code(k: f32, bits: Bits) -> f32 {
    2.0 * (k * bits.inv_levels()) - 1.0
}

/// Weight quantizer levels from `t = tanh(W)` (exact given t).
pub fn weight_forward_from_t(t: &[f32], bits: Bits) -> Vec<f32> {
    let m = absmax(t);
    t.iter()
        .map(|&v| {
            if v.is_nan() {
                v
            } else {
                weight_value_of_code(weight_code(v, m, bits), bits)
            }
        })
        .collect()
}

/// `tanh` as the shader applies it: exactly ±1 past |x| = 10, NaN kept.
pub fn tanh_safe(x: f32) -> f32 {
    if x.is_nan() {
        x
    } else {
        x.clamp(-10.0, 10.0).tanh()
    }
}

/// Weight quantizer forward: `(t, Ŵ)` (32 bits: `Ŵ = W`).
pub fn weight_forward(w: &[f32], bits: Bits) -> (Vec<f32>, Vec<f32>) {
    if bits.is_float() {
        return (w.to_vec(), w.to_vec());
    }
    let t: Vec<f32> = w.iter().map(|&v| tanh_safe(v)).collect();
    let w_hat = weight_forward_from_t(&t, bits);
    (t, w_hat)
}

/// Weight quantizer backward, closed form of spec §2.3 in f64, from `t` (f32, as stored) and the
/// upstream gradient `g = dL/dŴ`. The max gradient is split evenly over ties. `m = 0` gives 0.
pub fn weight_backward(t: &[f32], g: &[f32], bits: Bits) -> Vec<f64> {
    if bits.is_float() {
        return g.iter().map(|&v| v as f64).collect();
    }
    let m = absmax(t) as f64;
    if m <= 0.0 {
        return vec![0.0; t.len()];
    }
    let t64: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    closed_form(&t64, &g64, m, |a| a == m)
}

/// `dW_i = (1 − t_i²) [G_i/m − sgn(t_i) 1[|t_i| = m]/c · (Σ_j G_j t_j)/m²]`.
fn closed_form(t: &[f64], g: &[f64], m: f64, is_max: impl Fn(f64) -> bool) -> Vec<f64> {
    let s: f64 = t.iter().zip(g).map(|(t, g)| t * g).sum();
    let ties = t.iter().filter(|v| is_max(v.abs())).count() as f64;
    t.iter()
        .zip(g)
        .map(|(&t, &g)| {
            let mut dt = g / m;
            if is_max(t.abs()) {
                dt -= t.signum() * s / (m * m) / ties;
            }
            (1.0 - t * t) * dt
        })
        .collect()
}

/// Straight-through surrogates (Round replaced by the identity), in f64: what the STE gradients
/// are the exact derivatives of, away from rounding steps.
pub mod surrogate {
    /// `clamp(0.1 x, 0, 1)`.
    pub fn act(x: f64) -> f64 {
        (0.1 * x).clamp(0.0, 1.0)
    }

    /// `d act / dx · g`.
    pub fn act_backward(x: f64, g: f64) -> f64 {
        if (0.0..=1.0).contains(&(0.1 * x)) {
            0.1 * g
        } else {
            0.0
        }
    }

    /// `2 · ((tanh(w)/2)/m + 0.5) − 1`, i.e. `tanh(w)/m`.
    pub fn weight(w: &[f64]) -> Vec<f64> {
        let t: Vec<f64> = w.iter().map(|v| v.tanh()).collect();
        let m = t.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        t.iter()
            .map(|v| 2.0 * ((v / 2.0) / m + 0.5) - 1.0)
            .collect()
    }

    /// The closed-form backward of [`weight`] (what the shader computes), in f64.
    pub fn weight_backward(w: &[f64], g: &[f64]) -> Vec<f64> {
        let t: Vec<f64> = w.iter().map(|v| v.tanh()).collect();
        let m = t.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        super::closed_form(&t, g, m, |a| a == m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(b: u32) -> Bits {
        Bits::new(b).unwrap()
    }

    #[test]
    fn activation_levels_match_the_spec_table() {
        // spec §1.2, a_bits = 8, GPU-faithful column.
        let table = [
            (-1.0f32, 0.0f32),
            (0.0, 0.0),
            (0.001, 0.0),
            (0.5, 13.0),
            (0.0196, 0.0),
            (5.0, 128.0),
            (9.99, 255.0),
            (10.0, 255.0),
            (10.000_001, 255.0),
            (15.0, 255.0),
        ];
        for (x, k) in table {
            assert_eq!(act_code(x, bits(8)), k, "x = {x}");
            assert_eq!(act_forward(&[x], bits(8))[0], k * bits(8).inv_levels());
        }
    }

    #[test]
    fn activation_gradient_mask_is_inclusive_on_the_float_product() {
        let g = act_backward(&[10.0, 10.000_001, 0.0, -0.001, 5.0], &[1.0; 5], bits(8));
        assert_eq!(g, vec![0.1f32, 0.0, 0.1, 0.0, 0.1]);
    }

    #[test]
    fn weight_levels_match_the_spec_vectors() {
        let w = [0.3f32, -1.2, 0.9, 0.0, 0.7, -0.05];
        let (_, w_hat) = weight_forward(&w, bits(4));
        let want = [0.333333, -1.0, 0.866667, 0.066667, 0.733333, -0.066667];
        for (g, w) in w_hat.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{w_hat:?}");
        }
        // 0 is never a level; a zero weight maps to +1/n.
        let (_, w_hat) = weight_forward(&[0.0, 0.5, -2.0], bits(8));
        assert_eq!(w_hat[0], 2.0 * (128.0 * bits(8).inv_levels()) - 1.0);
        assert!(w_hat[0] > 0.0);
    }

    #[test]
    fn weight_gradient_matches_the_spec_vectors_with_and_without_ties() {
        let g = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
        let cases = [
            (
                [0.3f32, -1.2, 1.2, 0.0, 0.7, -0.05],
                [0.548871, 0.098991, 0.266892, 0.299884, -0.571045, 1.794816],
            ),
            (
                [0.3f32, -1.2, 0.9, 0.0, 0.7, -0.05],
                [0.548871, 0.460852, 1.168151, 0.299884, -0.571046, 1.794816],
            ),
        ];
        for (w, want) in cases {
            let (t, _) = weight_forward(&w, bits(4));
            let dw = weight_backward(&t, &g, bits(4));
            for (d, w) in dw.iter().zip(want) {
                assert!((d - w).abs() < 2e-6, "{dw:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn all_zero_weights_give_plus_one_over_n_and_zero_gradient() {
        let (t, w_hat) = weight_forward(&[0.0; 5], bits(4));
        assert!(
            w_hat
                .iter()
                .all(|&v| v == 2.0 * (8.0 * bits(4).inv_levels()) - 1.0)
        );
        assert_eq!(weight_backward(&t, &[1.0; 5], bits(4)), vec![0.0; 5]);
    }

    #[test]
    fn surrogate_gradients_pass_finite_difference_checks() {
        // Weights without ties; the loss is sum(g * surrogate(w)).
        let w = [0.3, -1.2, 0.9, 0.05, 0.7, -0.05, 1.1];
        let g = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5, -0.3];
        let loss = |w: &[f64]| -> f64 {
            surrogate::weight(w)
                .iter()
                .zip(&g)
                .map(|(a, b)| a * b)
                .sum()
        };
        let analytic = surrogate::weight_backward(&w, &g);
        let h = 1e-6;
        for j in 0..w.len() {
            let (mut wp, mut wm) = (w.to_vec(), w.to_vec());
            wp[j] += h;
            wm[j] -= h;
            let fd = (loss(&wp) - loss(&wm)) / (2.0 * h);
            assert!(
                (fd - analytic[j]).abs() < 1e-7,
                "w[{j}]: fd {fd} vs {}",
                analytic[j]
            );
        }
        for x in [-3.0, 0.5, 4.0, 9.5, 12.0] {
            let fd = (surrogate::act(x + 1e-6) - surrogate::act(x - 1e-6)) / 2e-6;
            assert!(
                (fd - surrogate::act_backward(x, 1.0)).abs() < 1e-8,
                "x = {x}"
            );
        }
    }
}
