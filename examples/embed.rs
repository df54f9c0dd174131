//! A native app that classifies images with an exported integer model: what embedding wgqat in
//! an application takes. Make a model with
//!
//!     wgqat train --out runs/demo
//!     wgqat export --checkpoint runs/demo/best.safetensors --out nin_gc.int.safetensors
//!
//! then
//!
//!     cargo run --release --example embed -- nin_gc.int.safetensors photo.png [more.jpg ...]

use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::infer::{IntEngine, IntModel, load_image, softmax};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: embed MODEL IMAGE..."))?;
    let images: Vec<String> = args.collect();
    if images.is_empty() {
        anyhow::bail!("usage: embed MODEL IMAGE...: give at least one PNG or JPEG image");
    }

    // The highest-performance adapter (Vulkan, Metal or DX12; WGPU_BACKEND and
    // WGPU_ADAPTER_NAME choose another).
    let gpu = Gpu::new(&GpuOptions::default())?;

    // The model file holds the graph, the packed weight codes and per-channel scales. The
    // engine uploads them once and sizes its buffers for up to `images.len()` images at a time.
    let model = IntModel::read(model_path.as_ref())?;
    let manifest = model.manifest.clone();
    let engine = IntEngine::new(&gpu, model, images.len())?;

    // Decode, resize to the model's input and normalise as in training: one NCHW batch.
    let mut batch = Vec::new();
    for path in &images {
        batch.extend(load_image(
            path.as_ref(),
            manifest.input,
            manifest.mean,
            manifest.std,
        )?);
    }

    // One submit runs the whole network in integer arithmetic; logits come back per image.
    let logits = engine.run(&gpu, &batch)?;
    for (path, z) in images.iter().zip(logits.chunks(engine.classes())) {
        let p = softmax(z);
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let top: Vec<String> = order
            .iter()
            .take(3)
            .map(|&c| {
                let name = manifest.class_names.get(c).map_or("?", String::as_str);
                format!("{name} {:.1}%", 100.0 * p[c])
            })
            .collect();
        println!("{path}: {}", top.join(", "));
    }
    Ok(())
}
