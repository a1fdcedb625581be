//! `cnnboost._core.FFC`: the FFC kernels for NumPy arrays and DLPack objects.

use super::array::{
    dispatch, expect_rank, expect_shape, input, input_dims, output, tuple, Host, Input, Reader,
};
use super::{backend, compute, to_py_err, work};
#[cfg(feature = "cuda")]
use crate::candle;
use crate::candle::ffc as candle_ffc;
use crate::kernels::ffc::{self, Combine, Config, Dims, Outputs, Params};
use crate::kernels::Float;
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Sequential Feature Filtering Classifier kernels (forward, backward, vote).
///
/// The object holds only the hyper-parameters; the parameters are passed to each call
/// (`ln_weight`/`ln_bias` stacked as `[L, C]`, `fc_weight` `[K, C]`, `fc_bias` `[K]`),
/// so that a framework can own them. Arrays may be NumPy arrays or any object with
/// `__dlpack__` (torch CPU tensors), float32 or float64, all of one dtype.
// The class lives in the module of the build it comes from (`cnnboost._core`, or
// `cnnboost_cuda` for the CUDA build), so that its `__module__` is importable.
#[cfg_attr(not(feature = "cuda"), pyclass(module = "cnnboost._core", name = "FFC", frozen))]
#[cfg_attr(feature = "cuda", pyclass(module = "cnnboost_cuda", name = "FFC", frozen))]
pub struct Ffc {
    cfg: Config,
}

/// The parameters of one call, as Python passed them.
#[derive(Clone, Copy)]
struct ParamArgs<'a, 'py> {
    ln_weight: &'a Bound<'py, PyAny>,
    ln_bias: &'a Bound<'py, PyAny>,
    fc_weight: &'a Bound<'py, PyAny>,
    fc_bias: &'a Bound<'py, PyAny>,
}

/// The arguments of `FFC.backward` after `grad_out`.
struct BackwardArgs<'a, 'py> {
    pooled: &'a Bound<'py, PyAny>,
    params: ParamArgs<'a, 'py>,
    hw: usize,
    outputs: Outputs,
}

/// The fixed arguments of one call, read and checked (NumPy arrays or CUDA tensors,
/// after the [`Reader`]).
struct Call<A> {
    lw: A,
    lb: A,
    fw: A,
    fb: A,
    k: usize,
}

impl<A> Call<A> {
    fn read<'py, R: Reader<'py, Arr = A>>(
        r: &R,
        cfg: &Config,
        c: usize,
        args: ParamArgs<'_, 'py>,
    ) -> PyResult<Self> {
        let ParamArgs { ln_weight, ln_bias, fc_weight, fc_bias } = args;
        let lw = r.shaped(ln_weight, "ln_weight", &[cfg.num_filters, c])?;
        let lb = r.shaped(ln_bias, "ln_bias", &[cfg.num_filters, c])?;
        let fw = r.read(fc_weight, "fc_weight")?;
        let k = expect_rank("fc_weight", R::dims(&fw), 2, "[num_classes, C]")?[0];
        expect_shape("fc_weight", R::dims(&fw), &[k, c])?;
        let fb = r.shaped(fc_bias, "fc_bias", &[k])?;
        Ok(Call { lw, lb, fw, fb, k })
    }
}

impl<'py, T: Element + Float> Call<Input<'py, T>> {
    fn params(&self) -> Params<'_, T> {
        Params {
            ln_weight: self.lw.slice(),
            ln_bias: self.lb.slice(),
            fc_weight: self.fw.slice(),
            fc_bias: self.fb.slice(),
        }
    }
}

/// The shape of the logits for `n` samples of `k` classes.
fn out_shape(cfg: &Config, outputs: Outputs, n: usize, k: usize) -> Vec<usize> {
    match outputs {
        Outputs::Ensemble => vec![n, k],
        Outputs::All => vec![cfg.num_outputs(), n, k],
    }
}

