//! Per-plane operations on contiguous `[N, C, H, W]` maps, each plane (`H·W`
//! contiguous values) handled by one task at a time: global average pooling, the dot
//! product of two maps plane by plane, and scaling (plus a shift) of every plane.
//! These are the memory-bound passes of AB and AFI (and FFC/SSM's pooling).

use super::par::SerialAware;
use super::{output_buffer, stream, Float};
use rayon::prelude::*;

/// Planes per rayon task when each plane touches `streams` arrays of `hw` elements:
/// enough work per task to amortise scheduling.
pub fn planes_per_task(hw: usize, streams: usize) -> usize {
    (32 * 1024 / hw.saturating_mul(streams).max(1)).max(1)
}

/// Mean of one contiguous plane (see [`sum`]).
#[inline]
pub fn plane_mean<T: Float>(plane: &[T]) -> T {
    if plane.is_empty() {
        return T::zero();
    }
    T::of(sum(plane) / plane.len() as f64)
}

/// `out[p] = mean(x[p*hw .. (p+1)*hw])` for every plane `p` (`x.len() == planes*hw`).
pub fn global_avg_pool<T: Float>(x: &[T], hw: usize) -> Vec<T> {
    if hw == 0 {
        return Vec::new();
    }
    let planes = x.len() / hw;
    let mut out = vec![T::zero(); planes];
    let per = planes_per_task(hw, 2);
    out.par_chunks_mut(per).zip(x.par_chunks(per * hw)).serial_aware().for_each(|(o, xs)| {
        for (dst, plane) in o.iter_mut().zip(xs.chunks_exact(hw)) {
            *dst = plane_mean(plane);
        }
    });
    out
}

/// Elements per block: summed in 8 lanes of `T` (which vectorises), then added lane
/// by lane to 8 f64 totals, so that a float32 partial sum rounds like a sum of at most
/// 8 elements, never like one of the whole plane.
const BLOCK: usize = 64;

/// `Σ f(a[i], b[i])`: blocks of [`BLOCK`] (and then 8-lane chunks) as described
/// there, the tail in f64.
#[inline(always)]
fn lane_sum<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    lane_sums(a, [b], f)[0]
}

/// `[Σ f(a[i], bs[k][i]) for k < K]` in one sweep over `a` and the `K` slices (each
/// at least as long as `a`), accumulated as in [`lane_sum`].
#[inline(always)]
fn lane_sums<T: Float, const K: usize>(a: &[T], bs: [&[T]; K], f: impl Fn(T, T) -> T) -> [f64; K] {
    if a.len() < BLOCK {
        short_lane_sums(a, bs, f)
    } else {
        block_lane_sums(a, bs, f)
    }
}

/// `lanes`, unchanged, through [`std::hint::black_box`]: the lane sums' loop then
/// compiles to whole 4-wide SSE vectors. Without it, LLVM (rustc 1.95) vectorised the
/// loop together with the f32 → f64 conversion after it, two floats per vector (the
/// width of a conversion), with register shuffles on every step: AFI's dots ran at
/// half the speed in perf, a compute limit near the memory bandwidth of the machine
/// (see docs/performance.md, "Measured 2026-12-01, morning"). It costs one store and load of
/// the lanes per block.
#[inline(always)]
fn vector_width_barrier<L>(lanes: L) -> L {
    std::hint::black_box(lanes)
}

/// [`lane_sums`] by blocks of [`BLOCK`], for any length.
#[inline(always)]
fn block_lane_sums<T: Float, const K: usize>(a: &[T], bs: [&[T]; K], f: impl Fn(T, T) -> T) -> [f64; K] {
    let bs = bs.map(|b| &b[..a.len()]);
    let mut total = [[0.0f64; 8]; K];
    let lanes = |start: usize, len: usize, total: &mut [[f64; 8]; K]| {
        let mut acc = [[T::zero(); 8]; K];
        let x = &a[start..start + len];
        let ys = bs.map(|b| &b[start..start + len]);
        for (j, x8) in x.chunks_exact(8).enumerate() {
            for k in 0..K {
                let y8 = &ys[k][8 * j..8 * j + 8];
                for i in 0..8 {
                    acc[k][i] += f(x8[i], y8[i]);
                }
            }
        }
        let acc = vector_width_barrier(acc);
        for k in 0..K {
            for i in 0..8 {
                total[k][i] += acc[k][i].as_f64();
            }
        }
    };
    let blocks = a.len() / BLOCK * BLOCK;
    for start in (0..blocks).step_by(BLOCK) {
        lanes(start, BLOCK, &mut total);
    }
    let whole = a.len() / 8 * 8;
    lanes(blocks, whole - blocks, &mut total);
    std::array::from_fn(|k| {
        let t = &total[k];
        let tail: f64 = a[whole..].iter().zip(&bs[k][whole..]).map(|(&x, &y)| f(x, y).as_f64()).sum();
        ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])) + tail
    })
}

