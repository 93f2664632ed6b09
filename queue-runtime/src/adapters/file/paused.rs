//! The paused channels of a store, in a file of their own (`paused`) beside the segments:
//! a header line, one channel name per line, and a CRC32C line over what precedes it,
//! replaced whole (see `sidecar`).

use std::path::Path;

use queue_core::QueueError;

use super::sidecar;
use super::writer::Storage;

const HEADER: &str = "typed-queue paused 1\n";
const FILE: &str = "paused";

/// The paused channels recorded in `dir`; none when the file does not exist.
///
/// # Errors
/// [`QueueError::Corrupt`] when the file is damaged; read errors.
pub fn load(dir: &Path, storage: &dyn Storage) -> Result<Vec<String>, QueueError> {
    let Some(bytes) = sidecar::read(dir, storage, FILE)? else {
        return Ok(Vec::new());
    };
    parse(&bytes).ok_or_else(|| {
        QueueError::Corrupt(format!(
            "{} is damaged: the paused channels cannot be read (remove it to resume every channel)",
            dir.join(FILE).display()
        ))
    })
}

fn parse(bytes: &[u8]) -> Option<Vec<String>> {
    Some(
        sidecar::body(bytes, HEADER)?
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn render(names: &[String]) -> Vec<u8> {
    let mut text = String::from(HEADER);
    for name in names {
        text.push_str(name);
        text.push('\n');
    }
    sidecar::seal(text)
}

/// Replaces the recorded set with `names`, durably.
///
/// # Errors
/// The write, sync or rename error; the recorded set is then the old one.
pub fn save(dir: &Path, storage: &dyn Storage, names: &[String]) -> Result<(), QueueError> {
    sidecar::replace(dir, storage, FILE, &render(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_reads_back_and_any_flipped_bit_is_refused() {
        let names = vec!["a/b".to_string(), "orders:eu-1".to_string()];
        let bytes = render(&names);
        assert_eq!(parse(&bytes), Some(names));
        assert_eq!(parse(&render(&[])), Some(Vec::new()));
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
