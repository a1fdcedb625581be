//! AB — Accuracy Booster block (../shared/SPEC.md, "AB"): channel recalibration.
//!
//! ```text
//! y = GAP(x)                       [N, C]
//! t = Conv1x1(y, groups = g)       weight [C, C/g]; g = C: AB, g = 1: AB-Plus
//! p = sigmoid(BN(t))               batch statistics in training, running in eval
//! out = p[:, :, None, None] · x
//! ```
//!
//! Memory-bound: the forward reads x twice (pooling, scaling) and writes `out` once;
//! the backward reads `grad_out` and x once (`dp = Σ_hw grad_out·x`, per plane) and
//! then writes `grad_x = p·grad_out + dy/HW` in a second pass. Everything else lives
//! on `[N, C]` and costs nothing next to those passes. Only the pooled `y` and the
//! normalisation statistics are kept between forward and backward; `t` and `p` are
//! recomputed from them.

use super::batchnorm;
use super::channels_last;
use super::gemm::{matmul, matmul_serial, Mat};
use super::par::SerialAware;
use super::pool::{global_avg_pool, plane_dots, plane_mean, scale_planes};
use super::{check_len, checked_numel, column_totals, output_buffer, stream, Error, Float, Result};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The hyper-parameters of one AB block.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub channels: usize,
    /// Convolution groups: `channels` for AB (depthwise), 1 for AB-Plus.
    pub groups: usize,
    pub eps: f64,
    pub training: bool,
    /// The maps are channels-last, `[N, H, W, C]` in memory (torch's `channels_last`),
    /// rather than `[N, C, H, W]`.
    pub channels_last: bool,
}

/// The parameters, read in place. `conv_weight` is torch's Conv2d weight
/// `[C, C/g, 1, 1]` flattened.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a, T> {
    pub conv_weight: &'a [T],
    pub conv_bias: Option<&'a [T]>,
    pub bn_weight: &'a [T],
    pub bn_bias: &'a [T],
}

/// The running statistics (read in eval; the caller updates them in training from
/// the batch statistics the forward returns).
#[derive(Debug, Clone, Copy)]
pub struct Running<'a, T> {
    pub mean: &'a [T],
    pub var: &'a [T],
}

/// The forward's results.
#[derive(Debug, Clone)]
pub struct Forward<T> {
    /// `[N, C, H, W]`.
    pub out: Vec<T>,
    /// `[N, C]`: the pooled input, kept for the backward.
    pub pooled: Vec<T>,
    /// `[C]`: the mean the normalisation used (the batch's in training, the running
    /// mean in eval), kept for the backward.
    pub mean: Vec<T>,
    /// `[C]`: `1/sqrt(var + eps)` the normalisation used, kept for the backward.
    pub invstd: Vec<T>,
    /// `[C]`: the batch's unbiased variance, for the running update (training only;
    /// empty in eval).
    pub var_unbiased: Vec<T>,
}

/// The backward's results.
#[derive(Debug, Clone)]
pub struct Grads<T> {
    pub x: Vec<T>,
    pub conv_weight: Vec<T>,
    /// Empty when the block has no convolution bias.
    pub conv_bias: Vec<T>,
    pub bn_weight: Vec<T>,
    pub bn_bias: Vec<T>,
}

pub(crate) fn validate<T>(cfg: &Config, x: &[T], n: usize, hw: usize, p: &Params<T>) -> Result<()> {
    let c = cfg.channels;
    if c == 0 {
        return Err(Error::value("channels", "an integer >= 1", "0"));
    }
    if cfg.groups == 0 || c % cfg.groups != 0 {
        return Err(Error::value("groups", format!("a divisor of channels = {c}"), cfg.groups.to_string()));
    }
    if !(cfg.eps.is_finite() && cfg.eps > 0.0) {
        return Err(Error::value("eps", "a finite number > 0", cfg.eps.to_string()));
    }
    if hw == 0 {
        return Err(Error::shape("x", "a non-empty spatial plane", "H*W = 0"));
    }
    if cfg.training && n < 2 {
        return Err(Error::shape(
            "x",
            "more than 1 sample in training (batch statistics need two)",
            format!("a batch of {n}"),
        ));
    }
    check_len("x", x, &[n, c, hw])?;
    check_len("conv_weight", p.conv_weight, &[c, c / cfg.groups])?;
    if let Some(b) = p.conv_bias {
        check_len("conv_bias", b, &[c])?;
    }
    check_len("bn_weight", p.bn_weight, &[c])?;
    check_len("bn_bias", p.bn_bias, &[c])?;
    checked_numel("x", &[n, c, hw])?;
    Ok(())
}

