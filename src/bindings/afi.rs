//! `cnnboost._core.AFI`: the AFI kernels for NumPy arrays and DLPack objects.

use super::array::{
    any_items, dispatch, expect_rank, expect_shape, fmt_shape, list, output, tuple, Host, Input, Reader,
};
use super::{backend, compute, to_py_err, work};
use crate::candle::afi as candle_afi;
use crate::kernels::afi::{self, Params, Saved};
use crate::kernels::Float;
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Attentive Feature Integration kernels (forward, backward).
///
/// Fuses M ≥ 1 same-shape maps `xs` (a list, each `[N, C, H, W]`, read where they
/// lie) with a shared scorer: `fc1_weight` `[C/r, C]`, `fc2_weight` `[C, C/r]`, biases
/// optional (None). M may change from call to call.
// The class lives in the module of the build it comes from (`cnnboost._core`, or
// `cnnboost_cuda` for the CUDA build), so that its `__module__` is importable.
#[cfg_attr(not(feature = "cuda"), pyclass(module = "cnnboost._core", name = "AFI", frozen))]
#[cfg_attr(feature = "cuda", pyclass(module = "cnnboost_cuda", name = "AFI", frozen))]
pub struct Afi {
    channels: usize,
    hidden: usize,
}

/// The maps of one call, read and checked: `(arrays, shape)`; `[N, C, H, W]` maps, or
/// `[N, H, W, C]` when `channels_last`.
fn read_maps<'py, R: Reader<'py>>(
    r: &mut R,
    xs: &Bound<'py, PyAny>,
    channels: usize,
    channels_last: bool,
) -> PyResult<(Vec<R::Arr>, Vec<usize>)> {
    let (layout, c_dim) = if channels_last { ("[N, H, W, C]", 3) } else { ("[N, C, H, W]", 1) };
    let items = any_items(xs, "xs")?;
    if items.is_empty() {
        return Err(PyValueError::new_err("xs: expected at least one feature map, got an empty list"));
    }
    let mut maps = Vec::with_capacity(items.len());
    let mut shape: Vec<usize> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let arg = format!("xs[{i}]");
        let x = r.read(item, &arg)?;
        let s = expect_rank(&arg, R::dims(&x), 4, layout)?.to_vec();
        if i == 0 {
            if s[c_dim] != channels {
                return Err(PyValueError::new_err(format!(
                    "{arg}: expected {channels} channels in dim {c_dim}, got shape {}",
                    fmt_shape(&s)
                )));
            }
            r.follow(&x);
            shape = s;
        } else {
            expect_shape(&arg, &s, &shape)?;
        }
        maps.push(x);
    }
    Ok((maps, shape))
}

/// The scorer of one call, as Python passed it.
#[derive(Clone, Copy)]
struct ScorerArgs<'a, 'py> {
    fc1_weight: &'a Bound<'py, PyAny>,
    fc1_bias: Option<&'a Bound<'py, PyAny>>,
    fc2_weight: &'a Bound<'py, PyAny>,
    fc2_bias: Option<&'a Bound<'py, PyAny>>,
}

/// The arguments of `AFI.backward` after `grad_out`.
struct BackwardArgs<'a, 'py> {
    xs: &'a Bound<'py, PyAny>,
    z: &'a Bound<'py, PyAny>,
    hidden: &'a Bound<'py, PyAny>,
    weights: &'a Bound<'py, PyAny>,
    scorer: ScorerArgs<'a, 'py>,
    channels_last: bool,
}

/// `(N, C, H·W)` of a map of `shape` in the call's layout.
fn dims_of(shape: &[usize], channels_last: bool) -> (usize, usize, usize) {
    if channels_last {
        (shape[0], shape[3], shape[1] * shape[2])
    } else {
        (shape[0], shape[1], shape[2] * shape[3])
    }
}

/// The scorer of one call, read and checked.
struct Scorer<A> {
    w1: A,
    b1: Option<A>,
    w2: A,
    b2: Option<A>,
}

