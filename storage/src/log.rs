//! Append-only log files: the record format, the writer, the reader, and
//! recovery of a torn or corrupt tail.
//!
//! # Record format
//!
//! ```text
//! offset 0      4           8      9
//!        [length u32 LE][crc32c u32 LE][kind u8][payload: length bytes]
//! ```
//!
//! `length` counts payload bytes only; a record occupies
//! `RECORD_HEADER_BYTES + length` bytes. The crc32c covers `kind` and the
//! payload. Records are packed back to back with no padding: the log is read
//! sequentially and copied out, so alignment buys nothing here (unlike net
//! frames, which are read in place).
//!
//! # Recovery
//!
//! A crash can leave the last record torn (short header or short payload),
//! and media can corrupt bytes. [`recover`] scans from the start and stops at
//! the first record that is short, larger than `record_bytes_max`, or fails
//! its crc; it truncates the file there and reports the cut in [`Recovered`].
//! Everything from the first bad record on is cut, even if later bytes look
//! valid: once a length is untrusted, the next record boundary is unknown.
//!
//! # Failure of an append
//!
//! An append is one positioned write at the current end. If it fails (disk
//! full, I/O error), the writer truncates the file back to the previous end
//! and returns the error naming file and offset; earlier records are
//! untouched. If even that truncate fails, or an fsync fails (after which
//! the kernel's page cache state is unknown), the writer is poisoned and
//! refuses further appends; reopening runs recovery, which cuts whatever
//! partial record was left.
//!
//! # Back-end
//!
//! Blocking `std::fs` for now; direct I/O on io_uring will replace it (see
//! the crate header). The format, the returned offsets and [`Recovered`] stay.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{CutReason, StorageError};

/// Bytes of a record header: length (4), crc32c (4), kind (1).
pub const RECORD_HEADER_BYTES: usize = 9;

/// Default bound on one whole record, header included.
pub const RECORD_BYTES_MAX_DEFAULT: u64 = 16 * 1024 * 1024;

/// Bytes of the read-ahead buffer used by [`LogReader`].
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Bounds of a log. Reader and writer of one log must agree on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Largest record, header included, that may be appended or read back.
    /// A header announcing more is treated as corruption.
    pub record_bytes_max: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            record_bytes_max: RECORD_BYTES_MAX_DEFAULT,
        }
    }
}

/// One record read back from a log. `payload` borrows the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Byte offset of the record's header in the file, as `append` returned.
    pub offset: u64,
    pub kind: u8,
    pub payload: &'a [u8],
}

/// What recovery found: how much of the log is valid and what it cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Number of valid records kept.
    pub records: u64,
    /// Length of the log after recovery; the next append goes here.
    pub bytes_valid: u64,
    /// The cut, if the tail was torn or corrupt.
    pub cut: Option<TailCut>,
}

/// A torn or corrupt tail that recovery removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailCut {
    /// Offset of the first bad record; the file now ends here.
    pub offset: u64,
    /// Zero-based number of the first bad record.
    pub record_number: u64,
    /// Bytes removed from the end of the file.
    pub bytes_cut: u64,
    pub reason: CutReason,
}

fn record_crc(kind: u8, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload)
}

/// Sequential reader over the valid records of a log. It reads at most the
/// file length seen at open, and at most `record_bytes_max` per record.
pub struct LogReader {
    path: PathBuf,
    reader: BufReader<File>,
    config: LogConfig,
    file_bytes: u64,
    offset: u64,
    record_number: u64,
    payload: Vec<u8>,
}

