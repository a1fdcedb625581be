//! Safe matrix products, with operands read in place through strides (a transposed
//! operand is a stride swap, never a copy).
//!
//! Two GEMMs can compute them:
//! * the `gemm` crate (built in, always available);
//! * a BLAS `?gemm_` registered at run time with [`use_blas`]. The Python package
//!   registers the one torch ships (MKL in torch's x86 wheels), which runs 20-30%
//!   faster than the `gemm` crate on the AVX2 machines we measured (docs/performance.md,
//!   "GEMM"). SSM and FFC are GEMM-bound, so this is most of their speed.
//!
//! A registered BLAS is used for every product whose operands it can address (each
//! operand unit-strided in one dimension, sizes below 2³¹); the rest go to the `gemm`
//! crate.

use super::Float;
use gemm::Parallelism;
use std::marker::PhantomData;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The Fortran BLAS `sgemm_`/`dgemm_` calling convention: every argument by
/// reference, column-major operands, and the two hidden lengths of the `trans`
/// strings that gfortran appends (C implementations ignore them).
///
/// The integers are passed as pointers to `i64` holding values below 2³¹: on a
/// little-endian machine an LP64 BLAS (32-bit integers) reads the low half, which is
/// the same value, and an ILP64 BLAS reads all of it, so one call suits both.
pub type BlasGemm<T> = unsafe extern "C" fn(
    transa: *const c_char,
    transb: *const c_char,
    m: *const i64,
    n: *const i64,
    k: *const i64,
    alpha: *const T,
    a: *const T,
    lda: *const i64,
    b: *const T,
    ldb: *const i64,
    beta: *const T,
    c: *mut T,
    ldc: *const i64,
    transa_len: usize,
    transb_len: usize,
) -> ();

/// The registered `sgemm_` and `dgemm_` (0: none).
static SGEMM: AtomicUsize = AtomicUsize::new(0);
static DGEMM: AtomicUsize = AtomicUsize::new(0);
/// Whether the registered BLAS computes each call on the calling thread alone (then
/// [`product`] splits a large product across the kernels' threads itself).
static SERIAL: AtomicBool = AtomicBool::new(false);

/// The element types a BLAS computes: which registered function serves each.
pub trait BlasScalar: Sized {
    /// The registered BLAS GEMM for this type, if any.
    fn blas() -> Option<BlasGemm<Self>>;
}

impl BlasScalar for f32 {
    fn blas() -> Option<BlasGemm<f32>> {
        match SGEMM.load(Ordering::Acquire) {
            0 => None,
            // SAFETY: only `use_blas` stores a non-zero value, a function with this
            // signature (its caller's contract), checked by a product before storing.
            f => Some(unsafe { std::mem::transmute::<usize, BlasGemm<f32>>(f) }),
        }
    }
}

impl BlasScalar for f64 {
    fn blas() -> Option<BlasGemm<f64>> {
        match DGEMM.load(Ordering::Acquire) {
            0 => None,
            // SAFETY: as for f32.
            f => Some(unsafe { std::mem::transmute::<usize, BlasGemm<f64>>(f) }),
        }
    }
}

/// Which GEMM computes the products: `"blas"` once [`use_blas`] registered one,
/// else `"builtin"` (the `gemm` crate).
pub fn backend() -> &'static str {
    if SGEMM.load(Ordering::Acquire) != 0 {
        "blas"
    } else {
        "builtin"
    }
}

