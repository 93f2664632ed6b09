//! Periodic schedules: cron expressions read at compile time, as `queue_core` reads them at
//! run time, and the longest gap between their slots.

use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;

/// Where the gaps of a cron expression are measured from: 2026-01-01T00:00:00Z, a fixed
/// instant so that a build does not depend on the day it runs.
const GAPS_FROM_SECS: i64 = 1_767_225_600;

/// How many slots the gaps are measured over.
const GAP_SLOTS: usize = 1_000;

/// Reads `expr` exactly as `queue_core::periodic::parse_cron` does: five fields (minute to
/// weekday) or six with seconds first, no year. The error is the parser's message.
pub(super) fn parse_cron(expr: &str) -> Result<Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// The longest time between two consecutive slots of `cron` over its next [`GAP_SLOTS`]
/// slots from [`GAPS_FROM_SECS`]; `None` when it has fewer than two slots there.
pub(super) fn longest_gap(cron: &Cron) -> Option<Duration> {
    let from = DateTime::<Utc>::from_timestamp(GAPS_FROM_SECS, 0)?;
    let slots: Vec<DateTime<Utc>> = cron.iter_after(from).take(GAP_SLOTS).collect();
    slots
        .windows(2)
        .filter_map(|pair| (pair[1] - pair[0]).to_std().ok())
        .max()
}

/// The parser's message in rustc's voice: without a final period, and each `: `-separated
/// part starting lowercase when its first word is a plain capitalised word ("Component
/// error: Number out of bounds." reads "component error: number out of bounds"), not a
/// name such as `CronPattern` or `L`.
pub(super) fn quiet(message: &str) -> String {
    message
        .trim()
        .trim_end_matches('.')
        .split(": ")
        .map(|part| {
            let word = part.split(' ').next().unwrap_or_default();
            let mut chars = part.chars();
            match chars.next() {
                Some(first)
                    if word.len() > 1 && word[1..].chars().all(|c| c.is_ascii_lowercase()) =>
                {
                    first.to_lowercase().chain(chars).collect()
                }
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(expr: &str) -> Option<Duration> {
        longest_gap(&parse_cron(expr).expect("the expression parses"))
    }

    #[test]
    fn the_longest_gap_of_a_daily_cron_is_a_day() {
        assert_eq!(gap("0 0 * * *"), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn the_longest_gap_of_a_weekday_cron_spans_the_weekend() {
        assert_eq!(gap("0 9 * * 1-5"), Some(Duration::from_secs(3 * 86_400)));
    }

    #[test]
    fn six_fields_put_seconds_first() {
        assert_eq!(gap("*/10 * * * * *"), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_cron_that_never_fires_has_no_gap() {
        assert_eq!(gap("0 0 30 2 *"), None);
    }

    #[test]
    fn quiet_lowercases_plain_words_and_keeps_names() {
        assert_eq!(
            quiet("Component error: Number out of bounds."),
            "component error: number out of bounds"
        );
        assert_eq!(
            quiet(
                "Pattern contains illegal characters: CronPattern contains illegal character 'x'"
            ),
            "pattern contains illegal characters: CronPattern contains illegal character 'x'"
        );
        assert_eq!(
            quiet("L not allowed in the current field."),
            "L not allowed in the current field"
        );
    }

    #[test]
    fn malformed_expressions_are_refused_with_a_quiet_message() {
        for expr in [
            "61 * * * *",
            "every day",
            "* * * *",
            "0 0 0 0 0 0 0",
            "*/0 * * * *",
        ] {
            let e = parse_cron(expr).expect_err(expr);
            let q = quiet(&e);
            assert!(q.starts_with(|c: char| c.is_lowercase()), "{expr}: {q}");
            assert!(!q.ends_with('.'), "{expr}: {q}");
        }
    }
}
