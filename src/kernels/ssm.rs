//! SSM — Split-and-Share Module, a classifier head (`../shared/SPEC.md`, "SSM").
//!
//! Input `x` is the pooled feature `[N, C]` (row-major; a 4-D input is pooled by
//! the caller with [`super::pool::global_avg_pool`]). With `G = num_heads` and
//! `n = C / G`, head `h` (0-based, `h = 0..G`) reads the prefix
//! `p_h = x[:, :(h+1)·n]` in place (a strided view with leading dimension `C`) and
//!
//! ```text
//! a_h = ReLU(BN_h(p_h))   for a normalised head (h < G-1 always; h = G-1 too when
//!                         `norm_last_head`), else a_{G-1} = p_{G-1} = x (raw)
//! logits_h = a_h · W_hᵀ + b_h          W_h [K, (h+1)·n], b_h [K]
//! ensemble: out = (1/G) Σ_h logits_h   [N, K]
//! all:      out[h] = logits_h          [G, N, K]
//! ```
//!
//! `BN_h` is torch's `BatchNorm1d((h+1)·n)`: in training it normalises with the
//! batch mean and biased batch variance; in eval with the running statistics.
//! The kernel never writes running statistics: in training it returns the batch
//! mean and the unbiased batch variance, and the caller updates its buffers.
//!
//! # Layout of the statistics vectors
//! The normalised heads are always the first `H` heads (`H = G` with
//! `norm_last_head`, else `G - 1`). Their statistics are concatenated head after
//! head: head `h` occupies `stats_range(n, h) = n·h(h+1)/2 .. n·(h+1)(h+2)/2`,
//! `(h+1)·n` values; the total is [`stats_len`] `= n·H(H+1)/2`.
//! * [`Forward::mean`], [`Forward::invstd`]: what normalised each head, and what
//!   [`backward`] needs back ([`Saved`]). In training: the batch mean and
//!   `1/sqrt(biased_var + eps)`; in eval: `running_mean` and
//!   `1/sqrt(running_var + eps)` (constants for the backward).
//! * [`Forward::var_unbiased`]: training only (empty in eval), the unbiased batch
//!   variance for the running-variance update; the batch mean for the
//!   running-mean update is `Forward::mean`.
//!
//! In training every head's batch statistics are the leading columns of the same
//! per-column statistics of `x` (a column's mean and variance do not depend on the
//! prefix it is part of), so they are computed in one pass over the widest
//! normalised prefix and copied into each head's slot.
//!
//! # Products
//! Forward: the G head products accumulate into one output buffer (ensemble: one
//! `[N, K]` buffer with `alpha = 1/G`; all: each head its own `[N, K]` slice), with
//! `W_h` read in place and transposed by strides. Backward: two GEMMs per head,
//! `dW_h = alpha·g_hᵀ a_h` and `da_h = alpha·g_h W_h`, where `g_h` is `grad_out`
//! (`alpha = 1/G`, ensemble) or `grad_out[h]` (`alpha = 1`, all). `a_h` is
//! recomputed from `x` and the saved statistics rather than saved. Nothing
//! map-sized is added twice: the raw head's `da` accumulates straight into `grad_x`,
//! and a normalised head's `da` goes through its ReLU mask and batch norm in the
//! batch norm's two passes, which add the result into `grad_x`'s leading columns.

use std::ops::Range;

use super::batchnorm;
use super::gemm::{matmul, matmul_new, Mat};
use super::{check_len, checked_numel, column_totals, Error, Float, Result};

/// The parameters and running statistics of one head's `BatchNorm1d`, each
/// `[(h+1)·n]`.
#[derive(Clone, Copy, Debug)]
pub struct BnParams<'a, T> {
    pub weight: &'a [T],
    pub bias: &'a [T],
    /// Read by eval-mode [`forward`] only, never written; [`forward`] checks their
    /// lengths in both modes. [`backward`] ignores the running statistics (the saved
    /// ones replace them) and does not check them (they may be empty).
    pub running_mean: &'a [T],
    pub running_var: &'a [T],
}

/// One sub-classifier: `Linear((h+1)·n → K)` (torch layout: weight `[K, (h+1)·n]`,
/// bias `[K]`) and, for a normalised head, its batch norm (`None` for the raw head).
#[derive(Clone, Copy, Debug)]
pub struct Head<'a, T> {
    pub fc_weight: &'a [T],
    pub fc_bias: &'a [T],
    pub bn: Option<BnParams<'a, T>>,
}

/// Hyper-parameters and mode.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// G ≥ 1; must divide C.
    pub num_heads: usize,
    /// K ≥ 1.
    pub num_classes: usize,
    /// Apply BN + ReLU to the last head too (the paper's Algorithm 1).
    pub norm_last_head: bool,
    /// Batch-norm epsilon (torch default 1e-5); finite and ≥ 0.
    pub eps: f64,
    /// Batch statistics (train) or running statistics (eval).
    pub training: bool,
    /// `outputs="all"`: per-head logits `[G, N, K]` instead of their mean `[N, K]`.
    pub all_outputs: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_heads: 4,
            num_classes: 1000,
            norm_last_head: false,
            eps: 1e-5,
            training: true,
            all_outputs: false,
        }
    }
}

impl Config {
    /// Number of normalised heads `H` (they are the first `H` heads).
    pub fn normalised_heads(&self) -> usize {
        if self.norm_last_head {
            self.num_heads
        } else {
            self.num_heads.saturating_sub(1)
        }
    }