fn forward_t<'py, T: Element + Float>(
    x: &Bound<'py, PyAny>,
    cfg: &Config,
    params: ParamArgs<'_, 'py>,
    outputs: Outputs,
    channels_last: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = x.py();
    let xa = input::<T>(x, "x")?;
    let (n, c, hw) = input_dims(xa.shape(), channels_last)?;
    let map = xa.shape().len() == 4;
    let call = Call::read(&Host::<T>::new(), cfg, c, params)?;
    let (xs, p) = (xa.slice(), call.params());
    let d = Dims { n, c, hw: 1, k: call.k };
    let (out, pooled) = compute(py, work(n * c * hw, n * c * d.k), || {
        // A 4-d input is pooled here, once: the backward reads the pooled features
        // rather than the whole map.
        let pooled = map.then(|| super::pool_map(xs, n, c, hw, channels_last));
        let f0 = pooled.as_deref().unwrap_or(xs);
        backend!(ffc::forward, candle_ffc::forward_host, (cfg, d, f0, &p, outputs)).map(|out| (out, pooled))
    })?
    .map_err(to_py_err)?;
    let out_shape = out_shape(cfg, outputs, n, d.k);
    let pooled = match pooled {
        Some(v) => output(py, v, &[n, c])?,
        None => output(py, Vec::<T>::new(), &[0])?,
    };
    tuple(py, vec![output(py, out, &out_shape)?, pooled])
}

fn backward_t<'py, T: Element + Float>(
    grad_out: &Bound<'py, PyAny>,
    cfg: &Config,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (hw, outputs) = (a.hw, a.outputs);
    let py = grad_out.py();
    let nf = cfg.num_filters;
    let f0 = input::<T>(a.pooled, "pooled")?;
    let fshape = expect_rank("pooled", f0.shape(), 2, "[N, C]")?;
    let (n, c) = (fshape[0], fshape[1]);
    let call = Call::read(&Host::<T>::new(), cfg, c, a.params)?;
    let go = input::<T>(grad_out, "grad_out")?;
    expect_shape("grad_out", go.shape(), &out_shape(cfg, outputs, n, call.k))?;
    let d = Dims { n, c, hw, k: call.k };
    let (gos, f0s, p) = (go.slice(), f0.slice(), call.params());
    let g = compute(py, work(n * c, 2 * n * c * d.k), || {
        backend!(ffc::backward, candle_ffc::backward_host, (cfg, d, gos, &p, f0s, outputs))
    })?
    .map_err(to_py_err)?;
    tuple(
        py,
        vec![
            output(py, g.x, &[n, c])?,
            output(py, g.ln_weight, &[nf, c])?,
            output(py, g.ln_bias, &[nf, c])?,
            output(py, g.fc_weight, &[d.k, c])?,
            output(py, g.fc_bias, &[d.k])?,
        ],
    )
}

fn vote_t<'py, T: Element + Float>(
    x: &Bound<'py, PyAny>,
    cfg: &Config,
    params: ParamArgs<'_, 'py>,
    channels_last: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = x.py();
    let xa = input::<T>(x, "x")?;
    let (n, c, hw) = input_dims(xa.shape(), channels_last)?;
    let call = Call::read(&Host::<T>::new(), cfg, c, params)?;
    let d = Dims { n, c, hw, k: call.k };
    let (xs, p) = (xa.slice(), call.params());
    let scores = compute(py, work(n * c * hw, n * c * d.k * cfg.num_filters), || {
        if channels_last {
            // Pooled here (the kernel pools [N, C, H, W] maps itself).
            let pooled = super::pool_map(xs, n, c, hw, true);
            let d = Dims { hw: 1, ..d };
            backend!(ffc::vote, candle_ffc::vote_host, (cfg, d, &pooled, &p))
        } else {
            backend!(ffc::vote, candle_ffc::vote_host, (cfg, d, xs, &p))
        }
    })?
    .map_err(to_py_err)?;
    output(py, scores, &[n, d.k])
}

#[pymethods]
impl Ffc {
    #[new]
    #[pyo3(signature = (num_filters = 3, combine = "paper", eps = 1e-5))]
    fn new(num_filters: i64, combine: &str, eps: f64) -> PyResult<Self> {
        if num_filters < 1 {
            return Err(PyValueError::new_err(format!(
                "num_filters: expected an integer >= 1, got {num_filters}"
            )));
        }
        let cfg = Config::new(num_filters as usize, Combine::parse(combine).map_err(to_py_err)?, eps)
            .map_err(to_py_err)?;
        Ok(Ffc { cfg })
    }

