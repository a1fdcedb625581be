//! The per-plane operations of [`super::pool`] on channels-last maps (`[N, H, W, C]`
//! in memory: torch's `channels_last` format, which torch recommends for CNNs on CPUs).
//! A sample is then an `HW × C` row-major matrix and a plane one of its columns, so
//! pooling adds rows, and scaling multiplies each row by the sample's `C` values;
//! both vectorise across channels.
//!
//! Results do not depend on the number of threads: a sample's rows are cut into
//! parts of a fixed size, whatever the pool, and the parts added in order.

use super::{output_buffer, stream, Float};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows summed in `T` before being added to the f64 totals: a float32 partial sum
/// rounds like a sum of at most this many elements, as in [`super::pool`].
const BLOCK: usize = 64;

/// Rows per parallel part of a sample (a multiple of [`BLOCK`]).
const PART: usize = 8 * BLOCK;

/// Adds `Σ_r f(a[r, j], b[r, j])` over the rows of the row-major `rows × c` matrices
/// `a` and `b` to `totals[j]`, on the calling thread.
#[inline]
fn add_column_sums<T: Float>(a: &[T], b: &[T], c: usize, totals: &mut [f64], f: impl Fn(T, T) -> T) {
    let mut acc = vec![T::zero(); c];
    for (ab, bb) in a.chunks(BLOCK * c).zip(b.chunks(BLOCK * c)) {
        acc.fill(T::zero());
        for (ra, rb) in ab.chunks_exact(c).zip(bb.chunks_exact(c)) {
            for ((s, &x), &y) in acc.iter_mut().zip(ra).zip(rb) {
                *s += f(x, y);
            }
        }
        for (t, &s) in totals.iter_mut().zip(&acc) {
            *t += s.as_f64();
        }
    }
}

/// The totals of one part of a sample's rows (at most [`PART`] rows of `a` and `b`).
fn part_totals<T: Float>(a: &[T], b: &[T], c: usize, f: impl Fn(T, T) -> T) -> Vec<f64> {
    let mut totals = vec![0.0f64; c];
    add_column_sums(a, b, c, &mut totals, f);
    totals
}

/// Adds one part's totals to a sample's (parts are added in order, from zero).
fn add_part(sample: &mut [f64], part: &[f64]) {
    for (o, &v) in sample.iter_mut().zip(part) {
        *o += v;
    }
}

/// The channel means of one `[hw, C]` sample (`dst.len()` channels), on the calling
/// thread: the values [`pool`] gives it.
pub(crate) fn sample_means_into<T: Float>(x: &[T], hw: usize, dst: &mut [T]) {
    let c = dst.len();
    if c == 0 {
        return;
    }
    let mut totals = vec![0.0f64; c];
    for part in x[..hw * c].chunks(PART * c) {
        add_part(&mut totals, &part_totals(part, part, c, |v, _| v));
    }
    let inv = 1.0 / hw.max(1) as f64;
    for (d, t) in dst.iter_mut().zip(totals) {
        *d = T::of(t * inv);
    }
}

