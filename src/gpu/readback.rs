//! Reading tensors back to the CPU. Each read is a GPU round trip: fine for tests, checkpoints and
//! per-epoch metrics, never inside a training step.

use super::{Gpu, Op, Tensor};
use crate::error::{Error, Result};

impl Gpu {
    /// Maps the first `size` bytes of a `MAP_READ` buffer after all submitted work and copies them
    /// out as `T`s.
    pub(crate) fn map_read<T: bytemuck::Pod>(
        &self,
        buf: &wgpu::Buffer,
        size: u64,
    ) -> Result<Vec<T>> {
        let slice = buf.slice(0..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        self.check_faults("reading results back")?;
        rx.recv()
            .map_err(|e| Error::Readback(e.to_string()))?
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?;
            bytemuck::pod_collect_to_vec(&view[..])
        };
        buf.unmap();
        Ok(out)
    }

    /// Runs `ops` (one submit) and reads `outputs` back in the same submission.
    pub fn run_and_read<T: bytemuck::Pod>(
        &self,
        context: &str,
        ops: &[Op],
        outputs: &[&Tensor],
    ) -> Result<Vec<Vec<T>>> {
        let staging: Vec<_> = outputs
            .iter()
            .map(|t| {
                self.pool().get(
                    "readback",
                    t.byte_len(),
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                )
            })
            .collect::<Result<_>>()?;
        let copies: Vec<(&Tensor, &wgpu::Buffer)> = outputs
            .iter()
            .zip(&staging)
            .map(|(t, s)| (*t, s.buffer()))
            .collect();
        self.submit_with(context, ops, &copies)?;
        outputs
            .iter()
            .zip(&staging)
            .map(|(t, s)| self.map_read(s.buffer(), t.byte_len()))
            .collect()
    }

    /// Reads a tensor back as raw `T`s (for packed types, the packed words).
    pub fn read<T: bytemuck::Pod>(&self, t: &Tensor) -> Result<Vec<T>> {
        Ok(self
            .run_and_read(&format!("reading {:?}", t.shape()), &[], &[t])?
            .remove(0))
    }

    pub fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = self.read(t)?;
        v.truncate(t.numel());
        Ok(v)
    }

    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = self.read(t)?;
        v.truncate(t.numel());
        Ok(v)
    }
}