/// [`lane_sums`] of slices shorter than one block (a 7×7 plane): the same lanes and
/// the same order of additions, so the same result, in straight-line code per slice.
#[inline(always)]
fn short_lane_sums<T: Float, const K: usize>(a: &[T], bs: [&[T]; K], f: impl Fn(T, T) -> T) -> [f64; K] {
    let whole = a.len() / 8 * 8;
    std::array::from_fn(|k| {
        let b = &bs[k][..a.len()];
        let mut acc = [T::zero(); 8];
        for (x8, y8) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += f(x8[i], y8[i]);
            }
        }
        let t = vector_width_barrier(acc).map(|v| v.as_f64());
        let tail: f64 = a[whole..].iter().zip(&b[whole..]).map(|(&x, &y)| f(x, y).as_f64()).sum();
        ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])) + tail
    })
}

/// `[Σ a[k][i] for k < K]`: the sums of `K` equal-length slices in one sweep (see
/// [`lane_sum`] for the accumulation).
#[inline]
pub fn sums<T: Float, const K: usize>(a: [&[T]; K]) -> [f64; K] {
    lane_sums(a[0], a, |_, y| y)
}

/// `[Σ a[i] · bs[k][i] for k < K]`: the dot products of one slice with `K` others in
/// one sweep (see [`lane_sum`] for the accumulation).
#[inline]
pub fn dots<T: Float, const K: usize>(a: &[T], bs: [&[T]; K]) -> [f64; K] {
    lane_sums(a, bs, |x, y| x * y)
}

/// Dot product of two equal-length slices (see [`lane_sum`] for the accumulation).
#[inline]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> f64 {
    lane_sum(a, b, |x, y| x * y)
}

/// Sum of a slice (see [`lane_sum`] for the accumulation).
#[inline]
pub fn sum<T: Float>(a: &[T]) -> f64 {
    lane_sum(a, a, |x, _| x)
}

/// `out[p] = Σ_hw a[p, hw] · b[p, hw]` for every plane `p`: one pass over both maps.
pub fn plane_dots<T: Float>(a: &[T], b: &[T], hw: usize) -> Vec<f64> {
    if hw == 0 {
        return Vec::new();
    }
    let planes = a.len() / hw;
    let mut out = vec![0.0f64; planes];
    let per = planes_per_task(hw, 2);
    out.par_chunks_mut(per).zip(a.par_chunks(per * hw).zip(b.par_chunks(per * hw))).serial_aware().for_each(
        |(o, (pa, pb))| {
            for (dst, (x, y)) in o.iter_mut().zip(pa.chunks_exact(hw).zip(pb.chunks_exact(hw))) {
                *dst = dot(x, y);
            }
        },
    );
    out
}

/// `out[p, :] = scale[p] · src[p, :] + shift[p]` for every plane `p` (no shift when
/// `shift` is `None`), into a new map.
pub fn scale_planes<T: Float>(src: &[T], scale: &[T], shift: Option<&[T]>, hw: usize) -> Vec<T> {
    assert!(hw > 0 && src.len() % hw == 0, "scale_planes: the map is not whole planes");
    let planes = src.len() / hw;
    assert!(scale.len() >= planes && shift.is_none_or(|b| b.len() >= planes), "scale_planes: short scale");
    let mut out = output_buffer::<T>(src.len());
    let per = planes_per_task(hw, 2);
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    let streaming = stream::worth_it::<T>(src.len(), hw);
    spare.par_chunks_mut(per * hw).zip(src.par_chunks(per * hw)).enumerate().serial_aware().for_each(
        |(task, (o, s))| {
            for (i, (op, sp)) in o.chunks_exact_mut(hw).zip(s.chunks_exact(hw)).enumerate() {
                let p = task * per + i;
                let (a, b) = (scale[p], shift.map_or(T::zero(), |b| b[p]));
                if streaming {
                    stream::fill(op, |at, vals| {
                        for (d, &v) in vals.iter_mut().zip(&sp[at..]) {
                            *d = a * v + b;
                        }
                    });
                } else {
                    for (d, &v) in op.iter_mut().zip(sp) {
                        d.write(a * v + b);
                    }
                }
            }
            if streaming {
                stream::fence();
            }
        },
    );
    // SAFETY: the chunks above cover `src.len()` elements, whole planes each (the
    // length is a multiple of `hw`), and every element of every plane was written.
    unsafe { out.set_len(src.len()) };
    out
}

