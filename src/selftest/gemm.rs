//! The GEMM family (conv2d, conv_transpose2d, Linear): every direction, tile, tail, stride,
//! padding, dilation, group packing and split-K count against the f64 reference.

use super::{Case, coop, f64s, random};
use crate::DType;
use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels;
use crate::quant::Bits;
use crate::reference::{self, Tolerance};

/// The three GEMM-family ops (conv2d, conv_transpose2d, matmul): tensor shapes, GPU launches and
/// references per direction, so one driver makes their cases.
pub(super) trait GemmOp: Copy + std::fmt::Debug + Send + Sync + 'static {
    const NAME: &'static str;
    fn x_shape(&self) -> Vec<usize>;
    fn w_shape(&self) -> Vec<usize>;
    fn y_shape(&self) -> Vec<usize>;
    fn describe(&self) -> String;
    /// Longest sum of products per output element in each direction (sets the tolerance).
    fn reduction(&self) -> [usize; 3];
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>>;
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>>;
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>>;
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>>;
    /// Grad-weight with the bias gradient in the same pass over dy (what a network runs), for
    /// the ops whose grad-weight GEMM reads dy as A; None for the others.
    #[allow(clippy::too_many_arguments)]
    fn gpu_grad_weight_and_bias(
        &self,
        _gpu: &Gpu,
        _x: &Tensor,
        _dy: &Tensor,
        _dw: &Tensor,
        _db: &Tensor,
        _splits: Option<usize>,
        _scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        None
    }
    /// Whether the op has the fused epilogues ([`GemmOp::gpu_grad_weight_and_bias`] and
    /// [`GemmOp::gpu_grad_input_act`]): conv2d and Linear, whose grad-weight reads dy as A.
    const FUSED_EPILOGUES: bool = false;
    /// Grad-input with the input's DoReFa quantizer in its epilogue; None where the op has none.
    fn gpu_grad_input_act(
        &self,
        _gpu: &Gpu,
        _dy: &Tensor,
        _w: &Tensor,
        _dx: &Tensor,
        _act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        None
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64>;
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64>;
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64>;
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64>;
}

impl GemmOp for kernels::conv2d::Conv2dGeom {
    const NAME: &'static str = "conv2d";
    fn x_shape(&self) -> Vec<usize> {
        self.input_shape().to_vec()
    }
    fn w_shape(&self) -> Vec<usize> {
        self.weight_shape().to_vec()
    }
    fn y_shape(&self) -> Vec<usize> {
        self.output_shape().to_vec()
    }
    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        )
    }
    fn reduction(&self) -> [usize; 3] {
        let (oh, ow) = self.out_hw();
        let khw = self.kernel.0 * self.kernel.1;
        [
            self.cin / self.groups * khw,
            self.cout / self.groups * khw,
            self.batch * oh * ow,
        ]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::forward(gpu, self, x, w, Some(b), y)?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::grad_input(gpu, self, dy, w, dx)?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match splits {
            Some(s) => kernels::conv2d::grad_weight_split(gpu, self, x, dy, dw, s, scratch),
            None => kernels::conv2d::grad_weight(gpu, self, x, dy, dw, scratch),
        }
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::grad_bias(gpu, self, dy, db)?])
    }
    fn gpu_grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        Some(
            kernels::conv2d::grad_input_fused(gpu, self, dy, w, dx, Some(act), Default::default())
                .map(|op| vec![op]),
        )
    }
    const FUSED_EPILOGUES: bool = true;
    fn gpu_grad_weight_and_bias(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        db: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::conv2d::grad_weight_and_bias(
            gpu, self, x, dy, dw, db, splits, scratch,
        ))
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::conv2d::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_bias(self, dy)
    }
}

impl GemmOp for kernels::conv_transpose2d::ConvTranspose2dGeom {
    const NAME: &'static str = "conv_transpose2d";
    fn x_shape(&self) -> Vec<usize> {
        self.input_shape().to_vec()
    }
    fn w_shape(&self) -> Vec<usize> {
        self.weight_shape().to_vec()
    }
    fn y_shape(&self) -> Vec<usize> {
        self.output_shape().to_vec()
    }
    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} op{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups
        )
    }
    fn reduction(&self) -> [usize; 3] {
        let khw = self.kernel.0 * self.kernel.1;
        [
            self.cin / self.groups * khw,
            self.cout / self.groups * khw,
            self.batch * self.h * self.w,
        ]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::forward(
            gpu,
            self,
            x,
            w,
            Some(b),
            y,
        )?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::grad_input(
            gpu, self, dy, w, dx,
        )?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match splits {
            Some(s) => {
                kernels::conv_transpose2d::grad_weight_split(gpu, self, x, dy, dw, s, scratch)
            }
            None => kernels::conv_transpose2d::grad_weight(gpu, self, x, dy, dw, scratch),
        }
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::grad_bias(
            gpu, self, dy, db,
        )?])
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_bias(self, dy)
    }
}

