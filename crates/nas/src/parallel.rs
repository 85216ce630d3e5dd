//! Evaluating independent jobs on `workers` threads with a deterministic result.
//!
//! Each worker runs its jobs inside its own one-thread rayon pool, so nn-core's kernels
//! never split a job's reductions over threads: a job's result is the same bits whatever the
//! number of workers. Results come back to the calling thread as they finish, where
//! `on_result` records them (and saves the search state) one at a time.

use anyhow::{anyhow, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Runs `job(i)` for every `i` in `items` on `workers` threads; `on_result(i, value)` is called
/// on this thread for each finished job. With `stop_after = Some(n)`, stops handing out jobs
/// once `n` results were recorded, and drops results that arrive later (they will be computed
/// again by a resumed run). Returns the number of results recorded.
pub fn run_jobs<T: Send>(
    items: &[usize],
    workers: usize,
    stop_after: Option<usize>,
    job: impl Fn(usize) -> Result<T> + Sync,
    mut on_result: impl FnMut(usize, T) -> Result<()>,
) -> Result<usize> {
    if stop_after == Some(0) || items.is_empty() {
        return Ok(0);
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = workers.max(1).min(items.len().max(1));
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    let mut recorded = 0usize;
    let mut first_err: Option<anyhow::Error> = None;
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, job) = (&next, &stop, &job);
            s.spawn(move || {
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send((usize::MAX, Err(anyhow!("building a worker pool: {e}"))));
                        return;
                    }
                };
                loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = items.get(k) else { break };
                    let r = pool.install(|| job(i));
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (i, r) in rx {
            if stop.load(Ordering::SeqCst) {
                continue;
            }
            match r.and_then(|v| on_result(i, v)) {
                Ok(()) => {
                    recorded += 1;
                    if stop_after.is_some_and(|n| recorded >= n) {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    first_err.get_or_insert(e);
                }
            }
        }
        Ok(())
    })?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(recorded),
    }
}
