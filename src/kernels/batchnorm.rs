//! Batch normalisation over the rows of an `[n, c]` matrix (torch's `BatchNorm1d` on
//! `[N, C]`), shared by SSM (its heads normalise column prefixes of the feature) and
//! AB (it normalises the squeezed channel descriptor).
//!
//! The matrix is read in place: the first `c` columns of a row-major buffer with `ld`
//! elements per row. Column reductions accumulate in f64 and use two passes (mean,
//! then squared deviations), as torch does.

use super::par::SerialAware;
use super::Float;
use rayon::prelude::*;

/// Columns per rayon task in the column reductions.
const COL_BLOCK: usize = 256;

/// Statistics of one training batch.
#[derive(Debug, Clone)]
pub struct BatchStats<T> {
    pub mean: Vec<T>,
    /// `1 / sqrt(biased_var + eps)`: what normalisation and the backward use.
    pub invstd: Vec<T>,
    /// The unbiased variance, for the running-variance update.
    pub var_unbiased: Vec<T>,
}

/// Rows a column reduction adds per sweep over its accumulators, which it then loads
/// and stores once for that many rows.
const ROWS_PER_SWEEP: usize = 4;

/// Visits rows `0..n` as `visit(first_row, rows)`: sweeps of `ROWS_PER_SWEEP` rows,
/// then single rows for the rest.
fn in_sweeps(n: usize, mut visit: impl FnMut(usize, usize)) {
    let full = n / ROWS_PER_SWEEP * ROWS_PER_SWEEP;
    (0..full).step_by(ROWS_PER_SWEEP).for_each(|i| visit(i, ROWS_PER_SWEEP));
    (full..n).for_each(|i| visit(i, 1));
}

/// Per-column sums over the `n` rows of `f(element, column)`, in f64, over fixed
/// column blocks (so the result does not depend on the thread count); `row(i)` is row
/// `i`'s `c` elements.
pub fn column_sums<'a, T: Float + 'a>(
    n: usize,
    c: usize,
    row: impl Fn(usize) -> &'a [T] + Sync,
    f: impl Fn(T, usize) -> f64 + Sync,
) -> Vec<f64> {
    let mut out = vec![0.0f64; c];
    out.par_chunks_mut(COL_BLOCK).enumerate().serial_aware().for_each(|(b, acc)| {
        let (j0, width) = (b * COL_BLOCK, acc.len());
        let block = |i: usize| &row(i)[j0..j0 + width];
        let f = |v, dj| f(v, j0 + dj);
        in_sweeps(n, |i, rows| match rows {
            ROWS_PER_SWEEP => add_rows::<T, ROWS_PER_SWEEP>(acc, &std::array::from_fn(|k| block(i + k)), &f),
            _ => add_rows::<T, 1>(acc, &[block(i)], &f),
        });
    });
    out
}

/// Adds `f(element, column)` of `R` rows to the column accumulators.
#[inline(always)]
fn add_rows<T: Float, const R: usize>(acc: &mut [f64], rows: &[&[T]; R], f: &impl Fn(T, usize) -> f64) {
    for (j, a) in acc.iter_mut().enumerate() {
        *a += rows.iter().map(|r| f(r[j], j)).sum::<f64>();
    }
}

/// Batch mean, inverse standard deviation and unbiased variance of each column.
pub fn batch_stats<T: Float>(x: &[T], n: usize, c: usize, ld: usize, eps: f64) -> BatchStats<T> {
    let inv_n = 1.0 / n.max(1) as f64;
    let row = |i: usize| &x[i * ld..i * ld + c];
    let mean = column_sums(n, c, row, |v, _| v.as_f64());
    let mean: Vec<f64> = mean.into_iter().map(|s| s * inv_n).collect();
    let ssd = column_sums(n, c, row, |v, j| {
        let d = v.as_f64() - mean[j];
        d * d
    });
    let unbiased_div = if n > 1 { (n - 1) as f64 } else { f64::NAN };
    BatchStats {
        invstd: ssd.iter().map(|&s| T::of(1.0 / (s * inv_n + eps).sqrt())).collect(),
        var_unbiased: ssd.iter().map(|&s| T::of(s / unbiased_div)).collect(),
        mean: mean.into_iter().map(T::of).collect(),
    }
}

