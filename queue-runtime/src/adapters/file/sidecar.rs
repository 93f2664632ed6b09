//! Small files beside the segments (`paused`, `counters`): text ending in a CRC32C line over
//! what precedes it, replaced whole: written under a temporary name, synced, renamed into
//! place, and the directory synced, so a crash leaves the old file or the new one.

use std::io;
use std::path::Path;

use queue_core::QueueError;

use super::writer::Storage;

/// The bytes of `dir/name`, or `None` when there is no such file.
///
/// # Errors
/// Read errors other than a missing file.
pub fn read(dir: &Path, storage: &dyn Storage, name: &str) -> Result<Option<Vec<u8>>, QueueError> {
    match storage.read(&dir.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The text of `bytes` after `header` and before its CRC32C line, when the line matches.
pub fn body<'a>(bytes: &'a [u8], header: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix(header)?;
    let (body, crc_line) = rest.split_at(rest.rfind("crc32c ")?);
    (crc_line == crc_line_of(&bytes[..header.len() + body.len()])).then_some(body)
}

/// `text` with its CRC32C line appended.
pub fn seal(mut text: String) -> Vec<u8> {
    let crc = crc_line_of(text.as_bytes());
    text.push_str(&crc);
    text.into_bytes()
}

fn crc_line_of(bytes: &[u8]) -> String {
    format!("crc32c {:08x}\n", crc32c::crc32c(bytes))
}

/// Replaces `dir/name` with `bytes`, durably.
///
/// # Errors
/// The write, sync or rename error; the file is then the old one.
pub fn replace(
    dir: &Path,
    storage: &dyn Storage,
    name: &str,
    bytes: &[u8],
) -> Result<(), QueueError> {
    let temporary = dir.join(format!("{name}.tmp"));
    let file = storage.create(&temporary)?;
    storage.write_at(&file, bytes, 0)?;
    storage.sync_data(&file)?;
    drop(file);
    storage.rename(&temporary, &dir.join(name))?;
    storage.sync_dir(dir)?;
    Ok(())
}
