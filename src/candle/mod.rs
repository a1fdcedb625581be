//! The device-generic implementation: the four modules in candle tensor ops, run on
//! whatever [`Device`] the tensors live on — candle's CPU device in the default build
//! (where it checks itself against the rayon kernels, in `cargo test` and through
//! `cnnboost.set_backend("candle")` in the Python tests), CUDA with the `cuda`
//! feature.
//!
//! One file per module, each with the same split as its rayon twin in
//! [`crate::kernels`]: a `forward` that returns what the `backward` needs, and a
//! `backward` that returns every gradient. The memory-bound passes over the maps
//! (pooling, scaling, `Σ_hw grad·x`) are written out; the small `[N, C]`-sized part
//! of each backward (batch norm, layer norm, the scorers, the heads) is candle's
//! autograd over a recomputed forward ([`vjp`]), so there is one formula for it, the
//! forward's.
//!
//! Each file also has `*_host` adapters with the rayon kernels' signatures (slices in,
//! `Vec`s out): they validate with the rayon module's own checks and run the candle
//! path on the CPU device, which is how the bindings switch backends.

pub mod ab;
pub mod afi;
pub mod borrowed;
pub mod ffc;
pub mod ssm;

use crate::kernels::{Error, Float, Result};
use candle_core::Var;
pub use candle_core::{DType, Device, Tensor};

/// A candle failure as the kernels' error (candle only fails here on an internal
/// inconsistency or a device error: the inputs were validated before).
pub fn err(e: candle_core::Error) -> Error {
    Error::value("candle", "the candle backend to succeed", e.to_string())
}

/// `Result` over candle's error, for the bodies that are all candle calls.
pub type CResult<T> = candle_core::Result<T>;

/// A slice as a tensor of the given shape on `dev` (a copy).
pub fn tensor<T: Float>(data: &[T], dims: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::from_slice(data, dims, dev).map_err(err)
}

/// A tensor's elements, row-major, on the host.
pub fn host<T: Float>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all().and_then(|f| f.to_vec1::<T>()).map_err(err)
}

/// `kernels::channels_last::pool` on the CPU device: the `[N, C]` means of the rows
/// of each `[HW, C]` sample of `x`. Fails only on a bug, like [`pool_host`].
pub fn pool_host_channels_last<T: Float>(x: &[T], n: usize, hw: usize, c: usize) -> Vec<T> {
    tensor(x, &[n, hw, c], &Device::Cpu)
        .and_then(|t| t.mean(1).map_err(err))
        .and_then(|t| host(&t))
        .expect("candle pooling of a checked slice")
}

/// `kernels::pool::global_avg_pool` on the CPU device: the means of the `hw`-long
/// planes of `x`. Only fails on a bug (the caller checked the sizes); `compute` turns
/// that into a `RuntimeError`.
pub fn pool_host<T: Float>(x: &[T], hw: usize) -> Vec<T> {
    tensor(x, &[x.len() / hw, hw], &Device::Cpu)
        .and_then(|t| t.mean(1).map_err(err))
        .and_then(|t| host(&t))
        .expect("candle pooling of a checked slice")
}

/// The vector-Jacobian product of `f` at `inputs` with cotangent `cot` (the shape of
/// `f`'s output): the gradient of `Σ f(inputs) · cot` with respect to each input,
/// zeros for an input `f` does not use; and `f(inputs)` itself, detached.
pub fn vjp(
    inputs: &[&Tensor],
    cot: &Tensor,
    f: impl FnOnce(&[Tensor]) -> CResult<Tensor>,
) -> CResult<(Tensor, Vec<Tensor>)> {
    let vars = inputs.iter().map(|t| Var::from_tensor(t)).collect::<CResult<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let grads = (&out * cot)?.sum_all()?.backward()?;
    let g = ts
        .iter()
        .map(|t| grads.get(t).map_or_else(|| t.zeros_like(), |g| Ok(g.clone())))
        .collect::<CResult<_>>()?;
    Ok((out.detach(), g))
}

