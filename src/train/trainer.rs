//! The training loop: micronet's DoReFa recipe on the GPU. Each step is one submit (data write,
//! forward, loss, backward, optimizer); metrics stay on the GPU and are read back every
//! `log_every` steps; the CPU prepares the next batch while the GPU runs the last one, at most
//! two steps ahead.
//!
//! The run folder holds `config.json`, `metrics.jsonl`, `last.safetensors` (every epoch end and
//! whenever training stops), `best.safetensors` (best test accuracy), `resume.safetensors` (model,
//! optimizer and progress in one file, written atomically) and `curves.png`; with
//! `tune_kernels`, `kernel_tuning.json` (what the tuning timed and chose).

use super::config::{NanPolicy, TrainConfig};
use super::curves::{self, EpochPoint};
use super::optimizer::Optimizer;
use super::progress::{Display, Reporter};
pub use super::run_dir::{MetricsLine, history, read_lines};
use super::run_dir::{
    Progress, prepare_dir, read_resume, remove_stale_temporaries, repair_metrics, restore,
};
use crate::data::{self, Augment, Dataset};
use crate::error::{Error, Result};
use crate::fault::{self, Point};
use crate::gpu::{Gpu, Op, Tensor};
use crate::models::{self, ModelSpec};
use crate::nn::checkpoint::{self, Data, Named};
use crate::nn::network::max_batch;
use crate::nn::{Mode, Network, Plan, init};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a run is started.
pub struct TrainOptions {
    pub config: TrainConfig,
    /// The run folder (created if needed).
    pub out: PathBuf,
    /// Continue the run in `out` from its `resume.safetensors`.
    pub resume: bool,
    pub display: Display,
    /// How settings named in notices (`` `lr` ``, as errors name them too) are worded: the binary
    /// turns them into its flags (`--lr`); `str::to_owned` leaves them as they are.
    pub wording: fn(&str) -> String,
    /// Set (e.g. by Ctrl-C) to stop after the current step, saving first.
    pub stop: Option<Arc<AtomicBool>>,
}

/// Why training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    Finished,
    StepLimit,
    Interrupted,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub stopped: Stopped,
    pub epochs_done: u32,
    pub global_step: u64,
    pub best_acc: f64,
    /// Test loss and accuracy (%) of the last evaluation.
    pub last_eval: Option<(f64, f64)>,
}

/// Loads the training and test sets the config names (synthetic when it names none).
pub fn load_data(cfg: &TrainConfig, say: &dyn Fn(&str)) -> Result<(Dataset, Dataset)> {
    let (mut train, mut test) = match &cfg.data {
        Some(dir) => data::cifar::load(dir)?,
        None => {
            say(&format!(
                "no `data` given: using the built-in synthetic dataset ({} training / {} test images, 10 classes, seed {})",
                cfg.train_limit
                    .unwrap_or(cfg.synthetic_train)
                    .min(cfg.synthetic_train),
                cfg.test_limit
                    .unwrap_or(cfg.synthetic_test)
                    .min(cfg.synthetic_test),
                cfg.seed
            ));
            let n_train = cfg
                .train_limit
                .unwrap_or(cfg.synthetic_train)
                .min(cfg.synthetic_train);
            let n_test = cfg
                .test_limit
                .unwrap_or(cfg.synthetic_test)
                .min(cfg.synthetic_test);
            data::synthetic::train_test(cfg.seed, n_train, n_test)
        }
    };
    if let Some(n) = cfg.train_limit {
        train.truncate(n);
    }
    if let Some(n) = cfg.test_limit {
        test.truncate(n);
    }
    if train.is_empty() || test.is_empty() {
        return Err(Error::Invalid(
            "the training or test set is empty: raise `train_limit` / `test_limit`".into(),
        ));
    }
    Ok((train, test))
}

/// Loads only the test set the config names (synthetic when it names none), for evaluation.
pub fn load_test(cfg: &TrainConfig, say: &dyn Fn(&str)) -> Result<Dataset> {
    let mut test = match &cfg.data {
        Some(dir) => data::cifar::load_test(dir)?,
        None => {
            let n = cfg
                .test_limit
                .unwrap_or(cfg.synthetic_test)
                .min(cfg.synthetic_test);
            say(&format!(
                "no `data` given: using the built-in synthetic test set ({n} images, 10 classes, seed {})",
                cfg.seed
            ));
            data::synthetic::generate(cfg.seed, 2, n)
        }
    };
    if let Some(n) = cfg.test_limit {
        test.truncate(n);
    }
    if test.is_empty() {
        return Err(Error::Invalid(
            "the test set is empty: raise `test_limit`".into(),
        ));
    }
    Ok(test)
}

