//! How the kernels' parallel loops split: every loop is [`SerialAware`] (or passes its
//! least task size through [`min_len`]), so that a call run under [`serially`] runs
//! its loops whole on the calling thread, pushing no task and waking no other thread.
//!
//! The bindings run a small call that way (`src/bindings/mod.rs`, `compute`): the
//! calling thread is itself worker 0 of its pool, so a split loop would wake the other
//! workers, and on a VM a wake-up and the wait for the half another thread took cost
//! more than a small kernel. The values are the same either way: a loop's tasks are
//! its chunks, however many threads run them.

use rayon::iter::{IndexedParallelIterator, MinLen};
use std::cell::Cell;

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the parallel loops it starts on this thread unsplit.
pub fn serially<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

/// The least number of items a task of a parallel loop takes (rayon's
/// `with_min_len`): `min`, or all of them inside [`serially`].
pub fn min_len(min: usize) -> usize {
    if SERIAL.get() {
        usize::MAX
    } else {
        min
    }
}

/// A parallel loop split into tasks as rayon chooses, or not at all inside
/// [`serially`]: `.serial_aware()` before the loop's `for_each` or `map`.
pub trait SerialAware: IndexedParallelIterator {
    fn serial_aware(self) -> MinLen<Self> {
        self.with_min_len(min_len(1))
    }
}

impl<I: IndexedParallelIterator> SerialAware for I {}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Every parallel loop of the kernels, read from their source: from its parallel
    /// iterator (`par_…`, `into_par_iter()`) to the call that runs it (`for_each`,
    /// `map`, `collect`, ...), the chain must pass through `.serial_aware()` (or take
    /// its task size from `par::min_len`), or a small call would split it and wake
    /// the other workers (the channels-last scaling loop once did).
    #[test]
    fn every_parallel_loop_of_the_kernels_is_serial_aware() {
        // Every file of the kernels, read where they lie, so that a new one is checked too.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernels");
        let mut sources: Vec<(String, String)> = std::fs::read_dir(dir)
            .expect("the kernels' source folder")
            .map(|e| e.expect("a kernel source file").path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .map(|p| {
                (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        sources.sort();
        let starts = [".par_", "into_par_iter()", "par_bridge()"];
        let runs =
            [".for_each", ".map(", ".collect", ".sum", ".reduce", ".fold(", ".count()", ".min", ".max"];
        let mut loops = 0;
        for (file, source) in &sources {
            let code: Vec<&str> = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect();
            let code = code.join("\n");
            let code = code.split("mod tests {").next().unwrap_or("");
            let mut at = 0;
            while let Some(i) = starts.iter().filter_map(|s| code[at..].find(s)).min() {
                let start = at + i;
                let chain = &code[start..];
                let line = code[..start].lines().count();
                let end = runs.iter().filter_map(|r| chain.find(r)).min();
                let end =
                    end.unwrap_or_else(|| panic!("{file}:{line}: a parallel iterator that is never run"));
                assert!(
                    chain[..end].contains(".serial_aware()") || chain[..end].contains("min_len("),
                    "{file}:{line}: a parallel loop without .serial_aware(): {}",
                    &chain[..end]
                );
                loops += 1;
                at = start + end;
            }
        }
        assert!(loops >= 10, "found only {loops} parallel loops: is the search still right?");
    }

    #[test]
    fn serial_loops_stay_on_the_calling_thread() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let threads = |serial: bool| {
            let run = || {
                (0..64usize)
                    .into_par_iter()
                    .serial_aware()
                    .map(|_| {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        rayon::current_thread_index()
                    })
                    .collect::<std::collections::HashSet<_>>()
            };
            pool.install(|| if serial { serially(run) } else { run() })
        };
        assert_eq!(threads(true).len(), 1);
        assert!(threads(false).len() > 1);
        assert!(!SERIAL.get(), "serially restores the flag");
    }
}
