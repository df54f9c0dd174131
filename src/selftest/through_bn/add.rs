//! The residual add forming its summands from BatchNorms' inputs: a block's last BatchNorm and
//! its shortcut's, as `norm::apply` would write them (the values are dyadic, so the sum is exact).

use super::formed_nchw;
use crate::DType;
use crate::gpu::Tensor;
use crate::kernels::elementwise;
use crate::kernels::norm::{Act, BnForm, TABLE};
use crate::quant::Bits;
use crate::reference::{self, Tolerance};
use crate::selftest::{Case, run_read};

/// Each summand plain or formed (with or without its BatchNorm's ReLU), with and without the
/// ReLU after the sum: a block with an identity shortcut (the first formed), one with a
/// downsampling shortcut (both), and the second formed alone with its ReLU; one shape over many
/// workgroups and channels whose planes do not fill one.
pub(in crate::selftest) fn cases(v: &mut Vec<Case>) {
    // (shape, the first summand's BatchNorm ReLU if formed, the second's, the ReLU after the sum)
    for (shape, a_bn, b_bn, relu) in [
        ([2, 3, 5, 7], Some(false), None, true),
        ([3, 8, 16, 16], Some(false), Some(false), true),
        ([2, 5, 3, 3], None, Some(true), false),
        ([1, 6, 9, 9], Some(true), Some(false), false),
    ] {
        let form = |s: Option<bool>| s.map_or("plain".to_string(), |r| format!("bn relu {r}"));
        v.push(Case::new(
            "add",
            "forward through bn",
            format!("{shape:?} a {} b {} relu {relu}", form(a_bn), form(b_bn)),
            move |gpu, rng| {
                let n: usize = shape.iter().product();
                let c = shape[1];
                let bits = Bits::new(8).expect("valid bits");
                // A summand: what the kernel reads (the BatchNorm's input, or the value itself),
                // its table, and the value the sum takes.
                let mut summand = |bn: Option<bool>| match bn {
                    Some(bn_relu) => {
                        let f = formed_nchw(rng, shape, Act::relu_if(bn_relu), 1, bits);
                        (f.y, Some((f.table, bn_relu)), f.x_float)
                    }
                    None => {
                        let x: Vec<f32> = (0..n)
                            .map(|_| (rng.below(81) as f32 - 40.0) / 16.0)
                            .collect();
                        (x.clone(), None, x)
                    }
                };
                let (a, a_table, a_val) = summand(a_bn);
                let (b, b_table, b_val) = summand(b_bn);
                let at = gpu.upload_f32("a", &shape, &a)?;
                let bt = gpu.upload_f32("b", &shape, &b)?;
                let table = |t: &Option<(Vec<f32>, bool)>| {
                    t.as_ref()
                        .map(|(t, r)| Ok((gpu.upload_f32("table", &[TABLE * c], t)?, *r)))
                        .transpose()
                };
                let (att, btt) = (table(&a_table)?, table(&b_table)?);
                fn as_form(t: &Option<(Tensor, bool)>) -> Option<BnForm<'_>> {
                    t.as_ref().map(|(table, relu)| BnForm {
                        table,
                        act: Act::relu_if(*relu),
                        shuffle: 1,
                    })
                }
                let yt = gpu.empty("y", &shape, DType::F32)?;
                let l = elementwise::add_forward_formed(
                    gpu,
                    (&at, as_form(&att)),
                    (&bt, as_form(&btt)),
                    &yt,
                    relu,
                )?;
                let got = run_read(gpu, vec![l], &[&yt])?;
                let sums: Vec<f32> = a_val.iter().zip(&b_val).map(|(a, b)| a + b).collect();
                let want = if relu {
                    reference::elementwise::relu_forward(&sums)
                } else {
                    sums.iter().map(|&s| f64::from(s)).collect()
                };
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
}
