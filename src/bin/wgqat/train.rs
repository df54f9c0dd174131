//! `wgqat train`, `wgqat eval` and `wgqat model`: the flags as a training configuration, and what a
//! checkpoint records about itself.

use crate::deploy::write_logits;
use crate::{EvalArgs, TrainArgs, as_flags};
use clap::parser::ValueSource;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use wgqat::gpu::Gpu;
use wgqat::quant::{Bits, SchemeName};
use wgqat::train::progress::Display;
use wgqat::train::{Stopped, TrainConfig, TrainOptions};

fn bits(v: Option<u32>, base: Bits) -> anyhow::Result<Bits> {
    Ok(match v {
        Some(b) => Bits::new(b)?,
        None => base,
    })
}

/// The run's config: the defaults (or, resuming, the run's saved config) with the given flags on
/// top. A resumed run may only change its length; anything else is refused by the trainer.
fn train_config(a: &TrainArgs, given: &dyn Fn(&str) -> bool) -> anyhow::Result<TrainConfig> {
    let mut c = match &a.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (--resume takes a wgqat run folder)",
                    path.display()
                )
            })?;
            serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a wgqat config ({e})", path.display()))?
        }
        None => TrainConfig::default(),
    };
    // A new run takes every value (a flag left out holds TrainConfig's default); a resumed run
    // only the flags given.
    let take = |id: &str| a.resume.is_none() || given(id);
    macro_rules! take {
        ($($field:ident),*) => {
            $(if take(stringify!($field)) {
                c.$field = a.$field.clone();
            })*
        };
    }
    take!(
        model,
        batch_size,
        eval_batch_size,
        epochs,
        optimizer,
        lr,
        momentum,
        wd,
        milestones,
        gamma,
        seed,
        log_every,
        nan_policy,
        save_minutes,
        scheme,
        q_type,
        q_level,
        weight_observer,
        ptq_batches,
        percentile,
        weights,
        activations
    );
    // wbwtab's main.py trains without weight decay unless told otherwise.
    if c.scheme == SchemeName::Wbwtab && a.resume.is_none() && !given("wd") {
        c.wd = 0.0;
    }
    c.ptq |= a.ptq;
    c.qaft |= a.qaft;
    c.bn_fuse |= a.bn_fuse;
    c.pretrained_model |= a.pretrained_model;
    c.bn_fuse_calib |= a.bn_fuse_calib;
    if take("w_bits") {
        c.w_bits = Bits::new(a.w_bits)?;
    }
    if take("a_bits") {
        c.a_bits = Bits::new(a.a_bits)?;
    }
    c.quantize_first_layer |= a.quantize_first_layer;
    c.nesterov |= a.nesterov;
    c.tune_kernels |= a.tune_kernels;
    c.augment &= !a.no_augment;
    c.shuffle &= !a.no_shuffle;
    for (field, v) in [(&mut c.data, &a.data), (&mut c.init, &a.init)] {
        if v.is_some() {
            *field = v.clone();
        }
    }
    if a.steps.is_some() {
        c.steps = a.steps;
    }
    if a.train_limit.is_some() {
        c.train_limit = a.train_limit;
    }
    if a.test_limit.is_some() {
        c.test_limit = a.test_limit;
    }
    Ok(c)
}

