//! Launches (a kernel bound to its tensors) and the recorder that puts many of them into one
//! command encoder and submits once. A training step is a recorder built once and replayed.

use super::kernel::{Bind, Kernel};
use super::pool::PooledBuffer;
use super::{Gpu, Tensor};
use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Submissions made by all devices of this process: the benchmark reports submits per step.
static SUBMITS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Submissions made from this thread (what a test counts while others submit beside it).
    static THREAD_SUBMITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Number of queue submissions made so far by this process.
pub fn submit_count() -> u64 {
    SUBMITS.load(Ordering::Relaxed)
}

/// Number of queue submissions made so far from the calling thread.
pub fn thread_submit_count() -> u64 {
    THREAD_SUBMITS.with(|n| n.get())
}

fn count_submit() {
    SUBMITS.fetch_add(1, Ordering::Relaxed);
    THREAD_SUBMITS.with(|n| n.set(n.get() + 1));
}

/// A kernel bound to its parameters and tensors, with its grid. Holds its buffers so they cannot
/// go back to the pool while the launch exists.
pub struct Launch {
    kernel: Arc<Kernel>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    /// Kernel name and shapes, for errors and timings.
    pub label: String,
    /// Bytes of the tensors bound (each counted once): what the dispatch moves at least when
    /// it reads or writes all of them.
    pub bound_bytes: u64,
    _keep: Vec<Arc<PooledBuffer>>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Launch({} {:?})", self.label, self.workgroups)
    }
}

impl Launch {
    /// Whether the kernel is bound by memory traffic rather than arithmetic: every kernel but the
    /// conv / matmul GEMMs (`conv2d.wgsl`, and the `conv_coop*.wgsl` kernels on cooperative
    /// matrices or their emulation).
    pub fn memory_bound(&self) -> bool {
        let name = &self.kernel.name;
        !(name.starts_with("conv2d.wgsl:") || name.starts_with("conv_coop"))
    }

    /// `shader:entry[:CONST=v...]` of the kernel.
    pub fn kernel_name(&self) -> &str {
        &self.kernel.name
    }

    /// The workgroup grid it dispatches.
    pub fn workgroups(&self) -> [u32; 3] {
        self.workgroups
    }
}

/// One recorded operation.
pub enum Op {
    Dispatch(Launch),
    /// Copies all of `src` into the start of `dst`.
    Copy {
        src: Tensor,
        dst: Tensor,
    },
}

impl Op {
    fn label(&self) -> &str {
        match self {
            Op::Dispatch(l) => &l.label,
            Op::Copy { .. } => "copy",
        }
    }

    /// The bytes it moves that memory bounds, `None` for the GEMMs: a memory-bound dispatch's
    /// bound tensors (each once), a copy's source read and written.
    pub fn memory_bound_bytes(&self) -> Option<u64> {
        match self {
            Op::Dispatch(l) => l.memory_bound().then_some(l.bound_bytes),
            Op::Copy { src, .. } => Some(2 * src.byte_len()),
        }
    }
}

/// Time of one operation from a timed run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub label: String,
    pub seconds: f64,
}

