//! CPU kernels (rayon, and a GEMM: the `gemm` crate or a registered BLAS, see
//! [`gemm`]), generic over `f32` and `f64`.
//!
//! Conventions shared by every module:
//! * inputs are contiguous row-major slices plus explicit sizes; kernels validate
//!   every size against the slice lengths and return [`Error`] — they never panic on
//!   caller data and never write to an input;
//! * outputs are freshly allocated `Vec`s, so a failed call has written nothing;
//! * reductions accumulate in `f64`, so `float32` results track a `float64`
//!   reference at large channel counts.

pub mod ab;
pub mod afi;
pub mod batchnorm;
pub mod channels_last;
pub mod error;
pub mod ffc;
pub mod gemm;
pub mod pool;
pub mod ssm;
pub mod stream;

pub use error::{Error, Result};

use std::fmt::Debug;

/// The element types the kernels are instantiated for.
/// `WithDType` lets the same types cross into the candle implementation.
pub trait Float:
    num_traits::Float
    + Copy
    + Default
    + Debug
    + Send
    + Sync
    + std::iter::Sum
    + candle_core::WithDType
    + gemm::BlasScalar
    + 'static
{
    /// The NumPy/torch name of the type, for error messages.
    const NAME: &'static str;
    fn of(v: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl Float for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
}

/// What a classifier head's forward returns (FFC, SSM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// The mean of the head's J outputs' logits, `[N, K]`.
    Ensemble,
    /// Every output's logits, `[J, N, K]`.
    All,
}

impl Outputs {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ensemble" => Ok(Outputs::Ensemble),
            "all" => Ok(Outputs::All),
            other => Err(Error::value("outputs", "'ensemble' or 'all'", format!("{other:?}"))),
        }
    }
}

/// Product of sizes with overflow checking, for shapes that come from callers.
pub fn checked_numel(arg: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::value(arg, "a shape whose element count fits in memory", format!("{dims:?}")))
}

/// Checks that `data` holds exactly `dims` elements.
pub fn check_len<T>(arg: &str, data: &[T], dims: &[usize]) -> Result<()> {
    let want = checked_numel(arg, dims)?;
    if data.len() != want {
        return Err(Error::shape(
            arg,
            format!("{want} elements (shape {dims:?})"),
            format!("{} elements", data.len()),
        ));
    }
    Ok(())
}

/// Per-column totals of a row-major matrix with `cols` columns, in f64 (bias
/// gradients: the sum of the output gradient over the batch).
pub fn column_totals<T: Float>(m: &[T], cols: usize) -> Vec<f64> {
    if cols == 0 {
        return Vec::new();
    }
    batchnorm::column_sums(m.len() / cols, cols, |i| &m[i * cols..(i + 1) * cols], |v, _| v.as_f64())
}

/// Buffers this large are backed by 2 MiB pages where the kernel allows it.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// An empty `Vec` with room for `len` elements, for a kernel to fill completely
/// (through `spare_capacity_mut`) before `set_len`.
///
/// Large outputs (AB's and AFI's maps are ~100 MB) are written once, so their cost is
/// dominated by first-touch page faults, one per 4 KiB page on a VM; on Linux such a
/// buffer is advised to use transparent huge pages, which cuts the faults 512-fold.
pub fn output_buffer<T>(len: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(len);
    let bytes = len * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_PAGE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let aligned = (start + HUGE - 1) & !(HUGE - 1);
        let end = (start + bytes) & !(HUGE - 1);
        if end > aligned {
            // SAFETY: advice on pages inside our own, not yet touched allocation; a
            // kernel without THP ignores it or returns an error we may ignore.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (bytes, HUGE_PAGE_MIN_BYTES);
    v
}
