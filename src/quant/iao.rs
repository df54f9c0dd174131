//! IAO (integer-arithmetic-only) quantization as micronet's `wqaq/iao` does it
//! (`spec/micronet-iao-wbwtab.md` §1): the options, the integer ranges, scale and zero point from
//! an observed range, the observers' update rules, and the fake quantizer's forward and
//! backward for one element. Every operation is the f32 one PyTorch performs, in its order, so
//! these scalar functions are bit-exact; the GPU kernels (`shaders/iao.wgsl`) are tested
//! against them, and they against the spec's test vectors.

use super::Bits;
use serde::{Deserialize, Serialize};

/// Symmetric (signed codes, zero point 0) or asymmetric (unsigned codes, a zero point).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    #[default]
    Symmetric,
    Asymmetric,
}

/// Weight scales per output channel (conv `C`, Linear `FC`) or one per layer (`L`).
/// Activations always have one scale per tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QLevel {
    #[default]
    Channel,
    Layer,
}

/// How a weight quantizer's range follows the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Observer {
    /// Running extremes: never shrink (micronet's `MinMaxObserver`).
    #[default]
    #[value(alias = "minmax")]
    #[serde(alias = "minmax")]
    MinMax,
    /// Exponential moving average with momentum 0.1 (`MovingAverageMinMaxObserver`).
    MovingAverage,
}

/// micronet's `prepare()` options for IAO (`--q_type`, `--q_level`, `--weight_observer`,
/// `--qaft`, `--ptq`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IaoOptions {
    pub q_type: QType,
    pub q_level: QLevel,
    pub weight_observer: Observer,
    /// Quantization-aware fine-tuning: scales, zero points and observer ranges frozen (a
    /// QuantAdd's observers still move, its scale does not).
    #[serde(default)]
    pub qaft: bool,
    /// Post-training quantization's quantizers: activations observed by the histogram
    /// (percentile) observer, everything symmetric whatever `q_type` says.
    #[serde(default)]
    pub ptq: Option<Percentile>,
    /// Fold each conv's BatchNorm into it during QAT (micronet's `--bn_fuse`,
    /// `QuantBNFuseConv2d`): the quantized weight is W·γ/σ, with batch statistics of the float
    /// conv in training and running ones in evaluation and QAFT.
    #[serde(default)]
    pub bn_fuse: bool,
    /// With `bn_fuse`: the first training call updates the running statistics instead of
    /// taking the batch's (micronet's `--pretrained_model`).
    #[serde(default)]
    pub pretrained_model: bool,
    /// With `bn_fuse`: fold the weight with the running variance (the one inference uses) and
    /// rescale the quantized conv to the batch's (micronet's `--bn_fuse_calib`).
    #[serde(default)]
    pub bn_fuse_calib: bool,
}

/// A percentile in (0, 1] (micronet's `--percentile`, 0.999999 by default).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percentile(pub f64);

// Percentiles are checked finite where they are made (`TrainConfig::validate`).
impl Eq for Percentile {}

impl Percentile {
    /// `k = int(percentile · n)`: which smallest |x| (1-based) the histogram observer takes;
    /// None when that selects nothing (micronet's kthvalue raises "k out of range").
    pub fn k(self, n: usize) -> Option<usize> {
        let k = (self.0 * n as f64) as usize;
        (1..=n).contains(&k).then_some(k)
    }
}

/// `torch.finfo(torch.float32).eps`, the smallest scale.
pub const EPS: f32 = f32::EPSILON;

/// Momentum of the moving-average observer.
pub const MOMENTUM: f32 = 0.1;

/// A weight's or an activation's quantizer: weights' symmetric range leaves out `-2^(b-1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Weight,
    Activation,
}

/// One IAO quantizer's description: what micronet's constructors choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub bits: Bits,
    pub q_type: QType,
    pub operand: Operand,
    pub observer: Observer,
    /// One range per element of the first dimension (conv `C`, Linear `FC`), else one in all.
    pub per_channel: bool,
    /// PTQ's activation observer instead of `observer`: the k-th smallest |x| (k from the
    /// percentile), a moving average of it as the maximum, the minimum 0.
    pub histogram: Option<Percentile>,
}

