//! Reference BatchNorm2d (f64) over `(N, C, S)`, PyTorch semantics, optional fused ReLU.

/// Train-mode forward: `(y, mean, biased var)`; the caller updates running stats with
/// [`running_update`].
pub fn forward_train(
    x: &[f64],
    (n, c, s): (usize, usize, usize),
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
    relu: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let count = (n * s) as f64;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let vals = || (0..n).flat_map(move |b| (0..s).map(move |j| (b * c + ch) * s + j));
        mean[ch] = vals().map(|i| x[i]).sum::<f64>() / count;
        var[ch] = vals().map(|i| (x[i] - mean[ch]).powi(2)).sum::<f64>() / count;
    }
    let y = apply(x, (n, c, s), &mean, &var, gamma, beta, eps, relu);
    (y, mean, var)
}

/// `y = γ (x − mean)/sqrt(var + eps) + β` (then ReLU).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    x: &[f64],
    (_, c, s): (usize, usize, usize),
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
    relu: bool,
) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / s) % c;
            let y = gamma[ch] * (v - mean[ch]) / (var[ch] + eps).sqrt() + beta[ch];
            if relu { y.max(0.0) } else { y }
        })
        .collect()
}

/// Running statistics after one train step: momentum toward the mean and the unbiased variance.
pub fn running_update(
    rm: &[f64],
    rv: &[f64],
    mean: &[f64],
    var_biased: &[f64],
    count: usize,
    momentum: f64,
) -> (Vec<f64>, Vec<f64>) {
    let k = count as f64 / (count.max(2) - 1) as f64;
    let m = rm
        .iter()
        .zip(mean)
        .map(|(r, m)| (1.0 - momentum) * r + momentum * m)
        .collect();
    let v = rv
        .iter()
        .zip(var_biased)
        .map(|(r, v)| (1.0 - momentum) * r + momentum * v * k)
        .collect();
    (m, v)
}

/// Train-mode backward: `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f64],
    y: &[f64],
    dy: &[f64],
    (n, c, s): (usize, usize, usize),
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    eps: f64,
    relu: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let count = (n * s) as f64;
    let g: Vec<f64> = dy
        .iter()
        .zip(y)
        .map(|(&d, &y)| if relu && y <= 0.0 { 0.0 } else { d })
        .collect();
    let xhat = |i: usize| (x[i] - mean[(i / s) % c]) / (var[(i / s) % c] + eps).sqrt();
    let mut dgamma = vec![0.0; c];
    let mut dbeta = vec![0.0; c];
    for (i, gi) in g.iter().enumerate() {
        let ch = (i / s) % c;
        dbeta[ch] += gi;
        dgamma[ch] += gi * xhat(i);
    }
    let dx = (0..x.len())
        .map(|i| {
            let ch = (i / s) % c;
            let invstd = 1.0 / (var[ch] + eps).sqrt();
            gamma[ch] * invstd / count * (count * g[i] - dbeta[ch] - xhat(i) * dgamma[ch])
        })
        .collect();
    (dx, dgamma, dbeta)
}
