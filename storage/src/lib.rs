//! Durable state for one shard: append-only logs, atomically committed small
//! files (checkpoint manifests, snapshots), a directory-backed blob store, and
//! the files of checkpoints.
//!
//! # Boundary
//!
//! This crate owns every file system call Dirigo makes: opening, writing,
//! fsyncing, renaming, truncating and listing files. It knows nothing of
//! actors, operators or dataflow, nor what a checkpoint holds: a log record
//! is a `kind: u8` and opaque payload bytes, a manifest is a named byte
//! string, a blob is a key and bytes, a checkpoint part or staged output file
//! is bytes with a length and a crc32c. `engine` gives those bytes their
//! meaning and reaches the disk only through the types below.
//!
//! - [`log`]: framed append-only log, with recovery that detects and cuts a
//!   torn or corrupt tail and reports what it cut.
//! - [`manifest`]: write-temp, fsync, rename, fsync-directory commit of a
//!   whole small file.
//! - [`mod@read`]: a byte range of a file read sequentially on a dedicated
//!   thread through io_uring into a bounded pool of buffers, handed over without
//!   blocking the consumer (the file source's input).
//! - [`blob`]: key → bytes, one file per key, each put committed atomically.
//!   The engine's `StateStore` for deactivated actors will wrap it.
//! - [`checkpoint`]: the on-disk layer of checkpoints: chunks of framed,
//!   checksummed parts, manifests committed atomically per epoch, staged
//!   output files and their exactly-once append to an output, retention, and
//!   injected `ENOSPC` faults for tests.
//! - [`raftlog`]: a node's consensus log (entries with overwrites, hard
//!   state, membership) over one [`log`] file, replayed on open.
//! - [`spool`]: a writer on its own thread behind a bounded hand-off of
//!   buffers, so that a sink on a shard never makes a write system call.
//!
//! # Bounds
//!
//! Every read and write is bounded: `LogConfig::record_bytes_max`,
//! [`manifest::MANIFEST_BYTES_MAX`], `BlobConfig::blob_bytes_max`,
//! `BlobConfig::blobs_max` and [`checkpoint::PART_BYTES_MAX`]. Input over a
//! bound, and any corrupt input, is a [`StorageError`] naming the file and
//! offset, never a panic.
//!
//! # Back-end
//!
//! For now the implementation is blocking `std::fs`. The planned back-end is
//! direct I/O on io_uring (glommio `DmaFile`), one file set per shard. That
//! change will make the calls `async` and buffer appends into aligned
//! blocks; the on-disk formats, the offsets returned by `append`, the
//! recovery report and the error values stay the same.

pub mod blob;
pub mod checkpoint;
mod error;
pub mod log;
pub mod manifest;
pub mod raftlog;
pub mod read;
pub mod spool;

pub use blob::{BlobConfig, BlobKey, BlobStore};
pub use checkpoint::{CheckpointDir, Faults, PartRef, StagedRef, StagedWriter};
pub use error::{CutReason, Damage, StorageError};
pub use log::{recover, LogConfig, LogReader, LogWriter, Record, Recovered, TailCut};
pub use manifest::{commit_atomic, read};
