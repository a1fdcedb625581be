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
pub mod par;
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
    /// `e^self`, in straight-line code that the compiler vectorises when it is applied
    /// across a slice (libm's `expf` is a call per element). f32: within 2 ulp of the
    /// exact value for results in the normal range (torch's vectorised `exp` on CPU is
    /// within 1 ulp); f64: `f64::exp`.
    fn exp_lanes(self) -> Self;
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
    #[inline(always)]
    fn exp_lanes(self) -> Self {
        exp_f32(self)
    }
}

/// `e^x` for f32 without a branch or a call: `x = n·ln2 + r` with `n` rounded to the
/// nearest integer (by the 1.5·2²³ trick: no `round`, which baseline x86-64 lacks), a
/// degree-7 polynomial for `e^r` on `|r| ≤ ln2/2` (the Taylor series' coefficients,
/// whose truncation error there, 5·10⁻⁹ relative, is under a tenth of an ulp), and `2^n`
/// built in the exponent bits. `x` is clamped to where `2^n` is a normal number, so
/// results below ~10⁻³⁸ come out as ~10⁻³⁸ instead of subnormal or 0, and above
/// ~2·10³⁸ as ~2·10³⁸ instead of infinity; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer.
    const MAGIC: f32 = 12_582_912.0;
    // ln 2 in two parts; LN2_HI has 15 significant bits, so `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0); // NaN stays NaN
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n's integer value sits in t's low mantissa bits.
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
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
    #[inline(always)]
    fn exp_lanes(self) -> Self {
        self.exp()
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

#[cfg(test)]
mod tests {
    use super::Float;

    #[test]
    fn exp_lanes_is_within_two_ulp() {
        // Every 97th float32 bit pattern in [-87, 88], against f64's exp rounded to f32.
        let (lo, hi) = (-87.0f32, 88.0f32);
        let mut worst = 0i64;
        let mut checked = 0;
        for bits in (0u32..u32::MAX).step_by(97) {
            let x = f32::from_bits(bits);
            if !(lo..=hi).contains(&x) {
                continue;
            }
            let (got, want) = (x.exp_lanes(), (x as f64).exp() as f32);
            assert!(got.is_finite() && got > 0.0, "exp({x}) = {got}");
            worst = worst.max((got.to_bits() as i64 - want.to_bits() as i64).abs());
            checked += 1;
        }
        assert!(checked > 10_000_000, "{checked}");
        assert!(worst <= 2, "{worst} ulp");
    }

    #[test]
    fn exp_lanes_at_the_edges() {
        assert!(f32::NAN.exp_lanes().is_nan());
        assert_eq!(0.0f32.exp_lanes(), 1.0);
        assert_eq!(1.0f32.exp_lanes(), std::f32::consts::E);
        // Clamped, not overflowing to infinity or underflowing to zero.
        let (big, small) = (f32::INFINITY.exp_lanes(), f32::NEG_INFINITY.exp_lanes());
        assert!(big.is_finite() && big > 1e38, "{big}");
        assert!(small > 0.0 && small < 2e-38, "{small}");
        assert_eq!((-1000.0f32).exp_lanes(), small);
        // A sigmoid built on it saturates to 1, and to 0 within 10⁻³⁸.
        assert!(1.0 / (1.0 + (100.0f32).exp_lanes()) < 1e-38);
        assert_eq!(1.0 / (1.0 + (-100.0f32).exp_lanes()), 1.0);
        assert_eq!(2.5f64.exp_lanes(), 2.5f64.exp());
    }
}