impl<A> Scorer<A> {
    fn read<'py, R: Reader<'py, Arr = A>>(r: &R, afi: &Afi, args: ScorerArgs<'_, 'py>) -> PyResult<Self> {
        let ScorerArgs { fc1_weight, fc1_bias, fc2_weight, fc2_bias } = args;
        let (c, h) = (afi.channels, afi.hidden);
        Ok(Scorer {
            w1: r.shaped(fc1_weight, "fc1_weight", &[h, c])?,
            b1: r.optional(fc1_bias, "fc1_bias", &[h])?,
            w2: r.shaped(fc2_weight, "fc2_weight", &[c, h])?,
            b2: r.optional(fc2_bias, "fc2_bias", &[c])?,
        })
    }
}

impl<'py, T: Element + Float> Scorer<Input<'py, T>> {
    fn params(&self) -> Params<'_, T> {
        Params {
            fc1_weight: self.w1.slice(),
            fc1_bias: self.b1.as_ref().map(|b| b.slice()),
            fc2_weight: self.w2.slice(),
            fc2_bias: self.b2.as_ref().map(|b| b.slice()),
        }
    }
}

/// What the backward reads back from the forward for `m` maps of `n` samples,
/// checked: `(z, hidden, weights)`.
fn read_saved<'py, R: Reader<'py>>(
    r: &R,
    afi: &Afi,
    m: usize,
    n: usize,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<(R::Arr, R::Arr, R::Arr)> {
    let c = afi.channels;
    Ok((
        r.shaped(a.z, "z", &[m, n, c])?,
        r.shaped(a.hidden, "hidden", &[m, n, afi.hidden])?,
        r.shaped(a.weights, "weights", &[m, n, c])?,
    ))
}

fn forward_t<'py, T: Element + Float>(
    first: &Bound<'py, PyAny>,
    afi: &Afi,
    xs: &Bound<'py, PyAny>,
    scorer: ScorerArgs<'_, 'py>,
    channels_last: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = first.py();
    let mut r = Host::<T>::new();
    let (maps, shape) = read_maps(&mut r, xs, afi.channels, channels_last)?;
    let scorer = Scorer::read(&r, afi, scorer)?;
    let (n, c, hw) = dims_of(&shape, channels_last);
    let slices: Vec<&[T]> = maps.iter().map(|x| x.slice()).collect();
    let p = scorer.params();
    let (m, hidden) = (maps.len(), afi.hidden);
    let f = compute(py, work(m * n * c * hw, 2 * m * n * c * hidden), || {
        if channels_last {
            backend!(
                afi::forward_channels_last,
                candle_afi::forward_host_channels_last,
                (&slices, n, c, hw, &p)
            )
        } else {
            backend!(afi::forward, candle_afi::forward_host, (&slices, n, c, hw, &p))
        }
    })?
    .map_err(to_py_err)?;
    tuple(
        py,
        vec![
            output(py, f.out, &shape)?,
            output(py, f.z, &[m, n, c])?,
            output(py, f.hidden, &[m, n, afi.hidden])?,
            output(py, f.weights, &[m, n, c])?,
        ],
    )
}

fn backward_t<'py, T: Element + Float>(
    grad_out: &Bound<'py, PyAny>,
    afi: &Afi,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = grad_out.py();
    let mut r = Host::<T>::new();
    let (maps, shape) = read_maps(&mut r, a.xs, afi.channels, a.channels_last)?;
    let go = r.shaped(grad_out, "grad_out", &shape)?;
    let (n, c, hw) = dims_of(&shape, a.channels_last);
    let m = maps.len();
    let (zs, hs, ws) = read_saved(&r, afi, m, n, a)?;
    let scorer = Scorer::read(&r, afi, a.scorer)?;
    let slices: Vec<&[T]> = maps.iter().map(|x| x.slice()).collect();
    let (gos, p) = (go.slice(), scorer.params());
    let saved = Saved { z: zs.slice(), hidden: hs.slice(), weights: ws.slice() };
    let channels_last = a.channels_last;
    let g = compute(py, work((m + 1) * n * c * hw, 4 * m * n * c * afi.hidden), || {
        if channels_last {
            backend!(
                afi::backward_channels_last,
                candle_afi::backward_host_channels_last,
                (gos, &slices, n, c, hw, &p, &saved)
            )
        } else {
            backend!(afi::backward, candle_afi::backward_host, (gos, &slices, n, c, hw, &p, &saved))
        }
    })?
    .map_err(to_py_err)?;
    let grads_x = g.xs.into_iter().map(|gx| output(py, gx, &shape)).collect::<PyResult<Vec<_>>>()?;
    let h = afi.hidden;
    let b1 = g.fc1_bias.unwrap_or_default();
    let b2 = g.fc2_bias.unwrap_or_default();
    let (l1, l2) = (b1.len(), b2.len());
    tuple(
        py,
        vec![
            list(py, grads_x)?,
            output(py, g.fc1_weight, &[h, c])?,
            output(py, b1, &[l1])?,
            output(py, g.fc2_weight, &[c, h])?,
            output(py, b2, &[l2])?,
        ],
    )
}

