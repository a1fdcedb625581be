//! `cnnboost._core.SSM`: the SSM kernels for NumPy arrays and DLPack objects.

use super::array::{
    dispatch, expect_rank, expect_shape, fmt_shape, input, input_dims, items, list, output, tuple, Host,
    Input, Reader,
};
use super::{backend, compute, to_py_err, work};
#[cfg(feature = "cuda")]
use crate::candle;
use crate::candle::ssm as candle_ssm;
use crate::kernels::ssm::{self, BnParams, Config, Head, Saved};
use crate::kernels::{Float, Outputs};
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Split-and-Share Module kernels (forward, backward).
///
/// The object holds only the hyper-parameters; the parameters are passed to each call
/// as lists, one array per head (`fc_weights[h]` `[K, (h+1)·n]`, `fc_biases[h]` `[K]`)
/// or per normalised head (`bn_weights[h]`, `bn_biases[h]`, `running_means[h]`,
/// `running_vars[h]`, each `[(h+1)·n]`), with `n = C / num_heads`. The normalised
/// heads are the first `num_heads - 1` (all `num_heads` with `norm_last_head`).
/// Arrays may be NumPy arrays or any object with `__dlpack__` (torch CPU tensors),
/// float32 or float64, all of one dtype.
// The class lives in the module of the build it comes from (`cnnboost._core`, or
// `cnnboost_cuda` for the CUDA build), so that its `__module__` is importable.
#[cfg_attr(not(feature = "cuda"), pyclass(module = "cnnboost._core", name = "SSM", frozen))]
#[cfg_attr(feature = "cuda", pyclass(module = "cnnboost_cuda", name = "SSM", frozen))]
pub struct Ssm {
    num_heads: usize,
    norm_last_head: bool,
    eps: f64,
}

impl Ssm {
    fn config(&self, num_classes: usize, training: bool, outputs: Outputs) -> Config {
        Config {
            num_heads: self.num_heads,
            num_classes,
            norm_last_head: self.norm_last_head,
            eps: self.eps,
            training,
            all_outputs: outputs == Outputs::All,
        }
    }

    /// H, the number of heads with BN + ReLU.
    fn normalised(&self) -> usize {
        self.config(1, true, Outputs::Ensemble).normalised_heads()
    }
}

/// `n = C / G` for a `[N, C]` feature named `arg`, or a `ValueError`.
fn split_of(arg: &str, shape: &[usize], c: usize, g: usize) -> PyResult<usize> {
    if c == 0 || c % g != 0 {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a channel count C (dim 1) that num_heads = {g} divides, got shape {}",
            fmt_shape(shape)
        )));
    }
    Ok(c / g)
}

/// The per-head parameters of one call, read and checked (NumPy arrays or CUDA
/// tensors, after the [`Reader`]).
struct Params<A> {
    fc_weights: Vec<A>,
    fc_biases: Vec<A>,
    bn_weights: Vec<A>,
    bn_biases: Vec<A>,
    /// Empty for the backward (it uses the saved statistics).
    running_means: Vec<A>,
    running_vars: Vec<A>,
    k: usize,
}

/// The arrays of a list argument, the `h`-th of shape `shape(h)`.
fn read_list<'py, R: Reader<'py>>(
    r: &R,
    obj: &Bound<'py, PyAny>,
    arg: &str,
    len: usize,
    what: &str,
    shape: impl Fn(usize) -> Vec<usize>,
) -> PyResult<Vec<R::Arr>> {
    let mut out = Vec::with_capacity(len);
    for (h, item) in items(obj, arg, len, what)?.iter().enumerate() {
        out.push(r.shaped(item, &format!("{arg}[{h}]"), &shape(h))?);
    }
    Ok(out)
}

/// The parameter lists of one call, as Python passed them.
#[derive(Clone, Copy)]
struct Lists<'a, 'py> {
    fc_weights: &'a Bound<'py, PyAny>,
    fc_biases: &'a Bound<'py, PyAny>,
    bn_weights: &'a Bound<'py, PyAny>,
    bn_biases: &'a Bound<'py, PyAny>,
    /// `(running_means, running_vars)` for the forward, `None` for the backward.
    running: Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>,
}

/// The arguments of `SSM.forward` after `x`.
struct ForwardArgs<'a, 'py> {
    lists: Lists<'a, 'py>,
    training: bool,
    outputs: Outputs,
    channels_last: bool,
}