/// `GAP` of `[N, C, HW]`: `[N, C]`.
pub fn gap(x: &Tensor) -> CResult<Tensor> {
    x.mean(2)
}

/// `x · s` with `s` `[N, C]` spread over each `HW` plane of `x` `[N, C, HW]`.
pub fn scale_planes(x: &Tensor, s: &Tensor) -> CResult<Tensor> {
    x.broadcast_mul(&s.unsqueeze(2)?)
}

/// `Σ_hw a·b` per plane of two `[N, C, HW]` maps: `[N, C]`.
pub fn plane_dots(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    (a * b)?.sum(2)
}

/// The gradient of a map from its gradient through the gate (`gate` `[N, C]` times
/// `grad_out`) and through the pooling (`grad_pooled / HW` on every plane).
pub fn map_grad(grad_out: &Tensor, gate: &Tensor, grad_pooled: &Tensor) -> CResult<Tensor> {
    let hw = grad_out.dim(2)?;
    scale_planes(grad_out, gate)?.broadcast_add(&grad_pooled.affine(1.0 / hw as f64, 0.0)?.unsqueeze(2)?)
}

/// `1 / (1 + e^-v)`.
pub fn sigmoid(v: &Tensor) -> CResult<Tensor> {
    (v.neg()?.exp()? + 1.0)?.recip()
}

/// Batch statistics of the columns of `t` `[N, C]`: mean, `1/sqrt(var + eps)` with
/// the biased variance, and the unbiased variance (for the running update).
pub struct BatchStats {
    pub mean: Tensor,
    pub invstd: Tensor,
    pub var_unbiased: Tensor,
}

pub fn batch_stats(t: &Tensor, eps: f64) -> CResult<BatchStats> {
    let n = t.dim(0)?;
    let mean = t.mean(0)?;
    let sq = t.broadcast_sub(&mean)?.sqr()?.sum(0)?;
    let invstd = (sq.affine(1.0 / n as f64, eps)?).sqrt()?.recip()?;
    let var_unbiased = sq.affine(1.0 / (n.max(2) - 1) as f64, 0.0)?;
    Ok(BatchStats { mean, invstd, var_unbiased })
}

/// Batch normalisation of the columns of `t` `[N, C]` (affine `weight`/`bias`):
/// with the batch's statistics computed in the graph (`stats = None`, training), or
/// with fixed ones (`Some((mean, invstd))`).
pub fn batch_norm(
    t: &Tensor,
    stats: Option<(&Tensor, &Tensor)>,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> CResult<Tensor> {
    let normalized = match stats {
        Some((mean, invstd)) => t.broadcast_sub(mean)?.broadcast_mul(invstd)?,
        None => {
            let centred = t.broadcast_sub(&t.mean_keepdim(0)?)?;
            let invstd = (centred.sqr()?.mean_keepdim(0)? + eps)?.sqrt()?.recip()?;
            centred.broadcast_mul(&invstd)?
        }
    };
    normalized.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `x Wᵀ + b` for `x` `[R, in]`, torch-layout `w` `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Random data and comparisons for the candle-vs-rayon tests.
    use crate::kernels::Float;

    /// Deterministic pseudo-random values in [-1, 1) (an LCG: no dependency needed).
    pub fn rand<T: Float>(len: usize, seed: u64) -> Vec<T> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                T::of(((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
            })
            .collect()
    }

    /// Asserts `a ≈ b` elementwise within `tol · (1 + |b|)`.
    #[track_caller]
    pub fn close<T: Float>(what: &str, a: &[T], b: &[T], tol: f64) {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let (x, y) = (x.as_f64(), y.as_f64());
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: candle {x} vs rayon {y}");
        }
    }

    /// The tolerance for a dtype: float32 sums run in f32 in candle, in f64 in rayon.
    pub fn tol<T: Float>() -> f64 {
        if T::NAME == "float32" {
            2e-4
        } else {
            1e-10
        }
    }
}
