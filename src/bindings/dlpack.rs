//! CUDA tensors in and out of the candle implementation through DLPack (feature
//! `cuda`), without a copy.
//!
//! In: `obj.__dlpack__()` gives a capsule with torch's device pointer; it is wrapped
//! as candle storage in place. candle would free that storage when the last tensor
//! using it drops, so the wrapping tensor is never dropped: [`Borrowed`] keeps one
//! per torch block (a few hundred bytes of host memory each, bounded) and each call
//! reads a view of it. The DLPack deleter hands the memory back to torch.
//! Out: each result tensor is handed over in a `"dltensor"` capsule whose deleter
//! drops it; `torch.from_dlpack` takes it without a copy.
//!
//! Ordering: the Python side waits for torch's current stream before the call
//! (`cnnboost._torch`); [`run`] waits for candle's stream before returning. Work is
//! therefore correct on any torch stream, at the cost of one host synchronisation
//! per call.

use super::array::fmt_shape;
use crate::candle::borrowed::Borrowed;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::Mutex;

const KDL_CUDA: i32 = 2;
const KDL_FLOAT: u8 = 2;
const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// The candle device of CUDA ordinal `id`, created once (its context is the
/// device's primary context, the one torch uses, so torch's pointers are valid in it).
pub fn device(id: usize) -> PyResult<Device> {
    static DEVICES: Mutex<Option<HashMap<usize, Device>>> = Mutex::new(None);
    let mut guard =
        DEVICES.lock().map_err(|_| PyRuntimeError::new_err("cnnboost: CUDA device lock poisoned"))?;
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(d) = map.get(&id) {
        return Ok(d.clone());
    }
    let dev = Device::new_cuda(id)
        .map_err(|e| PyRuntimeError::new_err(format!("cnnboost: could not open CUDA device {id}: {e}")))?;
    // Borrowed pointers carry no candle events; ordering is by synchronisation.
    // SAFETY: every tensor on this device is used on its one stream (see the module doc).
    unsafe { dev.as_cuda_device().expect("a CUDA device").disable_event_tracking() };
    map.insert(id, dev.clone());
    Ok(dev)
}

/// A torch CUDA tensor read in place as a candle tensor.
pub struct CudaIn {
    tensor: Tensor,
    managed: *mut DLManagedTensor,
    pub device_id: usize,
}

// SAFETY: `managed` is only touched in `drop`, once; the tensor is candle's, which is
// Send + Sync.
unsafe impl Send for CudaIn {}
unsafe impl Sync for CudaIn {}

impl CudaIn {
    /// The (dtype, device) later arguments must share.
    pub fn like(&self) -> (DType, usize) {
        (self.tensor.dtype(), self.device_id)
    }
}