/// `[n, c]`: for each sample and channel, `Σ_r f(a, b)` over the `hw` rows of the
/// `[n, hw, c]` maps `a` and `b`.
fn sample_column_sums<T: Float>(
    a: &[T],
    b: &[T],
    n: usize,
    hw: usize,
    c: usize,
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<f64> {
    if c == 0 {
        return Vec::new();
    }
    let parts = hw.div_ceil(PART).max(1);
    let sample = hw * c;
    let partials: Vec<Vec<f64>> = (0..n * parts)
        .into_par_iter()
        .map(|task| {
            let (s, p) = (task / parts, task % parts);
            let rows = (p * PART).min(hw)..((p + 1) * PART).min(hw);
            let at = s * sample + rows.start * c..s * sample + rows.end * c;
            part_totals(&a[at.clone()], &b[at], c, &f)
        })
        .collect();
    let mut out = vec![0.0f64; n * c];
    for (row, sample_parts) in out.chunks_mut(c).zip(partials.chunks(parts)) {
        for part in sample_parts {
            add_part(row, part);
        }
    }
    out
}

/// Global average pooling of an `[n, hw, c]` map: `[n, c]`.
pub fn pool<T: Float>(x: &[T], n: usize, hw: usize, c: usize) -> Vec<T> {
    let inv = 1.0 / hw.max(1) as f64;
    sample_column_sums(x, x, n, hw, c, |v, _| v).into_iter().map(|s| T::of(s * inv)).collect()
}

/// `[n, c]`: `Σ_hw a · b` per sample and channel of two `[n, hw, c]` maps.
pub fn dots<T: Float>(a: &[T], b: &[T], n: usize, hw: usize, c: usize) -> Vec<f64> {
    sample_column_sums(a, b, n, hw, c, |x, y| x * y)
}

/// Writes `out[r, j] = scale[j] · src[r, j] + shift[j]` (`shift` 0 when `None`) for
/// every row `r` of the row-major `rows × c` `src` into `out`, with streaming stores
/// when `streaming` (the caller then fences).
#[inline]
pub(crate) fn scale_rows_into<T: Float>(
    out: &mut [MaybeUninit<T>],
    src: &[T],
    scale: &[T],
    shift: Option<&[T]>,
    streaming: bool,
) {
    let c = scale.len();
    for (orow, srow) in out.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        if streaming {
            stream::fill(orow, |at, vals| {
                let (a, s) = (&scale[at..], &srow[at..]);
                match shift {
                    Some(b) => {
                        for (((d, &a), &v), &b) in vals.iter_mut().zip(a).zip(s).zip(&b[at..]) {
                            *d = a * v + b;
                        }
                    }
                    None => {
                        for ((d, &a), &v) in vals.iter_mut().zip(a).zip(s) {
                            *d = a * v + T::zero();
                        }
                    }
                }
            });
            continue;
        }
        match shift {
            Some(b) => {
                for (((d, &a), &v), &b) in orow.iter_mut().zip(scale).zip(srow).zip(b) {
                    d.write(a * v + b);
                }
            }
            None => {
                for ((d, &a), &v) in orow.iter_mut().zip(scale).zip(srow) {
                    d.write(a * v + T::zero());
                }
            }
        }
    }
}

/// `out[s, r, j] = scale[s, j] · src[s, r, j] + shift[s, j]` for the `[n, hw, c]` map
/// `src` and `[n, c]` `scale` and `shift` (0 when `None`), into a new map: the twin of
/// [`super::pool::scale_planes`], with the same arithmetic.
pub fn scale<T: Float>(src: &[T], scale: &[T], shift: Option<&[T]>, n: usize, hw: usize, c: usize) -> Vec<T> {
    let len = n * hw * c;
    assert!(src.len() == len && scale.len() >= n * c, "channels_last::scale: sizes");
    assert!(shift.is_none_or(|b| b.len() >= n * c), "channels_last::scale: short shift");
    let mut out = output_buffer::<T>(len);
    if len == 0 {
        return out;
    }
    let streaming = stream::worth_it::<T>(len, c);
    // Tasks of whole rows within one sample, ~32 K elements each.
    let rows = (32 * 1024 / (2 * c)).clamp(1, hw);
    let per_sample = hw.div_ceil(rows);
    let spare = &mut out.spare_capacity_mut()[..len];
    spare.par_chunks_mut(hw * c).zip(src.par_chunks(hw * c)).enumerate().for_each(|(s, (o, x))| {
        let (a, b) = (&scale[s * c..(s + 1) * c], shift.map(|b| &b[s * c..(s + 1) * c]));
        o.par_chunks_mut(rows * c).zip(x.par_chunks(rows * c)).with_min_len(per_sample.min(4)).for_each(
            |(o, x)| {
                scale_rows_into(o, x, a, b, streaming);
                if streaming {
                    stream::fence();
                }
            },
        );
    });
    // SAFETY: the chunks cover all `len` elements, whole rows each (`len` is `n·hw·c`),
    // and `scale_rows_into` writes every element of every row.
    unsafe { out.set_len(len) };
    out
}

