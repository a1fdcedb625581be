//! The memory-bound per-plane passes that AB and AFI are built from, on one float32
//! map of 32×64×56×56 (25.7 MB: large planes, more than half of L3) and one of
//! 32×2048×7×7 (12.8 MB: small planes), next to a plain copy and a plain sum of the
//! same map: the roofline those passes are held to.
//! `cargo bench --bench pool`

use cnnboost::kernels::{channels_last, pool};
use divan::{black_box, Bencher};
use rayon::prelude::*;

mod common;
use common::data;

fn main() {
    divan::main();
}

/// (planes, H·W)
const SHAPES: [(usize, usize); 2] = [(32 * 64, 56 * 56), (32 * 2048, 7 * 7)];

#[divan::bench(args = [0, 1], sample_count = 30)]
fn copy(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    let mut y = vec![0.0f32; x.len()];
    b.bench_local(|| {
        y.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s))
    });
}

/// Reads the map once, as fast as the loop allows: a wrapping sum of the values' bits
/// (integer addition is associative, so it vectorises; a float sum in order would be
/// bound by the latency of its additions, not by memory).
#[divan::bench(args = [0, 1], sample_count = 30)]
fn read_only_sum(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    b.bench(|| {
        x.par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u32, |s, v| s.wrapping_add(v.to_bits())))
            .reduce(|| 0, u32::wrapping_add)
    });
}

#[divan::bench(args = [0, 1], sample_count = 30)]
fn global_avg_pool(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    b.bench(|| pool::global_avg_pool(black_box(&x), hw));
}

/// The same pooling of the map read as channels-last (`[N, H, W, C]` in memory, N = 32).
#[divan::bench(args = [0, 1], sample_count = 30)]
fn global_avg_pool_channels_last(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    b.bench(|| channels_last::pool(black_box(&x), 32, hw, planes / 32));
}

#[divan::bench(args = [0, 1], sample_count = 30)]
fn plane_dots(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    let y = data(planes * hw, 2);
    b.bench(|| pool::plane_dots(black_box(&x), &y, hw));
}

#[divan::bench(args = [0, 1], sample_count = 30)]
fn scale_planes(b: Bencher, shape: usize) {
    let (planes, hw) = SHAPES[shape];
    let x = data(planes * hw, 1);
    let s = data(planes, 3);
    b.bench(|| pool::scale_planes(black_box(&x), &s, Some(&s), hw));
}
