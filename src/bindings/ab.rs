//! `cnnboost._core.AB`: the AB kernels for NumPy arrays and DLPack objects.

use super::array::{dispatch, expect_rank, expect_shape, input, output, tuple, Host, Input, Reader};
use super::{backend, compute, to_py_err, work};
use crate::candle::ab as candle_ab;
use crate::kernels::ab::{self, Config, Params, Running};
use crate::kernels::Float;
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Accuracy Booster block kernels (forward, backward).
///
/// The object holds only the hyper-parameters; parameters and running statistics are
/// passed to each call: `conv_weight` `[C, C/groups, 1, 1]` (or `[C, C/groups]`),
/// `conv_bias` `[C]` or None, `bn_weight`/`bn_bias`/`running_mean`/`running_var`
/// `[C]`. The running statistics are only read (in eval); in training the forward
/// returns the batch mean and unbiased variance for the caller's running update.
// The class lives in the module of the build it comes from (`cnnboost._core`, or
// `cnnboost_cuda` for the CUDA build), so that its `__module__` is importable.
#[cfg_attr(not(feature = "cuda"), pyclass(module = "cnnboost._core", name = "AB", frozen))]
#[cfg_attr(feature = "cuda", pyclass(module = "cnnboost_cuda", name = "AB", frozen))]
pub struct Ab {
    channels: usize,
    groups: usize,
    eps: f64,
}

/// The parameters of one call, as Python passed them.
#[derive(Clone, Copy)]
struct ParamArgs<'a, 'py> {
    conv_weight: &'a Bound<'py, PyAny>,
    conv_bias: Option<&'a Bound<'py, PyAny>>,
    bn_weight: &'a Bound<'py, PyAny>,
    bn_bias: &'a Bound<'py, PyAny>,
}

/// The arguments of `AB.forward` after `x`.
struct ForwardArgs<'a, 'py> {
    params: ParamArgs<'a, 'py>,
    running_mean: &'a Bound<'py, PyAny>,
    running_var: &'a Bound<'py, PyAny>,
    training: bool,
    channels_last: bool,
}

/// The arguments of `AB.backward` after `grad_out`.
struct BackwardArgs<'a, 'py> {
    x: &'a Bound<'py, PyAny>,
    pooled: &'a Bound<'py, PyAny>,
    mean: &'a Bound<'py, PyAny>,
    invstd: &'a Bound<'py, PyAny>,
    params: ParamArgs<'a, 'py>,
    training: bool,
    channels_last: bool,
}

/// The parameters of one call, read and checked (NumPy arrays or CUDA tensors,
/// after the [`Reader`]).
struct CallParams<A> {
    w: A,
    b: Option<A>,
    gamma: A,
    beta: A,
}

impl<A> CallParams<A> {
    fn read<'py, R: Reader<'py, Arr = A>>(r: &R, ab: &Ab, args: ParamArgs<'_, 'py>) -> PyResult<Self> {
        let ParamArgs { conv_weight, conv_bias, bn_weight, bn_bias } = args;
        let c = ab.channels;
        let cg = c / ab.groups;
        let w = r.read(conv_weight, "conv_weight")?;
        let want: &[usize] = if R::dims(&w).len() == 4 { &[c, cg, 1, 1] } else { &[c, cg] };
        expect_shape("conv_weight", R::dims(&w), want)?;
        let b = r.optional(conv_bias, "conv_bias", &[c])?;
        let gamma = r.shaped(bn_weight, "bn_weight", &[c])?;
        let beta = r.shaped(bn_bias, "bn_bias", &[c])?;
        Ok(CallParams { w, b, gamma, beta })
    }
}

impl<'py, T: Element + Float> CallParams<Input<'py, T>> {
    fn params(&self) -> Params<'_, T> {
        Params {
            conv_weight: self.w.slice(),
            conv_bias: self.b.as_ref().map(|b| b.slice()),
            bn_weight: self.gamma.slice(),
            bn_bias: self.beta.slice(),
        }
    }
}

