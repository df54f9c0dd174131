//! The convolution as PyTorch states it ([`Conv2dGeom`]): shapes, checks, and the GEMM problem
//! it maps onto.

use super::GemmConv;
use crate::error::{Error, Result};

/// A 2-D convolution: PyTorch's `Conv2d` arguments and the input size. Pairs are (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Conv2dGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Conv2dGeom {
    /// A square `k`×`k` convolution of a square input, stride 1, no padding, dilation 1, one group;
    /// chain [`Self::stride`], [`Self::padding`], [`Self::groups`] to change those.
    pub fn square(batch: usize, cin: usize, hw: usize, cout: usize, k: usize) -> Self {
        Conv2dGeom {
            batch,
            cin,
            h: hw,
            w: hw,
            cout,
            kernel: (k, k),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    pub fn stride(self, s: usize) -> Self {
        Conv2dGeom {
            stride: (s, s),
            ..self
        }
    }

    pub fn padding(self, p: usize) -> Self {
        Conv2dGeom {
            padding: (p, p),
            ..self
        }
    }

    pub fn groups(self, g: usize) -> Self {
        Conv2dGeom { groups: g, ..self }
    }

    /// Output size: `floor((h + 2p − d(k−1) − 1) / s) + 1` per axis (0 if the kernel does not fit).
    pub fn out_hw(&self) -> (usize, usize) {
        let axis = |n: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            if n + 2 * p < span {
                0
            } else {
                (n + 2 * p - span) / s + 1
            }
        };
        (
            axis(
                self.h,
                self.kernel.0,
                self.stride.0,
                self.padding.0,
                self.dilation.0,
            ),
            axis(
                self.w,
                self.kernel.1,
                self.stride.1,
                self.padding.1,
                self.dilation.1,
            ),
        )
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.cin, self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        let (oh, ow) = self.out_hw();
        [self.batch, self.cout, oh, ow]
    }

    /// `(Cout, Cin/groups, KH, KW)`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.cout,
            self.cin / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> u64 {
        let (oh, ow) = self.out_hw();
        [
            self.batch,
            self.cout,
            oh,
            ow,
            self.cin / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
        .iter()
        .map(|&v| v as u64)
        .product()
    }

    pub fn validate(&self) -> Result<()> {
        let what = format!(
            "conv2d of a {}x{}x{} input to {} channels (kernel {:?}, stride {:?}, padding {:?}, dilation {:?}, groups {})",
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        );
        let positive = [
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if positive.contains(&0) {
            return Err(Error::shape(
                &what,
                "sizes, kernel, stride, dilation and groups must be at least 1",
            ));
        }
        if !self.cin.is_multiple_of(self.groups) || !self.cout.is_multiple_of(self.groups) {
            return Err(Error::shape(
                &what,
                "in and out channels must be divisible by groups",
            ));
        }
        let (oh, ow) = self.out_hw();
        if oh == 0 || ow == 0 {
            return Err(Error::shape(
                &what,
                "the kernel does not fit in the padded input: use a smaller kernel, more padding or less dilation",
            ));
        }
        Ok(())
    }

    pub(crate) fn gemm(&self) -> GemmConv {
        let (oh, ow) = self.out_hw();
        GemmConv {
            batch: self.batch,
            cin: self.cin,
            h: self.h,
            w: self.w,
            cout: self.cout,
            oh,
            ow,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    pub(super) fn describe(&self) -> String {
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
}
