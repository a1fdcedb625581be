//! FFC in candle ops (the rayon twin: `kernels/ffc.rs`).
//!
//! The filter chain `f_l = ReLU(LN_l(f_{l-1}))` runs on the pooled `[N, C]`
//! features. The classifier's linearity is used as in the rayon kernel: training
//! (`Ensemble`) is one product of `h = Σ_l a_l f_l`; `All` and voting are one product
//! per level, never one per output. The backward is autograd over that forward from
//! the pooled features (the chain is recomputed, as in the rayon kernel).

use super::{err, gap, host, linear, tensor, vjp, CResult, Device, Tensor};
use crate::kernels::ffc::{self as rayon_ffc, Config, Dims, Outputs};
use crate::kernels::{Float, Result};

/// `ln_weight`/`ln_bias` `[L, C]` (the L LayerNorms stacked), `fc_weight` `[K, C]`,
/// `fc_bias` `[K]`.
pub struct Params {
    pub ln_weight: Tensor,
    pub ln_bias: Tensor,
    pub fc_weight: Tensor,
    pub fc_bias: Tensor,
}

pub struct Grads {
    /// `[N, C]`: the gradient of the pooled features.
    pub x: Tensor,
    pub ln_weight: Tensor,
    pub ln_bias: Tensor,
    pub fc_weight: Tensor,
    pub fc_bias: Tensor,
}

/// f0..fL from `f0` `[N, C]`; `p` is `[ln_weight, ln_bias, …]`.
fn levels(cfg: &Config, f0: &Tensor, p: &[Tensor]) -> CResult<Vec<Tensor>> {
    let mut feats = vec![f0.clone()];
    for l in 0..cfg.num_filters {
        let prev = &feats[l];
        let centred = prev.broadcast_sub(&prev.mean_keepdim(1)?)?;
        let invstd = (centred.sqr()?.mean_keepdim(1)? + cfg.eps)?.sqrt()?.recip()?;
        let y = centred.broadcast_mul(&invstd)?.broadcast_mul(&p[0].get(l)?)?.broadcast_add(&p[1].get(l)?)?;
        feats.push(y.relu()?);
    }
    Ok(feats)
}

/// `Σ_l w_l t_l`.
fn combine(terms: &[(usize, f64)], ts: &[Tensor]) -> CResult<Tensor> {
    let mut acc = ts[terms[0].0].affine(terms[0].1, 0.0)?;
    for &(l, w) in &terms[1..] {
        acc = (acc + ts[l].affine(w, 0.0)?)?;
    }
    Ok(acc)
}

/// The logits of `f0` with `p = [ln_weight, ln_bias, fc_weight, fc_bias]`: `[N, K]`
/// or `[J, N, K]`.
fn logits(cfg: &Config, f0: &Tensor, p: &[Tensor], outputs: Outputs) -> CResult<Tensor> {
    let feats = levels(cfg, f0, p)?;
    match outputs {
        Outputs::Ensemble => {
            let a: Vec<(usize, f64)> = cfg.ensemble_coeffs().into_iter().enumerate().collect();
            linear(&combine(&a, &feats)?, &p[2], Some(&p[3]))
        }
        Outputs::All => {
            let per_level =
                feats.iter().map(|f| linear(f, &p[2], Some(&p[3]))).collect::<CResult<Vec<_>>>()?;
            let outs = (0..cfg.num_outputs())
                .map(|j| combine(&cfg.output_terms(j), &per_level))
                .collect::<CResult<Vec<_>>>()?;
            Tensor::stack(&outs, 0)
        }
    }
}

fn list(p: &Params) -> [&Tensor; 4] {
    [&p.ln_weight, &p.ln_bias, &p.fc_weight, &p.fc_bias]
}

/// The forward from the pooled features `f0` `[N, C]`.
pub fn forward(cfg: &Config, f0: &Tensor, p: &Params, outputs: Outputs) -> CResult<Tensor> {
    logits(cfg, f0, &list(p).map(Tensor::clone), outputs)
}

