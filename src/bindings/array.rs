//! Arrays in and out of the kernels.
//!
//! In: a NumPy array, or any object with `__dlpack__` (a torch CPU tensor, …), read
//! in place. Only an array the kernels cannot read as one aligned, C-contiguous slice
//! (a transposed or sliced view, a misaligned buffer) is copied first.
//! Out: a `Vec` handed to NumPy without a copy; `torch.from_numpy` takes it without
//! another.

use crate::kernels::Float;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    Element, IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple};

/// The element types the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
}

fn numpy(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    NUMPY.get_or_try_init(py, || py.import("numpy").map(Bound::unbind)).map(|m| m.bind(py))
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}

/// `obj` as a NumPy array, without copying.
pub fn to_numpy<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        return Ok(a.clone());
    }
    let py = obj.py();
    if !obj.hasattr("__dlpack__")? {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected a NumPy array or an object with __dlpack__ (e.g. a torch tensor), got {}",
            type_name(obj)
        )));
    }
    if let Ok(dev) = obj.call_method0("__dlpack_device__") {
        let kind: i64 = dev.get_item(0)?.extract().unwrap_or(1);
        if kind != 1 && kind != 3 {
            // 1: CPU, 3: CUDA host (pinned) memory; everything else lives on a device.
            let hint = if kind == 2 && !cfg!(feature = "cuda") {
                "; for CUDA tensors install the CUDA build, cnnboost-cuda (README, \"CUDA\")"
            } else {
                ""
            };
            return Err(PyTypeError::new_err(format!(
                "{arg}: expected an array in CPU memory, got one on DLPack device {}{hint}",
                dev.str()?
            )));
        }
    }
    let arr = numpy(py)?.call_method1("from_dlpack", (obj,)).map_err(|e| {
        PyValueError::new_err(format!("{arg}: could not be read through DLPack: {}", e.value(py)))
    })?;
    Ok(arr.cast_into::<PyUntypedArray>()?)
}

/// Whether `obj` lives in CUDA device memory (DLPack device type 2).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn on_cuda(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    if obj.cast::<PyUntypedArray>().is_ok() || !obj.hasattr("__dlpack_device__")? {
        return Ok(false);
    }
    let dev = obj.call_method0("__dlpack_device__")?;
    Ok(dev.get_item(0)?.extract::<i64>().unwrap_or(1) == 2)
}

/// The element type of an array, or a `TypeError` naming the argument.
pub fn dtype_of(arr: &Bound<'_, PyUntypedArray>, arg: &str) -> PyResult<DType> {
    let py = arr.py();
    let dt = arr.dtype();
    if dt.is_equiv_to(&numpy::dtype::<f32>(py)) {
        Ok(DType::F32)
    } else if dt.is_equiv_to(&numpy::dtype::<f64>(py)) {
        Ok(DType::F64)
    } else {
        Err(PyTypeError::new_err(format!("{arg}: expected dtype float32 or float64, got {}", dt.str()?)))
    }
}

const NPY_ARRAY_ALIGNED: i32 = 0x0100;

/// A borrowed, aligned, C-contiguous array of `T`.
pub struct Input<'py, T: Element> {
    arr: PyReadonlyArrayDyn<'py, T>,
}

impl<T: Element> Input<'_, T> {
    pub fn slice(&self) -> &[T] {
        self.arr.as_slice().expect("Input is C-contiguous by construction")
    }
    pub fn shape(&self) -> &[usize] {
        self.arr.shape()
    }
}

/// Reads `obj` as an array of `T`: a `TypeError` naming `arg` if it is of another
/// element type.
pub fn input<'py, T: Element + Float>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Input<'py, T>> {
    let mut arr = to_numpy(obj, arg)?;
    let want = numpy::dtype::<T>(obj.py());
    if !arr.dtype().is_equiv_to(&want) {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected dtype {} (the dtype of the input), got {}",
            T::NAME,
            arr.dtype().str()?
        )));
    }
    // SAFETY: reading the flags field of a live array object.
    let aligned = unsafe { (*arr.as_array_ptr()).fields.flags & NPY_ARRAY_ALIGNED != 0 };
    if !arr.is_c_contiguous() || !aligned {
        let kwargs = PyDict::new(obj.py());
        kwargs.set_item("order", "C")?;
        let copy = numpy(obj.py())?.call_method("array", (arr,), Some(&kwargs))?;
        arr = copy.cast_into::<PyUntypedArray>()?;
    }
    let typed = arr.cast_into::<PyArrayDyn<T>>()?;
    let ro = typed.try_into_readonly().map_err(|e| {
        PyValueError::new_err(format!("{arg}: is being written to elsewhere and cannot be read ({e})"))
    })?;
    Ok(Input { arr: ro })
}

/// Reads one call's array arguments, so that a binding's shape checks are written
/// once for both of its paths: [`Host`] reads NumPy arrays of `T` for the CPU
/// kernels, `dlpack::Cuda` reads CUDA tensors in place for the candle implementation.
pub trait Reader<'py> {
    type Arr;
    /// Reads `obj`, or raises an error naming `arg`.
    fn read(&self, obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Self::Arr>;
    fn dims(a: &Self::Arr) -> &[usize];
    /// [`Reader::read`], then the shape checked.
    fn shaped(&self, obj: &Bound<'py, PyAny>, arg: &str, shape: &[usize]) -> PyResult<Self::Arr> {
        let a = self.read(obj, arg)?;
        expect_shape(arg, Self::dims(&a), shape)?;
        Ok(a)
    }
    /// Called with the first array of a call: later arrays must be like it (CUDA:
    /// the same dtype and device; NumPy arrays are held to `T` from the start).
    fn follow(&mut self, _first: &Self::Arr) {}
    /// [`Reader::shaped`] for an optional argument.
    fn optional(
        &self,
        obj: Option<&Bound<'py, PyAny>>,
        arg: &str,
        shape: &[usize],
    ) -> PyResult<Option<Self::Arr>> {
        obj.map(|o| self.shaped(o, arg, shape)).transpose()
    }
}

