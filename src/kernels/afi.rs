//! AFI — Attentive Feature Integration (SPEC "AFI").
//!
//! Fuses `M >= 1` same-shape maps `X_1..X_M`, each a contiguous `[N, C, H, W]` slice
//! read where it lies (never stacked):
//!
//! ```text
//! z_i = GAP(X_i)                                  [N, C]   (stacked: Z [M*N, C])
//! s_i = W2 ReLU(W1 z_i + b1) + b2                 W1 [C/r, C], W2 [C, C/r]
//! s~  = softmax over i, per (n, c)
//! R   = Σ_i s~_i[:, :, None, None] * X_i          [N, C, H, W]
//! ```
//!
//! The big passes go over `(n, c)` planes in parallel, many planes per rayon task:
//! * forward reads every `X_i` from memory once where it can (one sample per task:
//!   pool, score and weigh the sample's planes while they are in cache), else twice
//!   (pool every plane, run the scorer on all `M*N` rows at once, weigh), and writes
//!   `R` once;
//! * backward reads `grad_R` and every `X_i` once (`g_i = Σ_hw grad_R · X_i`), runs
//!   the softmax and scorer backward on the small `[M*N, ·]` matrices, then reads
//!   `grad_R` once more while writing every `grad_X_i`.
//!
//! No full-size temporary besides the outputs.
//!
//! `R` and the `grad_X_i` of `[N, C, H, W]` maps are written with plain stores, not
//! [`stream`]ing ones: alternating calls in one process (2026-12-01) measured the
//! streamed writes 5-19% slower in training and eval, on both routes, at the paper's
//! shapes (and never faster on 2026-11-30). Channels-last outputs are streamed,
//! which measured 5-7% faster in eval there.

use super::channels_last;
use super::gemm::{matmul, matmul_new, matmul_serial, Mat};
use super::par::SerialAware;
use super::pool::{dots, planes_per_task, sums};
use super::{check_len, checked_numel, column_totals, output_buffer, stream, Error, Float, Result};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The scorer's parameters (torch `Linear` layout: `[out, in]`, row-major).
#[derive(Clone, Copy, Debug)]
pub struct Params<'a, T> {
    /// `W1`, `[hidden, C]`; `hidden` (= C/r) is read off its length.
    pub fc1_weight: &'a [T],
    /// `b1`, `[hidden]`.
    pub fc1_bias: Option<&'a [T]>,
    /// `W2`, `[C, hidden]`.
    pub fc2_weight: &'a [T],
    /// `b2`, `[C]`.
    pub fc2_bias: Option<&'a [T]>,
}

/// What [`forward`] returns: the fused map and what [`backward`] needs.
#[derive(Clone, Debug)]
pub struct Forward<T> {
    /// `R`, `[N, C, H, W]`.
    pub out: Vec<T>,
    /// The pooled descriptors `Z`, `[M*N, C]` (row `i*N + n` is `z_i[n]`).
    pub z: Vec<T>,
    /// The scorer's hidden layer after the ReLU, `[M*N, hidden]`; its `> 0` mask is
    /// the ReLU mask.
    pub hidden: Vec<T>,
    /// The softmax weights `s~`, `[M, N, C]`.
    pub weights: Vec<T>,
}

impl<T> Forward<T> {
    /// The saved tensors, as [`backward`] takes them.
    pub fn saved(&self) -> Saved<'_, T> {
        Saved { z: &self.z, hidden: &self.hidden, weights: &self.weights }
    }
}

/// The tensors saved by [`forward`] (see [`Forward`] for their shapes).
#[derive(Clone, Copy, Debug)]
pub struct Saved<'a, T> {
    pub z: &'a [T],
    pub hidden: &'a [T],
    pub weights: &'a [T],
}

/// Gradients returned by [`backward`].
#[derive(Clone, Debug)]
pub struct Grads<T> {
    /// One `[N, C, H, W]` gradient per input map, in input order.
    pub xs: Vec<Vec<T>>,
    /// `[hidden, C]`.
    pub fc1_weight: Vec<T>,
    /// `[hidden]`, present iff the forward had `fc1_bias`.
    pub fc1_bias: Option<Vec<T>>,
    /// `[C, hidden]`.
    pub fc2_weight: Vec<T>,
    /// `[C]`, present iff the forward had `fc2_bias`.
    pub fc2_bias: Option<Vec<T>>,
}

/// Validated sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    m: usize,
    hidden: usize,
    /// `N*C`, planes per map.
    nc: usize,
    /// `M*N`, rows of the scorer matrices.
    mn: usize,
}

pub(crate) fn validate<T>(xs: &[&[T]], n: usize, c: usize, hw: usize, p: &Params<T>) -> Result<Dims> {
    if xs.is_empty() {
        return Err(Error::value("xs", "at least one feature map", "an empty list"));
    }
    if c == 0 {
        return Err(Error::value("c", "at least 1 channel", "0"));
    }
    if hw == 0 {
        return Err(Error::value("hw", "a spatial size H*W of at least 1", "0"));
    }
    let m = xs.len();
    for (i, x) in xs.iter().enumerate() {
        check_len(&format!("xs[{i}]"), x, &[n, c, hw])?;
    }
    let w1 = p.fc1_weight.len();
    if w1 == 0 || w1 % c != 0 {
        return Err(Error::shape(
            "fc1_weight",
            format!("[hidden, {c}] with hidden >= 1 (a non-zero multiple of {c} elements)"),
            format!("{w1} elements"),
        ));
    }
    let hidden = w1 / c;
    check_len("fc2_weight", p.fc2_weight, &[c, hidden])?;
    if let Some(b) = p.fc1_bias {
        check_len("fc1_bias", b, &[hidden])?;
    }
    if let Some(b) = p.fc2_bias {
        check_len("fc2_bias", b, &[c])?;
    }
    let nc = checked_numel("xs", &[n, c])?;
    let mn = checked_numel("xs", &[m, n])?;
    // The small scorer buffers must be addressable too.
    checked_numel("xs", &[m, nc])?;
    checked_numel("fc1_weight", &[mn, hidden])?;
    Ok(Dims { m, hidden, nc, mn })
}

/// Per-column sums of a row-major `[rows, cols]` matrix, in f64, as `T`.
fn column_sums<T: Float>(a: &[T], cols: usize) -> Vec<T> {
    column_totals(a, cols).into_iter().map(T::of).collect()
}

/// `dst = a · bᵀ (+ bias on every row)` for row-major `a` `[rows, k]`, `b` `[cols, k]`;
/// `serial` inside a parallel task (the product then runs on the calling thread).
fn linear<T: Float>(
    a: &[T],
    rows: usize,
    k: usize,
    b: &[T],
    cols: usize,
    bias: Option<&[T]>,
    serial: bool,
) -> Vec<T> {
    let mut dst = match bias {
        Some(bias) => {
            let mut d = Vec::with_capacity(rows * cols);
            for _ in 0..rows {
                d.extend_from_slice(bias);
            }
            d
        }
        None => vec![T::zero(); rows * cols],
    };
    let product = if serial { matmul_serial } else { matmul };
    product(&mut dst, cols, Mat::new(a, rows, k), Mat::new(b, cols, k).t(), T::one(), bias.is_some());
    dst
}

