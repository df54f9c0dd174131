//! Quantization-aware training of NIN-GC through the library: the same run `wgqat train` makes,
//! here cut to a few hundred steps on the built-in synthetic data.
//!
//!     cargo run --release --example train_nin -- [steps] [run folder]

use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::quant::Bits;
use wgqat::train::progress::Display;
use wgqat::train::{TrainConfig, TrainOptions, train};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().map_or(Ok(200), |s| s.parse())?;
    let out = args
        .next()
        .unwrap_or_else(|| format!("runs/example-{}", wgqat::util::timestamp()));

    // The first adapter wgpu ranks highest (WGPU_BACKEND / WGPU_ADAPTER_NAME choose another).
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("training on {}", gpu.describe());

    // micronet's DoReFa recipe (Adam, lr 0.01, batch 50, W8A8, first layer float), with a smaller
    // synthetic dataset and a step limit so that the example ends soon.
    let config = TrainConfig {
        model: "nin_gc".into(),
        w_bits: Bits::new(8)?,
        a_bits: Bits::new(8)?,
        synthetic_train: 5_000,
        synthetic_test: 1_000,
        steps: Some(steps),
        log_every: 20,
        ..TrainConfig::default()
    };
    let summary = train(
        &gpu,
        TrainOptions {
            config,
            out: out.into(),
            resume: false,
            display: Display::Auto,
            wording: str::to_owned,
            stop: None,
        },
    )?;

    // The run folder holds last.safetensors (micronet's state-dict names), metrics.jsonl,
    // curves.png and resume.safetensors (`wgqat train --resume <folder>` continues it).
    println!(
        "{} steps; run folder {}",
        summary.global_step,
        summary.run_dir.display()
    );
    Ok(())
}
