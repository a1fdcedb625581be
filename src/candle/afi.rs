//! AFI in candle ops (the rayon twin: `kernels/afi.rs`).
//!
//! Forward: `z_i = GAP(X_i)`; the shared scorer over the stacked `[M·N, C]`
//! descriptors; softmax over the M inputs; `R = Σ_i s~_i · X_i`. The maps are read
//! where they lie, never stacked. Backward: `g_i = Σ_hw grad_R · X_i` (one pass), the
//! scorer and softmax backward on `[M, N, C]` by autograd, then
//! `grad_X_i = s~_i · grad_R + dz_i / HW`.

use super::{
    err, gap, host, linear, map_grad, plane_dots, scale_planes, tensor, vjp, CResult, Device, Tensor,
};
use crate::kernels::afi as rayon_afi;
use crate::kernels::{Float, Result};

/// The scorer: `fc1_weight` `[hidden, C]`, `fc2_weight` `[C, hidden]`, optional biases.
pub struct Params {
    pub fc1_weight: Tensor,
    pub fc1_bias: Option<Tensor>,
    pub fc2_weight: Tensor,
    pub fc2_bias: Option<Tensor>,
}

/// What the forward returns (see `kernels::afi::Forward`): `z` `[M, N, C]`, `hidden`
/// `[M, N, hidden]`, `weights` `[M, N, C]`.
pub struct Forward {
    pub out: Tensor,
    pub z: Tensor,
    pub hidden: Tensor,
    pub weights: Tensor,
}

pub struct Grads {
    pub xs: Vec<Tensor>,
    pub fc1_weight: Tensor,
    pub fc1_bias: Option<Tensor>,
    pub fc2_weight: Tensor,
    pub fc2_bias: Option<Tensor>,
}

/// The scorer parameters as one list `[W1, W2, b1?, b2?]` and where the biases are.
struct Scorer<'a> {
    list: Vec<&'a Tensor>,
    b1: Option<usize>,
    b2: Option<usize>,
}

impl<'a> Scorer<'a> {
    fn of(p: &'a Params) -> Self {
        let mut list = vec![&p.fc1_weight, &p.fc2_weight];
        let b1 = p.fc1_bias.as_ref().map(|b| {
            list.push(b);
            list.len() - 1
        });
        let b2 = p.fc2_bias.as_ref().map(|b| {
            list.push(b);
            list.len() - 1
        });
        Scorer { list, b1, b2 }
    }
}

/// `(hidden, s~)` of `z` `[M, N, C]` with the scorer's list `p` (see [`Scorer`]).
fn weights(z: &Tensor, p: &[Tensor], b1: Option<usize>, b2: Option<usize>) -> CResult<(Tensor, Tensor)> {
    let (m, n, c) = z.dims3()?;
    let zf = z.reshape((m * n, c))?;
    let hidden = linear(&zf, &p[0], b1.map(|i| &p[i]))?.relu()?;
    let s = linear(&hidden, &p[1], b2.map(|i| &p[i]))?.reshape((m, n, c))?;
    // Softmax over the inputs; the shift is a constant for the gradient (and there
    // is nothing to shift, or to take the max of, in an empty batch).
    let e =
        if s.elem_count() == 0 { s.exp()? } else { s.broadcast_sub(&s.max_keepdim(0)?.detach())?.exp()? };
    let w = e.broadcast_div(&e.sum_keepdim(0)?)?;
    let h = hidden.dim(1)?;
    Ok((hidden.reshape((m, n, h))?, w))
}

/// The forward of `xs`, each `[N, C, HW]`.
pub fn forward(xs: &[Tensor], p: &Params) -> CResult<Forward> {
    let z = Tensor::stack(&xs.iter().map(gap).collect::<CResult<Vec<_>>>()?, 0)?;
    let s = Scorer::of(p);
    let list: Vec<Tensor> = s.list.iter().map(|&t| t.clone()).collect();
    let (hidden, w) = weights(&z, &list, s.b1, s.b2)?;
    let mut out = scale_planes(&xs[0], &w.get(0)?)?;
    for (i, x) in xs.iter().enumerate().skip(1) {
        out = (out + scale_planes(x, &w.get(i)?)?)?;
    }
    Ok(Forward { out, z, hidden, weights: w })
}

