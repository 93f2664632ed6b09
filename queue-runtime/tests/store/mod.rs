//! Opening a store in a test binary whose other tests start processes.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use queue_core::{QueueError, VirtualClock};
use queue_runtime::adapters::file::{FileAdapter, FileOptions};

/// Opens the store at `dir`, waiting up to a second for its `LOCK`: a sibling test that
/// starts a process (`queuectl`, `mount`) leaves a copy of every descriptor, the `LOCK`
/// file's among them, in the child between its fork and its exec, so a store just closed
/// here can look in use for a moment.
pub fn open(
    dir: &Path,
    clock: &VirtualClock,
    options: impl Fn() -> FileOptions,
) -> Arc<FileAdapter> {
    let mut tries = 0;
    loop {
        match FileAdapter::open(dir, Arc::new(clock.clone()), options()) {
            Err(QueueError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.expect("open store"),
        }
    }
}