/// Registers a BLAS's `sgemm_` and `dgemm_` (their addresses) for every later
/// product, or, with `None`, goes back to the `gemm` crate.
///
/// Before registering, each function computes a small product with both transposes
/// and an accumulation, checked against the `gemm` crate; on a mismatch nothing is
/// registered and the error says which type failed.
///
/// # Safety
/// Each address must be that of a function with the Fortran BLAS `?gemm_` signature
/// and semantics for its type (see [`BlasGemm`]), valid for the rest of the process.
pub unsafe fn use_blas(sgemm_dgemm: Option<(usize, usize)>, serial: bool) -> Result<(), String> {
    let Some((s, d)) = sgemm_dgemm else {
        SGEMM.store(0, Ordering::Release);
        DGEMM.store(0, Ordering::Release);
        SERIAL.store(false, Ordering::Release);
        return Ok(());
    };
    if s == 0 || d == 0 || cfg!(target_endian = "big") {
        return Err("a BLAS needs both sgemm_ and dgemm_ (and a little-endian machine)".into());
    }
    let sf = std::mem::transmute::<usize, BlasGemm<f32>>(s);
    let df = std::mem::transmute::<usize, BlasGemm<f64>>(d);
    self_check(sf).map_err(|e| format!("sgemm_: {e}"))?;
    self_check(df).map_err(|e| format!("dgemm_: {e}"))?;
    SERIAL.store(serial, Ordering::Release);
    SGEMM.store(s, Ordering::Release);
    DGEMM.store(d, Ordering::Release);
    Ok(())
}

/// A few small products through `f`, every transpose combination, compared with the
/// `gemm` crate.
fn self_check<T: Float>(f: BlasGemm<T>) -> Result<(), String> {
    let (m, k, n) = (5, 7, 3);
    let a: Vec<T> = (0..m * k).map(|i| T::of(((i * 37) % 11) as f64 - 5.0)).collect();
    let b: Vec<T> = (0..k * n).map(|i| T::of(((i * 17) % 13) as f64 - 6.0)).collect();
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        // The same values read through transposed storage.
        let av = if a_t { Mat::new(&a, k, m).t() } else { Mat::new(&a, m, k) };
        let bv = if b_t { Mat::new(&b, n, k).t() } else { Mat::new(&b, k, n) };
        let mut want = vec![T::one(); m * n];
        builtin(Dst::of(&mut want, n), av, bv, T::of(0.5), true, true);
        let mut got = vec![T::one(); m * n];
        if !blas_matmul(f, &Dst::of(&mut got, n), av, bv, T::of(0.5), true) {
            return Err("cannot address the check's operands".into());
        }
        // Small integers: both compute them exactly.
        if got != want {
            return Err(format!("a {m}x{k}x{n} product differs from the built-in GEMM's"));
        }
    }
    Ok(())
}

/// A read-only strided view of a `rows × cols` matrix inside a slice:
/// element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, row_stride: cols, col_stride: 1 }
    }
    /// The leading `cols` columns of a row-major matrix with `ld` elements per row.
    pub fn with_ld(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        Mat { data, rows, cols, row_stride: ld, col_stride: 1 }
    }
    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    fn assert_in_bounds(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "gemm: {what} view out of bounds");
        }
    }
}

/// `dst = alpha · a · b  (+ dst if accumulate)`, where `dst` is row-major
/// `a.rows × b.cols` with `dst_ld` elements per row.
///
/// Panics (an internal invariant, never caller data: kernels validate shapes first)
/// if the views do not fit their slices or the inner sizes differ.
pub fn matmul<T: Float>(dst: &mut [T], dst_ld: usize, a: Mat<T>, b: Mat<T>, alpha: T, accumulate: bool) {
    product(Dst::of(dst, dst_ld), a, b, alpha, accumulate);
}

/// [`matmul`] on the calling thread alone, for a small product inside a parallel
/// task (where a threaded GEMM would oversubscribe the cores): always the `gemm`
/// crate, never a BLAS with threads of its own.
pub fn matmul_serial<T: Float>(
    dst: &mut [T],
    dst_ld: usize,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
) {
    builtin(Dst::of(dst, dst_ld), a, b, alpha, accumulate, false);
}

/// `alpha · a · b` into a new row-major `a.rows × b.cols` matrix, which the product
/// writes once (never zeroed first).
pub fn matmul_new<T: Float>(a: Mat<T>, b: Mat<T>, alpha: T) -> Vec<T> {
    let len = a.rows * b.cols;
    let mut out = Vec::with_capacity(len);
    let dst = Dst { ptr: out.as_mut_ptr(), len, ld: b.cols, _borrow: PhantomData };
    product(dst, a, b, alpha, false);
    // SAFETY: a product that does not accumulate writes every element of its
    // destination (BLAS with beta = 0, the gemm crate without reading dst, or the
    // zero fill of an empty inner dimension), and `len` is within the capacity.
    unsafe { out.set_len(len) };
    out
}

