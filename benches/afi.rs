//! AFI kernels at the paper's shapes (3 maps of 32×64×56×56 and of 32×256×28×28).
//! `cargo bench --bench afi`

use cnnboost::kernels::afi::{self, Params};
use divan::Bencher;

mod common;
use common::data;

fn main() {
    divan::main();
}

/// (M, N, C, H·W)
const SHAPES: [(usize, usize, usize, usize); 2] = [(3, 32, 64, 56 * 56), (3, 32, 256, 28 * 28)];

struct Setup {
    n: usize,
    c: usize,
    hw: usize,
    xs: Vec<Vec<f32>>,
    w1: Vec<f32>,
    w2: Vec<f32>,
}

impl Setup {
    fn new(i: usize) -> Self {
        let (m, n, c, hw) = SHAPES[i];
        Setup {
            n,
            c,
            hw,
            xs: (0..m).map(|j| data(n * c * hw, j as u64)).collect(),
            w1: data(c / 4 * c, 10),
            w2: data(c * c / 4, 11),
        }
    }
    fn params(&self) -> Params<'_, f32> {
        Params { fc1_weight: &self.w1, fc1_bias: None, fc2_weight: &self.w2, fc2_bias: None }
    }
    fn maps(&self) -> Vec<&[f32]> {
        self.xs.iter().map(|x| x.as_slice()).collect()
    }
}

#[divan::bench(args = [0, 1], sample_count = 20)]
fn forward(b: Bencher, i: usize) {
    let s = Setup::new(i);
    b.bench(|| afi::forward(&s.maps(), s.n, s.c, s.hw, &s.params()).unwrap());
}

#[divan::bench(args = [0, 1], sample_count = 20)]
fn backward(b: Bencher, i: usize) {
    let s = Setup::new(i);
    let f = afi::forward(&s.maps(), s.n, s.c, s.hw, &s.params()).unwrap();
    let g = data(s.n * s.c * s.hw, 7);
    b.bench(|| afi::backward(&g, &s.maps(), s.n, s.c, s.hw, &s.params(), &f.saved()).unwrap());
}

/// The forward on channels-last maps (torch's `channels_last`: `[N, H, W, C]` in memory).
#[divan::bench(args = [0, 1], sample_count = 20)]
fn forward_channels_last(b: Bencher, i: usize) {
    let s = Setup::new(i);
    b.bench(|| afi::forward_channels_last(&s.maps(), s.n, s.c, s.hw, &s.params()).unwrap());
}

#[divan::bench(args = [0, 1], sample_count = 20)]
fn backward_channels_last(b: Bencher, i: usize) {
    let s = Setup::new(i);
    let f = afi::forward_channels_last(&s.maps(), s.n, s.c, s.hw, &s.params()).unwrap();
    let g = data(s.n * s.c * s.hw, 7);
    b.bench(|| afi::backward_channels_last(&g, &s.maps(), s.n, s.c, s.hw, &s.params(), &f.saved()).unwrap());
}
