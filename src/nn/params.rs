//! Parameter arenas: every tensor of a kind (parameters, BN running statistics) laid out in one
//! buffer at 256-byte aligned offsets, so one dispatch can update them all and each can still be
//! bound on its own. The padding between tensors stays zero.

use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};

/// One named tensor of an arena.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The checkpoint key, e.g. `model.4.conv.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in elements (a multiple of 64).
    pub offset: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The layout of an arena.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    entries: Vec<Entry>,
    len: usize,
}

/// Elements per alignment unit (256 bytes of f32).
const ALIGN: usize = 64;

impl Layout {
    /// Adds a tensor; returns its index.
    pub fn add(&mut self, name: String, shape: &[usize]) -> usize {
        let offset = self.len;
        self.len = (offset + shape.iter().product::<usize>()).next_multiple_of(ALIGN);
        self.entries.push(Entry {
            name,
            shape: shape.to_vec(),
            offset,
        });
        self.entries.len() - 1
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Total length in elements, padding included.
    pub fn len(&self) -> usize {
        self.len.max(ALIGN)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    /// A zero-filled arena for this layout.
    pub fn alloc(&self, gpu: &Gpu, what: &str) -> Result<Tensor> {
        gpu.zeros(what, &[self.len()], DType::F32)
    }

    /// The view of tensor `i` in `arena`.
    pub fn view(&self, arena: &Tensor, i: usize) -> Result<Tensor> {
        let e = &self.entries[i];
        arena.view(e.offset, &e.shape)
    }

    /// Scatters named values into a flat host copy of the arena (zeros elsewhere).
    pub fn pack(&self, values: &[Vec<f32>]) -> Vec<f32> {
        let mut flat = vec![0.0; self.len()];
        for (e, v) in self.entries.iter().zip(values) {
            flat[e.offset..e.offset + e.numel()].copy_from_slice(v);
        }
        flat
    }

    /// Gathers each tensor's values out of a flat host copy of the arena.
    pub fn unpack(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.entries
            .iter()
            .map(|e| flat[e.offset..e.offset + e.numel()].to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_pack_round_trips() {
        let mut l = Layout::default();
        l.add("a".into(), &[3, 5]);
        l.add("b".into(), &[64]);
        l.add("c".into(), &[1]);
        let offs: Vec<usize> = l.entries().iter().map(|e| e.offset).collect();
        assert_eq!(offs, vec![0, 64, 128]);
        assert_eq!(l.len(), 192);
        let vals = vec![
            (0..15).map(|v| v as f32).collect(),
            vec![7.0; 64],
            vec![-1.0],
        ];
        let flat = l.pack(&vals);
        assert_eq!(flat[15..64], vec![0.0; 49][..]);
        assert_eq!(l.unpack(&flat), vals);
    }
}
