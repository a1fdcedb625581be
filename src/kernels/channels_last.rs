//! The per-plane operations of [`super::pool`] on channels-last maps (`[N, H, W, C]`
//! in memory: torch's `channels_last` format, which torch recommends for CNNs on CPUs).
//! A sample is then an `HW × C` row-major matrix and a plane one of its columns, so
//! pooling adds rows, and scaling multiplies each row by the sample's `C` values;
//! both vectorise across channels.
//!
//! Results do not depend on the number of threads: a sample's rows are cut into
//! parts of a fixed size, whatever the pool, and the parts added in order.

use super::par::{self, SerialAware};
use super::{output_buffer, stream, Float};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per parallel part of a sample.
const PART: usize = 512;

/// Adds `Σ_r f(a[r, j], b_i[r, j])` over the rows of the row-major `rows × c`
/// matrices `a` and `b_i` to `totals[i][j]`, for every `b_i` of `bs` in one sweep
/// over `a`, on the calling thread, rounding as the channels-first kernels' plane sums
/// do ([`super::pool`]): fewer than [`SHORT_ROWS`] rows add each term in f64 (a
/// float32 pooling of a few rows then rounds once; summing float32 rows first made
/// the pooled values of a batch of two noticeably less accurate than torch's), more
/// add runs of [`RUN`] rows in `T` and each run's sums in f64, so that no float32
/// partial sum holds more than 8 terms. Each `b_i`'s totals are those it would get
/// alone.
#[inline]
fn add_column_sums<T: Float>(a: &[T], bs: &[&[T]], c: usize, totals: &mut [Vec<f64>], f: impl Fn(T, T) -> T) {
    let rows = a.len() / c;
    let runs = if rows >= SHORT_ROWS { rows / RUN } else { 0 };
    let mut acc = vec![T::zero(); if runs > 0 { c } else { 0 }];
    for r0 in (0..runs * RUN).step_by(RUN) {
        let run = r0 * c..(r0 + RUN) * c;
        for (b, t) in bs.iter().zip(totals.iter_mut()) {
            acc.fill(T::zero());
            for (xa, xb) in a[run.clone()].chunks_exact(c).zip(b[run.clone()].chunks_exact(c)) {
                for ((s, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
                    *s += f(x, y);
                }
            }
            for (t, &s) in t.iter_mut().zip(&acc) {
                *t += s.as_f64();
            }
        }
    }
    let rest = runs * RUN * c..rows * c;
    for (b, t) in bs.iter().zip(totals.iter_mut()) {
        for (xa, xb) in a[rest.clone()].chunks_exact(c).zip(b[rest.clone()].chunks_exact(c)) {
            for ((t, &x), &y) in t.iter_mut().zip(xa).zip(xb) {
                *t += f(x, y).as_f64();
            }
        }
    }
}

/// Rows of a part below which [`add_column_sums`] adds every term in f64 (the
/// channels-first kernels' short planes).
const SHORT_ROWS: usize = 64;

/// Rows summed in `T` before their sums go to the f64 totals.
const RUN: usize = 8;

/// The totals of one part of a sample's rows (at most [`PART`] rows of `a` and each
/// of `bs`), one `Vec` per `b`.
fn part_totals<T: Float>(a: &[T], bs: &[&[T]], c: usize, f: impl Fn(T, T) -> T) -> Vec<Vec<f64>> {
    let mut totals = vec![vec![0.0f64; c]; bs.len()];
    add_column_sums(a, bs, c, &mut totals, f);
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
    if c > 0 {
        dst.copy_from_slice(&sample_means_each(&[x], hw, c)[0]);
    }
}

/// The channel means of one `[hw, C]` sample of each map of `xs`, in one sweep over
/// the maps' rows, on the calling thread: the values [`pool`] gives each.
pub(crate) fn sample_means_each<T: Float>(xs: &[&[T]], hw: usize, c: usize) -> Vec<Vec<T>> {
    let inv = 1.0 / hw.max(1) as f64;
    let Some(&first) = xs.first() else { return Vec::new() };
    let totals = sample_totals(first, xs, hw, c, |_, v| v);
    totals.into_iter().map(|t| t.into_iter().map(|v| T::of(v * inv)).collect()).collect()
}

/// `Σ_hw a · b_i` per channel of one `[hw, C]` sample of `a` and of each `b_i` (one
/// `Vec` per map), in one sweep over `a`, on the calling thread: the values [`dots`]
/// gives each pair.
pub(crate) fn sample_dots_each<T: Float>(a: &[T], bs: &[&[T]], hw: usize, c: usize) -> Vec<Vec<f64>> {
    sample_totals(a, bs, hw, c, |x, y| x * y)
}

/// `Σ_r f(a, b_i)` per channel over the `hw` rows of one sample, part by part as
/// [`sample_column_sums`] adds them.
fn sample_totals<T: Float>(
    a: &[T],
    bs: &[&[T]],
    hw: usize,
    c: usize,
    f: impl Fn(T, T) -> T,
) -> Vec<Vec<f64>> {
    let mut totals = vec![vec![0.0f64; c]; bs.len()];
    for (p, pa) in a[..hw * c].chunks(PART * c).enumerate() {
        let at = p * PART * c..p * PART * c + pa.len();
        let parts_of: Vec<&[T]> = bs.iter().map(|b| &b[at.clone()]).collect();
        let parts = part_totals(pa, &parts_of, c, &f);
        for (t, part) in totals.iter_mut().zip(&parts) {
            add_part(t, part);
        }
    }
    totals
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
        .serial_aware()
        .map(|task| {
            let (s, p) = (task / parts, task % parts);
            let rows = (p * PART).min(hw)..((p + 1) * PART).min(hw);
            let at = s * sample + rows.start * c..s * sample + rows.end * c;
            part_totals(&a[at.clone()], &[&b[at]], c, &f).swap_remove(0)
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
    spare.par_chunks_mut(hw * c).zip(src.par_chunks(hw * c)).enumerate().serial_aware().for_each(
        |(s, (o, x))| {
            let (a, b) = (&scale[s * c..(s + 1) * c], shift.map(|b| &b[s * c..(s + 1) * c]));
            o.par_chunks_mut(rows * c)
                .zip(x.par_chunks(rows * c))
                .with_min_len(par::min_len(per_sample.min(4)))
                .for_each(|(o, x)| {
                    scale_rows_into(o, x, a, b, streaming);
                    if streaming {
                        stream::fence();
                    }
                });
        },
    );
    // SAFETY: the chunks cover all `len` elements, whole rows each (`len` is `n·hw·c`),
    // and `scale_rows_into` writes every element of every row.
    unsafe { out.set_len(len) };
    out
}

/// Writes `out[r, j] = Σ_i w_i[j] · src_i[r, j]` for every row `r` of the row-major
/// `rows × c` matrices `src_i` (`c = w_i.len()`) into `out`: rows summed in a buffer
/// map by map (vectorised across channels), then stored once, with streaming
/// stores when `streaming` (the caller then fences). [`weighted_sum`]'s arithmetic,
/// for a part of one sample.
pub(crate) fn weighted_rows_into<T: Float>(
    out: &mut [MaybeUninit<T>],
    src: &[&[T]],
    w: &[&[T]],
    streaming: bool,
) {
    // A tile of rows at a time, the weights repeated to its length (see `tiled`).
    let w = tiled(w);
    let tile = w[0].len();
    let mut acc = vec![T::zero(); tile];
    for (k, orows) in out.chunks_mut(tile).enumerate() {
        let (at, len) = (k * tile, orows.len());
        let acc = &mut acc[..len];
        for ((a, &wv), &xv) in acc.iter_mut().zip(&w[0]).zip(&src[0][at..at + len]) {
            *a = wv * xv;
        }
        for (wi, xi) in w.iter().zip(src).skip(1) {
            for ((a, &wv), &xv) in acc.iter_mut().zip(wi).zip(&xi[at..at + len]) {
                *a += wv * xv;
            }
        }
        if streaming {
            stream::store(orows, acc);
        } else {
            for (d, &v) in orows.iter_mut().zip(acc.iter()) {
                d.write(v);
            }
        }
    }
}

/// `Σ_i w_i[s, j] · x_i[s, r, j]` over `m` `[n, hw, c]` maps `xs`, with `w` `[m, n·c]`
/// (map-major), into a new map: AFI's fused output. Each element adds the maps'
/// terms in map order, as the channels-first kernel does.
pub fn weighted_sum<T: Float>(xs: &[&[T]], w: &[T], n: usize, hw: usize, c: usize) -> Vec<T> {
    let (m, len, nc) = (xs.len(), n * hw * c, n * c);
    assert!(m > 0 && xs.iter().all(|x| x.len() == len) && w.len() >= m * nc, "weighted_sum: sizes");
    let mut out = output_buffer::<T>(len);
    if len == 0 {
        return out;
    }
    let streaming = stream::worth_it::<T>(len, c);
    let rows = (32 * 1024 / ((m + 1) * c)).clamp(1, hw);
    let spare = &mut out.spare_capacity_mut()[..len];
    spare.par_chunks_mut(hw * c).enumerate().serial_aware().for_each(|(s, o)| {
        let ws: Vec<&[T]> = (0..m).map(|i| &w[i * nc + s * c..i * nc + (s + 1) * c]).collect();
        o.par_chunks_mut(rows * c).enumerate().serial_aware().for_each(|(k, o)| {
            let at = s * hw * c + k * rows * c;
            let srcs: Vec<&[T]> = xs.iter().map(|x| &x[at..at + o.len()]).collect();
            weighted_rows_into(o, &srcs, &ws, streaming);
            if streaming {
                stream::fence();
            }
        });
    });
    // SAFETY: the chunks cover all `len` elements, whole rows each, every one written.
    unsafe { out.set_len(len) };
    out
}

/// Writes `dst_i[r, j] = a_i[j] · src[r, j] + b_i[j]` for every row `r` of the
/// row-major `rows × c` matrix `src` (`c = a_i.len()`), reading each row once for all
/// outputs; with streaming stores when `streaming` (the caller then fences).
/// [`affine_each`]'s arithmetic, for one sample.
pub(crate) fn affine_rows_into<T: Float>(
    dsts: &mut [&mut [MaybeUninit<T>]],
    src: &[T],
    a: &[&[T]],
    b: &[&[T]],
    streaming: bool,
) {
    // Rows are taken a tile at a time, with `a_i` and `b_i` repeated to a tile's
    // length, so that narrow rows (64 channels) run as one long vector loop.
    let (a, b) = (tiled(a), tiled(b));
    let tile = a[0].len();
    for (k, rows) in src.chunks(tile).enumerate() {
        let (at, len) = (k * tile, rows.len());
        for ((dst, a), b) in dsts.iter_mut().zip(&a).zip(&b) {
            scale_rows_into(&mut dst[at..at + len], rows, &a[..len], Some(&b[..len]), streaming);
        }
    }
}

/// Values per tile of rows in [`tiled`]: 4 KB of float32.
const TILE: usize = 1024;

/// Each of the `c`-long vectors repeated over as many whole rows as fit in [`TILE`]
/// values (at least one row).
fn tiled<T: Float>(vs: &[&[T]]) -> Vec<Vec<T>> {
    vs.iter().map(|v| v.repeat((TILE / v.len().max(1)).max(1))).collect()
}

/// `m` new maps `out_i[s, r, j] = a_i[s, j] · src[s, r, j] + b_i[s, j]` from one
/// `[n, hw, c]` map, with `a` and `b` `[m, n·c]` (map-major), reading each row of
/// `src` once for all `m`: AFI's input gradients (the weights, and the pooled
/// gradient over HW). One sample per task.
pub fn affine_each<T: Float>(
    src: &[T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    hw: usize,
    c: usize,
) -> Vec<Vec<T>> {
    let (len, nc, sample) = (n * hw * c, n * c, hw * c);
    assert!(src.len() == len && a.len() >= m * nc && b.len() >= m * nc, "affine_each: sizes");
    let mut outs: Vec<Vec<T>> = (0..m).map(|_| output_buffer::<T>(len)).collect();
    if len == 0 {
        return outs;
    }
    let streaming = stream::worth_it::<T>(m * len, c);
    let mut per_sample: Vec<Vec<&mut [MaybeUninit<T>]>> = (0..n).map(|_| Vec::with_capacity(m)).collect();
    for out in outs.iter_mut() {
        for (dsts, chunk) in per_sample.iter_mut().zip(out.spare_capacity_mut()[..len].chunks_mut(sample)) {
            dsts.push(chunk);
        }
    }
    per_sample.into_par_iter().zip(src.par_chunks(sample)).enumerate().serial_aware().for_each(
        |(s, (mut dsts, g))| {
            let at = |i: usize| i * nc + s * c..i * nc + (s + 1) * c;
            let (a, b): (Vec<&[T]>, Vec<&[T]>) = (0..m).map(|i| (&a[at(i)], &b[at(i)])).unzip();
            affine_rows_into(&mut dsts, g, &a, &b, streaming);
            if streaming {
                stream::fence();
            }
        },
    );
    for out in outs.iter_mut() {
        // SAFETY: every sample's rows of every output were written above.
        unsafe { out.set_len(len) };
    }
    outs
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
    spare.par_chunks_mut(hw * c).zip(values.par_chunks(c)).serial_aware().for_each(|(o, v)| {
        o.par_chunks_mut(rows * c).serial_aware().for_each(|o| {
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
        for (n, c, hw) in [(1, 1, 1), (2, 3, 5), (3, 7, 49), (2, 5, 67), (2, 4, PART + 9), (1, 9, 2 * PART)] {
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
    fn weighted_sums_and_affine_maps_by_definition() {
        for (n, c, hw, m) in [(2, 3, 5, 1), (3, 4, 7, 3), (2, 5, 70, 5)] {
            let xs: Vec<Vec<f64>> = (0..m).map(|i| data(n * hw * c, 10 + i as u64)).collect();
            let refs: Vec<&[f64]> = xs.iter().map(|x| &x[..]).collect();
            let (w, b) = (data(m * n * c, 5), data(m * n * c, 6));
            for streaming in [false, true] {
                let sum = stream::forced(streaming, || weighted_sum(&refs, &w, n, hw, c));
                let each = stream::forced(streaming, || affine_each(&xs[0], &w, &b, m, n, hw, c));
                for s in 0..n {
                    for r in 0..hw {
                        for j in 0..c {
                            let at = (s * hw + r) * c + j;
                            let coef = |v: &[f64], i: usize| v[i * n * c + s * c + j];
                            let want =
                                (1..m).fold(coef(&w, 0) * xs[0][at], |v, i| v + coef(&w, i) * xs[i][at]);
                            assert_eq!(sum[at], want, "weighted_sum {n}x{c}x{hw}, {m} maps");
                            for (i, e) in each.iter().enumerate() {
                                assert_eq!(e[at], coef(&w, i) * xs[0][at] + coef(&b, i), "affine_each");
                            }
                        }
                    }
                }
            }
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