impl Gpu {
    /// Binds `kernel` to a parameter block (when its first binding is a uniform) and `tensors`, in
    /// binding order. Checks the count, the access of each binding and the device's binding limit.
    pub fn launch(
        &self,
        kernel: &Arc<Kernel>,
        label: impl Into<String>,
        params: Option<&[u8]>,
        tensors: &[&Tensor],
        workgroups: [u32; 3],
    ) -> Result<Launch> {
        let label = label.into();
        let has_uniform = kernel.bindings.contains(&Bind::Uniform);
        let slots: Vec<u32> = kernel
            .bindings
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_storage())
            .map(|(i, _)| i as u32)
            .collect();
        if tensors.len() != slots.len() || params.is_some() != has_uniform {
            return Err(Error::shape(
                &label,
                format!(
                    "kernel {} takes {} tensors{}, got {}{}",
                    kernel.name,
                    slots.len(),
                    if has_uniform { " and parameters" } else { "" },
                    tensors.len(),
                    if params.is_some() {
                        " and parameters"
                    } else {
                        ""
                    },
                ),
            ));
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::TooLarge {
                what: format!("{label}: grid {workgroups:?}"),
                size: *workgroups.iter().max().unwrap_or(&0) as u64,
                limit_name: "max_compute_workgroups_per_dimension",
                limit: max as u64,
                hint: "use a smaller batch size".into(),
            });
        }
        let mut keep = Vec::with_capacity(tensors.len() + 1);
        let uniform = match params {
            Some(bytes) => {
                let buf = self.pool().get(
                    "params",
                    bytes.len() as u64,
                    wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                )?;
                let mut padded = bytes.to_vec();
                padded.resize(bytes.len().next_multiple_of(16), 0);
                self.queue.write_buffer(buf.buffer(), 0, &padded);
                Some(Arc::new(buf))
            }
            None => None,
        };
        // A tensor bound twice (a scalar and a vec4 view) is counted once.
        let mut views: Vec<(&wgpu::Buffer, u64, u64)> = Vec::with_capacity(tensors.len());
        for t in tensors {
            let view = (t.buffer(), t.offset(), t.byte_len());
            if !views.contains(&view) {
                views.push(view);
            }
        }
        let bound_bytes = views.iter().map(|v| v.2).sum();
        let mut entries = Vec::with_capacity(kernel.bindings.len());
        if let Some(u) = &uniform {
            let slot = kernel
                .bindings
                .iter()
                .position(|b| *b == Bind::Uniform)
                .unwrap_or(0);
            entries.push(wgpu::BindGroupEntry {
                binding: slot as u32,
                resource: u.buffer().as_entire_binding(),
            });
            keep.push(u.clone());
        }
        for (t, &slot) in tensors.iter().zip(&slots) {
            if t.byte_len() > self.limits.max_storage_buffer_binding_size {
                return Err(Error::TooLarge {
                    what: format!("{label}: binding {slot} {:?}", t.shape()),
                    size: t.byte_len(),
                    limit_name: "max_storage_buffer_binding_size",
                    limit: self.limits.max_storage_buffer_binding_size,
                    hint: "use a smaller batch size".into(),
                });
            }
            let resource = if matches!(
                kernel.bindings[slot as usize],
                Bind::ReadVec4 | Bind::ReadWriteVec4
            ) {
                t.binding_rounded(16)
            } else {
                t.binding()
            };
            entries.push(wgpu::BindGroupEntry {
                binding: slot,
                resource,
            });
            keep.push(t.keepalive());
        }
        let bind_group = self.scoped(
            || format!("binding {label}"),
            || {
                self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&label),
                    layout: &kernel.layout,
                    entries: &entries,
                })
            },
        )?;
        Ok(Launch {
            kernel: kernel.clone(),
            bind_group,
            workgroups,
            label,
            bound_bytes,
            _keep: keep,
        })
    }

    /// Records `ops` into one command encoder and submits once; does not wait for the GPU.
    pub fn submit(&self, context: &str, ops: &[Op]) -> Result<wgpu::SubmissionIndex> {
        self.submit_with(context, ops, &[])
    }

    /// Records several lists of ops, in order, into one command encoder and submits once.
    pub fn submit_parts(&self, context: &str, parts: &[&[Op]]) -> Result<wgpu::SubmissionIndex> {
        for ops in parts {
            ready(ops)?;
        }
        let n: usize = parts.iter().map(|p| p.len()).sum();
        let result = self.scoped(
            || format!("{context} ({n} operations)"),
            || {
                let mut enc = self
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some(context),
                    });
                for ops in parts {
                    record(&mut enc, ops, None);
                }
                self.queue.submit([enc.finish()])
            },
        );
        let index = match result {
            Ok(i) => i,
            Err(e) => return Err(self.name_failing_op(e, context, parts)),
        };
        count_submit();
        self.check_faults(context)?;
        Ok(index)
    }

    /// A validation error of a whole submission names no kernel: submit the ops one by one (the
    /// failed submission ran nothing) until one fails, and name it.
    fn name_failing_op(&self, err: Error, context: &str, parts: &[&[Op]]) -> Error {
        if !matches!(err, Error::Validation { .. }) {
            return err;
        }
        for op in parts.iter().flat_map(|p| p.iter()) {
            let single = self.scoped(
                || op.label().to_string(),
                || {
                    let mut enc = self.device.create_command_encoder(&Default::default());
                    record(&mut enc, std::slice::from_ref(op), None);
                    self.queue.submit([enc.finish()]);
                },
            );
            if let Err(Error::Validation { message, .. }) = single {
                return Error::Validation {
                    context: format!("{context}, kernel {}", op.label()),
                    message,
                };
            }
        }
        err
    }

    /// As [`Gpu::submit`], then copies each `(src, staging)` pair after the ops, in the same
    /// command buffer (used to read results back without a second submit).
    pub(crate) fn submit_with(
        &self,
        context: &str,
        ops: &[Op],
        copies: &[(&Tensor, &wgpu::Buffer)],
    ) -> Result<wgpu::SubmissionIndex> {
        ready(ops)?;
        let result = self.scoped(
            || format!("{context} ({} operations)", ops.len()),
            || {
                let mut enc = self
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some(context),
                    });
                record(&mut enc, ops, None);
                for (src, dst) in copies {
                    enc.copy_buffer_to_buffer(src.buffer(), src.offset(), dst, 0, src.byte_len());
                }
                self.queue.submit([enc.finish()])
            },
        );
        let index = match result {
            Ok(i) => i,
            Err(e) => return Err(self.name_failing_op(e, context, &[ops])),
        };
        count_submit();
        self.check_faults(context)?;
        Ok(index)
    }

    /// Waits until submission `index` has finished (bounds how far the CPU runs ahead).
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })
            .map_err(|e| Error::Readback(e.to_string()))?;
        self.check_faults("waiting for the GPU")
    }

    /// Waits until everything submitted so far has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        self.check_faults("waiting for the GPU")
    }

    /// Runs `ops` and returns the time each took: GPU timestamps where the adapter has them
    /// (one pass per op, or timestamps between dispatches inside one pass), else wall clock with a
    /// wait after each op. Meant for benchmarks, not training.
    pub fn submit_timed(&self, context: &str, ops: &[Op]) -> Result<Vec<Timing>> {
        if !self.caps.timestamp_query {
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                let t0 = Instant::now();
                self.submit(context, std::slice::from_ref(op))?;
                self.wait()?;
                out.push(Timing {
                    label: op.label().to_string(),
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            return Ok(out);
        }
        ready(ops)?;
        let mut out = Vec::with_capacity(ops.len());
        // A query set holds at most 4096 queries: two per op. Copies are not timed (that would
        // need timestamps inside encoders) and are reported as 0 s.
        for chunk in ops.chunks(2048) {
            let n = (2 * chunk.len()) as u32;
            let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: n,
            });
            let resolve = self.pool().get(
                "timestamps",
                8 * n as u64,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            )?;
            let staging = self.pool().get(
                "timestamps readback",
                8 * n as u64,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            self.scoped(
                || format!("{context} (timed)"),
                || {
                    let mut enc = self.device.create_command_encoder(&Default::default());
                    record(&mut enc, chunk, Some(&qs));
                    enc.resolve_query_set(&qs, 0..n, resolve.buffer(), 0);
                    enc.copy_buffer_to_buffer(
                        resolve.buffer(),
                        0,
                        staging.buffer(),
                        0,
                        8 * n as u64,
                    );
                    self.queue.submit([enc.finish()]);
                },
            )?;
            count_submit();
            let ticks: Vec<u64> = self.map_read(staging.buffer(), 8 * n as u64)?;
            let period = self.queue.get_timestamp_period() as f64 * 1e-9;
            for (i, op) in chunk.iter().enumerate() {
                let dt = match op {
                    Op::Dispatch(_) => ticks[2 * i + 1].saturating_sub(ticks[2 * i]),
                    Op::Copy { .. } => 0,
                };
                out.push(Timing {
                    label: op.label().to_string(),
                    seconds: dt as f64 * period,
                });
            }
        }
        Ok(out)
    }
}