/// The backward from `grad_out` `[N, C, HW]`, the inputs and the saved `z` and
/// `weights`.
pub fn backward(grad_out: &Tensor, xs: &[Tensor], p: &Params, z: &Tensor, w: &Tensor) -> CResult<Grads> {
    let g = Tensor::stack(&xs.iter().map(|x| plane_dots(grad_out, x)).collect::<CResult<Vec<_>>>()?, 0)?;
    let s = Scorer::of(p);
    let mut inputs = vec![z];
    inputs.extend(s.list.iter().copied());
    let (b1, b2) = (s.b1.map(|i| i + 1), s.b2.map(|i| i + 1));
    let (_, grads) =
        vjp(&inputs, &g, |v| Ok(weights(&v[0], &v[1..], b1.map(|i| i - 1), b2.map(|i| i - 1))?.1))?;
    let xs =
        (0..xs.len()).map(|i| map_grad(grad_out, &w.get(i)?, &grads[0].get(i)?)).collect::<CResult<_>>()?;
    Ok(Grads {
        xs,
        fc1_weight: grads[1].clone(),
        fc2_weight: grads[2].clone(),
        fc1_bias: b1.map(|i| grads[i].clone()),
        fc2_bias: b2.map(|i| grads[i].clone()),
    })
}

fn params_on<T: Float>(c: usize, p: &rayon_afi::Params<T>, dev: &Device) -> Result<Params> {
    let hidden = p.fc1_weight.len() / c;
    Ok(Params {
        fc1_weight: tensor(p.fc1_weight, &[hidden, c], dev)?,
        fc1_bias: p.fc1_bias.map(|b| tensor(b, &[hidden], dev)).transpose()?,
        fc2_weight: tensor(p.fc2_weight, &[c, hidden], dev)?,
        fc2_bias: p.fc2_bias.map(|b| tensor(b, &[c], dev)).transpose()?,
    })
}

/// Host maps as the `[N, C, HW]` tensors the functions above take: transposed views
/// of `[N, HW, C]` maps when `channels_last`.
fn maps_on<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    channels_last: bool,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    xs.iter().map(|x| map_on(x, n, c, hw, channels_last, dev)).collect()
}

fn map_on<T: Float>(
    x: &[T],
    n: usize,
    c: usize,
    hw: usize,
    channels_last: bool,
    dev: &Device,
) -> Result<Tensor> {
    if channels_last {
        tensor(x, &[n, hw, c], dev)?.transpose(1, 2).map_err(err)
    } else {
        tensor(x, &[n, c, hw], dev)
    }
}

/// An `[N, C, HW]` result on the host, `[N, HW, C]` when `channels_last`.
fn map_host<T: Float>(t: &Tensor, channels_last: bool) -> Result<Vec<T>> {
    if channels_last {
        host(&t.transpose(1, 2).and_then(|t| t.contiguous()).map_err(err)?)
    } else {
        host(t)
    }
}

/// [`forward`] on the CPU device with `kernels::afi::forward`'s signature.
pub fn forward_host<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &rayon_afi::Params<T>,
) -> Result<rayon_afi::Forward<T>> {
    forward_host_in(xs, n, c, hw, p, false)
}

/// [`forward`] on the CPU device with `kernels::afi::forward_channels_last`'s signature.
pub fn forward_host_channels_last<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &rayon_afi::Params<T>,
) -> Result<rayon_afi::Forward<T>> {
    forward_host_in(xs, n, c, hw, p, true)
}

fn forward_host_in<T: Float>(
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &rayon_afi::Params<T>,
    channels_last: bool,
) -> Result<rayon_afi::Forward<T>> {
    rayon_afi::validate(xs, n, c, hw, p)?;
    let dev = Device::Cpu;
    let f = forward(&maps_on(xs, n, c, hw, channels_last, &dev)?, &params_on(c, p, &dev)?).map_err(err)?;
    Ok(rayon_afi::Forward {
        out: map_host(&f.out, channels_last)?,
        z: host(&f.z)?,
        hidden: host(&f.hidden)?,
        weights: host(&f.weights)?,
    })
}

/// [`backward`] on the CPU device with `kernels::afi::backward`'s signature.
pub fn backward_host<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &rayon_afi::Params<T>,
    saved: &rayon_afi::Saved<T>,
) -> Result<rayon_afi::Grads<T>> {
    backward_host_in(grad_out, xs, (n, c, hw), p, saved, false)
}

/// [`backward`] on the CPU device with `kernels::afi::backward_channels_last`'s
/// signature.
pub fn backward_host_channels_last<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    n: usize,
    c: usize,
    hw: usize,
    p: &rayon_afi::Params<T>,
    saved: &rayon_afi::Saved<T>,
) -> Result<rayon_afi::Grads<T>> {
    backward_host_in(grad_out, xs, (n, c, hw), p, saved, true)
}