    #[getter]
    fn num_filters(&self) -> usize {
        self.cfg.num_filters
    }
    #[getter]
    fn combine(&self) -> &'static str {
        match self.cfg.combine {
            Combine::Paper => "paper",
            Combine::Plain => "plain",
        }
    }
    #[getter]
    fn eps(&self) -> f64 {
        self.cfg.eps
    }
    /// J, the number of classifier outputs (2L+1 for "paper", L+1 for "plain").
    #[getter]
    fn num_outputs(&self) -> usize {
        self.cfg.num_outputs()
    }
    /// The weights `a_l` with `mean_j g_j = Σ_l a_l f_l` (the ensemble's linearity).
    fn ensemble_coeffs(&self) -> Vec<f64> {
        self.cfg.ensemble_coeffs()
    }

    fn __repr__(&self) -> String {
        format!(
            "FFC(num_filters={}, combine='{}', eps={})",
            self.cfg.num_filters,
            self.combine(),
            super::py_float(self.cfg.eps)
        )
    }

    /// Forward of `x` `[N, C]` or `[N, C, H, W]` (`[N, H, W, C]` with
    /// `channels_last=True`: a torch `channels_last` map permuted to its memory order).
    /// Returns `(out, pooled)`: `out` is `[N, K]` (ensemble: the mean logits) or
    /// `[J, N, K]` (all); `pooled` is the pooled `[N, C]` features of a 4-d `x` and
    /// empty for a 2-d `x`. `backward` takes the pooled features (a 2-d `x` is its own).
    #[pyo3(signature = (x, ln_weight, ln_bias, fc_weight, fc_bias, outputs = "ensemble", channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        x: &Bound<'py, PyAny>,
        ln_weight: &Bound<'py, PyAny>,
        ln_bias: &Bound<'py, PyAny>,
        fc_weight: &Bound<'py, PyAny>,
        fc_bias: &Bound<'py, PyAny>,
        outputs: &str,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let outputs = Outputs::parse(outputs).map_err(to_py_err)?;
        let params = ParamArgs { ln_weight, ln_bias, fc_weight, fc_bias };
        dispatch!(x, "x", forward_t(&self.cfg, params, outputs, channels_last) | forward_cuda)
    }

    /// Backward, from the pooled `[N, C]` input features (x itself for a 2-d x; the
    /// filter chain is recomputed from them). Returns `(grad_x, grad_ln_weight,
    /// grad_ln_bias, grad_fc_weight, grad_fc_bias)`. `grad_x` is `[N, C]`: for a 4-d
    /// input of `hw = H*W` it is the gradient of every pixel of each plane (broadcast
    /// it over `H×W`).
    #[pyo3(signature = (grad_out, pooled, ln_weight, ln_bias, fc_weight, fc_bias, hw = 1, outputs = "ensemble"))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        grad_out: &Bound<'py, PyAny>,
        pooled: &Bound<'py, PyAny>,
        ln_weight: &Bound<'py, PyAny>,
        ln_bias: &Bound<'py, PyAny>,
        fc_weight: &Bound<'py, PyAny>,
        fc_bias: &Bound<'py, PyAny>,
        hw: usize,
        outputs: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if hw == 0 {
            return Err(PyValueError::new_err("hw: expected H*W >= 1, got 0"));
        }
        let outputs = Outputs::parse(outputs).map_err(to_py_err)?;
        let args = BackwardArgs {
            pooled,
            params: ParamArgs { ln_weight, ln_bias, fc_weight, fc_bias },
            hw,
            outputs,
        };
        dispatch!(grad_out, "grad_out", backward_t(&self.cfg, &args) | backward_cuda)
    }

    /// Eval-mode voting: a `[N, K]` score whose row-wise argmax is the voted class:
    /// `votes[k]`, plus `0.5 *` the highest softmax probability among the outputs
    /// voting `k` for the classes tied for the most votes, when there is a tie. `x`
    /// and `channels_last` as in `forward`.
    #[pyo3(signature = (x, ln_weight, ln_bias, fc_weight, fc_bias, channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn vote<'py>(
        &self,
        x: &Bound<'py, PyAny>,
        ln_weight: &Bound<'py, PyAny>,
        ln_bias: &Bound<'py, PyAny>,
        fc_weight: &Bound<'py, PyAny>,
        fc_bias: &Bound<'py, PyAny>,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let params = ParamArgs { ln_weight, ln_bias, fc_weight, fc_bias };
        dispatch!(x, "x", vote_t(&self.cfg, params, channels_last) | vote_cuda)
    }
}

/// The CUDA parameters of one call: candle views (`p`) of the arguments held in `_held`.
#[cfg(feature = "cuda")]
struct CudaCall {
    p: candle_ffc::Params,
    k: usize,
    _held: Vec<super::dlpack::CudaIn>,
}

