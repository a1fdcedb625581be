//! `cnnboost._core`: the PyO3 layer. One file per module over the shared pieces here
//! and in `array.rs`: argument conversion (NumPy and DLPack, no copies), the mapping
//! of kernel errors and panics onto Python exceptions, and the thread pool the
//! kernels run in with the GIL released.

mod ab;
mod afi;
mod array;
#[cfg(feature = "cuda")]
mod dlpack;
mod ffc;
mod running;
mod ssm;

use crate::kernels;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::cell::OnceCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// The pool every kernel runs in: rayon's global pool cannot be resized, and users
/// need to match it to `torch.get_num_threads()` to avoid oversubscription.
static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

fn build_pool(threads: usize) -> PyResult<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cnnboost-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| PyRuntimeError::new_err(format!("cnnboost: could not start {threads} threads: {e}")))
}

/// Set in a child process by `fork` (multiprocessing's default start on Linux): the
/// child has only the forking thread, so the pool inherited from the parent has no
/// threads, and a kernel handed to it would wait forever.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn after_fork_in_child() {
    // Only an atomic store: a fork handler may run in a process whose other threads,
    // and whatever locks they held, are gone.
    FORKED.store(true, Ordering::SeqCst);
}

/// Registers [`after_fork_in_child`], once per process (at import).
fn watch_forks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    #[cfg(unix)]
    // SAFETY: registers a handler that only stores to an atomic.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(after_fork_in_child));
    });
}

/// In a forked child, takes the pool inherited from the parent out of `slot` and leaks
/// it (its threads do not exist here, and dropping it would signal them); returns its
/// size. `None` when this process has not forked since the last call.
fn forget_inherited_pool(slot: &mut Option<Arc<ThreadPool>>) -> Option<usize> {
    if !FORKED.swap(false, Ordering::SeqCst) {
        return None;
    }
    let inherited = slot.take()?;
    let threads = inherited.current_num_threads();
    std::mem::forget(inherited);
    Some(threads)
}

fn lock_poisoned<T>(_: T) -> PyErr {
    PyRuntimeError::new_err("cnnboost: thread pool lock poisoned")
}

fn pool() -> PyResult<Arc<ThreadPool>> {
    if FORKED.load(Ordering::SeqCst) {
        let mut guard = POOL.write().map_err(lock_poisoned)?;
        if let Some(threads) = forget_inherited_pool(&mut guard) {
            *guard = Some(build_pool(threads)?); // the parent's size, in the child
        }
    }
    if let Some(p) = POOL.read().ok().and_then(|g| g.clone()) {
        return Ok(p);
    }
    let mut guard = POOL.write().map_err(lock_poisoned)?;
    if guard.is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        *guard = Some(build_pool(n)?);
    }
    Ok(guard.clone().expect("pool was just set"))
}

/// The size of a call, for [`compute`]: the elements of its maps, plus its matrix
/// products' multiply-adds over 256.
pub(crate) fn work(elements: usize, multiply_adds: usize) -> usize {
    elements.saturating_add(multiply_adds / 256)
}

/// Calls of less [`work`] run their loops whole on the calling thread
/// ([`kernels::par::serially`]): below it, waking another thread and waiting for the
/// part it took cost more than they save on this VM. Alternating the two routes in
/// one process (docs/performance.md, "Measured 2026-12-01, midday"), two threads were
/// 1.1–1.5× slower at 12K–33K elements, even at 65K, and 0.65–0.9× from 130K up.
/// `_set_serial_work` changes it (the tests send every call through the pool's
/// threads with 0).
static SERIAL_WORK: AtomicUsize = AtomicUsize::new(1 << 16);

/// Sets the [`work`] below which calls run on the calling thread; returns the previous
/// value. For tests and benchmarks.
#[pyfunction]
fn _set_serial_work(work: usize) -> usize {
    SERIAL_WORK.swap(work, Ordering::Relaxed)
}