/// Where a product goes: a row-major matrix with `ld` elements per row in `len`
/// elements from `ptr`, exclusively borrowed. A raw pointer, so that a product that
/// does not accumulate may write into memory not yet initialised ([`matmul_new`]).
struct Dst<'a, T> {
    ptr: *mut T,
    len: usize,
    ld: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> Dst<'a, T> {
    fn of(slice: &'a mut [T], ld: usize) -> Self {
        Dst { ptr: slice.as_mut_ptr(), len: slice.len(), ld, _borrow: PhantomData }
    }
    /// Panics unless an `m × n` matrix fits.
    fn assert_fits(&self, m: usize, n: usize) {
        assert!(self.ld >= n && (m - 1) * self.ld + n <= self.len, "gemm: dst out of bounds");
    }
}

fn product<T: Float>(dst: Dst<T>, a: Mat<T>, b: Mat<T>, alpha: T, accumulate: bool) {
    if let Some(f) = T::blas() {
        let done = if SERIAL.load(Ordering::Acquire) {
            split_blas_matmul(f, &dst, a, b, alpha, accumulate)
        } else {
            blas_matmul(f, &dst, a, b, alpha, accumulate)
        };
        if done {
            return;
        }
    }
    builtin(dst, a, b, alpha, accumulate, true);
}

/// Products of at least this many multiply-adds are split across threads when the
/// BLAS is serial; below it, one thread is faster than waking another.
const SPLIT_MIN: usize = 1 << 21;

/// [`blas_matmul`] with a serial BLAS, in one block per thread of the kernels' pool:
/// the rows of `dst` (and of `a`) split in equal blocks, or its columns (and those of
/// `b`) when it has more columns than rows. The blocks write disjoint parts of `dst`.
fn split_blas_matmul<T: Float>(
    f: BlasGemm<T>,
    dst: &Dst<T>,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = rayon::current_num_threads();
    if threads < 2 || m.saturating_mul(n).saturating_mul(k) < SPLIT_MIN || m == 0 || n == 0 || k == 0 {
        return blas_matmul(f, dst, a, b, alpha, accumulate);
    }
    if blas_layouts(dst, a, b).is_none() {
        return false;
    }
    dst.assert_fits(m, n);
    a.assert_in_bounds("lhs");
    b.assert_in_bounds("rhs");
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let parts = threads.min(len);
    let (ptr, dst_len, ld) = (dst.ptr as usize, dst.len, dst.ld);
    use super::par::SerialAware;
    use rayon::prelude::*;
    (0..parts).into_par_iter().serial_aware().for_each(|p| {
        let (lo, hi) = (len * p / parts, len * (p + 1) / parts);
        // SAFETY: block `p` covers rows (or columns) lo..hi of `dst`, which no other
        // block touches; its offset is inside `dst` (lo < m or n), so the sub-range
        // starts within the exclusive borrow `dst` stands for.
        let (block, a, b) = if by_rows {
            let offset = lo * ld;
            let d = Dst {
                ptr: unsafe { (ptr as *mut T).add(offset) },
                len: dst_len - offset,
                ld,
                _borrow: PhantomData,
            };
            let a = Mat { data: &a.data[lo * a.row_stride..], rows: hi - lo, ..a };
            (d, a, b)
        } else {
            let d =
                Dst { ptr: unsafe { (ptr as *mut T).add(lo) }, len: dst_len - lo, ld, _borrow: PhantomData };
            let b = Mat { data: &b.data[lo * b.col_stride..], cols: hi - lo, ..b };
            (d, a, b)
        };
        // A block has the strides of the whole and smaller sizes, so BLAS addresses it.
        assert!(blas_matmul(f, &block, a, b, alpha, accumulate), "gemm: a block was declined");
    });
    true
}