impl std::ops::Deref for CudaIn {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

impl Drop for CudaIn {
    fn drop(&mut self) {
        // SAFETY: `managed` came from a consumed "dltensor" capsule and is released once.
        unsafe {
            if let Some(del) = (*self.managed).deleter {
                del(self.managed);
            }
        }
    }
}

fn dtype_name(d: DLDataType) -> String {
    match d.code {
        0 => format!("int{}", d.bits),
        1 => format!("uint{}", d.bits),
        2 => format!("float{}", d.bits),
        4 => format!("bfloat{}", d.bits),
        c => format!("DLPack type code {c} with {} bits", d.bits),
    }
}

/// Reads `obj` (a CUDA tensor with `__dlpack__`) in place. `like` is the dtype and
/// device the call's first array set (None for that first array).
pub fn input(obj: &Bound<'_, PyAny>, arg: &str, like: Option<(DType, usize)>) -> PyResult<CudaIn> {
    let cap = obj.call_method0("__dlpack__").map_err(|e| {
        PyTypeError::new_err(format!(
            "{arg}: expected a CUDA tensor with __dlpack__, got {} ({e})",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    // SAFETY: the capsule protocol: a valid "dltensor" capsule holds a DLManagedTensor.
    let managed = unsafe {
        let p = ffi::PyCapsule_GetPointer(cap.as_ptr(), DLTENSOR.as_ptr()) as *mut DLManagedTensor;
        if p.is_null() {
            ffi::PyErr_Clear();
            return Err(PyValueError::new_err(format!(
                "{arg}: __dlpack__ did not return a fresh 'dltensor' capsule"
            )));
        }
        ffi::PyCapsule_SetName(cap.as_ptr(), USED_DLTENSOR.as_ptr());
        p
    };
    // From here on `managed` is ours: build the guard first so every error path frees it.
    let t = unsafe { &(*managed).dl_tensor };
    let dims: Vec<usize> = (0..t.ndim as usize).map(|i| unsafe { *t.shape.add(i) } as usize).collect();
    let fail = |msg: String| -> PyResult<CudaIn> {
        unsafe {
            if let Some(del) = (*managed).deleter {
                del(managed)
            }
        }
        Err(PyValueError::new_err(msg))
    };
    if t.device.device_type != KDL_CUDA {
        return fail(format!(
            "{arg}: expected a CUDA tensor like the first argument, got one on DLPack device type {}",
            t.device.device_type
        ));
    }
    let id = t.device.device_id as usize;
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (KDL_FLOAT, 32, 1) => DType::F32,
        (KDL_FLOAT, 64, 1) => DType::F64,
        _ => {
            let e = format!("{arg}: expected dtype float32 or float64, got {}", dtype_name(t.dtype));
            unsafe {
                if let Some(del) = (*managed).deleter {
                    del(managed)
                }
            }
            return Err(PyTypeError::new_err(e));
        }
    };
    if let Some((want, want_id)) = like {
        if want != dtype {
            let e = format!(
                "{arg}: expected dtype {} (the dtype of the input), got {}",
                want.as_str(),
                dtype.as_str()
            );
            unsafe {
                if let Some(del) = (*managed).deleter {
                    del(managed)
                }
            }
            return Err(PyTypeError::new_err(e));
        }
        if want_id != id {
            return fail(format!(
                "{arg}: expected a tensor on cuda:{want_id} (the input's device), got one on cuda:{id}"
            ));
        }
    }
    if !t.strides.is_null() {
        let mut expect = 1i64;
        for i in (0..dims.len()).rev() {
            let s = unsafe { *t.strides.add(i) };
            if dims[i] > 1 && s != expect {
                return fail(format!("{arg}: expected a contiguous CUDA tensor (call .contiguous()), got shape {} with strides that are not row-major", fmt_shape(&dims)));
            }
            expect *= dims[i] as i64;
        }
    }
    let numel: usize = dims.iter().product();
    let dev = match device(id) {
        Ok(d) => d,
        Err(e) => {
            unsafe {
                if let Some(del) = (*managed).deleter {
                    del(managed)
                }
            }
            return Err(e);
        }
    };
    let cuda = dev.as_cuda_device().expect("a CUDA device");
    let stream = cuda.cuda_stream();
    let ptr = t.data as u64 + t.byte_offset;
    // SAFETY: torch's allocation holds `numel` elements of `dtype` at `ptr`, alive until
    // the deleter runs (after the view below is done with); `BORROWED` never drops the
    // tensor that wraps it, so candle never frees it.
    let wrap = || {
        let storage = unsafe {
            match dtype {
                DType::F32 => {
                    CudaStorage::wrap_cuda_slice(stream.upgrade_device_ptr::<f32>(ptr, numel), cuda.clone())
                }
                _ => CudaStorage::wrap_cuda_slice(stream.upgrade_device_ptr::<f64>(ptr, numel), cuda.clone()),
            }
        };
        Ok(Tensor::from_storage(Storage::Cuda(storage), numel, BackpropOp::none(), false))
    };
    match unsafe { BORROWED.view((ptr, numel, dtype, id), &dims, wrap) } {
        Ok(tensor) => Ok(CudaIn { tensor, managed, device_id: id }),
        Err(e) => fail(format!("{arg}: could not read the CUDA tensor in place: {e}")),
    }
}

/// The wrappers of torch's CUDA memory (see the module doc): 4096 blocks cover a
/// model's parameters and activations many times over.
static BORROWED: Borrowed = Borrowed::new(4096);

/// Reads CUDA arguments that share `like`, the dtype and device of the call's first
/// array (None until that first array is read; see [`input`]).
pub struct Cuda {
    pub like: Option<(DType, usize)>,
}

impl<'py> super::array::Reader<'py> for Cuda {
    type Arr = CudaIn;
    fn read(&self, obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<CudaIn> {
        input(obj, arg, self.like)
    }
    fn dims<'a>(a: &'a CudaIn) -> &'a [usize] {
        a.tensor.dims()
    }
    fn follow(&mut self, first: &CudaIn) {
        self.like.get_or_insert(first.like());
    }
}

/// CUDA cannot allocate the zero-byte buffers an empty batch needs: a clear error.
pub fn expect_samples(arg: &str, shape: &[usize]) -> PyResult<()> {
    if shape.contains(&0) {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a non-empty array on CUDA (the CUDA path cannot allocate empty results), got shape {}",
            fmt_shape(shape)
        )));
    }
    Ok(())
}

