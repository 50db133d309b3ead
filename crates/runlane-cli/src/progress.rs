//! A minimal progress bar on stderr for long steps (`runlane bench`).
//!
//! The step counts into an atomic; a background task draws the bar five times a second, and only
//! once the step has taken longer than a second and only when stderr is a terminal, so short
//! steps and redirected output stay clean. Counting is one relaxed atomic add: cheap enough for
//! a measured loop.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Nothing is drawn before a step has run this long.
const QUIET_FOR: Duration = Duration::from_secs(1);
/// Time between two draws.
const REDRAW_EVERY: Duration = Duration::from_millis(200);
/// Width of the bar in characters.
const WIDTH: u64 = 30;

/// A step with a known total.
pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// A bar counting into its own counter.
    pub fn start(label: &str, total: u64) -> Progress {
        Progress::with_counter(label, total, Arc::new(AtomicU64::new(0)))
    }

    /// A bar following a counter the step already keeps (e.g. runs handled).
    pub fn with_counter(label: &str, total: u64, done: Arc<AtomicU64>) -> Progress {
        let stop = Arc::new(Notify::new());
        let task = std::io::stderr().is_terminal().then(|| {
            tokio::spawn(draw(
                label.to_owned(),
                total.max(1),
                done.clone(),
                stop.clone(),
            ))
        });
        Progress { done, stop, task }
    }

    /// Counts `n` more.
    pub fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Ends the step and clears its bar.
    pub async fn finish(mut self) {
        if let Some(task) = self.task.take() {
            self.stop.notify_one();
            let _ = task.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A step that failed half-way: stop drawing (the line is left as it was).
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn draw(label: String, total: u64, done: Arc<AtomicU64>, stop: Arc<Notify>) {
    let t0 = Instant::now();
    let mut drawn = false;
    loop {
        tokio::select! {
            () = stop.notified() => break,
            () = tokio::time::sleep(REDRAW_EVERY) => {}
        }
        if t0.elapsed() < QUIET_FOR {
            continue;
        }
        let n = done.load(Ordering::Relaxed).min(total);
        let filled = (n * WIDTH / total) as usize;
        let bar = format!(
            "\r{label} [{}{}] {n}/{total} {:.0}s ",
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled),
            t0.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bar.as_bytes());
        let _ = err.flush();
        drawn = true;
    }
    if drawn {
        // Clear the line: the result goes to stdout, the bar leaves no trace.
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}\r", " ".repeat(label.len() + WIDTH as usize + 40));
        let _ = err.flush();
    }
}