/// The eval batch size that fits the device (evaluation results do not depend on it).
pub fn fitting_eval_batch(
    gpu: &Gpu,
    spec: &ModelSpec,
    wanted: usize,
    say: &dyn Fn(&str),
) -> Result<usize> {
    let fits = max_batch(gpu, spec)?;
    if fits == 0 {
        return Err(Error::Invalid(format!(
            "one image of model {} does not fit this device's buffer limits",
            spec.name
        )));
    }
    if wanted > fits {
        say(&format!(
            "eval batch {wanted} does not fit this device's buffer limits: evaluating in batches of {fits} (results are the same)"
        ));
        return Ok(fits);
    }
    Ok(wanted)
}

struct Trainer<'g> {
    gpu: &'g Gpu,
    cfg: TrainConfig,
    dir: PathBuf,
    net: Network,
    opt: Optimizer,
    train: Dataset,
    test: Dataset,
    train_plans: (Plan, Option<Plan>),
    eval_plans: (Plan, Option<Plan>),
    progress: Progress,
    history: Vec<EpochPoint>,
    metrics_file: std::fs::File,
    reporter: Reporter,
    stop: Option<Arc<AtomicBool>>,
    last_eval: Option<(f64, f64)>,
    backup: Backup,
}

pub fn train(gpu: &Gpu, opts: TrainOptions) -> Result<Summary> {
    let TrainOptions {
        config: cfg,
        out: dir,
        resume,
        display,
        wording,
        stop,
    } = opts;
    cfg.validate()?;
    let spec = models::load(&cfg.model)?;
    check_input(&spec)?;
    let reporter = Reporter::new(display, wording);
    // A run stopped before its first save holds only its config: resuming it is starting it
    // again in the same folder (same seed, same data order: the same run).
    let nothing_saved =
        resume && !dir.join("resume.safetensors").is_file() && dir.join("config.json").is_file();
    if nothing_saved {
        reporter.line(&format!(
            "{}: nothing was saved before the run stopped: starting it from the beginning",
            dir.display()
        ));
    }
    let resume = resume && !nothing_saved;
    let created = prepare_dir(&dir, resume)?;
    remove_stale_temporaries(&dir);
    let result = setup(gpu, cfg, spec, dir.clone(), resume, reporter, stop);
    let mut t = match result {
        Ok(t) => t,
        Err(e) => {
            // Nothing was written yet: leave no empty run folder behind.
            if created {
                let _ = std::fs::remove_dir(&dir);
            }
            return Err(e);
        }
    };
    t.write_config()?;
    let steps_per_epoch = t.train.len().div_ceil(t.cfg.batch_size) as u64;
    let stopped = if t.cfg.ptq {
        t.calibrate()?
    } else {
        t.run(steps_per_epoch, t.cfg.log_every.min(steps_per_epoch))?
    };
    t.reporter.finish();
    Ok(Summary {
        run_dir: t.dir.clone(),
        stopped,
        epochs_done: t.progress.epoch.saturating_sub(1),
        global_step: t.progress.global_step,
        best_acc: t.progress.best_acc,
        last_eval: t.last_eval,
    })
}

/// `tune_kernels`: which GEMMs of `spec` run on cooperative matrices, from timings on `gpu`
/// (`crate::tune`), the table said and written to the run folder (`kernel_tuning.json`); `None`
/// where nothing can run there.
fn tune_kernels(
    gpu: &Gpu,
    spec: &ModelSpec,
    cfg: &TrainConfig,
    dir: &std::path::Path,
    say: &dyn Fn(&str),
) -> Result<Option<Vec<(String, crate::nn::CoopUse)>>> {
    let tuning = crate::tune::tune(gpu, spec, cfg.quant(), cfg.batch_size, crate::tune::STEPS)?;
    let Some(t) = tuning else {
        say(
            "kernel tuning: nothing to tune, no GEMM of this model runs on cooperative matrices here (they need DoReFa-quantized convs of at most 8 bits and an adapter with them); every GEMM stays on the fp32 kernels",
        );
        return Ok(None);
    };
    for line in t.lines() {
        say(&line);
    }
    let json = serde_json::to_string_pretty(&t).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::util::atomic_write(&dir.join("kernel_tuning.json"), json.as_bytes())?;
    Ok(Some(t.uses))
}