/// What the backward reads back from the forward, checked: `(pooled, mean, invstd)`.
fn read_saved<'py, R: Reader<'py>>(
    r: &R,
    ab: &Ab,
    n: usize,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<(R::Arr, R::Arr, R::Arr)> {
    let c = ab.channels;
    Ok((
        r.shaped(a.pooled, "pooled", &[n, c])?,
        r.shaped(a.mean, "mean", &[c])?,
        r.shaped(a.invstd, "invstd", &[c])?,
    ))
}

impl Ab {
    fn config(&self, training: bool, channels_last: bool) -> Config {
        Config { channels: self.channels, groups: self.groups, eps: self.eps, training, channels_last }
    }

    /// `(N, H*W)` of an `[N, C, H, W]` map (`[N, H, W, C]` when `channels_last`) with
    /// this block's channel count.
    fn map_dims(&self, arg: &str, shape: &[usize], channels_last: bool) -> PyResult<(usize, usize)> {
        let (layout, c_dim, (h, w)) =
            if channels_last { ("[N, H, W, C]", 3, (1, 2)) } else { ("[N, C, H, W]", 1, (2, 3)) };
        let s = expect_rank(arg, shape, 4, layout)?;
        if s[c_dim] != self.channels {
            return Err(PyValueError::new_err(format!(
                "{arg}: expected {} channels in dim {c_dim}, got shape {}",
                self.channels,
                super::array::fmt_shape(shape)
            )));
        }
        let hw =
            s[h].checked_mul(s[w]).ok_or_else(|| PyValueError::new_err(format!("{arg}: H*W overflows")))?;
        Ok((s[0], hw))
    }
}

fn forward_t<'py, T: Element + Float>(
    x: &Bound<'py, PyAny>,
    ab: &Ab,
    a: &ForwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = x.py();
    let xa = input::<T>(x, "x")?;
    let shape = xa.shape().to_vec();
    let (n, hw) = ab.map_dims("x", &shape, a.channels_last)?;
    let r = Host::<T>::new();
    let call = CallParams::read(&r, ab, a.params)?;
    let rm = r.shaped(a.running_mean, "running_mean", &[ab.channels])?;
    let rv = r.shaped(a.running_var, "running_var", &[ab.channels])?;
    let cfg = ab.config(a.training, a.channels_last);
    let (xs, p, running) = (xa.slice(), call.params(), Running { mean: rm.slice(), var: rv.slice() });
    let size = work(n * ab.channels * hw, n * ab.channels * (ab.channels / ab.groups));
    let f =
        compute(py, size, || backend!(ab::forward, candle_ab::forward_host, (&cfg, xs, n, hw, &p, running)))?
            .map_err(to_py_err)?;
    let c = ab.channels;
    let var_len = f.var_unbiased.len();
    tuple(
        py,
        vec![
            output(py, f.out, &shape)?,
            output(py, f.pooled, &[n, c])?,
            output(py, f.mean, &[c])?,
            output(py, f.invstd, &[c])?,
            output(py, f.var_unbiased, &[var_len])?,
        ],
    )
}

fn backward_t<'py, T: Element + Float>(
    grad_out: &Bound<'py, PyAny>,
    ab: &Ab,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = grad_out.py();
    let go = input::<T>(grad_out, "grad_out")?;
    let xa = input::<T>(a.x, "x")?;
    let shape = xa.shape().to_vec();
    let (n, hw) = ab.map_dims("x", &shape, a.channels_last)?;
    expect_shape("grad_out", go.shape(), &shape)?;
    let c = ab.channels;
    let r = Host::<T>::new();
    let (y, mu, is) = read_saved(&r, ab, n, a)?;
    let call = CallParams::read(&r, ab, a.params)?;
    let cfg = ab.config(a.training, a.channels_last);
    let (gos, xs, ys, mus, iss, p) =
        (go.slice(), xa.slice(), y.slice(), mu.slice(), is.slice(), call.params());
    let size = work(2 * n * c * hw, 2 * n * c * (c / ab.groups));
    let g = compute(py, size, || {
        backend!(ab::backward, candle_ab::backward_host, (&cfg, gos, xs, n, hw, &p, ys, mus, iss))
    })?
    .map_err(to_py_err)?;
    let cg = c / ab.groups;
    let bias_len = g.conv_bias.len();
    tuple(
        py,
        vec![
            output(py, g.x, &shape)?,
            output(py, g.conv_weight, &[c, cg, 1, 1])?,
            output(py, g.conv_bias, &[bias_len])?,
            output(py, g.bn_weight, &[c])?,
            output(py, g.bn_bias, &[c])?,
        ],
    )
}