/// `t = Conv1x1(y, groups) + bias`, `[N, C]`; `in_task`: called inside a parallel
/// task, so its products run on the calling thread alone.
fn conv<T: Float>(cfg: &Config, y: &[T], n: usize, p: &Params<T>, in_task: bool) -> Vec<T> {
    let (c, g) = (cfg.channels, cfg.groups);
    let cg = c / g;
    let mut t = vec![T::zero(); n * c];
    if n == 0 {
        return t;
    }
    if let Some(b) = p.conv_bias {
        for row in t.chunks_mut(c) {
            row.copy_from_slice(b);
        }
    }
    if g == c {
        for (trow, yrow) in t.chunks_mut(c).zip(y.chunks(c)) {
            for ((tv, &yv), &w) in trow.iter_mut().zip(yrow).zip(p.conv_weight) {
                *tv += w * yv;
            }
        }
    } else {
        for gi in 0..g {
            let yg = Mat::with_ld(&y[gi * cg..], n, cg, c);
            let wg = Mat::new(&p.conv_weight[gi * cg * cg..(gi + 1) * cg * cg], cg, cg);
            let product = if in_task { matmul_serial } else { matmul };
            product(&mut t[gi * cg..], c, yg, wg.t(), T::one(), true);
        }
    }
    t
}

/// The gate's activation in training, applied to the batch's `[N, C]` at once: the
/// loop vectorises ([`Float::exp_lanes`]).
#[inline(always)]
fn sigmoid<T: Float>(v: T) -> T {
    T::one() / (T::one() + (-v).exp_lanes())
}

/// The gate's activation in eval, with libm's `exp`: [`forward_eval_per_sample`] gates
/// one plane at a time between pooling it and scaling it, where a call's latency
/// counts, and there libm's (FMA, table-driven) measured 8–14% faster than
/// [`sigmoid`] (32×2048×7×7 and ×14×14, maps from memory, alternating calls), also
/// faster than gating 16 planes at a time with [`sigmoid`] vectorised. Every eval
/// path uses it, so that an eval gate is the same whichever path computed it.
fn sigmoid_eval<T: Float>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
}

/// `p = sigmoid(BN(t))` for `t` `[n, C]`: with [`sigmoid`] in training, with
/// [`sigmoid_eval`] in eval (each inlined, so that the training loop vectorises).
fn gates<T: Float>(
    training: bool,
    t: &[T],
    n: usize,
    c: usize,
    mean: &[T],
    invstd: &[T],
    p: &Params<T>,
) -> Vec<T> {
    let (gamma, beta) = (p.bn_weight, p.bn_bias);
    if training {
        batchnorm::normalize(t, n, c, c, mean, invstd, gamma, beta, sigmoid)
    } else {
        batchnorm::normalize(t, n, c, c, mean, invstd, gamma, beta, sigmoid_eval)
    }
}

/// The forward. `x` is `[n, C, hw]`.
pub fn forward<T: Float>(
    cfg: &Config,
    x: &[T],
    n: usize,
    hw: usize,
    p: &Params<T>,
    running: Running<T>,
) -> Result<Forward<T>> {
    validate(cfg, x, n, hw, p)?;
    let c = cfg.channels;
    check_len("running_mean", running.mean, &[c])?;
    check_len("running_var", running.var, &[c])?;
    if !cfg.training && n >= rayon::current_num_threads() {
        let (mean, invstd) = (running.mean.to_vec(), batchnorm::eval_invstd(running.var, cfg.eps));
        let (out, pooled) = forward_eval_per_sample(cfg, x, n, hw, p, (&mean, &invstd));
        return Ok(Forward { out, pooled, mean, invstd, var_unbiased: Vec::new() });
    }
    let pooled = if cfg.channels_last { channels_last::pool(x, n, hw, c) } else { global_avg_pool(x, hw) };
    let t = conv(cfg, &pooled, n, p, false);
    let (mean, invstd, var_unbiased) = if cfg.training {
        let s = batchnorm::batch_stats(&t, n, c, c, cfg.eps);
        (s.mean, s.invstd, s.var_unbiased)
    } else {
        (running.mean.to_vec(), batchnorm::eval_invstd(running.var, cfg.eps), Vec::new())
    };
    let gate = gates(cfg.training, &t, n, c, &mean, &invstd, p);
    let out = if cfg.channels_last {
        channels_last::scale(x, &gate, None, n, hw, c)
    } else {
        scale_planes(x, &gate, None, hw)
    };
    Ok(Forward { out, pooled, mean, invstd, var_unbiased })
}

