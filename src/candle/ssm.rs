//! SSM in candle ops (the rayon twin: `kernels/ssm.rs`).
//!
//! Head `h` reads the prefix `x[:, :(h+1)·C/G]` in place (a narrowed view), applies
//! BN + ReLU when it is normalised, and its Linear; the ensemble is the mean of the
//! heads' logits. The backward is autograd over that forward (it is all `[N, ·]`
//! sized), with the batch statistics in the graph in training and the saved ones in
//! eval.

use super::{batch_norm, batch_stats, err, host, linear, tensor, vjp, CResult, Device, Tensor};
use crate::kernels::ssm::{self as rayon_ssm, stats_range, Config};
use crate::kernels::{Float, Result};

/// One head's batch norm: affine parameters and running statistics, `[(h+1)·C/G]`.
pub struct BnParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// One head: `fc_weight` `[K, (h+1)·C/G]`, `fc_bias` `[K]`, and its batch norm when
/// normalised.
pub struct Head {
    pub fc_weight: Tensor,
    pub fc_bias: Tensor,
    pub bn: Option<BnParams>,
}

/// What the forward returns (see `kernels::ssm::Forward`): the statistics of the
/// normalised heads concatenated (`None` when no head is normalised: an empty
/// tensor would be a zero-byte allocation, which CUDA refuses); `var_unbiased` is
/// also `None` in eval.
pub struct Forward {
    pub out: Tensor,
    pub mean: Option<Tensor>,
    pub invstd: Option<Tensor>,
    pub var_unbiased: Option<Tensor>,
}

pub struct HeadGrads {
    pub fc_weight: Tensor,
    pub fc_bias: Tensor,
    /// Both `None` for the raw head.
    pub bn_weight: Option<Tensor>,
    pub bn_bias: Option<Tensor>,
}

pub struct Grads {
    pub x: Tensor,
    pub heads: Vec<HeadGrads>,
}

/// The heads' parameters as one flat list (each head: fc weight, fc bias, then BN
/// weight and bias when normalised) and where each head starts in it.
fn param_list(heads: &[Head]) -> (Vec<&Tensor>, Vec<usize>) {
    let (mut list, mut starts) = (Vec::new(), Vec::new());
    for h in heads {
        starts.push(list.len());
        list.extend([&h.fc_weight, &h.fc_bias]);
        if let Some(bn) = &h.bn {
            list.extend([&bn.weight, &bn.bias]);
        }
    }
    (list, starts)
}

/// The logits (`[N, K]` ensemble or `[G, N, K]`) of `x` with the flat parameter list
/// `p`; `stats(h)` gives head `h`'s fixed (mean, invstd), or `None` for batch
/// statistics in the graph.
fn logits(
    cfg: &Config,
    x: &Tensor,
    p: &[Tensor],
    starts: &[usize],
    stats: &dyn Fn(usize) -> CResult<Option<(Tensor, Tensor)>>,
) -> CResult<Tensor> {
    let split = x.dim(1)? / cfg.num_heads;
    let mut outs = Vec::with_capacity(cfg.num_heads);
    for (h, &s) in starts.iter().enumerate() {
        let prefix = x.narrow(1, 0, (h + 1) * split)?;
        let a = if cfg.is_normalised(h) {
            let st = stats(h)?;
            batch_norm(&prefix, st.as_ref().map(|(m, i)| (m, i)), cfg.eps, &p[s + 2], &p[s + 3])?.relu()?
        } else {
            prefix
        };
        outs.push(linear(&a, &p[s], Some(&p[s + 1]))?);
    }
    if cfg.all_outputs {
        Tensor::stack(&outs, 0)
    } else {
        Tensor::stack(&outs, 0)?.sum(0)? / cfg.num_heads as f64
    }
}

/// Concatenates per-head statistics (`None` when no head is normalised).
fn concat(parts: Vec<Tensor>) -> CResult<Option<Tensor>> {
    if parts.is_empty() {
        Ok(None)
    } else {
        Tensor::cat(&parts, 0).map(Some)
    }
}

