//! The channels' counters, in a file of their own (`counters`) beside the segments, so that
//! they count across restarts: a header line, the time counting began, one line per channel
//! (`produced duplicates acked retried dead_lettered lease_expiries name`), and a CRC32C line
//! over what precedes it, replaced whole (see `sidecar`).
//!
//! The store saves it on close and every few seconds while open, so after a crash the counts
//! are off by at most those last seconds' work (a save may count an ack applied in memory
//! whose record the crash then lost). Counters are not data: a damaged file is reported and
//! counting starts again from the open, instead of refusing the store.

use std::path::Path;

use queue_core::QueueError;
use queue_core::clock::Timestamp;

use super::sidecar;
use super::writer::Storage;
use crate::engine::Tally;

const HEADER: &str = "typed-queue counters 1\n";
const FILE: &str = "counters";

/// Counters as kept: since when they count, and each channel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// When counting began.
    pub since: Timestamp,
    /// Each channel's counters.
    pub channels: Vec<(String, Tally)>,
}

/// The counters kept in `dir`: `None` when there is no file, or when it is damaged (which
/// is logged).
///
/// # Errors
/// Read errors other than a missing file.
pub fn load(dir: &Path, storage: &dyn Storage) -> Result<Option<Kept>, QueueError> {
    let Some(bytes) = sidecar::read(dir, storage, FILE)? else {
        return Ok(None);
    };
    let kept = parse(&bytes);
    if kept.is_none() {
        tracing::warn!(
            path = %dir.join(FILE).display(),
            "the counters file is damaged: counters start again from zero"
        );
    }
    Ok(kept)
}

fn parse(bytes: &[u8]) -> Option<Kept> {
    let mut lines = sidecar::body(bytes, HEADER)?.lines();
    let since = lines.next()?.strip_prefix("since ")?.parse().ok()?;
    let mut channels = Vec::new();
    for line in lines {
        let mut fields = line.splitn(7, ' ');
        let mut n = || fields.next()?.parse::<u64>().ok();
        let tally = Tally {
            produced: n()?,
            duplicates: n()?,
            acked: n()?,
            retried: n()?,
            dead_lettered: n()?,
            lease_expiries: n()?,
        };
        channels.push((fields.next()?.to_string(), tally));
    }
    Some(Kept { since, channels })
}

fn render(kept: &Kept) -> Vec<u8> {
    let mut text = format!("{HEADER}since {}\n", kept.since);
    for (name, t) in &kept.channels {
        text.push_str(&format!(
            "{} {} {} {} {} {} {name}\n",
            t.produced, t.duplicates, t.acked, t.retried, t.dead_lettered, t.lease_expiries
        ));
    }
    sidecar::seal(text)
}

/// Replaces the kept counters with `kept`, durably.
///
/// # Errors
/// The write, sync or rename error; the kept counters are then the old ones.
pub fn save(dir: &Path, storage: &dyn Storage, kept: &Kept) -> Result<(), QueueError> {
    sidecar::replace(dir, storage, FILE, &render(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_back_and_any_flipped_bit_is_refused() {
        let kept = Kept {
            since: 1_764_000_000_000,
            channels: vec![
                (
                    "user/registered".to_string(),
                    Tally {
                        produced: 10,
                        duplicates: 1,
                        acked: 7,
                        retried: 2,
                        dead_lettered: 1,
                        lease_expiries: 3,
                    },
                ),
                ("a".to_string(), Tally::default()),
            ],
        };
        let bytes = render(&kept);
        assert_eq!(parse(&bytes), Some(kept));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert_eq!(parse(&damaged), None, "byte {i} bit {bit}");
            }
        }
        assert_eq!(parse(&bytes[..bytes.len() - 1]), None);
    }
}