/// The eval forward in one pass over memory: with running statistics a sample's gate
/// depends on that sample alone, so each task pools one sample's planes and scales
/// them while they are still in cache (for a 2048×7×7 sample, 400 KB: in L2), where
/// the two-pass forward reads the whole map twice. With one channel per group (AB's
/// default) a plane's gate depends on that plane alone, so each plane is pooled,
/// gated and scaled in turn while it is in L1. Used when there are at least as many
/// samples as threads; the results are those of the two-pass forward.
/// Returns `(out, pooled)`; `mean` and `invstd` are the running statistics'.
fn forward_eval_per_sample<T: Float>(
    cfg: &Config,
    x: &[T],
    n: usize,
    hw: usize,
    p: &Params<T>,
    (mean, invstd): (&[T], &[T]),
) -> (Vec<T>, Vec<T>) {
    let c = cfg.channels;
    let mut pooled = vec![T::zero(); n * c];
    let mut out = output_buffer::<T>(n * c * hw);
    let sample = c * hw;
    // `normalize`'s affine form of the batch norm, for the per-plane path.
    let scale: Vec<T> = invstd.iter().zip(p.bn_weight).map(|(&s, &g)| s * g).collect();
    let shift: Vec<T> = (0..c).map(|j| p.bn_bias[j] - mean[j] * scale[j]).collect();
    let streaming = stream::worth_it::<T>(x.len(), if cfg.channels_last { c } else { hw });
    out.spare_capacity_mut()[..n * sample]
        .par_chunks_mut(sample)
        .zip(pooled.par_chunks_mut(c))
        .zip(x.par_chunks(sample))
        .serial_aware()
        .for_each(|((o, y), xs)| {
            if cfg.channels_last {
                // The sample is an HW × C matrix: its channel means, the gate, then
                // every row scaled by the gate.
                channels_last::sample_means_into(xs, hw, y);
                let t = conv(cfg, y, 1, p, true);
                let gate = gates(false, &t, 1, c, mean, invstd, p);
                channels_last::scale_rows_into(o, xs, &gate, None, streaming);
                if streaming {
                    stream::fence();
                }
                return;
            }
            let scale_plane = |op: &mut [MaybeUninit<T>], sp: &[T], g: T| {
                if streaming {
                    stream::fill(op, |at, vals| {
                        for (d, &v) in vals.iter_mut().zip(&sp[at..]) {
                            *d = g * v;
                        }
                    });
                    return;
                }
                for (d, &v) in op.iter_mut().zip(sp) {
                    d.write(g * v);
                }
            };
            let planes = o.chunks_exact_mut(hw).zip(xs.chunks_exact(hw));
            if cfg.groups == c {
                // `conv` then `normalize`, one channel at a time, in their order of operations.
                for (j, (op, sp)) in planes.enumerate() {
                    y[j] = plane_mean(sp);
                    let t = p.conv_bias.map_or(T::zero(), |b| b[j]) + p.conv_weight[j] * y[j];
                    scale_plane(op, sp, sigmoid_eval(t * scale[j] + shift[j]));
                }
            } else {
                for (d, plane) in y.iter_mut().zip(xs.chunks_exact(hw)) {
                    *d = plane_mean(plane);
                }
                let t = conv(cfg, y, 1, p, true);
                let gate = gates(false, &t, 1, c, mean, invstd, p);
                for ((op, sp), &g) in planes.zip(&gate) {
                    scale_plane(op, sp, g);
                }
            }
            if streaming {
                stream::fence();
            }
        });
    // SAFETY: the chunks cover all `n * c * hw` elements and every one was written.
    unsafe { out.set_len(n * sample) };
    (out, pooled)
}

