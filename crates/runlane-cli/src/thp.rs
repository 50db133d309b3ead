//! Transparent huge pages of the `runlane` process.
//!
//! The allocator asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`), and the first
//! touch of a fresh one zeroes 2 MiB, after compacting memory to find it, inside whatever call
//! touched it: a trigger whose insert reached fresh memory stalled 0.1–9 ms there (`bench
//! scale`), and a fill of 1,000,000 runs took up to 1.9 times as long (by median of one sitting;
//! 1.4 times in another). Without them a fresh page is 4 KiB; a drain over a large heap pays
//! more TLB misses instead (BENCHMARKS.md, 2026-12-07). So the binary turns them off at start,
//! unless `RUNLANE_THP=1`.

/// Turns transparent huge pages off for this process (Linux), unless `keep`. Best effort:
/// where the call is refused, nothing changes.
pub(crate) fn off_unless_kept(keep: bool) {
    #[cfg(target_os = "linux")]
    if !keep {
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = keep;
}

/// Whether this process may get transparent huge pages (`THP_enabled` of `/proc/self/status`);
/// `None` where the kernel does not say.
pub(crate) fn enabled() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    match line.split_whitespace().nth(1)? {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn huge_pages_are_off_unless_kept() {
        super::off_unless_kept(true);
        assert_eq!(super::enabled(), Some(true), "keeping them changes nothing");
        super::off_unless_kept(false);
        assert_eq!(super::enabled(), Some(false));
    }
}