#[pymethods]
impl Ab {
    /// `groups=None` is depthwise (the AB block), `groups=1` is AB-Plus; any divisor
    /// of `channels` works.
    #[new]
    #[pyo3(signature = (channels, groups = None, eps = 1e-5))]
    fn new(channels: i64, groups: Option<i64>, eps: f64) -> PyResult<Self> {
        if channels < 1 {
            return Err(PyValueError::new_err(format!("channels: expected an integer >= 1, got {channels}")));
        }
        let g = groups.unwrap_or(channels);
        if g < 1 || channels % g != 0 {
            return Err(PyValueError::new_err(format!(
                "groups: expected a divisor of channels = {channels} (or None), got {g}"
            )));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(PyValueError::new_err(format!("eps: expected a finite number > 0, got {eps}")));
        }
        Ok(Ab { channels: channels as usize, groups: g as usize, eps })
    }

    #[getter]
    fn channels(&self) -> usize {
        self.channels
    }
    #[getter]
    fn groups(&self) -> usize {
        self.groups
    }
    #[getter]
    fn eps(&self) -> f64 {
        self.eps
    }

    fn __repr__(&self) -> String {
        format!("AB(channels={}, groups={}, eps={})", self.channels, self.groups, super::py_float(self.eps))
    }

    /// Forward of `x` `[N, C, H, W]` (`[N, H, W, C]` with `channels_last=True`: a
    /// torch `channels_last` map permuted to its memory order). Returns `(out, pooled,
    /// mean, invstd, var_unbiased)`: `out` like `x`; `pooled` `[N, C]`,
    /// `mean`/`invstd` `[C]` (the batch's in training, from the running statistics in
    /// eval) for `backward`; `var_unbiased` `[C]` in training (for the running
    /// update), empty in eval.
    #[pyo3(signature = (x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        x: &Bound<'py, PyAny>,
        conv_weight: &Bound<'py, PyAny>,
        conv_bias: Option<&Bound<'py, PyAny>>,
        bn_weight: &Bound<'py, PyAny>,
        bn_bias: &Bound<'py, PyAny>,
        running_mean: &Bound<'py, PyAny>,
        running_var: &Bound<'py, PyAny>,
        training: bool,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let params = ParamArgs { conv_weight, conv_bias, bn_weight, bn_bias };
        let args = ForwardArgs { params, running_mean, running_var, training, channels_last };
        dispatch!(x, "x", forward_t(self, &args) | forward_cuda)
    }

    /// Backward (`grad_out` and `x` in the forward's layout). Returns `(grad_x,
    /// grad_conv_weight [C, C/groups, 1, 1], grad_conv_bias ([C], or empty without a
    /// bias), grad_bn_weight, grad_bn_bias)`.
    #[pyo3(signature = (grad_out, x, pooled, mean, invstd, conv_weight, conv_bias, bn_weight, bn_bias, training, channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        grad_out: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        pooled: &Bound<'py, PyAny>,
        mean: &Bound<'py, PyAny>,
        invstd: &Bound<'py, PyAny>,
        conv_weight: &Bound<'py, PyAny>,
        conv_bias: Option<&Bound<'py, PyAny>>,
        bn_weight: &Bound<'py, PyAny>,
        bn_bias: &Bound<'py, PyAny>,
        training: bool,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let params = ParamArgs { conv_weight, conv_bias, bn_weight, bn_bias };
        let args = BackwardArgs { x, pooled, mean, invstd, params, training, channels_last };
        dispatch!(grad_out, "grad_out", backward_t(self, &args) | backward_cuda)
    }
}

