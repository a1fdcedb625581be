//! cnnboost: forward and backward kernels of four "accuracy booster" modules for
//! convolutional networks — FFC, SSM, AB and AFI — and their Python bindings.
//!
//! * [`kernels`] is pure Rust: one file per module (`kernels/ffc.rs`, …) plus the
//!   pieces they share (GEMM, pooling, batch normalisation). No Python in it; it is
//!   tested with `cargo test`.
//! * `bindings` (feature `python`) is the thin PyO3 layer that becomes
//!   `cnnboost._core`: one file per module, over one NumPy/DLPack conversion and one
//!   error mapping.

pub mod kernels;

#[cfg(feature = "python")]
mod bindings;
