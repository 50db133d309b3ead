//! `runlane bench fsync`: what one durable commit costs the disk under a directory, written the
//! way a write-ahead log is (8 KiB rewritten in place in a preallocated file, then
//! `fdatasync`), back to back and after each pause of `--gaps-us`.
//!
//! A strict-durability trigger waits for one such flush. On some machines (virtual disks whose
//! host side sleeps when idle) a flush after even a fraction of a millisecond of idleness costs
//! ten or twenty times a flush right after another: this probe measures that beside the engine's
//! latency lines, so a strict figure can be read against what the disk allows.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::bench::{git_revision, percentile};
use crate::progress::Progress;

/// One write: a WAL page.
const WRITE_BYTES: usize = 8192;
/// Pages the writes cycle through (preallocated and flushed before measuring, so a flush
/// carries data only, as a recycled WAL segment's does).
const PAGES: u64 = 64;

/// The probe file, removed however the probe ends.
struct ProbeFile {
    path: PathBuf,
    file: File,
}

impl ProbeFile {
    fn create(dir: &Path) -> anyhow::Result<ProbeFile> {
        let path = dir.join(format!("runlane-fsync-probe-{}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("--dir {}: cannot create a probe file", dir.display()))?;
        let probe = ProbeFile { path, file };
        let page = [0u8; WRITE_BYTES];
        let prepared = (0..PAGES)
            .try_for_each(|i| probe.file.write_all_at(&page, i * WRITE_BYTES as u64))
            .and_then(|()| probe.file.sync_all());
        prepared.with_context(|| format!("--dir {}: preparing the probe file", dir.display()))?;
        Ok(probe)
    }

    /// Rewrites page `i` and waits until it is on the disk: the time that took.
    fn flush(&self, i: u64, page: &[u8]) -> std::io::Result<Duration> {
        let started = Instant::now();
        self.file
            .write_all_at(page, (i % PAGES) * WRITE_BYTES as u64)?;
        self.file.sync_data()?;
        Ok(started.elapsed())
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `writes` measured flushes (after a tenth as many unmeasured ones) for each gap, on a
/// blocking thread: one JSON line per gap.
pub async fn fsync(dir: PathBuf, writes: u32, gaps_us: Vec<u64>) -> anyhow::Result<Vec<Value>> {
    idle_probe(
        "fsync",
        "--writes",
        writes,
        gaps_us,
        move |gaps, warmup, progress| probe(&dir, writes, warmup, gaps, progress),
    )
    .await
}

/// The most measured calls per gap an idle probe takes (its count plus a tenth stays in a
/// `u32`).
const MAX_MEASURED: u32 = 10_000_000;

/// The frame of the idle probes (`bench fsync`, `bench cache`): refuses no measured call
/// (naming `flag`) or no gap, then runs `probe` on a blocking thread with the gaps, the
/// warm-up count (a tenth of `measured`, at least 1) and a progress bar over every call.
pub(crate) async fn idle_probe<T: Send + 'static>(
    label: &'static str,
    flag: &str,
    measured: u32,
    gaps_us: Vec<u64>,
    probe: impl FnOnce(&[u64], u32, &Progress) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    if !(1..=MAX_MEASURED).contains(&measured) {
        anyhow::bail!("{flag} must be from 1 to {MAX_MEASURED}");
    }
    if gaps_us.is_empty() {
        anyhow::bail!("--gaps-us needs at least one gap");
    }
    let warmup = (measured / 10).max(1);
    let calls = u64::from(measured) + u64::from(warmup);
    let progress = Progress::start(label, calls * gaps_us.len() as u64);
    let (out, progress) = tokio::task::spawn_blocking(move || {
        let out = probe(&gaps_us, warmup, &progress);
        (out, progress)
    })
    .await
    .with_context(|| format!("the {label} probe thread"))?;
    progress.finish().await;
    out
}

fn probe(
    dir: &Path,
    writes: u32,
    warmup: u32,
    gaps_us: &[u64],
    progress: &Progress,
) -> anyhow::Result<Vec<Value>> {
    let file = ProbeFile::create(dir)?;
    let mut page = [0u8; WRITE_BYTES];
    let mut n = 0u64;
    let per_gap = gap_samples(writes, warmup, gaps_us, progress, || {
        n += 1;
        page[..8].copy_from_slice(&n.to_le_bytes());
        file.flush(n, &page)
            .with_context(|| format!("--dir {}: write and fdatasync", dir.display()))
    })?;
    Ok(per_gap
        .into_iter()
        .map(|(gap, samples)| {
            let micros: Vec<u64> = samples
                .iter()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                .collect();
            json!({
                "scenario": "fsync",
                "gap_us": gap,
                "write_bytes": WRITE_BYTES,
                "writes": writes,
                "p50_us": percentile(&micros, 0.50),
                "p95_us": percentile(&micros, 0.95),
                "p99_us": percentile(&micros, 0.99),
                "git_revision": git_revision(),
            })
        })
        .collect())
}

/// The loop of the idle probes (`bench fsync`, `bench cache`): for each gap, `warmup`
/// unmeasured then `measured` measured calls of `measure`, each after a sleep of the gap (none
/// for 0) on this thread; returns each gap with its samples, sorted.
pub(crate) fn gap_samples<E>(
    measured: u32,
    warmup: u32,
    gaps_us: &[u64],
    progress: &Progress,
    mut measure: impl FnMut() -> Result<Duration, E>,
) -> Result<Vec<(u64, Vec<Duration>)>, E> {
    let mut per_gap = Vec::with_capacity(gaps_us.len());
    for &gap in gaps_us {
        let mut samples = Vec::with_capacity(measured as usize);
        for i in 0..(measured + warmup) {
            if gap > 0 {
                std::thread::sleep(Duration::from_micros(gap));
            }
            let took = measure()?;
            progress.inc(1);
            if i >= warmup {
                samples.push(took);
            }
        }
        samples.sort_unstable();
        per_gap.push((gap, samples));
    }
    Ok(per_gap)
}