pub(crate) fn train(a: TrainArgs, m: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let config = train_config(&a, &given)?;
    let out = match (&a.resume, &a.out) {
        (Some(r), Some(o)) if r != o => {
            anyhow::bail!("--resume continues the run in its own folder: leave out --out")
        }
        (Some(r), _) => r.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => PathBuf::from("runs").join(wgqat::util::timestamp()),
    };
    let gpu = Gpu::new(&a.gpu.options())?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step and saving (Ctrl-C again quits at once)");
        });
    }
    let display = if a.quiet {
        Display::Quiet
    } else if a.plain {
        Display::Plain
    } else {
        Display::Auto
    };
    let summary = wgqat::train::train(
        &gpu,
        TrainOptions {
            config,
            out,
            resume: a.resume.is_some(),
            display,
            wording: as_flags,
            stop: Some(stop),
        },
    )?;
    let eval = summary.last_eval.map_or(String::new(), |(l, acc)| {
        format!(", last test loss {l:.4} accuracy {acc:.2}%")
    });
    eprintln!(
        "{}: {} steps, {} epochs done{eval}, best test accuracy {:.2}%; run folder {}",
        match summary.stopped {
            Stopped::Finished => "finished",
            Stopped::StepLimit => "stopped at --steps",
            Stopped::Interrupted => "interrupted",
        },
        summary.global_step,
        summary.epochs_done,
        summary.best_acc,
        summary.run_dir.display()
    );
    Ok(if summary.stopped == Stopped::Interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Model and bits for a checkpoint: the flags, else what a wgqat checkpoint records about itself.
pub(crate) fn checkpoint_config(
    path: &std::path::Path,
    model: &Option<String>,
    w: Option<u32>,
    a: Option<u32>,
    first: bool,
) -> anyhow::Result<TrainConfig> {
    let meta = safetensors_meta(path);
    let recorded_bits = |k: &str| meta.get(k).and_then(|v| v.parse::<u32>().ok());
    let model = model.clone().or_else(|| {
        meta.get("model")
            .filter(|m| wgqat::models::BUILTIN.contains(&m.as_str()))
            .cloned()
    });
    // The scheme a wgqat checkpoint records (DoReFa when it records none).
    let scheme: wgqat::quant::Scheme = match meta.get("scheme") {
        Some(j) => serde_json::from_str(j).map_err(|e| {
            anyhow::anyhow!(
                "{}: its recorded scheme {j} is not one this wgqat knows ({e})",
                path.display()
            )
        })?,
        None => wgqat::quant::Scheme::Dorefa,
    };
    let mut config = TrainConfig::default();
    config.set_scheme(scheme);
    Ok(TrainConfig {
        model: model.unwrap_or_else(|| "nin_gc".into()),
        w_bits: bits(w.or(recorded_bits("w_bits")), Bits::new(8)?)?,
        a_bits: bits(a.or(recorded_bits("a_bits")), Bits::new(8)?)?,
        quantize_first_layer: first
            || meta
                .get("quantize_first_layer")
                .is_some_and(|v| v == "true"),
        ..config
    })
}

pub(crate) fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let config = TrainConfig {
        data: a.data.clone(),
        eval_batch_size: a.eval_batch_size,
        test_limit: a.test_limit,
        seed: a.seed,
        ..checkpoint_config(
            &a.checkpoint,
            &a.model,
            a.w_bits,
            a.a_bits,
            a.quantize_first_layer,
        )?
    };
    if a.eval_batch_size == 0 {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let gpu = Gpu::new(&a.gpu.options())?;
    let r = wgqat::train::eval::evaluate(&gpu, &config, &a.checkpoint, &|s| {
        eprintln!("{}", as_flags(s))
    })?;
    if let Some(p) = &a.predictions {
        let text: String = r.predictions.iter().map(|l| format!("{l}\n")).collect();
        wgqat::util::atomic_write(p, text.as_bytes())?;
    }
    if let Some(p) = &a.logits {
        write_logits(p, &r.logits, r.logits.len() / r.images.max(1))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "images": r.images, "loss": r.loss, "acc": r.acc, "model": config.model, "w_bits": config.w_bits, "a_bits": config.a_bits, "scheme": config.quant().scheme })
        );
    } else {
        println!(
            "{}: {} test images, loss {:.4}, accuracy {:.2}% ({} {})",
            a.checkpoint.display(),
            r.images,
            r.loss,
            r.acc,
            config.model,
            config.quant().describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The string metadata of a safetensors file (empty when unreadable; loading reports errors).
fn safetensors_meta(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    wgqat::nn::checkpoint::read(path)
        .map(|(_, m)| m)
        .unwrap_or_default()
}

pub(crate) fn model(name: &str, summary: bool) -> anyhow::Result<ExitCode> {
    let spec = wgqat::models::load(name)?;
    if !summary {
        println!("{}", serde_json::to_string_pretty(&spec)?);
        return Ok(ExitCode::SUCCESS);
    }
    let graph = spec.graph()?;
    let params = graph.param_counts();
    let width = graph.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    println!("{}: input {:?}", spec.name, spec.input);
    for (i, (n, p)) in graph.nodes.iter().zip(&params).enumerate() {
        // Where the layer reads from, when not the layer just before it.
        let from: Vec<String> = n
            .inputs
            .iter()
            .map(|s| match s {
                wgqat::models::Source::Input => "input".to_string(),
                wgqat::models::Source::Node(k) => graph.nodes[*k].name.clone(),
            })
            .collect();
        let chain = i > 0 && n.inputs == [wgqat::models::Source::Node(i - 1)];
        println!(
            "{:>3} {:<11} {:<width$} {:>14} {:>10}{}",
            i,
            n.layer.kind(),
            n.name,
            format!("{:?}", n.out_shape),
            p,
            if chain || i == 0 {
                String::new()
            } else {
                format!("  <- {}", from.join(" + "))
            }
        );
    }
    println!("{} parameters", params.iter().sum::<usize>());
    Ok(ExitCode::SUCCESS)
}

/// Width of a benchmark table's model column: its longest name.
pub(crate) fn model_column(specs: &[wgqat::models::ModelSpec]) -> usize {
    specs.iter().map(|s| s.name.len()).max().unwrap_or(0).max(5)
}