/// `1 / sqrt(running_var + eps)`, the eval-mode counterpart of `BatchStats::invstd`.
pub fn eval_invstd<T: Float>(running_var: &[T], eps: f64) -> Vec<T> {
    running_var.iter().map(|&v| T::of(1.0 / (v.as_f64() + eps).sqrt())).collect()
}

/// `y = (x - mean) * invstd * gamma + beta`, then `act` on each element, into a new
/// contiguous `[n, c]` matrix.
#[allow(clippy::too_many_arguments)]
pub fn normalize<T: Float>(
    x: &[T],
    n: usize,
    c: usize,
    ld: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    beta: &[T],
    act: impl Fn(T) -> T + Sync,
) -> Vec<T> {
    let scale: Vec<T> = invstd.iter().zip(gamma).map(|(&s, &g)| s * g).collect();
    let shift: Vec<T> = (0..c).map(|j| beta[j] - mean[j] * scale[j]).collect();
    let mut y = vec![T::zero(); n * c];
    if c == 0 {
        return y;
    }
    y.par_chunks_mut(c).enumerate().serial_aware().for_each(|(i, row)| {
        for (((o, &v), &s), &b) in row.iter_mut().zip(&x[i * ld..i * ld + c]).zip(&scale).zip(&shift) {
            *o = act(v * s + b);
        }
    });
    y
}

/// Gradients of batch normalisation.
#[derive(Debug, Clone)]
pub struct BatchNormGrads<T> {
    /// `[n, c]`, contiguous.
    pub dx: Vec<T>,
    pub dgamma: Vec<T>,
    pub dbeta: Vec<T>,
}

/// Backward of [`normalize`] (before the activation: `dy` is the gradient of the
/// normalised output). `training` selects the batch-statistics formula (the mean and
/// variance depend on `x`); otherwise `mean`/`invstd` are constants (running stats).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    dy: &[T],
    x: &[T],
    n: usize,
    c: usize,
    ld: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    training: bool,
) -> BatchNormGrads<T> {
    let mut dx = vec![T::zero(); n * c];
    let (dgamma, dbeta) = backward_into(dy, None, x, n, c, ld, mean, invstd, gamma, training, &mut dx, c);
    BatchNormGrads { dx, dgamma, dbeta }
}

