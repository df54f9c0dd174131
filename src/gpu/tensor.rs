//! Tensors: a shape, an element type and a range of a GPU buffer.

use super::Gpu;
use super::pool::{ALIGN, PooledBuffer};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Element types. Packed codes hold four 8-bit values per `u32`, element `i` in byte `i % 4`
/// (little end first), the layout of WGSL's `pack4xU8`/`pack4xI8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    U32,
    I32,
    /// Unsigned 8-bit codes, four per word (quantized activations, `0..=n`).
    U8x4,
    /// Signed 8-bit codes, four per word (quantized weight levels).
    I8x4,
}

impl DType {
    /// Bytes that `n` elements take (packed types round up to whole words).
    pub fn bytes_for(self, n: usize) -> u64 {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4 * n as u64,
            DType::U8x4 | DType::I8x4 => 4 * n.div_ceil(4) as u64,
        }
    }
}

/// A view of `shape` elements of `dtype` starting `offset` bytes into a pooled buffer. Clones share
/// the buffer; it goes back to the pool when the last view drops.
#[derive(Clone)]
pub struct Tensor {
    buf: Arc<PooledBuffer>,
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?} {:?} @{})",
            self.dtype, self.shape, self.offset
        )
    }
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor's data (a multiple of 4).
    pub fn byte_len(&self) -> u64 {
        self.dtype.bytes_for(self.numel())
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer()
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether two tensors share storage (same buffer).
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }

    pub(crate) fn keepalive(&self) -> Arc<PooledBuffer> {
        self.buf.clone()
    }

    /// The binding of this tensor's range.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: self.offset,
            size: wgpu::BufferSize::new(self.byte_len().max(4)),
        })
    }

    /// The binding of this tensor's range with its length rounded up to a multiple of `align`
    /// bytes (at most 256: the pool's buffers and views are 256-byte aligned, so the rounded
    /// range stays inside the buffer).
    pub fn binding_rounded(&self, align: u64) -> wgpu::BindingResource<'_> {
        debug_assert!(align <= super::pool::ALIGN && super::pool::ALIGN.is_multiple_of(align));
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: self.offset,
            size: wgpu::BufferSize::new(self.byte_len().max(4).next_multiple_of(align)),
        })
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} as {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// A sub-range starting `elem_offset` elements in. The offset must be a multiple of 64
    /// elements (256 bytes) so the view can be bound: parameter arenas lay tensors out that way.
    pub fn view(&self, elem_offset: usize, shape: &[usize]) -> Result<Tensor> {
        let start = self.offset + self.dtype.bytes_for(elem_offset);
        let len = self.dtype.bytes_for(shape.iter().product());
        if !start.is_multiple_of(ALIGN) || start + len > self.offset + self.byte_len() {
            return Err(Error::shape(
                "view",
                format!(
                    "range of {shape:?} at element {elem_offset} does not lie aligned inside {:?}",
                    self.shape
                ),
            ));
        }
        Ok(Tensor {
            buf: self.buf.clone(),
            offset: start,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }
}

const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    /// A tensor whose contents are undefined (a reused buffer keeps old data).
    pub fn empty(&self, what: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = dtype.bytes_for(shape.iter().product());
        let buf = self.pool().get(what, bytes, TENSOR_USAGE)?;
        Ok(Tensor {
            buf: Arc::new(buf),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A zero-filled tensor (new buffers are zero already; a reused one is cleared).
    pub fn zeros(&self, what: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty(what, shape, dtype)?;
        if !t.buf.fresh() {
            let zeros = vec![0u8; t.buf.size() as usize];
            self.queue.write_buffer(t.buffer(), 0, &zeros);
        }
        Ok(t)
    }

    /// Uploads `data` (any plain type) as a tensor of `shape`. The write lands before the next
    /// submit.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        what: &str,
        shape: &[usize],
        dtype: DType,
        data: &[T],
    ) -> Result<Tensor> {
        let t = self.empty(what, shape, dtype)?;
        self.write(&t, data)?;
        Ok(t)
    }

    pub fn upload_f32(&self, what: &str, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        self.upload(what, shape, DType::F32, data)
    }

    pub fn upload_u32(&self, what: &str, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        self.upload(what, shape, DType::U32, data)
    }

    /// Overwrites the tensor's contents with `data`, which must have exactly its byte length.
    pub fn write<T: bytemuck::Pod>(&self, t: &Tensor, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 != t.byte_len() {
            return Err(Error::shape(
                "upload",
                format!(
                    "{} bytes of data for a {:?} {:?} tensor of {} bytes",
                    bytes.len(),
                    t.dtype,
                    t.shape,
                    t.byte_len()
                ),
            ));
        }
        self.queue.write_buffer(t.buffer(), t.offset, bytes);
        Ok(())
    }
}