/// Eval-mode voting (`kernels::ffc::vote` documents the score): `[N, K]`.
pub fn vote(cfg: &Config, f0: &Tensor, p: &Params) -> CResult<Tensor> {
    let outs = forward(cfg, f0, p, Outputs::All)?; // [J, N, K]
    let (_, n, k) = outs.dims3()?;
    if n == 0 {
        return outs.get(0); // [0, K]: no sample, nothing to vote (and no max of nothing)
    }
    let dt = outs.dtype();
    let classes = Tensor::arange(0u32, k as u32, outs.device())?.reshape((1, 1, k))?;
    let ballots = outs.argmax_keepdim(2)?.broadcast_eq(&classes)?.to_dtype(dt)?; // [J, N, K]
    let votes = ballots.sum(0)?;
    let is_top = votes.broadcast_eq(&votes.max_keepdim(1)?)?.to_dtype(dt)?;
    let tied = is_top.sum_keepdim(1)?.ge(2.0)?.to_dtype(dt)?;
    // Each output's softmax probability of its own winner: 1 / Σ_k e^(o_k - max o).
    let prob = outs.broadcast_sub(&outs.max_keepdim(2)?)?.exp()?.sum_keepdim(2)?.recip()?;
    let bonus = ballots.broadcast_mul(&prob)?.max(0)?;
    votes + (bonus * is_top)?.broadcast_mul(&tied)?.affine(0.5, 0.0)?
}

/// The backward from `grad_out` and the pooled features.
pub fn backward(
    cfg: &Config,
    grad_out: &Tensor,
    p: &Params,
    pooled: &Tensor,
    outputs: Outputs,
) -> CResult<Grads> {
    let mut inputs = vec![pooled];
    inputs.extend(list(p));
    let (_, g) = vjp(&inputs, grad_out, |v| logits(cfg, &v[0], &v[1..], outputs))?;
    Ok(Grads {
        x: g[0].clone(),
        ln_weight: g[1].clone(),
        ln_bias: g[2].clone(),
        fc_weight: g[3].clone(),
        fc_bias: g[4].clone(),
    })
}

fn params_on<T: Float>(cfg: &Config, d: Dims, p: &rayon_ffc::Params<T>, dev: &Device) -> Result<Params> {
    let (l, c, k) = (cfg.num_filters, d.c, d.k);
    Ok(Params {
        ln_weight: tensor(p.ln_weight, &[l, c], dev)?,
        ln_bias: tensor(p.ln_bias, &[l, c], dev)?,
        fc_weight: tensor(p.fc_weight, &[k, c], dev)?,
        fc_bias: tensor(p.fc_bias, &[k], dev)?,
    })
}

/// The pooled features of `x` `[N, C, HW]` on the CPU device.
fn pooled_on<T: Float>(d: Dims, x: &[T], dev: &Device) -> Result<Tensor> {
    let x = tensor(x, &[d.n, d.c, d.hw], dev)?;
    gap(&x).map_err(err)
}

/// [`forward`] on the CPU device with `kernels::ffc::forward`'s signature.
pub fn forward_host<T: Float>(
    cfg: &Config,
    d: Dims,
    x: &[T],
    p: &rayon_ffc::Params<T>,
    outputs: Outputs,
) -> Result<Vec<T>> {
    rayon_ffc::validate(cfg, d, x, p)?;
    let dev = Device::Cpu;
    host(&forward(cfg, &pooled_on(d, x, &dev)?, &params_on(cfg, d, p, &dev)?, outputs).map_err(err)?)
}

/// [`vote`] on the CPU device with `kernels::ffc::vote`'s signature.
pub fn vote_host<T: Float>(cfg: &Config, d: Dims, x: &[T], p: &rayon_ffc::Params<T>) -> Result<Vec<T>> {
    rayon_ffc::validate(cfg, d, x, p)?;
    let dev = Device::Cpu;
    host(&vote(cfg, &pooled_on(d, x, &dev)?, &params_on(cfg, d, p, &dev)?).map_err(err)?)
}