/// [`backward`] that adds `dx` into the first `c` columns of `dx_out` (`ld_out`
/// elements per row) and returns `(dgamma, dbeta)`. With `relu_out` (the `[n, c]`
/// output of `normalize` with a ReLU), `dy` is the gradient of the ReLU's output and
/// is taken as zero where that output is ≤ 0 (torch's `threshold_backward`), without
/// a masked copy of `dy`.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Float>(
    dy: &[T],
    relu_out: Option<&[T]>,
    x: &[T],
    n: usize,
    c: usize,
    ld: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    training: bool,
    dx_out: &mut [T],
    ld_out: usize,
) -> (Vec<T>, Vec<T>) {
    // Row i's gradient of the normalised output, with the ReLU's output to mask it by
    // (dy's own row stands in when there is no ReLU: the mask is then not applied).
    let rows = |i: usize, j0: usize, width: usize| {
        let dyr = &dy[i * c + j0..i * c + j0 + width];
        (dyr, relu_out.map_or(dyr, |a| &a[i * c + j0..i * c + j0 + width]))
    };
    // One pass over the rows for both column sums, Σ dy and Σ dy·x̂, in f64,
    // ROWS_PER_SWEEP rows at a time.
    let mut dbeta = vec![0.0f64; c];
    let mut dgamma = vec![0.0f64; c];
    dbeta
        .par_chunks_mut(COL_BLOCK)
        .zip(dgamma.par_chunks_mut(COL_BLOCK))
        .enumerate()
        .serial_aware()
        .for_each(|(b, (db, dg))| {
            let j0 = b * COL_BLOCK;
            let width = db.len();
            let (mu, is) = (&mean[j0..j0 + width], &invstd[j0..j0 + width]);
            let row = |i: usize| {
                let (dyr, ar) = rows(i, j0, width);
                (dyr, ar, &x[i * ld + j0..i * ld + j0 + width])
            };
            let masked = relu_out.is_some();
            in_sweeps(n, |i, rows| match (rows, masked) {
                (ROWS_PER_SWEEP, true) => {
                    sums_rows::<T, true, ROWS_PER_SWEEP>(db, dg, &std::array::from_fn(|k| row(i + k)), mu, is)
                }
                (ROWS_PER_SWEEP, false) => sums_rows::<T, false, ROWS_PER_SWEEP>(
                    db,
                    dg,
                    &std::array::from_fn(|k| row(i + k)),
                    mu,
                    is,
                ),
                (_, true) => sums_rows::<T, true, 1>(db, dg, &[row(i)], mu, is),
                (_, false) => sums_rows::<T, false, 1>(db, dg, &[row(i)], mu, is),
            });
        });
    // dx = γ·σ⁻¹·(dy − Σdy/n − x̂·Σ(dy·x̂)/n), with the per-column factors folded:
    // dx = k1·dy − k2 − k3·(x − μ). In f64: with a small batch the terms nearly
    // cancel, and float32 arithmetic would leave round-off amplified by σ⁻¹.
    let inv_n = 1.0 / n.max(1) as f64;
    let k1: Vec<f64> = (0..c).map(|j| gamma[j].as_f64() * invstd[j].as_f64()).collect();
    let (k2, k3): (Vec<f64>, Vec<f64>) = if training {
        (0..c).map(|j| (k1[j] * dbeta[j] * inv_n, k1[j] * dgamma[j] * inv_n * invstd[j].as_f64())).unzip()
    } else {
        (vec![0.0; c], vec![0.0; c])
    };
    let mu: Vec<f64> = mean.iter().map(|v| v.as_f64()).collect();
    if c > 0 && n > 0 {
        let k = Folded { k1: &k1, k2: &k2, k3: &k3, mu: &mu };
        dx_out.par_chunks_mut(ld_out).take(n).enumerate().serial_aware().for_each(|(i, row)| {
            let (dyr, ar) = rows(i, 0, c);
            let xr = &x[i * ld..i * ld + c];
            if relu_out.is_some() {
                dx_row::<T, true>(&mut row[..c], dyr, ar, xr, &k);
            } else {
                dx_row::<T, false>(&mut row[..c], dyr, ar, xr, &k);
            }
        });
    }
    (dgamma.into_iter().map(T::of).collect(), dbeta.into_iter().map(T::of).collect())
}

/// `dy`, or zero where the ReLU output `a` is ≤ 0 when `MASK`.
#[inline(always)]
fn through_relu<T: Float, const MASK: bool>(dy: T, a: T) -> f64 {
    if MASK && a <= T::zero() {
        0.0
    } else {
        dy.as_f64()
    }
}

/// Adds the terms of `R` rows, each `(dy, a, x)`, to the column sums Σ dy (`db`) and
/// Σ dy·x̂ (`dg`).
#[inline(always)]
fn sums_rows<T: Float, const MASK: bool, const R: usize>(
    db: &mut [f64],
    dg: &mut [f64],
    rows: &[(&[T], &[T], &[T]); R],
    mu: &[T],
    is: &[T],
) {
    for (j, ((b, g), (&m, &s))) in db.iter_mut().zip(dg.iter_mut()).zip(mu.iter().zip(is)).enumerate() {
        let (m, s) = (m.as_f64(), s.as_f64());
        let (mut sb, mut sg) = (0.0, 0.0);
        for (dy, a, x) in rows {
            let d = through_relu::<T, MASK>(dy[j], a[j]);
            sb += d;
            sg += d * (x[j].as_f64() - m);
        }
        *b += sb;
        *g += sg * s;
    }
}

