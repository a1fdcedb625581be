//! Candle tensors over memory candle must never free (torch's CUDA tensors, read in
//! place through DLPack).
//!
//! candle frees a tensor's storage when the last tensor using it drops, and has no
//! way to hand a storage back without freeing it. So the tensor that wraps borrowed
//! memory (the *base*) is never dropped: [`Borrowed`] keeps one base per
//! `(address, elements, dtype, device)` and gives each call a reshaped view of it,
//! which shares the base's storage and may drop as usual.
//!
//! torch's caching allocator hands out the same blocks step after step, so a
//! training loop wraps each block once and the host memory held stays bounded (a
//! few hundred bytes per base, at most [`Borrowed::capacity`] bases). Before, every
//! argument of every call left its wrapper behind. When the table is full its bases
//! are forgotten (leaked, never freed) and it starts again.
//!
//! Reusing a base for a new tensor at the same address is sound: a base holds only
//! the address, its length and the device, and is only used while the caller holds
//! torch's tensor at that address alive.

use super::{DType, Tensor};
use candle_core::Result;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::Mutex;

/// What identifies borrowed memory: address, element count, dtype, device ordinal.
pub type Key = (u64, usize, DType, usize);

/// Bases of borrowed memory, one per [`Key`] (see the module doc).
pub struct Borrowed {
    bases: Mutex<Option<HashMap<Key, ManuallyDrop<Tensor>>>>,
    capacity: usize,
}

impl Borrowed {
    /// An empty table (a `const fn`, for a `static`: the map is made on first use).
    pub const fn new(capacity: usize) -> Self {
        Borrowed { bases: Mutex::new(None), capacity }
    }

    /// How many bases the table keeps before it forgets them all.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many bases the table holds now.
    pub fn len(&self) -> usize {
        self.bases.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, HashMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A tensor of shape `dims` over the memory `key` names: a view of its base,
    /// which `wrap` builds (as a 1-D tensor of `key.1` elements) the first time.
    ///
    /// # Safety
    /// `wrap` must return a contiguous tensor of `key.1` elements of `key.2` over the
    /// memory at `key.0` on device `key.3`, and the caller must keep that memory
    /// alive while it uses the returned tensor.
    pub unsafe fn view(
        &self,
        key: Key,
        dims: &[usize],
        wrap: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut guard = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        let bases = guard.get_or_insert_with(HashMap::new);
        if let Some(base) = bases.get(&key) {
            return base.reshape(dims);
        }
        if bases.len() >= self.capacity {
            // Forget (never drop) every base: dropping one would free torch's memory.
            bases.clear();
        }
        let base = wrap()?;
        let view = base.reshape(dims)?;
        bases.insert(key, ManuallyDrop::new(base));
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::Device;

    fn key(addr: u64, len: usize) -> Key {
        (addr, len, DType::F32, 0)
    }

    #[test]
    fn one_base_per_block_and_views_of_the_asked_shape() {
        let table = Borrowed::new(8);
        let mut wraps = 0;
        let (a, b, c) = {
            let mut view = |k: Key, dims: &[usize]| {
                // SAFETY: the wrapped tensors own their (host) memory.
                unsafe {
                    table.view(k, dims, || {
                        wraps += 1;
                        Tensor::arange(0f32, k.1 as f32, &Device::Cpu)
                    })
                }
                .unwrap()
            };
            (view(key(0x1000, 6), &[2, 3]), view(key(0x1000, 6), &[3, 2]), view(key(0x1000, 4), &[4]))
        };
        assert_eq!(wraps, 2, "same address and length: one base");
        assert_eq!(a.dims(), &[2, 3]);
        assert_eq!(b.dims(), &[3, 2]);
        assert_eq!(c.dims(), &[4]);
        // The views read the base's memory.
        assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn a_full_table_starts_again_and_a_wrong_shape_is_an_error() {
        let table = Borrowed::new(3);
        for addr in 0..5u64 {
            // SAFETY: as above.
            unsafe { table.view(key(addr, 2), &[2], || Tensor::zeros(2, DType::F32, &Device::Cpu)) }.unwrap();
        }
        assert!(table.len() <= table.capacity());
        assert_eq!(table.len(), 2, "cleared at the fourth base, then two more");
        // SAFETY: as above.
        let bad = unsafe { table.view(key(4, 2), &[3], || unreachable!("cached")) };
        assert!(bad.is_err());
    }
}