/// The forward of `x` `[N, C]`.
pub fn forward(cfg: &Config, x: &Tensor, heads: &[Head]) -> CResult<Forward> {
    let split = x.dim(1)? / cfg.num_heads;
    let (mut mean, mut invstd, mut var) = (Vec::new(), Vec::new(), Vec::new());
    for (h, head) in heads.iter().enumerate().take(cfg.normalised_heads()) {
        let bn = head.bn.as_ref().expect("validated: normalised heads have a batch norm");
        if cfg.training {
            let s = batch_stats(&x.narrow(1, 0, (h + 1) * split)?, cfg.eps)?;
            mean.push(s.mean);
            invstd.push(s.invstd);
            var.push(s.var_unbiased);
        } else {
            mean.push(bn.running_mean.copy()?);
            invstd.push((&bn.running_var + cfg.eps)?.sqrt()?.recip()?);
        }
    }
    let (list, starts) = param_list(heads);
    let p: Vec<Tensor> = list.into_iter().cloned().collect();
    let out = logits(cfg, x, &p, &starts, &|h| Ok(Some((mean[h].clone(), invstd[h].clone()))))?;
    let var_unbiased = if cfg.training { concat(var)? } else { None };
    Ok(Forward { out, mean: concat(mean)?, invstd: concat(invstd)?, var_unbiased })
}

/// The backward from `grad_out` (the forward's output shape), `x` and the saved
/// concatenated `mean`/`invstd` (used in eval; training recomputes them in the graph).
pub fn backward(
    cfg: &Config,
    grad_out: &Tensor,
    x: &Tensor,
    heads: &[Head],
    mean: &Tensor,
    invstd: &Tensor,
) -> CResult<Grads> {
    let split = x.dim(1)? / cfg.num_heads;
    let (list, starts) = param_list(heads);
    let mut inputs = vec![x];
    inputs.extend(list);
    let saved = |h: usize| -> CResult<Option<(Tensor, Tensor)>> {
        if cfg.training {
            return Ok(None);
        }
        let r = stats_range(split, h);
        Ok(Some((mean.narrow(0, r.start, r.len())?, invstd.narrow(0, r.start, r.len())?)))
    };
    let (_, g) = vjp(&inputs, grad_out, |v| logits(cfg, &v[0], &v[1..], &starts, &saved))?;
    let heads = starts
        .iter()
        .enumerate()
        .map(|(h, &s)| {
            let bn = cfg.is_normalised(h);
            HeadGrads {
                fc_weight: g[s + 1].clone(),
                fc_bias: g[s + 2].clone(),
                bn_weight: bn.then(|| g[s + 3].clone()),
                bn_bias: bn.then(|| g[s + 4].clone()),
            }
        })
        .collect();
    Ok(Grads { x: g[0].clone(), heads })
}

fn heads_on<T: Float>(heads: &[rayon_ssm::Head<T>], k: usize, dev: &Device) -> Result<Vec<Head>> {
    heads
        .iter()
        .map(|h| {
            let w = h.fc_weight.len() / k;
            let bn = |v: &[T]| tensor(v, &[v.len()], dev);
            Ok(Head {
                fc_weight: tensor(h.fc_weight, &[k, w], dev)?,
                fc_bias: tensor(h.fc_bias, &[k], dev)?,
                bn: h
                    .bn
                    .as_ref()
                    .map(|b| -> Result<BnParams> {
                        Ok(BnParams {
                            weight: bn(b.weight)?,
                            bias: bn(b.bias)?,
                            running_mean: bn(b.running_mean)?,
                            running_var: bn(b.running_var)?,
                        })
                    })
                    .transpose()?,
            })
        })
        .collect()
}

/// [`forward`] on the CPU device with `kernels::ssm::forward`'s signature.
pub fn forward_host<T: Float>(
    cfg: &Config,
    x: &[T],
    n: usize,
    c: usize,
    heads: &[rayon_ssm::Head<T>],
) -> Result<rayon_ssm::Forward<T>> {
    rayon_ssm::validate(cfg, x, n, c, heads, true)?;
    let dev = Device::Cpu;
    let f =
        forward(cfg, &tensor(x, &[n, c], &dev)?, &heads_on(heads, cfg.num_classes, &dev)?).map_err(err)?;
    Ok(rayon_ssm::Forward {
        out: host(&f.out)?,
        mean: f.mean.as_ref().map(host).transpose()?.unwrap_or_default(),
        invstd: f.invstd.as_ref().map(host).transpose()?.unwrap_or_default(),
        var_unbiased: f.var_unbiased.as_ref().map(host).transpose()?.unwrap_or_default(),
    })
}

