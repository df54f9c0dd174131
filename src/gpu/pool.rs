//! A pool that hands out GPU buffers and takes them back when their last user drops them, so a
//! training step that asks for the same sizes every time allocates nothing after warm-up.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Counters for the benchmark and for tests that prove a step allocates nothing.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolStats {
    /// Buffers created from the device since the pool was made.
    pub allocations: u64,
    /// Requests served from the free list.
    pub reuses: u64,
    /// Bytes of all buffers the pool holds now (in use or free).
    pub allocated_bytes: u64,
    /// The most `allocated_bytes` has ever been.
    pub peak_bytes: u64,
}

type Key = (u64, u32);

struct Inner {
    free: HashMap<Key, Vec<wgpu::Buffer>>,
    stats: PoolStats,
}

/// Buffers come back to the pool when dropped; see `PooledBuffer`.
pub struct BufferPool {
    device: wgpu::Device,
    limits: wgpu::Limits,
    inner: Arc<Mutex<Inner>>,
}

/// A buffer on loan from the pool. Dropping it returns it to the free list.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    key: Key,
    pool: Weak<Mutex<Inner>>,
    /// Newly created (so zero-filled by wgpu), not reused.
    fresh: bool,
}

impl PooledBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }

    /// The buffer's size in bytes (a multiple of 256).
    pub fn size(&self) -> u64 {
        self.key.0
    }

    /// Whether the buffer was just created: wgpu zero-fills new buffers, reused ones keep data.
    pub fn fresh(&self) -> bool {
        self.fresh
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buffer.take(), self.pool.upgrade()) {
            if let Ok(mut inner) = pool.lock() {
                inner.free.entry(self.key).or_default().push(buf);
            }
        }
    }
}

/// Sizes are rounded up to this, so offsets into a buffer can always be bound (WebGPU's largest
/// `min_storage_buffer_offset_alignment`) and near-equal requests share a free list.
pub const ALIGN: u64 = 256;

impl BufferPool {
    pub(crate) fn new(device: wgpu::Device, limits: wgpu::Limits) -> Self {
        BufferPool {
            device,
            limits,
            inner: Arc::new(Mutex::new(Inner {
                free: HashMap::new(),
                stats: PoolStats::default(),
            })),
        }
    }

    pub fn stats(&self) -> PoolStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }

    /// Starts peak tracking afresh from what is held now.
    pub fn reset_peak(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.stats.peak_bytes = inner.stats.allocated_bytes;
        }
    }

    /// Drops every free buffer (their memory goes back to the driver).
    pub fn trim(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            let freed: u64 = inner
                .free
                .drain()
                .map(|((size, _), v)| size * v.len() as u64)
                .sum();
            inner.stats.allocated_bytes -= freed;
        }
    }

    /// Checks `size` against the device's limits before anything is created, so a too-large
    /// request is an error naming the limit, never a wgpu panic. `storage` also checks the
    /// per-binding limit, since such a buffer is bound whole.
    pub fn check_size(&self, what: &str, size: u64, storage: bool) -> Result<()> {
        let hint = "use a smaller batch size".to_string();
        if size > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                size,
                limit_name: "max_buffer_size",
                limit: self.limits.max_buffer_size,
                hint,
            });
        }
        if storage && size > self.limits.max_storage_buffer_binding_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                size,
                limit_name: "max_storage_buffer_binding_size",
                limit: self.limits.max_storage_buffer_binding_size,
                hint,
            });
        }
        Ok(())
    }

    /// A buffer of at least `size` bytes (contents undefined when reused; zeroed when new).
    pub fn get(&self, what: &str, size: u64, usage: wgpu::BufferUsages) -> Result<PooledBuffer> {
        let size = size.max(4).next_multiple_of(ALIGN);
        self.check_size(what, size, usage.contains(wgpu::BufferUsages::STORAGE))?;
        let key = (size, usage.bits());
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Error::Invalid("buffer pool poisoned".into()))?;
        if let Some(buf) = inner.free.get_mut(&key).and_then(Vec::pop) {
            inner.stats.reuses += 1;
            return Ok(PooledBuffer {
                buffer: Some(buf),
                key,
                pool: Arc::downgrade(&self.inner),
                fresh: false,
            });
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage,
            mapped_at_creation: false,
        });
        if pollster::block_on(oom.pop()).is_some() {
            return Err(Error::OutOfMemory {
                context: format!("allocating {what} ({size} bytes)"),
            });
        }
        log::trace!("new buffer {what}: {size} bytes");
        inner.stats.allocations += 1;
        inner.stats.allocated_bytes += size;
        inner.stats.peak_bytes = inner.stats.peak_bytes.max(inner.stats.allocated_bytes);
        Ok(PooledBuffer {
            buffer: Some(buffer),
            key,
            pool: Arc::downgrade(&self.inner),
            fresh: true,
        })
    }
}
