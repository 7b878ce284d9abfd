//! Atomic replacement of a whole small file: checkpoint manifests,
//! snapshots, and each value of the blob store.
//!
//! [`commit_atomic`] writes the bytes to a temporary file in the same
//! directory (`.<name>.tmp`), fsyncs it, renames it over `<name>` and fsyncs
//! the directory. rename(2) within one directory is atomic, so after a crash
//! at any point a reader sees either the old content or the new, never a
//! mix; the directory fsync makes the rename itself durable before we return.
//! A crash can leave a stray temp file: it is never read, and the next commit
//! of the same name overwrites it.
//!
//! Names are plain file names (no `/`, no leading `.`, which is reserved for
//! temp files). Contents are opaque bytes: a caller that wants to detect bit
//! rot frames them itself (the log format does). Reads are bounded by
//! [`MANIFEST_BYTES_MAX`] or the caller's bound.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::StorageError;

/// Default bound on a file read by [`read`].
pub const MANIFEST_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Longest name accepted, in bytes (common file systems allow 255; the temp
/// prefix and suffix take 5).
pub const NAME_BYTES_MAX: usize = 200;

/// Atomically replaces `dir/name` with `bytes` (see the module header).
pub fn commit_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    check_name(name)?;
    let target = dir.join(name);
    let temp = temp_path(dir, name);
    write_and_sync(&temp, bytes)?;
    fs::rename(&temp, &target).map_err(|e| StorageError::io("rename over", &target, None, e))?;
    sync_dir(dir)
}

/// Reads `dir/name` whole, bounded by [`MANIFEST_BYTES_MAX`].
/// `Ok(None)` if it does not exist.
pub fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
    read_bounded(dir, name, MANIFEST_BYTES_MAX)
}

/// Reads `dir/name` whole; a file longer than `file_bytes_max` is
/// `StorageError::FileTooLarge`. `Ok(None)` if it does not exist.
pub fn read_bounded(
    dir: &Path,
    name: &str,
    file_bytes_max: u64,
) -> Result<Option<Vec<u8>>, StorageError> {
    check_name(name)?;
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", &path, None, e)),
    };
    let file_bytes = file
        .metadata()
        .map_err(|e| StorageError::io("stat", &path, None, e))?
        .len();
    if file_bytes > file_bytes_max {
        return Err(StorageError::FileTooLarge {
            path,
            file_bytes,
            file_bytes_max,
        });
    }
    let mut bytes = Vec::with_capacity(file_bytes as usize);
    // `take` keeps the bound even if the file grew after the stat; one byte
    // more than the bound tells us it did.
    file.take(file_bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StorageError::io("read", &path, Some(0), e))?;
    if bytes.len() as u64 > file_bytes_max {
        return Err(StorageError::FileTooLarge {
            path,
            file_bytes: bytes.len() as u64,
            file_bytes_max,
        });
    }
    Ok(Some(bytes))
}

/// Removes `dir/name` and fsyncs the directory. `Ok(false)` if it did not
/// exist.
pub fn remove(dir: &Path, name: &str) -> Result<bool, StorageError> {
    check_name(name)?;
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StorageError::io("remove", &path, None, e)),
    }
    sync_dir(dir)?;
    Ok(true)
}

/// Whether `file_name` is a temp file of this module (to be skipped by
/// directory listings).
pub fn is_temp_name(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.ends_with(".tmp")
}

pub(crate) fn check_name(name: &str) -> Result<(), StorageError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_BYTES_MAX {
        "longer than NAME_BYTES_MAX"
    } else if name.starts_with('.') {
        "starts with '.', reserved for temp files"
    } else if name.contains(['/', '\0']) {
        "contains '/' or NUL"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

fn write_and_sync(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| StorageError::io("create", path, None, e))?;
    file.write_all(bytes)
        .map_err(|e| StorageError::io("write", path, Some(0), e))?;
    file.sync_all()
        .map_err(|e| StorageError::io("fsync", path, None, e))
}

/// Fsyncs a directory so that entries created, renamed or removed in it are
/// durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("fsync directory", dir, None, e))
}

/// Fsyncs the directory holding `path` (after creating `path`).
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), StorageError> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    //! Atomic commit: round trip, replacement, a stray temp file from a
    //! crash between write and rename, bounds and bad names.

    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "dirigo-storage-manifest-{test}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn commit_then_read_round_trips_and_replaces() {
        let dir = temp_dir("round-trip");
        assert_eq!(read(&dir, "manifest").unwrap(), None);
        commit_atomic(&dir, "manifest", b"checkpoint 1").unwrap();
        assert_eq!(read(&dir, "manifest").unwrap().unwrap(), b"checkpoint 1");
        commit_atomic(&dir, "manifest", b"checkpoint 2, longer").unwrap();
        assert_eq!(
            read(&dir, "manifest").unwrap().unwrap(),
            b"checkpoint 2, longer"
        );
        assert!(!temp_path(&dir, "manifest").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn crash_before_rename_leaves_old_content_and_next_commit_wins() {
        let dir = temp_dir("crash");
        commit_atomic(&dir, "manifest", b"old").unwrap();
        // A crash after writing the temp file but before the rename.
        fs::write(temp_path(&dir, "manifest"), b"new but half writ").unwrap();
        assert_eq!(read(&dir, "manifest").unwrap().unwrap(), b"old");
        // The next commit overwrites the stray temp file, not appends to it.
        commit_atomic(&dir, "manifest", b"new").unwrap();
        assert_eq!(read(&dir, "manifest").unwrap().unwrap(), b"new");
        assert!(!temp_path(&dir, "manifest").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_over_bound_is_an_error_naming_the_file() {
        let dir = temp_dir("bound");
        commit_atomic(&dir, "big", &[7u8; 100]).unwrap();
        let error = read_bounded(&dir, "big", 99).unwrap_err();
        assert!(matches!(
            error,
            StorageError::FileTooLarge {
                file_bytes: 100,
                file_bytes_max: 99,
                ..
            }
        ));
        assert!(error.to_string().contains("big"), "{error}");
        assert_eq!(read_bounded(&dir, "big", 100).unwrap().unwrap().len(), 100);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = temp_dir("names");
        for name in ["", ".hidden", "a/b", "..", &"x".repeat(NAME_BYTES_MAX + 1)] {
            let error = commit_atomic(&dir, name, b"x").unwrap_err();
            assert!(
                matches!(error, StorageError::InvalidName { .. }),
                "{name:?}: {error}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn remove_reports_whether_it_existed() {
        let dir = temp_dir("remove");
        commit_atomic(&dir, "m", b"x").unwrap();
        assert!(remove(&dir, "m").unwrap());
        assert!(!remove(&dir, "m").unwrap());
        assert_eq!(read(&dir, "m").unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
