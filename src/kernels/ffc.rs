//! FFC — Sequential Feature Filtering Classifier (../shared/SPEC.md, "FFC").
//!
//! ```text
//! f0 = GAP(x)                      f_l = ReLU(LN_l(f_{l-1}))   l = 1..L
//! features g_j: "paper" f0, (f0+f1)/2, f1, …, fL (2L+1); "plain" f0, …, fL (L+1)
//! o_j = W g_j + b                  (one Linear shared by every feature)
//! ```
//!
//! The classifier is linear, so the kernel never runs it 2L+1 times:
//! * ensemble (training, eval "mean"): `mean_j o_j = W (Σ_l a_l f_l) + b` with fixed
//!   coefficients `a_l` — ONE `N×C×K` product forward and two backward;
//! * all outputs and voting: the L+1 products `P_l = f_l Wᵀ` as ONE product over the
//!   `(L+1)·N` stacked feature rows; an averaged feature's output is the average of
//!   its two neighbours' outputs.
//!
//! Layouts: the filtered features are kept row by row, `feats[n][l][c]` (`l = 0..=L`),
//! so each sample's filter chain is one contiguous, cache-resident block and the
//! stack is directly a `[(L+1)·N, C]` matrix for the product. `mean`/`rstd` of each
//! LayerNorm are `[N][L]`.

use super::gemm::{matmul, matmul_new, Mat};
use super::par::SerialAware;
use super::pool::global_avg_pool;
pub use super::Outputs;
use super::{check_len, checked_numel, column_totals, Error, Float, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// How the filtered features are combined into the classifier's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// f0, (f0+f1)/2, f1, …, fL: the paper's Out1…Out7 for L = 3.
    Paper,
    /// f0, f1, …, fL: the authors' public code.
    Plain,
}

impl Combine {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "paper" => Ok(Combine::Paper),
            "plain" => Ok(Combine::Plain),
            other => Err(Error::value("combine", "'paper' or 'plain'", format!("{other:?}"))),
        }
    }
}

/// The hyper-parameters of one FFC head.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub num_filters: usize,
    pub combine: Combine,
    pub eps: f64,
}

impl Config {
    pub fn new(num_filters: usize, combine: Combine, eps: f64) -> Result<Self> {
        if num_filters == 0 {
            return Err(Error::value("num_filters", "an integer >= 1", "0"));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::value("eps", "a finite number > 0", format!("{eps}")));
        }
        Ok(Config { num_filters, combine, eps })
    }

    /// Number of filtered feature levels, f0..fL.
    pub fn levels(&self) -> usize {
        self.num_filters + 1
    }

    /// J, the number of classifier outputs.
    pub fn num_outputs(&self) -> usize {
        match self.combine {
            Combine::Paper => 2 * self.num_filters + 1,
            Combine::Plain => self.num_filters + 1,
        }
    }

    /// Output `j` as a combination of levels: `[(level, weight)]`, one or two terms.
    pub fn output_terms(&self, j: usize) -> Vec<(usize, f64)> {
        match self.combine {
            Combine::Plain => vec![(j, 1.0)],
            Combine::Paper if j % 2 == 0 => vec![(j / 2, 1.0)],
            Combine::Paper => vec![(j / 2, 0.5), (j / 2 + 1, 0.5)],
        }
    }

    /// `a_l` such that `mean_j g_j = Σ_l a_l f_l`.
    pub fn ensemble_coeffs(&self) -> Vec<f64> {
        let mut a = vec![0.0; self.levels()];
        let j_count = self.num_outputs();
        for j in 0..j_count {
            for (l, w) in self.output_terms(j) {
                a[l] += w / j_count as f64;
            }
        }
        a
    }
}

/// The learnable parameters, read in place. `ln_weight`/`ln_bias` are the L
/// LayerNorms stacked, `[L, C]`; `fc_weight` is `[K, C]` (torch Linear layout).
#[derive(Debug, Clone, Copy)]
pub struct Params<'a, T> {
    pub ln_weight: &'a [T],
    pub ln_bias: &'a [T],
    pub fc_weight: &'a [T],
    pub fc_bias: &'a [T],
}

/// Sizes of one call: batch, channels, spatial plane (1 for `[N, C]` input), classes.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub k: usize,
}