/// The backward, from `grad_out` and `x` (`[n, C, hw]` each) and what the forward kept.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    cfg: &Config,
    grad_out: &[T],
    x: &[T],
    n: usize,
    hw: usize,
    p: &Params<T>,
    pooled: &[T],
    mean: &[T],
    invstd: &[T],
) -> Result<Grads<T>> {
    validate(cfg, x, n, hw, p)?;
    let (c, g) = (cfg.channels, cfg.groups);
    let cg = c / g;
    check_len("grad_out", grad_out, &[n, c, hw])?;
    check_len("pooled", pooled, &[n, c])?;
    check_len("mean", mean, &[c])?;
    check_len("invstd", invstd, &[c])?;

    let t = conv(cfg, pooled, n, p, false);
    let gate = gates(cfg.training, &t, n, c, mean, invstd, p);
    // Pass 1 over the maps: the gradient of each gate value.
    let dgate = if cfg.channels_last {
        channels_last::dots(grad_out, x, n, hw, c)
    } else {
        plane_dots(grad_out, x, hw)
    };
    let dz: Vec<T> = dgate.iter().zip(&gate).map(|(&d, &s)| T::of(d) * s * (T::one() - s)).collect();
    let bn = batchnorm::backward(&dz, &t, n, c, c, mean, invstd, p.bn_weight, cfg.training);
    let dt = bn.dx;

    let mut conv_weight = vec![T::zero(); c * cg];
    let mut dy = vec![T::zero(); n * c];
    if g == c {
        let mut acc = vec![0.0f64; c];
        for ((drow, yrow), dyrow) in dt.chunks(c).zip(pooled.chunks(c)).zip(dy.chunks_mut(c)) {
            for o in 0..c {
                acc[o] += (drow[o] * yrow[o]).as_f64();
                dyrow[o] = drow[o] * p.conv_weight[o];
            }
        }
        conv_weight = acc.into_iter().map(T::of).collect();
    } else if n > 0 {
        for gi in 0..g {
            let dtg = Mat::with_ld(&dt[gi * cg..], n, cg, c);
            let yg = Mat::with_ld(&pooled[gi * cg..], n, cg, c);
            let wg = Mat::new(&p.conv_weight[gi * cg * cg..(gi + 1) * cg * cg], cg, cg);
            matmul(&mut conv_weight[gi * cg * cg..(gi + 1) * cg * cg], cg, dtg.t(), yg, T::one(), false);
            matmul(&mut dy[gi * cg..], c, dtg, wg, T::one(), false);
        }
    }
    let conv_bias = match p.conv_bias {
        Some(_) => column_totals(&dt, c).into_iter().map(T::of).collect(),
        None => Vec::new(),
    };
    // Pass 2: grad_x = gate · grad_out + dy / HW.
    let inv_hw = T::of(1.0 / hw as f64);
    let shift: Vec<T> = dy.iter().map(|&v| v * inv_hw).collect();
    let x_grad = if cfg.channels_last {
        channels_last::scale(grad_out, &gate, Some(&shift), n, hw, c)
    } else {
        scale_planes(grad_out, &gate, Some(&shift), hw)
    };
    Ok(Grads { x: x_grad, conv_weight, conv_bias, bn_weight: bn.dgamma, bn_bias: bn.dbeta })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn vec(&mut self, len: usize, scale: f64, offset: f64) -> Vec<f64> {
            (0..len)
                .map(|_| {
                    self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale + offset
                })
                .collect()
        }
    }

    struct Case {
        cfg: Config,
        n: usize,
        hw: usize,
        x: Vec<f64>,
        w: Vec<f64>,
        b: Option<Vec<f64>>,
        gamma: Vec<f64>,
        beta: Vec<f64>,
        rm: Vec<f64>,
        rv: Vec<f64>,
    }

    impl Case {
        fn new(seed: u64, n: usize, c: usize, hw: usize, groups: usize, bias: bool, training: bool) -> Self {
            let mut r = Lcg(seed);
            Case {
                cfg: Config { channels: c, groups, eps: 1e-5, training, channels_last: false },
                n,
                hw,
                x: r.vec(n * c * hw, 1.0, 0.2),
                w: r.vec(c * c / groups, 1.0, 0.0),
                b: bias.then(|| r.vec(c, 0.5, 0.0)),
                gamma: r.vec(c, 0.5, 1.0),
                beta: r.vec(c, 0.5, 0.0),
                rm: r.vec(c, 0.3, 0.0),
                rv: r.vec(c, 0.4, 1.0),
            }
        }
        fn params(&self) -> Params<'_, f64> {
            Params {
                conv_weight: &self.w,
                conv_bias: self.b.as_deref(),
                bn_weight: &self.gamma,
                bn_bias: &self.beta,
            }
        }
        fn running(&self) -> Running<'_, f64> {
            Running { mean: &self.rm, var: &self.rv }
        }
        /// The block the slow, obvious way.
        fn naive(&self) -> Vec<f64> {
            let (n, c, hw, g) = (self.n, self.cfg.channels, self.hw, self.cfg.groups);
            let cg = c / g;
            let y: Vec<f64> =
                (0..n * c).map(|q| self.x[q * hw..(q + 1) * hw].iter().sum::<f64>() / hw as f64).collect();
            let mut t = vec![0.0; n * c];
            for i in 0..n {
                for o in 0..c {
                    let gi = o / cg;
                    let mut s = self.b.as_ref().map_or(0.0, |b| b[o]);
                    for j in 0..cg {
                        s += self.w[o * cg + j] * y[i * c + gi * cg + j];
                    }
                    t[i * c + o] = s;
                }
            }
            let mut out = vec![0.0; n * c * hw];
            for o in 0..c {
                let (m, v) = if self.cfg.training {
                    let m = (0..n).map(|i| t[i * c + o]).sum::<f64>() / n as f64;
                    (m, (0..n).map(|i| (t[i * c + o] - m).powi(2)).sum::<f64>() / n as f64)
                } else {
                    (self.rm[o], self.rv[o])
                };
                for i in 0..n {
                    let z = (t[i * c + o] - m) / (v + 1e-5).sqrt() * self.gamma[o] + self.beta[o];
                    let s = 1.0 / (1.0 + (-z).exp());
                    for q in 0..hw {
                        out[(i * c + o) * hw + q] = s * self.x[(i * c + o) * hw + q];
                    }
                }
            }
            out
        }
        fn loss(&self, w: &[f64]) -> f64 {
            let f = forward(&self.cfg, &self.x, self.n, self.hw, &self.params(), self.running()).unwrap();
            f.out.iter().zip(w).map(|(a, b)| a * b).sum()
        }
    }

    #[test]
    fn forward_matches_naive() {
        for (seed, n, c, hw, g, bias, training) in [
            (1, 4, 6, 5, 6, false, true),
            (2, 3, 6, 4, 1, true, true),
            (3, 5, 8, 1, 2, true, false),
            (4, 2, 12, 9, 3, false, false),
        ] {
            let case = Case::new(seed, n, c, hw, g, bias, training);
            let f = forward(&case.cfg, &case.x, n, hw, &case.params(), case.running()).unwrap();
            for (a, b) in f.out.iter().zip(case.naive()) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            assert_eq!(f.var_unbiased.len(), if training { c } else { 0 });
        }
    }

    #[test]
    fn eval_paths_agree() {
        // The per-sample eval forward (at least as many samples as threads) and the
        // two-pass one (fewer), against each other and the definition.
        for (seed, n, c, hw, g, bias) in [
            (11, 4, 6, 5, 6, true),
            (14, 3, 16, 49, 16, false),
            (12, 3, 8, 7, 1, false),
            (13, 5, 12, 1, 3, true),
        ] {
            let case = Case::new(seed, n, c, hw, g, bias, false);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| forward(&case.cfg, &case.x, n, hw, &case.params(), case.running()).unwrap())
            };
            let (per_sample, two_pass) = (run(1), run(n + 1));
            for (a, b) in per_sample.out.iter().zip(&two_pass.out) {
                assert!((a - b).abs() < 1e-14, "{a} vs {b}");
            }
            assert_eq!(per_sample.pooled, two_pass.pooled);
            assert_eq!((&per_sample.mean, &per_sample.invstd), (&two_pass.mean, &two_pass.invstd));
            for (a, b) in per_sample.out.iter().zip(case.naive()) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn channels_last_maps_give_the_channels_first_results() {
        // Training and both eval forwards (1 thread: per sample; n + 1: two passes),
        // depthwise, grouped and AB-Plus, forward and backward, streamed or not.
        for (seed, n, c, hw, g) in
            [(31, 3, 4, 70, 4), (32, 2, 6, 9, 2), (33, 4, 16, 49, 1), (34, 2, 3, 600, 3)]
        {
            for training in [true, false] {
                let case = Case::new(seed, n, c, hw, g, seed % 2 == 0, training);
                let go: Vec<f64> = Lcg(seed + 100).vec(n * c * hw, 1.0, 0.0);
                let last = Config { channels_last: true, ..case.cfg };
                let (xl, gl) =
                    (channels_last::to_nhwc(&case.x, n, c, hw), channels_last::to_nhwc(&go, n, c, hw));
                for (threads, streaming) in [(1, false), (n + 1, false), (1, true), (n + 1, true)] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let run = |cfg: &Config, x: &[f64], go: &[f64]| {
                        pool.install(|| {
                            stream::forced(streaming, || {
                                let p = case.params();
                                let f = forward(cfg, x, n, hw, &p, case.running()).unwrap();
                                let gr =
                                    backward(cfg, go, x, n, hw, &p, &f.pooled, &f.mean, &f.invstd).unwrap();
                                (f, gr)
                            })
                        })
                    };
                    let (f0, g0) = run(&case.cfg, &case.x, &go);
                    let (f1, g1) = run(&last, &xl, &gl);
                    let what = format!("seed {seed}, training {training}, threads {threads}");
                    let close = |a: &[f64], b: &[f64], name: &str| {
                        assert_eq!(a.len(), b.len(), "{name}, {what}");
                        for (p, q) in a.iter().zip(b) {
                            assert!((p - q).abs() < 1e-12, "{name}: {p} vs {q}, {what}");
                        }
                    };
                    close(&f1.out, &channels_last::to_nhwc(&f0.out, n, c, hw), "out");
                    close(&f1.pooled, &f0.pooled, "pooled");
                    close(&f1.mean, &f0.mean, "mean");
                    close(&f1.invstd, &f0.invstd, "invstd");
                    close(&f1.var_unbiased, &f0.var_unbiased, "var_unbiased");
                    close(&g1.x, &channels_last::to_nhwc(&g0.x, n, c, hw), "grad x");
                    close(&g1.conv_weight, &g0.conv_weight, "grad conv_weight");
                    close(&g1.conv_bias, &g0.conv_bias, "grad conv_bias");
                    close(&g1.bn_weight, &g0.bn_weight, "grad bn_weight");
                    close(&g1.bn_bias, &g0.bn_bias, "grad bn_bias");
                }
            }
        }
    }

    #[test]
    fn streamed_outputs_equal_plain_ones() {
        // Training (forward and backward) and both eval forwards, depthwise and
        // grouped, with planes around the streaming block.
        for (seed, n, c, hw, g) in [(21, 3, 4, 70, 4), (22, 2, 6, 64, 2), (23, 4, 3, 9, 1)] {
            for training in [true, false] {
                let case = Case::new(seed, n, c, hw, g, true, training);
                let go: Vec<f64> = Lcg(seed + 100).vec(n * c * hw, 1.0, 0.0);
                for threads in [1, n + 1] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let run = |streaming: bool| {
                        pool.install(|| {
                            stream::forced(streaming, || {
                                let (cfg, p) = (&case.cfg, case.params());
                                let f = forward(cfg, &case.x, n, hw, &p, case.running()).unwrap();
                                let gr =
                                    backward(cfg, &go, &case.x, n, hw, &p, &f.pooled, &f.mean, &f.invstd)
                                        .unwrap();
                                (f.out, gr.x)
                            })
                        })
                    };
                    assert_eq!(run(true), run(false), "seed {seed}, training {training}, threads {threads}");
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (seed, g, bias, training) in [
            (5, 6, true, true),
            (6, 1, false, true),
            (7, 3, true, false),
            (8, 6, false, false),
            (9, 2, true, true),
        ] {
            let (n, c, hw) = (4, 6, 3);
            let mut case = Case::new(seed, n, c, hw, g, bias, training);
            let wts = Lcg(77).vec(n * c * hw, 1.0, 0.0);
            let f = forward(&case.cfg, &case.x, n, hw, &case.params(), case.running()).unwrap();
            let gr = backward(&case.cfg, &wts, &case.x, n, hw, &case.params(), &f.pooled, &f.mean, &f.invstd)
                .unwrap();
            let h = 1e-6;
            macro_rules! check {
                ($slot:expr, $grad:expr, $name:literal) => {
                    for q in 0..$grad.len() {
                        let v0 = $slot(&mut case)[q];
                        $slot(&mut case)[q] = v0 + h;
                        let up = case.loss(&wts);
                        $slot(&mut case)[q] = v0 - h;
                        let down = case.loss(&wts);
                        $slot(&mut case)[q] = v0;
                        let fd = (up - down) / (2.0 * h);
                        assert!(
                            (fd - $grad[q]).abs() < 1e-6 * (1.0 + fd.abs()),
                            "{} [{q}]: {fd} vs {}",
                            $name,
                            $grad[q]
                        );
                    }
                };
            }
            fn xs(c: &mut Case) -> &mut Vec<f64> {
                &mut c.x
            }
            fn ws(c: &mut Case) -> &mut Vec<f64> {
                &mut c.w
            }
            fn gammas(c: &mut Case) -> &mut Vec<f64> {
                &mut c.gamma
            }
            fn betas(c: &mut Case) -> &mut Vec<f64> {
                &mut c.beta
            }
            fn biases(c: &mut Case) -> &mut Vec<f64> {
                c.b.as_mut().unwrap()
            }
            check!(xs, gr.x, "x");
            check!(ws, gr.conv_weight, "conv_weight");
            check!(gammas, gr.bn_weight, "bn_weight");
            check!(betas, gr.bn_bias, "bn_bias");
            if bias {
                check!(biases, gr.conv_bias, "conv_bias");
            } else {
                assert!(gr.conv_bias.is_empty());
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let case = Case::new(1, 4, 6, 2, 6, false, true);
        let mut cfg = case.cfg;
        cfg.groups = 4;
        assert_eq!(forward(&cfg, &case.x, 4, 2, &case.params(), case.running()).unwrap_err().arg, "groups");
        assert_eq!(forward(&case.cfg, &case.x, 1, 2, &case.params(), case.running()).unwrap_err().arg, "x");
        assert_eq!(
            forward(&case.cfg, &case.x[..10], 4, 2, &case.params(), case.running()).unwrap_err().arg,
            "x"
        );
        let short = Running { mean: &case.rm, var: &case.rv[..3] };
        assert_eq!(forward(&case.cfg, &case.x, 4, 2, &case.params(), short).unwrap_err().arg, "running_var");
        let f = forward(&case.cfg, &case.x, 4, 2, &case.params(), case.running()).unwrap();
        let e =
            backward(&case.cfg, &case.x[1..], &case.x, 4, 2, &case.params(), &f.pooled, &f.mean, &f.invstd);
        assert_eq!(e.unwrap_err().arg, "grad_out");
        let single = Case::new(1, 1, 6, 2, 6, false, false);
        assert!(forward(&single.cfg, &single.x, 1, 2, &single.params(), single.running()).is_ok());
        // An empty batch in eval (found by the fuzzer: the grouped conv sliced past it).
        for g in [1, 2, 6] {
            let mut empty = Case::new(1, 0, 6, 2, g, true, false);
            empty.cfg.groups = g;
            let f = forward(&empty.cfg, &[], 0, 2, &empty.params(), empty.running()).unwrap();
            assert!(f.out.is_empty());
            let gr =
                backward(&empty.cfg, &[], &[], 0, 2, &empty.params(), &f.pooled, &f.mean, &f.invstd).unwrap();
            assert!(gr.x.is_empty() && gr.conv_weight.iter().all(|&v| v == 0.0));
        }
    }
}
