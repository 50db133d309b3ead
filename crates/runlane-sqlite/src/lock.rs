//! The data-path lock: an exclusive advisory lock on `<path>.lock`, held for the store's life.
//!
//! SQLite's own locks let two processes share a database, which would give two writers the same
//! runs (two timer services, two recoveries). The lock file makes the second one fail at open
//! with a clear error instead. The file itself is never deleted: removing a lock file while
//! another process opens it is how two holders happen.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::error::SqliteError;

/// The held lock; released when dropped (and by the OS if the process dies).
#[derive(Debug)]
pub(crate) struct DataLock {
    _file: File,
}

/// The lock file of a database path: the path with `.lock` appended.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

impl DataLock {
    /// Takes the lock of `path`, or fails with `InUse` when another store holds it.
    pub(crate) fn acquire(path: &Path) -> Result<DataLock, SqliteError> {
        let lock = lock_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(|source| SqliteError::Io {
                path: lock.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DataLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(SqliteError::InUse {
                path: path.to_path_buf(),
                lock,
            }),
            Err(TryLockError::Error(source)) => Err(SqliteError::Io { path: lock, source }),
        }
    }
}