/// [`forward_t`] for CUDA tensors: the candle implementation on the GPU.
#[cfg(feature = "cuda")]
fn forward_cuda<'py>(
    x: &Bound<'py, PyAny>,
    ab: &Ab,
    a: &ForwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, run};
    let py = x.py();
    let xa = dlpack::input(x, "x", None)?;
    let like = (xa.dtype(), xa.device_id);
    let shape = xa.dims().to_vec();
    dlpack::expect_samples("x", &shape)?;
    super::no_channels_last_on_cuda(a.channels_last)?;
    let (n, hw) = ab.map_dims("x", &shape, false)?;
    let c = ab.channels;
    if a.training && n < 2 {
        return Err(PyValueError::new_err(format!(
            "x: expected more than 1 sample in training (batch statistics need two), got a batch of {n}"
        )));
    }
    let r = dlpack::Cuda { like: Some(like) };
    let p = cuda_params(&r, ab, a.params)?;
    let rm = r.shaped(a.running_mean, "running_mean", &[c])?;
    let rv = r.shaped(a.running_var, "running_var", &[c])?;
    let cfg = ab.config(a.training, false);
    let dev = xa.device().clone();
    let f = run(py, &dev, || candle_ab::forward(&cfg, &xa.reshape((n, c, hw))?, &p.params, (&rm, &rv)))?;
    let id = xa.device_id;
    let var = match f.var_unbiased {
        Some(v) => dlpack::output(py, v, &[c], id)?,
        None => dlpack::empty_output(py, like.0, id)?,
    };
    tuple(
        py,
        vec![
            dlpack::output(py, f.out, &shape, id)?,
            dlpack::output(py, f.pooled, &[n, c], id)?,
            dlpack::output(py, f.mean, &[c], id)?,
            dlpack::output(py, f.invstd, &[c], id)?,
            var,
        ],
    )
}

/// [`backward_t`] for CUDA tensors.
#[cfg(feature = "cuda")]
fn backward_cuda<'py>(
    grad_out: &Bound<'py, PyAny>,
    ab: &Ab,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, run};
    let py = grad_out.py();
    let go = dlpack::input(grad_out, "grad_out", None)?;
    let like = (go.dtype(), go.device_id);
    let xa = dlpack::input(a.x, "x", Some(like))?;
    let shape = xa.dims().to_vec();
    dlpack::expect_samples("x", &shape)?;
    super::no_channels_last_on_cuda(a.channels_last)?;
    let (n, hw) = ab.map_dims("x", &shape, false)?;
    dlpack::expect_shape("grad_out", &go, &shape)?;
    let c = ab.channels;
    let r = dlpack::Cuda { like: Some(like) };
    let (y, mu, is) = read_saved(&r, ab, n, a)?;
    let p = cuda_params(&r, ab, a.params)?;
    let cfg = ab.config(a.training, false);
    let dev = xa.device().clone();
    let dims = (n, c, hw);
    let g = run(py, &dev, || {
        candle_ab::backward(&cfg, &go.reshape(dims)?, &xa.reshape(dims)?, &p.params, &y, &mu, &is)
    })?;
    let (id, cg) = (xa.device_id, c / ab.groups);
    let bias = match g.conv_bias {
        Some(b) => dlpack::output(py, b, &[c], id)?,
        None => dlpack::empty_output(py, like.0, id)?,
    };
    tuple(
        py,
        vec![
            dlpack::output(py, g.x, &shape, id)?,
            dlpack::output(py, g.conv_weight, &[c, cg, 1, 1], id)?,
            bias,
            dlpack::output(py, g.bn_weight, &[c], id)?,
            dlpack::output(py, g.bn_bias, &[c], id)?,
        ],
    )
}

/// The CUDA parameters of one call, read in place and checked; `params` holds
/// candle views of them (kept alive by `_held`).
#[cfg(feature = "cuda")]
struct CudaParams {
    params: candle_ab::Params,
    _held: Vec<super::dlpack::CudaIn>,
}

#[cfg(feature = "cuda")]
fn cuda_params(r: &super::dlpack::Cuda, ab: &Ab, args: ParamArgs<'_, '_>) -> PyResult<CudaParams> {
    let CallParams { w, b, gamma, beta } = CallParams::read(r, ab, args)?;
    let (c, cg) = (ab.channels, ab.channels / ab.groups);
    let err = |e: candle_core::Error| PyValueError::new_err(e.to_string());
    let params = candle_ab::Params {
        conv_weight: w.reshape((c, cg)).map_err(err)?,
        conv_bias: b.as_ref().map(|b| (**b).clone()),
        bn_weight: (*gamma).clone(),
        bn_bias: (*beta).clone(),
    };
    let mut held = vec![w, gamma, beta];
    held.extend(b);
    Ok(CudaParams { params, _held: held })
}