#[pymethods]
impl Afi {
    /// `hidden = channels // reduction` (at least 1).
    #[new]
    #[pyo3(signature = (channels, reduction = 4))]
    fn new(channels: i64, reduction: i64) -> PyResult<Self> {
        if channels < 1 {
            return Err(PyValueError::new_err(format!("channels: expected an integer >= 1, got {channels}")));
        }
        if reduction < 1 || reduction > channels {
            return Err(PyValueError::new_err(format!(
                "reduction: expected an integer in [1, channels = {channels}], got {reduction}"
            )));
        }
        Ok(Afi { channels: channels as usize, hidden: (channels / reduction) as usize })
    }

    #[getter]
    fn channels(&self) -> usize {
        self.channels
    }
    /// The scorer's hidden size, `channels // reduction`.
    #[getter]
    fn hidden(&self) -> usize {
        self.hidden
    }

    fn __repr__(&self) -> String {
        format!("AFI(channels={}, hidden={})", self.channels, self.hidden)
    }

    /// Forward of `[N, C, H, W]` maps (`[N, H, W, C]` with `channels_last=True`: torch
    /// `channels_last` maps permuted to their memory order). Returns `(out, z,
    /// hidden, weights)`: `out` like each map; `z` `[M, N, C]` (pooled maps), `hidden`
    /// `[M, N, C/r]` (after the ReLU), `weights` `[M, N, C]` (the softmax over maps)
    /// for `backward`.
    #[pyo3(signature = (xs, fc1_weight, fc1_bias, fc2_weight, fc2_bias, channels_last = false))]
    fn forward<'py>(
        &self,
        xs: &Bound<'py, PyAny>,
        fc1_weight: &Bound<'py, PyAny>,
        fc1_bias: Option<&Bound<'py, PyAny>>,
        fc2_weight: &Bound<'py, PyAny>,
        fc2_bias: Option<&Bound<'py, PyAny>>,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let first = any_items(xs, "xs")?.into_iter().next().ok_or_else(|| {
            PyValueError::new_err("xs: expected at least one feature map, got an empty list")
        })?;
        let scorer = ScorerArgs { fc1_weight, fc1_bias, fc2_weight, fc2_bias };
        dispatch!(&first, "xs[0]", forward_t(self, xs, scorer, channels_last) | forward_cuda)
    }

    /// Backward. Returns `(grad_xs, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
    /// grad_fc2_bias)`: `grad_xs` a list (one per map); a bias gradient is empty when
    /// that bias is None. `grad_out` and `xs` in the forward's layout.
    #[pyo3(signature = (grad_out, xs, z, hidden, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, channels_last = false))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        grad_out: &Bound<'py, PyAny>,
        xs: &Bound<'py, PyAny>,
        z: &Bound<'py, PyAny>,
        hidden: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        fc1_weight: &Bound<'py, PyAny>,
        fc1_bias: Option<&Bound<'py, PyAny>>,
        fc2_weight: &Bound<'py, PyAny>,
        fc2_bias: Option<&Bound<'py, PyAny>>,
        channels_last: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let scorer = ScorerArgs { fc1_weight, fc1_bias, fc2_weight, fc2_bias };
        let args = BackwardArgs { xs, z, hidden, weights, scorer, channels_last };
        dispatch!(grad_out, "grad_out", backward_t(self, &args) | backward_cuda)
    }
}

/// The CUDA scorer of one call: candle views (`p`) of the arguments held in `_held`.
#[cfg(feature = "cuda")]
struct CudaScorer {
    p: candle_afi::Params,
    _held: Vec<super::dlpack::CudaIn>,
}