/// A calling thread's own pool: the thread itself as worker 0 (rayon's
/// `use_current_thread`) and `threads - 1` workers, so that a call starts on the
/// calling thread and wakes only the workers it splits work to, as OpenMP's (torch's)
/// parallel regions do. Handing every call to the shared pool instead left the
/// calling thread blocked and its CPU idle while the shared pool's second worker,
/// woken by the first, waited behind it on the first one's CPU: on this 2-CPU VM AB's
/// eval at 32×2048×7×7 then ran on one thread, 2.2–3.1 ms against 1.4 ms
/// (docs/performance.md, "Measured 2026-12-01, midday").
struct OwnPool {
    pool: ThreadPool,
    /// The process that built it: a forked child inherits the registration but not
    /// the workers.
    pid: u32,
}

thread_local! {
    /// Built at the thread's first call, of the kernels' thread count then. rayon
    /// leaves the thread registered in it for the rest of the thread's life, so it
    /// cannot be rebuilt: after `set_num_threads` to another count, or in a forked
    /// child, this thread hands its large calls to the shared pool instead. None where
    /// rayon refuses (a thread that is already a worker of some pool).
    static OWN_POOL: OnceCell<Option<OwnPool>> = const { OnceCell::new() };
}

/// Whether calling threads run large calls in their own pools (default) or hand them
/// to the shared one; `_set_own_pools`, so that the tests take both routes.
static OWN_POOLS: AtomicBool = AtomicBool::new(true);

/// Sets whether calling threads run calls in pools of their own (see [`OwnPool`]);
/// returns the previous value. For tests and benchmarks.
#[pyfunction]
fn _set_own_pools(on: bool) -> bool {
    OWN_POOLS.swap(on, Ordering::Relaxed)
}

/// Runs a kernel with the GIL released: in the calling thread's own pool (see
/// [`OwnPool`]), or the shared pool where that one cannot serve; a call of small
/// [`work`] on the calling thread alone. The kernels give the same results on any
/// number of threads. A panic (a bug, never expected) becomes a `RuntimeError`
/// instead of crossing the FFI boundary.
pub(crate) fn compute<R: Send>(py: Python<'_>, work: usize, f: impl FnOnce() -> R + Send) -> PyResult<R> {
    let shared = pool()?;
    let serial = work < SERIAL_WORK.load(Ordering::Relaxed);
    let own_pools = OWN_POOLS.load(Ordering::Relaxed);
    py.detach(move || {
        let run = || catch_unwind(AssertUnwindSafe(f));
        OWN_POOL.with(|own| {
            let threads = shared.current_num_threads();
            let own = own.get_or_init(|| {
                let pool = ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("cnnboost-{i}"))
                    .use_current_thread()
                    .build()
                    .ok()?;
                Some(OwnPool { pool, pid: std::process::id() })
            });
            let own = own.as_ref().filter(|own| {
                own_pools && own.pid == std::process::id() && own.pool.current_num_threads() == threads
            });
            match (own, serial) {
                (Some(own), true) => own.pool.install(|| kernels::par::serially(run)),
                (Some(own), false) => own.pool.install(run),
                // This thread is a worker of some pool (its own, of another size or
                // inherited, or a foreign one, where rayon refused to build it), so
                // its unsplit loops stay in that pool's registry.
                (None, true) => kernels::par::serially(run),
                (None, false) => shared.install(run),
            }
        })
    })
    .map_err(panic_error)
}

/// A caught panic as a `RuntimeError`.
pub(crate) fn panic_error(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    PyRuntimeError::new_err(format!("cnnboost internal error (please report it): {msg}"))
}

/// Kernel errors as Python exceptions: wrong element types are `TypeError`s, every
/// other bad argument a `ValueError`.
pub(crate) fn to_py_err(e: kernels::Error) -> PyErr {
    match e.kind {
        kernels::error::ErrorKind::Type => PyTypeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// A float as Python's `repr` writes it (`1e-05`, not Rust's `0.00001`), for reprs.
pub(crate) fn py_float(v: f64) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e16) {
        let s = format!("{v:e}"); // e.g. "1e-5"
        match s.split_once('e') {
            Some((m, e)) => {
                let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
                format!("{m}e{sign}{digits:0>2}")
            }
            None => s,
        }
    } else {
        format!("{v:?}")
    }
}