/// The filter chain of a batch: kept only within one call (the backward recomputes
/// it from the pooled input, which costs far less than keeping `L+1` copies of the
/// features alive between forward and backward).
struct Filtered<T> {
    /// `[N, L+1, C]`: f0 (the pooled input) and every filtered feature.
    feats: Vec<T>,
    /// `[N, L]`: each LayerNorm's mean.
    mean: Vec<T>,
    /// `[N, L]`: each LayerNorm's `1/sqrt(var + eps)`.
    rstd: Vec<T>,
}

/// Gradients of one backward call.
#[derive(Debug, Clone)]
pub struct Grads<T> {
    /// `[N, C]`: the gradient of x on each `H×W` plane (constant over the plane, as
    /// global average pooling spreads it); for `[N, C]` input, the gradient itself.
    pub x: Vec<T>,
    pub ln_weight: Vec<T>,
    pub ln_bias: Vec<T>,
    pub fc_weight: Vec<T>,
    pub fc_bias: Vec<T>,
}

pub(crate) fn validate<T>(cfg: &Config, d: Dims, x: &[T], p: &Params<T>) -> Result<()> {
    check_len("x", x, &[d.n, d.c, d.hw])?;
    validate_params(cfg, d, p)
}

pub(crate) fn validate_params<T>(cfg: &Config, d: Dims, p: &Params<T>) -> Result<()> {
    if d.c == 0 {
        return Err(Error::shape("x", "at least 1 channel", "0 channels"));
    }
    if d.hw == 0 {
        return Err(Error::shape("x", "a non-empty spatial plane", "H*W = 0"));
    }
    if d.k == 0 {
        return Err(Error::shape("fc_weight", "at least 1 class", "0 classes"));
    }
    check_len("ln_weight", p.ln_weight, &[cfg.num_filters, d.c])?;
    check_len("ln_bias", p.ln_bias, &[cfg.num_filters, d.c])?;
    check_len("fc_weight", p.fc_weight, &[d.k, d.c])?;
    check_len("fc_bias", p.fc_bias, &[d.k])?;
    // The stacked products need (L+1)·N·max(C, K) elements.
    checked_numel("x", &[d.n, cfg.levels(), d.c.max(d.k)])?;
    Ok(())
}

/// `f0`: the input itself for `[N, C]`, its plane means for `[N, C, H, W]`.
fn pooled<T: Float>(x: &[T], hw: usize) -> Cow<'_, [T]> {
    if hw == 1 {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(global_avg_pool(x, hw))
    }
}