impl Spec {
    /// An activation quantizer: per tensor, moving-average observer.
    pub fn activation(bits: Bits, q_type: QType) -> Spec {
        Spec {
            bits,
            q_type,
            operand: Operand::Activation,
            observer: Observer::MovingAverage,
            per_channel: false,
            histogram: None,
        }
    }

    pub fn code_range(&self) -> (f32, f32) {
        code_range(self.bits, self.q_type, self.operand)
    }
}

/// The integer code range `[qmin, qmax]` (spec §1.3).
pub fn code_range(bits: Bits, q_type: QType, operand: Operand) -> (f32, f32) {
    let b = bits.get();
    let half = ((1u64 << (b - 1)) as f64) as f32;
    let full = ((1u64 << b) as f64) as f32;
    match (q_type, operand) {
        (QType::Symmetric, Operand::Weight) => (-(half - 1.0), half - 1.0),
        (QType::Symmetric, Operand::Activation) => (-half, half - 1.0),
        (QType::Asymmetric, Operand::Weight) => (0.0, full - 2.0),
        (QType::Asymmetric, Operand::Activation) => (0.0, full - 1.0),
    }
}

/// `R(v) = sign(v)·floor(|v| + 0.5)`: round half away from zero, in f32.
pub fn round(v: f32) -> f32 {
    let r = (v.abs() + 0.5).floor();
    if v < 0.0 { -r } else { r }
}

/// Scale and micronet's zero point (`x ≈ s·(code + zp)`, so `zp = −Z` of the usual convention)
/// of an observed range `[min, max]` (spec §1.4).
pub fn qparams(min: f32, max: f32, (qmin, qmax): (f32, f32), q_type: QType) -> (f32, f32) {
    match q_type {
        QType::Symmetric => {
            let q = (qmax - qmin) / 2.0;
            ((min.abs().max(max.abs()) / q).max(EPS), 0.0)
        }
        QType::Asymmetric => {
            let q = qmax - qmin;
            let s = ((max - min) / q).max(EPS);
            (s, round(min / s))
        }
    }
}

/// An observer's range after one more call with the current tensor's `(min, max)`; `first`:
/// nothing observed since the quantizer was made or loaded (the first call copies).
pub fn observe(
    observer: Observer,
    first: bool,
    (min, max): (f32, f32),
    (cur_min, cur_max): (f32, f32),
) -> (f32, f32) {
    if first {
        return (cur_min, cur_max);
    }
    match observer {
        Observer::MinMax => (min.min(cur_min), max.max(cur_max)),
        Observer::MovingAverage => {
            let keep = 1.0 - MOMENTUM;
            (
                keep * min + MOMENTUM * cur_min,
                keep * max + MOMENTUM * cur_max,
            )
        }
    }
}

/// The histogram observer's range after one more call on `x` (spec §1.5): the current value is
/// the k-th smallest |x|; the first call copies it, later calls average (momentum 0.1); the
/// minimum stays 0. None when the percentile selects nothing.
pub fn observe_histogram(first: bool, max: f32, x: &[f32], p: Percentile) -> Option<(f32, f32)> {
    let k = p.k(x.len())?;
    let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    a.sort_by(f32::total_cmp);
    let cur = a[k - 1];
    let max = if first {
        cur
    } else {
        (1.0 - MOMENTUM) * max + MOMENTUM * cur
    };
    Some((0.0, max))
}

/// One element's fake quantization and straight-through mask, given its quantizer's state.
#[derive(Clone, Copy, Debug)]
pub struct Quantizer {
    pub scale: f32,
    pub zero_point: f32,
    /// The observer's range, which bounds the clip-STE (spec §1.1).
    pub min: f32,
    pub max: f32,
    pub range: (f32, f32),
    pub q_type: QType,
}

impl Quantizer {
    /// The state after `update_qparams` from an observed range.
    pub fn from_range(min: f32, max: f32, range: (f32, f32), q_type: QType) -> Quantizer {
        let (scale, zero_point) = qparams(min, max, range, q_type);
        Quantizer {
            scale,
            zero_point,
            min,
            max,
            range,
            q_type,
        }
    }

    /// `v = fl32(x/s) − zp`, the value before rounding.
    fn v(&self, x: f32) -> f32 {
        x / self.scale - self.zero_point
    }

