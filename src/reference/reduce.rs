//! Reference of `shaders/reduce.wgsl`.

/// `out[c] = Σ_{n,s} x[n, c, s]` for `x` of shape `(n, c, s)`.
pub fn channel_sum(x: &[f32], n: usize, c: usize, s: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; c];
    for b in 0..n {
        for (ch, o) in out.iter_mut().enumerate() {
            let base = (b * c + ch) * s;
            *o += x[base..base + s].iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    out
}
