//! Streaming (non-temporal) stores for map-sized outputs.
//!
//! A normal store to memory that is not in cache first reads the line it writes
//! (write-allocate), so writing a map costs a read and a write of it. Large output
//! maps (AB's outputs and input gradients, AFI's channels-last ones, the
//! pooled-gradient broadcast) leave the last-level cache before anything reads them
//! again, so they are written with streaming stores, which skip that read
//! ([`worth_it`] says when). AFI's `[N, C, H, W]` outputs are not: they measured
//! faster with plain stores (see `afi.rs`). A pass
//! computes a small block of values in registers and L1 ([`fill`], [`BLOCK`]) and
//! hands it to [`store`]; each parallel task that stored calls [`fence`] before it
//! finishes, so that its stores are visible to the thread that joins it.
//!
//! On targets other than x86-64, [`store`] is a plain copy and [`fence`] does nothing.

use super::Float;
use std::mem::MaybeUninit;

/// Elements computed per block before they are streamed out.
pub const BLOCK: usize = 64;

/// Outputs of at least this many bytes are streamed. A pass writing one also reads at
/// least as much, so together they exceed half of the last-level cache of the
/// machines we target (32 MB on this project's CI host): the output leaves the cache
/// before anything reads it again, and skipping the read of write-allocate is pure
/// gain. Smaller outputs are written normally and stay in cache for the next layer.
pub const MIN_BYTES: usize = 16 << 20;

/// Whether a pass writing `len` values of `T` in all, plane by plane (`hw` each),
/// should stream its stores. Planes must be whole cache lines: a line shared by two planes
/// would take the end of one stream and the start of the next (or plain stores, at
/// an unaligned start) and reach memory piecemeal. Streaming the 196-byte planes of a
/// 7×7 map that way made FFC's pooled-gradient broadcast (100 MB) 2.4× slower.
pub fn worth_it<T>(len: usize, hw: usize) -> bool {
    #[cfg(test)]
    if let Some(forced) = FORCED.with(|f| f.get()) {
        return forced;
    }
    let size = std::mem::size_of::<T>();
    cfg!(target_arch = "x86_64") && len * size >= MIN_BYTES && (hw * size) % LINE == 0
}

/// Cache line bytes.
const LINE: usize = 64;

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`worth_it`] answering `streaming` on this thread (where the kernels
/// decide, before they fan out), for tests of both paths at small sizes.
#[cfg(test)]
pub fn forced<R>(streaming: bool, f: impl FnOnce() -> R) -> R {
    FORCED.with(|c| c.set(Some(streaming)));
    let r = f();
    FORCED.with(|c| c.set(None));
    r
}

/// Fills `dst` with streaming stores, block by block: `f(offset, vals)` computes
/// `vals` (at most [`BLOCK`] values), the elements `offset..offset + vals.len()` of
/// `dst`, which [`store`] then writes.
#[inline]
pub fn fill<T: Float>(dst: &mut [MaybeUninit<T>], mut f: impl FnMut(usize, &mut [T])) {
    let mut buf = [T::zero(); BLOCK];
    for (b, d) in dst.chunks_mut(BLOCK).enumerate() {
        let vals = &mut buf[..d.len()];
        f(b * BLOCK, vals);
        store(d, vals);
    }
}

/// `dst = src` (same lengths), with streaming stores where `dst` is 16-byte aligned
/// (x86-64), plain stores for the unaligned head and the tail.
#[inline]
pub fn store<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "stream::store: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let bytes = std::mem::size_of_val(src);
        let d = dst.as_mut_ptr() as *mut u8;
        let s = src.as_ptr() as *const u8;
        // Bytes before the first 16-byte boundary of `dst`, whole elements only.
        let size = std::mem::size_of::<T>().max(1);
        let head = ((16 - (d as usize) % 16) % 16).min(bytes);
        if head % size == 0 {
            let vectors = (bytes - head) / 16;
            // SAFETY: `d` and `s` address `bytes` bytes each (equal lengths, checked
            // above); the head, vector and tail ranges partition them; the vector
            // stores are to 16-byte aligned addresses (`d + head`), as `_mm_stream_si128`
            // needs; SSE2 is part of x86-64. Writing bytes initialises `dst` with
            // `src`'s values, which are `Copy`.
            unsafe {
                std::ptr::copy_nonoverlapping(s, d, head);
                for v in 0..vectors {
                    let at = head + 16 * v;
                    let x = _mm_loadu_si128(s.add(at) as *const __m128i);
                    _mm_stream_si128(d.add(at) as *mut __m128i, x);
                }
                let done = head + 16 * vectors;
                std::ptr::copy_nonoverlapping(s.add(done), d.add(done), bytes - done);
            }
            return;
        }
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(v);
    }
}

/// Orders this thread's streaming stores before its later stores (x86-64 `sfence`):
/// call it at the end of a parallel task that used [`store`].
#[inline]
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions; SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_large_outputs_of_whole_line_planes_only() {
        let x86 = cfg!(target_arch = "x86_64");
        assert_eq!(worth_it::<f32>(MIN_BYTES / 4, 56 * 56), x86);
        assert_eq!(worth_it::<f64>(100 << 20, 28 * 28), x86);
        assert!(!worth_it::<f32>(100 << 20, 7 * 7), "a 7x7 plane is not whole lines");
        assert!(!worth_it::<f32>(MIN_BYTES / 4 - 1, 56 * 56), "small outputs stay in cache");
    }

    #[test]
    fn fill_writes_each_block_where_it_belongs() {
        for offset in 0..3 {
            let len = 3 * BLOCK + 5;
            let mut buf = vec![MaybeUninit::<f32>::uninit(); len + offset];
            fill(&mut buf[offset..], |off, vals| {
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = (off + i) as f32;
                }
            });
            fence();
            // SAFETY: `fill` wrote every element after `offset`.
            let got: Vec<f32> = buf[offset..].iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(got, (0..len).map(|i| i as f32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn stores_every_element_at_any_alignment_and_length() {
        let src: Vec<f32> = (0..200).map(|i| i as f32 * 0.5 - 3.0).collect();
        for offset in 0..5 {
            for len in [0, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 150] {
                let mut buf = vec![MaybeUninit::<f32>::uninit(); len + offset];
                store(&mut buf[offset..], &src[..len]);
                fence();
                // SAFETY: `store` wrote the `len` elements after `offset`.
                let got: Vec<f32> = buf[offset..].iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(got, &src[..len], "offset {offset}, len {len}");
            }
        }
        let src64: Vec<f64> = (0..37).map(|i| i as f64 * 1.25).collect();
        for offset in 0..3 {
            let mut buf = vec![MaybeUninit::<f64>::uninit(); 37 + offset];
            store(&mut buf[offset..], &src64);
            fence();
            // SAFETY: as above.
            let got: Vec<f64> = buf[offset..].iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(got, src64);
        }
    }
}
