//! The shared services the worker injects into its consumers (the seed's `Database`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The environment variable naming the database file.
pub const DB_VAR: &str = "EXAMPLE_DB";

/// The database file used when `EXAMPLE_DB` is not set.
pub const DEFAULT_DB: &str = "example-db.jsonl";

/// One row the consumers write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "table", rename_all = "snake_case")]
pub enum Record {
    /// A user stored by [`save_user`](crate::consumers::save_user).
    User {
        /// The queue's id of the `UserRegistered` message.
        message_id: u64,
        /// Which delivery of that message wrote the row (1 for the first).
        attempt: u32,
        /// The user's id.
        id: u64,
        /// The user's name.
        username: String,
    },
    /// A welcome mail sent by [`send_welcome_mail`](crate::consumers::send_welcome_mail).
    WelcomeMail {
        /// The queue's id of the `WelcomeMail` message.
        message_id: u64,
        /// The user it went to.
        user_id: u64,
        /// The greeting.
        text: String,
    },
}

/// A stand-in for a real database: an append-only file with one JSON [`Record`] per line.
///
/// Every row a consumer writes is visible in the file, which makes "handled once" checkable
/// by reading it. Each insert is synced to disk before it returns, so a consumer acks only
/// after its effect is durable. Clone the `Arc` the worker gets, not the database.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    file: Mutex<File>,
}

impl Database {
    /// Opens (or creates) the database file at `path`, creating missing parent directories.
    ///
    /// # Errors
    /// The I/O error when the file cannot be created or opened for appending.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Database {
            path,
            file: Mutex::new(file),
        })
    }

    /// The path named by `EXAMPLE_DB`, or [`DEFAULT_DB`].
    pub fn default_path() -> PathBuf {
        std::env::var_os(DB_VAR)
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_DB), PathBuf::from)
    }

    /// The file behind this database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and syncs it to disk. Blocks; call it from a blocking context (see
    /// [`Database::insert_async`]).
    ///
    /// # Errors
    /// The I/O error when the write or the sync fails.
    pub fn insert(&self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.write_all(&line)?;
        file.sync_data()
    }

    /// [`Database::insert`] on tokio's blocking pool.
    ///
    /// # Errors
    /// As [`Database::insert`].
    ///
    /// # Cancel safety
    /// Not cancel safe: the row may be written after the future is dropped.
    pub async fn insert_async(self: &Arc<Self>, record: Record) -> io::Result<()> {
        let db = Arc::clone(self);
        tokio::task::spawn_blocking(move || db.insert(&record))
            .await
            .map_err(io::Error::other)?
    }

    /// Every complete row of the database file at `path`, oldest first; no rows when the file
    /// does not exist. A last line still being written is skipped.
    ///
    /// # Errors
    /// The I/O error when the file cannot be read; [`io::ErrorKind::InvalidData`] for a
    /// complete line that is not a [`Record`].
    pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<Record>> {
        let file = match File::open(path.as_ref()) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || !line.ends_with('\n') {
                return Ok(records);
            }
            records.push(serde_json::from_str(&line)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_in_order_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/db.jsonl");
        assert_eq!(Database::read(&path).unwrap(), Vec::new());
        let db = Database::open(&path).unwrap();
        let rows = [
            Record::User {
                message_id: 7,
                attempt: 1,
                id: 1,
                username: "Peter".into(),
            },
            Record::WelcomeMail {
                message_id: 8,
                user_id: 1,
                text: "Welcome, Peter!".into(),
            },
        ];
        for row in &rows {
            db.insert(row).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"table":"user","#)
            .unwrap();
        assert_eq!(Database::read(&path).unwrap(), rows);
    }
}