impl GemmOp for kernels::matmul::LinearGeom {
    const NAME: &'static str = "matmul";
    fn x_shape(&self) -> Vec<usize> {
        vec![self.batch, self.in_features]
    }
    fn w_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }
    fn y_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_features]
    }
    fn describe(&self) -> String {
        format!(
            "[{}x{}]·[{}x{}]ᵀ",
            self.batch, self.in_features, self.out_features, self.in_features
        )
    }
    fn reduction(&self) -> [usize; 3] {
        [self.in_features, self.out_features, self.batch]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::forward(gpu, self, x, w, Some(b), y)?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::grad_input(gpu, self, dy, w, dx)?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        _splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        kernels::matmul::grad_weight(gpu, self, x, dy, dw, scratch)
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::grad_bias(gpu, self, dy, db)?])
    }
    fn gpu_grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::matmul::grad_input_act(gpu, self, dy, w, dx, act).map(|op| vec![op]))
    }
    const FUSED_EPILOGUES: bool = true;
    fn gpu_grad_weight_and_bias(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        db: &Tensor,
        _splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::matmul::grad_weight_and_bias(
            gpu,
            self,
            x,
            dy,
            (dw, db),
            scratch,
        ))
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::matmul::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::matmul::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::matmul::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::matmul::grad_bias(self, dy)
    }
}

/// f32 sums of `k` products of values in [-1, 1]: the error grows about like sqrt(k) ulps of
/// the result; allow a margin of ~10 over what lavapipe shows.
pub(super) fn gemm_tolerance(k: usize) -> Tolerance {
    Tolerance::new(2e-6 * (k as f64).sqrt(), 1e-5)
}