/// How BLAS addresses a `rows × cols` view whose element `(r, c)` is at
/// `r·rs + c·cs`: `('N', ld)` if it is column-major with leading dimension `ld`,
/// `('T', ld)` if it is the transpose of one; `None` if neither (BLAS needs a unit
/// stride in one dimension) or a size does not fit BLAS's 32-bit integers.
fn blas_layout(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(u8, i64)> {
    const MAX: usize = i32::MAX as usize;
    if rows > MAX || cols > MAX {
        return None;
    }
    // A dimension of size 1 has no stride to speak of.
    let col_major = rs == 1 || rows == 1;
    let row_major = cs == 1 || cols == 1;
    let (trans, ld) = if col_major {
        (b'N', if cols == 1 { rows.max(1) } else { cs })
    } else if row_major {
        (b'T', if rows == 1 { cols.max(1) } else { rs })
    } else {
        return None;
    };
    let least = if trans == b'N' { rows } else { cols };
    (ld >= least.max(1) && ld <= MAX).then_some((trans, ld as i64))
}

/// How BLAS addresses the operands of `dst = a · b`: `(transa, lda, transb, ldb)` of
/// `dstᵀ = bᵀ · aᵀ`, or `None` if it cannot.
fn blas_layouts<T>(dst: &Dst<T>, a: Mat<T>, b: Mat<T>) -> Option<(u8, i64, u8, i64)> {
    let (m, k) = (a.rows, a.cols);
    if m > i32::MAX as usize || dst.ld > i32::MAX as usize {
        return None;
    }
    // bᵀ is n × k with element (j, p) at j·b.col_stride + p·b.row_stride; aᵀ likewise.
    let (ta, lda) = blas_layout(b.cols, k, b.col_stride, b.row_stride)?;
    let (tb, ldb) = blas_layout(k, m, a.col_stride, a.row_stride)?;
    Some((ta, lda, tb, ldb))
}

/// `dst = alpha · a · b (+ dst)` through a BLAS GEMM; false (and nothing written) if
/// BLAS cannot address an operand or a size is zero (the built-in path does those).
///
/// Row-major `dst` (`m × n`, `ld`) is column-major `dstᵀ`, so BLAS computes
/// `dstᵀ = bᵀ · aᵀ`.
fn blas_matmul<T: Float>(
    f: BlasGemm<T>,
    dst: &Dst<T>,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
) -> bool {
    assert_eq!(a.cols, b.rows, "gemm: inner sizes differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 || k == 0 {
        return false; // nothing for BLAS to do; the built-in path handles empty sizes
    }
    let Some((ta, lda, tb, ldb)) = blas_layouts(dst, a, b) else {
        return false;
    };
    dst.assert_fits(m, n);
    a.assert_in_bounds("lhs");
    b.assert_in_bounds("rhs");
    let beta = if accumulate { T::one() } else { T::zero() };
    let (ta, tb) = (ta as c_char, tb as c_char);
    let (mm, nn, kk, ldc) = (n as i64, m as i64, k as i64, dst.ld as i64);
    // SAFETY: the views were bounds-checked and their layouts validated above (BLAS
    // reads exactly the elements the views span, and reads dst only when beta = 1);
    // dst is an exclusive borrow that the inputs, shared borrows, cannot alias; f is
    // a registered BLAS GEMM (`use_blas`).
    unsafe {
        f(
            &ta,
            &tb,
            &mm,
            &nn,
            &kk,
            &alpha,
            b.data.as_ptr(),
            &lda,
            a.data.as_ptr(),
            &ldb,
            &beta,
            dst.ptr,
            &ldc,
            1,
            1,
        );
    }
    true
}

/// [`matmul`] through the `gemm` crate, on the rayon pool's threads if `threaded`.
fn builtin<T: Float>(dst: Dst<T>, a: Mat<T>, b: Mat<T>, alpha: T, accumulate: bool, threaded: bool) {
    assert_eq!(a.cols, b.rows, "gemm: inner sizes differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    dst.assert_fits(m, n);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i's n elements lie inside dst (assert_fits).
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.ld), n) }.fill(T::zero());
            }
        }
        return;
    }
    a.assert_in_bounds("lhs");
    b.assert_in_bounds("rhs");
    // The gemm crate runs small products on one thread by itself.
    let parallelism = if threaded && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every view was bounds-checked above; dst does not alias the inputs
    // (it is an exclusive borrow while they are shared borrows); the gemm crate reads
    // dst only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<f64>, b: Mat<f64>) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] += a.data[i * a.row_stride + p * a.col_stride]
                        * b.data[p * b.row_stride + j * b.col_stride];
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (37, 129, 65);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 104729) % 97) as f64 / 48.0 - 1.0).collect();
        let am = Mat::new(&a, m, k);
        let bt_store: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let bt = Mat::new(&bt_store, n, k).t();
        let want = naive(am, Mat::new(&b, k, n));
        let got = matmul_new(am, bt, 1.0);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9);
        }
        let mut acc = got.clone();
        matmul(&mut acc, n, am, Mat::new(&b, k, n), 0.5, true);
        for (g, w) in acc.iter().zip(&want) {
            assert!((g - 1.5 * w).abs() < 1e-9);
        }
    }

    /// A reference column-major Fortran `dgemm_`, reading its integers as `I` (i32:
    /// an LP64 BLAS; i64: ILP64), to check how `blas_matmul` maps row-major views.
    unsafe extern "C" fn naive_dgemm<I: Copy + TryInto<usize>>(
        ta: *const c_char,
        tb: *const c_char,
        m: *const i64,
        n: *const i64,
        k: *const i64,
        alpha: *const f64,
        a: *const f64,
        lda: *const i64,
        b: *const f64,
        ldb: *const i64,
        beta: *const f64,
        c: *mut f64,
        ldc: *const i64,
        _: usize,
        _: usize,
    ) {
        let int = |p: *const i64| -> usize {
            let v: I = *(p as *const I);
            v.try_into().ok().expect("non-negative")
        };
        let (m, n, k, lda, ldb, ldc) = (int(m), int(n), int(k), int(lda), int(ldb), int(ldc));
        let at =
            |i: usize, p: usize| if *ta as u8 == b'N' { *a.add(i + p * lda) } else { *a.add(p + i * lda) };
        let bt =
            |p: usize, j: usize| if *tb as u8 == b'N' { *b.add(p + j * ldb) } else { *b.add(j + p * ldb) };
        for j in 0..n {
            for i in 0..m {
                let s: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                let cij = c.add(i + j * ldc);
                *cij = if *beta == 0.0 { *alpha * s } else { *alpha * s + *beta * *cij };
            }
        }
    }

    #[test]
    fn blas_path_matches_naive_for_every_layout() {
        let (m, k, n) = (6, 9, 4);
        let a: Vec<f64> = (0..m * k * 2).map(|i| ((i * 31) % 23) as f64 / 7.0 - 1.5).collect();
        let b: Vec<f64> = (0..k * n * 2).map(|i| ((i * 13) % 19) as f64 / 5.0 - 1.8).collect();
        // Plain, transposed, and a leading-columns view with a wider row stride.
        let a_views = [Mat::new(&a, m, k), Mat::new(&a, k, m).t(), Mat::with_ld(&a, m, k, 2 * k)];
        let b_views = [Mat::new(&b, k, n), Mat::new(&b, n, k).t(), Mat::with_ld(&b, k, n, n + 3)];
        for f in [naive_dgemm::<i32> as BlasGemm<f64>, naive_dgemm::<i64>] {
            for av in a_views {
                for bv in b_views {
                    for accumulate in [false, true] {
                        let ld = n + 2; // dst with a row stride wider than n
                        let mut want = vec![0.25; m * ld];
                        builtin(Dst::of(&mut want, ld), av, bv, 0.5, accumulate, true);
                        let mut got = vec![0.25; m * ld];
                        assert!(blas_matmul(f, &Dst::of(&mut got, ld), av, bv, 0.5, accumulate));
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
                        }
                    }
                }
            }
            // Row and column vectors (size-1 dimensions have arbitrary strides).
            let row = Mat { data: &a[..k], rows: 1, cols: k, row_stride: 1000, col_stride: 1 };
            let col = Mat { data: &b[..k], rows: k, cols: 1, row_stride: 1, col_stride: 77 };
            let mut got = [0.0];
            assert!(blas_matmul(f, &Dst::of(&mut got, 1), row, col, 1.0, false));
            let want: f64 = a[..k].iter().zip(&b[..k]).map(|(x, y)| x * y).sum();
            assert!((got[0] - want).abs() < 1e-12);
        }
    }

    #[test]
    fn split_products_equal_one_call_for_every_layout_and_thread_count() {
        // Above SPLIT_MIN multiply-adds; more rows than columns (split by rows), then
        // more columns than rows (split by columns).
        for (m, k, n) in [(150, 100, 140), (140, 100, 150)] {
            assert!(m * n * k >= SPLIT_MIN);
            let a: Vec<f64> = (0..m * k * 2).map(|i| ((i * 31) % 23) as f64 / 7.0 - 1.5).collect();
            let b: Vec<f64> = (0..k * n * 2).map(|i| ((i * 13) % 19) as f64 / 5.0 - 1.8).collect();
            let a_views = [Mat::new(&a, m, k), Mat::new(&a, k, m).t(), Mat::with_ld(&a, m, k, 2 * k)];
            let b_views = [Mat::new(&b, k, n), Mat::new(&b, n, k).t(), Mat::with_ld(&b, k, n, n + 3)];
            for threads in [2, 3, 7] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    for (av, bv) in a_views.iter().flat_map(|&av| b_views.iter().map(move |&bv| (av, bv))) {
                        for accumulate in [false, true] {
                            let ld = n + 2; // dst with a row stride wider than n: the gap stays as it was
                            let f = naive_dgemm::<i32> as BlasGemm<f64>;
                            let mut want = vec![0.25; m * ld];
                            assert!(blas_matmul(f, &Dst::of(&mut want, ld), av, bv, 0.5, accumulate));
                            let mut got = vec![0.25; m * ld];
                            assert!(split_blas_matmul(f, &Dst::of(&mut got, ld), av, bv, 0.5, accumulate));
                            assert_eq!(got, want, "{m}x{k}x{n}, {threads} threads, accumulate {accumulate}");
                        }
                    }
                });
            }
        }
    }

    #[test]
    fn blas_path_declines_views_without_a_unit_stride() {
        let a = vec![1.0f64; 64];
        let strided = Mat { data: &a, rows: 3, cols: 3, row_stride: 6, col_stride: 2 };
        let mut dst = vec![0.0; 9];
        assert!(!blas_matmul(
            naive_dgemm::<i32>,
            &Dst::of(&mut dst, 3),
            strided,
            Mat::new(&a, 3, 3),
            1.0,
            false
        ));
        assert!(dst.iter().all(|&v| v == 0.0), "declining wrote nothing");
    }

    #[test]
    fn self_check_accepts_a_correct_blas() {
        assert!(self_check(naive_dgemm::<i32> as BlasGemm<f64>).is_ok());
        assert!(self_check(naive_dgemm::<i64> as BlasGemm<f64>).is_ok());
    }

    unsafe extern "C" fn wrong_dgemm(
        _: *const c_char,
        _: *const c_char,
        m: *const i64,
        n: *const i64,
        _: *const i64,
        _: *const f64,
        _: *const f64,
        _: *const i64,
        _: *const f64,
        _: *const i64,
        _: *const f64,
        c: *mut f64,
        ldc: *const i64,
        _: usize,
        _: usize,
    ) {
        for j in 0..*n as usize {
            for i in 0..*m as usize {
                *c.add(i + j * *ldc as usize) = 42.0;
            }
        }
    }

    #[test]
    fn self_check_rejects_a_wrong_blas() {
        let err = self_check(wrong_dgemm as BlasGemm<f64>).unwrap_err();
        assert!(err.contains("differs"), "{err}");
    }

    #[test]
    fn empty_inner_dimension_zeroes_output() {
        let mut out = vec![1.0f32; 6];
        matmul(&mut out, 3, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), 1.0, false);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
