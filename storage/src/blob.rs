//! [`BlobStore`]: a directory of key → bytes, one file per key, each put
//! committed atomically through [`crate::manifest`].
//!
//! The engine's `StateStore` for deactivated actors will wrap this; here a
//! key is only a number or a short name and a value only bytes. One store
//! per directory and one owner (a shard) per store: the key count is kept in
//! memory and not re-read from disk.
//!
//! File names: `id-<16 lowercase hex digits>` for [`BlobKey::Id`] and
//! `name-<name>` for [`BlobKey::Name`]. Other files in the directory
//! (including temp files of an interrupted put) are ignored by [`BlobStore::list`].
//!
//! Bounds: each value is at most `blob_bytes_max` bytes and the store holds
//! at most `blobs_max` keys; a put beyond either is an error and writes nothing.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::manifest;

/// Longest [`BlobKey::Name`], in bytes.
pub const BLOB_NAME_BYTES_MAX: usize = 64;

/// A blob's key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlobKey {
    Id(u64),
    /// 1 to [`BLOB_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.-]`, not starting
    /// with `.`.
    Name(String),
}

impl BlobKey {
    fn file_name(&self) -> Result<String, StorageError> {
        match self {
            BlobKey::Id(id) => Ok(format!("id-{id:016x}")),
            BlobKey::Name(name) => {
                check_blob_name(name)?;
                Ok(format!("name-{name}"))
            }
        }
    }

    fn from_file_name(file_name: &str) -> Option<BlobKey> {
        if let Some(hex) = file_name.strip_prefix("id-") {
            if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return u64::from_str_radix(hex, 16).ok().map(BlobKey::Id);
            }
            return None;
        }
        let name = file_name.strip_prefix("name-")?;
        check_blob_name(name).ok()?;
        Some(BlobKey::Name(name.to_string()))
    }
}

fn check_blob_name(name: &str) -> Result<(), StorageError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > BLOB_NAME_BYTES_MAX {
        "longer than BLOB_NAME_BYTES_MAX"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        "has a byte outside [A-Za-z0-9_.-]"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// Bounds of a blob store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobConfig {
    /// Largest value, in bytes.
    pub blob_bytes_max: u64,
    /// Most keys the store may hold.
    pub blobs_max: u64,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            blob_bytes_max: 64 * 1024 * 1024,
            blobs_max: 1_000_000,
        }
    }
}

/// Directory-backed key → bytes store (see the module header).
pub struct BlobStore {
    dir: PathBuf,
    config: BlobConfig,
    blobs: u64,
}

