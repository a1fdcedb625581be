//! `cnnboost._core.update_running_stats`: a batch norm's running-statistics update,
//! in place, for several batch norms in one call. The modules' eager route calls it
//! after a training forward instead of four `torch._foreach` ops (~0.2 ms a step for
//! a small AB, ~0.3 ms after a large kernel, whose sweep leaves torch's dispatch
//! cold); it rounds exactly as those ops do.

use super::array::{to_numpy, type_name};
use crate::kernels::Float;
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// What torch's BatchNorm does to its buffers in a training step, for each batch norm
/// `i`: `counts[i] += 1`, then `running = running · (1 − f) + batch · f` for its
/// `running_means[i]`/`means[i]` and `running_vars[i]`/`variances[i]`, with `f` the
/// `momentum`, or `1 / counts[i]` (a cumulative average) when it is None. Every
/// argument is checked (and every array borrowed) before anything is written, so an
/// error leaves all of them as they were.
#[pyfunction]
#[pyo3(signature = (running_means, running_vars, counts, means, variances, momentum))]
pub fn update_running_stats(
    running_means: Vec<Bound<'_, PyAny>>,
    running_vars: Vec<Bound<'_, PyAny>>,
    counts: Vec<Bound<'_, PyAny>>,
    means: Vec<Bound<'_, PyAny>>,
    variances: Vec<Bound<'_, PyAny>>,
    momentum: Option<f64>,
) -> PyResult<()> {
    let k = running_means.len();
    for (arg, len) in [
        ("running_vars", running_vars.len()),
        ("counts", counts.len()),
        ("means", means.len()),
        ("variances", variances.len()),
    ] {
        if len != k {
            return Err(PyValueError::new_err(format!(
                "{arg}: expected {k} arrays (one per running mean), got {len}"
            )));
        }
    }
    if let Some(m) = momentum {
        if !m.is_finite() {
            return Err(PyValueError::new_err(format!(
                "momentum: expected a finite number or None, got {m}"
            )));
        }
    }
    let Some(first) = running_means.first() else { return Ok(()) };
    let args = Args {
        running_means: &running_means,
        running_vars: &running_vars,
        counts: &counts,
        means: &means,
        variances: &variances,
        momentum,
    };
    if to_numpy(first, "running_means[0]")?.dtype().is_equiv_to(&numpy::dtype::<f64>(first.py())) {
        update::<f64>(&args)
    } else {
        update::<f32>(&args)
    }
}

struct Args<'a, 'py> {
    running_means: &'a [Bound<'py, PyAny>],
    running_vars: &'a [Bound<'py, PyAny>],
    counts: &'a [Bound<'py, PyAny>],
    means: &'a [Bound<'py, PyAny>],
    variances: &'a [Bound<'py, PyAny>],
    momentum: Option<f64>,
}

/// `obj` as a C-contiguous array of `T` with `len` elements, borrowed for writing.
fn writable<'py, T: Element + Float>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    len: Option<usize>,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let arr = typed::<T>(obj, arg, len)?;
    arr.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{arg}: expected a writeable array not in use by another argument ({e})"
        ))
    })
}

/// `obj` as a C-contiguous array of `T` with `len` elements, borrowed for reading.
fn readable<'py, T: Element + Float>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    len: usize,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = typed::<T>(obj, arg, Some(len))?;
    arr.try_readonly().map_err(|e| {
        PyValueError::new_err(format!("{arg}: is written by another argument and cannot be read ({e})"))
    })
}

fn typed<'py, T: Element + Float>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    len: Option<usize>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let arr = to_numpy(obj, arg)?;
    if !arr.dtype().is_equiv_to(&numpy::dtype::<T>(obj.py())) {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected dtype {} (that of running_means[0]), got {}",
            T::NAME,
            arr.dtype().str()?
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{arg}: expected a contiguous array")));
    }
    if let Some(len) = len {
        if arr.len() != len || arr.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "{arg}: expected shape ({len},), got {:?}",
                arr.shape()
            )));
        }
    }
    arr.cast_into::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("{arg}: got {}", type_name(obj))))
}

fn update<T: Element + Float>(a: &Args<'_, '_>) -> PyResult<()> {
    // Everything is read and borrowed first: an error below writes nothing.
    let mut rows = Vec::with_capacity(a.running_means.len());
    for i in 0..a.running_means.len() {
        let rm = writable::<T>(&a.running_means[i], &format!("running_means[{i}]"), None)?;
        let c = rm.len();
        if rm.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "running_means[{i}]: expected a 1-d array, got shape {:?}",
                rm.shape()
            )));
        }
        let rv = writable::<T>(&a.running_vars[i], &format!("running_vars[{i}]"), Some(c))?;
        let count = writable_count(&a.counts[i], &format!("counts[{i}]"))?;
        let mean = readable::<T>(&a.means[i], &format!("means[{i}]"), c)?;
        let var = readable::<T>(&a.variances[i], &format!("variances[{i}]"), c)?;
        rows.push((rm, rv, count, mean, var));
    }
    for (mut rm, mut rv, mut count, mean, var) in rows {
        let n = count.as_slice_mut().expect("contiguous by the check");
        n[0] += 1;
        // As torch's ops round: the scalars in T, each product rounded, then the sum.
        let (keep, take) = match a.momentum {
            Some(m) => (T::of(1.0 - m), T::of(m)),
            None => {
                let f = T::one() / T::of(n[0] as f64);
                (T::one() - f, f)
            }
        };
        for (running, batch) in [(&mut rm, &mean), (&mut rv, &var)] {
            let running = running.as_slice_mut().expect("contiguous by the check");
            for (r, &b) in running.iter_mut().zip(batch.as_slice().expect("contiguous by the check")) {
                *r = *r * keep + b * take;
            }
        }
    }
    Ok(())
}

/// A batch norm's `num_batches_tracked`: one int64, borrowed for writing.
fn writable_count<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<PyReadwriteArrayDyn<'py, i64>> {
    let arr = to_numpy(obj, arg)?;
    if !arr.dtype().is_equiv_to(&numpy::dtype::<i64>(obj.py())) || arr.len() != 1 {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected one int64 (num_batches_tracked), got dtype {} shape {:?}",
            arr.dtype().str()?,
            arr.shape()
        )));
    }
    let arr = arr.cast_into::<PyArrayDyn<i64>>()?;
    arr.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{arg}: expected a writeable array not in use by another argument ({e})"
        ))
    })
}