/// [`backward`] on the CPU device with `kernels::ffc::backward`'s signature: `x`
/// is the gradient of each `H×W` plane's pixels, `grad pooled / HW`.
pub fn backward_host<T: Float>(
    cfg: &Config,
    d: Dims,
    grad_out: &[T],
    p: &rayon_ffc::Params<T>,
    pooled: &[T],
    outputs: Outputs,
) -> Result<rayon_ffc::Grads<T>> {
    rayon_ffc::validate_params(cfg, d, p)?;
    crate::kernels::check_len("pooled", pooled, &[d.n, d.c])?;
    let out_shape = match outputs {
        Outputs::Ensemble => vec![d.n, d.k],
        Outputs::All => vec![cfg.num_outputs(), d.n, d.k],
    };
    crate::kernels::check_len("grad_out", grad_out, &out_shape)?;
    let dev = Device::Cpu;
    let g = backward(
        cfg,
        &tensor(grad_out, &out_shape, &dev)?,
        &params_on(cfg, d, p, &dev)?,
        &tensor(pooled, &[d.n, d.c], &dev)?,
        outputs,
    )
    .map_err(err)?;
    Ok(rayon_ffc::Grads {
        x: host(&g.x.affine(1.0 / d.hw as f64, 0.0).map_err(err)?)?,
        ln_weight: host(&g.ln_weight)?,
        ln_bias: host(&g.ln_bias)?,
        fc_weight: host(&g.fc_weight)?,
        fc_bias: host(&g.fc_bias)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::testing::{close, rand, tol};
    use crate::kernels::ffc::Combine;

    fn check<T: Float>(combine: Combine, num_filters: usize, hw: usize, k: usize) {
        let cfg = Config::new(num_filters, combine, 1e-5).unwrap();
        let (n, c) = (6, 7);
        let d = Dims { n, c, hw, k };
        let x: Vec<T> = rand(n * c * hw, 1);
        let (lw, lb): (Vec<T>, Vec<T>) = (rand(num_filters * c, 2), rand(num_filters * c, 3));
        let (w, b): (Vec<T>, Vec<T>) = (rand(k * c, 4), rand(k, 5));
        let p = rayon_ffc::Params { ln_weight: &lw, ln_bias: &lb, fc_weight: &w, fc_bias: &b };
        let t = tol::<T>();
        for outputs in [Outputs::Ensemble, Outputs::All] {
            close(
                "out",
                &forward_host(&cfg, d, &x, &p, outputs).unwrap(),
                &rayon_ffc::forward(&cfg, d, &x, &p, outputs).unwrap(),
                t,
            );
            let pooled = crate::kernels::pool::global_avg_pool(&x, hw);
            let dp = Dims { hw: 1 + hw % 2, ..d };
            let len = if outputs == Outputs::All { cfg.num_outputs() * n * k } else { n * k };
            let go: Vec<T> = rand(len, 6);
            let got = backward_host(&cfg, dp, &go, &p, &pooled, outputs).unwrap();
            let want = rayon_ffc::backward(&cfg, dp, &go, &p, &pooled, outputs).unwrap();
            close("grad x", &got.x, &want.x, t);
            close("grad ln_weight", &got.ln_weight, &want.ln_weight, t);
            close("grad ln_bias", &got.ln_bias, &want.ln_bias, t);
            close("grad fc_weight", &got.fc_weight, &want.fc_weight, t);
            close("grad fc_bias", &got.fc_bias, &want.fc_bias, t);
        }
        close("vote", &vote_host(&cfg, d, &x, &p).unwrap(), &rayon_ffc::vote(&cfg, d, &x, &p).unwrap(), t);
    }

    #[test]
    fn candle_matches_rayon() {
        for (combine, l, hw, k) in
            [(Combine::Paper, 3, 4, 5), (Combine::Plain, 2, 1, 3), (Combine::Paper, 1, 1, 2)]
        {
            check::<f64>(combine, l, hw, k);
            check::<f32>(combine, l, hw, k);
        }
    }

    /// A tie at the top of the vote is broken by the most confident voter, as in the
    /// rayon kernel: two levels, identical filters, so outputs agree pairwise.
    #[test]
    fn vote_ties_match_rayon() {
        let cfg = Config::new(1, Combine::Plain, 1e-5).unwrap();
        let (n, c, k) = (40, 4, 3);
        let d = Dims { n, c, hw: 1, k };
        let x: Vec<f64> = rand(n * c, 11);
        let (lw, lb): (Vec<f64>, Vec<f64>) = (rand(c, 12), rand(c, 13));
        let (w, b): (Vec<f64>, Vec<f64>) = (rand(k * c, 14), rand(k, 15));
        let p = rayon_ffc::Params { ln_weight: &lw, ln_bias: &lb, fc_weight: &w, fc_bias: &b };
        let want = rayon_ffc::vote(&cfg, d, &x, &p).unwrap();
        assert!(want.iter().any(|&s| s.fract() != 0.0), "some sample should have a tie");
        close("vote", &vote_host(&cfg, d, &x, &p).unwrap(), &want, 1e-12);
    }
}