/// The arguments of `SSM.backward` after `grad_out`.
struct BackwardArgs<'a, 'py> {
    pooled: &'a Bound<'py, PyAny>,
    mean: &'a Bound<'py, PyAny>,
    invstd: &'a Bound<'py, PyAny>,
    lists: Lists<'a, 'py>,
    hw: usize,
    training: bool,
    outputs: Outputs,
}

impl<A> Params<A> {
    fn read<'py, R: Reader<'py, Arr = A>>(
        r: &R,
        m: &Ssm,
        split: usize,
        lists: Lists<'_, 'py>,
    ) -> PyResult<Self> {
        let Lists { fc_weights, fc_biases, bn_weights, bn_biases, running } = lists;
        let (g, hn) = (m.num_heads, m.normalised());
        let width = |h: usize| vec![(h + 1) * split];
        let heads = format!("one per head: num_heads = {g}");
        let normed = format!(
            "one per normalised head: {hn} = num_heads{}",
            if m.norm_last_head { " (norm_last_head)" } else { " - 1" }
        );
        // K comes from the first head's weight.
        let first = items(fc_weights, "fc_weights", g, &heads)?;
        let w0 = r.read(&first[0], "fc_weights[0]")?;
        let k = expect_rank("fc_weights[0]", R::dims(&w0), 2, "[num_classes, C / num_heads]")?[0];
        drop(w0);
        let fc_weights = read_list(r, fc_weights, "fc_weights", g, &heads, |h| vec![k, (h + 1) * split])?;
        let fc_biases = read_list(r, fc_biases, "fc_biases", g, &heads, |_| vec![k])?;
        let bn_weights = read_list(r, bn_weights, "bn_weights", hn, &normed, width)?;
        let bn_biases = read_list(r, bn_biases, "bn_biases", hn, &normed, width)?;
        let (running_means, running_vars) = match running {
            Some((means, vars)) => (
                read_list(r, means, "running_means", hn, &normed, width)?,
                read_list(r, vars, "running_vars", hn, &normed, width)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Params { fc_weights, fc_biases, bn_weights, bn_biases, running_means, running_vars, k })
    }
}

impl<'py, T: Element + Float> Params<Input<'py, T>> {
    fn heads(&self) -> Vec<Head<'_, T>> {
        fn running<'a, T: Element>(v: &'a [Input<'_, T>], h: usize) -> &'a [T] {
            v.get(h).map_or(&[], |a| a.slice())
        }
        (0..self.fc_weights.len())
            .map(|h| Head {
                fc_weight: self.fc_weights[h].slice(),
                fc_bias: self.fc_biases[h].slice(),
                bn: (h < self.bn_weights.len()).then(|| BnParams {
                    weight: self.bn_weights[h].slice(),
                    bias: self.bn_biases[h].slice(),
                    running_mean: running(&self.running_means, h),
                    running_var: running(&self.running_vars, h),
                }),
            })
            .collect()
    }
}

fn forward_t<'py, T: Element + Float>(
    x: &Bound<'py, PyAny>,
    m: &Ssm,
    a: &ForwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = x.py();
    let xa = input::<T>(x, "x")?;
    let channels_last = a.channels_last;
    let (n, c, hw) = input_dims(xa.shape(), channels_last)?;
    let split = split_of("x", xa.shape(), c, m.num_heads)?;
    let map = xa.shape().len() == 4;
    let p = Params::read(&Host::<T>::new(), m, split, a.lists)?;
    let cfg = m.config(p.k, a.training, a.outputs);
    let (xs, heads) = (xa.slice(), p.heads());
    let (f, pooled) = compute(py, work(n * c * hw, n * c * p.k), || {
        // A 4-d input is pooled here, once: the backward reads the pooled features
        // rather than the whole map.
        let pooled = map.then(|| super::pool_map(xs, n, c, hw, channels_last));
        let feats = pooled.as_deref().unwrap_or(xs);
        backend!(ssm::forward, candle_ssm::forward_host, (&cfg, feats, n, c, &heads)).map(|f| (f, pooled))
    })?
    .map_err(to_py_err)?;
    let pooled = match pooled {
        Some(v) => output(py, v, &[n, c])?,
        None => output(py, Vec::<T>::new(), &[0])?,
    };
    let (len, var_len) = (f.mean.len(), f.var_unbiased.len());
    tuple(
        py,
        vec![
            output(py, f.out, &cfg.out_shape(n))?,
            output(py, f.mean, &[len])?,
            output(py, f.invstd, &[len])?,
            output(py, f.var_unbiased, &[var_len])?,
            pooled,
        ],
    )
}

