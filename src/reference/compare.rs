//! Comparing GPU output with a reference: max absolute and relative error, and a pass/fail
//! against a stated tolerance.

/// An element passes when `|got - want| <= atol + rtol * |want|`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// Bit-for-bit equality.
    pub const EXACT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };

    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }
}

/// The outcome of a comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub n: usize,
    pub max_abs: f64,
    /// Largest `|got - want| / |want|` over elements with `|want| > atol` (relative error of
    /// values near zero means nothing).
    pub max_rel: f64,
    /// Index of the element with the largest excess over the tolerance (or largest error).
    pub worst: usize,
    pub worst_got: f64,
    pub worst_want: f64,
    /// Elements outside the tolerance (a NaN on one side only counts).
    pub failures: usize,
    /// Set when the lengths differ.
    pub length_mismatch: Option<(usize, usize)>,
    pub tolerance: Tolerance,
    /// FNV-1a of the bits of every value got: equal digests, identical outputs (for comparing
    /// two runs of one case bit for bit).
    pub got_digest: u64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures == 0 && self.length_mismatch.is_none()
    }

    /// One line: pass/fail, max errors, worst element.
    pub fn summary(&self) -> String {
        if let Some((g, w)) = self.length_mismatch {
            return format!("FAIL: {g} values, expected {w}");
        }
        format!(
            "{}: n={} max_abs={:.3e} max_rel={:.3e} failures={} worst[{}] got {} want {} (atol {:.1e}, rtol {:.1e})",
            if self.passed() { "ok" } else { "FAIL" },
            self.n,
            self.max_abs,
            self.max_rel,
            self.failures,
            self.worst,
            self.worst_got,
            self.worst_want,
            self.tolerance.atol,
            self.tolerance.rtol,
        )
    }
}

/// Compares `got` with `want` element by element.
pub fn compare(got: &[f32], want: &[f64], tol: Tolerance) -> Report {
    let mut r = Report {
        n: want.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        worst: 0,
        worst_got: 0.0,
        worst_want: 0.0,
        failures: 0,
        length_mismatch: (got.len() != want.len()).then_some((got.len(), want.len())),
        tolerance: tol,
        got_digest: got
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            }),
    };
    let mut worst_excess = f64::NEG_INFINITY;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let (err, ok) = if g.is_nan() || w.is_nan() {
            let both = g.is_nan() && w.is_nan();
            (if both { 0.0 } else { f64::INFINITY }, both)
        } else if g == w {
            (0.0, true) // also equal infinities
        } else {
            let e = (g - w).abs();
            (e, e <= tol.atol + tol.rtol * w.abs())
        };
        if !ok {
            r.failures += 1;
        }
        r.max_abs = r.max_abs.max(err);
        if w.abs() > tol.atol && w.abs() > 0.0 {
            r.max_rel = r.max_rel.max(err / w.abs());
        }
        let excess = err - (tol.atol + tol.rtol * w.abs());
        if excess > worst_excess {
            worst_excess = excess;
            r.worst = i;
            r.worst_got = g;
            r.worst_want = w;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_failures_and_reports_errors() {
        let r = compare(&[1.0, 2.0, 3.5], &[1.0, 2.0, 3.0], Tolerance::new(0.1, 0.0));
        assert!(!r.passed());
        assert_eq!(r.failures, 1);
        assert_eq!(r.worst, 2);
        assert!((r.max_abs - 0.5).abs() < 1e-12);
        let r = compare(&[1.0, 2.05], &[1.0, 2.0], Tolerance::new(0.0, 0.05));
        assert!(r.passed(), "{}", r.summary());
    }

    #[test]
    fn nan_on_one_side_fails_and_lengths_must_match() {
        assert!(!compare(&[f32::NAN], &[0.0], Tolerance::new(1.0, 1.0)).passed());
        assert!(compare(&[f32::NAN], &[f64::NAN], Tolerance::EXACT).passed());
        assert!(!compare(&[1.0], &[1.0, 2.0], Tolerance::EXACT).passed());
    }
}
