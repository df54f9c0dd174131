//! The `wgqat` command line.

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use wgqat::gpu::{AdapterSummary, Gpu, GpuOptions};
use wgqat::quant::{Bits, Observer, QLevel, QType, SchemeName};
use wgqat::train::progress::Display;
use wgqat::train::{NanPolicy, OptimizerName, Stopped, TrainConfig, TrainOptions};

#[derive(Parser)]
#[command(
    name = "wgqat",
    version,
    about = "Quantization-aware training on any GPU through wgpu (Vulkan, Metal, DX12)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List GPU adapters, the one wgqat would choose, its features and limits.
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Quantization-aware training with micronet's DoReFa recipe (synthetic data unless --data).
    Train(Box<TrainArgs>),
    /// Test loss and accuracy of a checkpoint.
    Eval(EvalArgs),
    /// Export a checkpoint for deployment: the integer model (default) or ONNX.
    Export(ExportArgs),
    /// Run an exported integer model on the GPU: test accuracy of a dataset, or top-k of images.
    Infer(InferArgs),
    /// Datasets: `data synthetic --out DIR` writes the built-in synthetic set as CIFAR-10 files.
    Data {
        #[command(subcommand)]
        what: DataWhat,
    },
    /// Print a model as JSON (the vocabulary of --model FILE.json), or its layers and shapes.
    Model {
        /// A built-in model (nin_gc, nin, resnet18, resnet34, resnet50) or a model JSON file.
        name: String,
        /// A table of layers, output shapes and parameters instead of JSON.
        #[arg(long)]
        summary: bool,
    },
    /// Run every kernel and direction against the CPU reference on this adapter; exit non-zero
    /// on any failure. Check a new GPU or driver with it before training or embedding.
    Selftest {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only kernels whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// QAT training throughput (img/s), per-kernel time, submits and allocations per step, peak
    /// memory; `bench kernels` times single kernels.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Models (comma list of built-in names, e.g. nin_gc, nin, resnet18, or JSON files).
    #[arg(long, default_value = "nin_gc,nin", value_delimiter = ',')]
    model: Vec<String>,
    /// Bits, weights and activations alike (comma list; 32 = float).
    #[arg(long, default_value = "8,32", value_delimiter = ',')]
    bits: Vec<u32>,
    /// Quantization schemes (comma list): dorefa, iao (symmetric, per-channel weights, min-max
    /// weight observers: micronet's README setting), wbwtab (binary weights and activations).
    /// Float runs once, whatever the scheme.
    #[arg(long, value_enum, default_value = "dorefa", value_delimiter = ',')]
    scheme: Vec<SchemeName>,
    /// IAO rows also with each conv's BatchNorm folded in (micronet's bn_fuse), beside them.
    #[arg(long)]
    bn_fuse: bool,
    /// Batch sizes (comma list) [default: 50,128,256; with --infer 1,256].
    #[arg(long, value_delimiter = ',')]
    batch: Option<Vec<usize>>,
    /// Benchmark inference instead: the exported integer model vs fake-quant float inference.
    #[arg(long)]
    infer: bool,
    /// Untimed steps first (pipelines compiled, buffers allocated).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed steps (0 with --warmup 0: peak memory only, nothing runs).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Skip the per-kernel breakdown.
    #[arg(long)]
    no_breakdown: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file, rewritten after every row: a run stopped early
    /// (a time limit) leaves the rows it finished.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Time every kernel and direction of a training step at the models' real layer shapes.
    Kernels {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Models (comma list of built-in names, e.g. nin_gc, nin, resnet18, or JSON files).
        #[arg(long, default_value = "nin_gc,nin", value_delimiter = ',')]
        model: Vec<String>,
        /// Batch sizes (comma list).
        #[arg(long, default_value = "50,256", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Bits of the quantizer kernels (2..=16; 32 leaves them out).
        #[arg(long, default_value_t = 8)]
        bits: u32,
        /// Timed runs per kernel (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file, rewritten after every row: a run stopped
        /// early (a time limit) leaves the rows it finished.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `wgqat train`. Options left out take micronet's defaults (`TrainConfig::default`, which the
/// help shows), or on --resume the run's own.
#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    gpu: GpuArgs,
    /// A built-in model (nin_gc, nin, resnet18, resnet34, resnet50) or a model JSON file.
    #[arg(long, default_value_t = TrainConfig::default().model)]
    model: String,
    /// CIFAR-10 binary folder (or its parent); without it, the built-in synthetic dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Weight bits: 2..=16, or 32 for float.
    #[arg(long, default_value_t = TrainConfig::default().w_bits.get())]
    w_bits: u32,
    /// Activation bits: 2..=16, or 32 for float.
    #[arg(long, default_value_t = TrainConfig::default().a_bits.get())]
    a_bits: u32,
    /// Quantize the first conv too (DoReFa; micronet leaves it float).
    #[arg(long)]
    quantize_first_layer: bool,
    /// The quantization scheme: micronet's wqaq/dorefa or wqaq/iao.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().scheme)]
    scheme: SchemeName,
    /// IAO: symmetric (signed codes) or asymmetric (unsigned codes and a zero point).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().q_type)]
    q_type: QType,
    /// IAO: weight scales per output channel or one per layer.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().q_level)]
    q_level: QLevel,
    /// IAO: the weights' observer (running extremes, or a moving average with momentum 0.1).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().weight_observer)]
    weight_observer: Observer,
    /// IAO: post-training quantization of the `--init` model instead of training: calibrate
    /// observers and BatchNorm statistics on --ptq-batches (+1) training batches, forward only,
    /// then evaluate and save.
    #[arg(long)]
    ptq: bool,
    /// IAO PTQ: calibration batches (micronet's --ptq_batch).
    #[arg(long, default_value_t = TrainConfig::default().ptq_batches)]
    ptq_batches: usize,
    /// IAO PTQ: the activation observer's percentile of |x|.
    #[arg(long, default_value_t = TrainConfig::default().percentile)]
    percentile: f64,
    /// IAO: quantization-aware fine-tuning with every scale and zero point frozen (use a small
    /// --lr, e.g. 1e-5, and --init a QAT or PTQ checkpoint).
    #[arg(long)]
    qaft: bool,
    /// IAO: fold each conv's BatchNorm into it during QAT (micronet's QuantBNFuseConv2d).
    #[arg(long)]
    bn_fuse: bool,
    /// IAO --bn-fuse: the first step updates the --init model's running statistics instead of
    /// replacing them with the batch's.
    #[arg(long)]
    pretrained_model: bool,
    /// IAO --bn-fuse: fold the weight with the running variance (as inference will) and rescale
    /// the conv to the batch's statistics (micronet's --bn_fuse_calib).
    #[arg(long)]
    bn_fuse_calib: bool,
    /// wbwtab: binary (±α), ternary (−α, 0, +α) or float weights (micronet's --W 2|3|32).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().weights)]
    weights: wgqat::quant::Weights,
    /// wbwtab: binary (sign) or float (ReLU) activations (micronet's --A 2|32).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().activations)]
    activations: wgqat::quant::Activations,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().eval_batch_size)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: u32,
    /// Stop after N optimizer steps in all (saving last.safetensors).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, value_enum, default_value_t = TrainConfig::default().optimizer)]
    optimizer: OptimizerName,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = TrainConfig::default().momentum)]
    momentum: f32,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay, coupled L2 on all parameters.
    #[arg(long, default_value_t = TrainConfig::default().wd)]
    wd: f32,
    /// Epochs at whose start lr is multiplied by gamma.
    #[arg(long, value_delimiter = ',', default_values_t = TrainConfig::default().milestones)]
    milestones: Vec<u32>,
    #[arg(long, default_value_t = TrainConfig::default().gamma)]
    gamma: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Initial weights: a state dict in safetensors (micronet names).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue the run in this folder.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Run folder [default: runs/<timestamp>].
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    no_augment: bool,
    #[arg(long)]
    no_shuffle: bool,
    /// Use only the first N training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Read metrics back and log every N steps.
    #[arg(long, default_value_t = TrainConfig::default().log_every)]
    log_every: u64,
    /// On a non-finite loss.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().nan_policy)]
    nan_policy: NanPolicy,
    /// Save resume state at least this often, in minutes; 0: at every metrics line.
    #[arg(long, default_value_t = TrainConfig::default().save_minutes)]
    save_minutes: f64,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    plain: bool,
    /// Print only errors and the final summary.
    #[arg(long)]
    quiet: bool,
}