fn backward_t<'py, T: Element + Float>(
    grad_out: &Bound<'py, PyAny>,
    m: &Ssm,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = grad_out.py();
    let feats = input::<T>(a.pooled, "pooled")?;
    let shape = expect_rank("pooled", feats.shape(), 2, "[N, C]")?;
    let (n, c) = (shape[0], shape[1]);
    let split = split_of("pooled", shape, c, m.num_heads)?;
    let p = Params::read(&Host::<T>::new(), m, split, a.lists)?;
    let cfg = m.config(p.k, a.training, a.outputs);
    let len = ssm::stats_len(&cfg, c);
    let mu = input::<T>(a.mean, "mean")?;
    expect_shape("mean", mu.shape(), &[len])?;
    let rs = input::<T>(a.invstd, "invstd")?;
    expect_shape("invstd", rs.shape(), &[len])?;
    let go = input::<T>(grad_out, "grad_out")?;
    expect_shape("grad_out", go.shape(), &cfg.out_shape(n))?;
    let (gos, xs, heads) = (go.slice(), feats.slice(), p.heads());
    let saved = Saved { mean: mu.slice(), invstd: rs.slice() };
    let hw = a.hw;
    let mut g = compute(py, work(n * c, 2 * n * c * p.k), || {
        backend!(ssm::backward, candle_ssm::backward_host, (&cfg, gos, xs, n, c, &heads, &saved)).map(
            |mut g| {
                // Average pooling hands each pixel of a plane 1/(H·W) of its gradient.
                if hw > 1 {
                    let div = T::of(hw as f64);
                    g.x.iter_mut().for_each(|v| *v /= div);
                }
                g
            },
        )
    })?
    .map_err(to_py_err)?;
    let k = p.k;
    let (mut gw, mut gb, mut gbw, mut gbb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (h, hg) in g.heads.drain(..).enumerate() {
        let w = (h + 1) * split;
        gw.push(output(py, hg.fc_weight, &[k, w])?);
        gb.push(output(py, hg.fc_bias, &[k])?);
        if h < m.normalised() {
            gbw.push(output(py, hg.bn_weight, &[w])?);
            gbb.push(output(py, hg.bn_bias, &[w])?);
        }
    }
    tuple(py, vec![output(py, g.x, &[n, c])?, list(py, gw)?, list(py, gb)?, list(py, gbw)?, list(py, gbb)?])
}

#[pymethods]
impl Ssm {
    #[new]
    #[pyo3(signature = (num_heads = 4, norm_last_head = false, eps = 1e-5))]
    fn new(num_heads: i64, norm_last_head: bool, eps: f64) -> PyResult<Self> {
        if num_heads < 1 {
            return Err(PyValueError::new_err(format!(
                "num_heads: expected an integer >= 1, got {num_heads}"
            )));
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(PyValueError::new_err(format!("eps: expected a finite number >= 0, got {eps}")));
        }
        Ok(Ssm { num_heads: num_heads as usize, norm_last_head, eps })
    }

    #[getter]
    fn num_heads(&self) -> usize {
        self.num_heads
    }
    #[getter]
    fn norm_last_head(&self) -> bool {
        self.norm_last_head
    }
    #[getter]
    fn eps(&self) -> f64 {
        self.eps
    }
    /// H, the number of heads with BN + ReLU (the first H): `num_heads - 1`, or
    /// `num_heads` with `norm_last_head`.
    #[getter]
    fn normalised_heads(&self) -> usize {
        self.normalised()
    }

    fn __repr__(&self) -> String {
        format!(
            "SSM(num_heads={}, norm_last_head={}, eps={})",
            self.num_heads,
            if self.norm_last_head { "True" } else { "False" },
            super::py_float(self.eps)
        )
    }

