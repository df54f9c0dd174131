//! Reference losses (f64).

/// Mean cross-entropy, `d loss / d logits`, and the number of rows whose first argmax is the label.
pub fn cross_entropy(logits: &[f64], labels: &[u32], classes: usize) -> (f64, Vec<f64>, usize) {
    let n = labels.len();
    let mut loss = 0.0;
    let mut grad = vec![0.0; logits.len()];
    let mut correct = 0;
    for (r, &label) in labels.iter().enumerate() {
        let z = &logits[r * classes..(r + 1) * classes];
        let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let arg = z.iter().position(|&v| v == zmax).unwrap_or(0);
        let sum: f64 = z.iter().map(|v| (v - zmax).exp()).sum();
        loss += zmax + sum.ln() - z[label as usize];
        for j in 0..classes {
            let p = (z[j] - zmax).exp() / sum;
            grad[r * classes + j] = (p - f64::from(u8::from(j == label as usize))) / n as f64;
        }
        correct += usize::from(arg == label as usize);
    }
    (loss / n as f64, grad, correct)
}

/// Mean squared error and its gradient.
pub fn mse(y: &[f64], target: &[f64]) -> (f64, Vec<f64>) {
    let n = y.len() as f64;
    let loss = y
        .iter()
        .zip(target)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / n;
    (
        loss,
        y.iter()
            .zip(target)
            .map(|(a, b)| 2.0 * (a - b) / n)
            .collect(),
    )
}