/// Mean and `1/sqrt(var + eps)` of one row, in one pass of f64 sums (f64 keeps
/// `E[x²] - E[x]²` exact enough for any feature a network produces), 8 interleaved
/// partial sums over fixed 8-wide blocks, which vectorises.
fn row_stats<T: Float>(row: &[T], eps: f64) -> (f64, f64) {
    const W: usize = 8;
    let (mut s, mut q) = ([0.0f64; W], [0.0f64; W]);
    let mut chunks = row.chunks_exact(W);
    for ch in &mut chunks {
        for i in 0..W {
            let v = ch[i].as_f64();
            s[i] += v;
            q[i] += v * v;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        s[i] += v.as_f64();
        q[i] += v.as_f64() * v.as_f64();
    }
    let inv_c = 1.0 / row.len() as f64;
    let mean = s.iter().sum::<f64>() * inv_c;
    let var = (q.iter().sum::<f64>() * inv_c - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

/// Runs the filter chain of every sample: fills `feats`, `mean` and `rstd`.
fn filter<T: Float>(cfg: &Config, f0: &[T], n: usize, c: usize, p: &Params<T>) -> Filtered<T> {
    let (lv, nf) = (cfg.levels(), cfg.num_filters);
    // Every element is written below, level after level: no zeroing pass first.
    let mut feats = Vec::<T>::with_capacity(n * lv * c);
    let mut mean = vec![T::zero(); n * nf];
    let mut rstd = vec![T::zero(); n * nf];
    if c > 0 {
        feats.spare_capacity_mut()[..n * lv * c]
            .par_chunks_mut(lv * c)
            .zip(mean.par_chunks_mut(nf).zip(rstd.par_chunks_mut(nf)))
            .enumerate()
            .serial_aware()
            .for_each(|(i, (fs, (mu, rs)))| {
                for (d, &v) in fs[..c].iter_mut().zip(&f0[i * c..(i + 1) * c]) {
                    d.write(v);
                }
                for l in 0..nf {
                    let (done, rest) = fs.split_at_mut((l + 1) * c);
                    // SAFETY: levels 0..=l were written (the copy above, then the loop's
                    // earlier rounds); `MaybeUninit<T>` has `T`'s layout.
                    let prev = unsafe { &*(&done[l * c..] as *const [MaybeUninit<T>] as *const [T]) };
                    let next = &mut rest[..c];
                    let (m, r) = row_stats(prev, cfg.eps);
                    let (g, b) = (&p.ln_weight[l * c..(l + 1) * c], &p.ln_bias[l * c..(l + 1) * c]);
                    let (mt, rt) = (T::of(m), T::of(r));
                    for (((o, &v), &gj), &bj) in next.iter_mut().zip(prev).zip(g).zip(b) {
                        let y = (v - mt) * rt * gj + bj;
                        // max() would turn a NaN into 0; keep NaN flowing as torch's ReLU does.
                        o.write(if y <= T::zero() { T::zero() } else { y });
                    }
                    mu[l] = mt;
                    rs[l] = rt;
                }
            });
    }
    // SAFETY: each sample's `lv * c` values were written above (none when c == 0).
    unsafe { feats.set_len(n * lv * c) };
    Filtered { feats, mean, rstd }
}

/// `out[r] = bias` for every row: the products then accumulate onto it.
fn rows_of_bias<T: Float>(rows: usize, bias: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    out
}

/// `P = F Wᵀ + b` over the `(L+1)·N` stacked feature rows: `[N, L+1, K]`.
fn level_logits<T: Float>(saved: &Filtered<T>, d: Dims, lv: usize, p: &Params<T>) -> Vec<T> {
    let rows = d.n * lv;
    let mut out = rows_of_bias(rows, p.fc_bias);
    let w = Mat::new(p.fc_weight, d.k, d.c);
    matmul(&mut out, d.k, Mat::new(&saved.feats, rows, d.c), w.t(), T::one(), true);
    out
}

/// `h = Σ_l a_l f_l`, `[N, C]`.
fn ensemble_feature<T: Float>(feats: &[T], d: Dims, a: &[f64]) -> Vec<T> {
    let c = d.c;
    let lv = a.len();
    let a: Vec<T> = a.iter().map(|&v| T::of(v)).collect();
    let mut h = vec![T::zero(); d.n * c];
    if d.n == 0 {
        return h;
    }
    h.par_chunks_mut(c).zip(feats.par_chunks(lv * c)).serial_aware().for_each(|(hr, fs)| {
        for (l, &al) in a.iter().enumerate() {
            for (o, &v) in hr.iter_mut().zip(&fs[l * c..(l + 1) * c]) {
                *o += al * v;
            }
        }
    });
    h
}

/// Forward: the ensemble logits `[N, K]` or every output's logits `[J, N, K]`.
/// The backward needs only the pooled input (`x` itself for `[N, C]` input).
pub fn forward<T: Float>(cfg: &Config, d: Dims, x: &[T], p: &Params<T>, outputs: Outputs) -> Result<Vec<T>> {
    validate(cfg, d, x, p)?;
    let f0 = pooled(x, d.hw);
    let saved = filter(cfg, &f0, d.n, d.c, p);
    let out = match outputs {
        Outputs::Ensemble => {
            let h = ensemble_feature(&saved.feats, d, &cfg.ensemble_coeffs());
            let mut out = rows_of_bias(d.n, p.fc_bias);
            let w = Mat::new(p.fc_weight, d.k, d.c);
            matmul(&mut out, d.k, Mat::new(&h, d.n, d.c), w.t(), T::one(), true);
            out
        }
        Outputs::All => {
            let lv = cfg.levels();
            let pl = level_logits(&saved, d, lv, p);
            let (nk, k) = (d.n * d.k, d.k);
            let mut out = vec![T::zero(); cfg.num_outputs() * nk];
            for (j, oj) in out.chunks_mut(nk.max(1)).enumerate().take(cfg.num_outputs()) {
                let terms: Vec<(usize, T)> =
                    cfg.output_terms(j).into_iter().map(|(l, w)| (l, T::of(w))).collect();
                for (i, orow) in oj.chunks_mut(k).enumerate() {
                    for &(l, w) in &terms {
                        let prow = &pl[(i * lv + l) * k..(i * lv + l + 1) * k];
                        for (o, &v) in orow.iter_mut().zip(prow) {
                            *o += w * v;
                        }
                    }
                }
            }
            out
        }
    };
    Ok(out)
}

/// The class each sample votes for, as a `[N, K]` score whose row-wise argmax is it.
///
/// Each of the J outputs votes for its argmax class; the class with the most votes
/// wins; on a tie, the tied class backed by the single most confident output
/// (highest softmax probability) wins. The score is `votes[k]`, plus, for the
/// classes tied for the most votes when there is a tie, `0.5 ·` the highest softmax
/// probability among the outputs voting for that class: votes dominate (the bonus is
/// < 1), and the bonus decides between tied classes. Softmax is only computed for the
/// outputs whose vote is tied at the top, which is rare: voting costs the L+1 products.
pub fn vote<T: Float>(cfg: &Config, d: Dims, x: &[T], p: &Params<T>) -> Result<Vec<T>> {
    validate(cfg, d, x, p)?;
    let f0 = pooled(x, d.hw);
    let saved = filter(cfg, &f0, d.n, d.c, p);
    let lv = cfg.levels();
    let pl = level_logits(&saved, d, lv, p);
    let k = d.k;
    let terms: Vec<Vec<(usize, f64)>> = (0..cfg.num_outputs()).map(|j| cfg.output_terms(j)).collect();
    let mut scores = vec![T::zero(); d.n * k];
    if d.n == 0 {
        return Ok(scores);
    }
    scores.par_chunks_mut(k).zip(pl.par_chunks(lv * k)).serial_aware().for_each(|(score, prows)| {
        let output = |t: &[(usize, f64)], o: &mut Vec<f64>| {
            o.clear();
            o.resize(k, 0.0);
            for &(l, w) in t {
                for (oi, &v) in o.iter_mut().zip(&prows[l * k..(l + 1) * k]) {
                    *oi += w * v.as_f64();
                }
            }
        };
        let mut o = Vec::with_capacity(k);
        let mut winners = Vec::with_capacity(terms.len());
        for t in &terms {
            output(t, &mut o);
            winners.push(argmax(&o));
        }
        let mut votes = vec![0u32; k];
        for &w in &winners {
            votes[w] += 1;
        }
        let top = *votes.iter().max().expect("k >= 1");
        let mut bonus = vec![0.0f64; k];
        if winners
            .iter()
            .filter(|&&w| votes[w] == top)
            .any(|&w| winners.iter().any(|&v| v != w && votes[v] == top))
        {
            for (t, &w) in terms.iter().zip(&winners) {
                if votes[w] == top {
                    output(t, &mut o);
                    let m = o[w];
                    let prob = 1.0 / o.iter().map(|&v| (v - m).exp()).sum::<f64>();
                    if prob > bonus[w] || prob.is_nan() {
                        bonus[w] = prob;
                    }
                }
            }
        }
        for ((s, &v), &b) in score.iter_mut().zip(&votes).zip(&bonus) {
            *s = T::of(v as f64 + 0.5 * b);
        }
    });
    Ok(scores)
}

/// The first index of the maximum; NaN counts as the largest, as in `torch.argmax`.
fn argmax(o: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in o.iter().enumerate() {
        if v > o[best] || (v.is_nan() && !o[best].is_nan()) {
            best = i;
        }
    }
    best
}

/// Rows per task in the backward's reductions: fixed (not derived from the thread
/// count) so that the partial sums, and hence the results, do not depend on it.
const ROWS_PER_TASK: usize = 16;

/// Backward of [`forward`]. `grad_out` is `[N, K]` (ensemble) or `[J, N, K]` (all);
/// `pooled` is the forward's f0, `[N, C]`: the input itself for `[N, C]` input, its
/// plane means (`pool::global_avg_pool`) for `[N, C, H, W]` (`d.hw = H·W`).
pub fn backward<T: Float>(
    cfg: &Config,
    d: Dims,
    grad_out: &[T],
    p: &Params<T>,
    pooled: &[T],
    outputs: Outputs,
) -> Result<Grads<T>> {
    let (n, c, k, lv, nf) = (d.n, d.c, d.k, cfg.levels(), cfg.num_filters);
    validate_params(cfg, d, p)?;
    check_len("pooled", pooled, &[n, c])?;
    let saved = filter(cfg, pooled, n, c, p);
    let w = Mat::new(p.fc_weight, k, c);
    let fc_weight;
    let mut fc_bias = vec![T::zero(); k];

    // The gradient reaching each level directly from the classifier, read per row as
    // `direct[i][l]`: ensemble: a_l · dh[i] with dh = dout W; all: dF = dP W.
    let (direct, direct_levels, coeffs) = match outputs {
        Outputs::Ensemble => {
            check_len("grad_out", grad_out, &[n, k])?;
            let h = ensemble_feature(&saved.feats, d, &cfg.ensemble_coeffs());
            let dout = Mat::new(grad_out, n, k);
            fc_weight = matmul_new(dout.t(), Mat::new(&h, n, c), T::one());
            let dh = matmul_new(dout, w, T::one());
            sum_rows(grad_out, k, &mut fc_bias);
            (dh, 1, cfg.ensemble_coeffs())
        }
        Outputs::All => {
            let j_count = cfg.num_outputs();
            check_len("grad_out", grad_out, &[j_count, n, k])?;
            // dP[i][l] = Σ_j weight(l in j) · dO[j][i]
            let mut dp = vec![T::zero(); n * lv * k];
            for j in 0..j_count {
                let oj = &grad_out[j * n * k..(j + 1) * n * k];
                sum_rows(oj, k, &mut fc_bias);
                for (l, wt) in cfg.output_terms(j) {
                    let wt = T::of(wt);
                    for i in 0..n {
                        let src = &oj[i * k..(i + 1) * k];
                        let dst = &mut dp[(i * lv + l) * k..(i * lv + l + 1) * k];
                        for (a, &b) in dst.iter_mut().zip(src) {
                            *a += wt * b;
                        }
                    }
                }
            }
            let dpm = Mat::new(&dp, n * lv, k);
            fc_weight = matmul_new(dpm.t(), Mat::new(&saved.feats, n * lv, c), T::one());
            let df = matmul_new(dpm, w, T::one());
            (df, lv, vec![1.0; lv])
        }
    };

    // The filter chain, backwards, row by row; LayerNorm parameter gradients are
    // summed per fixed block of rows, then the blocks in order.
    let coeffs: Vec<T> = coeffs.iter().map(|&v| T::of(v)).collect();
    let inv_hw = T::of(1.0 / d.hw as f64);
    let mut gx = vec![T::zero(); n * c];
    let partials: Vec<Vec<f64>> = gx
        .par_chunks_mut(ROWS_PER_TASK * c)
        .enumerate()
        .serial_aware()
        .map(|(blk, gx_rows)| {
            let mut acc = vec![0.0f64; 2 * nf * c]; // [dgamma (L·C), dbeta (L·C)]
            let mut g = vec![T::zero(); c];
            let mut dxhat = vec![T::zero(); c];
            for (r, gx_row) in gx_rows.chunks_mut(c).enumerate() {
                let i = blk * ROWS_PER_TASK + r;
                let fs = &saved.feats[i * lv * c..(i + 1) * lv * c];
                let dir = &direct[i * direct_levels * c..(i + 1) * direct_levels * c];
                let direct_at = |l: usize| {
                    let src = if direct_levels == 1 { 0 } else { l };
                    (&dir[src * c..(src + 1) * c], coeffs[l])
                };
                let (d_l, a_l) = direct_at(nf);
                for (gj, &v) in g.iter_mut().zip(d_l) {
                    *gj = a_l * v;
                }
                for l in (1..=nf).rev() {
                    let (prev, cur) = (&fs[(l - 1) * c..l * c], &fs[l * c..(l + 1) * c]);
                    let (mu, rs) = (saved.mean[i * nf + l - 1], saved.rstd[i * nf + l - 1]);
                    let gamma = &p.ln_weight[(l - 1) * c..l * c];
                    let (dgam, dbet) = acc.split_at_mut(nf * c);
                    let (dgam, dbet) = (&mut dgam[(l - 1) * c..l * c], &mut dbet[(l - 1) * c..l * c]);
                    // ReLU mask, LayerNorm affine, and the two row means of the
                    // LayerNorm backward, in one sweep.
                    let (s1, s2) =
                        ln_backward_sweep(Row { g: &g, cur, prev, gamma }, (mu, rs), dgam, dbet, &mut dxhat);
                    let (m1, m2) = (T::of(s1 / c as f64), T::of(s2 / c as f64));
                    let (d_prev, a_prev) = direct_at(l - 1);
                    for j in 0..c {
                        let xh = (prev[j] - mu) * rs;
                        g[j] = rs * (dxhat[j] - m1 - xh * m2) + a_prev * d_prev[j];
                    }
                }
                for (o, &v) in gx_row.iter_mut().zip(&g) {
                    *o = v * inv_hw;
                }
            }
            acc
        })
        .collect();
    let mut ln = vec![0.0f64; 2 * nf * c];
    for part in &partials {
        for (a, &b) in ln.iter_mut().zip(part) {
            *a += b;
        }
    }
    let (lw, lb) = ln.split_at(nf * c);
    Ok(Grads {
        x: gx,
        ln_weight: lw.iter().map(|&v| T::of(v)).collect(),
        ln_bias: lb.iter().map(|&v| T::of(v)).collect(),
        fc_weight,
        fc_bias,
    })
}

/// One row of one level of the filter chain, for [`ln_backward_sweep`]: the gradient
/// reaching the level's output, that output, its input, and the LayerNorm's weight.
struct Row<'a, T> {
    g: &'a [T],
    cur: &'a [T],
    prev: &'a [T],
    gamma: &'a [T],
}

/// Through one level's ReLU and LayerNorm affine, for one row: adds the row's
/// contributions to the parameter gradients (`dgam`, `dbet`), writes
/// `dxhat = gy · gamma` (`gy` the gradient through the ReLU) and returns the row sums
/// `(Σ dxhat, Σ dxhat · xhat)` of the LayerNorm backward. The sums run in 8
/// interleaved f64 partial sums over fixed 8-wide blocks, which vectorises; `mu`,
/// `rs` are the row's mean and `1/std`.
#[inline]
fn ln_backward_sweep<T: Float>(
    r: Row<'_, T>,
    (mu, rs): (T, T),
    dgam: &mut [f64],
    dbet: &mut [f64],
    dxhat: &mut [T],
) -> (f64, f64) {
    const W: usize = 8;
    let c = r.g.len();
    let (g, cur, prev, gamma) = (r.g, &r.cur[..c], &r.prev[..c], &r.gamma[..c]);
    let (dgam, dbet, dxhat) = (&mut dgam[..c], &mut dbet[..c], &mut dxhat[..c]);
    let (mut s1, mut s2) = ([0.0f64; W], [0.0f64; W]);
    // One element, summed into partial sum `i`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn one<T: Float>(
        (g, cur, prev, gamma): (T, T, T, T),
        (mu, rs): (T, T),
        dgam: &mut f64,
        dbet: &mut f64,
        dxhat: &mut T,
        s1: &mut f64,
        s2: &mut f64,
    ) {
        // As torch's threshold_backward: the gradient passes where the output > 0
        // (and NaN passes through).
        let gy = if cur <= T::zero() { T::zero() } else { g };
        let xh = (prev - mu) * rs;
        *dgam += (gy * xh).as_f64();
        *dbet += gy.as_f64();
        let dxh = gy * gamma;
        *dxhat = dxh;
        *s1 += dxh.as_f64();
        *s2 += (dxh * xh).as_f64();
    }
    let blocks = g
        .chunks_exact(W)
        .zip(cur.chunks_exact(W))
        .zip(prev.chunks_exact(W))
        .zip(gamma.chunks_exact(W))
        .zip(dgam.chunks_exact_mut(W))
        .zip(dbet.chunks_exact_mut(W))
        .zip(dxhat.chunks_exact_mut(W));
    for ((((((g8, c8), p8), gm8), dg8), db8), dx8) in blocks {
        for i in 0..W {
            one(
                (g8[i], c8[i], p8[i], gm8[i]),
                (mu, rs),
                &mut dg8[i],
                &mut db8[i],
                &mut dx8[i],
                &mut s1[i],
                &mut s2[i],
            );
        }
    }
    let whole = c / W * W;
    for j in whole..c {
        one(
            (g[j], cur[j], prev[j], gamma[j]),
            (mu, rs),
            &mut dgam[j],
            &mut dbet[j],
            &mut dxhat[j],
            &mut s1[0],
            &mut s2[0],
        );
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// `acc[j] += Σ_i m[i][j]` over the rows of a row-major matrix with `cols` columns.
fn sum_rows<T: Float>(m: &[T], cols: usize, acc: &mut [T]) {
    for (a, v) in acc.iter_mut().zip(column_totals(m, cols)) {
        *a += T::of(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator: tests need no rand crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
        fn vec(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    struct Case {
        cfg: Config,
        d: Dims,
        x: Vec<f64>,
        lw: Vec<f64>,
        lb: Vec<f64>,
        fw: Vec<f64>,
        fb: Vec<f64>,
    }

    impl Case {
        fn new(seed: u64, l: usize, combine: Combine, d: Dims) -> Self {
            let mut r = Lcg(seed);
            Case {
                cfg: Config::new(l, combine, 1e-5).unwrap(),
                d,
                x: r.vec(d.n * d.c * d.hw),
                lw: r.vec(l * d.c).iter().map(|v| 1.0 + 0.5 * v).collect(),
                lb: r.vec(l * d.c).iter().map(|v| 0.3 * v).collect(),
                fw: r.vec(d.k * d.c),
                fb: r.vec(d.k),
            }
        }
        fn params(&self) -> Params<'_, f64> {
            Params { ln_weight: &self.lw, ln_bias: &self.lb, fc_weight: &self.fw, fc_bias: &self.fb }
        }
        /// Every output's logits, computed the slow way: J separate Linear passes.
        fn naive_outputs(&self) -> Vec<Vec<f64>> {
            let (n, c, hw, k, nf) = (self.d.n, self.d.c, self.d.hw, self.d.k, self.cfg.num_filters);
            let mut outs = vec![];
            for i in 0..n {
                let mut f: Vec<Vec<f64>> = vec![(0..c)
                    .map(|j| self.x[(i * c + j) * hw..(i * c + j + 1) * hw].iter().sum::<f64>() / hw as f64)
                    .collect()];
                for l in 0..nf {
                    let prev = &f[l];
                    let m = prev.iter().sum::<f64>() / c as f64;
                    let v = prev.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
                    let next = (0..c)
                        .map(|j| {
                            ((prev[j] - m) / (v + 1e-5).sqrt() * self.lw[l * c + j] + self.lb[l * c + j])
                                .max(0.0)
                        })
                        .collect();
                    f.push(next);
                }
                let g: Vec<Vec<f64>> = match self.cfg.combine {
                    Combine::Plain => f.clone(),
                    Combine::Paper => (0..2 * nf + 1)
                        .map(|j| {
                            if j % 2 == 0 {
                                f[j / 2].clone()
                            } else {
                                (0..c).map(|q| 0.5 * (f[j / 2][q] + f[j / 2 + 1][q])).collect()
                            }
                        })
                        .collect(),
                };
                for (j, gj) in g.iter().enumerate() {
                    if outs.len() <= j {
                        outs.push(vec![0.0; n * k]);
                    }
                    for o in 0..k {
                        outs[j][i * k + o] =
                            self.fb[o] + (0..c).map(|q| self.fw[o * c + q] * gj[q]).sum::<f64>();
                    }
                }
            }
            outs
        }
        fn loss(&self, outputs: Outputs, wts: &[f64]) -> f64 {
            let o = forward(&self.cfg, self.d, &self.x, &self.params(), outputs).unwrap();
            o.iter().zip(wts).map(|(a, b)| a * b).sum()
        }
    }

    fn dims(n: usize, c: usize, hw: usize, k: usize) -> Dims {
        Dims { n, c, hw, k }
    }

    #[test]
    fn fast_paths_equal_the_naive_outputs() {
        for (seed, l, combine, d) in [
            (1, 3, Combine::Paper, dims(5, 17, 1, 7)),
            (2, 2, Combine::Plain, dims(3, 33, 4, 5)),
            (3, 1, Combine::Paper, dims(1, 8, 9, 3)),
        ] {
            let case = Case::new(seed, l, combine, d);
            let naive = case.naive_outputs();
            let all = forward(&case.cfg, d, &case.x, &case.params(), Outputs::All).unwrap();
            let ens = forward(&case.cfg, d, &case.x, &case.params(), Outputs::Ensemble).unwrap();
            let nk = d.n * d.k;
            assert_eq!(all.len(), naive.len() * nk);
            for (j, o) in naive.iter().enumerate() {
                for q in 0..nk {
                    assert!((all[j * nk + q] - o[q]).abs() < 1e-10);
                }
            }
            for q in 0..nk {
                let mean = naive.iter().map(|o| o[q]).sum::<f64>() / naive.len() as f64;
                assert!((ens[q] - mean).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (outputs, combine) in [
            (Outputs::Ensemble, Combine::Paper),
            (Outputs::All, Combine::Paper),
            (Outputs::All, Combine::Plain),
        ] {
            let d = dims(4, 6, 3, 5);
            let mut case = Case::new(7, 3, combine, d);
            let j = if outputs == Outputs::All { case.cfg.num_outputs() } else { 1 };
            let wts = Lcg(99).vec(j * d.n * d.k);
            let pooled = global_avg_pool(&case.x, d.hw);
            let g = backward(&case.cfg, d, &wts, &case.params(), &pooled, outputs).unwrap();
            let h = 1e-6;
            macro_rules! check {
                ($field:ident, $grad:expr, $per:expr) => {
                    for q in 0..case.$field.len() {
                        case.$field[q] += h;
                        let up = case.loss(outputs, &wts);
                        case.$field[q] -= 2.0 * h;
                        let down = case.loss(outputs, &wts);
                        case.$field[q] += h;
                        let fd = (up - down) / (2.0 * h);
                        let an = $grad[$per(q)];
                        assert!(
                            (fd - an).abs() < 1e-6 * (1.0 + fd.abs()),
                            "{} [{q}]: {fd} vs {an}",
                            stringify!($field)
                        );
                    }
                };
            }
            check!(x, g.x, |q: usize| q / d.hw);
            check!(lw, g.ln_weight, |q| q);
            check!(lb, g.ln_bias, |q| q);
            check!(fw, g.fc_weight, |q| q);
            check!(fb, g.fc_bias, |q| q);
        }
    }

    #[test]
    fn vote_follows_majority_then_confidence() {
        let case = Case::new(11, 3, Combine::Paper, dims(64, 9, 1, 4));
        let naive = case.naive_outputs();
        let scores = vote(&case.cfg, case.d, &case.x, &case.params()).unwrap();
        let k = case.d.k;
        for i in 0..case.d.n {
            let mut votes = vec![0; k];
            let mut best_conf = vec![-1.0; k];
            for o in &naive {
                let row = &o[i * k..(i + 1) * k];
                let am = (0..k).fold(0, |b, q| if row[q] > row[b] { q } else { b });
                let p = 1.0 / row.iter().map(|v| (v - row[am]).exp()).sum::<f64>();
                votes[am] += 1;
                if p > best_conf[am] {
                    best_conf[am] = p;
                }
            }
            let top = *votes.iter().max().unwrap();
            let want = (0..k).filter(|&q| votes[q] == top).fold(None, |b: Option<usize>, q| match b {
                Some(b) if best_conf[b] >= best_conf[q] => Some(b),
                _ => Some(q),
            });
            let srow = &scores[i * k..(i + 1) * k];
            let got = (0..k).fold(0, |b, q| if srow[q] > srow[b] { q } else { b });
            assert_eq!(Some(got), want, "sample {i}");
            let tie = votes.iter().filter(|&&v| v == top).count() > 1;
            for q in 0..k {
                let bonus = if tie && votes[q] == top { 0.5 * best_conf[q] } else { 0.0 };
                assert!((srow[q] - (votes[q] as f64 + bonus)).abs() < 1e-12, "score[{i}][{q}]");
            }
        }
    }

    #[test]
    fn ensemble_coefficients_sum_to_one() {
        for combine in [Combine::Paper, Combine::Plain] {
            let cfg = Config::new(3, combine, 1e-5).unwrap();
            assert!((cfg.ensemble_coeffs().iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let cfg = Config::new(3, Combine::Paper, 1e-5).unwrap();
        assert_eq!(cfg.ensemble_coeffs(), vec![1.5 / 7.0, 2.0 / 7.0, 2.0 / 7.0, 1.5 / 7.0]);
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        let case = Case::new(5, 2, Combine::Paper, dims(2, 4, 1, 3));
        let mut p = case.params();
        p.fc_bias = &case.fb[..2];
        let e = forward(&case.cfg, case.d, &case.x, &p, Outputs::Ensemble).unwrap_err();
        assert_eq!(e.arg, "fc_bias");
        let e = forward(&case.cfg, dims(3, 4, 1, 3), &case.x, &case.params(), Outputs::Ensemble).unwrap_err();
        assert_eq!(e.arg, "x");
        assert!(Config::new(0, Combine::Paper, 1e-5).is_err());
        assert!(Combine::parse("mean").is_err());

        let e = backward(&case.cfg, case.d, &[0.0; 6], &case.params(), &case.x, Outputs::All).unwrap_err();
        assert_eq!(e.arg, "grad_out");
    }

    #[test]
    fn f32_tracks_f64() {
        let case = Case::new(21, 3, Combine::Paper, dims(8, 2048, 1, 10));
        let o64 = forward(&case.cfg, case.d, &case.x, &case.params(), Outputs::Ensemble).unwrap();
        let c32 = |v: &Vec<f64>| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (x, lw, lb, fw, fb) = (c32(&case.x), c32(&case.lw), c32(&case.lb), c32(&case.fw), c32(&case.fb));
        let p = Params { ln_weight: &lw, ln_bias: &lb, fc_weight: &fw, fc_bias: &fb };
        let o32 = forward(&case.cfg, case.d, &x, &p, Outputs::Ensemble).unwrap();
        let scale = o64.iter().map(|v| v.abs()).fold(0.0, f64::max);
        for (a, b) in o32.iter().zip(&o64) {
            assert!((*a as f64 - b).abs() < 1e-4 * scale);
        }
    }
}
