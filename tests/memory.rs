//! The training step's memory stays within the project's target: NIN-GC W8A8 at batch 256 in at
//! most half of eager PyTorch's 5.0 GB and below torch.compile's 2.85 GB (BENCHMARKS.md).
//!
//! Every buffer is sized when the step is planned, so planning alone (no step runs) gives the
//! peak. Lavapipe cannot bind batch 256's buffers, so the peak is planned at batches 64 and 128
//! and extended linearly to 256: every batch-dependent buffer grows linearly, and the rest
//! (parameters, optimizer state, grad-weight's split-K scratch) is the same from batch 64 up.
mod common;

use wgqat::bench::{TrainingOptions, training};
use wgqat::kernels::quant::Bits;

fn peak(model: &str, bits: u32, batch: usize) -> f64 {
    let spec = wgqat::models::load(model).unwrap();
    let opts = TrainingOptions {
        warmup: 0,
        steps: 0,
        breakdown: false,
    };
    let row = training(common::gpu(), &spec, Bits::new(bits).unwrap(), batch, &opts);
    assert!(
        row.error.is_none(),
        "{model} batch {batch}: {:?}",
        row.error
    );
    row.peak_memory_bytes.expect("peak measured") as f64
}

#[test]
fn a_training_step_at_batch_256_fits_the_memory_targets() {
    // (model, bits, bound at batch 256 in bytes)
    for (model, bits, bound) in [("nin_gc", 8, 2.5e9), ("nin", 8, 1.33e9)] {
        let (m64, m128) = (peak(model, bits, 64), peak(model, bits, 128));
        let per_image = (m128 - m64) / 64.0;
        let at_256 = m128 + 128.0 * per_image;
        println!(
            "{model} W{bits}A{bits}: {:.1} MiB at 64, {:.1} MiB at 128, {:.2} MiB per image, {:.2} GB at 256 (bound {:.2} GB)",
            m64 / 1048576.0,
            m128 / 1048576.0,
            per_image / 1048576.0,
            at_256 / 1e9,
            bound / 1e9
        );
        assert!(
            at_256 <= bound,
            "{model} W{bits}A{bits}: {:.2} GB at batch 256, over {:.2} GB",
            at_256 / 1e9,
            bound / 1e9
        );
    }
}
