//! AB in candle ops (the rayon twin: `kernels/ab.rs`).
//!
//! Forward: `out = sigmoid(BN(Conv1x1(GAP(x)))) · x`, one pooling pass and one
//! scaling pass over the map. Backward: `dgate = Σ_hw grad_out·x` (one pass), the
//! gate's backward on `[N, C]` by autograd, then `grad_x = gate·grad_out + dy/HW`.

use super::{
    batch_norm, batch_stats, err, gap, host, map_grad, plane_dots, scale_planes, sigmoid, tensor, vjp,
    CResult, Device, Tensor,
};
use crate::kernels::ab::{self as rayon_ab, Config};
use crate::kernels::{Float, Result};

/// The parameters: `conv_weight` `[C, C/g]`, the rest `[C]`.
pub struct Params {
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    pub bn_weight: Tensor,
    pub bn_bias: Tensor,
}

/// What the forward returns (see `kernels::ab::Forward`); `var_unbiased` is `None`
/// in eval.
pub struct Forward {
    pub out: Tensor,
    pub pooled: Tensor,
    pub mean: Tensor,
    pub invstd: Tensor,
    pub var_unbiased: Option<Tensor>,
}

pub struct Grads {
    pub x: Tensor,
    pub conv_weight: Tensor,
    pub conv_bias: Option<Tensor>,
    pub bn_weight: Tensor,
    pub bn_bias: Tensor,
}

/// `t = Conv1x1(y, groups) + bias` on `y` `[N, C]`.
fn conv(groups: usize, y: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let (n, c) = y.dims2()?;
    let t = if groups == c {
        y.broadcast_mul(&w.reshape((1, c))?)?
    } else {
        let cg = c / groups;
        // [g, N, cg] × [g, cg_in, cg_out] → [g, N, cg] → [N, C]
        let yg = y.reshape((n, groups, cg))?.transpose(0, 1)?.contiguous()?;
        let wg = w.reshape((groups, cg, cg))?.transpose(1, 2)?;
        yg.matmul(&wg)?.transpose(0, 1)?.reshape((n, c))?
    };
    match b {
        Some(b) => t.broadcast_add(b),
        None => Ok(t),
    }
}

/// The gate `sigmoid(BN(conv(pooled)))`, `[N, C]`; batch statistics computed in the
/// graph when `stats` is `None`.
fn gate(
    cfg: &Config,
    pooled: &Tensor,
    p: &[Tensor],
    bias: bool,
    stats: Option<(&Tensor, &Tensor)>,
) -> CResult<Tensor> {
    let (w, gamma, beta) = (&p[0], &p[1], &p[2]);
    let t = conv(cfg.groups, pooled, w, if bias { Some(&p[3]) } else { None })?;
    sigmoid(&batch_norm(&t, stats, cfg.eps, gamma, beta)?)
}

fn param_list(p: &Params) -> Vec<&Tensor> {
    let mut v = vec![&p.conv_weight, &p.bn_weight, &p.bn_bias];
    v.extend(p.conv_bias.as_ref());
    v
}

/// The forward of `x` `[N, C, HW]`; `running` = (mean, var) is read in eval.
pub fn forward(cfg: &Config, x: &Tensor, p: &Params, running: (&Tensor, &Tensor)) -> CResult<Forward> {
    let pooled = gap(x)?;
    let t = conv(cfg.groups, &pooled, &p.conv_weight, p.conv_bias.as_ref())?;
    let (mean, invstd, var_unbiased) = if cfg.training {
        let s = batch_stats(&t, cfg.eps)?;
        (s.mean, s.invstd, Some(s.var_unbiased))
    } else {
        (running.0.copy()?, (running.1 + cfg.eps)?.sqrt()?.recip()?, None)
    };
    let g = sigmoid(&batch_norm(&t, Some((&mean, &invstd)), cfg.eps, &p.bn_weight, &p.bn_bias)?)?;
    let out = scale_planes(x, &g)?;
    Ok(Forward { out, pooled, mean, invstd, var_unbiased })
}

