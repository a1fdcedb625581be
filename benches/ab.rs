//! AB kernels at the paper's shapes. `cargo bench --bench ab`

use cnnboost::kernels::ab::{self, Config, Params, Running};
use divan::Bencher;

mod common;
use common::data;

fn main() {
    divan::main();
}

/// (N, C, H·W, groups): AB on ResNet stage 1 and 4, AB-Plus on stage 2.
const SHAPES: [(usize, usize, usize, usize); 3] =
    [(32, 256, 56 * 56, 256), (32, 2048, 49, 2048), (32, 512, 28 * 28, 1)];

struct Setup {
    cfg: Config,
    n: usize,
    hw: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    ones: Vec<f32>,
    zeros: Vec<f32>,
}

impl Setup {
    fn new(i: usize, training: bool) -> Self {
        let (n, c, hw, g) = SHAPES[i];
        Setup {
            cfg: Config { channels: c, groups: g, eps: 1e-5, training, channels_last: false },
            n,
            hw,
            x: data(n * c * hw, 1),
            w: data(c * c / g, 2),
            ones: vec![1.0; c],
            zeros: vec![0.0; c],
        }
    }
    fn params(&self) -> Params<'_, f32> {
        Params { conv_weight: &self.w, conv_bias: None, bn_weight: &self.ones, bn_bias: &self.zeros }
    }
    fn running(&self) -> Running<'_, f32> {
        Running { mean: &self.zeros, var: &self.ones }
    }
}

/// The forward in training (batch statistics) and in eval (running statistics: one
/// pass over the map).
#[divan::bench(consts = [true, false], args = [0, 1, 2], sample_count = 20)]
fn forward<const TRAINING: bool>(b: Bencher, i: usize) {
    let s = Setup::new(i, TRAINING);
    b.bench(|| ab::forward(&s.cfg, &s.x, s.n, s.hw, &s.params(), s.running()).unwrap());
}

/// The eval forward with the map coming from memory, as in a network (or in
/// `compare.py`, where other calls run in between): a 64 MB sweep before each call.
#[divan::bench(args = [0, 1, 2], sample_count = 20)]
fn forward_eval_cold(b: Bencher, i: usize) {
    let s = Setup::new(i, false);
    let mut sweep = vec![0u8; 64 << 20];
    b.with_inputs(|| {
        for v in sweep.iter_mut().step_by(64) {
            *v = v.wrapping_add(1);
        }
    })
    .bench_local_values(|()| ab::forward(&s.cfg, &s.x, s.n, s.hw, &s.params(), s.running()).unwrap());
}

/// The forward on a channels-last map (torch's `channels_last`: `[N, H, W, C]` in memory).
#[divan::bench(consts = [true, false], args = [0, 1, 2], sample_count = 20)]
fn forward_channels_last<const TRAINING: bool>(b: Bencher, i: usize) {
    let mut s = Setup::new(i, TRAINING);
    s.cfg.channels_last = true;
    b.bench(|| ab::forward(&s.cfg, &s.x, s.n, s.hw, &s.params(), s.running()).unwrap());
}

#[divan::bench(args = [0, 1, 2], sample_count = 20)]
fn backward_train(b: Bencher, i: usize) {
    let s = Setup::new(i, true);
    let f = ab::forward(&s.cfg, &s.x, s.n, s.hw, &s.params(), s.running()).unwrap();
    let g = data(s.x.len(), 3);
    b.bench(|| {
        ab::backward(&s.cfg, &g, &s.x, s.n, s.hw, &s.params(), &f.pooled, &f.mean, &f.invstd).unwrap()
    });
}

/// A plain copy of the map, the floor of an eval forward (read x, write out once).
#[divan::bench(args = [0, 1, 2], sample_count = 20)]
fn copy(b: Bencher, i: usize) {
    let s = Setup::new(i, false);
    b.bench(|| s.x.clone());
}