fn gemm_cases<G: GemmOp>(v: &mut Vec<Case>, geom: G) {
    let shape = geom.describe();
    let [k_fwd, k_dx, k_dw] = geom.reduction();
    v.push(Case::new(
        G::NAME,
        "forward",
        shape.clone(),
        move |gpu, rng| {
            let (x, w) = (random(rng, &geom.x_shape()), random(rng, &geom.w_shape()));
            let b = random(rng, &[geom.y_shape()[1]]);
            let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let bt = gpu.upload_f32("b", &[b.len()], &b)?;
            let yt = gpu.empty("y", &geom.y_shape(), DType::F32)?;
            let got: Vec<Vec<f32>> = gpu.run_and_read(
                "selftest",
                &geom.gpu_forward(gpu, &xt, &wt, &bt, &yt)?,
                &[&yt],
            )?;
            let want = geom.ref_forward(&f64s(&x), &f64s(&w), &f64s(&b));
            Ok(vec![(
                "y".into(),
                reference::compare(&got[0], &want, gemm_tolerance(k_fwd)),
            )])
        },
    ));
    v.push(Case::new(
        G::NAME,
        "grad_input",
        shape.clone(),
        move |gpu, rng| {
            let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
            let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
            let got: Vec<Vec<f32>> = gpu.run_and_read(
                "selftest",
                &geom.gpu_grad_input(gpu, &dyt, &wt, &dxt)?,
                &[&dxt],
            )?;
            let want = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
            Ok(vec![(
                "dx".into(),
                reference::compare(&got[0], &want, gemm_tolerance(k_dx)),
            )])
        },
    ));
    // Grad-input with the input's quantizer in its epilogue (what a network runs for a DoReFa
    // layer): dx masked by x's straight-through rule and, in every other shape, x requantized
    // in place. x spans [-3, 13], so about a quarter falls outside the rule's range.
    if G::FUSED_EPILOGUES {
        let requantize = geom.x_shape().iter().sum::<usize>() % 2 == 0;
        let direction = if requantize {
            "grad_input+act requantize"
        } else {
            "grad_input+act"
        };
        v.push(Case::new(
            G::NAME,
            direction,
            shape.clone(),
            move |gpu, rng| {
                let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
                let x: Vec<f32> = random(rng, &geom.x_shape())
                    .iter()
                    .map(|v| 5.0 + 8.0 * v)
                    .collect();
                let bits = Bits::new(4).expect("4 bits");
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                let act = kernels::conv2d::ActGrad {
                    x: &xt,
                    bits,
                    requantize,
                };
                let ops = geom
                    .gpu_grad_input_act(gpu, &dyt, &wt, &dxt, act)
                    .expect("the op has the epilogue")?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dxt, &xt])?;
                let dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                // The straight-through rule of the f32 input, on the f64 sum.
                let want = reference::quant::act_backward_f64(&x, &dx);
                let x_want = if requantize {
                    f64s(&reference::quant::act_forward(&x, bits))
                } else {
                    f64s(&x)
                };
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, gemm_tolerance(k_dx)),
                    ),
                    (
                        "x".into(),
                        reference::compare(&got[1], &x_want, Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // With the bias gradient in the same pass where the op has it (checked beside dw).
    for splits in [None, Some(3)] {
        let direction = match (splits.is_some(), G::FUSED_EPILOGUES) {
            (false, false) => "grad_weight",
            (true, false) => "grad_weight split-K 3",
            (false, true) => "grad_weight+bias",
            (true, true) => "grad_weight+bias split-K 3",
        };
        if splits.is_some() && G::NAME == "matmul" {
            continue;
        }
        v.push(Case::new(
            G::NAME,
            direction,
            shape.clone(),
            move |gpu, rng| {
                let (x, dy) = (random(rng, &geom.x_shape()), random(rng, &geom.y_shape()));
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                let c = geom.y_shape()[1];
                let dbt = gpu.empty("db", &[c], DType::F32)?;
                // The split case writes its partial sums into a larger shared scratch that
                // holds stale NaNs, as a network's does: they must all be overwritten.
                let n = 4 * geom.w_shape().iter().product::<usize>() + 4 * c + 64;
                let scratch = match splits {
                    Some(_) => Some(gpu.upload_f32("scratch", &[n], &vec![f32::NAN; n])?),
                    None => None,
                };
                let scratch = scratch.as_ref();
                let (ops, read) = match geom
                    .gpu_grad_weight_and_bias(gpu, &xt, &dyt, &dwt, &dbt, splits, scratch)
                {
                    Some(ops) => (ops?, vec![&dwt, &dbt]),
                    None => (
                        geom.gpu_grad_weight(gpu, &xt, &dyt, &dwt, splits, scratch)?,
                        vec![&dwt],
                    ),
                };
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &read)?;
                let want = geom.ref_grad_weight(&f64s(&x), &f64s(&dy));
                let mut out = vec![(
                    "dw".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k_dw)),
                )];
                if let Some(db) = got.get(1) {
                    let want = geom.ref_grad_bias(&f64s(&dy));
                    out.push((
                        "db".into(),
                        reference::compare(db, &want, gemm_tolerance(dy.len() / c)),
                    ));
                }
                Ok(out)
            },
        ));
    }
    v.push(Case::new(G::NAME, "grad_bias", shape, move |gpu, rng| {
        let dy = random(rng, &geom.y_shape());
        let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
        let c = geom.y_shape()[1];
        let dbt = gpu.empty("db", &[c], DType::F32)?;
        let got: Vec<Vec<f32>> =
            gpu.run_and_read("selftest", &geom.gpu_grad_bias(gpu, &dyt, &dbt)?, &[&dbt])?;
        let want = geom.ref_grad_bias(&f64s(&dy));
        let k = dy.len() / c;
        Ok(vec![(
            "db".into(),
            reference::compare(&got[0], &want, gemm_tolerance(k)),
        )])
    }));
}

