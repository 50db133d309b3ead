//! Durations on the command line: `500ms`, `5s`, `2m`, `1h30m` (humantime's grammar).

use std::time::Duration;

/// Parses a duration such as `500ms`, `5s` or `2m`. A bare number is refused: its unit would
/// be a guess.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration (try 500ms, 5s or 2m)".to_string());
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{s:?} has no unit (try {s}ms or {s}s)"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}; try 500ms, 5s or 2m)"))
}

/// Formats a duration shortly (`1.5s`, `250ms`, `2m`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            (" 0s ", Duration::ZERO),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refusals_say_why() {
        assert!(parse("").expect_err("refused").contains("empty"));
        assert!(parse("5").expect_err("refused").contains("no unit"));
        assert!(parse("5 parsecs")
            .expect_err("refused")
            .contains("not a duration"));
        assert!(parse("-5s").is_err());
    }

    #[test]
    fn formats_back() {
        assert_eq!(format(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(format(Duration::from_secs(120)), "2m");
    }
}
