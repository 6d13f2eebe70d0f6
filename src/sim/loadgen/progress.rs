//! The progress line on stderr: a self-updating line on a terminal, one line every few
//! seconds otherwise (CI logs). Counters are atomics the scenario tasks bump.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::report::group;

/// Counters shown on the progress line.
#[derive(Debug)]
pub struct Progress {
    label: &'static str,
    work_unit: &'static str,
    started: Instant,
    planned: Duration,
    /// Latency samples taken.
    pub samples: AtomicU64,
    /// Units of work done (readings, receipts …; shown with a rate).
    pub work: AtomicU64,
    /// Requests that failed (errors, not slow answers).
    pub errors: AtomicU64,
}

impl Progress {
    /// Counters for a measured phase of `planned` length, starting now.
    pub fn new(label: &'static str, work_unit: &'static str, planned: Duration) -> Arc<Self> {
        Arc::new(Self {
            label,
            work_unit,
            started: Instant::now(),
            planned,
            samples: AtomicU64::new(0),
            work: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Adds one sample.
    pub fn sample(&self) {
        self.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` units of work.
    pub fn worked(&self, n: u64) {
        self.work.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let work = self.work.load(Ordering::Relaxed);
        format!(
            "[{}] {:>5.1}/{:.0} s  samples {}  {} {} ({}/s)  errors {}",
            self.label,
            elapsed,
            self.planned.as_secs_f64(),
            self.samples.load(Ordering::Relaxed),
            self.work_unit,
            group(work as f64),
            group(work as f64 / elapsed.max(1e-3)),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// Prints the line until the returned guard is dropped (then ends it with a newline).
    pub fn show(self: &Arc<Self>) -> Ticker {
        let progress = self.clone();
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let line = progress.line();
                let mut err = std::io::stderr().lock();
                let _ = if terminal {
                    write!(err, "\r{line}\x1b[K")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
        });
        Ticker {
            task,
            progress: self.clone(),
            terminal,
        }
    }
}

/// Stops the progress line when dropped.
#[derive(Debug)]
pub struct Ticker {
    task: tokio::task::JoinHandle<()>,
    progress: Arc<Progress>,
    terminal: bool,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
        let line = self.progress.line();
        if self.terminal {
            eprintln!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}