/// `wgqat eval`. Model and bits default to what the checkpoint records, else nin_gc W8A8.
#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    gpu: GpuArgs,
    /// A checkpoint (safetensors state dict, micronet names).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A built-in model or a model JSON [default: recorded in the checkpoint, else nin_gc].
    #[arg(long)]
    model: Option<String>,
    /// CIFAR-10 binary folder (without it: the synthetic test set).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Weight bits [default: recorded in the checkpoint, else 8].
    #[arg(long)]
    w_bits: Option<u32>,
    /// Activation bits [default: recorded in the checkpoint, else 8].
    #[arg(long)]
    a_bits: Option<u32>,
    /// The checkpoint was trained with a quantized first layer [default: as it records].
    #[arg(long)]
    quantize_first_layer: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
    /// Use only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// The synthetic dataset's seed (when no --data).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write one predicted label per line here.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Write the logits here: one line per image, space-separated.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Which model, bits and data a checkpoint goes with: flags, else what the checkpoint records.
#[derive(Args)]
struct CheckpointArgs {
    /// A checkpoint (safetensors state dict, micronet names).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A built-in model or a model JSON [default: recorded in the checkpoint, else nin_gc].
    #[arg(long)]
    model: Option<String>,
    /// Weight bits [default: recorded in the checkpoint, else 8].
    #[arg(long)]
    w_bits: Option<u32>,
    /// Activation bits [default: recorded in the checkpoint, else 8].
    #[arg(long)]
    a_bits: Option<u32>,
    /// The checkpoint was trained with a quantized first layer [default: as it records].
    #[arg(long)]
    quantize_first_layer: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Int)]
    format: ExportFormat,
}