/// Everything before the first step: network, weights (init, checkpoint or resumed state), data
/// and plans. The model and weights are checked before the data are read, so bad input fails fast.
fn setup<'g>(
    gpu: &'g Gpu,
    cfg: TrainConfig,
    spec: ModelSpec,
    dir: PathBuf,
    resume: bool,
    reporter: Reporter,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Trainer<'g>> {
    let say = |s: &str| reporter.line(s);
    let saved = if resume {
        Some(read_resume(&dir, &cfg)?)
    } else {
        None
    };
    let fits = max_batch(gpu, &spec)?;
    if cfg.batch_size > fits {
        return Err(Error::Invalid(format!(
            "batch size {} does not fit this device's buffer limits (max_storage_buffer_binding_size {} bytes): use a `batch_size` of {} or less",
            cfg.batch_size, gpu.limits.max_storage_buffer_binding_size, fits
        )));
    }
    let eval_batch = fitting_eval_batch(gpu, &spec, cfg.eval_batch_size, &say)?;
    let quant = cfg.quant();
    // Which GEMMs run on cooperative matrices: a resumed run keeps its choice; with
    // `tune_kernels` a new one times them first (on a network of its own, dropped before
    // this one is built).
    let coop_uses = match saved.as_ref().and_then(|(_, p)| p.coop_uses.clone()) {
        None if cfg.tune_kernels => tune_kernels(gpu, &spec, &cfg, &dir, &say)?,
        kept => kept,
    };
    let mut net = Network::new(gpu, &spec, quant, cfg.batch_size.max(eval_batch), true, 1)?;
    if let Some(uses) = &coop_uses {
        crate::tune::apply(&mut net, uses)?;
    }
    let mut opt = Optimizer::new(gpu, &net, cfg.optimizer_kind())?;
    let mut progress = match saved {
        Some((tensors, progress)) => {
            restore(gpu, &mut net, &mut opt, &dir, tensors)?;
            opt.t = progress.optimizer_t;
            progress
        }
        None => {
            match &cfg.init {
                Some(p) => net.load(gpu, p)?,
                None if cfg.ptq => {
                    return Err(Error::Invalid(
                        "post-training quantization calibrates a trained model: give `init` FILE (a float, DoReFa or IAO checkpoint)".into(),
                    ));
                }
                None => init::initialise(gpu, &net, cfg.seed)?,
            }
            Progress {
                epoch: 1,
                ..Progress::default()
            }
        }
    };
    progress.coop_uses = coop_uses;
    let (train, test) = load_data(&cfg, &say)?;
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size) as u64;
    let log_every = cfg.log_every.min(steps_per_epoch);
    net.ensure_metric_slots(
        gpu,
        (log_every as usize).max(test.len().div_ceil(eval_batch)),
    )?;
    let history = repair_metrics(&dir, progress.global_step)?;
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .map_err(|e| Error::io(dir.join("metrics.jsonl"), e))?;
    let plans = |batch: usize,
                 n: usize,
                 mode: Mode,
                 opt: Option<&Optimizer>|
     -> Result<(Plan, Option<Plan>)> {
        let with_opt = |mut p: Plan| -> Result<Plan> {
            if let Some(o) = opt {
                p.ops.push_op(o.op(gpu, &net)?);
            }
            Ok(p)
        };
        let full = with_opt(net.plan(gpu, batch.min(n), mode)?)?;
        let rest = n % batch;
        let part = if rest != 0 && n > batch {
            Some(with_opt(net.plan(gpu, rest, mode)?)?)
        } else {
            None
        };
        Ok((full, part))
    };
    // PTQ replays training-mode forward passes only: no optimizer, no backward.
    let train_plans = if cfg.ptq {
        plans(cfg.batch_size, train.len(), Mode::Calibrate, None)?
    } else {
        plans(cfg.batch_size, train.len(), Mode::Train, Some(&opt))?
    };
    let net_backup_params = net
        .params
        .alloc(gpu, "parameters at the interval's start")?;
    let net_backup_m = net
        .params
        .alloc(gpu, "optimizer m at the interval's start")?;
    let net_backup_v = net
        .params
        .alloc(gpu, "optimizer v at the interval's start")?;
    let net_backup_running = net
        .running
        .alloc(gpu, "running statistics at the interval's start")?;
    let eval_plans = plans(eval_batch, test.len(), Mode::Eval, None)?;
    say(&format!(
        "training {} ({} parameters, {}{}) on {}: {} images, batch {}, {} steps per epoch, {} epochs; run folder {}",
        spec.name,
        spec.param_count()?,
        cfg.quant().describe(),
        if cfg.quantize_first_layer {
            ", first layer quantized"
        } else {
            ""
        },
        gpu.describe(),
        train.len(),
        cfg.batch_size,
        steps_per_epoch,
        cfg.epochs,
        dir.display()
    ));
    Ok(Trainer {
        gpu,
        cfg,
        dir,
        net,
        opt,
        train,
        test,
        train_plans,
        eval_plans,
        progress,
        history,
        metrics_file,
        reporter,
        stop,
        last_eval: None,
        backup: Backup {
            params: net_backup_params,
            m: net_backup_m,
            v: net_backup_v,
            running: net_backup_running,
        },
    })
}