/// Waits for the pipelines of `ops` (compiled on worker threads) and reports the first that
/// failed to compile.
fn ready(ops: &[Op]) -> Result<()> {
    for op in ops {
        if let Op::Dispatch(l) = op {
            l.kernel.pipeline()?;
        }
    }
    Ok(())
}

/// Records ops: consecutive dispatches share one compute pass (wgpu orders them with barriers),
/// copies go between passes. With `timestamps`, every op gets its own pass with a timestamp at
/// its start and end (queries 2i and 2i+1).
fn record(enc: &mut wgpu::CommandEncoder, ops: &[Op], timestamps: Option<&wgpu::QuerySet>) {
    let mut i = 0;
    while i < ops.len() {
        match &ops[i] {
            Op::Copy { src, dst } => {
                if let Some(qs) = timestamps {
                    // An empty timed pass, so that every query of a timed run is written.
                    drop(enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: qs,
                            beginning_of_pass_write_index: Some(2 * i as u32),
                            end_of_pass_write_index: Some(2 * i as u32 + 1),
                        }),
                    }));
                }
                enc.copy_buffer_to_buffer(
                    src.buffer(),
                    src.offset(),
                    dst.buffer(),
                    dst.offset(),
                    src.byte_len(),
                );
                i += 1;
            }
            Op::Dispatch(_) => {
                let end = match timestamps {
                    Some(_) => i + 1,
                    None => ops[i..]
                        .iter()
                        .position(|o| !matches!(o, Op::Dispatch(_)))
                        .map_or(ops.len(), |p| i + p),
                };
                let tw = timestamps.map(|qs| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                });
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: tw,
                });
                for op in &ops[i..end] {
                    if let Op::Dispatch(l) = op {
                        // `ready` waited for every pipeline before recording began.
                        if let Ok(pipeline) = l.kernel.pipeline() {
                            pass.set_pipeline(pipeline);
                        }
                        pass.set_bind_group(0, &l.bind_group, &[]);
                        let [x, y, z] = l.workgroups;
                        pass.dispatch_workgroups(x, y, z);
                    }
                }
                i = end;
            }
        }
    }
}

/// Ops collected for one submit. Build it once and [`Recorder::submit`] it as often as needed:
/// the launches keep their bind groups and parameter blocks.
#[derive(Default)]
pub struct Recorder {
    ops: Vec<Op>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, launch: Launch) {
        self.ops.push(Op::Dispatch(launch));
    }

    /// Appends an op (a dispatch or a copy).
    pub fn push_op(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn copy(&mut self, src: &Tensor, dst: &Tensor) {
        self.ops.push(Op::Copy {
            src: src.clone(),
            dst: dst.clone(),
        });
    }

    pub fn extend(&mut self, other: Recorder) {
        self.ops.extend(other.ops);
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Records every op into one command encoder and submits once.
    pub fn submit(&self, gpu: &Gpu, context: &str) -> Result<wgpu::SubmissionIndex> {
        gpu.submit(context, &self.ops)
    }
}