#[derive(Args)]
struct InferArgs {
    #[command(flatten)]
    gpu: GpuArgs,
    /// An integer model written by `wgqat export`.
    #[arg(long)]
    model: PathBuf,
    /// CIFAR-10 binary folder: its test set (without it and without images: the synthetic set).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Images (PNG or JPEG) to classify.
    images: Vec<PathBuf>,
    /// Write one predicted label per line here.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Write the logits here: one line per image, space-separated.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Images per batch (one submit each).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Use only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// The synthetic dataset's seed (when no --data).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DataWhat {
    /// Write the built-in synthetic dataset as CIFAR-10 binary files (data_batch_1.bin, test_batch.bin).
    Synthetic {
        /// Folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Seed (the same seed gives the same images as `train`/`eval` without --data).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Training images.
        #[arg(long, default_value_t = 50_000)]
        train: usize,
        /// Test images.
        #[arg(long, default_value_t = 10_000)]
        test: usize,
    },
}

/// The graphics APIs, spelled as WGPU_BACKEND spells them.
#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

/// What `wgqat export` writes.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ExportFormat {
    /// The integer model for `wgqat infer` and the C API.
    Int,
    /// ONNX (opset 17).
    Onnx,
}

/// Adapter choice, shared by every command that uses the GPU.
#[derive(Args, Clone, Default)]
struct GpuArgs {
    /// Graphics API (default: env WGPU_BACKEND, else the native ones, GL only without them).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Use the adapter whose name contains this (default: env WGPU_ADAPTER_NAME, else the
    /// highest-performance one).
    #[arg(long)]
    adapter: Option<String>,
    /// Compile every shader with bounds checks (slower; for finding an out-of-bounds access on
    /// a driver; env WGQAT_SHADER_CHECKS=1 does the same).
    #[arg(long)]
    shader_checks: bool,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self
                .backend
                .and_then(|b| b.to_possible_value())
                .map(|v| v.get_name().to_string()),
            adapter: self.adapter.clone(),
            shader_checks: self.shader_checks,
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { wgqat::gpu::ensure_runtime_dir() };
    // Output piped into a reader that stops early (`wgqat selftest | head`) ends wgqat quietly,
    // as it ends other Unix tools, instead of panicking in println!. (Rust ignores SIGPIPE by
    // default; files are written atomically, so nothing saved is left half-written.)
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,wgpu_hal=error,wgpu_core=error,naga=error"),
    )
    .format_timestamp(None)
    .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli, &matches) {
        Ok(code) => code,
        Err(e) => {
            // wgqat's errors are one line that already names their cause.
            eprintln!("error: {}", as_flags(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// The library names settings in backticks (`` `batch_size` ``); on the command line they are
/// flags (`--batch-size`). Other backticked words are left as they are.
fn as_flags(message: &str) -> String {
    let settings = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    let is_flag = |w: &str| {
        settings.get(w).is_some() || matches!(w, "out" | "resume" | "backend" | "adapter")
    };
    let parts: Vec<&str> = message.split('`').collect();
    let mut out = String::with_capacity(message.len());
    for (i, part) in parts.iter().enumerate() {
        let quoted = i % 2 == 1 && i + 1 < parts.len();
        match (quoted, i % 2 == 1) {
            (true, _) if is_flag(part) => {
                out.push_str("--");
                out.push_str(&part.replace('_', "-"));
            }
            (true, _) => out.push_str(&format!("`{part}`")),
            // A backtick that is never closed.
            (false, true) => out.push_str(&format!("`{part}")),
            (false, false) => out.push_str(part),
        }
    }
    out
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info { gpu, json } => info(&gpu.options(), json),
        Command::Train(args) => train(
            *args,
            matches.subcommand_matches("train").expect("train matches"),
        ),
        Command::Eval(args) => eval(args),
        Command::Model { name, summary } => model(&name, summary),
        Command::Export(a) => export(a),
        Command::Infer(a) => infer(a),
        Command::Data {
            what:
                DataWhat::Synthetic {
                    out,
                    seed,
                    train,
                    test,
                },
        } => {
            std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            let (tr, te) = wgqat::data::synthetic::train_test(seed, train, test);
            wgqat::util::atomic_write(&out.join("data_batch_1.bin"), &tr.to_records())?;
            wgqat::util::atomic_write(&out.join("test_batch.bin"), &te.to_records())?;
            eprintln!(
                "wrote {} training and {} test images (seed {seed}) to {}",
                train,
                test,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { gpu, json, filter } => {
            selftest(&gpu.options(), json, filter.as_deref())
        }
        Command::Bench(b) => match &b.what {
            Some(BenchWhat::Kernels {
                gpu,
                model,
                batch,
                bits,
                repeat,
                json,
                out,
            }) => bench_kernels(
                &gpu.options(),
                model,
                batch,
                (*bits, *repeat),
                *json,
                out.as_deref(),
            ),
            None => bench_training(&b),
        },
    }
}

fn selftest(opts: &GpuOptions, json: bool, filter: Option<&str>) -> anyhow::Result<ExitCode> {
    let gpu = Gpu::new(opts)?;
    let cases: Vec<_> = wgqat::selftest::cases()
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.kernel.contains(f)))
        .collect();
    if !json {
        println!("selftest on {} ({} cases)", gpu.describe(), cases.len());
        println!(
            "{:<17} {:<22} {:<48} {:>11} {:>11} {:>8}  result",
            "kernel", "direction", "shape", "max abs", "max rel", "ms"
        );
    }
    let mut outcomes = Vec::new();
    for case in &cases {
        let o = case.run(&gpu);
        if !json {
            let worst = o
                .outputs
                .iter()
                .max_by(|a, b| a.1.max_abs.total_cmp(&b.1.max_abs))
                .map(|(_, r)| r);
            let result = match (&o.error, o.passed()) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, true) => "ok".to_string(),
                (None, false) => {
                    let bad: Vec<String> = o
                        .outputs
                        .iter()
                        .filter(|(_, r)| !r.passed())
                        .map(|(n, r)| format!("{n}: {}", r.summary()))
                        .collect();
                    format!("FAIL {}", bad.join("; "))
                }
            };
            println!(
                "{:<17} {:<22} {:<48} {:>11.3e} {:>11.3e} {:>8.1}  {}",
                o.kernel,
                o.direction,
                o.shape,
                worst.map_or(0.0, |r| r.max_abs),
                worst.map_or(0.0, |r| r.max_rel),
                o.seconds * 1e3,
                result
            );
        }
        outcomes.push(o);
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    if json {
        let out = serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "passed": outcomes.len() - failed,
            "failed": failed,
            "cases": outcomes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{} passed, {} failed", outcomes.len() - failed, failed);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench_kernels(
    opts: &GpuOptions,
    models: &[String],
    batches: &[usize],
    (bits, repeat): (u32, usize),
    json: bool,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let bits = wgqat::quant::Bits::new(bits)?;
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let specs = models
        .iter()
        .map(|m| wgqat::models::load(m))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let gpu = Gpu::new(opts)?;
    let report = |rows: &[wgqat::bench::KernelTiming]| {
        serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "cooperative_matrices": coop_name(&gpu),
            "kernels": rows,
        })
    };
    if !json {
        println!(
            "kernel benchmark on {} ({})",
            gpu.describe(),
            wgqat::bench::timer(&gpu)
        );
        println!(
            "{:<7} {:>5} {:<13} {:<13} {:<14} {:<44} {:>10} {:>9} {:>9} {:>10}",
            "model",
            "batch",
            "layer",
            "kernel",
            "direction",
            "shape",
            "ms",
            "GFLOP/s",
            "GFLOP",
            "MiB bound"
        );
    }
    // Each row printed (table) and the file rewritten (--out) as it is measured.
    let mut so_far = Vec::new();
    let rows = wgqat::bench::kernels(&gpu, &specs, batches, bits, repeat, &mut |r| {
        if !json {
            print_kernel_row(r);
        }
        if let Some(path) = out {
            so_far.push(r.clone());
            write_report(path, &report(&so_far))?;
        }
        Ok(())
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    } else {
        print_coop_vs_fp32(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the adapter has tensor cores, each of their GEMMs beside the fp32 kernel's, and per
/// model and batch the time of those GEMMs all on fp32, all on tensor cores, and each on the
/// faster (what a per-layer choice would give).
fn print_coop_vs_fp32(rows: &[wgqat::bench::KernelTiming]) {
    let pairs = wgqat::bench::coop_vs_fp32(rows);
    if pairs.is_empty() {
        return;
    }
    println!(
        "\ntensor cores against the fp32 kernels (speed-up above 1: the tensor cores are faster)"
    );
    println!(
        "{:<7} {:>5} {:<13} {:<14} {:>10} {:>10} {:>9}",
        "model", "batch", "layer", "direction", "fp32 ms", "coop ms", "speed-up"
    );
    let ms = |r: &wgqat::bench::KernelTiming| r.seconds.unwrap_or(0.0) * 1e3;
    for p in &pairs {
        println!(
            "{:<7} {:>5} {:<13} {:<14} {:>10.3} {:>10.3} {:>8.2}x",
            p.fp32.model,
            p.fp32.batch,
            p.fp32.layer,
            p.fp32.direction,
            ms(p.fp32),
            ms(p.coop),
            p.speedup()
        );
    }
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for p in &pairs {
        let key = (p.fp32.model.as_str(), p.fp32.batch);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    for (model, batch) in groups {
        let of = || {
            pairs
                .iter()
                .filter(move |p| (p.fp32.model.as_str(), p.fp32.batch) == (model, batch))
        };
        let fp32: f64 = of().map(|p| ms(p.fp32)).sum();
        let coop: f64 = of().map(|p| ms(p.coop)).sum();
        let best: f64 = of().map(|p| ms(p.fp32).min(ms(p.coop))).sum();
        println!(
            "{model} batch {batch}: these GEMMs all on fp32 {fp32:.3} ms, all on tensor cores {coop:.3} ms, each on the faster {best:.3} ms"
        );
    }
}

/// One row of `bench kernels`' table.
fn print_kernel_row(r: &wgqat::bench::KernelTiming) {
    let time = r
        .seconds
        .map_or("-".to_string(), |s| format!("{:.3}", s * 1e3));
    let rate = r.gflops.map_or("-".to_string(), |g| format!("{g:.1}"));
    println!(
        "{:<7} {:>5} {:<13} {:<13} {:<14} {:<44} {:>10} {:>9} {:>9.3} {:>10}{}",
        r.model,
        r.batch,
        r.layer,
        r.kernel,
        r.direction,
        r.shape,
        time,
        rate,
        r.flops * 1e-9,
        r.bound_bytes
            .map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1048576.0)),
        r.error
            .as_ref()
            .map_or(String::new(), |e| format!("  skipped: {e}"))
    );
}

/// A benchmark's JSON report as it stands, written whole over `path` (`--out`).
fn write_report(path: &Path, report: &serde_json::Value) -> wgqat::Result<()> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| wgqat::Error::Invalid(format!("benchmark report: {e}")))?;
    wgqat::util::atomic_write(path, format!("{text}\n").as_bytes())
}

fn info(opts: &GpuOptions, json: bool) -> anyhow::Result<ExitCode> {
    let (adapters, chosen) = Gpu::probe(opts);
    let chosen_json = match &chosen {
        Ok(gpu) => {
            let l = &gpu.limits;
            serde_json::json!({
                "adapter": AdapterSummary::of(&gpu.info),
                "features": gpu.caps.names(),
                "cooperative_matrices": coop_name(gpu),
                "subgroup_size": [gpu.info.subgroup_min_size, gpu.info.subgroup_max_size],
                "limits": {
                    "max_buffer_size": l.max_buffer_size,
                    "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                    "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
                    "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                    "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
                    "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
                    "min_storage_buffer_offset_alignment": l.min_storage_buffer_offset_alignment,
                },
            })
        }
        Err(_) => serde_json::Value::Null,
    };
    let error = chosen.as_ref().err().map(|e| e.to_string());
    if json {
        let out = serde_json::json!({
            "adapters": adapters,
            "chosen": chosen_json,
            "error": error,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("adapters found: {}", adapters.len());
        for (i, a) in adapters.iter().enumerate() {
            println!(
                "  [{i}] {} ({}, {}) driver: {} {}",
                a.name, a.backend, a.device_type, a.driver, a.driver_info
            );
        }
        if let Ok(gpu) = &chosen {
            let l = &gpu.limits;
            println!("chosen: {}", gpu.describe());
            println!("  features used: {}", gpu.caps.names().join(", "));
            println!(
                "  cooperative matrices: {}",
                match (gpu.coop(), gpu.coop_grad_weight(), gpu.coop_grad_input()) {
                    (Some(wgqat::gpu::CoopMode::Hardware), Some(_), Some(_)) => {
                        "used for quantized convs' forward, grad-weight and grad-input (f16 16x16x16 -> f32, checked against fp32 at start)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), Some(_), None) => {
                        "used for quantized convs' forward and grad-weight (f16 16x16x16 -> f32, checked against fp32 at start; grad-input stays fp32: it failed its check, or WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), None, Some(_)) => {
                        "used for quantized convs' forward and grad-input (f16 16x16x16 -> f32, checked against fp32 at start; grad-weight stays fp32: WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), None, None) => {
                        "used for quantized conv forwards (f16 16x16x16 -> f32, checked against fp32 at start; the backward stays fp32: it failed its check, or WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Emulated), ..) =>
                        "emulated in plain WGSL (WGQAT_COOP=emulate)",
                    (None, ..) => "not used (none on this adapter, or WGQAT_COOP=0)",
                }
            );
            println!(
                "  subgroup size: {}..{}",
                gpu.info.subgroup_min_size, gpu.info.subgroup_max_size
            );
            println!("  max buffer size: {} MiB", l.max_buffer_size >> 20);
            println!(
                "  max storage binding: {} MiB",
                l.max_storage_buffer_binding_size >> 20
            );
            println!(
                "  storage buffers per stage: {}",
                l.max_storage_buffers_per_shader_stage
            );
            println!(
                "  workgroup memory: {} KiB, invocations per workgroup: {}",
                l.max_compute_workgroup_storage_size >> 10,
                l.max_compute_invocations_per_workgroup
            );
            println!(
                "  workgroups per dimension: {}",
                l.max_compute_workgroups_per_dimension
            );
        }
    }
    match error {
        Some(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

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

fn train(a: TrainArgs, m: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
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
fn checkpoint_config(
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

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
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

fn model(name: &str, summary: bool) -> anyhow::Result<ExitCode> {
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
fn model_column(specs: &[wgqat::models::ModelSpec]) -> usize {
    specs.iter().map(|s| s.name.len()).max().unwrap_or(0).max(5)
}

/// The configurations `bench` runs: each scheme at each width (IAO also with BN folding under
/// `--bn-fuse`; wbwtab binary whatever the bits), float once.
fn bench_quants(a: &BenchArgs, bits: &[Bits]) -> Vec<wgqat::quant::QuantConfig> {
    let mut quants: Vec<wgqat::quant::QuantConfig> = Vec::new();
    for &b in bits {
        for &scheme in &a.scheme {
            let q = match scheme {
                _ if b.is_float() => wgqat::quant::QuantConfig::dorefa(b, b),
                SchemeName::Dorefa => wgqat::quant::QuantConfig::dorefa(b, b),
                SchemeName::Iao => wgqat::quant::QuantConfig::iao(b, b, Default::default()),
                // Binary weights and activations, whatever the bits say.
                SchemeName::Wbwtab => wgqat::quant::QuantConfig {
                    scheme: wgqat::quant::Scheme::Wbwtab(Default::default()),
                    ..wgqat::quant::QuantConfig::dorefa(b, b)
                },
            };
            if !quants.contains(&q) {
                quants.push(q);
            }
            if a.bn_fuse && scheme == SchemeName::Iao && !b.is_float() {
                let o = wgqat::quant::IaoOptions {
                    bn_fuse: true,
                    ..Default::default()
                };
                quants.push(wgqat::quant::QuantConfig::iao(b, b, o));
            }
        }
    }
    quants
}

fn bench_training(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if a.infer {
        return bench_inference(a);
    }
    let batches = a.batch.clone().unwrap_or_else(|| vec![50, 128, 256]);
    let bits = a
        .bits
        .iter()
        .map(|&b| Bits::new(b))
        .collect::<wgqat::Result<Vec<_>>>()?;
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let specs = a
        .model
        .iter()
        .map(|m| wgqat::models::load(m))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let gpu = Gpu::new(&a.gpu.options())?;
    let opts = wgqat::bench::TrainingOptions {
        warmup: a.warmup,
        steps: a.steps,
        breakdown: !a.no_breakdown,
    };
    let mut rows = Vec::new();
    let mw = model_column(&specs);
    if !a.json {
        println!(
            "training benchmark on {} (wall clock over {} steps after {} warm-up steps)",
            gpu.describe(),
            a.steps,
            a.warmup
        );
        println!(
            "{:<mw$} {:>11} {:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12}",
            "model",
            "bits",
            "batch",
            "img/s",
            "ms/step",
            "submits/step",
            "allocs/step",
            "peak MiB",
            "dispatches",
            "mem GiB",
            "1st step s"
        );
    }
    let quants = bench_quants(a, &bits);
    let report = |rows: &[wgqat::bench::TrainingBench]| {
        serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "cooperative_matrices": coop_name(&gpu),
            "training": rows,
        })
    };
    for spec in &specs {
        for &q in &quants {
            for &batch in &batches {
                let r = wgqat::bench::training(&gpu, spec, q, batch, &opts);
                if !a.json {
                    let f = |v: Option<f64>, p: usize| {
                        v.map_or("-".to_string(), |x| format!("{x:.p$}"))
                    };
                    println!(
                        "{:<mw$} {:>11} {:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12}{}",
                        r.model,
                        q.label(),
                        batch,
                        f(r.img_per_s, 1),
                        f(r.step_ms, 1),
                        f(r.submits_per_step, 2),
                        f(r.allocations_per_step, 2),
                        f(r.peak_memory_bytes.map(|m| m as f64 / 1048576.0), 1),
                        r.dispatches_per_step.map_or("-".into(), |d| d.to_string()),
                        f(
                            r.memory_bound_bytes_per_step
                                .map(|m| m as f64 / (1u64 << 30) as f64),
                            2
                        ),
                        f(r.first_step_s, 2),
                        r.error
                            .as_ref()
                            .map_or(String::new(), |e| format!("  skipped: {e}"))
                    );
                    for k in r.kernels.iter().take(6) {
                        println!(
                            "{:>30} {:>4} launches {:>9.3} ms {:>5.1}%",
                            k.kernel, k.launches, k.ms, k.percent
                        );
                    }
                }
                rows.push(r);
                if let Some(path) = &a.out {
                    write_report(path, &report(&rows))?;
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_inference(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let batches = a.batch.clone().unwrap_or_else(|| vec![1, 256]);
    // Float has no integer form: the default bits list's 32 is dropped.
    let bits = a
        .bits
        .iter()
        .filter(|&&b| b != 32)
        .map(|&b| Bits::new(b))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let quants = bench_quants(a, &bits);
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    if bits.is_empty() {
        anyhow::bail!("no quantized bits to benchmark: give --bits 2..=8");
    }
    let specs = a
        .model
        .iter()
        .map(|m| wgqat::models::load(m))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let gpu = Gpu::new(&a.gpu.options())?;
    let opts = wgqat::bench::TrainingOptions {
        warmup: a.warmup,
        steps: a.steps,
        breakdown: false,
    };
    let mw = model_column(&specs);
    let report = |rows: &[wgqat::bench::InferenceBench]| serde_json::json!({ "adapter": AdapterSummary::of(&gpu.info), "inference": rows });
    if !a.json {
        println!(
            "inference benchmark on {} (wall clock over {} batches after {} warm-up batches, inputs on the GPU)",
            gpu.describe(),
            a.steps,
            a.warmup
        );
        println!(
            "{:<mw$} {:>13} {:>6} {:>12} {:>12} {:>14} {:>14} {:>8}",
            "model",
            "quantization",
            "batch",
            "int img/s",
            "int ms",
            "fake-q img/s",
            "fake-q ms",
            "speedup"
        );
    }
    let mut rows = Vec::new();
    for spec in &specs {
        for &q in &quants {
            for &batch in &batches {
                let r = wgqat::bench::inference(&gpu, spec, q, batch, &opts);
                if !a.json {
                    let f = |v: Option<f64>, p: usize| {
                        v.map_or("-".to_string(), |x| format!("{x:.p$}"))
                    };
                    let speedup = r
                        .int_img_per_s
                        .zip(r.fake_quant_img_per_s)
                        .map(|(i, q)| i / q);
                    println!(
                        "{:<mw$} {:>13} {:>6} {:>12} {:>12} {:>14} {:>14} {:>8}{}",
                        r.model,
                        r.quant,
                        batch,
                        f(r.int_img_per_s, 1),
                        f(r.int_batch_ms, 2),
                        f(r.fake_quant_img_per_s, 1),
                        f(r.fake_quant_batch_ms, 2),
                        speedup.map_or("-".to_string(), |s| format!("{s:.2}x")),
                        r.error
                            .as_ref()
                            .map_or(String::new(), |e| format!("  skipped: {e}"))
                    );
                }
                rows.push(r);
                if let Some(path) = &a.out {
                    write_report(path, &report(&rows))?;
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Logits as text, one image per line (shortest decimal that reads back as the same f32).
fn write_logits(path: &std::path::Path, logits: &[f32], classes: usize) -> anyhow::Result<()> {
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

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
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

fn infer(a: InferArgs) -> anyhow::Result<ExitCode> {
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

/// How quantized convs run on `gpu`, for JSON reports: "hardware" (forward, grad-weight and
/// grad-input on the adapter's cooperative matrices), "hardware, forward and grad-weight",
/// "hardware, forward and grad-input", "hardware, forward only", "emulated"
/// (`WGQAT_COOP=emulate`) or "none".
fn coop_name(gpu: &Gpu) -> &'static str {
    use wgqat::gpu::CoopMode::{Emulated, Hardware};
    match (gpu.coop(), gpu.coop_grad_weight(), gpu.coop_grad_input()) {
        (Some(Hardware), Some(_), Some(_)) => "hardware",
        (Some(Hardware), Some(_), None) => "hardware, forward and grad-weight",
        (Some(Hardware), None, Some(_)) => "hardware, forward and grad-input",
        (Some(Hardware), None, None) => "hardware, forward only",
        (Some(Emulated), ..) => "emulated",
        (None, ..) => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::as_flags;

    #[test]
    fn settings_in_backticks_become_flags() {
        assert_eq!(
            as_flags("`nesterov` needs `optimizer` sgd and a `momentum` above 0"),
            "--nesterov needs --optimizer sgd and a --momentum above 0"
        );
        assert_eq!(as_flags("raise `train_limit`"), "raise --train-limit");
        assert_eq!(
            as_flags("`out` folder; `model.0.conv` stays"),
            "--out folder; `model.0.conv` stays"
        );
        assert_eq!(as_flags("an odd ` backtick"), "an odd ` backtick");
    }
}
