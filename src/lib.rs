//! cnnboost: forward and backward kernels of four "accuracy booster" modules for
//! convolutional networks — FFC, SSM, AB and AFI — and their Python bindings.
//!
//! * [`kernels`] is pure Rust: one file per module (`kernels/ffc.rs`, …) plus the
//!   pieces they share (GEMM, pooling, batch normalisation). No Python in it; it is
//!   tested with `cargo test`.
//! * `bindings` (feature `python`) is the thin PyO3 layer that becomes
//!   `cnnboost._core`: one file per module, over one NumPy/DLPack conversion and one
//!   error mapping.

pub mod candle;
pub mod kernels;

/// mimalloc keeps freed memory for reuse instead of returning it to the OS at once:
/// the kernels' large outputs (AB/AFI maps of ~100 MB, FFC/SSM weight gradients)
/// are allocated every step, and on a fresh mapping every page is a first-touch
/// fault, which on a VM costs more than the arithmetic.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "python")]
mod bindings;