/// The data are CIFAR-10-shaped images: the model must take them.
pub fn check_input(spec: &ModelSpec) -> Result<()> {
    let want = [data::CHANNELS, data::SIDE, data::SIDE];
    if spec.input != want {
        return Err(Error::Invalid(format!(
            "model {} takes {:?} inputs, but the data are {want:?} images: set \"input\": {want:?}",
            spec.name, spec.input
        )));
    }
    Ok(())
}

/// Where an interval of steps (between two metrics reads) started: what a non-finite step is
/// undone to. The GPU half (parameters, optimizer state, running statistics) is copied into
/// `Backup` by the interval's first submit.
struct Interval {
    step_in_epoch: u64,
    global_step: u64,
    optimizer_t: u32,
    tracked: Vec<i64>,
    /// Steps submitted in the interval (their metrics slots are 0..since) and their images.
    since: u64,
    images: u64,
    t0: Instant,
    /// Steps of the interval skipped for non-finite values (by index from the interval start).
    skipped: Vec<u64>,
}

/// GPU copies of everything a step changes.
struct Backup {
    params: Tensor,
    m: Tensor,
    v: Tensor,
    running: Tensor,
}

impl Trainer<'_> {
    fn write_config(&self) -> Result<()> {
        let json =
            serde_json::to_string_pretty(&self.cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::util::atomic_write(&self.dir.join("config.json"), json.as_bytes())
    }

    fn log(&mut self, line: &MetricsLine) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        let mut s = serde_json::to_string(line).map_err(|e| Error::Invalid(e.to_string()))?;
        s.push('\n');
        if fault::due(Point::Log, None) {
            let _ = self.metrics_file.write_all(&s.as_bytes()[..s.len() / 2]);
            fault::die();
        }
        self.metrics_file
            .write_all(s.as_bytes())
            .and_then(|_| self.metrics_file.flush())
            .map_err(|e| Error::io(path, e))
    }

    fn should_stop(&self) -> Option<Stopped> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            return Some(Stopped::Interrupted);
        }
        if self
            .cfg
            .steps
            .is_some_and(|n| self.progress.global_step >= n)
        {
            return Some(Stopped::StepLimit);
        }
        None
    }

    fn interval(&self) -> Interval {
        Interval {
            step_in_epoch: self.progress.step_in_epoch,
            global_step: self.progress.global_step,
            optimizer_t: self.opt.t,
            tracked: self.net.batches_tracked.clone(),
            since: 0,
            images: 0,
            t0: Instant::now(),
            skipped: Vec::new(),
        }
    }

    fn backup_ops(&self) -> Vec<Op> {
        let b = &self.backup;
        [
            (&self.net.param_arena, &b.params),
            (&self.opt.m, &b.m),
            (&self.opt.v, &b.v),
            (&self.net.running_arena, &b.running),
        ]
        .into_iter()
        .map(|(src, dst)| Op::Copy {
            src: src.clone(),
            dst: dst.clone(),
        })
        .collect()
    }

    /// Puts the GPU and CPU state back to the start of `iv`.
    fn restore(&mut self, iv: &Interval) -> Result<()> {
        let b = &self.backup;
        let ops: Vec<Op> = [
            (&b.params, &self.net.param_arena),
            (&b.m, &self.opt.m),
            (&b.v, &self.opt.v),
            (&b.running, &self.net.running_arena),
        ]
        .into_iter()
        .map(|(src, dst)| Op::Copy {
            src: src.clone(),
            dst: dst.clone(),
        })
        .collect();
        self.gpu.submit("restoring the interval's start", &ops)?;
        self.progress.step_in_epoch = iv.step_in_epoch;
        self.progress.global_step = iv.global_step;
        self.opt.t = iv.optimizer_t;
        self.net.batches_tracked = iv.tracked.clone();
        Ok(())
    }

    /// The batch of step `s` of the epoch: its rows of `order`, augmented from the step's own stream.
    fn batch_of(&self, epoch: u32, s: u64, order: &[usize]) -> (Vec<usize>, Vec<f32>, Vec<u32>) {
        let b = self.cfg.batch_size;
        let idx = order[s as usize * b..((s as usize + 1) * b).min(order.len())].to_vec();
        let augment = if self.cfg.augment {
            Augment::MICRONET
        } else {
            Augment::NONE
        };
        let (images, labels) = data::batch(
            &self.train,
            &idx,
            augment,
            &mut data::step_rng(self.cfg.seed, epoch, s),
        );
        (idx, images, labels)
    }

    fn plan_for(&self, rows: usize) -> &Plan {
        if rows == self.train_plans.0.batch {
            &self.train_plans.0
        } else {
            self.train_plans.1.as_ref().expect("partial plan")
        }
    }

    /// Writes and submits the next step (with the interval's backup copies when `backup`).
    fn step(
        &mut self,
        epoch: u32,
        lr: f64,
        order: &[usize],
        slot: u64,
        backup: bool,
    ) -> Result<(usize, wgpu::SubmissionIndex)> {
        let s = self.progress.step_in_epoch;
        let (idx, mut images, labels) = self.batch_of(epoch, s, order);
        let injected = self.inject(&mut images)?;
        let plan = self.plan_for(idx.len());
        self.net.write_batch(self.gpu, plan, &images, &labels)?;
        self.net
            .write_step(self.gpu, &self.opt.next_values(lr, slot as u32))?;
        let backup_ops = if backup {
            self.backup_ops()
        } else {
            Vec::new()
        };
        let bad = match &injected {
            Some((k, _)) if k == "validation" => {
                // The same buffer bound read-only and read-write: invalid by WebGPU's rules.
                let x = &self.net.param_arena;
                vec![Op::Dispatch(crate::kernels::elementwise::relu_forward(
                    self.gpu, x, x,
                )?)]
            }
            _ => Vec::new(),
        };
        let index = self
            .gpu
            .submit_parts("training step", &[&backup_ops, plan.ops.ops(), &bad])?;
        self.opt.t += 1;
        self.progress.global_step += 1;
        self.progress.step_in_epoch += 1;
        self.net.batches_tracked.iter_mut().for_each(|c| *c += 1);
        fault::kill_point(Point::Step);
        Ok((idx.len(), index))
    }

    /// Applies the test hook's step fault (see [`fault`]) to the next step, if it is that step.
    fn inject(&self, images: &mut [f32]) -> Result<Option<(String, u64)>> {
        let injected = fault::step_fault().filter(|(_, at)| *at == self.progress.global_step + 1);
        if let Some((kind, _)) = &injected {
            match kind.as_str() {
                "nan-input" => images[0] = f32::NAN,
                "nan-weight" => self
                    .gpu
                    .write(&self.net.param_arena.view(0, &[1])?, &[f32::NAN])?,
                "lost" => self.gpu.device.destroy(),
                _ => {}
            }
        }
        Ok(injected)
    }

    /// Counts a step as taken without running it (a skipped non-finite step).
    fn skip(&mut self) {
        self.progress.global_step += 1;
        self.progress.step_in_epoch += 1;
    }

    fn run(&mut self, steps_per_epoch: u64, log_every: u64) -> Result<Stopped> {
        let mut last_save = Instant::now();
        while self.progress.epoch <= self.cfg.epochs {
            let epoch = self.progress.epoch;
            let lr = self.cfg.lr_at(epoch);
            let order = data::epoch_order(self.train.len(), self.cfg.seed, epoch, self.cfg.shuffle);
            self.reporter.start_epoch(
                epoch,
                self.cfg.epochs,
                steps_per_epoch,
                self.progress.step_in_epoch,
            );
            let mut in_flight = VecDeque::new();
            let mut iv = self.interval();
            let mut shown = Instant::now();
            while self.progress.step_in_epoch < steps_per_epoch {
                if let Some(why) = self.should_stop() {
                    self.close_interval(epoch, lr, &order, &mut iv)?;
                    self.save(false)?;
                    return Ok(why);
                }
                let (rows, index) = self.step(
                    epoch,
                    lr,
                    &order,
                    iv.since,
                    iv.since == 0 && iv.skipped.is_empty(),
                )?;
                in_flight.push_back(index);
                if in_flight.len() > 2 {
                    self.gpu.wait_for(in_flight.pop_front().expect("queued"))?;
                }
                iv.since += 1;
                iv.images += rows as u64;
                self.reporter.step(self.progress.step_in_epoch);
                let s = self.progress.step_in_epoch;
                if s.is_multiple_of(log_every) || s == steps_per_epoch {
                    self.close_interval(epoch, lr, &order, &mut iv)?;
                    if last_save.elapsed().as_secs_f64() >= 60.0 * self.cfg.save_minutes
                        && s < steps_per_epoch
                    {
                        self.save(false)?;
                        last_save = Instant::now();
                    }
                    iv = self.interval();
                    shown = Instant::now();
                } else if shown.elapsed().as_secs_f64() > self.reporter.refresh_seconds() {
                    // Slow devices: show the running interval now and then (not logged, so the
                    // metrics file does not depend on timing).
                    self.show_interim(epoch, lr, &iv)?;
                    shown = Instant::now();
                }
            }
            let (loss, acc) = self.evaluate()?;
            if !loss.is_finite() {
                let place = self
                    .first_nonfinite_state()?
                    .unwrap_or_else(|| "no saved tensor (the test data?)".into());
                return Err(Error::Numerical(format!(
                    "the test loss became {loss} after epoch {epoch}; first non-finite tensor: {place}. Training stopped; the checkpoints in {} are from before it (lower `lr`)",
                    self.dir.display()
                )));
            }
            self.last_eval = Some((loss, acc));
            self.log(&MetricsLine {
                kind: "eval".into(),
                epoch,
                step: self.progress.global_step,
                loss,
                acc,
                lr,
                img_per_s: None,
                images: self.test.len() as u64,
            })?;
            self.reporter.line(&format!(
                "epoch {epoch}: test loss {loss:.4}, accuracy {acc:.2}%"
            ));
            let best = acc > self.progress.best_acc;
            if best {
                self.progress.best_acc = acc;
            }
            self.progress.epoch += 1;
            self.progress.step_in_epoch = 0;
            self.save(best)?;
            last_save = Instant::now();
            let lines = read_lines(&self.dir.join("metrics.jsonl"));
            self.history = history(&lines);
            curves::draw(
                &self.dir.join("curves.png"),
                &self.history,
                &self.net.spec.name,
            )?;
        }
        Ok(Stopped::Finished)
    }

    /// Post-training quantization (micronet's `--ptq`, spec §4.1): training-mode forward passes
    /// over the first `ptq_batches` + 1 batches of the epoch's order (observers, scales and
    /// BatchNorm statistics move; no weight does), then the test set, then the checkpoints.
    /// A resumed run whose calibration was saved has nothing left to do.
    fn calibrate(&mut self) -> Result<Stopped> {
        if self.progress.epoch > 1 {
            return Ok(Stopped::Finished);
        }
        let order = data::epoch_order(self.train.len(), self.cfg.seed, 1, self.cfg.shuffle);
        let batches = (self.cfg.ptq_batches + 1).min(order.len().div_ceil(self.cfg.batch_size));
        self.reporter.line(&format!(
            "post-training quantization: calibrating on {batches} training batches (forward passes only)"
        ));
        self.reporter.start_epoch(1, 1, batches as u64, 0);
        let mut in_flight = VecDeque::new();
        for s in 0..batches as u64 {
            let (idx, images, labels) = self.batch_of(1, s, &order);
            let plan = self.plan_for(idx.len());
            self.net.write_batch(self.gpu, plan, &images, &labels)?;
            self.net
                .write_step(self.gpu, &self.opt.next_values(self.cfg.lr, 0))?;
            in_flight.push_back(self.gpu.submit_parts("calibration", &[plan.ops.ops()])?);
            if in_flight.len() > 2 {
                self.gpu.wait_for(in_flight.pop_front().expect("queued"))?;
            }
            self.net.batches_tracked.iter_mut().for_each(|c| *c += 1);
            self.reporter.step(s + 1);
        }
        let (loss, acc) = self.evaluate()?;
        if !loss.is_finite() {
            return Err(Error::Numerical(format!(
                "the test loss after calibration is {loss}: the model in `init` may not be trained"
            )));
        }
        self.last_eval = Some((loss, acc));
        self.log(&MetricsLine {
            kind: "eval".into(),
            epoch: 1,
            step: 0,
            loss,
            acc,
            lr: self.cfg.lr,
            img_per_s: None,
            images: self.test.len() as u64,
        })?;
        self.reporter.line(&format!(
            "calibrated: test loss {loss:.4}, accuracy {acc:.2}%"
        ));
        self.progress.best_acc = acc;
        self.progress.epoch = 2;
        self.save(true)?;
        Ok(Stopped::Finished)
    }

    /// Reads the interval's metrics; if a step was not finite, handles it by the NaN policy
    /// (which may replay part of the interval); then logs the interval.
    fn close_interval(
        &mut self,
        epoch: u32,
        lr: f64,
        order: &[usize],
        iv: &mut Interval,
    ) -> Result<()> {
        loop {
            if iv.since == 0 {
                return Ok(());
            }
            let m = self.net.read_metrics(self.gpu, iv.since as usize)?;
            let Some(bad) = m.iter().position(|x| !x.0.is_finite()) else {
                let loss = m.iter().map(|x| x.0 as f64).sum::<f64>() / iv.since as f64;
                let correct: f64 = m.iter().map(|x| x.1 as f64).sum();
                let acc = 100.0 * correct / iv.images.max(1) as f64;
                let img_s = iv.images as f64 / iv.t0.elapsed().as_secs_f64().max(1e-9);
                let line = MetricsLine {
                    kind: "train".into(),
                    epoch,
                    step: self.progress.global_step,
                    loss,
                    acc,
                    lr,
                    img_per_s: Some(img_s),
                    images: iv.images,
                };
                self.log(&line)?;
                let steps = self.train.len().div_ceil(self.cfg.batch_size) as u64;
                self.reporter.train(
                    epoch,
                    self.progress.step_in_epoch,
                    steps,
                    loss,
                    acc,
                    lr,
                    img_s,
                );
                return Ok(());
            };
            // Slot `bad` is the bad-th submitted step of the interval; skipped ones took none.
            let offset = self.submitted_offset(iv, bad as u64);
            let step = iv.global_step + offset + 1;
            match self.cfg.nan_policy {
                NanPolicy::Stop => {
                    let place = self.diagnose(epoch, lr, order, iv, offset)?;
                    return Err(Error::Numerical(format!(
                        "the loss became {} at step {step} (epoch {epoch}); first non-finite value: {place}. Training stopped; the checkpoints in {} are from before it (lower `lr`, or set `nan_policy` to skip-step)",
                        m[bad].0,
                        self.dir.display()
                    )));
                }
                NanPolicy::SkipStep => {
                    self.reporter.line(&format!(
                        "step {step} (epoch {epoch}): loss {} is not finite; skipping the step",
                        m[bad].0
                    ));
                    let end = self.progress.step_in_epoch;
                    self.restore(iv)?;
                    iv.skipped.push(offset);
                    (iv.since, iv.images) = (0, 0);
                    // Replay the interval without its skipped steps, up to where it had got to.
                    while self.progress.step_in_epoch < end {
                        let k = self.progress.step_in_epoch - iv.step_in_epoch;
                        if iv.skipped.contains(&k) {
                            self.skip();
                            continue;
                        }
                        let (rows, _) = self.step(epoch, lr, order, iv.since, false)?;
                        iv.since += 1;
                        iv.images += rows as u64;
                    }
                }
            }
        }
    }

    /// The offset from the interval's start of its `n`-th submitted step (skipped steps count in
    /// offsets but were not submitted).
    fn submitted_offset(&self, iv: &Interval, n: u64) -> u64 {
        let mut seen = 0;
        let mut offset = 0;
        loop {
            if !iv.skipped.contains(&offset) {
                if seen == n {
                    return offset;
                }
                seen += 1;
            }
            offset += 1;
        }
    }

    /// Where the first non-finite value of the interval's step `offset` appeared: the interval is
    /// replayed to just before it (deterministically, so the same values recur), then the step runs
    /// with a check after everything it writes. A parameter that was already bad sends the search
    /// one step back, to the update that made it so.
    fn diagnose(
        &mut self,
        epoch: u32,
        lr: f64,
        order: &[usize],
        iv: &Interval,
        mut offset: u64,
    ) -> Result<String> {
        let mut moved_back = false;
        loop {
            self.restore(iv)?;
            while self.progress.step_in_epoch < iv.step_in_epoch + offset {
                let k = self.progress.step_in_epoch - iv.step_in_epoch;
                if iv.skipped.contains(&k) {
                    self.skip();
                } else {
                    self.step(epoch, lr, order, 0, false)?;
                }
            }
            let s = self.progress.step_in_epoch;
            let (idx, mut images, labels) = self.batch_of(epoch, s, order);
            self.inject(&mut images)?;
            let diag = self.net.diagnostic_plan(self.gpu, idx.len())?;
            self.net
                .write_batch(self.gpu, &diag.plan, &images, &labels)?;
            self.net
                .write_step(self.gpu, &self.opt.next_values(lr, 0))?;
            diag.plan
                .ops
                .submit(self.gpu, "diagnosing a non-finite step")?;
            let step = self.progress.global_step + 1;
            match diag.first_nonfinite(self.gpu)? {
                Some(p) if p.starts_with("parameter") && offset > 0 => {
                    offset -= 1;
                    moved_back = true;
                }
                Some(p) if p.starts_with("parameter") => {
                    return Ok(format!("{p} of step {step} (it was saved or set that way)"));
                }
                Some(p) => return Ok(format!("{p}, in step {step}")),
                None if moved_back => {
                    return Ok(format!(
                        "the optimizer update of step {step} (its gradients were finite: the learning rate is too high)"
                    ));
                }
                None => return Ok("not reproduced when the step was replayed".into()),
            }
        }
    }

    /// The first tensor of the model's state (parameters, then running statistics) holding NaN or
    /// infinity.
    fn first_nonfinite_state(&self) -> Result<Option<String>> {
        Ok(self
            .net
            .state_dict(self.gpu)?
            .into_iter()
            .find_map(|t| match t.data {
                Data::F32(v) if v.iter().any(|x| !x.is_finite()) => Some(t.name),
                _ => None,
            }))
    }

    /// Shows the metrics of the running interval without logging them.
    fn show_interim(&mut self, epoch: u32, lr: f64, iv: &Interval) -> Result<()> {
        if iv.since == 0 {
            return Ok(());
        }
        let m = self.net.read_metrics(self.gpu, iv.since as usize)?;
        let loss = m.iter().map(|x| x.0 as f64).sum::<f64>() / iv.since as f64;
        let acc = 100.0 * m.iter().map(|x| x.1 as f64).sum::<f64>() / iv.images.max(1) as f64;
        let img_s = iv.images as f64 / iv.t0.elapsed().as_secs_f64().max(1e-9);
        let steps = self.train.len().div_ceil(self.cfg.batch_size) as u64;
        self.reporter.train(
            epoch,
            self.progress.step_in_epoch,
            steps,
            loss,
            acc,
            lr,
            img_s,
        );
        Ok(())
    }

    /// Test loss and accuracy (%), with running BN statistics.
    fn evaluate(&mut self) -> Result<(f64, f64)> {
        let n = self.test.len();
        let b = self.eval_plans.0.batch;
        let order: Vec<usize> = (0..n).collect();
        let batches = n.div_ceil(b);
        for k in 0..batches {
            let idx = &order[k * b..((k + 1) * b).min(n)];
            let plan = if idx.len() == b {
                &self.eval_plans.0
            } else {
                self.eval_plans.1.as_ref().expect("partial eval plan")
            };
            let (images, labels) =
                data::batch(&self.test, idx, Augment::NONE, &mut crate::rng::Rng::new(0));
            self.net.write_batch(self.gpu, plan, &images, &labels)?;
            self.net.write_step(
                self.gpu,
                &crate::kernels::loss::StepValues {
                    slot: k as u32,
                    ..Default::default()
                },
            )?;
            plan.ops.submit(self.gpu, "evaluation")?;
            if k == 0 {
                fault::kill_point(Point::Eval);
            }
        }
        let m = self.net.read_metrics(self.gpu, batches)?;
        let mut loss = 0.0;
        let mut correct = 0.0;
        for (k, (l, c)) in m.iter().enumerate() {
            let rows = b.min(n - k * b);
            loss += *l as f64 * rows as f64;
            correct += *c as f64;
        }
        Ok((loss / n as f64, 100.0 * correct / n as f64))
    }

    /// Writes `last.safetensors`, `resume.safetensors` and, when `best`, `best.safetensors`.
    fn save(&mut self, best: bool) -> Result<()> {
        let state = self.net.state_dict(self.gpu)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("model".to_string(), self.net.spec.name.clone());
        meta.insert("w_bits".to_string(), self.cfg.w_bits.to_string());
        meta.insert("a_bits".to_string(), self.cfg.a_bits.to_string());
        meta.insert(
            "quantize_first_layer".to_string(),
            self.cfg.quantize_first_layer.to_string(),
        );
        // The scheme and its options, for `eval` and `export` (JSON: `wgqat::quant::Scheme`).
        meta.insert(
            "scheme".to_string(),
            serde_json::to_string(&self.cfg.quant().scheme)
                .map_err(|e| Error::Invalid(e.to_string()))?,
        );
        meta.insert(
            "global_step".to_string(),
            self.progress.global_step.to_string(),
        );
        meta.insert(
            "epochs_done".to_string(),
            (self.progress.epoch - 1).to_string(),
        );
        checkpoint::write(&self.dir.join("last.safetensors"), &state, meta.clone())?;
        if best {
            meta.insert(
                "test_acc".to_string(),
                format!("{}", self.progress.best_acc),
            );
            checkpoint::write(&self.dir.join("best.safetensors"), &state, meta.clone())?;
        }
        fault::kill_point(Point::Save);
        let mut all = state;
        let (m, v) = (
            self.gpu.read_f32(&self.opt.m)?,
            self.gpu.read_f32(&self.opt.v)?,
        );
        for (e, (mv, vv)) in self.net.params.entries().iter().zip(
            self.net
                .params
                .unpack(&m)
                .into_iter()
                .zip(self.net.params.unpack(&v)),
        ) {
            all.push(Named::f32(format!("optimizer.m.{}", e.name), &e.shape, mv));
            all.push(Named::f32(format!("optimizer.v.{}", e.name), &e.shape, vv));
        }
        let observed = self.net.iao_observed(self.gpu)?;
        if !observed.is_empty() {
            all.push(Named::f32(
                super::run_dir::IAO_OBSERVED,
                &[observed.len()],
                observed,
            ));
        }
        self.progress.optimizer_t = self.opt.t;
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.cfg).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        meta.insert(
            "progress".to_string(),
            serde_json::to_string(&self.progress).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        checkpoint::write(&self.dir.join("resume.safetensors"), &all, meta)
    }
}