/// The per-column factors of the input gradient, `dx = k1·dy − k2 − k3·(x − mu)`.
struct Folded<'a> {
    k1: &'a [f64],
    k2: &'a [f64],
    k3: &'a [f64],
    mu: &'a [f64],
}

/// Adds one row of the input gradient into `out`.
#[inline(always)]
fn dx_row<T: Float, const MASK: bool>(out: &mut [T], dy: &[T], a: &[T], x: &[T], k: &Folded) {
    for (((((o, &d), &av), &xv), (&k1, &k2)), (&k3, &m)) in
        out.iter_mut().zip(dy).zip(a).zip(x).zip(k.k1.iter().zip(k.k2)).zip(k.k3.iter().zip(k.mu))
    {
        *o += T::of(k1 * through_relu::<T, MASK>(d, av) - k2 - k3 * (xv.as_f64() - m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(x: &[f64], n: usize, c: usize, ld: usize, g: &[f64], b: &[f64], w: &[f64]) -> f64 {
        let s = batch_stats(x, n, c, ld, 1e-5);
        let y = normalize(x, n, c, ld, &s.mean, &s.invstd, g, b, |v| v);
        y.iter().zip(w).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn stats_match_naive_sums_for_every_row_count() {
        // Row counts around the sweep width, and more columns than one block.
        let (c, ld) = (COL_BLOCK + 44, COL_BLOCK + 50);
        for n in 1..=2 * ROWS_PER_SWEEP + 1 {
            let x: Vec<f64> = (0..n * ld).map(|i| ((i * 7919) % 263) as f64 / 37.0 - 3.0).collect();
            let s = batch_stats(&x, n, c, ld, 1e-5);
            for j in 0..c {
                let col: Vec<f64> = (0..n).map(|i| x[i * ld + j]).collect();
                let mean = col.iter().sum::<f64>() / n as f64;
                let ssd: f64 = col.iter().map(|v| (v - mean) * (v - mean)).sum();
                assert!((s.mean[j] - mean).abs() < 1e-12, "n={n} j={j}");
                assert!((s.invstd[j] - 1.0 / (ssd / n as f64 + 1e-5).sqrt()).abs() < 1e-9, "n={n} j={j}");
            }
        }
    }

    #[test]
    fn stats_match_definition() {
        let x = [1.0f64, 10.0, 99.0, 3.0, 20.0, 99.0];
        let s = batch_stats(&x, 2, 2, 3, 0.0);
        assert_eq!(s.mean, vec![2.0, 15.0]);
        assert!((s.var_unbiased[0] - 2.0).abs() < 1e-12);
        assert!((s.invstd[1] - 1.0 / 5.0).abs() < 1e-12);
    }

    #[test]
    fn training_backward_matches_finite_differences() {
        let (n, c, ld) = (5, 3, 4);
        let mut x: Vec<f64> = (0..n * ld).map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0).collect();
        let g = [0.5, -1.2, 2.0];
        let b = [0.1, 0.2, -0.3];
        let w: Vec<f64> = (0..n * c).map(|i| ((i * 13) % 7) as f64 - 3.0).collect();
        let s = batch_stats(&x, n, c, ld, 1e-5);
        let grads = backward(&w, &x, n, c, ld, &s.mean, &s.invstd, &g, true);
        let h = 1e-6;
        for i in 0..n {
            for j in 0..c {
                let k = i * ld + j;
                x[k] += h;
                let up = loss(&x, n, c, ld, &g, &b, &w);
                x[k] -= 2.0 * h;
                let down = loss(&x, n, c, ld, &g, &b, &w);
                x[k] += h;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grads.dx[i * c + j]).abs() < 1e-5,
                    "dx[{i},{j}] {fd} vs {}",
                    grads.dx[i * c + j]
                );
            }
        }
        let dbeta: f64 = (0..n).map(|i| w[i * c + 1]).sum();
        assert!((grads.dbeta[1] - dbeta).abs() < 1e-12);
    }
}
