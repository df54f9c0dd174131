//! `wgqat export` and `wgqat infer`: a trained checkpoint as an integer model or ONNX, and that
//! model run on images.

use crate::train::checkpoint_config;
use crate::{ExportArgs, ExportFormat, InferArgs, as_flags};
use clap::ValueEnum;
use std::process::ExitCode;
use wgqat::gpu::Gpu;
use wgqat::train::TrainConfig;

/// Logits as text, one image per line (shortest decimal that reads back as the same f32).
pub(crate) fn write_logits(
    path: &std::path::Path,
    logits: &[f32],
    classes: usize,
) -> anyhow::Result<()> {
    let text: String = logits
        .chunks(classes.max(1))
        .map(|row| {
            row.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" ")
                + "\n"
        })
        .collect();
    wgqat::util::atomic_write(path, text.as_bytes())?;
    Ok(())
}

pub(crate) fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let c = &a.ckpt;
    let config = checkpoint_config(
        &c.checkpoint,
        &c.model,
        c.w_bits,
        c.a_bits,
        c.quantize_first_layer,
    )?;
    let spec = wgqat::models::load(&config.model)?;
    let gpu = Gpu::new(&a.gpu.options())?;
    let quant = config.quant();
    // 16 images for the integer model's check against the network.
    let mut net = wgqat::nn::Network::new(&gpu, &spec, quant, 16, false, 1)?;
    net.load(&gpu, &c.checkpoint)?;
    let iao = matches!(quant.scheme, wgqat::quant::Scheme::Iao(_));
    match a.format {
        // IAO: the QDQ form of the fake-quantized model.
        ExportFormat::Onnx if iao => {
            wgqat::util::atomic_write(&a.out, &wgqat::infer::qdq::export(&gpu, &net)?)?
        }
        ExportFormat::Int => {
            let model = wgqat::infer::int_model(&gpu, &net)?;
            let check = wgqat::infer::agreement(&gpu, &net, &model)?;
            eprintln!(
                "check: on {} random inputs the integer model predicts as the network for {}, logits within {:.2e} (largest {:.3})",
                check.images, check.same, check.max_abs, check.largest
            );
            // wbwtab's folding of BatchNorms into signs is exact up to rounding at 0: a differing
            // prediction means a fold gone wrong (elsewhere a code boundary can flip one).
            let wbwtab = matches!(quant.scheme, wgqat::quant::Scheme::Wbwtab(_));
            if wbwtab && check.same < check.images {
                anyhow::bail!(
                    "the integer model of {} predicts differently from the network on {} of {} random inputs: not written; please report it with the checkpoint",
                    c.checkpoint.display(),
                    check.images - check.same,
                    check.images
                );
            }
            model.write(&a.out)?
        }
        ExportFormat::Onnx => {
            let folded = wgqat::infer::fold::fold(&gpu, &net)?;
            wgqat::util::atomic_write(&a.out, &wgqat::infer::onnx::export(&folded)?)?
        }
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({} format, {} {}): {} bytes, {:.0}% of the float checkpoint's {} bytes",
        a.out.display(),
        a.format
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_string()),
        spec.name,
        quant.label(),
        size(&a.out),
        100.0 * size(&a.out) as f64 / size(&c.checkpoint).max(1) as f64,
        size(&c.checkpoint)
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn infer(a: InferArgs) -> anyhow::Result<ExitCode> {
    if a.batch_size == 0 {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let model = wgqat::infer::IntModel::read(&a.model)?;
    let m = model.manifest.clone();
    let gpu = Gpu::new(&a.gpu.options())?;
    let per = m.input.iter().product::<usize>();
    // Inputs: the images given, else a dataset's test set.
    let (inputs, labels, names): (Vec<f32>, Option<Vec<u32>>, Vec<String>) = if !a.images.is_empty()
    {
        let mut x = Vec::new();
        for p in &a.images {
            x.extend(wgqat::infer::load_image(p, m.input, m.mean, m.std)?);
        }
        (
            x,
            None,
            a.images.iter().map(|p| p.display().to_string()).collect(),
        )
    } else {
        let cfg = TrainConfig {
            data: a.data.clone(),
            test_limit: a.test_limit,
            seed: a.seed,
            ..TrainConfig::default()
        };
        let test = wgqat::train::trainer::load_test(&cfg, &|s| eprintln!("{}", as_flags(s)))?;
        let idx: Vec<usize> = (0..test.len()).collect();
        let (x, l) = wgqat::data::batch(
            &test,
            &idx,
            wgqat::data::Augment::NONE,
            &mut wgqat::rng::Rng::new(0),
        );
        (x, Some(l), Vec::new())
    };
    let n = inputs.len() / per;
    let engine = wgqat::infer::IntEngine::new(&gpu, model, a.batch_size.min(n))?;
    let classes = engine.classes();
    let mut logits = Vec::with_capacity(n * classes);
    for chunk in inputs.chunks(engine.capacity() * per) {
        logits.extend(engine.run(&gpu, chunk)?);
    }
    let preds: Vec<usize> = logits.chunks(classes).map(wgqat::infer::argmax).collect();
    if let Some(p) = &a.predictions {
        let text: String = preds.iter().map(|l| format!("{l}\n")).collect();
        wgqat::util::atomic_write(p, text.as_bytes())?;
    }
    if let Some(p) = &a.logits {
        write_logits(p, &logits, classes)?;
    }
    match labels {
        Some(l) => {
            let correct = preds
                .iter()
                .zip(&l)
                .filter(|(p, l)| **p == **l as usize)
                .count();
            let loss: f64 = logits
                .chunks(classes)
                .zip(&l)
                .map(|(z, &y)| -(wgqat::infer::softmax(z)[y as usize].max(1e-30) as f64).ln())
                .sum::<f64>()
                / n as f64;
            let acc = 100.0 * correct as f64 / n as f64;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "images": n, "loss": loss, "acc": acc })
                );
            } else {
                println!(
                    "{}: {n} test images, loss {loss:.4}, accuracy {acc:.2}% (integer inference)",
                    a.model.display()
                );
            }
        }
        None => {
            let rows: Vec<serde_json::Value> = logits
                .chunks(classes)
                .zip(&names)
                .map(|(z, name)| {
                    let p = wgqat::infer::softmax(z);
                    let mut order: Vec<usize> = (0..classes).collect();
                    order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
                    let top: Vec<serde_json::Value> = order
                        .iter()
                        .take(a.top_k.max(1))
                        .map(|&i| serde_json::json!({ "class": i, "name": m.class_names.get(i).cloned().unwrap_or_default(), "p": p[i] }))
                        .collect();
                    serde_json::json!({ "image": name, "top": top })
                })
                .collect();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in &rows {
                    let top: Vec<String> = r["top"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| match t["name"].as_str() {
                            Some(name) if !name.is_empty() => format!(
                                "{} {name} ({:.3})",
                                t["class"],
                                t["p"].as_f64().unwrap_or(0.0)
                            ),
                            _ => format!(
                                "class {} ({:.3})",
                                t["class"],
                                t["p"].as_f64().unwrap_or(0.0)
                            ),
                        })
                        .collect();
                    println!("{}: {}", r["image"].as_str().unwrap_or(""), top.join(", "));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