/// The scorer and the softmax for `rows = M·N'` pooled rows `z` (map-major: row
/// `i·N' + n`): returns `(hidden, weights)`, `[rows, hidden]` after the ReLU and
/// `[M, N'·C]`.
fn score<T: Float>(
    z: &[T],
    m: usize,
    c: usize,
    hidden: usize,
    p: &Params<T>,
    serial: bool,
) -> (Vec<T>, Vec<T>) {
    let rows = z.len() / c;
    let mut h = linear(z, rows, c, p.fc1_weight, hidden, p.fc1_bias, serial);
    for v in h.iter_mut() {
        // As torch's ReLU: negatives to zero, NaN propagates.
        if *v < T::zero() {
            *v = T::zero();
        }
    }
    let s = linear(&h, rows, hidden, p.fc2_weight, c, p.fc2_bias, serial);
    // Softmax over i for every (n, c), numerically stable.
    let weights = softmax_over_maps(&s, m, rows / m * c);
    (h, weights)
}

/// The means of plane `pl` of every map into `dst` (`m` values, map order), up to
/// GROUP maps per sweep over the plane.
#[inline]
fn plane_means<T: Float>(xs: &[&[T]], pl: usize, hw: usize, dst: &mut [T]) {
    let plane = |i: usize| &xs[i][pl * hw..(pl + 1) * hw];
    for (g0, zs) in dst.chunks_mut(GROUP).enumerate() {
        let (i0, k) = (g0 * GROUP, zs.len());
        let mut means = |totals: &[f64]| {
            for (d, &t) in zs.iter_mut().zip(totals) {
                *d = T::of(t / hw as f64);
            }
        };
        match k {
            1 => means(&sums([plane(i0)])),
            2 => means(&sums([plane(i0), plane(i0 + 1)])),
            3 => means(&sums([plane(i0), plane(i0 + 1), plane(i0 + 2)])),
            _ => means(&sums([plane(i0), plane(i0 + 1), plane(i0 + 2), plane(i0 + 3)])),
        }
    }
}

/// `R`'s plane `pl` into `dst`: `Σ_i w(i) · X_i[pl]`, each element summed in
/// registers from all the maps and written once (no zero-fill of the output).
#[inline]
fn fuse_plane<T: Float>(
    xs: &[&[T]],
    pl: usize,
    hw: usize,
    dst: &mut [MaybeUninit<T>],
    w: impl Fn(usize) -> T,
) {
    let m = xs.len();
    let planes = |i: usize| &xs[i][pl * hw..(pl + 1) * hw];
    let dst = write_weighted_sum(dst, m.min(GROUP), planes, &w);
    // Maps beyond the first group (M > 4) are added in further passes over the
    // (cache-resident) plane.
    for i0 in (GROUP..m).step_by(GROUP) {
        add_weighted_sum(dst, (m - i0).min(GROUP), |i| planes(i0 + i), |i| w(i0 + i));
    }
}

/// The AFI forward pass.
///
/// With at least as many samples as threads, and a sample's maps small enough to
/// stay in cache ([`PER_SAMPLE_MAX_BYTES`]), each task takes one sample: it pools
/// the sample's planes, scores them (the scorer and the softmax act per sample) and
/// writes the sample's `R` while its maps are still in cache, so the maps come from
/// memory once instead of twice. Otherwise: one pass pools every plane, the scorer
/// runs on all `M·N` rows at once, a second pass writes `R`.
pub fn forward<T: Float>(xs: &[&[T]], n: usize, c: usize, hw: usize, p: &Params<T>) -> Result<Forward<T>> {
    let d = validate(xs, n, c, hw, p)?;
    if per_sample::<T>(n, d.m, c, hw) {
        return Ok(forward_per_sample(xs, n, c, hw, p, d, false));
    }
    let Dims { m, nc, hidden, .. } = d;

    // Z [M*N, C]: the plane means of every map; computed plane-major, then laid out
    // map by map (small).
    let mut zt = vec![T::zero(); nc * m];
    let per = planes_per_task(hw, m);
    zt.par_chunks_mut(per * m).enumerate().serial_aware().for_each(|(k, zc)| {
        for (q, zq) in zc.chunks_exact_mut(m).enumerate() {
            plane_means(xs, k * per + q, hw, zq);
        }
    });
    let z = map_major(&zt, m);
    drop(zt);

    // The scorer, for all M maps at once.
    let (h, weights) = score(&z, m, c, hidden, p, false);

    // R = Σ_i s~_i · X_i, one pass over the planes.
    let mut out = output_buffer::<T>(nc * hw);
    let per = planes_per_task(hw, m + 1);
    out.spare_capacity_mut()[..nc * hw].par_chunks_mut(per * hw).enumerate().serial_aware().for_each(
        |(k, chunk)| {
            for (q, dst) in chunk.chunks_exact_mut(hw).enumerate() {
                let pl = k * per + q;
                fuse_plane(xs, pl, hw, dst, |i| weights[i * nc + pl]);
            }
        },
    );
    // SAFETY: `nc * hw` is whole planes and every element of every plane was written.
    unsafe { out.set_len(nc * hw) };

    Ok(Forward { out, z, hidden: h, weights })
}

/// [`forward`] of channels-last maps (`[N, H, W, C]` in memory, torch's
/// `channels_last`), `R` channels-last too, by the same two routes as [`forward`]:
/// one sample per task, or one pass pooling each map, the scorer on all `M·N` rows at
/// once, and a second pass writing `R`. The saved tensors are as [`forward`]'s.
pub fn forward_channels_last<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &Params<T>,
) -> Result<Forward<T>> {
    let d = validate(xs, n, c, hw, p)?;
    if per_sample::<T>(n, d.m, c, hw) {
        return Ok(forward_per_sample(xs, n, c, hw, p, d, true));
    }
    let Dims { m, hidden, .. } = d;
    let z: Vec<T> = xs.iter().flat_map(|x| channels_last::pool(x, n, hw, c)).collect();
    let (h, weights) = score(&z, m, c, hidden, p, false);
    let out = channels_last::weighted_sum(xs, &weights, n, hw, c);
    Ok(Forward { out, z, hidden: h, weights })
}

/// [`backward`] of channels-last maps: `grad_out`, the maps and their gradients are
/// `[N, H, W, C]` in memory.
pub fn backward_channels_last<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &Params<T>,
    saved: &Saved<T>,
) -> Result<Grads<T>> {
    let d = validate(xs, n, c, hw, p)?;
    let Dims { m, nc, mn, hidden } = d;
    check_saved(grad_out, n, c, hw, m, hidden, saved)?;
    if per_sample::<T>(n, m, c, hw) {
        return Ok(backward_per_sample(grad_out, xs, n, c, hw, p, saved, d, true));
    }
    // g[pl*m + i] = Σ_hw grad_R · X_i, plane-major as `softmax_backward` takes it.
    let mut g = vec![0.0f64; nc * m];
    for (i, x) in xs.iter().enumerate() {
        for (pl, v) in channels_last::dots(grad_out, x, n, hw, c).into_iter().enumerate() {
            g[pl * m + i] = v;
        }
    }
    let ds = softmax_backward(&g, saved.weights, m, nc);
    let (dh, dz) = scorer_backward(&ds, saved.hidden, c, hw, p, false);
    let (fc1_weight, fc1_bias, fc2_weight, fc2_bias) = parameter_grads(&ds, &dh, saved, mn, c, hidden, p);
    let xs = channels_last::affine_each(grad_out, saved.weights, &dz, m, n, hw, c);
    Ok(Grads { xs, fc1_weight, fc1_bias, fc2_weight, fc2_bias })
}

/// Checks the backward's `grad_out` and saved tensors against the sizes.
fn check_saved<T>(
    grad_out: &[T],
    n: usize,
    c: usize,
    hw: usize,
    m: usize,
    hidden: usize,
    saved: &Saved<T>,
) -> Result<()> {
    check_len("grad_out", grad_out, &[n, c, hw])?;
    check_len("saved.z", saved.z, &[m, n, c])?;
    check_len("saved.hidden", saved.hidden, &[m, n, hidden])?;
    check_len("saved.weights", saved.weights, &[m, n, c])
}