/// The backward from `grad_out` and `x` `[N, C, HW]` and what the forward kept.
pub fn backward(
    cfg: &Config,
    grad_out: &Tensor,
    x: &Tensor,
    p: &Params,
    pooled: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> CResult<Grads> {
    let bias = p.conv_bias.is_some();
    let stats = if cfg.training { None } else { Some((mean, invstd)) };
    let dgate = plane_dots(grad_out, x)?;
    let mut inputs = vec![pooled];
    inputs.extend(param_list(p));
    // The gate is recomputed once, in the graph the gradients come from.
    let (g, grads) = vjp(&inputs, &dgate, |v| gate(cfg, &v[0], &v[1..], bias, stats))?;
    Ok(Grads {
        x: map_grad(grad_out, &g, &grads[0])?,
        conv_weight: grads[1].clone(),
        bn_weight: grads[2].clone(),
        bn_bias: grads[3].clone(),
        conv_bias: grads.get(4).cloned(),
    })
}

fn params_on<T: Float>(cfg: &Config, p: &rayon_ab::Params<T>, dev: &Device) -> Result<Params> {
    let c = cfg.channels;
    Ok(Params {
        conv_weight: tensor(p.conv_weight, &[c, c / cfg.groups], dev)?,
        conv_bias: p.conv_bias.map(|b| tensor(b, &[c], dev)).transpose()?,
        bn_weight: tensor(p.bn_weight, &[c], dev)?,
        bn_bias: tensor(p.bn_bias, &[c], dev)?,
    })
}

/// A host map in `cfg`'s layout as the `[N, C, HW]` tensor the functions above take
/// (a transposed view of a channels-last map).
fn map_in<T: Float>(cfg: &Config, x: &[T], n: usize, hw: usize, dev: &Device) -> Result<Tensor> {
    let c = cfg.channels;
    if cfg.channels_last {
        tensor(x, &[n, hw, c], dev)?.transpose(1, 2).map_err(err)
    } else {
        tensor(x, &[n, c, hw], dev)
    }
}

/// An `[N, C, HW]` result on the host, in `cfg`'s layout.
fn map_out<T: Float>(cfg: &Config, t: &Tensor) -> Result<Vec<T>> {
    if cfg.channels_last {
        host(&t.transpose(1, 2).and_then(|t| t.contiguous()).map_err(err)?)
    } else {
        host(t)
    }
}

/// [`forward`] on the CPU device with `kernels::ab::forward`'s signature.
pub fn forward_host<T: Float>(
    cfg: &Config,
    x: &[T],
    n: usize,
    hw: usize,
    p: &rayon_ab::Params<T>,
    running: rayon_ab::Running<T>,
) -> Result<rayon_ab::Forward<T>> {
    rayon_ab::validate(cfg, x, n, hw, p)?;
    let c = cfg.channels;
    crate::kernels::check_len("running_mean", running.mean, &[c])?;
    crate::kernels::check_len("running_var", running.var, &[c])?;
    let dev = Device::Cpu;
    let xt = map_in(cfg, x, n, hw, &dev)?;
    let (rm, rv) = (tensor(running.mean, &[c], &dev)?, tensor(running.var, &[c], &dev)?);
    let f = forward(cfg, &xt, &params_on(cfg, p, &dev)?, (&rm, &rv)).map_err(err)?;
    Ok(rayon_ab::Forward {
        out: map_out(cfg, &f.out)?,
        pooled: host(&f.pooled)?,
        mean: host(&f.mean)?,
        invstd: host(&f.invstd)?,
        var_unbiased: f.var_unbiased.as_ref().map(host).transpose()?.unwrap_or_default(),
    })
}

/// [`backward`] on the CPU device with `kernels::ab::backward`'s signature.
#[allow(clippy::too_many_arguments)]
pub fn backward_host<T: Float>(
    cfg: &Config,
    grad_out: &[T],
    x: &[T],
    n: usize,
    hw: usize,
    p: &rayon_ab::Params<T>,
    pooled: &[T],
    mean: &[T],
    invstd: &[T],
) -> Result<rayon_ab::Grads<T>> {
    rayon_ab::validate(cfg, x, n, hw, p)?;
    let c = cfg.channels;
    let dev = Device::Cpu;
    let g = backward(
        cfg,
        &map_in(cfg, grad_out, n, hw, &dev)?,
        &map_in(cfg, x, n, hw, &dev)?,
        &params_on(cfg, p, &dev)?,
        &tensor(pooled, &[n, c], &dev)?,
        &tensor(mean, &[c], &dev)?,
        &tensor(invstd, &[c], &dev)?,
    )
    .map_err(err)?;
    Ok(rayon_ab::Grads {
        x: map_out(cfg, &g.x)?,
        conv_weight: host(&g.conv_weight)?,
        conv_bias: g.conv_bias.as_ref().map(host).transpose()?.unwrap_or_default(),
        bn_weight: host(&g.bn_weight)?,
        bn_bias: host(&g.bn_bias)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::testing::{close, rand, tol};

    fn check<T: Float>(n: usize, c: usize, hw: usize, groups: usize, bias: bool, training: bool, last: bool) {
        let cfg = Config { channels: c, groups, eps: 1e-5, training, channels_last: last };
        let x: Vec<T> = rand(n * c * hw, 1);
        let w: Vec<T> = rand(c * c / groups, 2);
        let b: Vec<T> = rand(c, 3);
        let gamma: Vec<T> = rand(c, 4);
        let beta: Vec<T> = rand(c, 5);
        let rm: Vec<T> = rand(c, 6);
        let rv: Vec<T> = rand::<T>(c, 7).into_iter().map(|v| v * v + T::of(0.5)).collect();
        let go: Vec<T> = rand(n * c * hw, 8);
        let p = rayon_ab::Params {
            conv_weight: &w,
            conv_bias: bias.then_some(&b[..]),
            bn_weight: &gamma,
            bn_bias: &beta,
        };
        let running = rayon_ab::Running { mean: &rm, var: &rv };
        let want = rayon_ab::forward(&cfg, &x, n, hw, &p, running).unwrap();
        let got = forward_host(&cfg, &x, n, hw, &p, running).unwrap();
        let t = tol::<T>();
        close("out", &got.out, &want.out, t);
        close("mean", &got.mean, &want.mean, t);
        close("invstd", &got.invstd, &want.invstd, t);
        close("var_unbiased", &got.var_unbiased, &want.var_unbiased, t);
        let want =
            rayon_ab::backward(&cfg, &go, &x, n, hw, &p, &want.pooled, &want.mean, &want.invstd).unwrap();
        let got = backward_host(&cfg, &go, &x, n, hw, &p, &got.pooled, &got.mean, &got.invstd).unwrap();
        close("grad x", &got.x, &want.x, t);
        close("grad conv_weight", &got.conv_weight, &want.conv_weight, t);
        close("grad conv_bias", &got.conv_bias, &want.conv_bias, t);
        close("grad bn_weight", &got.bn_weight, &want.bn_weight, t);
        close("grad bn_bias", &got.bn_bias, &want.bn_bias, t);
    }

    #[test]
    fn candle_matches_rayon() {
        for training in [true, false] {
            for (groups, bias) in [(6, false), (1, true), (2, false), (3, true)] {
                for last in [false, true] {
                    check::<f64>(5, 6, 9, groups, bias, training, last);
                    check::<f32>(4, 6, 7, groups, bias, training, last);
                }
            }
        }
    }

    #[test]
    fn errors_are_the_rayon_kernels() {
        let cfg = Config { channels: 4, groups: 4, eps: 1e-5, training: true, channels_last: false };
        let v = [0.0f32; 16];
        let p =
            rayon_ab::Params { conv_weight: &v[..4], conv_bias: None, bn_weight: &v[..4], bn_bias: &v[..4] };
        let r = rayon_ab::Running { mean: &v[..4], var: &v[..4] };
        let e = forward_host(&cfg, &v[..4], 1, 1, &p, r).unwrap_err();
        assert_eq!(e, rayon_ab::forward(&cfg, &v[..4], 1, 1, &p, r).unwrap_err());
    }
}
