//! The `wgqat` command line.

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use wgqat::gpu::GpuOptions;
use wgqat::quant::{Observer, QLevel, QType, SchemeName};
use wgqat::train::{NanPolicy, OptimizerName, TrainConfig};

mod bench;
mod deploy;
mod info;
mod train;

use bench::{bench_kernels, bench_training};
use deploy::{export, infer};
use info::{info, selftest};
use train::{eval, model, train};

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
        /// Cases run at once, each on a thread of its own (their pipelines compile side by
        /// side); the table keeps the cases' order (default: one per core, at most 8).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: Option<u16>,
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
    /// Before each training row, time its quantized convs' GEMMs on cooperative matrices and on
    /// the fp32 kernels (3 steps of each) and run each on the faster; prints the timings. Only
    /// where the adapter has cooperative matrices.
    #[arg(long)]
    tune_kernels: bool,
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
    /// Time each quantized conv's GEMMs on tensor cores and on the fp32 kernels first (3 steps
    /// of each) and run each on the faster; kept on --resume. Only where the adapter has
    /// cooperative matrices.
    #[arg(long)]
    tune_kernels: bool,
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
        Command::Selftest {
            gpu,
            json,
            filter,
            jobs,
        } => {
            let jobs = jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
                usize::from,
            );
            selftest(&gpu.options(), json, filter.as_deref(), jobs)
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