    /// The integer code `clamp(R(v), qmin, qmax)`.
    pub fn code(&self, x: f32) -> f32 {
        round(self.v(x)).clamp(self.range.0, self.range.1)
    }

    /// `y = (code + zp)·s`.
    pub fn forward(&self, x: f32) -> f32 {
        (self.code(x) + self.zero_point) * self.scale
    }

    /// Whether the gradient passes at `x`: the clamp's mask on `R(v)` and the clip-STE's on `v`
    /// against the observer's range (both bounds inclusive, as torch ≤ 2.11; spec §0).
    pub fn passes(&self, x: f32) -> bool {
        let v = self.v(x);
        let r = round(v);
        let lo_obs = self.min / self.scale - self.zero_point;
        let hi_obs = self.max / self.scale - self.zero_point;
        let (lo, hi) = match self.q_type {
            QType::Symmetric => {
                let h = lo_obs.abs().max(hi_obs.abs());
                (-h, h)
            }
            QType::Asymmetric => (lo_obs, hi_obs),
        };
        r >= self.range.0 && r <= self.range.1 && v >= lo && v <= hi
    }

    /// `dL/dx = fl32(fl32(g·s)/s)` where the gradient passes, else 0 (spec §1.6).
    pub fn backward(&self, x: f32, g: f32) -> f32 {
        if self.passes(x) {
            (g * self.scale) / self.scale
        } else {
            0.0
        }
    }
}