/// A CUDA argument that must have `shape`.
pub fn shaped(obj: &Bound<'_, PyAny>, arg: &str, like: (DType, usize), shape: &[usize]) -> PyResult<CudaIn> {
    let t = input(obj, arg, Some(like))?;
    expect_shape(arg, &t, shape)?;
    Ok(t)
}

/// A candle error of the CUDA path as a Python exception.
pub fn candle_err(e: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(format!("cnnboost CUDA: {e}"))
}

/// Checks the shape of a CUDA argument.
pub fn expect_shape(arg: &str, t: &Tensor, expected: &[usize]) -> PyResult<()> {
    super::array::expect_shape(arg, t.dims(), expected)
}

unsafe extern "C" fn delete_output(m: *mut DLManagedTensor) {
    // SAFETY: manager_ctx is the Box<(Option<Tensor>, Vec<i64>)> made in `capsule`.
    drop(Box::from_raw((*m).manager_ctx as *mut (Option<Tensor>, Vec<i64>)));
    drop(Box::from_raw(m));
}

unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    // A capsule nobody consumed still owns its tensor.
    if ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) == 1 {
        let m = ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
        if let Some(del) = (*m).deleter {
            del(m);
        }
    }
}

/// A result tensor as a DLPack capsule (no copy), shaped `shape`.
pub fn output<'py>(
    py: Python<'py>,
    t: Tensor,
    shape: &[usize],
    device_id: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let err = |e: candle_core::Error| PyRuntimeError::new_err(format!("cnnboost CUDA output: {e}"));
    let t = t.contiguous().map_err(err)?.reshape(shape).map_err(err)?;
    let (code_bits, size) = match t.dtype() {
        DType::F32 => (32u8, 4u64),
        DType::F64 => (64, 8),
        d => return Err(PyRuntimeError::new_err(format!("cnnboost CUDA output of dtype {}", d.as_str()))),
    };
    let ptr = {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(PyRuntimeError::new_err("cnnboost CUDA output: not on a CUDA device"));
        };
        let stream = cs.device.cuda_stream();
        let base = match t.dtype() {
            DType::F32 => cs.as_cuda_slice::<f32>().map_err(err)?.device_ptr(&stream).0,
            _ => cs.as_cuda_slice::<f64>().map_err(err)?.device_ptr(&stream).0,
        };
        base + layout.start_offset() as u64 * size
    };
    capsule(py, Some(t), ptr as *mut c_void, code_bits, shape, device_id)
}

/// An empty `[0]` result (an absent bias's gradient, eval's variance) of `dtype` on
/// CUDA device `device_id`: no allocation (CUDA refuses zero-byte ones), a null
/// data pointer, as DLPack allows for no elements.
pub fn empty_output<'py>(py: Python<'py>, dtype: DType, device_id: usize) -> PyResult<Bound<'py, PyAny>> {
    let bits = if dtype == DType::F32 { 32 } else { 64 };
    capsule(py, None, std::ptr::null_mut(), bits, &[0], device_id)
}

/// A "dltensor" capsule over `data`, owning `t` (which owns the memory) until torch
/// releases it.
fn capsule<'py>(
    py: Python<'py>,
    t: Option<Tensor>,
    data: *mut c_void,
    bits: u8,
    shape: &[usize],
    device_id: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut ctx = Box::new((t, dims));
    let managed = Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            data,
            device: DLDevice { device_type: KDL_CUDA, device_id: device_id as i32 },
            ndim: shape.len() as i32,
            dtype: DLDataType { code: KDL_FLOAT, bits, lanes: 1 },
            shape: ctx.1.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: Box::into_raw(ctx) as *mut c_void,
        deleter: Some(delete_output),
    });
    let raw = Box::into_raw(managed);
    // SAFETY: a new capsule owning `raw`; the destructor frees it unless consumed.
    unsafe {
        let cap = ffi::PyCapsule_New(raw as *mut c_void, DLTENSOR.as_ptr(), Some(capsule_destructor));
        if cap.is_null() {
            delete_output(raw);
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap))
    }
}

/// Runs candle work on the calling thread with the GIL released (the per-thread
/// stream candle uses is this thread's), waits for it, and maps errors and panics.
pub fn run<R: Send>(
    py: Python<'_>,
    dev: &Device,
    f: impl FnOnce() -> candle_core::Result<R> + Send,
) -> PyResult<R> {
    let out = py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = f()?;
            dev.synchronize()?;
            Ok::<R, candle_core::Error>(r)
        }))
    });
    match out {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(PyRuntimeError::new_err(format!("cnnboost CUDA: {e}"))),
        Err(panic) => Err(super::panic_error(panic)),
    }
}
