//! CPU kernels (rayon + the `gemm` crate), generic over `f32` and `f64`.
//!
//! Conventions shared by every module:
//! * inputs are contiguous row-major slices plus explicit sizes; kernels validate
//!   every size against the slice lengths and return [`Error`] — they never panic on
//!   caller data and never write to an input;
//! * outputs are freshly allocated `Vec`s, so a failed call has written nothing;
//! * reductions accumulate in `f64`, so `float32` results track a `float64`
//!   reference at large channel counts.

pub mod afi;
pub mod batchnorm;
pub mod error;
pub mod ffc;
pub mod gemm;
pub mod pool;

pub use error::{Error, Result};

use std::fmt::Debug;

/// The element types the kernels are instantiated for.
pub trait Float:
    num_traits::Float + Copy + Default + Debug + Send + Sync + std::iter::Sum + 'static
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

/// Product of sizes with overflow checking, for shapes that come from callers.
pub fn checked_numel(arg: &str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        Error::value(arg, "a shape whose element count fits in memory", format!("{dims:?}"))
    })
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
