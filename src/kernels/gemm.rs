//! Safe matrix products over the `gemm` crate, with operands read in place through
//! strides (a transposed operand is a stride swap, never a copy).

use super::Float;
use gemm::Parallelism;

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
    assert_eq!(a.cols, b.rows, "gemm: inner sizes differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_ld >= n && (m - 1) * dst_ld + n <= dst.len(), "gemm: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_ld).take(m) {
                row[..n].fill(T::zero());
            }
        }
        return;
    }
    a.assert_in_bounds("lhs");
    b.assert_in_bounds("rhs");
    // The gemm crate runs small products on one thread by itself.
    let parallelism = if rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every view was bounds-checked above; dst does not alias the inputs
    // (it is a `&mut` borrow while they are shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_ld as isize,
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

/// `a · b` into a new row-major matrix.
pub fn matmul_new<T: Float>(a: Mat<T>, b: Mat<T>) -> Vec<T> {
    let mut out = vec![T::zero(); a.rows * b.cols];
    matmul(&mut out, b.cols, a, b, T::one(), false);
    out
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
        let got = matmul_new(am, bt);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9);
        }
        let mut acc = got.clone();
        matmul(&mut acc, n, am, Mat::new(&b, k, n), 0.5, true);
        for (g, w) in acc.iter().zip(&want) {
            assert!((g - 1.5 * w).abs() < 1e-9);
        }
    }

    #[test]
    fn empty_inner_dimension_zeroes_output() {
        let mut out = vec![1.0f32; 6];
        matmul(&mut out, 3, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), 1.0, false);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