impl LogReader {
    /// Opens `path` for reading from the first record.
    pub fn open(path: impl AsRef<Path>, config: LogConfig) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| StorageError::io("open", path, None, e))?;
        Self::from_file(file, path, config)
    }

    fn from_file(file: File, path: &Path, config: LogConfig) -> Result<Self, StorageError> {
        let file_bytes = file
            .metadata()
            .map_err(|e| StorageError::io("stat", path, None, e))?
            .len();
        Ok(LogReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
            config,
            file_bytes,
            offset: 0,
            record_number: 0,
            payload: Vec::new(),
        })
    }

    /// Offset just past the last record returned: the end of the valid log
    /// once `next_record` has returned `Ok(None)` or a `Corrupt` error.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of records returned so far.
    pub fn records_read(&self) -> u64 {
        self.record_number
    }

    /// The next record, `Ok(None)` at a clean end of file, or
    /// `StorageError::Corrupt` naming the record number, offset and reason.
    /// After an error the reader stays where it was; calling again repeats it.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, StorageError> {
        let bytes_left = self.file_bytes - self.offset;
        if bytes_left == 0 {
            return Ok(None);
        }
        if bytes_left < RECORD_HEADER_BYTES as u64 {
            return Err(self.corrupt(CutReason::ShortHeader {
                header_bytes_present: bytes_left,
            }));
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        self.read_exact(&mut header)?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        let crc_expected = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let kind = header[8];
        let record_bytes = RECORD_HEADER_BYTES as u64 + length;
        if record_bytes > self.config.record_bytes_max {
            return Err(self.corrupt(CutReason::Oversize {
                record_bytes,
                record_bytes_max: self.config.record_bytes_max,
            }));
        }
        let payload_bytes_present = bytes_left - RECORD_HEADER_BYTES as u64;
        if payload_bytes_present < length {
            return Err(self.corrupt(CutReason::ShortPayload {
                payload_bytes_expected: length,
                payload_bytes_present,
            }));
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(length as usize, 0);
        let read = self.read_exact(&mut payload);
        self.payload = payload;
        read?;
        let crc_actual = record_crc(kind, &self.payload);
        if crc_actual != crc_expected {
            return Err(self.corrupt(CutReason::Checksum {
                crc_expected,
                crc_actual,
            }));
        }
        let offset = self.offset;
        self.offset += record_bytes;
        self.record_number += 1;
        Ok(Some(Record {
            offset,
            kind,
            payload: &self.payload,
        }))
    }

    /// Reads exactly `buffer.len()` bytes; the caller has checked they are
    /// within the file length seen at open, so a short read is an I/O error
    /// (the file shrank under us), reported at the record's offset.
    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), StorageError> {
        self.reader
            .read_exact(buffer)
            .map_err(|e| StorageError::io("read", &self.path, Some(self.offset), e))
    }

    fn corrupt(&mut self, reason: CutReason) -> StorageError {
        // Rewind so that a repeated call reports the same record again.
        let _ = self.rewind_to_offset();
        StorageError::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            record_number: self.record_number,
            reason,
        }
    }

    fn rewind_to_offset(&mut self) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.reader.seek(SeekFrom::Start(self.offset)).map(|_| ())
    }
}

/// Scans the log at `path`, truncates a torn or corrupt tail and fsyncs the
/// file if it cut anything. The file must exist.
pub fn recover(path: impl AsRef<Path>, config: LogConfig) -> Result<Recovered, StorageError> {
    let path = path.as_ref();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open", path, None, e))?;
    recover_file(&file, path, config)
}

fn recover_file(file: &File, path: &Path, config: LogConfig) -> Result<Recovered, StorageError> {
    let clone = file
        .try_clone()
        .map_err(|e| StorageError::io("dup", path, None, e))?;
    let mut reader = LogReader::from_file(clone, path, config)?;
    let file_bytes = reader.file_bytes;
    loop {
        match reader.next_record() {
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Ok(Recovered {
                    records: reader.records_read(),
                    bytes_valid: reader.offset(),
                    cut: None,
                })
            }
            Err(StorageError::Corrupt {
                offset,
                record_number,
                reason,
                ..
            }) => {
                file.set_len(offset)
                    .map_err(|e| StorageError::io("truncate", path, Some(offset), e))?;
                file.sync_all()
                    .map_err(|e| StorageError::io("fsync", path, Some(offset), e))?;
                return Ok(Recovered {
                    records: record_number,
                    bytes_valid: offset,
                    cut: Some(TailCut {
                        offset,
                        record_number,
                        bytes_cut: file_bytes - offset,
                        reason,
                    }),
                });
            }
            Err(other) => return Err(other),
        }
    }
}

