//! matmul for Linear, `Y = X·Wᵀ + b`, on `shaders/conv2d.wgsl`: a Linear layer is a 1×1
//! convolution of a 1×1 image (batch = rows of X, channels = features), so forward, grad-input
//! (`dX = dY·W`) and grad-weight (`dW = dYᵀ·X`) are the convolution GEMMs, transposes handled by
//! indexing with nothing materialised.

use super::conv2d::{ActGrad, GemmConv, Mode};
use super::{expect_dtype, expect_shape, reduce};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Op, Tensor};

/// `X: (batch, in_features)`, `W: (out_features, in_features)`, `Y: (batch, out_features)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LinearGeom {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearGeom {
    pub fn macs(&self) -> u64 {
        (self.batch * self.in_features * self.out_features) as u64
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.in_features == 0 || self.out_features == 0 {
            return Err(Error::shape(
                "linear",
                format!("{self:?}: sizes must be at least 1"),
            ));
        }
        Ok(())
    }

    pub(crate) fn gemm(&self) -> GemmConv {
        GemmConv {
            batch: self.batch,
            cin: self.in_features,
            h: 1,
            w: 1,
            cout: self.out_features,
            oh: 1,
            ow: 1,
            kernel: (1, 1),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    fn check(&self, kernel: &str, named: &[(&str, &Tensor, &[usize])]) -> Result<String> {
        self.validate()?;
        for (name, t, shape) in named {
            expect_dtype(kernel, name, t, DType::F32)?;
            expect_shape(kernel, name, t, shape)?;
        }
        Ok(format!(
            "{kernel} [{}x{}]·[{}x{}]ᵀ",
            self.batch, self.in_features, self.out_features, self.in_features
        ))
    }
}

/// `y = x·wᵀ + bias`.
pub fn forward(
    gpu: &Gpu,
    geom: &LinearGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<Op> {
    const K: &str = "matmul.forward";
    let (b, i, o) = (geom.batch, geom.in_features, geom.out_features);
    let label = geom.check(
        K,
        &[("x", x, &[b, i]), ("w", w, &[o, i]), ("y", y, &[b, o])],
    )?;
    if let Some(bt) = bias {
        geom.check(K, &[("bias", bt, &[o])])?;
    }
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::Forward,
        w,
        x,
        bias,
        y,
        1,
        label,
    )?))
}

/// `dx = dy·w`.
pub fn grad_input(
    gpu: &Gpu,
    geom: &LinearGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
) -> Result<Op> {
    let (b, i, o) = (geom.batch, geom.in_features, geom.out_features);
    let label = geom.check(
        "matmul.grad_input",
        &[("dy", dy, &[b, o]), ("w", w, &[o, i]), ("dx", dx, &[b, i])],
    )?;
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::GradInput,
        w,
        dy,
        None,
        dx,
        1,
        label,
    )?))
}

/// [`grad_input`] with the layer input's DoReFa quantizer in its epilogue (see
/// [`conv2d::grad_input_act`](super::conv2d::grad_input_act)).
pub fn grad_input_act(
    gpu: &Gpu,
    geom: &LinearGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    act: ActGrad<'_>,
) -> Result<Op> {
    let (b, i, o) = (geom.batch, geom.in_features, geom.out_features);
    let label = geom.check(
        "matmul.grad_input",
        &[
            ("dy", dy, &[b, o]),
            ("w", w, &[o, i]),
            ("dx", dx, &[b, i]),
            ("x", act.x, &[b, i]),
        ],
    )?;
    Ok(Op::Dispatch(geom.gemm().launch_with(
        gpu,
        Mode::GradInput,
        (w, dy),
        None,
        dx,
        1,
        super::conv2d::Fused {
            act: Some(act),
            ..Default::default()
        },
        label,
    )?))
}

/// `dw = dyᵀ·x`, split over the batch when it is long (partial sums in `scratch` when given).
pub fn grad_weight(
    gpu: &Gpu,
    geom: &LinearGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    let (b, i, o) = (geom.batch, geom.in_features, geom.out_features);
    let label = geom.check(
        "matmul.grad_weight",
        &[("x", x, &[b, i]), ("dy", dy, &[b, o]), ("dw", dw, &[o, i])],
    )?;
    let g = geom.gemm();
    g.grad_weight_ops(
        gpu,
        (dy, x),
        (dw, None),
        g.default_splits(),
        scratch,
        super::conv2d::AroundBn::default(),
        label,
    )
}

/// `dw` and `db = Σ_rows dy` in one pass over `dy` (the bias gradient is the row sums of
/// grad-weight's A = dyᵀ).
pub fn grad_weight_and_bias(
    gpu: &Gpu,
    geom: &LinearGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, &Tensor),
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    let (b, i, o) = (geom.batch, geom.in_features, geom.out_features);
    let label = geom.check(
        "matmul.grad_weight",
        &[
            ("x", x, &[b, i]),
            ("dy", dy, &[b, o]),
            ("dw", dw, &[o, i]),
            ("db", db, &[o]),
        ],
    )?;
    let g = geom.gemm();
    g.grad_weight_ops(
        gpu,
        (dy, x),
        (dw, Some(db)),
        g.default_splits(),
        scratch,
        super::conv2d::AroundBn::default(),
        label,
    )
}

/// `db = Σ_rows dy`.
pub fn grad_bias(gpu: &Gpu, geom: &LinearGeom, dy: &Tensor, db: &Tensor) -> Result<Op> {
    let (b, o) = (geom.batch, geom.out_features);
    geom.check("matmul.grad_bias", &[("dy", dy, &[b, o]), ("db", db, &[o])])?;
    Ok(Op::Dispatch(reduce::channel_sum(gpu, dy, db)?))
}