/// A plane-major `[planes, m]` matrix (one value per map for each plane) laid out
/// map by map, `[m, planes]`.
fn map_major<T: Float>(plane_major: &[T], m: usize) -> Vec<T> {
    let planes = plane_major.len() / m.max(1);
    let mut out = vec![T::zero(); plane_major.len()];
    for (pl, row) in plane_major.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * planes + pl] = v;
        }
    }
    out
}

/// Largest `M·C·H·W` of one sample, in bytes, that [`forward`] processes sample by
/// sample: two threads' samples must stay in the last-level cache between the
/// pooling and the weighted sum (the paper's shapes: 2.4 MB).
const PER_SAMPLE_MAX_BYTES: usize = 4 << 20;

/// Whether [`forward`] takes one sample per task: at least as many samples as threads,
/// and a sample's `m` maps small enough to stay in cache.
fn per_sample<T>(n: usize, m: usize, c: usize, hw: usize) -> bool {
    let sample_bytes = m * c * hw * std::mem::size_of::<T>();
    n > 0 && n >= rayon::current_num_threads() && sample_bytes <= PER_SAMPLE_MAX_BYTES
}

/// [`forward`] (or, `channels_last`, [`forward_channels_last`]), one sample per task.
fn forward_per_sample<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &Params<T>,
    d: Dims,
    channels_last: bool,
) -> Forward<T> {
    let Dims { m, nc, hidden, .. } = d;
    let sample = c * hw;
    let mut out = output_buffer::<T>(nc * hw);
    // Per sample: (z [M, C], hidden [M, hidden], weights [M, C]), scattered below.
    let mut small: Vec<(Vec<T>, Vec<T>, Vec<T>)> = Vec::with_capacity(n);
    // Only channels-last outputs are streamed (see the module's doc).
    let streaming = channels_last && stream::worth_it::<T>(nc * hw, c);
    out.spare_capacity_mut()[..nc * hw]
        .par_chunks_mut(sample)
        .enumerate()
        .serial_aware()
        .map(|(b, o)| {
            let maps: Vec<&[T]> = xs.iter().map(|x| &x[b * sample..(b + 1) * sample]).collect();
            if channels_last {
                // Each map's sample is an HW × C matrix: its channel means, the
                // scorer, then every row of R summed from the maps' rows.
                let z: Vec<T> = channels_last::sample_means_each(&maps, hw, c).concat();
                let (h, w) = score(&z, m, c, hidden, p, true);
                let ws: Vec<&[T]> = w.chunks_exact(c).collect();
                channels_last::weighted_rows_into(o, &maps, &ws, streaming);
                if streaming {
                    stream::fence();
                }
                return (z, h, w);
            }
            let mut zt = vec![T::zero(); c * m]; // [C, M]: plane-major
            for (ch, zq) in zt.chunks_exact_mut(m).enumerate() {
                plane_means(&maps, ch, hw, zq);
            }
            let z = map_major(&zt, m);
            let (h, w) = score(&z, m, c, hidden, p, true);
            for (ch, dst) in o.chunks_exact_mut(hw).enumerate() {
                fuse_plane(&maps, ch, hw, dst, |i| w[i * c + ch]);
            }
            (z, h, w)
        })
        .collect_into_vec(&mut small);
    // SAFETY: the chunks are the `n` samples, `nc * hw` elements, all written.
    unsafe { out.set_len(nc * hw) };

    // The saved tensors in the batch layout: row i*N + b of z and hidden, i*N*C + b*C
    // of the weights.
    let mut z = vec![T::zero(); m * nc];
    let mut h = vec![T::zero(); m * n * hidden];
    let mut weights = vec![T::zero(); m * nc];
    for (b, (zs, hs, ws)) in small.iter().enumerate() {
        for i in 0..m {
            z[(i * n + b) * c..][..c].copy_from_slice(&zs[i * c..][..c]);
            h[(i * n + b) * hidden..][..hidden].copy_from_slice(&hs[i * hidden..][..hidden]);
            weights[i * nc + b * c..][..c].copy_from_slice(&ws[i * c..][..c]);
        }
    }
    Forward { out, z, hidden: h, weights }
}

/// Maps summed per pass in [`write_weighted_sum`] and [`add_weighted_sum`].
const GROUP: usize = 4;

/// `dst[j] = Σ_{i < k} w(i) · planes(i)[j]` for `k <= GROUP` maps, with the sum in
/// registers; returns `dst`, now initialised.
#[inline]
fn write_weighted_sum<'a, 'x, T: Float>(
    dst: &'a mut [MaybeUninit<T>],
    k: usize,
    planes: impl Fn(usize) -> &'x [T],
    w: impl Fn(usize) -> T,
) -> &'a mut [T] {
    fn run<T: Float, const K: usize>(dst: &mut [MaybeUninit<T>], src: [&[T]; K], w: [T; K]) {
        let src = src.map(|s| &s[..dst.len()]);
        for (j, d) in dst.iter_mut().enumerate() {
            let mut v = w[0] * src[0][j];
            for i in 1..K {
                v += w[i] * src[i][j];
            }
            d.write(v);
        }
    }
    match k {
        1 => run::<T, 1>(dst, [planes(0)], [w(0)]),
        2 => run::<T, 2>(dst, [planes(0), planes(1)], [w(0), w(1)]),
        3 => run::<T, 3>(dst, [planes(0), planes(1), planes(2)], [w(0), w(1), w(2)]),
        _ => run::<T, 4>(dst, [planes(0), planes(1), planes(2), planes(3)], [w(0), w(1), w(2), w(3)]),
    }
    // SAFETY: `run` wrote every element of `dst`.
    unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut T, dst.len()) }
}

/// `dst[j] += Σ_{i < k} w(i) · planes(i)[j]` for `1 <= k <= GROUP` maps, each map's
/// term added in order (as [`write_weighted_sum`] adds them).
#[inline]
fn add_weighted_sum<'x, T: Float>(
    dst: &mut [T],
    k: usize,
    planes: impl Fn(usize) -> &'x [T],
    w: impl Fn(usize) -> T,
) {
    for i in 0..k {
        let (wi, src) = (w(i), &planes(i)[..dst.len()]);
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += wi * v;
        }
    }
}

/// `dst[k][j] = a_k · src[j] + b_k` for `K` outputs, `coef[k] = (a_k, b_k)`, in one
/// sweep over `src`.
#[inline]
fn write_affine<T: Float, const K: usize>(src: &[T], dst: [&mut [MaybeUninit<T>]; K], coef: [(T, T); K]) {
    let dst = dst.map(|d| &mut d[..src.len()]);
    for (j, &v) in src.iter().enumerate() {
        for k in 0..K {
            dst[k][j].write(coef[k].0 * v + coef[k].1);
        }
    }
}