/// Appends records to the end of one log file. One writer per file: the
/// shard that owns the file.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    config: LogConfig,
    end_offset: u64,
    records: u64,
    recovered: Recovered,
    poisoned: bool,
    /// Header and payload of the record being appended, so that each append
    /// is one write. Never longer than `record_bytes_max`.
    record_buffer: Vec<u8>,
    #[cfg(test)]
    fault: Fault,
}

/// Test-only fault injection: make the next write stop short with ENOSPC,
/// and optionally make the rollback truncate fail too.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Fault {
    pub write_bytes_before_enospc: Option<usize>,
    pub truncate_fails: bool,
}

impl LogWriter {
    /// Opens or creates the log at `path`, runs [`recover`] on it (so that
    /// appends never land after a torn record) and positions at its end.
    /// The report is kept in [`LogWriter::recovered`].
    pub fn open(path: impl AsRef<Path>, config: LogConfig) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StorageError::io("open", path, None, e))?;
        if !existed {
            crate::manifest::sync_parent_dir(path)?;
        }
        let recovered = recover_file(&file, path, config)?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            config,
            end_offset: recovered.bytes_valid,
            records: recovered.records,
            recovered,
            poisoned: false,
            record_buffer: Vec::new(),
            #[cfg(test)]
            fault: Fault::default(),
        })
    }

    /// What recovery found when this writer was opened.
    pub fn recovered(&self) -> &Recovered {
        &self.recovered
    }

    /// Offset at which the next record will be written.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// Number of records in the log, recovered ones included.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and returns the offset of its header. The record
    /// is durable only after [`LogWriter::sync`].
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned {
                path: self.path.clone(),
                offset: self.end_offset,
            });
        }
        let record_bytes = RECORD_HEADER_BYTES as u64 + payload.len() as u64;
        if record_bytes > self.config.record_bytes_max || payload.len() > u32::MAX as usize {
            return Err(StorageError::RecordTooLarge {
                path: self.path.clone(),
                record_bytes,
                record_bytes_max: self.config.record_bytes_max,
            });
        }
        self.record_buffer.clear();
        self.record_buffer
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.record_buffer
            .extend_from_slice(&record_crc(kind, payload).to_le_bytes());
        self.record_buffer.push(kind);
        self.record_buffer.extend_from_slice(payload);
        debug_assert_eq!(self.record_buffer.len() as u64, record_bytes);

        let offset = self.end_offset;
        if let Err(error) = self.write_record_at(offset) {
            if self.truncate_to(offset).is_err() {
                self.poisoned = true;
            }
            return Err(StorageError::io(
                "append to",
                &self.path,
                Some(offset),
                error,
            ));
        }
        self.end_offset += record_bytes;
        self.records += 1;
        Ok(offset)
    }

    /// Makes every appended record durable (fdatasync). A failure poisons
    /// the writer: after a failed fsync the kernel may have dropped dirty
    /// pages, so only a reopen (and recovery) tells what is on disk.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned {
                path: self.path.clone(),
                offset: self.end_offset,
            });
        }
        self.file.sync_data().map_err(|e| {
            self.poisoned = true;
            StorageError::io("fsync", &self.path, Some(self.end_offset), e)
        })
    }

    #[cfg(not(test))]
    fn write_record_at(&mut self, offset: u64) -> io::Result<()> {
        self.file.write_all_at(&self.record_buffer, offset)
    }

    #[cfg(not(test))]
    fn truncate_to(&mut self, offset: u64) -> io::Result<()> {
        self.file.set_len(offset)
    }

    #[cfg(test)]
    fn write_record_at(&mut self, offset: u64) -> io::Result<()> {
        match self.fault.write_bytes_before_enospc.take() {
            None => self.file.write_all_at(&self.record_buffer, offset),
            Some(bytes) => {
                let bytes = bytes.min(self.record_buffer.len());
                self.file
                    .write_all_at(&self.record_buffer[..bytes], offset)?;
                Err(io::Error::from_raw_os_error(28)) // ENOSPC
            }
        }
    }

    #[cfg(test)]
    fn truncate_to(&mut self, offset: u64) -> io::Result<()> {
        if self.fault.truncate_fails {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.file.set_len(offset)
    }

    #[cfg(test)]
    pub(crate) fn inject_fault(&mut self, fault: Fault) {
        self.fault = fault;
    }
}

#[cfg(test)]
mod tests;