#[cfg(feature = "cuda")]
impl CudaCall {
    fn read(
        cfg: &Config,
        c: usize,
        like: (candle_core::DType, usize),
        params: ParamArgs<'_, '_>,
    ) -> PyResult<Self> {
        let r = super::dlpack::Cuda { like: Some(like) };
        let Call { lw, lb, fw, fb, k } = Call::read(&r, cfg, c, params)?;
        let p = candle_ffc::Params {
            ln_weight: (*lw).clone(),
            ln_bias: (*lb).clone(),
            fc_weight: (*fw).clone(),
            fc_bias: (*fb).clone(),
        };
        Ok(CudaCall { p, k, _held: vec![lw, lb, fw, fb] })
    }
}

/// `(x viewed as [N, C, HW], N, C, HW)` of a CUDA input.
#[cfg(feature = "cuda")]
fn cuda_features(x: &super::dlpack::CudaIn) -> PyResult<(candle_core::Tensor, usize, usize, usize)> {
    let (n, c, hw) = input_dims(x.dims(), false)?;
    super::dlpack::expect_samples("x", x.dims())?;
    Ok((x.reshape((n, c, hw)).map_err(super::dlpack::candle_err)?, n, c, hw))
}

#[cfg(feature = "cuda")]
fn forward_cuda<'py>(
    x: &Bound<'py, PyAny>,
    cfg: &Config,
    params: ParamArgs<'_, 'py>,
    outputs: Outputs,
    channels_last: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, run};
    super::no_channels_last_on_cuda(channels_last)?;
    let py = x.py();
    let xa = dlpack::input(x, "x", None)?;
    let map = xa.dims().len() == 4;
    let (x3, n, c, _) = cuda_features(&xa)?;
    let call = CudaCall::read(cfg, c, xa.like(), params)?;
    let (out, pooled) = run(py, xa.device(), || {
        let pooled = candle::gap(&x3)?;
        Ok((candle_ffc::forward(cfg, &pooled, &call.p, outputs)?, pooled))
    })?;
    let out_shape = out_shape(cfg, outputs, n, call.k);
    let id = xa.device_id;
    let pooled = if map {
        dlpack::output(py, pooled, &[n, c], id)?
    } else {
        dlpack::empty_output(py, xa.dtype(), id)?
    };
    tuple(py, vec![dlpack::output(py, out, &out_shape, id)?, pooled])
}

#[cfg(feature = "cuda")]
fn backward_cuda<'py>(
    grad_out: &Bound<'py, PyAny>,
    cfg: &Config,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (hw, outputs) = (a.hw, a.outputs);
    use super::dlpack::{self, run};
    let py = grad_out.py();
    let go = dlpack::input(grad_out, "grad_out", None)?;
    let f0 = dlpack::input(a.pooled, "pooled", Some(go.like()))?;
    let fshape = expect_rank("pooled", f0.dims(), 2, "[N, C]")?;
    let (n, c) = (fshape[0], fshape[1]);
    dlpack::expect_samples("pooled", fshape)?;
    let call = CudaCall::read(cfg, c, go.like(), a.params)?;
    expect_shape("grad_out", go.dims(), &out_shape(cfg, outputs, n, call.k))?;
    let g = run(py, go.device(), || {
        let g = candle_ffc::backward(cfg, &go, &call.p, &f0, outputs)?;
        Ok(candle_ffc::Grads { x: g.x.affine(1.0 / hw as f64, 0.0)?, ..g })
    })?;
    let (id, nf, k) = (go.device_id, cfg.num_filters, call.k);
    tuple(
        py,
        vec![
            dlpack::output(py, g.x, &[n, c], id)?,
            dlpack::output(py, g.ln_weight, &[nf, c], id)?,
            dlpack::output(py, g.ln_bias, &[nf, c], id)?,
            dlpack::output(py, g.fc_weight, &[k, c], id)?,
            dlpack::output(py, g.fc_bias, &[k], id)?,
        ],
    )
}

#[cfg(feature = "cuda")]
fn vote_cuda<'py>(
    x: &Bound<'py, PyAny>,
    cfg: &Config,
    params: ParamArgs<'_, 'py>,
    channels_last: bool,
) -> PyResult<Bound<'py, PyAny>> {
    use super::dlpack::{self, run};
    super::no_channels_last_on_cuda(channels_last)?;
    let py = x.py();
    let xa = dlpack::input(x, "x", None)?;
    let (x3, n, c, _) = cuda_features(&xa)?;
    let call = CudaCall::read(cfg, c, xa.like(), params)?;
    let scores = run(py, xa.device(), || candle_ffc::vote(cfg, &candle::gap(&x3)?, &call.p))?;
    dlpack::output(py, scores, &[n, call.k], xa.device_id)
}