    /// Forward. Returns `(out, mean, invstd, var, pooled)`:
    /// * `out`: `[N, K]` (ensemble: the mean of the heads' logits) or `[G, N, K]` (all);
    /// * `mean`, `invstd`: the statistics that normalised each normalised head,
    ///   concatenated head after head (head `h` at `n·h(h+1)/2 .. n·(h+1)(h+2)/2`):
    ///   in training the batch mean and `1/sqrt(biased batch var + eps)`, in eval the
    ///   running mean and `1/sqrt(running var + eps)`;
    /// * `var`: in training the unbiased batch variance, same layout (with `mean`, for
    ///   the caller's running-statistics update); empty in eval;
    /// * `pooled`: the `[N, C]` plane means of a 4-d `x`, empty for a 2-d `x`.
    ///
    /// `backward` takes `pooled` (a 2-d `x` itself), `mean` and `invstd`. The running
    /// statistics are read in eval only (their shapes are checked in both modes) and
    /// never written.
    #[pyo3(signature = (x, fc_weights, fc_biases, bn_weights, bn_biases, running_means, running_vars, training = true, outputs = "ensemble", channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        x: &Bound<'py, PyAny>,
        fc_weights: &Bound<'py, PyAny>,
        fc_biases: &Bound<'py, PyAny>,
        bn_weights: &Bound<'py, PyAny>,
        bn_biases: &Bound<'py, PyAny>,
        running_means: &Bound<'py, PyAny>,
        running_vars: &Bound<'py, PyAny>,
        training: bool,
        outputs: &str,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let args = ForwardArgs {
            lists: Lists {
                fc_weights,
                fc_biases,
                bn_weights,
                bn_biases,
                running: Some((running_means, running_vars)),
            },
            training,
            outputs: Outputs::parse(outputs).map_err(to_py_err)?,
            channels_last,
        };
        dispatch!(x, "x", forward_t(self, &args) | forward_cuda)
    }

    /// Backward, from the pooled `[N, C]` features (`x` itself for a 2-d `x`) and the
    /// forward's `mean` and `invstd`; `training` and `outputs` as in the forward.
    /// Returns `(grad_x, grad_fc_weights, grad_fc_biases, grad_bn_weights,
    /// grad_bn_biases)`, the last four lists like the parameters. `grad_x` is `[N, C]`:
    /// for a 4-d input with `hw = H*W` it is the gradient of every pixel of each plane
    /// (broadcast it over H×W).
    #[pyo3(signature = (grad_out, pooled, mean, invstd, fc_weights, fc_biases, bn_weights, bn_biases, hw = 1, training = true, outputs = "ensemble"))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        grad_out: &Bound<'py, PyAny>,
        pooled: &Bound<'py, PyAny>,
        mean: &Bound<'py, PyAny>,
        invstd: &Bound<'py, PyAny>,
        fc_weights: &Bound<'py, PyAny>,
        fc_biases: &Bound<'py, PyAny>,
        bn_weights: &Bound<'py, PyAny>,
        bn_biases: &Bound<'py, PyAny>,
        hw: usize,
        training: bool,
        outputs: &str,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if hw == 0 {
            return Err(PyValueError::new_err("hw: expected H*W >= 1, got 0"));
        }
        let args = BackwardArgs {
            pooled,
            mean,
            invstd,
            lists: Lists { fc_weights, fc_biases, bn_weights, bn_biases, running: None },
            hw,
            training,
            outputs: Outputs::parse(outputs).map_err(to_py_err)?,
        };
        dispatch!(grad_out, "grad_out", backward_t(self, &args) | backward_cuda)
    }
}

/// The CUDA parameters of one call: candle heads over the arguments held in `_held`.
#[cfg(feature = "cuda")]
struct CudaParams {
    heads: Vec<candle_ssm::Head>,
    k: usize,
    _held: Vec<super::dlpack::CudaIn>,
}

#[cfg(feature = "cuda")]
impl CudaParams {
    fn read(
        m: &Ssm,
        split: usize,
        like: (candle_core::DType, usize),
        lists: Lists<'_, '_>,
    ) -> PyResult<Self> {
        let r = super::dlpack::Cuda { like: Some(like) };
        let (g, hn) = (m.num_heads, m.normalised());
        let Params {
            fc_weights: fw,
            fc_biases: fb,
            bn_weights: bw,
            bn_biases: bb,
            running_means: rm,
            running_vars: rv,
            k,
        } = Params::read(&r, m, split, lists)?;
        let heads = (0..g)
            .map(|h| candle_ssm::Head {
                fc_weight: (*fw[h]).clone(),
                fc_bias: (*fb[h]).clone(),
                bn: (h < hn).then(|| candle_ssm::BnParams {
                    weight: (*bw[h]).clone(),
                    bias: (*bb[h]).clone(),
                    running_mean: rm.get(h).map_or_else(|| (*bw[h]).clone(), |t| (**t).clone()),
                    running_var: rv.get(h).map_or_else(|| (*bw[h]).clone(), |t| (**t).clone()),
                }),
            })
            .collect();
        let held = fw.into_iter().chain(fb).chain(bw).chain(bb).chain(rm).chain(rv).collect();
        Ok(CudaParams { heads, k, _held: held })
    }
}