    /// Whether head `h` (0-based) has BN + ReLU.
    pub fn is_normalised(&self, h: usize) -> bool {
        h < self.normalised_heads()
    }

    /// The output shape for a batch of `n`: `[n, K]` or `[G, n, K]`.
    pub fn out_shape(&self, n: usize) -> Vec<usize> {
        if self.all_outputs {
            vec![self.num_heads, n, self.num_classes]
        } else {
            vec![n, self.num_classes]
        }
    }
}

/// Where head `h`'s statistics lie in the concatenated statistics vectors, with
/// `n = C / G` features per split.
pub fn stats_range(n: usize, h: usize) -> Range<usize> {
    n * (h * (h + 1) / 2)..n * ((h + 1) * (h + 2) / 2)
}

/// Length of the concatenated statistics vectors for `c` features
/// (`n·H(H+1)/2`; 0 when `num_heads` does not divide `c`).
pub fn stats_len(cfg: &Config, c: usize) -> usize {
    if cfg.num_heads == 0 || c % cfg.num_heads != 0 {
        return 0;
    }
    let hn = cfg.normalised_heads();
    (c / cfg.num_heads) * (hn * (hn + 1) / 2)
}

/// Result of [`forward`]. See the module documentation for the statistics layout.
#[derive(Clone, Debug)]
pub struct Forward<T> {
    /// `[N, K]` (ensemble) or `[G, N, K]` (all), row-major.
    pub out: Vec<T>,
    /// `[stats_len]`: per normalised head, the mean that normalised it (batch mean
    /// in training, running mean in eval).
    pub mean: Vec<T>,
    /// `[stats_len]`: per normalised head, `1/sqrt(var + eps)` (biased batch
    /// variance in training, running variance in eval).
    pub invstd: Vec<T>,
    /// `[stats_len]` in training, the unbiased batch variance; empty in eval.
    pub var_unbiased: Vec<T>,
}

impl<T> Forward<T> {
    /// The part of the result that [`backward`] needs back.
    pub fn saved(&self) -> Saved<'_, T> {
        Saved { mean: &self.mean, invstd: &self.invstd }
    }
}

/// What [`backward`] needs from [`forward`]: [`Forward::mean`] and
/// [`Forward::invstd`], each `[stats_len]`.
#[derive(Clone, Copy, Debug)]
pub struct Saved<'a, T> {
    pub mean: &'a [T],
    pub invstd: &'a [T],
}

/// Gradients of one head's parameters.
#[derive(Clone, Debug)]
pub struct HeadGrads<T> {
    /// `[K, (h+1)·n]`.
    pub fc_weight: Vec<T>,
    /// `[K]`.
    pub fc_bias: Vec<T>,
    /// `[(h+1)·n]` for a normalised head; empty for the raw head.
    pub bn_weight: Vec<T>,
    /// `[(h+1)·n]` for a normalised head; empty for the raw head.
    pub bn_bias: Vec<T>,
}

/// Result of [`backward`].
#[derive(Clone, Debug)]
pub struct Grads<T> {
    /// `[N, C]`: the sum of every head's prefix contribution.
    pub x: Vec<T>,
    /// One entry per head, in head order.
    pub heads: Vec<HeadGrads<T>>,
}

/// Sizes that passed validation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    n: usize,
    c: usize,
    g: usize,
    k: usize,
    /// Features per split, `C / G`.
    split: usize,
    /// Length of the concatenated statistics vectors.
    stats: usize,
}

impl Dims {
    /// Width of head `h`'s prefix.
    fn width(&self, h: usize) -> usize {
        (h + 1) * self.split
    }
}

pub(crate) fn validate<T>(
    cfg: &Config,
    x: &[T],
    n: usize,
    c: usize,
    heads: &[Head<T>],
    check_running: bool,
) -> Result<Dims> {
    let g = cfg.num_heads;
    let k = cfg.num_classes;
    if g == 0 {
        return Err(Error::value("num_heads", "at least 1", "0"));
    }
    if k == 0 {
        return Err(Error::value("num_classes", "at least 1", "0"));
    }
    if !cfg.eps.is_finite() || cfg.eps < 0.0 {
        return Err(Error::value("eps", "a finite value >= 0", format!("{}", cfg.eps)));
    }
    check_len("x", x, &[n, c])?;
    if c == 0 || c % g != 0 {
        return Err(Error::shape(
            "x",
            format!("a feature count C that num_heads = {g} divides (C >= {g})"),
            format!("C = {c}"),
        ));
    }
    let hn = cfg.normalised_heads();
    if cfg.training && hn > 0 && n < 2 {
        return Err(Error::value(
            "x",
            "more than 1 value per channel when training (batch size >= 2)",
            format!("batch size {n} (input shape [{n}, {c}])"),
        ));
    }
    if heads.len() != g {
        return Err(Error::shape(
            "heads",
            format!("{g} heads (num_heads)"),
            format!("{} heads", heads.len()),
        ));
    }
    let split = c / g;
    for (h, head) in heads.iter().enumerate() {
        let w = (h + 1) * split;
        check_len(&format!("heads[{h}].fc_weight"), head.fc_weight, &[k, w])?;
        check_len(&format!("heads[{h}].fc_bias"), head.fc_bias, &[k])?;
        match (&head.bn, cfg.is_normalised(h)) {
            (Some(bn), true) => {
                check_len(&format!("heads[{h}].bn.weight"), bn.weight, &[w])?;
                check_len(&format!("heads[{h}].bn.bias"), bn.bias, &[w])?;
                if check_running {
                    check_len(&format!("heads[{h}].bn.running_mean"), bn.running_mean, &[w])?;
                    check_len(&format!("heads[{h}].bn.running_var"), bn.running_var, &[w])?;
                }
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(Error::value(
                    format!("heads[{h}].bn"),
                    "no batch norm (the last head is raw unless norm_last_head)",
                    "batch-norm parameters",
                ))
            }
            (None, true) => {
                return Err(Error::value(
                    format!("heads[{h}].bn"),
                    "batch-norm parameters (the head is normalised)",
                    "none",
                ))
            }
        }
    }
    // The output (and the backward's [G, N, K] grad_out) must have a size that fits.
    checked_numel("out", &[g, n, k])?;
    let stats = split.checked_mul(hn * (hn + 1) / 2).ok_or_else(|| {
        Error::value("x", "a feature count whose statistics fit in memory", format!("C = {c}"))
    })?;
    Ok(Dims { n, c, g, k, split, stats })
}

