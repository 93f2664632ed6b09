//! The texts the queue writes into dead letters, in one place for every adapter: the engine
//! formats them in Rust and the PostgreSQL adapter builds the same text in SQL from the same
//! pieces, so the two cannot drift.

/// A text around an attempt count: `{before}{attempts}{between}{max_attempts}{after}`,
/// after the handler's own error when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptText {
    before: &'static str,
    between: &'static str,
    after: &'static str,
}

/// A lease lapsed on the last attempt: "lease expired on attempt 3 of 3".
pub const LEASE_EXPIRED: AttemptText = AttemptText {
    before: "lease expired on attempt ",
    between: " of ",
    after: "",
};

/// The worker holding the last attempt went away: "worker lost on attempt 3 of 3".
pub const WORKER_LOST: AttemptText = AttemptText {
    before: "worker lost on attempt ",
    between: " of ",
    after: "",
};

/// The handler failed its last attempt, after its error: "smtp down (attempt 3 of 3)".
pub const ATTEMPTS_USED: AttemptText = AttemptText {
    before: " (attempt ",
    between: " of ",
    after: ")",
};

impl AttemptText {
    /// The text for `attempts` of `max_attempts`.
    pub fn format(&self, attempts: u32, max_attempts: u32) -> String {
        format!(
            "{}{attempts}{}{max_attempts}{}",
            self.before, self.between, self.after
        )
    }

    /// The same text as a SQL expression over two integer expressions.
    pub fn sql(&self, attempts: &str, max_attempts: &str) -> String {
        format!(
            "{} || {attempts} || {} || {max_attempts} || {}",
            quote(self.before),
            quote(self.between),
            quote(self.after)
        )
    }
}

/// A SQL string literal.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_text_reads_as_its_example() {
        assert_eq!(
            LEASE_EXPIRED.format(3, 3),
            "lease expired on attempt 3 of 3"
        );
        assert_eq!(WORKER_LOST.format(2, 5), "worker lost on attempt 2 of 5");
        assert_eq!(ATTEMPTS_USED.format(3, 3), " (attempt 3 of 3)");
        assert_eq!(
            LEASE_EXPIRED.sql("attempts", "max_attempts"),
            "'lease expired on attempt ' || attempts || ' of ' || max_attempts || ''"
        );
        assert_eq!(quote("it's"), "'it''s'");
    }
}
