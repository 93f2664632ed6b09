//! The paused channels of a store, in a file of their own (`paused`) beside the segments:
//! a header line, one channel name per line, and a CRC32C line over what precedes it.
//! It is replaced whole: written under a temporary name, synced, renamed into place, and
//! the directory synced, so a crash leaves the old set or the new one.

use std::io;
use std::path::Path;

use queue_core::QueueError;

use super::writer::Storage;

const HEADER: &str = "typed-queue paused 1\n";
const FILE: &str = "paused";
const TEMPORARY: &str = "paused.tmp";

/// The paused channels recorded in `dir`; none when the file does not exist.
///
/// # Errors
/// [`QueueError::Corrupt`] when the file is damaged; read errors.
pub fn load(dir: &Path, storage: &dyn Storage) -> Result<Vec<String>, QueueError> {
    let path = dir.join(FILE);
    let bytes = match storage.read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    parse(&bytes).ok_or_else(|| {
        QueueError::Corrupt(format!(
            "{} is damaged: the paused channels cannot be read (remove it to resume every channel)",
            path.display()
        ))
    })
}

fn parse(bytes: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let body = text.strip_prefix(HEADER)?;
    let (names, crc_line) = body.split_at(body.rfind("crc32c ")?);
    let covered = &bytes[..HEADER.len() + names.len()];
    if crc_line != crc_line_of(covered) {
        return None;
    }
    Some(names.lines().map(str::to_string).collect())
}

fn render(names: &[String]) -> Vec<u8> {
    let mut text = String::from(HEADER);
    for name in names {
        text.push_str(name);
        text.push('\n');
    }
    let crc = crc_line_of(text.as_bytes());
    text.push_str(&crc);
    text.into_bytes()
}

fn crc_line_of(bytes: &[u8]) -> String {
    format!("crc32c {:08x}\n", crc32c::crc32c(bytes))
}

/// Replaces the recorded set with `names`, durably.
///
/// # Errors
/// The write, sync or rename error; the recorded set is then the old one.
pub fn save(dir: &Path, storage: &dyn Storage, names: &[String]) -> Result<(), QueueError> {
    let temporary = dir.join(TEMPORARY);
    let file = storage.create(&temporary)?;
    storage.write_at(&file, &render(names), 0)?;
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