impl BlobStore {
    /// Opens the store in `dir`, creating the directory if needed. Fails with
    /// `TooManyBlobs` if it already holds more than `blobs_max` keys.
    pub fn open(dir: impl AsRef<Path>, config: BlobConfig) -> Result<Self, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir)
                .map_err(|e| StorageError::io("create directory", &dir, None, e))?;
            manifest::sync_parent_dir(&dir)?;
        }
        let mut store = BlobStore {
            dir,
            config,
            blobs: 0,
        };
        store.blobs = store.list()?.len() as u64;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of keys held.
    pub fn len(&self) -> u64 {
        self.blobs
    }

    pub fn is_empty(&self) -> bool {
        self.blobs == 0
    }

    /// Stores `bytes` under `key`, replacing any old value atomically.
    pub fn put(&mut self, key: &BlobKey, bytes: &[u8]) -> Result<(), StorageError> {
        let file_name = key.file_name()?;
        let path = self.dir.join(&file_name);
        if bytes.len() as u64 > self.config.blob_bytes_max {
            return Err(StorageError::FileTooLarge {
                path,
                file_bytes: bytes.len() as u64,
                file_bytes_max: self.config.blob_bytes_max,
            });
        }
        let is_new = !path.exists();
        if is_new && self.blobs >= self.config.blobs_max {
            return Err(StorageError::TooManyBlobs {
                path: self.dir.clone(),
                blobs_max: self.config.blobs_max,
            });
        }
        manifest::commit_atomic(&self.dir, &file_name, bytes)?;
        if is_new {
            self.blobs += 1;
        }
        Ok(())
    }

    /// The value under `key`, or `None`.
    pub fn get(&self, key: &BlobKey) -> Result<Option<Vec<u8>>, StorageError> {
        manifest::read_bounded(&self.dir, &key.file_name()?, self.config.blob_bytes_max)
    }

    /// Removes `key`; `Ok(false)` if it was absent.
    pub fn remove(&mut self, key: &BlobKey) -> Result<bool, StorageError> {
        let removed = manifest::remove(&self.dir, &key.file_name()?)?;
        if removed {
            self.blobs -= 1;
        }
        Ok(removed)
    }

    /// All keys, sorted. Fails with `TooManyBlobs` rather than return more
    /// than `blobs_max` keys.
    pub fn list(&self) -> Result<Vec<BlobKey>, StorageError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| StorageError::io("list directory", &self.dir, None, e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| StorageError::io("list directory", &self.dir, None, e))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if manifest::is_temp_name(&file_name) {
                continue;
            }
            if let Some(key) = BlobKey::from_file_name(&file_name) {
                if keys.len() as u64 >= self.config.blobs_max {
                    return Err(StorageError::TooManyBlobs {
                        path: self.dir.clone(),
                        blobs_max: self.config.blobs_max,
                    });
                }
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    //! Blob store: put/get/remove/list, replacement, bounds, key names, and
    //! that stray temp files are not listed.

    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dirigo-storage-blob-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn put_get_remove_list() {
        let dir = temp_dir("basic");
        let mut store = BlobStore::open(&dir, BlobConfig::default()).unwrap();
        let keys = [
            BlobKey::Id(0),
            BlobKey::Id(u64::MAX),
            BlobKey::Id(42),
            BlobKey::Name("actor-7.state".into()),
        ];
        for (i, key) in keys.iter().enumerate() {
            store.put(key, format!("value {i}").as_bytes()).unwrap();
        }
        store.put(&BlobKey::Id(42), b"replaced").unwrap();
        assert_eq!(store.len(), 4);
        assert_eq!(store.get(&BlobKey::Id(42)).unwrap().unwrap(), b"replaced");
        assert_eq!(store.get(&BlobKey::Id(1)).unwrap(), None);
        let mut sorted = keys.to_vec();
        sorted.sort();
        assert_eq!(store.list().unwrap(), sorted);

        // A stray temp file from an interrupted put is not a key.
        fs::write(dir.join(".id-0000000000000001.tmp"), b"torn").unwrap();
        let reopened = BlobStore::open(&dir, BlobConfig::default()).unwrap();
        assert_eq!(reopened.len(), 4);

        assert!(store.remove(&BlobKey::Id(0)).unwrap());
        assert!(!store.remove(&BlobKey::Id(0)).unwrap());
        assert_eq!(store.len(), 3);
        assert_eq!(store.get(&BlobKey::Id(0)).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounds_and_bad_names_are_errors() {
        let dir = temp_dir("bounds");
        let config = BlobConfig {
            blob_bytes_max: 8,
            blobs_max: 2,
        };
        let mut store = BlobStore::open(&dir, config).unwrap();
        let error = store.put(&BlobKey::Id(1), &[0; 9]).unwrap_err();
        assert!(
            matches!(error, StorageError::FileTooLarge { .. }),
            "{error}"
        );
        store.put(&BlobKey::Id(1), &[0; 8]).unwrap();
        store.put(&BlobKey::Id(2), b"x").unwrap();
        store.put(&BlobKey::Id(2), b"y").unwrap(); // replacing is not growing
        let error = store.put(&BlobKey::Id(3), b"z").unwrap_err();
        assert!(
            matches!(error, StorageError::TooManyBlobs { .. }),
            "{error}"
        );
        for name in ["", ".x", "a/b", "a b", &"n".repeat(BLOB_NAME_BYTES_MAX + 1)] {
            let error = store.put(&BlobKey::Name(name.into()), b"v").unwrap_err();
            assert!(
                matches!(error, StorageError::InvalidName { .. }),
                "{name:?}: {error}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