/// A new `[planes, hw]` map whose plane `p` is `values[p]` everywhere: global average
/// pooling's input gradient (`values` already divided by `hw`), written once into a
/// fresh buffer, where the broadcast view `torch` would otherwise clone.
pub fn broadcast_planes<T: Float>(values: &[T], hw: usize) -> Vec<T> {
    let len = values.len() * hw;
    let mut out = output_buffer::<T>(len);
    if len == 0 {
        return out;
    }
    let per = planes_per_task(hw, 1);
    let streaming = stream::worth_it::<T>(len, hw);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(per * hw)
        .zip(values.par_chunks(per))
        .serial_aware()
        .for_each(|(o, vs)| {
            for (plane, &v) in o.chunks_exact_mut(hw).zip(vs) {
                if streaming {
                    stream::fill(plane, |_, vals| vals.fill(v));
                } else {
                    for d in plane {
                        d.write(v);
                    }
                }
            }
            if streaming {
                stream::fence();
            }
        });
    // SAFETY: the chunks cover all `len` elements, whole planes, each written.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sums_equal_block_sums_bit_for_bit() {
        let a: Vec<f32> = (0..BLOCK).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173).collect();
        let b: Vec<f32> = (0..BLOCK).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.091).collect();
        for len in 0..BLOCK {
            let (x, y) = (&a[..len], &b[..len]);
            let short = short_lane_sums(x, [x, y], |p, q| p * q);
            let block = block_lane_sums(x, [x, y], |p, q| p * q);
            assert_eq!(short.map(f64::to_bits), block.map(f64::to_bits), "len {len}");
        }
    }

    #[test]
    fn broadcast_planes_fills_each_plane() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        for hw in [1, 7, 49, 3000] {
            let out = broadcast_planes(&values, hw);
            assert_eq!(out.len(), values.len() * hw);
            for (p, plane) in out.chunks_exact(hw).enumerate() {
                assert!(plane.iter().all(|&v| v == values[p]), "hw {hw}, plane {p}");
            }
        }
        assert!(broadcast_planes::<f64>(&[], 5).is_empty());
        assert!(broadcast_planes(&[1.0f64], 0).is_empty());
    }

    #[test]
    fn streamed_writes_equal_plain_ones() {
        // Plane sizes around the streaming block, and odd offsets into the output.
        let src: Vec<f32> = (0..7 * 150).map(|v| (v as f32 * 0.37).sin()).collect();
        let (scale, shift): (Vec<f32>, Vec<f32>) =
            (0..1050).map(|p| (p as f32 * 0.1, 1.0 - p as f32)).unzip();
        for hw in [1, 7, 63, 64, 65, 150] {
            let planes = src.len() / hw;
            let s = &src[..planes * hw];
            let both = |f: &dyn Fn() -> Vec<f32>| (stream::forced(true, f), stream::forced(false, f));
            let (a, b) = both(&|| scale_planes(s, &scale, Some(&shift), hw));
            assert_eq!(a, b, "scale_planes, hw {hw}");
            let (a, b) = both(&|| broadcast_planes(&scale[..planes], hw));
            assert_eq!(a, b, "broadcast_planes, hw {hw}");
        }
    }

    #[test]
    fn pools_each_plane() {
        let x: Vec<f32> = (0..2 * 3 * 5).map(|v| v as f32).collect();
        let y = global_avg_pool(&x, 5);
        assert_eq!(y, vec![2.0, 7.0, 12.0, 17.0, 22.0, 27.0]);
    }

    #[test]
    fn plane_dots_and_scaling() {
        let a: Vec<f64> = (0..12).map(|v| v as f64).collect();
        let b = vec![2.0; 12];
        assert_eq!(plane_dots(&a, &b, 3), vec![6.0, 24.0, 42.0, 60.0]);
        let s = scale_planes(&a, &[1.0, 0.0, -1.0, 2.0], Some(&[0.5, 0.5, 0.0, 0.0]), 3);
        assert_eq!(&s[..6], &[0.5, 1.5, 2.5, 0.5, 0.5, 0.5]);
        assert_eq!(&s[6..], &[-6.0, -7.0, -8.0, 18.0, 20.0, 22.0]);
        assert_eq!(scale_planes(&a, &[1.0; 4], None, 3), a);
    }

    #[test]
    fn f32_mean_is_accurate_over_large_planes() {
        let x = vec![0.1f32; 1 << 20];
        let y = global_avg_pool(&x, 1 << 20);
        assert!((y[0] - 0.1).abs() < 1e-7);
    }
}
