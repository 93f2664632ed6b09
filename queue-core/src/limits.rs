//! The limits every adapter enforces, so that whatever one stores, every one can read back.
//!
//! | what | limit |
//! |---|---|
//! | channel name | 1 to [`MAX_CHANNEL_NAME`] bytes of `[A-Za-z0-9_./:-]`, no `/` at either end |
//! | error text kept with a message | [`MAX_ERROR_TEXT`] bytes: an outcome's text is cut to [`MAX_HANDLER_ERROR`] by [`limit_outcome`] |
//! | produce key | 1 to [`MAX_PRODUCE_KEY`] bytes |
//! | payload | [`crate::codec::MAX_PAYLOAD`] bytes |
//! | one produce call | [`MAX_BATCH`] messages, [`MAX_BATCH_BYTES`] bytes |

use crate::adapter::{Outcome, Outgoing};
use crate::codec::MAX_PAYLOAD;
use crate::error::QueueError;

/// The longest channel name, in bytes.
pub const MAX_CHANNEL_NAME: usize = 255;
/// The longest error text kept with a message, in bytes: a handler's error cut to
/// [`MAX_HANDLER_ERROR`], plus the note an adapter adds (` (attempt 3 of 3)`).
pub const MAX_ERROR_TEXT: usize = 4096;
/// The longest error text of an [`Outcome`], in bytes, marker included.
pub const MAX_HANDLER_ERROR: usize = MAX_ERROR_TEXT - 64;
/// The longest produce key, in bytes.
pub const MAX_PRODUCE_KEY: usize = 128;

/// The most messages one produce call stores.
pub const MAX_BATCH: usize = 65_536;

/// The most payload bytes one produce call stores.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

/// Whether `c` may appear in a channel name.
pub const fn is_channel_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b':' | b'-')
}

