//! IAO quantizers over whole tensors (spec §1), from the scalar formulas of
//! [`crate::quant::iao`] (which are tested against the spec's vectors): a quantizer's state,
//! its observer call, forward and backward, element by element.

use crate::quant::iao::{self, Observer, Percentile, Quantizer, Spec};

/// What the GPU quantizer holds: per row the observer's range and the quantizer, and whether
/// anything was observed.
#[derive(Clone, Debug)]
pub struct IaoState {
    pub rows: Vec<Quantizer>,
    pub observed: bool,
    pub observer: Observer,
    pub histogram: Option<Percentile>,
}

impl IaoState {
    /// A fresh quantizer: range 0, scale 1, zero point 0.
    pub fn new(spec: Spec, rows: usize) -> Self {
        let q = Quantizer {
            scale: 1.0,
            zero_point: 0.0,
            min: 0.0,
            max: 0.0,
            range: spec.code_range(),
            q_type: spec.q_type,
        };
        IaoState {
            rows: vec![q; rows],
            observed: false,
            observer: spec.observer,
            histogram: spec.histogram,
        }
    }

    fn row_len(&self, x: &[f32]) -> usize {
        x.len() / self.rows.len()
    }

    /// The training-mode observer call on `x`, then scale and zero point.
    pub fn observe(&mut self, x: &[f32]) {
        let len = self.row_len(x);
        for (r, q) in self.rows.iter_mut().enumerate() {
            let row = &x[r * len..(r + 1) * len];
            let (lo, hi) = match self.histogram {
                Some(p) => iao::observe_histogram(!self.observed, q.max, row, p)
                    .expect("the percentile selects a value"),
                None => iao::observe(
                    self.observer,
                    !self.observed,
                    (q.min, q.max),
                    iao::extremes(row),
                ),
            };
            *q = Quantizer::from_range(lo, hi, q.range, q.q_type);
        }
        self.observed = true;
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let len = self.row_len(x);
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                if v.is_nan() {
                    v
                } else {
                    self.rows[i / len].forward(v)
                }
            })
            .collect()
    }

    pub fn backward(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let len = self.row_len(x);
        x.iter()
            .zip(dy)
            .enumerate()
            .map(|(i, (&v, &g))| self.rows[i / len].backward(v, g))
            .collect()
    }

    /// The GPU state's layout: rows × [min, max, scale, zp], then `observed`.
    pub fn words(&self) -> Vec<f32> {
        let mut w: Vec<f32> = self
            .rows
            .iter()
            .flat_map(|q| [q.min, q.max, q.scale, q.zero_point])
            .collect();
        w.push(if self.observed { 1.0 } else { 0.0 });
        w
    }
}