/// Sets the number of threads the kernels use (default: the number of CPUs).
#[pyfunction]
fn set_num_threads(num_threads: i64) -> PyResult<()> {
    if num_threads < 1 {
        return Err(PyValueError::new_err(format!(
            "num_threads: expected an integer >= 1, got {num_threads}"
        )));
    }
    let p = build_pool(num_threads as usize)?;
    let mut guard = POOL.write().map_err(lock_poisoned)?;
    forget_inherited_pool(&mut guard); // a forked child's: leaked, not dropped
    *guard = Some(p);
    Ok(())
}

/// The number of threads the kernels use.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// Whether the CPU calls run the candle implementation (`src/candle`) instead of the
/// rayon kernels: `cnnboost.set_backend("candle")`, for checking the device-generic
/// code (the one CUDA runs) against the same references on the CPU.
static CANDLE: AtomicBool = AtomicBool::new(false);

pub(crate) fn candle_backend() -> bool {
    CANDLE.load(Ordering::Relaxed)
}

/// Chooses what computes CPU calls: `"rayon"` (the default, the fast kernels) or
/// `"candle"` (the device-generic implementation on candle's CPU device: the same
/// code as on CUDA, slower; for checking it).
#[pyfunction]
fn set_backend(name: &str) -> PyResult<()> {
    let candle = match name {
        "rayon" => false,
        "candle" => true,
        other => {
            return Err(PyValueError::new_err(format!("name: expected 'rayon' or 'candle', got {other:?}")))
        }
    };
    CANDLE.store(candle, Ordering::Relaxed);
    Ok(())
}

/// The backend of CPU calls, `"rayon"` or `"candle"`.
#[pyfunction]
fn get_backend() -> &'static str {
    if candle_backend() {
        "candle"
    } else {
        "rayon"
    }
}

/// Registers a BLAS's `sgemm_` and `dgemm_` (function addresses) for the kernels'
/// products, or with `(0, 0)` goes back to the built-in `gemm` crate. The Python
/// package passes torch's (`cnnboost.set_gemm`); an address that is not such a
/// function crashes the process, which is why this is private. `serial`: the BLAS
/// computes each call on the calling thread (the kernels then split large products
/// across their own threads); it must then be safe to call from several threads.
#[pyfunction]
#[pyo3(signature = (sgemm, dgemm, serial = false))]
fn _set_blas(sgemm: usize, dgemm: usize, serial: bool) -> PyResult<()> {
    let fns = (sgemm != 0 || dgemm != 0).then_some((sgemm, dgemm));
    // SAFETY: the caller's contract above; the functions are checked by a product.
    unsafe { kernels::gemm::use_blas(fns, serial) }
        .map_err(|e| PyRuntimeError::new_err(format!("cnnboost: this BLAS cannot be used: {e}")))
}

/// What computes the kernels' matrix products: `"blas"` (a registered BLAS, torch's
/// by default) or `"builtin"` (the `gemm` crate).
#[pyfunction]
fn get_gemm() -> &'static str {
    kernels::gemm::backend()
}

/// `values` (any shape `S`) with every value repeated `hw` times: shape `S + [hw]`;
/// with `channels_last`, `values` `[N, C]` repeated as the rows of `[N, hw, C]`.
/// The gradient of a global average pooling, written out for an input whose
/// gradient torch would store (a leaf): torch would otherwise clone the broadcast.
#[pyfunction]
#[pyo3(signature = (values, hw, channels_last = false))]
fn expand_planes<'py>(
    values: &Bound<'py, PyAny>,
    hw: i64,
    channels_last: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if hw < 0 {
        return Err(PyValueError::new_err(format!("hw: expected an integer >= 0, got {hw}")));
    }
    array::dispatch!(values, "values", expand_planes_t(hw as usize, channels_last))
}

