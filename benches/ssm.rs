//! SSM kernels at the paper's shape (256 × 2048 → 1000 classes, 4 heads).
//! `cargo bench --bench ssm`

use cnnboost::kernels::ssm::{self, BnParams, Config, Head};
use divan::Bencher;

mod common;
use common::data;

fn main() {
    divan::main();
}

const N: usize = 256;
const C: usize = 2048;
const K: usize = 1000;
const G: usize = 4;

struct Setup {
    x: Vec<f32>,
    weights: Vec<Vec<f32>>,
    bias: Vec<f32>,
    ones: Vec<f32>,
    zeros: Vec<f32>,
}

impl Setup {
    fn new() -> Self {
        Setup {
            x: data(N * C, 1),
            weights: (1..=G).map(|h| data(K * h * C / G, h as u64 + 1)).collect(),
            bias: vec![0.0; K],
            ones: vec![1.0; C],
            zeros: vec![0.0; C],
        }
    }
    fn heads(&self, cfg: &Config) -> Vec<Head<'_, f32>> {
        (0..G)
            .map(|h| {
                let w = (h + 1) * C / G;
                Head {
                    fc_weight: &self.weights[h],
                    fc_bias: &self.bias,
                    bn: cfg.is_normalised(h).then(|| BnParams {
                        weight: &self.ones[..w],
                        bias: &self.zeros[..w],
                        running_mean: &self.zeros[..w],
                        running_var: &self.ones[..w],
                    }),
                }
            })
            .collect()
    }
}

fn config(training: bool) -> Config {
    Config { num_heads: G, num_classes: K, training, ..Config::default() }
}

#[divan::bench(args = [true, false], sample_count = 30)]
fn forward(b: Bencher, training: bool) {
    let s = Setup::new();
    let cfg = config(training);
    let heads = s.heads(&cfg);
    b.bench(|| ssm::forward(&cfg, &s.x, N, C, &heads).unwrap());
}

#[divan::bench(sample_count = 30)]
fn backward_train(b: Bencher) {
    let s = Setup::new();
    let cfg = config(true);
    let heads = s.heads(&cfg);
    let f = ssm::forward(&cfg, &s.x, N, C, &heads).unwrap();
    let g = data(N * K, 9);
    b.bench(|| ssm::backward(&cfg, &g, &s.x, N, C, &heads, &f.saved()).unwrap());
}