/// [`backward`] on the CPU device with `kernels::ssm::backward`'s signature.
pub fn backward_host<T: Float>(
    cfg: &Config,
    grad_out: &[T],
    x: &[T],
    n: usize,
    c: usize,
    heads: &[rayon_ssm::Head<T>],
    saved: &rayon_ssm::Saved<T>,
) -> Result<rayon_ssm::Grads<T>> {
    rayon_ssm::validate(cfg, x, n, c, heads, false)?;
    let stats = rayon_ssm::stats_len(cfg, c);
    crate::kernels::check_len("grad_out", grad_out, &cfg.out_shape(n))?;
    crate::kernels::check_len("saved.mean", saved.mean, &[stats])?;
    crate::kernels::check_len("saved.invstd", saved.invstd, &[stats])?;
    let dev = Device::Cpu;
    // Empty running statistics are allowed here (the saved ones replace them).
    let heads_t: Vec<rayon_ssm::Head<T>> = heads
        .iter()
        .map(|h| rayon_ssm::Head {
            bn: h.bn.map(|b| rayon_ssm::BnParams { running_mean: b.weight, running_var: b.weight, ..b }),
            ..*h
        })
        .collect();
    let g = backward(
        cfg,
        &tensor(grad_out, &cfg.out_shape(n), &dev)?,
        &tensor(x, &[n, c], &dev)?,
        &heads_on(&heads_t, cfg.num_classes, &dev)?,
        &tensor(saved.mean, &[stats], &dev)?,
        &tensor(saved.invstd, &[stats], &dev)?,
    )
    .map_err(err)?;
    let heads = g
        .heads
        .iter()
        .map(|h| -> Result<rayon_ssm::HeadGrads<T>> {
            Ok(rayon_ssm::HeadGrads {
                fc_weight: host(&h.fc_weight)?,
                fc_bias: host(&h.fc_bias)?,
                bn_weight: h.bn_weight.as_ref().map(host).transpose()?.unwrap_or_default(),
                bn_bias: h.bn_bias.as_ref().map(host).transpose()?.unwrap_or_default(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(rayon_ssm::Grads { x: host(&g.x)?, heads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::testing::{close, rand, tol};

    fn check<T: Float>(g: usize, norm_last_head: bool, training: bool, all_outputs: bool) {
        let (n, split, k) = (5, 3, 4);
        let c = g * split;
        let cfg = Config { num_heads: g, num_classes: k, norm_last_head, eps: 1e-5, training, all_outputs };
        let x: Vec<T> = rand(n * c, 1);
        let params: Vec<[Vec<T>; 6]> = (0..g)
            .map(|h| {
                let w = (h + 1) * split;
                let s = 10 * h as u64;
                let rv = rand::<T>(w, s + 6).into_iter().map(|v| v * v + T::of(0.5)).collect();
                [rand(k * w, s + 1), rand(k, s + 2), rand(w, s + 3), rand(w, s + 4), rand(w, s + 5), rv]
            })
            .collect();
        let heads: Vec<rayon_ssm::Head<T>> = params
            .iter()
            .enumerate()
            .map(|(h, p)| rayon_ssm::Head {
                fc_weight: &p[0],
                fc_bias: &p[1],
                bn: cfg.is_normalised(h).then(|| rayon_ssm::BnParams {
                    weight: &p[2],
                    bias: &p[3],
                    running_mean: &p[4],
                    running_var: &p[5],
                }),
            })
            .collect();
        let t = tol::<T>();
        let want = rayon_ssm::forward(&cfg, &x, n, c, &heads).unwrap();
        let got = forward_host(&cfg, &x, n, c, &heads).unwrap();
        close("out", &got.out, &want.out, t);
        close("mean", &got.mean, &want.mean, t);
        close("invstd", &got.invstd, &want.invstd, t);
        close("var_unbiased", &got.var_unbiased, &want.var_unbiased, t);
        let go: Vec<T> = rand(cfg.out_shape(n).iter().product(), 99);
        let want = rayon_ssm::backward(&cfg, &go, &x, n, c, &heads, &want.saved()).unwrap();
        let got = backward_host(&cfg, &go, &x, n, c, &heads, &got.saved()).unwrap();
        close("grad x", &got.x, &want.x, t);
        for (h, (a, b)) in got.heads.iter().zip(&want.heads).enumerate() {
            close(&format!("head {h} fc_weight"), &a.fc_weight, &b.fc_weight, t);
            close(&format!("head {h} fc_bias"), &a.fc_bias, &b.fc_bias, t);
            close(&format!("head {h} bn_weight"), &a.bn_weight, &b.bn_weight, t);
            close(&format!("head {h} bn_bias"), &a.bn_bias, &b.bn_bias, t);
        }
    }

    #[test]
    fn candle_matches_rayon() {
        for training in [true, false] {
            for (g, norm_last, all) in
                [(4, false, false), (3, true, true), (1, false, true), (1, true, false)]
            {
                check::<f64>(g, norm_last, training, all);
                check::<f32>(g, norm_last, training, all);
            }
        }
    }
}