/// The extremes of `x` (NaN-free input assumed), as `torch.min` / `torch.max`.
pub fn extremes(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

#[cfg(test)]
// The spec's values as it prints them: the decimal expansions of f32s, compared exactly.
#[allow(clippy::excessive_precision)]
mod tests {
    //! The spec's test vectors (§1.7), verified there against micronet on torch 2.11.
    use super::*;

    fn bits(b: u32) -> Bits {
        Bits::new(b).unwrap()
    }

    const X: [f32; 6] = [-1.0, -0.3, 0.0, 0.2, 0.49, 1.5];

    fn act(b: u32, q: QType, x: &[f32], prev: Option<(f32, f32)>) -> Quantizer {
        let (min, max) = observe(
            Observer::MovingAverage,
            prev.is_none(),
            prev.unwrap_or_default(),
            extremes(x),
        );
        Quantizer::from_range(min, max, code_range(bits(b), q, Operand::Activation), q)
    }

    fn codes(q: &Quantizer, x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| q.code(v)).collect()
    }

    fn grads(q: &Quantizer, x: &[f32], g: &[f32]) -> Vec<f32> {
        x.iter().zip(g).map(|(&v, &g)| q.backward(v, g)).collect()
    }

    const G: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];

    #[test]
    fn ranges_follow_the_spec() {
        use Operand::*;
        use QType::*;
        assert_eq!(code_range(bits(8), Symmetric, Weight), (-127.0, 127.0));
        assert_eq!(code_range(bits(4), Symmetric, Weight), (-7.0, 7.0));
        assert_eq!(code_range(bits(2), Symmetric, Weight), (-1.0, 1.0));
        assert_eq!(code_range(bits(8), Symmetric, Activation), (-128.0, 127.0));
        assert_eq!(code_range(bits(4), Symmetric, Activation), (-8.0, 7.0));
        assert_eq!(code_range(bits(8), Asymmetric, Weight), (0.0, 254.0));
        assert_eq!(code_range(bits(4), Asymmetric, Weight), (0.0, 14.0));
        assert_eq!(code_range(bits(8), Asymmetric, Activation), (0.0, 255.0));
        assert_eq!(code_range(bits(16), Asymmetric, Activation), (0.0, 65535.0));
    }

    #[test]
    fn activation_vectors_first_call() {
        let q = act(8, QType::Symmetric, &X, None);
        assert_eq!(q.scale, 0.0117647061124444);
        assert_eq!(q.zero_point, 0.0);
        assert_eq!(codes(&q, &X), [-85.0, -26.0, 0.0, 17.0, 42.0, 127.0]);
        let y: Vec<f32> = X.iter().map(|&v| q.forward(v)).collect();
        let want = [-1.0, -0.30588236, 0.0, 0.2, 0.49411765, 1.4941176];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-7, "{y:?}");
        }
        assert_eq!(grads(&q, &X, &G), [1.0, 2.0, 3.0, 4.0, 5.0, 0.0]);

        let q = act(4, QType::Symmetric, &X, None);
        assert_eq!(q.scale, 0.20000000298);
        assert_eq!(codes(&q, &X), [-5.0, -2.0, 0.0, 1.0, 2.0, 7.0]);
        assert_eq!(grads(&q, &X, &G), [1.0, 2.0, 3.0, 4.0, 5.0, 0.0]);

        let q = act(8, QType::Asymmetric, &X, None);
        assert_eq!(q.scale, 0.009803921915590763);
        assert_eq!(q.zero_point, -102.0);
        assert_eq!(codes(&q, &X), [0.0, 71.0, 102.0, 122.0, 152.0, 255.0]);
        let y: Vec<f32> = X.iter().map(|&v| q.forward(v)).collect();
        let want = [-1.0, -0.30392158, 0.0, 0.19607843, 0.4901961, 1.5];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-7, "{y:?}");
        }
        assert_eq!(grads(&q, &X, &G), G);

        let q = act(4, QType::Asymmetric, &X, None);
        assert_eq!(q.scale, 0.1666666716337204);
        assert_eq!(q.zero_point, -6.0);
        assert_eq!(codes(&q, &X), [0.0, 4.0, 6.0, 7.0, 9.0, 15.0]);
        assert_eq!(grads(&q, &X, &G), G);
    }

    #[test]
    fn activation_vectors_second_call() {
        let x2: Vec<f32> = X.iter().map(|v| 2.0 * v).collect();
        for (qt, s, zp, want) in [
            (
                QType::Symmetric,
                0.012941175140440464,
                0.0,
                [-128.0, -46.0, 0.0, 31.0, 76.0, 127.0],
            ),
            (
                QType::Asymmetric,
                0.010784314014017582,
                -102.0,
                [0.0, 46.0, 102.0, 139.0, 193.0, 255.0],
            ),
        ] {
            let first = act(8, qt, &X, None);
            let q = act(8, qt, &x2, Some((first.min, first.max)));
            assert_eq!((q.min, q.max), (-1.1000000238, 1.6499998569));
            assert_eq!((q.scale, q.zero_point), (s, zp), "{qt:?}");
            assert_eq!(codes(&q, &x2), want, "{qt:?}");
            assert_eq!(grads(&q, &x2, &G), [0.0, 2.0, 3.0, 4.0, 5.0, 0.0], "{qt:?}");
        }
    }

    /// Per-row weight quantizers of `w` (rows of `row` elements), or one for the whole tensor.
    fn weight_q(b: u32, qt: QType, per_row: bool, w: &[f32], row: usize) -> Vec<Quantizer> {
        let range = code_range(bits(b), qt, Operand::Weight);
        let rows: Vec<&[f32]> = if per_row {
            w.chunks(row).collect()
        } else {
            vec![w; w.len() / row]
        };
        rows.iter()
            .map(|r| {
                let (lo, hi) = observe(Observer::MinMax, true, (0.0, 0.0), extremes(r));
                Quantizer::from_range(lo, hi, range, qt)
            })
            .collect()
    }

    #[test]
    fn conv_weight_vectors() {
        let w = [0.5, -0.25, 0.1, 0.0, -2.0, 1.0, 0.3, -0.7];
        let s = |v: &[f32]| v.to_vec();
        use QType::*;
        #[allow(clippy::type_complexity)]
        let cases: [(u32, QType, bool, Vec<f32>, Vec<f32>, [f32; 8]); 8] = [
            (
                8,
                Symmetric,
                true,
                s(&[0.00393701, 0.01574803]),
                s(&[0.0, 0.0]),
                [127.0, -64.0, 25.0, 0.0, -127.0, 64.0, 19.0, -44.0],
            ),
            (
                4,
                Symmetric,
                true,
                s(&[0.07142857, 0.2857143]),
                s(&[0.0, 0.0]),
                [7.0, -3.0, 1.0, 0.0, -7.0, 3.0, 1.0, -2.0],
            ),
            (
                8,
                Symmetric,
                false,
                s(&[0.01574803]),
                s(&[0.0]),
                [32.0, -16.0, 6.0, 0.0, -127.0, 64.0, 19.0, -44.0],
            ),
            (
                4,
                Symmetric,
                false,
                s(&[0.2857143]),
                s(&[0.0]),
                [2.0, -1.0, 0.0, 0.0, -7.0, 3.0, 1.0, -2.0],
            ),
            (
                8,
                Asymmetric,
                true,
                s(&[0.00295276, 0.01181102]),
                s(&[-85.0, -169.0]),
                [254.0, 0.0, 119.0, 85.0, 0.0, 254.0, 194.0, 110.0],
            ),
            (
                4,
                Asymmetric,
                true,
                s(&[0.05357143, 0.21428572]),
                s(&[-5.0, -9.0]),
                [14.0, 0.0, 7.0, 5.0, 0.0, 14.0, 10.0, 6.0],
            ),
            (
                8,
                Asymmetric,
                false,
                s(&[0.01181102]),
                s(&[-169.0]),
                [211.0, 148.0, 177.0, 169.0, 0.0, 254.0, 194.0, 110.0],
            ),
            (
                4,
                Asymmetric,
                false,
                s(&[0.21428572]),
                s(&[-9.0]),
                [11.0, 8.0, 9.0, 9.0, 0.0, 14.0, 10.0, 6.0],
            ),
        ];
        for (b, qt, per_row, scales, zps, want) in cases {
            let qs = weight_q(b, qt, per_row, &w, 4);
            let got: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, &v)| qs[i / 4].code(v))
                .collect();
            assert_eq!(got, want, "{b} {qt:?} per-channel {per_row}");
            for (k, (&s, &zp)) in scales.iter().zip(&zps).enumerate() {
                // The spec prints scales to 6 or 7 significant digits.
                assert!(
                    (qs[k].scale - s).abs() <= 5e-6 * s,
                    "{b} {qt:?}: {}",
                    qs[k].scale
                );
                assert_eq!(qs[k].zero_point, zp);
            }
            // MinMax weights lie inside the observer's range and on the codes: the
            // gradient is G (±1 ulp) everywhere.
            for (i, &v) in w.iter().enumerate() {
                let g = (i + 1) as f32;
                let d = qs[i / 4].backward(v, g);
                assert!((d - g).abs() <= g * f32::EPSILON, "{b} {qt:?} {i}: {d}");
            }
        }
        // sym C 8 dequantized.
        let qs = weight_q(8, Symmetric, true, &w, 4);
        let y: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| qs[i / 4].forward(v))
            .collect();
        let want = [
            0.5,
            -0.2519685,
            0.09842519,
            0.0,
            -2.0,
            1.00787401,
            0.2992126,
            -0.69291341,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-7, "{y:?}");
        }
    }

    #[test]
    fn linear_weight_vectors() {
        let w = [0.6, -0.2, 0.05, -1.0, 0.4, 0.0];
        let qs = weight_q(8, QType::Symmetric, true, &w, 3);
        let y: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| qs[i / 3].forward(v))
            .collect();
        for (a, b) in y
            .iter()
            .zip([0.6, -0.1984252, 0.0519685, -1.0, 0.40157479, 0.0])
        {
            assert!((a - b).abs() <= 1e-7, "{y:?}");
        }
        let qs = weight_q(8, QType::Asymmetric, true, &w, 3);
        assert_eq!((qs[0].zero_point, qs[1].zero_point), (-64.0, -181.0));
        let y: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| qs[i / 3].forward(v))
            .collect();
        let want = [
            0.59842521,
            -0.1984252,
            0.0503937,
            -0.99763781,
            0.4023622,
            0.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-7, "{y:?}");
        }
        let g: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| qs[i / 3].backward(v, 1.0))
            .collect();
        assert_eq!(g, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn observers_accumulate() {
        let w: [f32; 8] = [0.5, -0.25, 0.1, 0.0, -2.0, 1.0, 0.3, -0.7];
        let run = |obs: Observer, factors: &[f32]| -> Vec<(f32, f32)> {
            let mut state = vec![(0.0, 0.0); 2];
            for (call, f) in factors.iter().enumerate() {
                for (c, st) in state.iter_mut().enumerate() {
                    let row: Vec<f32> = w[c * 4..c * 4 + 4].iter().map(|v| v * f).collect();
                    *st = observe(obs, call == 0, *st, extremes(&row));
                }
            }
            state
        };
        assert_eq!(
            run(Observer::MinMax, &[1.0, 0.5]),
            [(-0.25, 0.5), (-2.0, 1.0)]
        );
        assert_eq!(
            run(Observer::MinMax, &[1.0, 0.5, 3.0]),
            [(-0.75, 1.5), (-6.0, 3.0)]
        );
        let ma = run(Observer::MovingAverage, &[1.0, 0.5]);
        let want = [(-0.2375, 0.475), (-1.9, 0.95)];
        for (a, b) in ma.iter().zip(want) {
            assert!(
                (a.0 - b.0).abs() <= 1e-7 && (a.1 - b.1).abs() <= 1e-7,
                "{ma:?}"
            );
        }
        let range = code_range(bits(8), QType::Symmetric, Operand::Weight);
        let s: Vec<f32> = ma
            .iter()
            .map(|&(lo, hi)| qparams(lo, hi, range, QType::Symmetric).0)
            .collect();
        assert!(
            (s[0] - 0.00374016).abs() <= 1e-6 * s[0] && (s[1] - 0.01496063).abs() <= 1e-6 * s[1]
        );
    }

    #[test]
    fn histogram_observer_vectors() {
        // Spec §1.5 and §1.7: x = [0.1, −0.5, 2, −3, 0.7, 1.2, −0.05, 0, 4, −9].
        let x = [0.1, -0.5, 2.0, -3.0, 0.7, 1.2, -0.05, 0.0, 4.0, -9.0];
        let at = |p: f64| observe_histogram(true, 0.0, &x, Percentile(p)).unwrap();
        assert_eq!(at(0.999999), (0.0, 4.0));
        assert_eq!(at(0.9), (0.0, 4.0));
        assert_eq!(at(0.5), (0.0, 0.7));
        let x2: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
        let again = observe_histogram(false, 4.0, &x2, Percentile(0.999999)).unwrap();
        assert!((again.1 - 4.4).abs() < 1e-6, "{again:?}");
        assert_eq!(observe_histogram(true, 0.0, &[1.0], Percentile(0.9)), None);
        // PTQ activation at p = 0.9: symmetric, s = 4/127.5.
        let range = code_range(bits(8), QType::Symmetric, Operand::Activation);
        let q = Quantizer::from_range(0.0, 4.0, range, QType::Symmetric);
        assert_eq!(q.scale, 0.0313725508749485);
        let codes: Vec<f32> = x.iter().map(|&v| q.code(v)).collect();
        assert_eq!(
            codes,
            [
                3.0, -16.0, 64.0, -96.0, 22.0, 38.0, -2.0, 0.0, 127.0, -128.0
            ]
        );
        let g: Vec<f32> = x.iter().map(|&v| q.backward(v, 1.0)).collect();
        assert_eq!(g, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn degenerate_ranges() {
        // A quantizer that never ran: scale 1, zp 0 (x = [0.3, 1.7, −200] → [0, 2, −128]).
        let q = Quantizer {
            scale: 1.0,
            zero_point: 0.0,
            min: 0.0,
            max: 0.0,
            range: (-128.0, 127.0),
            q_type: QType::Symmetric,
        };
        let y: Vec<f32> = [0.3, 1.7, -200.0].iter().map(|&v| q.forward(v)).collect();
        assert_eq!(y, [0.0, 2.0, -128.0]);
        // All zero, symmetric: s = eps, output 0.
        let q = Quantizer::from_range(0.0, 0.0, (-128.0, 127.0), QType::Symmetric);
        assert_eq!((q.scale, q.forward(0.0)), (EPS, 0.0));
        // min > 0, asymmetric: zp > 0 and 0 is not representable (x = [0.2, 0.5, 1]).
        let q = Quantizer::from_range(0.2, 1.0, (0.0, 255.0), QType::Asymmetric);
        assert_eq!(q.zero_point, 64.0);
        assert!((q.forward(0.2) - 0.2008).abs() < 1e-4);
    }
}