/// Softmax over the `m` rows of `s` `[m, cols]`, independently per column: the max in
/// `T` (exact), each exponential once in `T` ([`Float::exp_lanes`]), the sum and the
/// division in f64. In parallel over blocks of columns.
fn softmax_over_maps<T: Float>(s: &[T], m: usize, cols: usize) -> Vec<T> {
    const COLS_PER_TASK: usize = 2048;
    let mut w = vec![T::zero(); m * cols];
    if cols == 0 {
        return w;
    }
    // One task per block of columns, holding that block of every row of `w`.
    let mut tasks: Vec<Vec<&mut [T]>> =
        (0..cols.div_ceil(COLS_PER_TASK)).map(|_| Vec::with_capacity(m)).collect();
    for row in w.chunks_exact_mut(cols) {
        for (task, part) in tasks.iter_mut().zip(row.chunks_mut(COLS_PER_TASK)) {
            task.push(part);
        }
    }
    tasks.into_par_iter().enumerate().serial_aware().for_each(|(k, mut rows)| {
        let c0 = k * COLS_PER_TASK;
        let len = rows[0].len();
        let mut max = vec![f64::NEG_INFINITY; len];
        for i in 0..m {
            for (mx, v) in max.iter_mut().zip(&s[i * cols + c0..][..len]) {
                *mx = mx.max(v.as_f64());
            }
        }
        let mut sum = vec![0.0f64; len];
        for (i, row) in rows.iter_mut().enumerate() {
            for (((e, v), mx), acc) in row.iter_mut().zip(&s[i * cols + c0..][..len]).zip(&max).zip(&mut sum)
            {
                *e = (*v - T::of(*mx)).exp_lanes();
                *acc += e.as_f64();
            }
        }
        for row in rows.iter_mut() {
            for (e, sm) in row.iter_mut().zip(&sum) {
                *e = T::of(e.as_f64() / sm);
            }
        }
    });
    w
}

/// The AFI backward pass: `grad_out` is `dL/dR`, `saved` what [`forward`] returned
/// for the same `xs` and parameters.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &Params<T>,
    saved: &Saved<T>,
) -> Result<Grads<T>> {
    let d = validate(xs, n, c, hw, p)?;
    let Dims { m, nc, mn, hidden } = d;
    check_saved(grad_out, n, c, hw, m, hidden, saved)?;
    let weights = saved.weights;
    if per_sample::<T>(n, m, c, hw) {
        return Ok(backward_per_sample(grad_out, xs, n, c, hw, p, saved, d, false));
    }

    // Pass 1: g[pl*m + i] = Σ_hw grad_R · X_i over plane pl (plane-major, f64).
    let mut g = vec![0.0f64; nc * m];
    let per = planes_per_task(hw, m + 1);
    g.par_chunks_mut(per * m).zip(grad_out.par_chunks(per * hw)).enumerate().serial_aware().for_each(
        |(k, (gc, go))| {
            for (q, (gq, gp)) in gc.chunks_exact_mut(m).zip(go.chunks_exact(hw)).enumerate() {
                plane_dots(xs, k * per + q, hw, gp, gq);
            }
        },
    );

    // Softmax backward: dS_i = s~_i (g_i - Σ_j s~_j g_j), as [M*N, C] = [M, N, C].
    let ds = softmax_backward(&g, weights, m, nc);
    drop(g);

    // Scorer backward, all M at once.
    let (dh, dz) = scorer_backward(&ds, saved.hidden, c, hw, p, false);
    let (fc1_weight, fc1_bias, fc2_weight, fc2_bias) = parameter_grads(&ds, &dh, saved, mn, c, hidden, p);

    // Pass 2: grad_X_i = s~_i · grad_R + dZ_i / HW, reading grad_R once for all i.
    let total = nc * hw;
    let block = per * hw;
    let mut gxs: Vec<Vec<T>> = (0..m).map(|_| output_buffer::<T>(total)).collect();
    let tasks = split_outputs(&mut gxs, total, block);
    tasks.into_par_iter().zip(grad_out.par_chunks(block)).enumerate().serial_aware().for_each(
        |(k, (mut dsts, go))| {
            let p0 = k * per;
            for (q, gp) in go.chunks_exact(hw).enumerate() {
                let pl = p0 + q;
                let coef = |i: usize| (weights[i * nc + pl], dz[i * nc + pl]);
                write_plane_grads(&mut dsts, q * hw..(q + 1) * hw, gp, coef);
            }
        },
    );
    for gx in gxs.iter_mut() {
        // SAFETY: the tasks above cover all `total` elements (whole planes) of every
        // map and wrote each one.
        unsafe { gx.set_len(total) };
    }

    Ok(Grads { xs: gxs, fc1_weight, fc1_bias, fc2_weight, fc2_bias })
}

/// [`backward`] (or, `channels_last`, [`backward_channels_last`]), one sample per
/// task: the dots of the sample's planes of `grad_R` with every map, the softmax and
/// scorer backward of that sample, then its planes of every `grad_X_i`, while its
/// `grad_R` is still in cache. The parameter gradients sum over samples, after.
#[allow(clippy::too_many_arguments)]
fn backward_per_sample<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &Params<T>,
    saved: &Saved<T>,
    d: Dims,
    channels_last: bool,
) -> Grads<T> {
    let Dims { m, nc, mn, hidden } = d;
    let (weights, sample) = (saved.weights, c * hw);
    let total = nc * hw;
    let mut gxs: Vec<Vec<T>> = (0..m).map(|_| output_buffer::<T>(total)).collect();
    let tasks = split_outputs(&mut gxs, total, sample);
    // Only channels-last gradients are streamed (see the module's doc).
    let streaming = channels_last && stream::worth_it::<T>(m * total, c);
    // Per sample: (dS [M, C], dH [M, hidden]), for the parameter gradients.
    let mut small: Vec<(Vec<T>, Vec<T>)> = Vec::with_capacity(n);
    tasks
        .into_par_iter()
        .zip(grad_out.par_chunks(sample))
        .enumerate()
        .serial_aware()
        .map(|(b, (mut dsts, go))| {
            let maps: Vec<&[T]> = xs.iter().map(|x| &x[b * sample..(b + 1) * sample]).collect();
            let mut g = vec![0.0f64; c * m]; // [C, M]: plane-major
            if channels_last {
                for (i, dots) in channels_last::sample_dots_each(go, &maps, hw, c).into_iter().enumerate() {
                    for (ch, v) in dots.into_iter().enumerate() {
                        g[ch * m + i] = v;
                    }
                }
            } else {
                for (ch, (gq, gp)) in g.chunks_exact_mut(m).zip(go.chunks_exact(hw)).enumerate() {
                    plane_dots(&maps, ch, hw, gp, gq);
                }
            }
            // This sample's saved rows: weights [M, C] and hidden [M, hidden].
            let w: Vec<T> = (0..m).flat_map(|i| weights[i * nc + b * c..][..c].iter().copied()).collect();
            let h: Vec<T> =
                (0..m).flat_map(|i| saved.hidden[(i * n + b) * hidden..][..hidden].iter().copied()).collect();
            let ds = softmax_backward(&g, &w, m, c);
            let (dh, dz) = scorer_backward(&ds, &h, c, hw, p, true);
            if channels_last {
                let (a, b): (Vec<&[T]>, Vec<&[T]>) = w.chunks_exact(c).zip(dz.chunks_exact(c)).unzip();
                channels_last::affine_rows_into(&mut dsts, go, &a, &b, streaming);
                if streaming {
                    stream::fence();
                }
            } else {
                for (ch, gp) in go.chunks_exact(hw).enumerate() {
                    let coef = |i: usize| (w[i * c + ch], dz[i * c + ch]);
                    write_plane_grads(&mut dsts, ch * hw..(ch + 1) * hw, gp, coef);
                }
            }
            (ds, dh)
        })
        .collect_into_vec(&mut small);
    for gx in gxs.iter_mut() {
        // SAFETY: the tasks cover every sample of every map, and wrote each element.
        unsafe { gx.set_len(total) };
    }
    // dS and dH in the batch layout (row i*N + b).
    let mut ds = vec![T::zero(); mn * c];
    let mut dh = vec![T::zero(); mn * hidden];
    for (b, (dss, dhs)) in small.iter().enumerate() {
        for i in 0..m {
            ds[(i * n + b) * c..][..c].copy_from_slice(&dss[i * c..][..c]);
            dh[(i * n + b) * hidden..][..hidden].copy_from_slice(&dhs[i * hidden..][..hidden]);
        }
    }
    let (fc1_weight, fc1_bias, fc2_weight, fc2_bias) = parameter_grads(&ds, &dh, saved, mn, c, hidden, p);
    Grads { xs: gxs, fc1_weight, fc1_bias, fc2_weight, fc2_bias }
}

