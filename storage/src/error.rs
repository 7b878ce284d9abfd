//! The one error type of this crate, [`StorageError`], with [`CutReason`],
//! why a log record was judged corrupt, and [`Damage`], why a checkpoint file
//! was.
//!
//! Every variant names the file it is about, and the byte offset where one
//! applies, so that an operator reading a log line knows what to inspect
//! without a debugger. Errors are values: nothing here panics on bad input.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a log record was judged torn or corrupt. Recovery cuts the log at
/// the first such record and reports the reason in [`crate::TailCut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// Fewer bytes than a record header remained at the end of the file.
    ShortHeader { header_bytes_present: u64 },
    /// The header announced more payload than the file holds.
    ShortPayload {
        payload_bytes_expected: u64,
        payload_bytes_present: u64,
    },
    /// The header announced a record larger than `record_bytes_max`.
    Oversize {
        record_bytes: u64,
        record_bytes_max: u64,
    },
    /// The crc32c over kind and payload does not match the header.
    Checksum { crc_expected: u32, crc_actual: u32 },
}

impl fmt::Display for CutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CutReason::ShortHeader {
                header_bytes_present,
            } => write!(
                f,
                "short header: {header_bytes_present} of {} bytes",
                crate::log::RECORD_HEADER_BYTES
            ),
            CutReason::ShortPayload {
                payload_bytes_expected,
                payload_bytes_present,
            } => write!(
                f,
                "short payload: {payload_bytes_present} of {payload_bytes_expected} bytes"
            ),
            CutReason::Oversize {
                record_bytes,
                record_bytes_max,
            } => write!(
                f,
                "record of {record_bytes} bytes exceeds record_bytes_max {record_bytes_max}"
            ),
            CutReason::Checksum {
                crc_expected,
                crc_actual,
            } => write!(
                f,
                "crc32c mismatch: header says {crc_expected:#010x}, data gives {crc_actual:#010x}"
            ),
        }
    }
}

/// Why a checkpoint file (a chunk part, a manifest, a staged file, or an
/// output being appended to) does not hold what its reference or its own
/// frame says. See [`crate::checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The file ends before the bytes expected there.
    Short {
        bytes_expected: u64,
        bytes_present: u64,
    },
    /// The file holds more bytes than expected.
    Long {
        bytes_expected: u64,
        bytes_present: u64,
    },
    /// A frame does not start with its magic number.
    Magic {
        magic_expected: u32,
        magic_actual: u32,
    },
    /// A header field disagrees with the reference or the file's name:
    /// `field` names it ("length", "epoch", ...).
    Field {
        field: &'static str,
        expected: u64,
        actual: u64,
    },
    /// The crc32c of the bytes does not match the expected one.
    Checksum { crc_expected: u32, crc_actual: u32 },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Damage::Short {
                bytes_expected,
                bytes_present,
            } => write!(
                f,
                "short: {bytes_present} of {bytes_expected} bytes present"
            ),
            Damage::Long {
                bytes_expected,
                bytes_present,
            } => write!(
                f,
                "long: {bytes_present} bytes where {bytes_expected} were expected"
            ),
            Damage::Magic {
                magic_expected,
                magic_actual,
            } => write!(
                f,
                "magic {magic_actual:#010x}, expected {magic_expected:#010x}"
            ),
            Damage::Field {
                field,
                expected,
                actual,
            } => write!(f, "{field} is {actual}, expected {expected}"),
            Damage::Checksum {
                crc_expected,
                crc_actual,
            } => write!(
                f,
                "crc32c mismatch: expected {crc_expected:#010x}, data gives {crc_actual:#010x}"
            ),
        }
    }
}

/// An error from a storage operation. `Display` gives a one-line message
/// naming the operation, the file and (where it applies) the byte offset.
#[derive(Debug)]
pub enum StorageError {
    /// A system call failed. `offset` is where in the file it was aimed,
    /// when the operation has one (a write, a read, a truncate).
    Io {
        operation: &'static str,
        path: PathBuf,
        offset: Option<u64>,
        source: io::Error,
    },
    /// A log record is torn or corrupt. [`crate::LogReader`] returns this;
    /// [`crate::recover`] turns it into a cut.
    Corrupt {
        path: PathBuf,
        offset: u64,
        record_number: u64,
        reason: CutReason,
    },
    /// A checkpoint file is torn, corrupt, or not the one its reference
    /// describes; `offset` is where the damaged frame or range starts.
    CorruptFile {
        path: PathBuf,
        offset: u64,
        damage: Damage,
    },
    /// An append was refused because the record would exceed
    /// `record_bytes_max`. Nothing was written.
    RecordTooLarge {
        path: PathBuf,
        record_bytes: u64,
        record_bytes_max: u64,
    },
    /// A whole, checksummed record says what cannot be (an unknown kind,
    /// a gap in a sequence); `what` says which.
    Invalid {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A file to be read or written exceeds its bound. Nothing was written.
    FileTooLarge {
        path: PathBuf,
        file_bytes: u64,
        file_bytes_max: u64,
    },
    /// An earlier append failed and the file could not be put back to its
    /// last good length; the writer refuses further appends. Reopening the
    /// log runs recovery, which cuts the partial record at `offset`.
    Poisoned { path: PathBuf, offset: u64 },
    /// A manifest name or blob key cannot be used as a file name.
    InvalidName { name: String, reason: &'static str },
    /// A put would take the blob store past `blobs_max` keys.
    TooManyBlobs { path: PathBuf, blobs_max: u64 },
}

impl StorageError {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        source: io::Error,
    ) -> Self {
        StorageError::Io {
            operation,
            path: path.into(),
            offset,
            source,
        }
    }

    /// The underlying I/O error kind, if this is an I/O error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            StorageError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The underlying OS error number (for example `ENOSPC`), if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io {
                operation,
                path,
                offset: Some(offset),
                source,
            } => write!(
                f,
                "{operation} {} at offset {offset}: {source}",
                path.display()
            ),
            StorageError::Io {
                operation,
                path,
                offset: None,
                source,
            } => write!(f, "{operation} {}: {source}", path.display()),
            StorageError::Corrupt {
                path,
                offset,
                record_number,
                reason,
            } => write!(
                f,
                "corrupt log {}: record {record_number} at offset {offset}: {reason}",
                path.display()
            ),
            StorageError::CorruptFile {
                path,
                offset,
                damage,
            } => write!(
                f,
                "corrupt file {} at offset {offset}: {damage}",
                path.display()
            ),
            StorageError::Invalid { path, offset, what } => write!(
                f,
                "invalid record in {} at offset {offset}: {what}",
                path.display()
            ),
            StorageError::RecordTooLarge {
                path,
                record_bytes,
                record_bytes_max,
            } => write!(
                f,
                "append to {}: record of {record_bytes} bytes exceeds record_bytes_max {record_bytes_max}",
                path.display()
            ),
            StorageError::FileTooLarge {
                path,
                file_bytes,
                file_bytes_max,
            } => write!(
                f,
                "{}: {file_bytes} bytes exceeds the bound of {file_bytes_max}",
                path.display()
            ),
            StorageError::Poisoned { path, offset } => write!(
                f,
                "log {} refuses appends: an earlier append at offset {offset} failed and could not be rolled back; reopen to recover",
                path.display()
            ),
            StorageError::InvalidName { name, reason } => {
                write!(f, "invalid name {name:?}: {reason}")
            }
            StorageError::TooManyBlobs { path, blobs_max } => write!(
                f,
                "blob store {} is full: blobs_max {blobs_max}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
