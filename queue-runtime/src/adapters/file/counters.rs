//! The channels' counters, in a file of their own (`counters`) beside the segments, so that
//! they count across restarts: a header line, the time counting began, one line per channel
//! (`produced duplicates acked retried dead_lettered lease_expiries name`), and a CRC32C line
//! over what precedes it. Replaced whole like `paused`: written under a temporary name,
//! synced, renamed into place, the directory synced.
//!
//! The store saves it on close and every few seconds while open, so a crash loses at most
//! the counts of those last seconds. Counters are not data: a damaged file is reported and
//! counting starts again from the open, instead of refusing the store.

use std::io;
use std::path::Path;

use queue_core::QueueError;
use queue_core::clock::Timestamp;

use super::writer::Storage;
use crate::engine::Tally;

const HEADER: &str = "typed-queue counters 1\n";
const FILE: &str = "counters";
const TEMPORARY: &str = "counters.tmp";

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
    let path = dir.join(FILE);
    let bytes = match storage.read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let kept = parse(&bytes);
    if kept.is_none() {
        tracing::warn!(
            path = %path.display(),
            "the counters file is damaged: counters start again from zero"
        );
    }
    Ok(kept)
}

fn parse(bytes: &[u8]) -> Option<Kept> {
    let text = std::str::from_utf8(bytes).ok()?;
    let body = text.strip_prefix(HEADER)?;
    let (lines, crc_line) = body.split_at(body.rfind("crc32c ")?);
    if crc_line != crc_line_of(&bytes[..HEADER.len() + lines.len()]) {
        return None;
    }
    let mut lines = lines.lines();
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
    let crc = crc_line_of(text.as_bytes());
    text.push_str(&crc);
    text.into_bytes()
}

fn crc_line_of(bytes: &[u8]) -> String {
    format!("crc32c {:08x}\n", crc32c::crc32c(bytes))
}

/// Replaces the kept counters with `kept`, durably.
///
/// # Errors
/// The write, sync or rename error; the kept counters are then the old ones.
pub fn save(dir: &Path, storage: &dyn Storage, kept: &Kept) -> Result<(), QueueError> {
    let temporary = dir.join(TEMPORARY);
    let file = storage.create(&temporary)?;
    storage.write_at(&file, &render(kept), 0)?;
    storage.sync_data(&file)?;
    drop(file);
    storage.rename(&temporary, &dir.join(FILE))?;
    storage.sync_dir(dir)?;
    Ok(())
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