/// `out[i] = Σ_hw grad_R[pl] · X_i[pl]` for every map `i`, in f64, up to GROUP maps
/// per sweep over the plane of `grad_R` (`gp`).
#[inline]
fn plane_dots<T: Float>(xs: &[&[T]], pl: usize, hw: usize, gp: &[T], out: &mut [f64]) {
    let plane = |i: usize| &xs[i][pl * hw..(pl + 1) * hw];
    for (g0, gs) in out.chunks_mut(GROUP).enumerate() {
        let i0 = g0 * GROUP;
        match gs.len() {
            1 => gs.copy_from_slice(&dots(gp, [plane(i0)])),
            2 => gs.copy_from_slice(&dots(gp, [plane(i0), plane(i0 + 1)])),
            3 => gs.copy_from_slice(&dots(gp, [plane(i0), plane(i0 + 1), plane(i0 + 2)])),
            _ => gs.copy_from_slice(&dots(gp, [plane(i0), plane(i0 + 1), plane(i0 + 2), plane(i0 + 3)])),
        }
    }
}

/// The softmax backward for `g` (plane-major `[cols, M]`, the dots of `grad_R` with
/// each map) and the weights `s~` (`[M, cols]`): `dS_i = s~_i (g_i - Σ_j s~_j g_j)`,
/// `[M, cols]`.
fn softmax_backward<T: Float>(g: &[f64], weights: &[T], m: usize, cols: usize) -> Vec<T> {
    let mut ds = vec![T::zero(); m * cols];
    for (pl, gq) in g.chunks_exact(m).enumerate() {
        let mut dot = 0.0f64;
        for (i, &gi) in gq.iter().enumerate() {
            dot += weights[i * cols + pl].as_f64() * gi;
        }
        for (i, &gi) in gq.iter().enumerate() {
            ds[i * cols + pl] = T::of(weights[i * cols + pl].as_f64() * (gi - dot));
        }
    }
    ds
}

/// Through the scorer, for the rows of `ds` (`[rows, C]`) with the saved hidden
/// layer `h` (`[rows, hidden]`): `(dH, dZ / HW)`, where dH is already through the
/// ReLU. `serial` inside a parallel task.
fn scorer_backward<T: Float>(
    ds: &[T],
    h: &[T],
    c: usize,
    hw: usize,
    p: &Params<T>,
    serial: bool,
) -> (Vec<T>, Vec<T>) {
    let rows = ds.len() / c;
    let hidden = h.len() / rows.max(1);
    let product = if serial { matmul_serial } else { matmul };
    let mut dh = vec![T::zero(); rows * hidden];
    product(&mut dh, hidden, Mat::new(ds, rows, c), Mat::new(p.fc2_weight, c, hidden), T::one(), false);
    for (dv, hv) in dh.iter_mut().zip(h) {
        // As torch's threshold_backward: the gradient passes where the output > 0.
        if *hv <= T::zero() {
            *dv = T::zero();
        }
    }
    let mut dz = vec![T::zero(); rows * c];
    product(&mut dz, c, Mat::new(&dh, rows, hidden), Mat::new(p.fc1_weight, hidden, c), T::one(), false);
    let inv_hw = T::of(1.0 / hw as f64);
    for v in dz.iter_mut() {
        *v *= inv_hw;
    }
    (dh, dz)
}