/// ReLU that propagates NaN, as torch's does.
#[inline(always)]
fn relu<T: Float>(v: T) -> T {
    if v < T::zero() {
        T::zero()
    } else {
        v
    }
}

/// `a_h = ReLU(BN_h(x[:, :w]))`, contiguous `[N, w]`, from the head's slot of the
/// concatenated statistics.
fn activation<T: Float>(d: &Dims, x: &[T], h: usize, bn: &BnParams<T>, mean: &[T], invstd: &[T]) -> Vec<T> {
    let r = stats_range(d.split, h);
    batchnorm::normalize(x, d.n, d.width(h), d.c, &mean[r.clone()], &invstd[r], bn.weight, bn.bias, relu)
}

/// Per-column sums of a row-major `[rows, cols]` matrix, in f64, times `scale`.
fn column_sums<T: Float>(m: &[T], cols: usize, scale: f64) -> Vec<T> {
    column_totals(m, cols).into_iter().map(|s| T::of(s * scale)).collect()
}

/// The SSM forward. `x` is `[n, c]` row-major; `heads` has `cfg.num_heads` entries,
/// with `bn` set exactly on the normalised heads.
pub fn forward<T: Float>(cfg: &Config, x: &[T], n: usize, c: usize, heads: &[Head<T>]) -> Result<Forward<T>> {
    let d = validate(cfg, x, n, c, heads, true)?;
    let hn = cfg.normalised_heads();

    // Statistics of every normalised head, concatenated.
    let mut mean = Vec::with_capacity(d.stats);
    let mut invstd = Vec::with_capacity(d.stats);
    let mut var_unbiased = Vec::new();
    if hn > 0 {
        if cfg.training {
            // One pass over the widest normalised prefix serves every head.
            let s = batchnorm::batch_stats(x, d.n, d.width(hn - 1), d.c, cfg.eps);
            var_unbiased.reserve(d.stats);
            for h in 0..hn {
                let w = d.width(h);
                mean.extend_from_slice(&s.mean[..w]);
                invstd.extend_from_slice(&s.invstd[..w]);
                var_unbiased.extend_from_slice(&s.var_unbiased[..w]);
            }
        } else {
            for head in &heads[..hn] {
                let bn = head.bn.as_ref().expect("validated: normalised heads have bn");
                mean.extend_from_slice(bn.running_mean);
                invstd.extend(batchnorm::eval_invstd(bn.running_var, cfg.eps));
            }
        }
    }
    debug_assert_eq!(mean.len(), d.stats);

    let (nk, k) = (d.n * d.k, d.k);
    let mut out = vec![T::zero(); if cfg.all_outputs { d.g * nk } else { nk }];
    // Biases first, then every head's product accumulates onto them.
    let alpha = if cfg.all_outputs {
        for (h, head) in heads.iter().enumerate() {
            for row in out[h * nk..(h + 1) * nk].chunks_exact_mut(k) {
                row.copy_from_slice(head.fc_bias);
            }
        }
        T::one()
    } else {
        let inv_g = 1.0 / d.g as f64;
        let bias: Vec<T> = (0..k)
            .map(|j| T::of(heads.iter().map(|hd| hd.fc_bias[j].as_f64()).sum::<f64>() * inv_g))
            .collect();
        for row in out.chunks_exact_mut(k) {
            row.copy_from_slice(&bias);
        }
        T::of(inv_g)
    };
    for (h, head) in heads.iter().enumerate() {
        let w = d.width(h);
        let wt = Mat::new(head.fc_weight, k, w).t();
        let dst = if cfg.all_outputs { &mut out[h * nk..(h + 1) * nk] } else { &mut out[..] };
        match &head.bn {
            Some(bn) => {
                let a = activation(&d, x, h, bn, &mean, &invstd);
                matmul(dst, k, Mat::new(&a, d.n, w), wt, alpha, true);
            }
            None => matmul(dst, k, Mat::with_ld(x, d.n, w, d.c), wt, alpha, true),
        }
    }
    Ok(Forward { out, mean, invstd, var_unbiased })
}