#[cfg(feature = "cuda")]
fn cuda_scorer(r: &super::dlpack::Cuda, afi: &Afi, args: ScorerArgs<'_, '_>) -> PyResult<CudaScorer> {
    let Scorer { w1, b1, w2, b2 } = Scorer::read(r, afi, args)?;
    let p = candle_afi::Params {
        fc1_weight: (*w1).clone(),
        fc1_bias: b1.as_ref().map(|b| (**b).clone()),
        fc2_weight: (*w2).clone(),
        fc2_bias: b2.as_ref().map(|b| (**b).clone()),
    };
    let held = [Some(w1), Some(w2), b1, b2].into_iter().flatten().collect();
    Ok(CudaScorer { p, _held: held })
}

#[cfg(feature = "cuda")]
fn forward_cuda<'py>(
    first: &Bound<'py, PyAny>,
    afi: &Afi,
    xs: &Bound<'py, PyAny>,
    scorer: ScorerArgs<'_, 'py>,
    channels_last: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, candle_err, run};
    super::no_channels_last_on_cuda(channels_last)?;
    let py = first.py();
    let mut r = dlpack::Cuda { like: None };
    let (maps, shape) = read_maps(&mut r, xs, afi.channels, false)?;
    dlpack::expect_samples("xs[0]", &shape)?;
    let like = maps[0].like();
    let scorer = cuda_scorer(&r, afi, scorer)?;
    let (m, n, c, hw) = (maps.len(), shape[0], shape[1], shape[2] * shape[3]);
    let views = maps
        .iter()
        .map(|x| x.reshape((n, c, hw)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(candle_err)?;
    let f = run(py, maps[0].device(), || candle_afi::forward(&views, &scorer.p))?;
    let id = like.1;
    tuple(
        py,
        vec![
            dlpack::output(py, f.out, &shape, id)?,
            dlpack::output(py, f.z, &[m, n, c], id)?,
            dlpack::output(py, f.hidden, &[m, n, afi.hidden], id)?,
            dlpack::output(py, f.weights, &[m, n, c], id)?,
        ],
    )
}

#[cfg(feature = "cuda")]
fn backward_cuda<'py>(
    grad_out: &Bound<'py, PyAny>,
    afi: &Afi,
    a: &BackwardArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyTuple>> {
    use super::dlpack::{self, candle_err, run};
    let py = grad_out.py();
    let go = dlpack::input(grad_out, "grad_out", None)?;
    let like = go.like();
    let mut r = dlpack::Cuda { like: Some(like) };
    super::no_channels_last_on_cuda(a.channels_last)?;
    let (maps, shape) = read_maps(&mut r, a.xs, afi.channels, false)?;
    dlpack::expect_samples("xs[0]", &shape)?;
    expect_shape("grad_out", go.dims(), &shape)?;
    let (m, n, c, hw) = (maps.len(), shape[0], shape[1], shape[2] * shape[3]);
    let (zs, _, ws) = read_saved(&r, afi, m, n, a)?;
    let scorer = cuda_scorer(&r, afi, a.scorer)?;
    let dims = (n, c, hw);
    let views =
        maps.iter().map(|x| x.reshape(dims)).collect::<candle_core::Result<Vec<_>>>().map_err(candle_err)?;
    let g = run(py, go.device(), || candle_afi::backward(&go.reshape(dims)?, &views, &scorer.p, &zs, &ws))?;
    let id = like.1;
    let grads_x =
        g.xs.into_iter().map(|gx| dlpack::output(py, gx, &shape, id)).collect::<PyResult<Vec<_>>>()?;
    let h = afi.hidden;
    let b1 = match g.fc1_bias {
        Some(b) => dlpack::output(py, b, &[h], id)?,
        None => dlpack::empty_output(py, like.0, id)?,
    };
    let b2 = match g.fc2_bias {
        Some(b) => dlpack::output(py, b, &[c], id)?,
        None => dlpack::empty_output(py, like.0, id)?,
    };
    tuple(
        py,
        vec![
            list(py, grads_x)?,
            dlpack::output(py, g.fc1_weight, &[h, c], id)?,
            b1,
            dlpack::output(py, g.fc2_weight, &[c, h], id)?,
            b2,
        ],
    )
}