/// The scorer's parameter gradients from `dS` and `dH` (`[M*N, ·]`, batch layout):
/// `(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`.
#[allow(clippy::type_complexity)]
fn parameter_grads<T: Float>(
    ds: &[T],
    dh: &[T],
    saved: &Saved<T>,
    mn: usize,
    c: usize,
    hidden: usize,
    p: &Params<T>,
) -> (Vec<T>, Option<Vec<T>>, Vec<T>, Option<Vec<T>>) {
    let fc2_bias = p.fc2_bias.map(|_| column_sums(ds, c));
    let fc2_weight = matmul_new(Mat::new(ds, mn, c).t(), Mat::new(saved.hidden, mn, hidden), T::one());
    let fc1_bias = p.fc1_bias.map(|_| column_sums(dh, hidden));
    let fc1_weight = matmul_new(Mat::new(dh, mn, hidden).t(), Mat::new(saved.z, mn, c), T::one());
    (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
}

/// Every output map's spare capacity cut into blocks of `block` elements: one task
/// per block, holding that block of each map.
fn split_outputs<T>(gxs: &mut [Vec<T>], total: usize, block: usize) -> Vec<Vec<&mut [MaybeUninit<T>]>> {
    let mut tasks: Vec<Vec<&mut [MaybeUninit<T>]>> =
        (0..total.div_ceil(block.max(1))).map(|_| Vec::with_capacity(gxs.len())).collect();
    for gx in gxs.iter_mut() {
        for (task, chunk) in tasks.iter_mut().zip(gx.spare_capacity_mut()[..total].chunks_mut(block.max(1))) {
            task.push(chunk);
        }
    }
    tasks
}

/// `grad_X_i[range] = a_i · grad_R-plane + b_i` for every map `i`, `coef(i) =
/// (a_i, b_i)`, up to GROUP maps' planes written per sweep over `gp`.
#[inline]
fn write_plane_grads<T: Float>(
    dsts: &mut [&mut [MaybeUninit<T>]],
    range: std::ops::Range<usize>,
    gp: &[T],
    coef: impl Fn(usize) -> (T, T),
) {
    for (g0, group) in dsts.chunks_mut(GROUP).enumerate() {
        let (i0, k) = (g0 * GROUP, group.len());
        let mut planes = group.iter_mut().map(|d| &mut d[range.clone()]);
        let mut next = || planes.next().expect("one plane per map of the group");
        let coef = |i: usize| coef(i0 + i);
        match k {
            1 => write_affine(gp, [next()], std::array::from_fn(coef)),
            2 => write_affine(gp, [next(), next()], std::array::from_fn(coef)),
            3 => write_affine(gp, [next(), next(), next()], std::array::from_fn(coef)),
            _ => write_affine(gp, [next(), next(), next(), next()], std::array::from_fn(coef)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::kernels::error::ErrorKind;

    /// Deterministic pseudo-random values in [-1, 1).
    fn rand_vec(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        xs: Vec<Vec<f64>>,
        n: usize,
        c: usize,
        hw: usize,
        w1: Vec<f64>,
        b1: Option<Vec<f64>>,
        w2: Vec<f64>,
        b2: Option<Vec<f64>>,
    }

    impl Case {
        fn new(m: usize, n: usize, c: usize, hidden: usize, hw: usize, bias: bool, seed: u64) -> Self {
            let xs = (0..m).map(|i| rand_vec(n * c * hw, seed + 10 * i as u64 + 1)).collect();
            // Weights large enough that the softmax is far from uniform.
            let scale = |v: Vec<f64>, s: f64| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
            Case {
                xs,
                n,
                c,
                hw,
                w1: scale(rand_vec(hidden * c, seed + 1000), 2.0),
                b1: bias.then(|| scale(rand_vec(hidden, seed + 2000), 0.5)),
                w2: scale(rand_vec(c * hidden, seed + 3000), 2.0),
                b2: bias.then(|| scale(rand_vec(c, seed + 4000), 0.5)),
            }
        }
        fn params(&self) -> Params<'_, f64> {
            Params {
                fc1_weight: &self.w1,
                fc1_bias: self.b1.as_deref(),
                fc2_weight: &self.w2,
                fc2_bias: self.b2.as_deref(),
            }
        }
        fn x_refs(&self) -> Vec<&[f64]> {
            self.xs.iter().map(|x| x.as_slice()).collect()
        }
        fn hidden(&self) -> usize {
            self.w1.len() / self.c
        }
        /// Naive f64 AFI, straight from the definition.
        fn naive(&self) -> Vec<f64> {
            let (m, n, c, hw, hd) = (self.xs.len(), self.n, self.c, self.hw, self.hidden());
            let mut s = vec![vec![0.0; n * c]; m];
            for i in 0..m {
                for b in 0..n {
                    let z: Vec<f64> = (0..c)
                        .map(|ch| {
                            let o = (b * c + ch) * hw;
                            self.xs[i][o..o + hw].iter().sum::<f64>() / hw as f64
                        })
                        .collect();
                    let h: Vec<f64> = (0..hd)
                        .map(|j| {
                            let mut a = self.b1.as_ref().map_or(0.0, |b1| b1[j]);
                            for ch in 0..c {
                                a += self.w1[j * c + ch] * z[ch];
                            }
                            a.max(0.0)
                        })
                        .collect();
                    for ch in 0..c {
                        let mut a = self.b2.as_ref().map_or(0.0, |b2| b2[ch]);
                        for j in 0..hd {
                            a += self.w2[ch * hd + j] * h[j];
                        }
                        s[i][b * c + ch] = a;
                    }
                }
            }
            let mut r = vec![0.0; n * c * hw];
            for pl in 0..n * c {
                let mx = (0..m).map(|i| s[i][pl]).fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = (0..m).map(|i| (s[i][pl] - mx).exp()).sum();
                for i in 0..m {
                    let w = (s[i][pl] - mx).exp() / den;
                    for k in 0..hw {
                        r[pl * hw + k] += w * self.xs[i][pl * hw + k];
                    }
                }
            }
            r
        }
    }

    fn max_err(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn forward_matches_naive() {
        let shapes = [(1, 4, 2, 1), (2, 8, 2, 5), (3, 6, 3, 7), (2, 16, 4, 1), (1, 3, 1, 9)];
        // M past GROUP (5, 9) takes the further passes of the weighted sum.
        for m in [1, 2, 3, 4, 5, 9] {
            for (si, &(n, c, hd, hw)) in shapes.iter().enumerate() {
                for bias in [false, true] {
                    let case = Case::new(m, n, c, hd, hw, bias, (m * 100 + si) as u64);
                    let f = forward(&case.x_refs(), n, c, hw, &case.params()).unwrap();
                    let want = case.naive();
                    let e = max_err(&f.out, &want);
                    assert!(e < 1e-12, "m={m} shape={:?} bias={bias}: err {e}", (n, c, hd, hw));
                    assert_eq!(f.z.len(), m * n * c);
                    assert_eq!(f.hidden.len(), m * n * hd);
                    assert_eq!(f.weights.len(), m * n * c);
                    for pl in 0..n * c {
                        let s: f64 = (0..m).map(|i| f.weights[i * n * c + pl]).sum();
                        assert!((s - 1.0).abs() < 1e-12);
                    }
                }
            }
        }
    }

    #[test]
    fn forward_paths_agree() {
        // One sample per task (at least as many samples as threads) and the two-pass
        // forward (fewer), against each other and the definition; M past GROUP too.
        for (m, n, c, hd, hw, bias) in [(3, 4, 6, 2, 5, true), (5, 3, 8, 4, 7, false), (2, 2, 3, 1, 1, true)]
        {
            let case = Case::new(m, n, c, hd, hw, bias, 90 + m as u64);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| forward(&case.x_refs(), n, c, hw, &case.params()).unwrap())
            };
            let (per_sample, two_pass) = (run(1), run(n + 1));
            let want = case.naive();
            for f in [&per_sample, &two_pass] {
                assert!(max_err(&f.out, &want) < 1e-12);
            }
            assert!(max_err(&per_sample.out, &two_pass.out) < 1e-14);
            assert_eq!(per_sample.z, two_pass.z);
            assert!(max_err(&per_sample.hidden, &two_pass.hidden) < 1e-14);
            assert!(max_err(&per_sample.weights, &two_pass.weights) < 1e-14);
        }
    }

    #[test]
    fn backward_paths_agree() {
        // One sample per task and the two-pass backward give the same gradients.
        for (m, n, c, hd, hw, bias) in [(3, 4, 6, 2, 5, true), (5, 3, 8, 4, 7, false), (1, 2, 3, 1, 1, true)]
        {
            let case = Case::new(m, n, c, hd, hw, bias, 70 + m as u64);
            let f = forward(&case.x_refs(), n, c, hw, &case.params()).unwrap();
            let go = rand_vec(n * c * hw, 5);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| backward(&go, &case.x_refs(), n, c, hw, &case.params(), &f.saved()).unwrap())
            };
            let (a, b) = (run(1), run(n + 1));
            for (ga, gb) in a.xs.iter().zip(&b.xs) {
                assert!(max_err(ga, gb) < 1e-13);
            }
            assert!(max_err(&a.fc1_weight, &b.fc1_weight) < 1e-13);
            assert!(max_err(&a.fc2_weight, &b.fc2_weight) < 1e-13);
            assert_eq!(a.fc1_bias.is_some(), bias);
            if let (Some(x), Some(y)) = (&a.fc1_bias, &b.fc1_bias) {
                assert!(max_err(x, y) < 1e-13);
            }
            if let (Some(x), Some(y)) = (&a.fc2_bias, &b.fc2_bias) {
                assert!(max_err(x, y) < 1e-13);
            }
        }
    }

    #[test]
    fn streamed_outputs_equal_plain_ones() {
        // The channels-last passes (the only ones that stream): both forwards and both
        // backwards (one sample per task with one thread, two passes with more threads
        // than samples), with M past GROUP too, and rows around the streaming block.
        for (m, n, c, hd, hw) in [(3, 3, 4, 2, 70), (2, 2, 3, 1, 64), (5, 2, 3, 2, 9)] {
            let case = Case::new(m, n, c, hd, hw, true, 40 + m as u64);
            let go = rand_vec(n * c * hw, 6);
            for threads in [1, n + 1] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let run = |streaming: bool| {
                    pool.install(|| {
                        stream::forced(streaming, || {
                            let (xs, p) = (case.x_refs(), case.params());
                            let f = forward_channels_last(&xs, n, c, hw, &p).unwrap();
                            let g = backward_channels_last(&go, &xs, n, c, hw, &p, &f.saved()).unwrap();
                            (f.out, g.xs)
                        })
                    })
                };
                assert_eq!(run(true), run(false), "m={m} threads={threads}");
            }
        }
    }

    #[test]
    fn forward_many_planes_and_f32() {
        // Several rayon tasks (planes_per_task < N*C) and a plane size that is not a
        // multiple of the vector width.
        let (m, n, c, hd, hw) = (3, 3, 40, 10, 1023);
        let case = Case::new(m, n, c, hd, hw, true, 7);
        let f = forward(&case.x_refs(), n, c, hw, &case.params()).unwrap();
        let want = case.naive();
        assert!(max_err(&f.out, &want) < 1e-12);

        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let xs32: Vec<Vec<f32>> = case.xs.iter().map(|x| to32(x)).collect();
        let xr: Vec<&[f32]> = xs32.iter().map(|x| x.as_slice()).collect();
        let (w1, w2) = (to32(&case.w1), to32(&case.w2));
        let (b1, b2) = (to32(case.b1.as_ref().unwrap()), to32(case.b2.as_ref().unwrap()));
        let p32 = Params { fc1_weight: &w1, fc1_bias: Some(&b1), fc2_weight: &w2, fc2_bias: Some(&b2) };
        let f32out = forward(&xr, n, c, hw, &p32).unwrap();
        let e = f32out.out.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(e < 1e-5, "f32 err {e}");
    }

    #[test]
    fn single_map_is_identity() {
        for bias in [false, true] {
            let case = Case::new(1, 2, 5, 2, 6, bias, 42);
            let f = forward(&case.x_refs(), 2, 5, 6, &case.params()).unwrap();
            assert_eq!(f.out, case.xs[0]);
            assert!(f.weights.iter().all(|&w| w == 1.0));
            let go = rand_vec(2 * 5 * 6, 3);
            let g = backward(&go, &case.x_refs(), 2, 5, 6, &case.params(), &f.saved()).unwrap();
            assert_eq!(g.xs[0], go);
            assert!(g.fc1_weight.iter().chain(&g.fc2_weight).all(|&v| v == 0.0));

            let x32: Vec<f32> = case.xs[0].iter().map(|&v| v as f32).collect();
            let w1: Vec<f32> = case.w1.iter().map(|&v| v as f32).collect();
            let w2: Vec<f32> = case.w2.iter().map(|&v| v as f32).collect();
            let p = Params { fc1_weight: &w1, fc1_bias: None, fc2_weight: &w2, fc2_bias: None };
            let f = forward(&[&x32[..]], 2, 5, 6, &p).unwrap();
            assert_eq!(f.out, x32);
        }
    }

    /// Backward against central finite differences of L = Σ R·G.
    fn check_backward(m: usize, n: usize, c: usize, hd: usize, hw: usize, bias: bool, seed: u64) {
        let mut case = Case::new(m, n, c, hd, hw, bias, seed);
        let go = rand_vec(n * c * hw, seed + 77);
        let f = forward(&case.x_refs(), n, c, hw, &case.params()).unwrap();
        let g = backward(&go, &case.x_refs(), n, c, hw, &case.params(), &f.saved()).unwrap();
        assert_eq!(g.fc1_bias.is_some(), bias);
        assert_eq!(g.fc2_bias.is_some(), bias);

        let loss = |case: &Case| case.naive().iter().zip(&go).map(|(r, g)| r * g).sum::<f64>();
        let eps = 1e-6;
        // Perturbs the value `get` selects and compares the central difference.
        let fd = |case: &mut Case, get: &dyn Fn(&mut Case) -> &mut f64, analytic: f64, what: &str| {
            let orig = *get(case);
            *get(case) = orig + eps;
            let lp = loss(case);
            *get(case) = orig - eps;
            let lm = loss(case);
            *get(case) = orig;
            let num = (lp - lm) / (2.0 * eps);
            assert!(
                (num - analytic).abs() < 1e-6 * (1.0 + num.abs()),
                "{what}: numeric {num} vs analytic {analytic} \
                 (m={m}, n={n}, c={c}, hw={hw}, bias={bias})"
            );
        };
        for i in 0..m {
            for k in 0..n * c * hw {
                fd(&mut case, &|cs: &mut Case| &mut cs.xs[i][k], g.xs[i][k], &format!("xs[{i}][{k}]"));
            }
        }
        for k in 0..hd * c {
            fd(&mut case, &|cs: &mut Case| &mut cs.w1[k], g.fc1_weight[k], &format!("fc1_weight[{k}]"));
            fd(&mut case, &|cs: &mut Case| &mut cs.w2[k], g.fc2_weight[k], &format!("fc2_weight[{k}]"));
        }
        if bias {
            let (gb1, gb2) = (g.fc1_bias.as_ref().unwrap(), g.fc2_bias.as_ref().unwrap());
            for k in 0..hd {
                fd(&mut case, &|cs: &mut Case| &mut cs.b1.as_mut().unwrap()[k], gb1[k], "fc1_bias");
            }
            for k in 0..c {
                fd(&mut case, &|cs: &mut Case| &mut cs.b2.as_mut().unwrap()[k], gb2[k], "fc2_bias");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for bias in [false, true] {
            check_backward(2, 2, 4, 2, 3, bias, 11);
            check_backward(3, 2, 6, 3, 5, bias, 12);
            check_backward(3, 3, 4, 1, 1, bias, 13);
            check_backward(1, 2, 4, 2, 3, bias, 14);
            check_backward(4, 1, 8, 2, 2, bias, 15);
            // Past GROUP maps: the further sweeps of both passes.
            check_backward(6, 1, 4, 2, 3, bias, 16);
        }
    }

    #[test]
    fn backward_many_planes() {
        // Several rayon tasks: spot finite differences, then an f32 run against f64.
        let (m, n, c, hd, hw) = (3, 2, 48, 12, 700);
        let case = Case::new(m, n, c, hd, hw, true, 21);
        let go = rand_vec(n * c * hw, 99);
        let f = forward(&case.x_refs(), n, c, hw, &case.params()).unwrap();
        let g = backward(&go, &case.x_refs(), n, c, hw, &case.params(), &f.saved()).unwrap();
        // Spot-check x gradients by finite differences on a few entries.
        let loss = |case: &Case| case.naive().iter().zip(&go).map(|(r, g)| r * g).sum::<f64>();
        let mut case = case;
        let eps = 1e-6;
        for &(i, k) in &[(0usize, 0usize), (1, 12345), (2, n * c * hw - 1), (2, 40000)] {
            let orig = case.xs[i][k];
            case.xs[i][k] = orig + eps;
            let lp = loss(&case);
            case.xs[i][k] = orig - eps;
            let lm = loss(&case);
            case.xs[i][k] = orig;
            let num = (lp - lm) / (2.0 * eps);
            let ana = g.xs[i][k];
            assert!((num - ana).abs() < 1e-6 * (1.0 + num.abs()), "xs[{i}][{k}]: {num} vs {ana}");
        }

        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let xs32: Vec<Vec<f32>> = case.xs.iter().map(|x| to32(x)).collect();
        let xr: Vec<&[f32]> = xs32.iter().map(|x| x.as_slice()).collect();
        let (w1, w2) = (to32(&case.w1), to32(&case.w2));
        let (b1, b2) = (to32(case.b1.as_ref().unwrap()), to32(case.b2.as_ref().unwrap()));
        let p32 = Params { fc1_weight: &w1, fc1_bias: Some(&b1), fc2_weight: &w2, fc2_bias: Some(&b2) };
        let f32f = forward(&xr, n, c, hw, &p32).unwrap();
        let g32 = backward(&to32(&go), &xr, n, c, hw, &p32, &f32f.saved()).unwrap();
        let rel = |a: &[f32], b: &[f64]| {
            let scale = b.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(1e-3);
            a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max) / scale
        };
        for i in 0..m {
            assert!(rel(&g32.xs[i], &g.xs[i]) < 1e-4);
        }
        assert!(rel(&g32.fc1_weight, &g.fc1_weight) < 1e-3);
        assert!(rel(&g32.fc2_weight, &g.fc2_weight) < 1e-3);
        assert!(rel(g32.fc1_bias.as_ref().unwrap(), g.fc1_bias.as_ref().unwrap()) < 1e-3);
        assert!(rel(g32.fc2_bias.as_ref().unwrap(), g.fc2_bias.as_ref().unwrap()) < 1e-3);
    }

    #[test]
    fn channels_last_maps_give_the_channels_first_results() {
        use crate::kernels::channels_last::to_nhwc;
        for (m, n, c, hd, hw, bias) in
            [(3, 4, 6, 3, 5, true), (1, 2, 5, 2, 7, false), (5, 3, 8, 4, 600, true)]
        {
            let case = Case::new(m, n, c, hd, hw, bias, 70 + m as u64);
            let xl: Vec<Vec<f64>> = case.xs.iter().map(|x| to_nhwc(x, n, c, hw)).collect();
            let xl_refs: Vec<&[f64]> = xl.iter().map(|x| x.as_slice()).collect();
            let go = rand_vec(n * c * hw, 99);
            let gl = to_nhwc(&go, n, c, hw);
            // One thread takes one sample per task, n + 1 the two-pass route: the
            // channels-last results must be the same values either way.
            let mut outs = Vec::new();
            for threads in [1, n + 1] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (f0, g0, f1, g1) = pool.install(|| {
                    let p = case.params();
                    let f0 = forward(&case.x_refs(), n, c, hw, &p).unwrap();
                    let g0 = backward(&go, &case.x_refs(), n, c, hw, &p, &f0.saved()).unwrap();
                    let f1 = forward_channels_last(&xl_refs, n, c, hw, &p).unwrap();
                    let g1 = backward_channels_last(&gl, &xl_refs, n, c, hw, &p, &f1.saved()).unwrap();
                    (f0, g0, f1, g1)
                });
                let what = format!("{m} maps, {n}x{c}x{hw}, {threads} threads");
                assert!(max_err(&f1.out, &to_nhwc(&f0.out, n, c, hw)) < 1e-12, "out, {what}");
                assert!(max_err(&f1.z, &f0.z) < 1e-12, "z, {what}");
                assert!(max_err(&f1.weights, &f0.weights) < 1e-12, "weights, {what}");
                for (a, b) in g1.xs.iter().zip(&g0.xs) {
                    assert!(max_err(a, &to_nhwc(b, n, c, hw)) < 1e-12, "grad x, {what}");
                }
                assert!(max_err(&g1.fc1_weight, &g0.fc1_weight) < 1e-11, "grad fc1_weight, {what}");
                assert!(max_err(&g1.fc2_weight, &g0.fc2_weight) < 1e-11, "grad fc2_weight, {what}");
                if bias {
                    assert!(max_err(g1.fc1_bias.as_ref().unwrap(), g0.fc1_bias.as_ref().unwrap()) < 1e-11);
                    assert!(max_err(g1.fc2_bias.as_ref().unwrap(), g0.fc2_bias.as_ref().unwrap()) < 1e-11);
                }
                outs.push((f1, g1));
            }
            let ((f_one, g_one), (f_two, g_two)) = (&outs[0], &outs[1]);
            let what = format!("{m} maps: channels-last routes");
            assert_eq!(f_one.out, f_two.out, "{what}");
            assert_eq!(f_one.z, f_two.z, "{what}");
            assert_eq!(f_one.hidden, f_two.hidden, "{what}");
            assert_eq!(f_one.weights, f_two.weights, "{what}");
            assert_eq!(g_one.xs, g_two.xs, "{what}");
            assert!(max_err(&g_one.fc1_weight, &g_two.fc1_weight) < 1e-12, "{what}");
        }
    }

    #[test]
    fn empty_batch() {
        let w1 = vec![0.5f64; 2 * 4];
        let w2 = vec![0.5f64; 4 * 2];
        let b1 = vec![0.1f64; 2];
        let p = Params { fc1_weight: &w1, fc1_bias: Some(&b1), fc2_weight: &w2, fc2_bias: None };
        let x: Vec<f64> = vec![];
        let f = forward(&[&x[..], &x[..]], 0, 4, 3, &p).unwrap();
        assert!(f.out.is_empty() && f.z.is_empty() && f.weights.is_empty());
        let g = backward(&x, &[&x[..], &x[..]], 0, 4, 3, &p, &f.saved()).unwrap();
        assert_eq!(g.xs.len(), 2);
        assert!(g.xs.iter().all(|v| v.is_empty()));
        assert_eq!(g.fc1_weight, vec![0.0; 8]);
        assert_eq!(g.fc2_weight, vec![0.0; 8]);
        assert_eq!(g.fc1_bias, Some(vec![0.0; 2]));
        assert_eq!(g.fc2_bias, None);
    }

    #[test]
    fn errors_name_the_argument() {
        let (n, c, hw) = (2, 4, 3);
        let x = vec![0.0f64; n * c * hw];
        let short = vec![0.0f64; n * c * hw - 1];
        let w1 = vec![0.1f64; 2 * c];
        let w2 = vec![0.1f64; c * 2];
        let p = Params { fc1_weight: &w1[..], fc1_bias: None, fc2_weight: &w2[..], fc2_bias: None };
        let err = |r: Result<Forward<f64>>| r.unwrap_err();

        let e = err(forward(&[], n, c, hw, &p));
        assert_eq!((e.arg.as_str(), e.kind), ("xs", ErrorKind::Value));
        let e = err(forward(&[&x[..], &short[..]], n, c, hw, &p));
        assert_eq!((e.arg.as_str(), e.kind), ("xs[1]", ErrorKind::Shape));
        assert!(e.expected.contains("24") && e.actual.contains("23"), "{e}");
        assert_eq!(err(forward(&[&x[..]], n, 0, hw, &p)).arg, "c");
        assert_eq!(err(forward(&[&x[..]], n, c, 0, &p)).arg, "hw");

        let bad = vec![0.1f64; 2 * c + 1];
        let pb = Params { fc1_weight: &bad[..], ..p };
        assert_eq!(err(forward(&[&x[..]], n, c, hw, &pb)).arg, "fc1_weight");
        let pb = Params { fc1_weight: &[], ..p };
        assert_eq!(err(forward(&[&x[..]], n, c, hw, &pb)).arg, "fc1_weight");
        let pb = Params { fc2_weight: &bad[..], ..p };
        assert_eq!(err(forward(&[&x[..]], n, c, hw, &pb)).arg, "fc2_weight");
        let b = [0.0f64; 3];
        let pb = Params { fc1_bias: Some(&b[..]), ..p };
        assert_eq!(err(forward(&[&x[..]], n, c, hw, &pb)).arg, "fc1_bias");
        let pb = Params { fc2_bias: Some(&b[..]), ..p };
        assert_eq!(err(forward(&[&x[..]], n, c, hw, &pb)).arg, "fc2_bias");

        let f = forward(&[&x[..], &x[..]], n, c, hw, &p).unwrap();
        let xs = [&x[..], &x[..]];
        let e = backward(&short, &xs, n, c, hw, &p, &f.saved()).unwrap_err();
        assert_eq!((e.arg.as_str(), e.kind), ("grad_out", ErrorKind::Shape));
        let e = backward(&x, &[&x[..], &short[..]], n, c, hw, &p, &f.saved()).unwrap_err();
        assert_eq!(e.arg, "xs[1]");
        // Saved tensors from a different M.
        let e = backward(&x, &[&x[..], &x[..], &x[..]], n, c, hw, &p, &f.saved()).unwrap_err();
        assert_eq!(e.arg, "saved.z");
        let s = Saved { hidden: &f.hidden[1..], ..f.saved() };
        assert_eq!(backward(&x, &xs, n, c, hw, &p, &s).unwrap_err().arg, "saved.hidden");
        let s = Saved { weights: &f.weights[1..], ..f.saved() };
        assert_eq!(backward(&x, &xs, n, c, hw, &p, &s).unwrap_err().arg, "saved.weights");
    }
}