/// What is wrong with a channel name, or `None` when it is valid.
pub fn channel_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a channel name cannot be empty".into());
    }
    if name.len() > MAX_CHANNEL_NAME {
        return Some(format!(
            "a channel name has at most {MAX_CHANNEL_NAME} bytes, this one has {}",
            name.len()
        ));
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Some(format!(
            "a channel name cannot start or end with `/`: `{name}`"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii() || !is_channel_char(*c as u8))
    {
        return Some(format!(
            "a channel name has only `A-Z a-z 0-9 _ . / : -`, not {c:?}"
        ));
    }
    None
}

/// Checks a channel name.
///
/// # Errors
/// [`QueueError::InvalidRequest`] saying what is wrong.
pub fn check_channel_name(name: &str) -> Result<(), QueueError> {
    match channel_name_problem(name) {
        None => Ok(()),
        Some(p) => Err(QueueError::InvalidRequest(p)),
    }
}

/// Checks a produce key.
///
/// # Errors
/// [`QueueError::InvalidRequest`] for an empty key or one over [`MAX_PRODUCE_KEY`] bytes.
pub fn check_produce_key(key: &str) -> Result<(), QueueError> {
    if key.is_empty() || key.len() > MAX_PRODUCE_KEY {
        return Err(QueueError::InvalidRequest(format!(
            "a produce key has 1 to {MAX_PRODUCE_KEY} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a produce batch: at most [`MAX_BATCH`] messages of at most
/// [`MAX_PAYLOAD`](crate::codec::MAX_PAYLOAD) bytes each, [`MAX_BATCH_BYTES`] in all.
///
/// # Errors
/// [`QueueError::PayloadTooLarge`] for an oversized payload or batch;
/// [`QueueError::InvalidRequest`] for too many messages.
pub fn check_batch(batch: &[Outgoing]) -> Result<(), QueueError> {
    if batch.len() > MAX_BATCH {
        return Err(QueueError::InvalidRequest(format!(
            "a produce stores at most {MAX_BATCH} messages, not {}",
            batch.len()
        )));
    }
    let mut total = 0;
    for m in batch {
        if m.payload.len() > MAX_PAYLOAD {
            return Err(QueueError::PayloadTooLarge {
                size: m.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        total += m.payload.len();
    }
    if total > MAX_BATCH_BYTES {
        return Err(QueueError::PayloadTooLarge {
            size: total,
            max: MAX_BATCH_BYTES,
        });
    }
    Ok(())
}

/// Cuts the error text of an outcome to [`MAX_HANDLER_ERROR`] bytes (see
/// [`cut_error_text`]). Every adapter applies it where an outcome enters, before it adds its
/// own note, so what it keeps is at most [`MAX_ERROR_TEXT`] bytes.
pub fn limit_outcome(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Retry { after, error } => Outcome::Retry {
            after,
            error: cut_error_text(error),
        },
        Outcome::DeadLetter { error } => Outcome::DeadLetter {
            error: cut_error_text(error),
        },
        other => other,
    }
}

/// Cuts `text` to at most [`MAX_HANDLER_ERROR`] bytes on a character boundary, ending it
/// with `… [cut: N bytes]` where `N` counts the bytes left out. Shorter text is returned as
/// is.
pub fn cut_error_text(text: String) -> String {
    if text.len() <= MAX_HANDLER_ERROR {
        return text;
    }
    // Room for the longest marker: "… [cut: " + 20 digits + " bytes]".
    let reserve = "… [cut: ".len() + 20 + " bytes]".len();
    let mut end = MAX_HANDLER_ERROR - reserve;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(MAX_HANDLER_ERROR);
    out.push_str(&text[..end]);
    out.push_str(&format!("… [cut: {} bytes]", text.len() - end));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_multibyte_text_is_cut_on_a_character_boundary_with_a_marker() {
        let text = "한국어 {\"본문\": \"오류\"} ".repeat(5000);
        let cut = cut_error_text(text.clone());
        assert!(cut.len() <= MAX_HANDLER_ERROR, "{} bytes", cut.len());
        let (kept, marker) = cut.rsplit_once("… [cut: ").expect("a marker");
        assert!(text.starts_with(kept));
        let n: usize = marker
            .strip_suffix(" bytes]")
            .expect("marker end")
            .parse()
            .expect("a count");
        assert_eq!(kept.len() + n, text.len());
    }

    #[test]
    fn short_text_is_kept_as_is() {
        let text = "x".repeat(MAX_HANDLER_ERROR);
        assert_eq!(cut_error_text(text.clone()), text);
        assert_ne!(cut_error_text(text.clone() + "x"), text + "x");
    }

    #[test]
    fn outcomes_have_their_error_cut_and_keep_the_rest() {
        let long = "오".repeat(10_000);
        let Outcome::Retry { after, error } = limit_outcome(Outcome::Retry {
            after: Some(std::time::Duration::from_secs(3)),
            error: long.clone(),
        }) else {
            panic!("still a retry");
        };
        assert_eq!(after, Some(std::time::Duration::from_secs(3)));
        assert!(error.len() <= MAX_HANDLER_ERROR && error.contains("… [cut: "));
        let Outcome::DeadLetter { error } = limit_outcome(Outcome::DeadLetter { error: long })
        else {
            panic!("still a dead letter");
        };
        assert!(error.len() <= MAX_HANDLER_ERROR);
        assert_eq!(limit_outcome(Outcome::Ack), Outcome::Ack);
    }

    #[test]
    fn channel_names_are_checked_for_length_and_characters() {
        assert_eq!(channel_name_problem("user/registered:v1.2_a-b"), None);
        assert_eq!(channel_name_problem(&"a".repeat(MAX_CHANNEL_NAME)), None);
        assert!(channel_name_problem(&"a".repeat(MAX_CHANNEL_NAME + 1)).is_some());
        assert!(channel_name_problem("").is_some());
        assert!(channel_name_problem("a b").is_some());
        assert!(channel_name_problem("/a").is_some());
        assert!(channel_name_problem("a/").is_some());
        assert!(channel_name_problem("채널").is_some());
        assert!(check_channel_name(&"a".repeat(65_000)).is_err());
    }
}
