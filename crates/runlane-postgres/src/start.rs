//! Attempt starts kept in memory (`RunStore::note_start`).
//!
//! A start is advisory (recovery counts a `crashed` attempt for a run that has one), so it is
//! not worth a row write for a run that finishes quickly: it is kept here and written only if
//! the run is still unfinished `start_flush_after` later. A terminal write carries the start
//! along (same row write), a retry drops it. Reads overlay the kept starts, so this process
//! answers as if they were written.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use runlane_core::backend::RunRecord;
use runlane_core::{RunId, Timestamp};

#[derive(Default)]
struct Inner {
    /// run → (attempt, started at).
    starts: HashMap<RunId, (u32, Timestamp)>,
    /// Notes in the order they were taken, with the instant they were taken.
    order: VecDeque<(Instant, RunId)>,
}

/// The starts not yet written.
#[derive(Default)]
pub(crate) struct StartNotes {
    inner: Mutex<Inner>,
}

impl StartNotes {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a start; returns true when it is the only one kept (the flusher must re-arm).
    pub(crate) fn note(&self, run: RunId, attempt: u32, at: Timestamp, taken: Instant) -> bool {
        let mut inner = self.lock();
        inner.starts.insert(run, (attempt, at));
        inner.order.push_back((taken, run));
        inner.order.len() == 1
    }

    /// Drops the start of `run` and returns it (a terminal write or a retry took it).
    pub(crate) fn take(&self, run: RunId) -> Option<(u32, Timestamp)> {
        self.lock().starts.remove(&run)
    }

    /// Drops the starts of `runs` (runs stored anew under their ids: the replaced runs'
    /// attempts went with them), under one lock.
    pub(crate) fn forget(&self, runs: impl IntoIterator<Item = RunId>) {
        let mut inner = self.lock();
        for run in runs {
            inner.starts.remove(&run);
        }
    }

    /// The instant the oldest kept note was taken.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.lock().order.front().map(|(t, _)| *t)
    }

    /// Takes every start noted at or before `cutoff` that is still kept.
    pub(crate) fn take_due(&self, cutoff: Instant) -> Vec<(RunId, u32, Timestamp)> {
        let mut inner = self.lock();
        let mut due = Vec::new();
        while inner.order.front().is_some_and(|(t, _)| *t <= cutoff) {
            let Some((_, run)) = inner.order.pop_front() else {
                break;
            };
            if let Some((attempt, at)) = inner.starts.remove(&run) {
                due.push((run, attempt, at));
            }
        }
        due
    }

    /// Takes every kept start.
    pub(crate) fn take_all(&self) -> Vec<(RunId, u32, Timestamp)> {
        let mut inner = self.lock();
        inner.order.clear();
        inner
            .starts
            .drain()
            .map(|(run, (attempt, at))| (run, attempt, at))
            .collect()
    }

    /// Sets `started_at` of records whose current attempt has a kept start.
    pub(crate) fn overlay(&self, records: &mut [RunRecord]) {
        let inner = self.lock();
        if inner.starts.is_empty() {
            return;
        }
        for r in records {
            if let Some(&(attempt, at)) = inner.starts.get(&r.id) {
                if r.attempt == attempt && !r.status.is_terminal() {
                    r.started_at = Some(at);
                }
            }
        }
    }

    /// How many starts are kept.
    pub(crate) fn len(&self) -> usize {
        self.lock().starts.len()
    }
}
