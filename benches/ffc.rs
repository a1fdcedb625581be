//! FFC kernels at the paper's shape (ResNet-50 head: 256 × 2048 → 1000 classes).
//! `cargo bench --bench ffc`

use cnnboost::kernels::ffc::{self, Combine, Config, Dims, Outputs, Params};
use cnnboost::kernels::gemm::{matmul_new, Mat};
use divan::Bencher;

mod common;
use common::data;

fn main() {
    divan::main();
}

const N: usize = 256;
const C: usize = 2048;
const K: usize = 1000;

struct Setup {
    cfg: Config,
    x: Vec<f32>,
    lw: Vec<f32>,
    lb: Vec<f32>,
    fw: Vec<f32>,
    fb: Vec<f32>,
}

impl Setup {
    fn new(hw: usize) -> Self {
        Setup {
            cfg: Config::new(3, Combine::Paper, 1e-5).unwrap(),
            x: data(N * C * hw, 1),
            lw: vec![1.0; 3 * C],
            lb: vec![0.0; 3 * C],
            fw: data(K * C, 2),
            fb: vec![0.0; K],
        }
    }
    fn params(&self) -> Params<'_, f32> {
        Params { ln_weight: &self.lw, ln_bias: &self.lb, fc_weight: &self.fw, fc_bias: &self.fb }
    }
}

/// The roofline: one `N×C×K` product, as the forward does it (weights transposed in place).
#[divan::bench]
fn gemm_alone(b: Bencher) {
    let s = Setup::new(1);
    b.bench(|| matmul_new(Mat::new(&s.x, N, C), Mat::new(&s.fw, K, C).t(), 1.0));
}

#[divan::bench(args = [1, 49])]
fn forward_ensemble(b: Bencher, hw: usize) {
    let s = Setup::new(hw);
    let d = Dims { n: N, c: C, hw, k: K };
    b.bench(|| ffc::forward(&s.cfg, d, &s.x, &s.params(), Outputs::Ensemble).unwrap());
}

#[divan::bench]
fn backward_ensemble(b: Bencher) {
    let s = Setup::new(1);
    let d = Dims { n: N, c: C, hw: 1, k: K };
    let pooled = s.x.clone();
    let g = data(N * K, 3);
    b.bench(|| ffc::backward(&s.cfg, d, &g, &s.params(), &pooled, Outputs::Ensemble).unwrap());
}

#[divan::bench]
fn vote(b: Bencher) {
    let s = Setup::new(1);
    let d = Dims { n: N, c: C, hw: 1, k: K };
    b.bench(|| ffc::vote(&s.cfg, d, &s.x, &s.params()).unwrap());
}