fn backward_host_in<T: Float>(
    grad_out: &[T],
    xs: &[&[T]],
    (n, c, hw): (usize, usize, usize),
    p: &rayon_afi::Params<T>,
    saved: &rayon_afi::Saved<T>,
    channels_last: bool,
) -> Result<rayon_afi::Grads<T>> {
    rayon_afi::validate(xs, n, c, hw, p)?;
    let m = xs.len();
    crate::kernels::check_len("grad_out", grad_out, &[n, c, hw])?;
    crate::kernels::check_len("saved.z", saved.z, &[m, n, c])?;
    crate::kernels::check_len("saved.weights", saved.weights, &[m, n, c])?;
    let dev = Device::Cpu;
    let g = backward(
        &map_on(grad_out, n, c, hw, channels_last, &dev)?,
        &maps_on(xs, n, c, hw, channels_last, &dev)?,
        &params_on(c, p, &dev)?,
        &tensor(saved.z, &[m, n, c], &dev)?,
        &tensor(saved.weights, &[m, n, c], &dev)?,
    )
    .map_err(err)?;
    Ok(rayon_afi::Grads {
        xs: g.xs.iter().map(|t| map_host(t, channels_last)).collect::<Result<_>>()?,
        fc1_weight: host(&g.fc1_weight)?,
        fc1_bias: g.fc1_bias.as_ref().map(host).transpose()?,
        fc2_weight: host(&g.fc2_weight)?,
        fc2_bias: g.fc2_bias.as_ref().map(host).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::testing::{close, rand, tol};

    fn check<T: Float>(m: usize, n: usize, c: usize, hw: usize, hidden: usize, biases: bool, last: bool) {
        let maps: Vec<Vec<T>> = (0..m).map(|i| rand(n * c * hw, 10 + i as u64)).collect();
        let xs: Vec<&[T]> = maps.iter().map(|v| &v[..]).collect();
        let (w1, w2): (Vec<T>, Vec<T>) = (rand(hidden * c, 1), rand(c * hidden, 2));
        let (b1, b2): (Vec<T>, Vec<T>) = (rand(hidden, 3), rand(c, 4));
        let go: Vec<T> = rand(n * c * hw, 5);
        let p = rayon_afi::Params {
            fc1_weight: &w1,
            fc1_bias: biases.then_some(&b1[..]),
            fc2_weight: &w2,
            fc2_bias: biases.then_some(&b2[..]),
        };
        let t = tol::<T>();
        let (want, got) = if last {
            (
                rayon_afi::forward_channels_last(&xs, n, c, hw, &p),
                forward_host_channels_last(&xs, n, c, hw, &p),
            )
        } else {
            (rayon_afi::forward(&xs, n, c, hw, &p), forward_host(&xs, n, c, hw, &p))
        };
        let (want, got) = (want.unwrap(), got.unwrap());
        close("out", &got.out, &want.out, t);
        close("z", &got.z, &want.z, t);
        close("hidden", &got.hidden, &want.hidden, t);
        close("weights", &got.weights, &want.weights, t);
        let (want, got) = if last {
            (
                rayon_afi::backward_channels_last(&go, &xs, n, c, hw, &p, &want.saved()),
                backward_host_channels_last(&go, &xs, n, c, hw, &p, &got.saved()),
            )
        } else {
            (
                rayon_afi::backward(&go, &xs, n, c, hw, &p, &want.saved()),
                backward_host(&go, &xs, n, c, hw, &p, &got.saved()),
            )
        };
        let (want, got) = (want.unwrap(), got.unwrap());
        for (i, (a, b)) in got.xs.iter().zip(&want.xs).enumerate() {
            close(&format!("grad xs[{i}]"), a, b, t);
        }
        close("grad fc1_weight", &got.fc1_weight, &want.fc1_weight, t);
        close("grad fc2_weight", &got.fc2_weight, &want.fc2_weight, t);
        assert_eq!(got.fc1_bias.is_some(), biases);
        if biases {
            close("grad fc1_bias", got.fc1_bias.as_ref().unwrap(), want.fc1_bias.as_ref().unwrap(), t);
            close("grad fc2_bias", got.fc2_bias.as_ref().unwrap(), want.fc2_bias.as_ref().unwrap(), t);
        }
    }

    #[test]
    fn candle_matches_rayon() {
        for (m, biases) in [(1, false), (3, true), (2, false)] {
            for last in [false, true] {
                check::<f64>(m, 3, 8, 5, 2, biases, last);
                check::<f32>(m, 2, 8, 6, 4, biases, last);
            }
        }
    }
}