fn expand_planes_t<'py, T: numpy::Element + kernels::Float>(
    values: &Bound<'py, PyAny>,
    hw: usize,
    channels_last: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let v = array::input::<T>(values, "values")?;
    let src = v.slice();
    if channels_last {
        let s = array::expect_rank("values", v.shape(), 2, "[N, C]")?;
        let (n, c) = (s[0], s[1]);
        let shape = [n, hw, c];
        kernels::checked_numel("values", &shape).map_err(to_py_err)?;
        let out =
            compute(values.py(), work(n * hw * c, 0), || kernels::channels_last::broadcast(src, hw, c))?;
        return array::output(values.py(), out, &shape);
    }
    let mut shape = v.shape().to_vec();
    shape.push(hw);
    kernels::checked_numel("values", &shape).map_err(to_py_err)?;
    let out = compute(values.py(), work(src.len().saturating_mul(hw), 0), || {
        kernels::pool::broadcast_planes(src, hw)
    })?;
    array::output(values.py(), out, &shape)
}

/// The `[N, C]` plane means of a map, on the backend CPU calls use: `x` is
/// `[N, C, HW]`, or `[N, HW, C]` when `channels_last` (a torch `channels_last` map in
/// its memory order). Call it inside [`compute`].
pub(crate) fn pool_map<T: kernels::Float>(
    x: &[T],
    n: usize,
    c: usize,
    hw: usize,
    channels_last: bool,
) -> Vec<T> {
    if channels_last {
        backend!(kernels::channels_last::pool, crate::candle::pool_host_channels_last, (x, n, hw, c))
    } else {
        backend!(kernels::pool::global_avg_pool, crate::candle::pool_host, (x, hw))
    }
}

/// The CUDA build computes on `[N, C, H, W]` maps only (the Python modules pass CUDA
/// tensors in that layout).
#[cfg(feature = "cuda")]
pub(crate) fn no_channels_last_on_cuda(channels_last: bool) -> PyResult<()> {
    if channels_last {
        return Err(PyValueError::new_err(
            "channels_last: expected False for CUDA tensors (the CUDA build takes [N, C, H, W] maps), got True",
        ));
    }
    Ok(())
}

/// Runs `$rayon` or, under `set_backend("candle")`, `$candle`: two calls of the
/// same signature (the candle `*_host` adapters mirror the rayon kernels').
macro_rules! backend {
    ($rayon:path, $candle:path, ($($a:expr),* $(,)?)) => {
        if $crate::bindings::candle_backend() { $candle($($a),*) } else { $rayon($($a),*) }
    };
}
pub(crate) use backend;

/// Panics inside `compute`, for the test that checks a panic becomes a Python
/// exception rather than crossing the FFI boundary.
#[pyfunction]
fn _panic_in_kernel(py: Python<'_>, message: String) -> PyResult<()> {
    compute(py, usize::MAX, move || -> () { panic!("{message}") })
}

#[pymodule]
#[cfg_attr(feature = "cuda", pyo3(name = "cnnboost_cuda"))]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    watch_forks();
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(running::update_running_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_set_serial_work, m)?)?;
    m.add_function(wrap_pyfunction!(_set_own_pools, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_backend, m)?)?;
    m.add_function(wrap_pyfunction!(get_backend, m)?)?;
    m.add_function(wrap_pyfunction!(_set_blas, m)?)?;
    m.add_function(wrap_pyfunction!(get_gemm, m)?)?;
    m.add_function(wrap_pyfunction!(expand_planes, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_in_kernel, m)?)?;
    m.add_class::<ab::Ab>()?;
    m.add_class::<afi::Afi>()?;
    m.add_class::<ffc::Ffc>()?;
    m.add_class::<ssm::Ssm>()?;
    Ok(())
}
