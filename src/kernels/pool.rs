//! Global average pooling over the spatial plane of a contiguous `[N, C, H, W]` map.

use super::Float;
use rayon::prelude::*;

/// Planes per rayon task: enough work per task to amortise scheduling.
fn planes_per_task(hw: usize) -> usize {
    (16 * 1024 / hw.max(1)).max(1)
}

/// Mean of one contiguous plane, accumulated in f64.
#[inline]
pub fn plane_mean<T: Float>(plane: &[T]) -> T {
    if plane.is_empty() {
        return T::zero();
    }
    // Four independent accumulators let the compiler keep several adds in flight.
    let mut acc = [0.0f64; 4];
    let mut chunks = plane.chunks_exact(4);
    for c in &mut chunks {
        acc[0] += c[0].as_f64();
        acc[1] += c[1].as_f64();
        acc[2] += c[2].as_f64();
        acc[3] += c[3].as_f64();
    }
    let tail: f64 = chunks.remainder().iter().map(|v| v.as_f64()).sum();
    T::of((acc[0] + acc[1] + acc[2] + acc[3] + tail) / plane.len() as f64)
}

/// `out[p] = mean(x[p*hw .. (p+1)*hw])` for every plane `p` (`x.len() == planes*hw`).
pub fn global_avg_pool<T: Float>(x: &[T], hw: usize) -> Vec<T> {
    if hw == 0 {
        return Vec::new();
    }
    let planes = x.len() / hw;
    let mut out = vec![T::zero(); planes];
    let per = planes_per_task(hw);
    out.par_chunks_mut(per).zip(x.par_chunks(per * hw)).for_each(|(o, xs)| {
        for (dst, plane) in o.iter_mut().zip(xs.chunks_exact(hw)) {
            *dst = plane_mean(plane);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_each_plane() {
        let x: Vec<f32> = (0..2 * 3 * 5).map(|v| v as f32).collect();
        let y = global_avg_pool(&x, 5);
        assert_eq!(y, vec![2.0, 7.0, 12.0, 17.0, 22.0, 27.0]);
    }

    #[test]
    fn f32_mean_is_accurate_over_large_planes() {
        let x = vec![0.1f32; 1 << 20];
        let y = global_avg_pool(&x, 1 << 20);
        assert!((y[0] - 0.1).abs() < 1e-7);
    }
}