/// Reads NumPy arrays (or anything `numpy.asarray` takes) of `T`; see [`input`].
pub struct Host<T>(std::marker::PhantomData<T>);

impl<T> Host<T> {
    pub fn new() -> Self {
        Host(std::marker::PhantomData)
    }
}

impl<'py, T: Element + Float> Reader<'py> for Host<T> {
    type Arr = Input<'py, T>;
    fn read(&self, obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Input<'py, T>> {
        input::<T>(obj, arg)
    }
    fn dims<'a>(a: &'a Input<'py, T>) -> &'a [usize] {
        a.shape()
    }
}

/// The sizes of an array that must have `rank` dimensions (`layout` names them).
pub fn expect_rank<'a>(arg: &str, shape: &'a [usize], rank: usize, layout: &str) -> PyResult<&'a [usize]> {
    if shape.len() != rank {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a {rank}-d array {layout}, got shape {}",
            fmt_shape(shape)
        )));
    }
    Ok(shape)
}

/// Checks a shape, with an error that names the argument and both shapes.
pub fn expect_shape(arg: &str, actual: &[usize], expected: &[usize]) -> PyResult<()> {
    if actual != expected {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected shape {}, got {}",
            fmt_shape(expected),
            fmt_shape(actual)
        )));
    }
    Ok(())
}

pub fn fmt_shape(s: &[usize]) -> String {
    let inner: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    if s.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    }
}

/// `(N, C, H*W)` of an `[N, C]` or `[N, C, H, W]` input `x` (`[N, H, W, C]` when
/// `channels_last`; `H*W = 1` for 2-d).
pub fn input_dims(shape: &[usize], channels_last: bool) -> PyResult<(usize, usize, usize)> {
    match *shape {
        [n, c] => Ok((n, c, 1)),
        [n, h, w, c] if channels_last => map_dims(shape, n, c, h, w),
        [n, c, h, w] => map_dims(shape, n, c, h, w),
        _ => Err(PyValueError::new_err(format!(
            "x: expected a 2-d [N, C] or 4-d {} array, got shape {}",
            if channels_last { "[N, H, W, C]" } else { "[N, C, H, W]" },
            fmt_shape(shape)
        ))),
    }
}

/// `(N, C, H·W)` of a map, checking the plane is not empty.
fn map_dims(shape: &[usize], n: usize, c: usize, h: usize, w: usize) -> PyResult<(usize, usize, usize)> {
    match h.checked_mul(w) {
        Some(0) => Err(PyValueError::new_err(format!(
            "x: expected a non-empty H×W plane to average over, got shape {}",
            fmt_shape(shape)
        ))),
        Some(hw) => Ok((n, c, hw)),
        None => Err(PyValueError::new_err("x: H*W overflows")),
    }
}

/// Calls `$f::<T>(array, args…)` with `T` the element type of `$arr` (f32 or f64),
/// `$arr` read as a NumPy array; a `TypeError` naming `$arg` for any other type.
///
/// `dispatch!(x, "x", f(args…) | f_cuda)`: with the `cuda` feature, a CUDA `$arr` goes
/// to `f_cuda(array, args…)` (the candle implementation on the GPU) instead.
macro_rules! dispatch {
    ($arr:expr, $arg:literal, $f:ident ( $($a:expr),* ) | $cuda:ident) => {{
        #[cfg(feature = "cuda")]
        if $crate::bindings::array::on_cuda($arr)? {
            return $cuda($arr, $($a),*);
        }
        $crate::bindings::array::dispatch!($arr, $arg, $f($($a),*))
    }};
    ($arr:expr, $arg:literal, $f:ident ( $($a:expr),* )) => {{
        let arr = $crate::bindings::array::to_numpy($arr, $arg)?;
        match $crate::bindings::array::dtype_of(&arr, $arg)? {
            $crate::bindings::array::DType::F32 => $f::<f32>(arr.as_any(), $($a),*),
            $crate::bindings::array::DType::F64 => $f::<f64>(arr.as_any(), $($a),*),
        }
    }};
}
pub(crate) use dispatch;

/// The items of a list or tuple argument of `len` items (`what` says why that many).
pub fn items<'py>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    len: usize,
    what: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let items = any_items(obj, arg).map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg}: expected a list of arrays of length {len} ({what}), got {}",
            type_name(obj)
        ))
    })?;
    if items.len() != len {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a list of length {len} ({what}), got length {}",
            items.len()
        )));
    }
    Ok(items)
}

/// The items of a list or tuple argument, of any length.
pub fn any_items<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(l) = obj.cast::<PyList>() {
        Ok(l.iter().collect())
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        Ok(t.iter().collect())
    } else {
        Err(PyTypeError::new_err(format!(
            "{arg}: expected a list or tuple of arrays, got {}",
            type_name(obj)
        )))
    }
}

/// A kernel's result as a NumPy array of the given shape, without a copy.
pub fn output<'py, T: Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cnnboost internal error: {e}")))?;
    Ok(arr.into_pyarray(py).into_any())
}

/// A tuple of outputs.
pub fn tuple<'py>(py: Python<'py>, items: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, items)
}

/// A list of outputs, as a Python object.
pub fn list<'py>(py: Python<'py>, items: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyList::new(py, items)?.into_any())
}