/// Shapes covering stride 2, padding, dilation 2, groups (depthwise too), 1x1 and 5x5 kernels,
/// asymmetric settings, odd sizes, batch 1, every tile height (16 to 192 rows, and 128-row tiles
/// beyond), both tile widths, M, N and K that are not multiples of the tile, and group packing
/// (full and partly empty tiles).
pub fn conv2d_shapes() -> Vec<kernels::conv2d::Conv2dGeom> {
    use kernels::conv2d::Conv2dGeom as G;
    vec![
        G::square(2, 3, 8, 4, 3).padding(1),
        G::square(1, 5, 9, 6, 5).stride(2).padding(2),
        G {
            batch: 2,
            cin: 4,
            h: 7,
            w: 9,
            cout: 6,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 2),
            dilation: (2, 2),
            groups: 2,
        },
        G::square(2, 8, 6, 8, 3).padding(1).groups(8),
        G::square(3, 16, 5, 70, 1),
        G {
            batch: 2,
            cin: 6,
            h: 11,
            w: 10,
            cout: 4,
            kernel: (3, 1),
            stride: (1, 2),
            padding: (1, 0),
            dilation: (2, 1),
            groups: 2,
        },
        G::square(1, 3, 32, 8, 5).padding(2),
        G::square(4, 16, 16, 32, 3).padding(1).groups(4),
        // 17..=32 rows in every direction: the 32-row tile.
        G::square(2, 24, 6, 20, 3).padding(1),
        // Forward and grad-weight on the 160-row tile (64 columns); grad-input's K = 150.
        G::square(2, 8, 5, 150, 1),
        // The 192-row tile, two column tiles with a tail; grad-input on the 64-row tile.
        G::square(1, 40, 12, 190, 3).padding(1),
        // Three 128-row tiles, the last holding 4 rows.
        G::square(1, 10, 6, 260, 1),
        // Grad-input on the 128-row tile.
        G::square(2, 120, 4, 16, 1),
        // Every vector load (pointwise, 36 pixels) with tails: forward's weight blocks past
        // K = 12 and past 70 rows, pixel quads past 72 columns; grad-input's weight quads past
        // its 12 rows; grad-weight's dy blocks past 70 rows and input blocks past 12 columns.
        G::square(2, 12, 6, 70, 1),
        // Group packing, NIN-GC's shape: 4 groups of 32 rows per tile (forward, grad-weight),
        // of 16 (grad-input).
        G::square(2, 64, 6, 128, 3).padding(1).groups(4),
        // 6 groups of 32 rows in slots of 4 (the second tile half empty); grad-input packs
        // all 6 groups of 8 rows.
        G::square(1, 48, 5, 192, 3).padding(1).groups(6),
        // Packed with stride, dilation and asymmetric padding.
        G {
            batch: 2,
            cin: 16,
            h: 9,
            w: 7,
            cout: 32,
            kernel: (3, 3),
            stride: (2, 1),
            padding: (1, 2),
            dilation: (1, 2),
            groups: 2,
        },
    ]
}

pub fn conv_transpose2d_shapes() -> Vec<kernels::conv_transpose2d::ConvTranspose2dGeom> {
    use kernels::conv_transpose2d::ConvTranspose2dGeom as G;
    let sq = |batch, cin, hw, cout, k, s, p, op, d, groups| G {
        batch,
        cin,
        h: hw,
        w: hw,
        cout,
        kernel: (k, k),
        stride: (s, s),
        padding: (p, p),
        output_padding: (op, op),
        dilation: (d, d),
        groups,
    };
    vec![
        sq(2, 4, 5, 3, 3, 2, 1, 1, 1, 1),
        sq(1, 6, 4, 4, 3, 1, 0, 0, 2, 2),
        sq(2, 4, 3, 6, 2, 2, 0, 0, 1, 1),
        sq(1, 3, 5, 2, 5, 3, 2, 2, 1, 1),
        sq(2, 4, 6, 4, 3, 1, 1, 1, 2, 1),
        G {
            batch: 1,
            cin: 8,
            h: 3,
            w: 5,
            cout: 8,
            kernel: (1, 3),
            stride: (2, 1),
            padding: (0, 1),
            output_padding: (1, 0),
            dilation: (1, 1),
            groups: 8,
        },
        sq(2, 70, 4, 66, 1, 1, 0, 0, 1, 1),
    ]
}

pub fn matmul_shapes() -> Vec<kernels::matmul::LinearGeom> {
    use kernels::matmul::LinearGeom as G;
    [
        (1, 1, 1),
        (5, 7, 3),
        (50, 192, 10),
        (3, 130, 70),
        (64, 64, 64),
        (200, 33, 17),
    ]
    .into_iter()
    .map(|(batch, in_features, out_features)| G {
        batch,
        in_features,
        out_features,
    })
    .collect()
}

pub(super) fn cases(v: &mut Vec<Case>) {
    for g in conv2d_shapes() {
        gemm_cases(v, g);
    }
    coop::cases(v);
    for g in conv_transpose2d_shapes() {
        gemm_cases(v, g);
    }
    for g in matmul_shapes() {
        gemm_cases(v, g);
    }
}