/// The SSM backward: gradients of `sum(out ⊙ grad_out)` with respect to `x` and
/// every head's parameters. `grad_out` has the output's shape (`[n, K]` or
/// `[G, n, K]`), `cfg`, `x` and `heads` are the forward's, `saved` is
/// [`Forward::saved`]. In training the batch norms' backward goes through the batch
/// statistics; in eval the saved (running) statistics are constants.
pub fn backward<T: Float>(
    cfg: &Config,
    grad_out: &[T],
    x: &[T],
    n: usize,
    c: usize,
    heads: &[Head<T>],
    saved: &Saved<T>,
) -> Result<Grads<T>> {
    let d = validate(cfg, x, n, c, heads, false)?;
    check_len("grad_out", grad_out, &cfg.out_shape(n))?;
    check_len("saved.mean", saved.mean, &[d.stats])?;
    check_len("saved.invstd", saved.invstd, &[d.stats])?;

    let (nk, k) = (d.n * d.k, d.k);
    let alpha = if cfg.all_outputs { 1.0 } else { 1.0 / d.g as f64 };
    let g_of = |h: usize| if cfg.all_outputs { &grad_out[h * nk..(h + 1) * nk] } else { grad_out };
    // Ensemble mode: every head's bias gradient is the same column sum.
    let shared_db = (!cfg.all_outputs).then(|| column_sums(grad_out, k, alpha));

    let mut grad_x = vec![T::zero(); d.n * d.c];
    let mut grads = Vec::with_capacity(d.g);
    for (h, head) in heads.iter().enumerate() {
        let w = d.width(h);
        let g = Mat::new(g_of(h), d.n, k);
        let fc_bias = match &shared_db {
            Some(db) => db.clone(),
            None => column_sums(g_of(h), k, alpha),
        };
        let wmat = Mat::new(head.fc_weight, k, w);
        let Some(bn) = &head.bn else {
            // Raw head: a = x, and da = alpha·g·W lands directly in grad_x.
            let fc_weight = matmul_new(g.t(), Mat::with_ld(x, d.n, w, d.c), T::of(alpha));
            matmul(&mut grad_x, d.c, g, wmat, T::of(alpha), true);
            grads.push(HeadGrads { fc_weight, fc_bias, bn_weight: Vec::new(), bn_bias: Vec::new() });
            continue;
        };
        let a = activation(&d, x, h, bn, saved.mean, saved.invstd);
        let fc_weight = matmul_new(g.t(), Mat::new(&a, d.n, w), T::of(alpha));
        let da = matmul_new(g, wmat, T::of(alpha));
        // Through the ReLU and the batch norm, added into grad_x's leading w columns.
        let r = stats_range(d.split, h);
        let (bn_weight, bn_bias) = batchnorm::backward_into(
            &da,
            Some(&a),
            x,
            d.n,
            w,
            d.c,
            &saved.mean[r.clone()],
            &saved.invstd[r],
            bn.weight,
            cfg.training,
            &mut grad_x,
            d.c,
        );
        grads.push(HeadGrads { fc_weight, fc_bias, bn_weight, bn_bias });
    }
    Ok(Grads { x: grad_x, heads: grads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::error::ErrorKind;

    /// A small deterministic generator (xorshift64*), values in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (v >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
        fn vec(&mut self, len: usize, scale: f64, shift: f64) -> Vec<f64> {
            (0..len).map(|_| self.next() * scale + shift).collect()
        }
    }

    /// Owned parameters of one head, in f64.
    #[derive(Clone)]
    struct OwnedHead {
        w: Vec<f64>,
        b: Vec<f64>,
        bn: Option<[Vec<f64>; 4]>, // gamma, beta, running_mean, running_var
    }

    struct Case {
        cfg: Config,
        n: usize,
        c: usize,
        x: Vec<f64>,
        heads: Vec<OwnedHead>,
    }

    #[allow(clippy::too_many_arguments)]
    fn case(
        n: usize,
        c: usize,
        g: usize,
        k: usize,
        norm_last: bool,
        training: bool,
        all: bool,
        seed: u64,
    ) -> Case {
        let cfg = Config {
            num_heads: g,
            num_classes: k,
            norm_last_head: norm_last,
            eps: 1e-5,
            training,
            all_outputs: all,
        };
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let x = r.vec(n * c, 2.0, 0.3);
        let split = c / g;
        let heads = (0..g)
            .map(|h| {
                let w = (h + 1) * split;
                OwnedHead {
                    w: r.vec(k * w, 0.5, 0.0),
                    b: r.vec(k, 0.5, 0.0),
                    bn: cfg.is_normalised(h).then(|| {
                        [r.vec(w, 0.5, 1.0), r.vec(w, 0.5, 0.1), r.vec(w, 0.5, 0.2), r.vec(w, 0.4, 1.0)]
                    }),
                }
            })
            .collect();
        Case { cfg, n, c, x, heads }
    }

    /// One head's parameters as owned vectors: fc weight, fc bias, and
    /// [gamma, beta, running_mean, running_var].
    type HeadData<T> = (Vec<T>, Vec<T>, Option<[Vec<T>; 4]>);
    /// Per normalised head: (batch mean, unbiased batch variance).
    type HeadStats = Vec<(Vec<f64>, Vec<f64>)>;

    fn views<T>(owned: &[HeadData<T>]) -> Vec<Head<'_, T>> {
        owned
            .iter()
            .map(|(w, b, bn)| Head {
                fc_weight: w,
                fc_bias: b,
                bn: bn.as_ref().map(|[g, be, rm, rv]| BnParams {
                    weight: g,
                    bias: be,
                    running_mean: rm,
                    running_var: rv,
                }),
            })
            .collect()
    }

    fn convert<T: Float>(heads: &[OwnedHead]) -> Vec<HeadData<T>> {
        let cv = |v: &Vec<f64>| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        heads
            .iter()
            .map(|h| {
                (cv(&h.w), cv(&h.b), h.bn.as_ref().map(|bn| [cv(&bn[0]), cv(&bn[1]), cv(&bn[2]), cv(&bn[3])]))
            })
            .collect()
    }

    /// Naive reference: per-head logits `[G][N*K]`, plus per normalised head (batch
    /// mean, unbiased batch var) in training. Each head computes its own statistics.
    fn naive(cs: &Case, x: &[f64], heads: &[OwnedHead]) -> (Vec<Vec<f64>>, HeadStats) {
        let (n, c, cfg) = (cs.n, cs.c, &cs.cfg);
        let (g, k) = (cfg.num_heads, cfg.num_classes);
        let split = c / g;
        let mut logits = Vec::new();
        let mut stats = Vec::new();
        for (h, head) in heads.iter().enumerate() {
            let w = (h + 1) * split;
            let mut a = vec![0.0; n * w];
            for i in 0..n {
                for j in 0..w {
                    a[i * w + j] = x[i * c + j];
                }
            }
            if let Some([gamma, beta, rm, rv]) = &head.bn {
                let mut mu = vec![0.0; w];
                let mut var = vec![0.0; w];
                for j in 0..w {
                    if cfg.training {
                        let m = (0..n).map(|i| a[i * w + j]).sum::<f64>() / n as f64;
                        let ss = (0..n).map(|i| (a[i * w + j] - m).powi(2)).sum::<f64>();
                        mu[j] = m;
                        var[j] = ss / n as f64;
                        stats.push((j, m, ss / (n - 1) as f64));
                    } else {
                        mu[j] = rm[j];
                        var[j] = rv[j];
                    }
                }
                for i in 0..n {
                    for j in 0..w {
                        let y = (a[i * w + j] - mu[j]) / (var[j] + cfg.eps).sqrt() * gamma[j] + beta[j];
                        a[i * w + j] = y.max(0.0);
                    }
                }
            }
            let mut l = vec![0.0; n * k];
            for i in 0..n {
                for q in 0..k {
                    let mut s = head.b[q];
                    for j in 0..w {
                        s += a[i * w + j] * head.w[q * w + j];
                    }
                    l[i * k + q] = s;
                }
            }
            logits.push(l);
        }
        // Regroup the statistics per head.
        let mut per_head = Vec::new();
        let mut it = stats.into_iter();
        for h in 0..cfg.normalised_heads() {
            if !cfg.training {
                break;
            }
            let w = (h + 1) * split;
            let (m, v): (Vec<f64>, Vec<f64>) = it.by_ref().take(w).map(|(_, m, v)| (m, v)).unzip();
            per_head.push((m, v));
        }
        (logits, per_head)
    }

    /// The naive output in the kernel's layout.
    fn naive_out(cs: &Case, x: &[f64], heads: &[OwnedHead]) -> Vec<f64> {
        let (logits, _) = naive(cs, x, heads);
        if cs.cfg.all_outputs {
            logits.concat()
        } else {
            let g = logits.len() as f64;
            (0..logits[0].len()).map(|i| logits.iter().map(|l| l[i]).sum::<f64>() / g).collect()
        }
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
        }
    }

    fn check_forward(cs: &Case) {
        let owned = convert::<f64>(&cs.heads);
        let hv = views(&owned);
        let f = forward(&cs.cfg, &cs.x, cs.n, cs.c, &hv).unwrap();
        let tag = format!("{:?} n={} c={}", cs.cfg, cs.n, cs.c);
        assert_eq!(f.out.len(), cs.cfg.out_shape(cs.n).iter().product::<usize>(), "{tag}");
        assert_close(&format!("out {tag}"), &f.out, &naive_out(cs, &cs.x, &cs.heads), 1e-12);
        let len = stats_len(&cs.cfg, cs.c);
        assert_eq!(f.mean.len(), len);
        assert_eq!(f.invstd.len(), len);
        let split = cs.c / cs.cfg.num_heads;
        if cs.cfg.training {
            let (_, stats) = naive(cs, &cs.x, &cs.heads);
            assert_eq!(f.var_unbiased.len(), len);
            for (h, (m, v)) in stats.iter().enumerate() {
                let r = stats_range(split, h);
                assert_close("batch mean", &f.mean[r.clone()], m, 1e-12);
                assert_close("unbiased var", &f.var_unbiased[r.clone()], v, 1e-12);
                let biased: Vec<f64> =
                    v.iter().map(|v| 1.0 / (v * (cs.n - 1) as f64 / cs.n as f64 + 1e-5).sqrt()).collect();
                assert_close("invstd", &f.invstd[r], &biased, 1e-12);
            }
        } else {
            assert!(f.var_unbiased.is_empty());
            for h in 0..cs.cfg.normalised_heads() {
                let bn = cs.heads[h].bn.as_ref().unwrap();
                let r = stats_range(split, h);
                assert_eq!(&f.mean[r.clone()], &bn[2][..]);
                let inv: Vec<f64> = bn[3].iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
                assert_close("eval invstd", &f.invstd[r], &inv, 1e-15);
            }
        }
        // f32 tracks the f64 reference.
        let x32: Vec<f32> = cs.x.iter().map(|&v| v as f32).collect();
        let owned32 = convert::<f32>(&cs.heads);
        let f32r = forward(&cs.cfg, &x32, cs.n, cs.c, &views(&owned32)).unwrap();
        let got: Vec<f64> = f32r.out.iter().map(|&v| v as f64).collect();
        assert_close(&format!("f32 out {tag}"), &got, &f.out, 2e-4);
    }

    #[test]
    fn forward_matches_naive() {
        let mut seed = 1;
        for &(n, c, g, k) in &[
            (5, 12, 4, 3),
            (7, 9, 3, 5),
            (4, 6, 1, 2),
            (3, 10, 2, 1),
            (33, 52, 4, 17),
            (2, 4, 4, 3),
            (6, 20, 5, 7),
            (64, 256, 4, 40),
        ] {
            for training in [true, false] {
                for all in [false, true] {
                    for norm_last in [false, true] {
                        seed += 1;
                        check_forward(&case(n, c, g, k, norm_last, training, all, seed));
                    }
                }
            }
        }
    }

    #[test]
    fn single_sample_and_empty_batch_are_fine_without_training_batch_norm() {
        // G = 1, raw head: no batch norm at all, so N = 1 trains.
        check_forward(&case(1, 5, 1, 3, false, true, false, 7));
        // Eval accepts N = 1 and N = 0.
        check_forward(&case(1, 8, 4, 3, true, false, true, 8));
        let cs = case(0, 8, 4, 3, false, false, false, 9);
        let owned = convert::<f64>(&cs.heads);
        let f = forward(&cs.cfg, &cs.x, 0, 8, &views(&owned)).unwrap();
        assert!(f.out.is_empty());
        let b = backward(&cs.cfg, &[], &cs.x, 0, 8, &views(&owned), &f.saved()).unwrap();
        assert!(b.x.is_empty());
        assert!(b.heads[3].fc_weight.iter().all(|&v| v == 0.0));
    }

    /// `sum(out ⊙ r)` through the naive forward.
    fn loss(cs: &Case, x: &[f64], heads: &[OwnedHead], r: &[f64]) -> f64 {
        naive_out(cs, x, heads).iter().zip(r).map(|(a, b)| a * b).sum()
    }

    fn central<F: FnMut(f64) -> f64>(mut f: F) -> f64 {
        let h = 1e-6;
        (f(h) - f(-h)) / (2.0 * h)
    }

    fn check_backward(cs: &Case, seed: u64) {
        let owned = convert::<f64>(&cs.heads);
        let hv = views(&owned);
        let f = forward(&cs.cfg, &cs.x, cs.n, cs.c, &hv).unwrap();
        let r = Rng(seed).vec(f.out.len(), 1.0, 0.0);
        let gr = backward(&cs.cfg, &r, &cs.x, cs.n, cs.c, &hv, &f.saved()).unwrap();
        let tag = format!("{:?} n={} c={}", cs.cfg, cs.n, cs.c);
        let tol = 1e-6;
        let close = |what: String, got: f64, want: f64| {
            assert!((got - want).abs() <= tol * (1.0 + want.abs()), "{what} {tag}: got {got}, fd {want}");
        };
        for i in 0..cs.x.len() {
            let fd = central(|e| {
                let mut x = cs.x.clone();
                x[i] += e;
                loss(cs, &x, &cs.heads, &r)
            });
            close(format!("dx[{i}]"), gr.x[i], fd);
        }
        assert_eq!(gr.heads.len(), cs.heads.len());
        for (h, hg) in gr.heads.iter().enumerate() {
            let perturb = |which: usize, idx: usize| {
                central(|e| {
                    let mut heads = cs.heads.clone();
                    match which {
                        0 => heads[h].w[idx] += e,
                        1 => heads[h].b[idx] += e,
                        2 => heads[h].bn.as_mut().unwrap()[0][idx] += e,
                        _ => heads[h].bn.as_mut().unwrap()[1][idx] += e,
                    }
                    loss(cs, &cs.x, &heads, &r)
                })
            };
            assert_eq!(hg.fc_weight.len(), cs.heads[h].w.len());
            for i in 0..hg.fc_weight.len() {
                close(format!("heads[{h}].dW[{i}]"), hg.fc_weight[i], perturb(0, i));
            }
            for i in 0..hg.fc_bias.len() {
                close(format!("heads[{h}].db[{i}]"), hg.fc_bias[i], perturb(1, i));
            }
            if cs.heads[h].bn.is_some() {
                assert_eq!(hg.bn_weight.len(), (h + 1) * cs.c / cs.cfg.num_heads);
                for i in 0..hg.bn_weight.len() {
                    close(format!("heads[{h}].dgamma[{i}]"), hg.bn_weight[i], perturb(2, i));
                    close(format!("heads[{h}].dbeta[{i}]"), hg.bn_bias[i], perturb(3, i));
                }
            } else {
                assert!(hg.bn_weight.is_empty() && hg.bn_bias.is_empty());
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut seed = 100;
        for &(n, c, g, k) in &[(5, 12, 4, 3), (6, 9, 3, 4), (4, 6, 1, 2), (3, 10, 2, 1)] {
            for training in [true, false] {
                for all in [false, true] {
                    for norm_last in [false, true] {
                        seed += 1;
                        check_backward(&case(n, c, g, k, norm_last, training, all, seed), seed);
                    }
                }
            }
        }
    }

    /// At sizes where the GEMMs run in parallel: the directional derivative of the
    /// loss along a random direction of every input at once equals the gradients'
    /// inner product with that direction.
    #[test]
    fn backward_directional_derivative_at_larger_sizes() {
        let mut seed = 300;
        for training in [true, false] {
            for all in [false, true] {
                seed += 1;
                let cs = case(48, 320, 4, 48, false, training, all, seed);
                let owned = convert::<f64>(&cs.heads);
                let hv = views(&owned);
                let f = forward(&cs.cfg, &cs.x, cs.n, cs.c, &hv).unwrap();
                let mut rng = Rng(seed);
                let r = rng.vec(f.out.len(), 1.0, 0.0);
                let gr = backward(&cs.cfg, &r, &cs.x, cs.n, cs.c, &hv, &f.saved()).unwrap();
                let vx = rng.vec(cs.x.len(), 1.0, 0.0);
                let vh: Vec<OwnedHead> = cs
                    .heads
                    .iter()
                    .map(|h| OwnedHead {
                        w: rng.vec(h.w.len(), 1.0, 0.0),
                        b: rng.vec(h.b.len(), 1.0, 0.0),
                        bn: h.bn.as_ref().map(|bn| {
                            let z = vec![0.0; bn[0].len()];
                            [rng.vec(bn[0].len(), 1.0, 0.0), rng.vec(bn[0].len(), 1.0, 0.0), z.clone(), z]
                        }),
                    })
                    .collect();
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
                let mut want = dot(&gr.x, &vx);
                for (g, v) in gr.heads.iter().zip(&vh) {
                    want += dot(&g.fc_weight, &v.w) + dot(&g.fc_bias, &v.b);
                    if let Some(bn) = &v.bn {
                        want += dot(&g.bn_weight, &bn[0]) + dot(&g.bn_bias, &bn[1]);
                    }
                }
                let fd = central(|e| {
                    let x: Vec<f64> = cs.x.iter().zip(&vx).map(|(a, b)| a + e * b).collect();
                    let heads: Vec<OwnedHead> = cs
                        .heads
                        .iter()
                        .zip(&vh)
                        .map(|(h, v)| {
                            let add = |a: &[f64], b: &[f64]| {
                                a.iter().zip(b).map(|(p, q)| p + e * q).collect::<Vec<f64>>()
                            };
                            OwnedHead {
                                w: add(&h.w, &v.w),
                                b: add(&h.b, &v.b),
                                bn: h.bn.as_ref().map(|bn| {
                                    let d = v.bn.as_ref().unwrap();
                                    [add(&bn[0], &d[0]), add(&bn[1], &d[1]), bn[2].clone(), bn[3].clone()]
                                }),
                            }
                        })
                        .collect();
                    loss(&cs, &x, &heads, &r)
                });
                assert!(
                    (fd - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "training={training} all={all}: fd {fd} vs {want}"
                );
            }
        }
    }

    #[test]
    fn backward_f32_tracks_f64() {
        let cs = case(16, 24, 4, 5, false, true, false, 55);
        let owned = convert::<f64>(&cs.heads);
        let f = forward(&cs.cfg, &cs.x, cs.n, cs.c, &views(&owned)).unwrap();
        let r = Rng(3).vec(f.out.len(), 1.0, 0.0);
        let g64 = backward(&cs.cfg, &r, &cs.x, cs.n, cs.c, &views(&owned), &f.saved()).unwrap();
        let owned32 = convert::<f32>(&cs.heads);
        let x32: Vec<f32> = cs.x.iter().map(|&v| v as f32).collect();
        let r32: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        let f32r = forward(&cs.cfg, &x32, cs.n, cs.c, &views(&owned32)).unwrap();
        let g32 = backward(&cs.cfg, &r32, &x32, cs.n, cs.c, &views(&owned32), &f32r.saved()).unwrap();
        let up = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        assert_close("dx f32", &up(&g32.x), &g64.x, 1e-3);
        for (a, b) in g32.heads.iter().zip(&g64.heads) {
            assert_close("dW f32", &up(&a.fc_weight), &b.fc_weight, 1e-3);
            assert_close("db f32", &up(&a.fc_bias), &b.fc_bias, 1e-4);
            assert_close("dgamma f32", &up(&a.bn_weight), &b.bn_weight, 1e-3);
            assert_close("dbeta f32", &up(&a.bn_bias), &b.bn_bias, 1e-4);
        }
    }

    fn err_of<T>(r: Result<T>) -> (ErrorKind, String) {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => (e.kind, e.arg),
        }
    }

    #[test]
    fn bad_input_is_an_error_naming_the_argument() {
        let cs = case(4, 12, 4, 3, false, true, false, 77);
        let owned = convert::<f64>(&cs.heads);
        let hv = views(&owned);
        let fwd = |cfg: &Config, x: &[f64], n: usize, c: usize, heads: &[Head<f64>]| {
            err_of(forward(cfg, x, n, c, heads))
        };
        let shape = ErrorKind::Shape;
        let value = ErrorKind::Value;

        let mut cfg = cs.cfg;
        cfg.num_heads = 0;
        assert_eq!(fwd(&cfg, &cs.x, 4, 12, &hv), (value, "num_heads".into()));
        cfg = cs.cfg;
        cfg.num_classes = 0;
        assert_eq!(fwd(&cfg, &cs.x, 4, 12, &hv), (value, "num_classes".into()));
        for eps in [f64::NAN, f64::INFINITY, -1.0] {
            cfg = cs.cfg;
            cfg.eps = eps;
            assert_eq!(fwd(&cfg, &cs.x, 4, 12, &hv), (value, "eps".into()));
        }
        // x length, C not divisible by G, C = 0.
        assert_eq!(fwd(&cs.cfg, &cs.x[1..], 4, 12, &hv), (shape, "x".into()));
        assert_eq!(fwd(&cs.cfg, &cs.x[..40], 4, 10, &hv), (shape, "x".into()));
        assert_eq!(fwd(&cs.cfg, &[], 4, 0, &hv), (shape, "x".into()));
        // Overflowing sizes are errors, not panics.
        assert_eq!(fwd(&cs.cfg, &cs.x, usize::MAX, 12, &hv), (value, "x".into()));
        // Training with one sample and a normalised head.
        assert_eq!(fwd(&cs.cfg, &cs.x[..12], 1, 12, &hv), (value, "x".into()));
        // ... but in eval it is fine.
        cfg = cs.cfg;
        cfg.training = false;
        assert!(forward(&cfg, &cs.x[..12], 1, 12, &hv).is_ok());
        // Wrong number of heads.
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &hv[..3]), (shape, "heads".into()));
        // Wrong parameter sizes.
        let mut bad = hv.clone();
        bad[1].fc_weight = &owned[0].0;
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (shape, "heads[1].fc_weight".into()));
        let mut bad = hv.clone();
        bad[3].fc_bias = &owned[3].1[..2];
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (shape, "heads[3].fc_bias".into()));
        let mut bad = hv.clone();
        bad[2].bn.as_mut().unwrap().running_var = &owned[1].2.as_ref().unwrap()[3];
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (shape, "heads[2].bn.running_var".into()));
        let mut bad = hv.clone();
        bad[0].bn.as_mut().unwrap().weight = &[];
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (shape, "heads[0].bn.weight".into()));
        // Missing and extra batch norms.
        let mut bad = hv.clone();
        bad[1].bn = None;
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (value, "heads[1].bn".into()));
        let mut bad = hv.clone();
        bad[3].bn = bad[2].bn;
        assert_eq!(fwd(&cs.cfg, &cs.x, 4, 12, &bad), (value, "heads[3].bn".into()));
        cfg = cs.cfg;
        cfg.norm_last_head = true;
        assert_eq!(fwd(&cfg, &cs.x, 4, 12, &hv), (value, "heads[3].bn".into()));

        // Backward: grad_out and saved statistics.
        let f = forward(&cs.cfg, &cs.x, 4, 12, &hv).unwrap();
        let go = vec![0.0; 4 * 3];
        let bwd = |cfg: &Config, go: &[f64], saved: &Saved<f64>| {
            err_of(backward(cfg, go, &cs.x, 4, 12, &hv, saved))
        };
        assert!(backward(&cs.cfg, &go, &cs.x, 4, 12, &hv, &f.saved()).is_ok());
        assert_eq!(bwd(&cs.cfg, &go[1..], &f.saved()), (shape, "grad_out".into()));
        cfg = cs.cfg;
        cfg.all_outputs = true;
        assert_eq!(bwd(&cfg, &go, &f.saved()), (shape, "grad_out".into()));
        let short = Saved { mean: &f.mean[1..], invstd: &f.invstd };
        assert_eq!(bwd(&cs.cfg, &go, &short), (shape, "saved.mean".into()));
        let short = Saved { mean: &f.mean, invstd: &f.invstd[..3] };
        assert_eq!(bwd(&cs.cfg, &go, &short), (shape, "saved.invstd".into()));
        // Backward validates the heads as the forward does (running stats aside).
        let mut bad = hv.clone();
        bad[2].fc_weight = &[];
        assert_eq!(
            err_of(backward(&cs.cfg, &go, &cs.x, 4, 12, &bad, &f.saved())),
            (shape, "heads[2].fc_weight".into())
        );
        let mut no_running = hv.clone();
        for h in no_running.iter_mut() {
            if let Some(bn) = h.bn.as_mut() {
                bn.running_mean = &[];
                bn.running_var = &[];
            }
        }
        assert!(backward(&cs.cfg, &go, &cs.x, 4, 12, &no_running, &f.saved()).is_ok());
        assert_eq!(bwd(&cs.cfg, &go[..0], &f.saved()).1, "grad_out");
    }

    #[test]
    fn stats_layout() {
        let cfg = Config { num_heads: 4, norm_last_head: false, ..Config::default() };
        assert_eq!(stats_len(&cfg, 8), 2 + 4 + 6);
        assert_eq!(stats_range(2, 0), 0..2);
        assert_eq!(stats_range(2, 1), 2..6);
        assert_eq!(stats_range(2, 2), 6..12);
        let cfg = Config { num_heads: 1, norm_last_head: false, ..Config::default() };
        assert_eq!(stats_len(&cfg, 8), 0);
        let cfg = Config { num_heads: 1, norm_last_head: true, ..Config::default() };
        assert_eq!(stats_len(&cfg, 8), 8);
    }
}