#[cfg(feature = "cuda")]
fn forward_cuda<'py>(
    x: &Bound<'py, PyAny>,
    m: &Ssm,
    a: &ForwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, run};
    let py = x.py();
    let xa = dlpack::input(x, "x", None)?;
    let map = xa.dims().len() == 4;
    super::no_channels_last_on_cuda(a.channels_last)?;
    let (n, c, hw) = input_dims(xa.dims(), false)?;
    dlpack::expect_samples("x", xa.dims())?;
    let split = split_of("x", xa.dims(), c, m.num_heads)?;
    let p = CudaParams::read(m, split, xa.like(), a.lists)?;
    let cfg = m.config(p.k, a.training, a.outputs);
    if a.training && m.normalised() > 0 && n < 2 {
        return Err(PyValueError::new_err(format!(
            "x: expected more than 1 value per channel when training (batch size >= 2), got batch size {n}"
        )));
    }
    let (f, pooled) = run(py, xa.device(), || {
        let pooled = candle::gap(&xa.reshape((n, c, hw))?)?;
        Ok((candle_ssm::forward(&cfg, &pooled, &p.heads)?, pooled))
    })?;
    let (id, dtype) = (xa.device_id, xa.dtype());
    let stats = |t: Option<candle_core::Tensor>| match t {
        Some(t) => {
            let len = t.dims()[0];
            dlpack::output(py, t, &[len], id)
        }
        None => dlpack::empty_output(py, dtype, id),
    };
    let (mean, invstd, var) = (stats(f.mean)?, stats(f.invstd)?, stats(f.var_unbiased)?);
    let pooled =
        if map { dlpack::output(py, pooled, &[n, c], id)? } else { dlpack::empty_output(py, dtype, id)? };
    tuple(py, vec![dlpack::output(py, f.out, &cfg.out_shape(n), id)?, mean, invstd, var, pooled])
}

#[cfg(feature = "cuda")]
fn backward_cuda<'py>(
    grad_out: &Bound<'py, PyAny>,
    m: &Ssm,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, run, shaped};
    let py = grad_out.py();
    let go = dlpack::input(grad_out, "grad_out", None)?;
    let like = go.like();
    let feats = dlpack::input(a.pooled, "pooled", Some(like))?;
    let shape = expect_rank("pooled", feats.dims(), 2, "[N, C]")?.to_vec();
    let (n, c) = (shape[0], shape[1]);
    dlpack::expect_samples("pooled", &shape)?;
    let split = split_of("pooled", &shape, c, m.num_heads)?;
    let p = CudaParams::read(m, split, like, a.lists)?;
    let cfg = m.config(p.k, a.training, a.outputs);
    let len = ssm::stats_len(&cfg, c);
    let mu = shaped(a.mean, "mean", like, &[len])?;
    let rs = shaped(a.invstd, "invstd", like, &[len])?;
    expect_shape("grad_out", go.dims(), &cfg.out_shape(n))?;
    let hw = a.hw;
    let g = run(py, go.device(), || {
        let g = candle_ssm::backward(&cfg, &go, &feats, &p.heads, &mu, &rs)?;
        Ok(candle_ssm::Grads { x: g.x.affine(1.0 / hw as f64, 0.0)?, ..g })
    })?;
    let (id, k) = (go.device_id, p.k);
    let (mut gw, mut gb, mut gbw, mut gbb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (h, hg) in g.heads.into_iter().enumerate() {
        let w = (h + 1) * split;
        gw.push(dlpack::output(py, hg.fc_weight, &[k, w], id)?);
        gb.push(dlpack::output(py, hg.fc_bias, &[k], id)?);
        if let (Some(bw), Some(bb)) = (hg.bn_weight, hg.bn_bias) {
            gbw.push(dlpack::output(py, bw, &[w], id)?);
            gbb.push(dlpack::output(py, bb, &[w], id)?);
        }
    }
    tuple(
        py,
        vec![
            dlpack::output(py, g.x, &[n, c], id)?,
            list(py, gw)?,
            list(py, gb)?,
            list(py, gbw)?,
            list(py, gbb)?,
        ],
    )
}