/// A new `[n, hw, c]` map whose row `r` of sample `s` is `values[s, :]`: the gradient
/// of a channels-last global average pooling (`values` already divided by `hw`).
pub fn broadcast<T: Float>(values: &[T], hw: usize, c: usize) -> Vec<T> {
    let len = values.len().checked_div(c).map_or(0, |n| n * hw * c);
    let mut out = output_buffer::<T>(len);
    if len == 0 {
        return out;
    }
    let streaming = stream::worth_it::<T>(len, c);
    let rows = (32 * 1024 / c).clamp(1, hw);
    let spare = &mut out.spare_capacity_mut()[..len];
    spare.par_chunks_mut(hw * c).zip(values.par_chunks(c)).for_each(|(o, v)| {
        o.par_chunks_mut(rows * c).for_each(|o| {
            for orow in o.chunks_exact_mut(c) {
                if streaming {
                    stream::fill(orow, |at, vals| vals.copy_from_slice(&v[at..at + vals.len()]));
                } else {
                    for (d, &x) in orow.iter_mut().zip(v) {
                        d.write(x);
                    }
                }
            }
            if streaming {
                stream::fence();
            }
        });
    });
    // SAFETY: the chunks cover all `len` elements, whole rows of `c` each, every one
    // of them written.
    unsafe { out.set_len(len) };
    out
}

/// `[n, c, hw]` → `[n, hw, c]`, the slow obvious way (for tests of both layouts).
#[cfg(test)]
pub(crate) fn to_nhwc(x: &[f64], n: usize, c: usize, hw: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for s in 0..n {
        for j in 0..c {
            for r in 0..hw {
                out[(s * hw + r) * c + j] = x[(s * c + j) * hw + r];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pool;

    fn data(len: usize, seed: u64) -> Vec<f64> {
        (0..len).map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 - 500.0) / 250.0).collect()
    }

    #[test]
    fn each_operation_equals_its_channels_first_twin() {
        // Row counts around the block and part sizes; odd channel counts.
        for (n, c, hw) in
            [(1, 1, 1), (2, 3, 5), (3, 7, 49), (2, 5, BLOCK + 3), (2, 4, PART + 9), (1, 9, 2 * PART)]
        {
            let x = data(n * c * hw, 1);
            let g = data(n * c * hw, 2);
            let (xl, gl) = (to_nhwc(&x, n, c, hw), to_nhwc(&g, n, c, hw));
            let close = |a: &[f64], b: &[f64], what: &str| {
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-12 * (1.0 + q.abs()),
                        "{what} [{i}] {p} vs {q}, shape {n}x{c}x{hw}"
                    );
                }
            };
            close(&pool(&xl, n, hw, c), &pool::global_avg_pool(&x, hw), "pool");
            close(&dots(&gl, &xl, n, hw, c), &pool::plane_dots(&g, &x, hw), "dots");
            let a = data(n * c, 3);
            let b = data(n * c, 4);
            for shift in [None, Some(&b[..])] {
                let want = to_nhwc(&pool::scale_planes(&x, &a, shift, hw), n, c, hw);
                assert_eq!(scale(&xl, &a, shift, n, hw, c), want, "scale, shape {n}x{c}x{hw}");
                let streamed = stream::forced(true, || scale(&xl, &a, shift, n, hw, c));
                assert_eq!(streamed, want, "streamed scale, shape {n}x{c}x{hw}");
            }
            let want = to_nhwc(&pool::broadcast_planes(&a, hw), n, c, hw);
            assert_eq!(broadcast(&a, hw, c), want, "broadcast");
            assert_eq!(stream::forced(true, || broadcast(&a, hw, c)), want, "streamed broadcast");
        }
    }

    #[test]
    fn sums_do_not_depend_on_the_thread_count() {
        let (n, c, hw) = (3, 6, 3 * PART + 17);
        let x: Vec<f32> = (0..n * c * hw).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3).collect();
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| (pool(&x, n, hw, c), dots(&x, &x, n, hw, c)))
        };
        let one = run(1);
        for threads in [2, 3, 7] {
            assert_eq!(run(threads), one, "{threads} threads");
        }
    }

    #[test]
    fn empty_maps() {
        assert!(pool::<f32>(&[], 0, 4, 3).is_empty());
        assert!(scale::<f32>(&[], &[], None, 0, 4, 3).is_empty());
        assert!(broadcast::<f64>(&[], 4, 3).is_empty());
    }
}
